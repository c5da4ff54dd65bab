"""Edges of ``NF4Precision`` / ``convert_linears`` the main tests leave open: how ``skip_modules`` patterns match
(a suffix matches whole name components only, ``re:`` matches the whole name), subclasses of ``nn.Linear`` that
their owner reads directly, and ``load_in_4bit`` given as a hyperparameter."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import NF4Linear, NF4Precision
from lightning_nf4.plugins.convert import convert_linears, matches


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.o_proj = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(64, 64)}) for _ in range(2))


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}


def test_a_skip_name_matches_whole_components_only():
    """``skip_modules=("proj",)`` keeps ``proj`` and ``blocks.N.proj`` in float but not ``o_proj``: a name matches
    as itself or as its last dotted components, never as a bare string suffix."""
    assert matches("blocks.0.proj", ["proj"]) and matches("proj", ["proj"]) and not matches("o_proj", ["proj"])
    model = Named()
    convert_linears(model, skip_modules=("proj",))
    assert _kinds(model) == {"proj": "Linear", "o_proj": "NF4Linear", "blocks.0.proj": "Linear", "blocks.1.proj": "Linear"}


def test_a_regular_expression_must_match_the_whole_name():
    """``re:blocks\\.0`` names the container ``blocks.0``, and so the layers it holds (as transformers'
    ``llm_int8_skip_modules`` does), not ``blocks.1``; ``re:lock`` names nothing (a partial match);
    ``re:blocks\\.0\\..*`` names the layers directly."""
    assert not matches("blocks.0.proj", [r"re:blocks\.0"]) and matches("blocks.0.proj", [r"re:blocks\.0\..*"])
    model = Named()
    convert_linears(model, skip_modules=(r"re:blocks\.0",))
    assert _kinds(model) == {"proj": "NF4Linear", "o_proj": "NF4Linear", "blocks.0.proj": "Linear", "blocks.1.proj": "NF4Linear"}
    model = Named()
    convert_linears(model, skip_modules=(r"re:lock",))
    assert set(_kinds(model).values()) == {"NF4Linear"}
    model = Named()
    convert_linears(model, skip_modules=(r"re:blocks\.0\..*",))
    assert _kinds(model) == {"proj": "NF4Linear", "o_proj": "NF4Linear", "blocks.0.proj": "Linear", "blocks.1.proj": "NF4Linear"}


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.mlp = nn.Linear(64, 64)

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


def test_linear_subclasses_read_by_their_owner_stay_float():
    """``nn.MultiheadAttention`` reads its ``out_proj`` (an ``nn.Linear`` subclass) weight directly in its functional
    forward; converting it would hand packed uint8 codes to a matmul. Only exact ``nn.Linear`` layers convert, and
    the converted model runs and matches a float model whose ``mlp`` holds the same dequantized weight."""
    torch.manual_seed(0)
    model = WithAttention()
    reference = WithAttention()
    reference.load_state_dict(model.state_dict())
    NF4Precision(compute_dtype=torch.float32).convert_module(model)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.mlp, NF4Linear)
    with torch.no_grad():
        reference.mlp.weight.copy_(model.mlp.dequantize(torch.float32))
        x = torch.randn(2, 5, 64)
        torch.testing.assert_close(model(x), reference(x))


class Flagged(pl.LightningModule):
    def __init__(self, load_in_4bit: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def test_load_in_4bit_false_as_a_hyperparameter_keeps_a_float_base():
    """A LightningModule whose hyperparameters say ``load_in_4bit=False`` (as ``CausalLMModule`` from a config file)
    keeps its float layers under NF4Precision: the bf16 LoRA baseline of the same config. True converts."""
    float_base = Flagged(load_in_4bit=False)
    assert not hasattr(float_base, "load_in_4bit")  # only the hyperparameter says it
    NF4Precision().convert_module(float_base)
    assert not any(isinstance(m, NF4Linear) for m in float_base.modules())
    quantized = Flagged(load_in_4bit=True)
    NF4Precision().convert_module(quantized)
    assert sum(isinstance(m, NF4Linear) for m in quantized.modules()) == 2


def test_packed_weights_are_left_out_of_ddps_start_up_broadcast():
    """Every rank quantizes the same float weights to the same frozen bytes, so DDP must not broadcast them: after
    conversion (with or without LoRA, which moves each weight under ``base_layer``) the list DDP reads,
    ``_ddp_params_and_buffers_to_ignore`` (set by DDP's own ``_set_params_and_buffers_to_ignore_for_model``),
    names every packed NF4 weight, keeps the user's own entries, and drops names that no longer exist."""
    from lightning_nf4 import LoRACallback

    model = Named()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["proj.bias", "gone.weight"])
    NF4Precision(device="cpu", skip_modules=("blocks.1.proj",)).convert_module(model)
    packed = sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NF4Linear))
    assert packed == ["blocks.0.proj.weight", "o_proj.weight", "proj.weight"]
    assert model._ddp_params_and_buffers_to_ignore == sorted(packed + ["proj.bias"])
    LoRACallback(r=2, alpha=4, target_modules=["proj", "o_proj"]).inject(model)
    moved = sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NF4Linear))
    assert all(".base_layer.weight" in name for name in moved) and len(moved) == 3
    assert model._ddp_params_and_buffers_to_ignore == moved  # "proj.bias" is now "proj.base_layer.bias": dropped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_grad_scaler_without_float16_compute_is_refused(dtype):
    """It was accepted and dropped (Lightning's MixedPrecision refuses a scaler with 'bf16-mixed')."""
    from lightning_nf4.plugins.precision import NF4PrecisionError

    with pytest.raises(NF4PrecisionError, match=r"a GradScaler is for float16 compute only"):
        NF4Precision(compute_dtype=dtype, scaler=torch.amp.GradScaler("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    assert NF4Precision(compute_dtype=torch.float16, scaler=scaler).scaler is scaler
