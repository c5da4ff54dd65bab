"""DoRA on an NF4 base (QDoRA): ``W' = m * (W + s·BA) / ||W + s·BA||`` per output row, PEFT's formulation.

PEFT's own DoRA reads the base weight through its bitsandbytes/HQQ/torchao dequantizers, which do not know
``NF4Linear``; here the norm comes from ``NF4Linear.dequantize``. The magnitude lives where PEFT keeps it
(``lora_magnitude_vector[adapter].weight``), so adapters save, load and merge as PEFT's DoRA adapters do.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import Tensor, nn

MAGNITUDE = "lora_magnitude_vector"


@torch.no_grad()
def weight_norm(layer: LoraLayer, adapter: str, base_weight: Tensor | None = None) -> Tensor:
    """``||W + s·B A||`` per output row, in float32, without forming ``B A`` at the weight's size:
    ``||W||² + 2s·<B, W Aᵀ> + s²·<B, B (A Aᵀ)>`` row by row. ``W`` is the dequantized base (in its compute dtype,
    the weight the matmul uses) unless ``base_weight`` is given."""
    base = layer.get_base_layer()
    w = base.dequantize(base.compute_dtype) if base_weight is None else base_weight
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    s = layer.scaling[adapter]
    wa = (w @ a.to(w.dtype).t()).float()  # [out, r]
    squared = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    squared = squared + 2 * s * (b * wa).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
    return squared.clamp_min(0).sqrt()


class NF4DoraVariant(LoraVariant):
    """PEFT's LoRA-variant hook for DoRA on ``NF4LoraLinear``: ``init`` sets the magnitude to the row norms, as
    PEFT's DoRA does (so an untrained adapter leaves the output unchanged). Merging is ``NF4LoraLinear``'s own."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        if not getattr(module, MAGNITUDE):
            module.adapter_layer_names = module.adapter_layer_names[:] + (MAGNITUDE,)  # PEFT trains and saves it
        holder = DoraLinearLayer(fan_in_fan_out=False)
        holder.weight = nn.Parameter(weight_norm(module, adapter_name), requires_grad=True)
        getattr(module, MAGNITUDE)[adapter_name] = holder


@torch.no_grad()
def reset_magnitudes(layer: LoraLayer) -> None:
    """Each DoRA magnitude set to the row norms of its layer's weight with its current update, as at injection: for a
    layer materialized after injection (a sharded model built on meta), once its base and adapters hold values.
    PEFT's own DoRA on a float base as well."""
    base = layer.get_base_layer()
    float_weight = None if hasattr(base, "dequantize") else base.weight.detach()
    for adapter, holder in getattr(layer, MAGNITUDE).items():
        holder.weight.copy_(weight_norm(layer, adapter, float_weight))


def dora_update(layer: LoraLayer, adapter: str, result: Tensor, dropped: Tensor, update: Tensor) -> Tensor:
    """What DoRA adds to ``result`` (the output so far) for ``adapter``, given the LoRA ``update`` (``s·B A x``)
    of the dropped-out input ``dropped``: ``(m/||W + s·BA|| - 1)·W x + m/||W + s·BA||·update``, the norm detached as
    in the paper and in PEFT. With dropout active the base term is ``W`` applied to the dropped input, as in PEFT."""
    base = layer.get_base_layer()
    scale = getattr(layer, MAGNITUDE)[adapter].weight / weight_norm(layer, adapter)
    if isinstance(layer.lora_dropout[adapter], nn.Identity) or not layer.training:
        base_out = result
    else:
        base_out = base(dropped)
    if base.bias is not None:
        base_out = base_out - base.bias
    return ((scale - 1) * base_out + scale * update).to(result.dtype)


def dora_merge(layer: LoraLayer, adapter: str, base_weight: Tensor, merged: Tensor, delta: Tensor) -> Tensor:
    """``merged`` (the weight so far) with ``adapter``'s DoRA merged in, the norm taken on the unmerged base as the
    forward takes it: ``m/||W + delta|| · (merged + delta)``. (PEFT's sequential merge takes a second adapter's norm
    on the weight merged so far.)"""
    norm = weight_norm(layer, adapter, base_weight)
    return (getattr(layer, MAGNITUDE)[adapter].weight.detach().float() / norm).unsqueeze(1) * (merged + delta)
