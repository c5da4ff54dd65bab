"""The one seam between the NF4 format and device code: ``torch.library`` custom ops.

Each op has a plain-PyTorch body that works on any device, a fake (meta) implementation so that
``torch.compile`` can trace it, and faster kernels registered per device type: native C on CPU,
Triton on CUDA and Intel XPU (see ``triton_kernels``). Callers never branch on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_nf4.kernels import cpu, reference


@torch.library.custom_op("lightning_nf4::quantize_4bit", mutates_args=())
def quantize_4bit(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Packed uint8 codes ``[(numel + 1) // 2]`` and fp32 absmax ``[ceil(numel / blocksize)]``."""
    return reference.quantize_4bit(weight, code, blocksize)


@quantize_4bit.register_fake
def _(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = weight.numel()
    return weight.new_empty((n + 1) // 2, dtype=torch.uint8), weight.new_empty(-(-n // blocksize), dtype=torch.float32)


@quantize_4bit.register_kernel("cpu")
def _(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    if cpu.supports(weight.dtype):
        return cpu.quantize_4bit(weight, code, blocksize)
    return reference.quantize_4bit(weight, code, blocksize)


@torch.library.custom_op("lightning_nf4::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    nested_blocksize: int = 256,
) -> Tensor:
    """Flat ``[numel]`` tensor of ``dtype``. With ``nested_*`` given, ``absmax`` holds uint8 codes
    of the double-quantized statistics and is decoded first (fused into one pass on GPU)."""
    absmax = _decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    return packed.new_empty(numel, dtype=dtype)


@dequantize_4bit.register_kernel("cpu")
def _(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    if cpu.supports(dtype):
        return cpu.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype, nested_absmax, nested_code, offset, nested_blocksize)
    absmax = _decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)


def _decode_absmax(
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    nested_blocksize: int,
) -> Tensor:
    if nested_absmax is None:
        return absmax
    if nested_code is None or offset is None:
        raise ValueError("Double-quantized absmax needs nested_code and offset as well as nested_absmax.")
    return reference.dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_blocksize, offset)


@torch.library.custom_op("lightning_nf4::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit codes (same shape as ``x``, flattened) and fp32 absmax per ``blocksize`` values."""
    return reference.quantize_blockwise_8bit(x, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = x.numel()
    return x.new_empty(n, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("lightning_nf4::gemv_4bit", mutates_args=())
def gemv_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    nested_blocksize: int = 256,
) -> Tensor:
    """``W @ x`` for a single token ``x[in_features]`` (generation); GPUs read the packed weight directly."""
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, x.dtype, nested_absmax, nested_code, offset, nested_blocksize)
    return w.view(out_features, in_features) @ x


@gemv_4bit.register_fake
def _(x, packed, absmax, code, blocksize, out_features, in_features, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    return x.new_empty(out_features)


def _register_triton() -> None:
    """Attach the Triton kernels to the GPU device types; importing Triton is deferred to first use."""
    from lightning_nf4.kernels import triton_kernels

    for device_type in triton_kernels.DEVICE_TYPES:
        quantize_4bit.register_kernel(device_type)(triton_kernels.quantize_4bit)
        dequantize_4bit.register_kernel(device_type)(triton_kernels.dequantize_4bit)
        quantize_blockwise_8bit.register_kernel(device_type)(triton_kernels.quantize_blockwise_8bit)
        gemv_4bit.register_kernel(device_type)(triton_kernels.gemv_4bit)


_register_triton()
