"""How a checkpoint's tensor names map onto a model's: shared by the streaming and the deferred loader."""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nf4.layers.linear import NF4Linear

# A linear weight and its bitsandbytes parts: ``layer.weight`` and ``layer.weight.<suffix>``.
NF4_KEY = re.compile(r"^(?P<layer>.+)\.weight(?:\.(?P<suffix>.+))?$")


class KeyMap:
    """A checkpoint key as the model names it: transformers' renames for the architecture first (GPT-NeoX's
    ``embed_out`` is ``lm_head``, old ``LayerNorm.gamma`` is ``.weight``), as transformers applies them on load; then a
    bare model's keys (``layers.0...``) go under the ``*ForCausalLM``'s prefix (``model.layers.0...``).

    Renames only; the conversions that fuse tensors (Mixtral's per-expert weights into one) are kept in ``converters``
    for ``loading.experts``."""

    def __init__(self, model: nn.Module, known: Container[str], layers: Container[str]) -> None:
        self.known, self.layers = known, layers
        self.prefix = getattr(model, "base_model_prefix", "") or "model"
        self.renamings, self.converters = _transforms(model)

    def __call__(self, key: str) -> str:
        renamed = key
        for renaming in self.renamings:
            renamed, _ = renaming.rename_source_key(renamed)
        dotted = f"{self.prefix}."
        # the renamed key, else the key as it is where only that fits (transformers falls back so: DeepSeek-V4's
        # ".norm." -> ".kv_norm." rename also meets the model's final "model.norm")
        candidates = (renamed, dotted + renamed, renamed.removeprefix(dotted), key, dotted + key, key.removeprefix(dotted))
        return next((c for c in candidates if self._fits(c)), renamed)

    def _fits(self, candidate: str) -> bool:
        match = NF4_KEY.match(candidate)
        return candidate in self.known or bool(match and match["layer"] in self.layers)


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' key renames and tensor conversions for ``model`` (5.x keeps them beside the model code); none on
    older versions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError):  # not a transformers model
        return [], []
    return [t for t in transforms if isinstance(t, WeightRenaming)], [t for t in transforms if isinstance(t, WeightConverter)]


def load_layer(layer: NF4Linear, parts: dict[str, Tensor], name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``layer`` its weight from a checkpoint's parts: a float weight is quantized on ``device``."""
    if parts[""].is_floating_point() and len(parts) == 1:
        parts = {"": parts[""].to(device=device, dtype=dtype)}
    else:
        parts = {k: v.to(device) for k, v in parts.items()}
    layer._load_weight(parts, f"{name}.weight")
