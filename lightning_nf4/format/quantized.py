"""``NF4Weight``: a weight in bitsandbytes' NF4 layout, and the functions that make and undo it.

The object holds exactly the tensors bitsandbytes stores (packed codes, absmax, code tables and, with
double quantization, the nested statistics), so conversion to and from its state dict is lossless.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from lightning_nf4.format.codebooks import code_table, dynamic_map
from lightning_nf4.kernels import ops

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256


class NF4FormatError(ValueError):
    """A weight or checkpoint that cannot be (de)quantized; the message names the tensor and the fix."""


def float_dtype(value: object) -> Optional[torch.dtype]:
    """``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"`` -> the dtype, when it is one NF4 computes
    in (float32, bfloat16, float16); None otherwise, for the caller to report in its own terms."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if value in SUPPORTED_DTYPES else None


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool):
        blocksize = int(blocksize)  # numpy's and torch's integers too, as a plain int from here on
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 32 or blocksize > 4096 or (blocksize & (blocksize - 1)):
        raise NF4FormatError(f"blocksize must be a power of two between 32 and 4096 (as in bitsandbytes), got {blocksize!r}.")
    return blocksize


@dataclass(frozen=True)
class NestedStats:
    """Double quantization of ``absmax``: ``dynamic_map[code] * absmax[i // blocksize] + offset``."""

    absmax: Tensor  # fp32 [ceil(num_blocks / blocksize)]
    code: Tensor  # fp32 [256], bitsandbytes' signed dynamic map
    offset: Tensor  # fp32 scalar, the mean of the original absmax
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class NF4Weight:
    """A tensor quantized to 4-bit NormalFloat, block by block, in bitsandbytes' exact layout."""

    packed: Tensor  # uint8 [(numel + 1) // 2, 1]: even element in the high nibble
    absmax: Tensor  # fp32 [num_blocks], or uint8 codes when ``nested`` is set
    code: Tensor  # fp32 [16], the NF4 table
    shape: torch.Size
    dtype: torch.dtype  # dtype of the weight that was quantized; the default for ``dequantize``
    blocksize: int
    nested: Optional[NestedStats] = None
    quant_type: str = "nf4"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def tensors(self) -> list[Tensor]:
        out = [self.packed, self.absmax, self.code]
        if self.nested is not None:
            out += [self.nested.absmax, self.nested.code, self.nested.offset]
        return out

    @property
    def nbytes(self) -> int:
        """Storage of the quantized weight and all its statistics, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight, ``code[nibble] * absmax`` rounded once to ``dtype`` (default: the original)."""
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False, *, stats_only: bool = False) -> "NF4Weight":
        """Move to ``device``; ``stats_only`` leaves ``packed`` where it is (its owner moves it)."""
        device = torch.device(device)
        if device == self.absmax.device and (stats_only or device == self.device):
            return self
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        nested = None
        if self.nested is not None:
            nested = replace(self.nested, absmax=move(self.nested.absmax), code=move(self.nested.code), offset=move(self.nested.offset))
        packed = self.packed if stats_only else move(self.packed)
        return replace(self, packed=packed, absmax=move(self.absmax), code=move(self.code), nested=nested)

    def nested_args(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], int]:
        """``(nested_absmax, nested_code, offset, nested_blocksize)`` as the custom ops take them."""
        if self.nested is None:
            return None, None, None, NESTED_BLOCKSIZE
        return self.nested.absmax, self.nested.code, self.nested.offset, self.nested.blocksize

    def to_empty(self, device: torch.device | str) -> "NF4Weight":
        """Uninitialized storage of this weight's layout on ``device`` (from ``meta``, say), for a loader to fill."""
        empty = lambda t: torch.empty_like(t, device=device)  # noqa: E731
        nested = None
        if self.nested is not None:
            nested = replace(self.nested, absmax=empty(self.nested.absmax), code=empty(self.nested.code), offset=empty(self.nested.offset))
        return replace(self, packed=empty(self.packed), absmax=empty(self.absmax), code=empty(self.code), nested=nested)

    def with_packed(self, packed: Tensor) -> "NF4Weight":
        """The same weight with ``packed`` as its codes; the statistics follow ``packed``'s device."""
        return replace(self.to(packed.device, stats_only=True), packed=packed)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )


