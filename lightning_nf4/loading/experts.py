"""A checkpoint's per-expert tensors, fused into a model's stacked expert weights as they stream in.

MoE checkpoints (Mixtral, Qwen-MoE, DeepSeek...) hold one matrix per expert and projection
(``experts.3.w1.weight``), while transformers 5 models hold one ``[experts, out, in]`` weight per projection
(``experts.gate_up_proj``: every expert's gate rows, then its up rows). transformers fuses them on load with the
``WeightConverter`` it keeps beside each model; this module reads those converters and places each matrix in its slot
as it arrives, quantized on the device in block-aligned pieces. So no stacked float weight is ever whole: the host holds
one expert's matrix at a time, and the NF4 bytes equal those of quantizing the whole stacked weight.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_nf4.format.bnb_state import from_bnb_tensors, is_bnb_quantized
from lightning_nf4.format.codebooks import code_table
from lightning_nf4.format.quantized import NF4Weight, nf4_from_blocks, quantize_nf4
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.kernels import ops
from lightning_nf4.layers.experts import BNB_SUFFIXES, set_expert_weight
from lightning_nf4.loading.checkpoint import CheckpointError

# The conversions a stacked expert weight is built by: one matrix per expert stacked on dim 0, then (for fused
# projections such as gate_up_proj) the projections' stacks concatenated on dim 1, in the converter's source order.
_SUPPORTED = (("MergeModulelist", 0),), (("MergeModulelist", 0), ("Concatenate", 1))


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor goes: ``target`` (a model parameter), projection ``part``, expert ``expert``."""

    target: str
    part: int
    expert: int
    parts: int  # how many projections the target concatenates (2 for gate_up_proj)


@dataclass
class _Converter:
    transform: Any  # transformers' WeightConverter
    supported: bool

    @property
    def operations(self) -> str:
        return " then ".join(f"{type(op).__name__}(dim={getattr(op, 'dim', '?')})" for op in self.transform.operations)


class ExpertSources:
    """For one model, which checkpoint keys are pieces of which stacked expert weight, by transformers' converters."""

    def __init__(self, model: nn.Module, converters: Iterable[Any], targets: Iterable[str]) -> None:
        self.prefix = getattr(model, "base_model_prefix", "") or "model"
        self.targets = set(targets)
        self.converters = [_Converter(c, _signature(c) in _SUPPORTED) for c in converters]

    def piece(self, key: str) -> Optional[Piece]:
        """The slot of checkpoint ``key`` (already renamed as the model names things), or None when it is no piece of a
        stacked weight. A key that an unsupported conversion would fuse into one is refused, naming the conversion."""
        for converter in self.converters:
            renamed, pattern = converter.transform.rename_source_key(key)
            if pattern is None:
                continue
            target = self._target(renamed)
            if target is None:
                continue
            if not converter.supported:
                raise CheckpointError(
                    f"transformers converts {key} into {target} with {converter.operations}, which lightning-nf4's loader "
                    "does not do (it stacks experts and concatenates their projections). Load this model with transformers' "
                    "own from_pretrained (in float), then let NF4Precision quantize it for training."
                )
            sources = converter.transform.source_patterns
            return Piece(target, sources.index(pattern), _expert_index(key, pattern), len(sources))
        return None

    def _target(self, name: str) -> Optional[str]:
        dotted = f"{self.prefix}."
        return next((c for c in (name, dotted + name, name.removeprefix(dotted)) if c in self.targets), None)


def _signature(converter: Any) -> tuple[tuple[str, int], ...]:
    return tuple((type(op).__name__, getattr(op, "dim", None)) for op in converter.operations)


def _expert_index(key: str, pattern: str) -> int:
    """The expert number in ``key``: the component the pattern's ``*`` stands for (``experts.*.w1.weight``)."""
    tail = pattern.rpartition("*.")[2].replace("\\", "")
    found = re.search(r"\.(\d+)\." + re.escape(tail) + r"$", key)
    if found is None:
        raise CheckpointError(f"{key} matches transformers' expert pattern {pattern!r} but names no expert number.")
    return int(found[1])


