"""Edges of ``convert_linears`` / ``convertible_linears`` the main tests leave open: ``skip_modules`` matched on whole
name components for modules that are not PEFT-wrapped but have ``base_layer`` inside a component name, for layers
LoRA wrapped before the conversion (by their name without ``base_layer``, or by the wrapped path), and a skipped
layer kept float by a later conversion with other ``skip_modules``."""

import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from lightning_nf4.plugins.convert import convert_linears, logical_name


class Encoder(nn.Module):
    """``base_layers`` is the model's own container (not PEFT's ``base_layer``), beside a plain ``layers``."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({
            "base_layers": nn.ModuleList(nn.Linear(64, 64) for _ in range(2)),
            "layers": nn.ModuleList([nn.Linear(64, 64)]),
        })


NAMES = ("encoder.base_layers.0", "encoder.base_layers.1", "encoder.layers.0")


def _float_layers(model):
    """The logical names of the layers left in float (``nn.Linear``), and a check that the rest are NF4."""
    bases = {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and ".lora_" not in n}
    assert set(bases) == set(NAMES)
    return {n for n, m in bases.items() if type(m) is nn.Linear}


def _wrapped():
    torch.manual_seed(0)
    model = Encoder()
    LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=list(NAMES)).inject(model)  # LoRA on the float layers
    assert {n for n, _ in model.named_modules() if n.endswith(".base_layer")} == {f"{n}.base_layer" for n in NAMES}
    return model


def test_base_layer_inside_a_component_name_is_not_peft():
    """Only a whole ``base_layer`` component is PEFT's: ``encoder.base_layers.0`` keeps its name, so
    ``re:encoder\\.\\d+`` skips nothing and ``layers.0`` skips ``encoder.layers.0`` but not ``encoder.base_layers.0``."""
    assert logical_name("encoder.base_layers.0") == "encoder.base_layers.0"
    assert logical_name("encoder.base_layers.0.base_layer") == "encoder.base_layers.0"
    assert logical_name("base_layer_proj.base_layer") == "base_layer_proj"
    model = Encoder()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=(r"re:encoder\.\d+",))
    assert _float_layers(model) == set()
    model = Encoder()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("layers.0",))
    assert _float_layers(model) == {"encoder.layers.0"}


def test_a_layer_wrapped_by_lora_before_conversion_is_skipped_by_its_own_name():
    """LoRA injected on the float model first (``<name>.base_layer``), then converted: ``base_layers.0`` still names
    ``encoder.base_layers.0`` (only the ``base_layer`` component is dropped, not ``base_layers``' letters) and
    nothing else; ``layers.0`` names ``encoder.layers.0`` only."""
    model = _wrapped()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("base_layers.0",))
    assert _float_layers(model) == {"encoder.base_layers.0"}
    model = _wrapped()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("layers.0",))
    assert _float_layers(model) == {"encoder.layers.0"}


def test_a_skip_pattern_may_name_the_wrapped_path():
    """A pattern naming PEFT's path itself (``encoder.layers.0.base_layer``) skips that layer, as its logical name
    would; a pattern on ``base_layer`` alone skips every wrapped layer."""
    model = _wrapped()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("encoder.layers.0.base_layer",))
    assert _float_layers(model) == {"encoder.layers.0"}
    model = _wrapped()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("base_layer",))
    assert _float_layers(model) == set(NAMES)


def test_a_layer_once_skipped_stays_float_under_a_later_conversion():
    """A layer skipped by the first conversion (``from_pretrained``'s ``llm_int8_skip_modules``) is not quantized by
    a later one with other ``skip_modules`` (``NF4Precision()``'s default ``lm_head`` when training starts)."""
    model = Encoder()
    assert convert_linears(model, compute_dtype=torch.float32, skip_modules=("layers.0",)) == 2
    NF4Precision(compute_dtype=torch.float32, device="cpu").convert_module(model)
    assert _float_layers(model) == {"encoder.layers.0"}
    assert convert_linears(model, compute_dtype=torch.float32, skip_modules=()) == 0


def test_dequantize_model_replaces_a_shared_layer_under_every_name_and_keeps_it_shared():
    """One linear used twice: ``convert_linears`` makes it one NF4 layer under both names, and ``dequantize_model``
    gives one float layer back under both (it left the second name in NF4, the tie broken)."""
    from lightning_nf4 import dequantize_model

    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert_linears(model, compute_dtype=torch.float32)
    assert isinstance(model[2], NF4Linear) and model[0] is model[2]
    expected = model[0].dequantize(torch.float32)
    dequantize_model(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]
    assert torch.equal(model[2].weight, expected)
