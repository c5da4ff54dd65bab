"""Edges of ``NF4LoraLinear`` the main tests leave open: merging a chosen adapter, ``safe_merge``, merging into a
bf16 or non-default NF4 base, dropout in the fused forward, and the refusal of DoRA."""

import pytest
import torch
from torch import nn

from lightning_nf4 import NF4Linear
from lightning_nf4.format import quantize_nf4
from lightning_nf4.layers.lora import NF4LoraLinear, lora_config


def _layer(dtype=torch.float32, blocksize=64, double_quant=True, dropout=0.0, **config):
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96, dtype=dtype), blocksize, double_quant, compute_dtype=torch.float32)
    layer = NF4LoraLinear(base, "default", lora_config(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["x"], **config),
                          r=8, lora_alpha=16, lora_dropout=dropout)
    with torch.no_grad():  # B starts at zero; a non-zero B makes the update visible
        layer.lora_B["default"].weight.normal_(std=0.1)
    return layer


def _add_adapter(layer, name, r=4, alpha=12):
    layer.update_layer(name, r, lora_alpha=alpha, config=lora_config(r=r, lora_alpha=alpha, target_modules=["x"]))
    with torch.no_grad():
        layer.lora_B[name].weight.normal_(std=0.1)


def test_merged_weight_of_named_adapters_ignores_the_active_one():
    """``merged_weight(adapter_names=[...])`` is the base plus exactly those adapters' ``B @ A * alpha / r``,
    whichever adapter is active (what ``merge(adapter_names=...)`` and exports of one adapter rely on)."""
    layer = _layer()
    _add_adapter(layer, "other")
    assert layer.active_adapters == ["default"]
    base = layer.base_layer.dequantize(torch.float32)
    a, b = layer.lora_A["other"].weight, layer.lora_B["other"].weight
    expected_other = base + (b @ a) * (12 / 4)
    torch.testing.assert_close(layer.merged_weight(torch.float32, ["other"]), expected_other)
    a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.merged_weight(torch.float32), base + (b0 @ a0) * (16 / 8))
    torch.testing.assert_close(layer.merged_weight(torch.float32, ["default", "other"]), base + (b0 @ a0) * 2 + (b @ a) * 3)


def test_merge_of_a_named_adapter_requantizes_that_sum():
    """``merge(adapter_names=["other"])`` re-quantizes base + that adapter only, and records it as merged."""
    layer = _layer()
    _add_adapter(layer, "other")
    expected = quantize_nf4(layer.merged_weight(torch.float32, ["other"]), 64, True)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge(adapter_names=["other"])
    assert layer.merged_adapters == ["other"]
    assert torch.equal(layer.base_layer.weight, expected.packed)
    assert torch.equal(layer.base_layer.dequantize(torch.float32), expected.dequantize(torch.float32))


def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_base():
    """``merge(safe_merge=True)`` with a non-finite adapter raises before touching the base, as PEFT's does."""
    layer = _layer()
    packed, absmax = layer.base_layer.weight.clone(), layer.base_layer.quant.absmax.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[3, 1] = float("nan")
    with pytest.warns(UserWarning, match="re-quantizes"), pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged and layer.merged_adapters == []
    assert torch.equal(layer.base_layer.weight, packed) and torch.equal(layer.base_layer.quant.absmax, absmax)


def test_merge_keeps_the_bases_dtype_and_nf4_layout():
    """Merging into a bf16 base with block size 128 and no double quantization re-quantizes in that same layout:
    the merged base still dequantizes to bf16 by default and holds the NF4 quantization of the bf16-rounded sum."""
    layer = _layer(dtype=torch.bfloat16, blocksize=128, double_quant=False)
    merged = layer.merged_weight(torch.float32)
    expected = quantize_nf4(merged.to(torch.bfloat16), 128, False)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    base = layer.base_layer
    assert base.quant.dtype == torch.bfloat16 and base.dequantize().dtype == torch.bfloat16
    assert (base.quant.blocksize, base.quant.nested) == (128, None)
    assert torch.equal(base.weight, expected.packed) and torch.equal(base.quant.absmax, expected.absmax)


def test_fused_forward_applies_lora_dropout_as_the_unfused_one_does(monkeypatch):
    """In training with ``lora_dropout``, the fused update (under autocast) drops the same inputs of ``A`` as
    PEFT's formula does: the same seed gives the same output either way, and not the eval (no dropout) output."""
    layer = _layer(dropout=0.5)
    layer.train()
    x = torch.randn(2, 6, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        fused = layer(x).float()
        monkeypatch.setattr(NF4LoraLinear, "fuse_update", False)
        torch.manual_seed(1)
        unfused = layer(x).float()
        layer.eval()
        no_dropout = layer(x).float()
    assert ((fused - unfused).norm() / unfused.norm()).item() < 1e-2
    assert ((fused - no_dropout).norm() / no_dropout.norm()).item() > 5e-2


def test_alora_is_refused_not_silently_plain_lora():
    """aLoRA on an NF4 base must fail clearly rather than train plain LoRA under an aLoRA config (DoRA is
    supported: tests/test_dora.py)."""
    with pytest.raises(ValueError, match="aLoRA is not implemented for NF4 bases"):
        _layer(alora_invocation_tokens=[1, 2])


def test_compiled_forward_leaves_the_lora_update_to_the_compiler(monkeypatch):
    """Eager under autocast the update is added by ``addmm_`` into the base output; traced by torch.compile the
    layer takes PEFT's mul + add instead (the in-place form costs a copy per projection there), with the same output."""
    calls = []
    fused = NF4LoraLinear._forward_fused
    monkeypatch.setattr(NF4LoraLinear, "_forward_fused", lambda self, *a, **k: calls.append(1) or fused(self, *a, **k))
    layer = _layer()
    x = torch.randn(2, 6, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x).float()
        assert calls, "the eager forward takes the fused update"
        calls.clear()
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="eager", fullgraph=True)(x).float()
    assert not calls
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