@dataclass
class StackedWeight:
    """One ``[experts, rows, cols]`` weight filled from its pieces (``parts`` projections of ``rows // parts`` rows per
    expert), on ``device``: NF4 codes and block scales written piece by piece when ``quantize`` is set and every piece
    holds whole blocks, else a float stack (quantized whole at the end when ``quantize`` is set)."""

    name: str
    shape: torch.Size
    parts: int
    device: torch.device
    dtype: torch.dtype
    quantize: Optional[tuple[int, bool]] = None  # (blocksize, double_quant)
    missing: set[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        experts, rows, cols = self.shape
        if rows % self.parts:
            raise CheckpointError(f"{self.name} has {rows} rows, which its {self.parts} projections cannot share evenly.")
        self.rows = rows // self.parts
        self.missing = {(p, e) for p in range(self.parts) for e in range(experts)}
        blocksize = self.quantize[0] if self.quantize else 0
        self._blockwise = bool(blocksize) and (self.rows * cols) % blocksize == 0
        if self._blockwise:
            numel = experts * rows * cols
            self._code = code_table("nf4", self.device)
            self._packed = torch.empty(numel // 2, dtype=torch.uint8, device=self.device)
            self._absmax = torch.empty(numel // blocksize, dtype=torch.float32, device=self.device)
        else:
            self._float = torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def add(self, piece: Piece, tensor: Tensor, key: str) -> None:
        expected = (self.rows, self.shape[2])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"size mismatch for {key}: checkpoint has {tuple(tensor.shape)}, expert {piece.expert} of {self.name} "
                f"(shape {tuple(self.shape)}) needs {expected}."
            )
        check_expert(piece, self.shape, key)
        value = tensor.to(device=self.device, dtype=self.dtype)
        first_row = piece.expert * self.shape[1] + piece.part * self.rows
        if self._blockwise:
            blocksize = self.quantize[0]  # type: ignore[index]
            start, numel = first_row * self.shape[2], value.numel()
            packed, absmax = ops.quantize_4bit(value, self._code, blocksize)
            self._packed[start // 2:(start + numel) // 2] = packed.view(-1)
            self._absmax[start // blocksize:(start + numel) // blocksize] = absmax
        else:
            self._float.view(-1, self.shape[2])[first_row:first_row + self.rows] = value
        self.missing.discard((piece.part, piece.expert))

    def result(self) -> Tensor | NF4Weight:
        """The filled weight: an ``NF4Weight`` when quantizing, else the float stack."""
        if self.missing:
            raise CheckpointError(f"{self.name} still lacks {len(self.missing)} expert matrices.")
        if self.quantize is None:
            return self._float
        blocksize, double_quant = self.quantize
        if not self._blockwise:
            return quantize_nf4(self._float, blocksize, double_quant, name=self.name)
        return nf4_from_blocks(self._packed, self._absmax, shape=self.shape, dtype=self.dtype, blocksize=blocksize,
                               double_quant=double_quant, name=self.name, code=self._code)


def check_expert(piece: Piece, shape: torch.Size, key: str) -> None:
    """Refuse a checkpoint expert beyond the model's count: the config and the checkpoint disagree on it."""
    if not 0 <= piece.expert < shape[0]:
        raise CheckpointError(
            f"{key} names expert {piece.expert}, but {piece.target} holds {shape[0]} experts: the config's expert count "
            "(num_experts / num_local_experts) does not match the checkpoint."
        )


def stacked_for(piece: Piece, param: Tensor, device: torch.device, dtype: torch.dtype) -> StackedWeight:
    """An empty ``StackedWeight`` for ``piece``'s target ``param``: quantized like it when it is an NF4 placeholder."""
    quant = param.quant if isinstance(param, NF4Tensor) else None
    settings = (quant.blocksize, quant.double_quant) if quant is not None else None
    return StackedWeight(piece.target, param.shape, piece.parts, device, dtype, settings)


def set_filled(module: nn.Module, attr: str, value: Tensor | NF4Weight) -> None:
    """``module.<attr>`` becomes ``value``: an NF4 weight keeps the placeholder's compute dtype, a float one its
    ``requires_grad``."""
    old = module._parameters[attr]
    if isinstance(value, NF4Weight):
        set_expert_weight(module, attr, value, old.dtype)
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)


def stacked_part(key: str, names: Container[str]) -> Optional[tuple[str, str]]:
    """``(weight, suffix)`` when ``key`` is a stacked NF4 expert weight of ``names`` held whole (suffix ``""``) or one
    of its bitsandbytes parts (``absmax``, ``quant_state.bitsandbytes__nf4``...), as ``save_pretrained`` writes them."""
    if key in names:
        return key, ""
    for suffix in BNB_SUFFIXES:
        if key.endswith("." + suffix) and key[:-len(suffix) - 1] in names:
            return key[:-len(suffix) - 1], suffix
    name, dot, suffix = key.partition(".quant_state.")
    return (name, "quant_state." + suffix) if dot and name in names else None


def read_stacked(parts: dict[str, Tensor], name: str, placeholder: NF4Tensor, device: torch.device, dtype: torch.dtype) -> NF4Weight:
    """A stacked expert weight held whole by the checkpoint: its saved NF4 codes and scales as they are, or a float
    weight quantized on ``device`` as ``placeholder`` says."""
    if is_bnb_quantized(parts):
        quant = from_bnb_tensors({k: v.to(device) for k, v in parts.items()}, name)
    elif parts[""].is_floating_point() and len(parts) == 1:
        value = parts[""].to(device=device, dtype=dtype)
        if tuple(value.shape) != tuple(placeholder.shape):
            raise CheckpointError(f"size mismatch for {name}: checkpoint has {tuple(value.shape)}, the model built from its config has {tuple(placeholder.shape)}.")
        return quantize_nf4(value, placeholder.quant.blocksize, placeholder.quant.double_quant, name=name)
    else:
        raise CheckpointError(f"{name} holds {parts[''].dtype} codes but no '{name}.quant_state.bitsandbytes__nf4'; the checkpoint is incomplete.")
    if tuple(quant.shape) != tuple(placeholder.shape):
        raise CheckpointError(f"size mismatch for {name}: checkpoint has {tuple(quant.shape)}, the model built from its config has {tuple(placeholder.shape)}.")
    return quant
