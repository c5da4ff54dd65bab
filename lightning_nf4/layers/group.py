"""Dequantize the NF4 weights of one block (a decoder layer) together, in one kernel launch.

A QLoRA step at 8B shape is bound by host time, not by the GPU: each dequantize launch costs 20-30 us
of host time on the machines measured (``benchmarks/NOTES.md``), and a step makes hundreds. When the
first layer of a group needs its weight, the group dequantizes all of its layers' weights at once;
each layer then takes its own slice, once. A layer called again before the others took theirs starts
a new round, so results never depend on the call order; only the launches saved do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nf4.kernels import ops

if TYPE_CHECKING:
    from lightning_nf4.layers.linear import NF4Linear

MAX_MEMBERS = 8  # a decoder layer has 4-7 projections; larger blocks (MoE experts) are left ungrouped


class DequantGroup:
    """NF4 layers that run together; holds the round's dequantized weights not yet taken."""

    def __init__(self, layers: list["NF4Linear"]) -> None:
        self.layers = layers
        self._ready: dict[int, Tensor] = {}

    def clear(self) -> None:
        """Drop the weights not yet taken (a layer's weight changed, or memory is wanted back)."""
        self._ready = {}

    def weight(self, layer: "NF4Linear", dtype: torch.dtype) -> Tensor:
        """``layer``'s dequantized weight in ``dtype``, from this round or from a new one."""
        w = self._ready.pop(id(layer), None)
        if w is not None and w.dtype == dtype:
            return w
        self._ready = {}
        quants = [member._synced_quant() for member in self.layers]
        first = quants[0]
        if any(q.device != first.device or q.blocksize != first.blocksize or q.double_quant != first.double_quant for q in quants):
            return layer._synced_quant().dequantize(dtype)
        nested = first.double_quant
        flat = ops.dequantize_4bit_group(
            [q.packed for q in quants], [q.absmax for q in quants], first.code, first.blocksize, [q.numel for q in quants], dtype,
            [q.nested.absmax for q in quants] if nested else [], first.nested.code if nested else None,
            [q.nested.offset for q in quants] if nested else [], first.nested.blocksize if nested else 256,
        )
        mine = None
        start = 0
        for member, q in zip(self.layers, quants):
            view = flat[start:start + q.numel].view(q.shape)
            start += q.numel
            if member is layer:
                mine = view
            else:
                self._ready[id(member)] = view
        assert mine is not None, "the layer asking is not a member of this group"
        return mine


def group_nf4_layers(model: nn.Module, max_members: int = MAX_MEMBERS) -> int:
    """Group the NF4 layers of each element of the model's outermost ``nn.ModuleList`` s (the decoder
    layers of a transformers model); returns the number of groups. Groups of one, or of more than
    ``max_members`` layers, are not formed. Calling it again regroups."""
    from lightning_nf4.layers.linear import NF4Linear

    for layer in model.modules():
        if isinstance(layer, NF4Linear):
            layer._group = None
    groups = 0
    for block in _outermost_list_elements(model):
        members = [m for m in block.modules() if isinstance(m, NF4Linear)]
        if 1 < len(members) <= max_members:
            group = DequantGroup(members)
            for member in members:
                member._group = group
            groups += 1
    return groups


def find_by_class(module: nn.Module, classes: Sequence[Union[str, type]]) -> list[nn.Module]:
    """The outermost submodules of ``module`` of one of ``classes`` (class names or classes), in module order:
    a block inside another block goes with it."""
    found = [m for m in module.modules() if any(type(m).__name__ == c if isinstance(c, str) else isinstance(m, c) for c in classes)]
    return outermost(found)


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """A model's repeated blocks: the classes a transformers model lists in ``_no_split_modules`` (its
    decoder layer), else the elements of its outermost ``nn.ModuleList`` s; outermost first, in module order."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    found = find_by_class(module, sorted(names)) if names else []
    return found or outermost(_outermost_list_elements(module))


def outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` without those inside another of them."""
    inner = {id(m) for outer in modules for m in outer.modules() if m is not outer}
    return [m for m in modules if id(m) not in inner]


def _outermost_list_elements(module: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            found.extend(child)
        else:
            found.extend(_outermost_list_elements(child))
    return found


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The buffers ``state_dict`` holds, by their state-dict names (a module shared under two names, under both); a
    non-persistent one (a rotary table) is rebuilt by its module and is not among them."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, sub in module.named_modules(remove_duplicate=False)
        for name, buffer in sub._buffers.items()
        if buffer is not None and name not in sub._non_persistent_buffers_set
    }


def group_of(layer: nn.Module) -> Optional[DequantGroup]:
    return getattr(layer, "_group", None)
