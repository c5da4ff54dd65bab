"""DoRA on NF4 bases (QDoRA) against PEFT's own DoRA on the float layer holding the same (dequantized) weight."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_nf4 import NF4Linear
from lightning_nf4.layers.dora import weight_norm
from lightning_nf4.layers.lora import NF4LoraLinear, lora_config


def _pair(dropout: float = 0.0, bias: bool = True):
    """An NF4 DoRA layer and PEFT's DoRA on an nn.Linear whose weight is that layer's dequantized base, with the same
    adapters (B moved off zero so that the update shows)."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96, bias=bias), compute_dtype=torch.float32)
    ours = NF4LoraLinear(base, "default", lora_config(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["x"], use_dora=True),
                         r=8, lora_alpha=16, lora_dropout=dropout)
    dense = nn.Linear(128, 96, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(base.dequantize(torch.float32))
        if bias:
            dense.bias.copy_(base.bias)
    holder = nn.Sequential(dense)
    peft = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["0"], use_dora=True))
    theirs = peft.base_model.model[0]
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_(std=0.1)
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].weight.mul_(1.1)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector["default"].weight)
    return ours, theirs


def test_the_magnitude_starts_at_the_row_norms_of_the_dequantized_weight_and_the_output_is_unchanged():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96), compute_dtype=torch.float32)
    layer = NF4LoraLinear(copy.deepcopy(base), "default", lora_config(r=8, lora_alpha=16, target_modules=["x"], use_dora=True), r=8, lora_alpha=16)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, base.dequantize(torch.float32).norm(dim=1))
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_match_peft_dora_on_the_dequantized_weight(dropout):
    ours, theirs = _pair(dropout)
    x = torch.randn(4, 5, 128)
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)  # the same dropout mask
    expected = theirs(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        mine, peft = getattr(ours, name)["default"].weight.grad, getattr(theirs, name)["default"].weight.grad
        torch.testing.assert_close(mine, peft, atol=1e-4, rtol=1e-4, msg=name)


def test_the_merged_weight_is_peft_dora_merged():
    ours, theirs = _pair()
    theirs.merge()
    torch.testing.assert_close(ours.merged_weight(torch.float32), theirs.get_base_layer().weight, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_output_keeps_its_dtype_and_follows_the_fp32_result():
    ours, _ = _pair()
    x = torch.randn(4, 128)
    reference = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.get_base_layer().compute_dtype = torch.bfloat16
        out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)


def _fit(tmp_path, module, callback, **precision):
    import lightning.pytorch as pl

    from lightning_nf4 import NF4Precision
    from tests.lightning_models import token_loader

    plugins = [NF4Precision(compute_dtype=torch.float32)] if precision.get("nf4", True) else []
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=plugins, callbacks=[callback])
    trainer.fit(module, token_loader())
    return module.model.eval()


def _logits(model, ids=torch.tensor([[1, 5, 9, 30, 2, 77, 3, 8]])):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qdora_under_lightning_exports_a_peft_dora_adapter_and_a_merged_model(tmp_path):
    """``LoRACallback(use_dora=True)`` with NF4Precision: the magnitudes train, the adapter is PEFT's DoRA format
    (``use_dora``, ``lora_magnitude_vector`` keys) and computes the trained model on the dequantized float base, and
    the merged export computes it too."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    from lightning_nf4 import LoRACallback
    from tests.lightning_models import CausalLM, tiny_llama

    module = CausalLM(tiny_llama(), lr=1e-2)
    trained = _fit(tmp_path, module, LoRACallback(r=4, alpha=8, dropout=0.0, use_dora=True, save_dir=str(tmp_path / "out")))
    magnitudes = {n: p for n, p in trained.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 14 and all(p.requires_grad for p in magnitudes.values())
    layer = trained.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.lora_magnitude_vector["default"].weight, weight_norm(layer, "default"))  # they trained

    adapter = tmp_path / "out" / "adapter"
    assert PeftConfig.from_pretrained(adapter).use_dora
    saved = load_file(adapter / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 14
    base = tiny_llama()
    with torch.no_grad():
        for name, sub in trained.named_modules():
            if isinstance(sub, NF4Linear):
                base.get_submodule(name.replace(".base_layer", "")).weight.copy_(sub.dequantize(torch.float32))
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(_logits(adapted), _logits(trained), atol=1e-4, rtol=1e-4)

    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), _logits(trained), atol=1e-4, rtol=1e-4)


def test_float_dora_under_lightning_merges_with_its_magnitudes(tmp_path):
    """Without NF4 (the float baseline), PEFT's own DoRA layers train; the merged export applies their magnitudes."""
    import transformers

    from lightning_nf4 import LoRACallback
    from tests.lightning_models import CausalLM, tiny_llama

    module = CausalLM(tiny_llama(), lr=1e-2)
    trained = _fit(tmp_path, module, LoRACallback(r=4, alpha=8, dropout=0.0, use_dora=True, save_dir=str(tmp_path / "out")), nf4=False)
    assert any("lora_magnitude_vector" in n for n, _ in trained.named_parameters())
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), _logits(trained), atol=1e-4, rtol=1e-4)


def test_peft_dora_on_a_base_nf4precision_would_quantize_is_refused_before_training(tmp_path):
    from lightning_nf4 import LoRACallback
    from tests.lightning_models import CausalLM, tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="PEFT's DoRA on a base that NF4Precision quantizes.*LoRACallback\\(use_dora=True\\)"):
        _fit(tmp_path, CausalLM(model), LoRACallback(r=4, alpha=8))