def _check_weight(weight: Tensor, name: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor to quantize, got {type(weight).__name__}.")
    if weight.dtype not in SUPPORTED_DTYPES:
        kind = "integer" if not (weight.is_floating_point() or weight.is_complex()) else str(weight.dtype)
        raise NF4FormatError(
            f"{name} has dtype {weight.dtype} ({kind}); NF4 quantizes float32, bfloat16 or float16 weights. "
            "Cast it first, e.g. weight.float(), or leave this tensor unquantized."
        )
    if weight.numel() == 0:
        raise NF4FormatError(f"{name} is empty (shape {tuple(weight.shape)}); there is nothing to quantize.")


def quantize_nf4(
    weight: Tensor, blocksize: int = 64, double_quant: bool = True, *, name: str = "weight"
) -> NF4Weight:
    """Quantize ``weight`` to NF4 exactly as ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.

    Runs on the weight's device (CPU, CUDA, XPU, or ``meta`` for shape-only construction).
    ``name`` appears in error messages, so pass the parameter's qualified name when you have it.
    """
    _check_weight(weight, name)
    check_blocksize(blocksize)
    code = code_table("nf4", weight.device)
    packed, absmax = ops.quantize_4bit(weight.detach(), code, blocksize)
    return nf4_from_blocks(packed, absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, double_quant=double_quant, name=name, code=code)


def nf4_from_blocks(
    packed: Tensor, absmax: Tensor, *, shape: torch.Size, dtype: torch.dtype, blocksize: int, double_quant: bool,
    name: str = "weight", code: Optional[Tensor] = None,
) -> NF4Weight:
    """The ``NF4Weight`` of codes and fp32 block scales already computed (``ops.quantize_4bit``, whole or in block-aligned
    pieces: each block depends on its own elements only): checks the scales, then double-quantizes them over the whole
    tensor as bitsandbytes does. A loader that quantizes a stacked weight piece by piece ends here with the same bytes."""
    device = absmax.device
    code = code_table("nf4", device) if code is None else code
    if device.type != "meta":
        finite = torch.isfinite(absmax)
        if not bool(finite.all()):
            block = int((~finite).nonzero()[0])
            raise NF4FormatError(
                f"{name} contains NaN or Inf (first in elements {block * blocksize}..{(block + 1) * blocksize - 1} of the "
                "flattened tensor); NF4 cannot represent them. Fix or re-load the weights before quantizing."
            )
    nested = None
    if double_quant:
        offset = absmax.mean()
        if device.type != "meta" and not bool(torch.isfinite(offset)):  # scales near float32's limit sum past it
            raise NF4FormatError(
                f"{name}: its block scales (up to {float(absmax.max()):.3g}) overflow float32 when averaged for double "
                "quantization (bitsandbytes gives NaN weights here). Quantize it with double_quant=False, or rescale it."
            )
        nested_code = dynamic_map(device)
        qabsmax, nested_absmax = ops.quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        nested = NestedStats(absmax=nested_absmax, code=nested_code, offset=offset)
        absmax = qabsmax
    return NF4Weight(
        packed=packed.view(-1, 1), absmax=absmax, code=code, shape=torch.Size(shape),
        dtype=dtype, blocksize=blocksize, nested=nested,
    )


def dequantize_nf4(weight: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Free-function form of ``NF4Weight.dequantize``."""
    dtype = dtype or weight.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise NF4FormatError(f"Cannot dequantize to {dtype!r}; choose one of torch.float32, torch.bfloat16, torch.float16.")
    flat = ops.dequantize_4bit(weight.packed, weight.absmax, weight.code, weight.blocksize, weight.numel, dtype, *weight.nested_args())
    return flat.view(weight.shape)
