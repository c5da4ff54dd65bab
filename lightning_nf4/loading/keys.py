"""How a checkpoint's tensor names map onto a model's: shared by the streaming and the deferred loader."""

from __future__ import annotations

import re
from collections.abc import Container

import torch
from torch import Tensor

from lightning_nf4.layers.linear import NF4Linear

# A linear weight and its bitsandbytes parts: ``layer.weight`` and ``layer.weight.<suffix>``.
NF4_KEY = re.compile(r"^(?P<layer>.+)\.weight(?:\.(?P<suffix>.+))?$")


def model_key(key: str, known: Container[str], layers: Container[str]) -> str:
    """Checkpoints of the bare model (``layers.0...``) load into ``*ForCausalLM`` (``model.layers.0...``)."""
    def fits(candidate: str) -> bool:
        match = NF4_KEY.match(candidate)
        return candidate in known or bool(match and match["layer"] in layers)

    return next((c for c in (key, f"model.{key}", key.removeprefix("model.")) if fits(c)), key)


def load_layer(layer: NF4Linear, parts: dict[str, Tensor], name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``layer`` its weight from a checkpoint's parts: a float weight is quantized on ``device``."""
    if parts[""].is_floating_point() and len(parts) == 1:
        parts = {"": parts[""].to(device=device, dtype=dtype)}
    else:
        parts = {k: v.to(device) for k, v in parts.items()}
    layer._load_weight(parts, f"{name}.weight")
