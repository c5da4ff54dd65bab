"""CPU kernels: the C file beside this one, called through ctypes from a small thread pool.

ctypes drops the GIL for the call, so each worker runs a range of blocks truly in parallel. When the
extension was not built (no C compiler at install time), ``available()`` is False and the plain
PyTorch kernels serve instead.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional

import torch

from lightning_nf4.format.codebooks import midpoints

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_MIN_BLOCKS_PER_TASK = 8192  # below ~512K elements a second thread costs more than it saves


class _Scales(ctypes.Structure):
    """Mirror of ``lnf4_scales`` in the C file: fp32 absmax, or the double-quantized triple."""

    _fields_ = [
        ("absmax", ctypes.c_void_p),
        ("qabsmax", ctypes.c_void_p),
        ("nested_absmax", ctypes.c_void_p),
        ("nested_code", ctypes.c_void_p),
        ("offset", ctypes.c_float),
        ("nested_blocksize", ctypes.c_int64),
    ]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LIGHTNING_NF4_DISABLE_CPU_KERNELS") == "1":
        return None
    spec = importlib.util.find_spec("lightning_nf4.kernels._cpu_kernels")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"lnf4_quantize_4bit_{suffix}")
        fn.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, i64, i64]
        fn.restype = None
        fn = getattr(lib, f"lnf4_dequantize_4bit_{suffix}")
        fn.argtypes = [ptr, ctypes.POINTER(_Scales), ptr, i64, i64, ptr, i64, i64]
        fn.restype = None
    if hasattr(lib, "lnf4_gemv_4bit_bf16x"):  # a library built before the gemv was added lacks it
        lib.lnf4_gemv_4bit.argtypes = [ptr, ctypes.POINTER(_Scales), ptr, ptr, ptr, i64, i64, ptr, i64, i64]
        lib.lnf4_gemv_4bit_bf16x.argtypes = [ptr, ctypes.POINTER(_Scales), ptr, ptr, i64, i64, ptr, i64, i64]
        for fn in (lib.lnf4_gemv_4bit, lib.lnf4_gemv_4bit_bf16x):
            fn.restype = None
    return lib


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _prefer_huge_pages(tensor: torch.Tensor) -> None:
    """Ask for transparent huge pages on a fresh large output: first-touch page faults otherwise cost
    most of a dequantize (10 ms of 13 for a 4096x4096 bf16 weight on a 2-core machine)."""
    nbytes = tensor.numel() * tensor.element_size()
    libc = _libc()
    if libc is None or nbytes < 2 * _HUGE_PAGE:
        return
    start = (tensor.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = tensor.data_ptr() + nbytes
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # advice only; failure is harmless


def available() -> bool:
    return _library() is not None


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="lightning-nf4")


def _run_blocks(fn, args: tuple, num_blocks: int, min_per_task: int = _MIN_BLOCKS_PER_TASK) -> None:
    """Call ``fn(*args, begin, end)`` over ``[0, num_blocks)``, split across the torch thread count;
    the calling thread takes the first share itself."""
    workers = max(1, min(torch.get_num_threads(), num_blocks // min_per_task))
    if workers == 1:
        fn(*args, 0, num_blocks)
        return
    bounds = [num_blocks * k // workers for k in range(workers + 1)]
    futures = [_pool().submit(fn, *args, bounds[k], bounds[k + 1]) for k in range(1, workers)]
    fn(*args, bounds[0], bounds[1])
    for future in futures:
        future.result()


def quantize_4bit(weight: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _library()
    assert lib is not None
    weight = weight.contiguous()
    n = weight.numel()
    num_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device="cpu")  # C writes here: never a default device's
    absmax = torch.empty(num_blocks, dtype=torch.float32, device="cpu")
    mids = midpoints(code.float().cpu()).contiguous()
    zero_code = int((mids < 0).sum())
    fn = getattr(lib, f"lnf4_quantize_4bit_{_SUFFIX[weight.dtype]}")
    args = (weight.data_ptr(), n, blocksize, mids.data_ptr(), zero_code, packed.data_ptr(), absmax.data_ptr())
    _run_blocks(fn, args, num_blocks)
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Into ``out`` (a contiguous ``[numel]`` tensor of ``dtype``) when given, else a new tensor."""
    lib = _library()
    assert lib is not None
    keep, scales = _scales(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device="cpu")
        _prefer_huge_pages(out)
    fn = getattr(lib, f"lnf4_dequantize_4bit_{_SUFFIX[dtype]}")
    args = (keep[0].data_ptr(), ctypes.byref(scales), keep[2].data_ptr(), numel, blocksize, out.data_ptr())
    _run_blocks(fn, args, -(-numel // blocksize))
    return out


def _scales(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize) -> tuple[list, _Scales]:
    """The C scale descriptor, and the contiguous tensors it points into (kept alive by the caller)."""
    keep = [packed.contiguous(), absmax.contiguous(), code.float().contiguous()]
    scales = _Scales(nested_blocksize=nested_blocksize)
    if nested_absmax is None:
        keep[1] = keep[1].float()
        scales.absmax = keep[1].data_ptr()
    else:
        keep += [nested_absmax.float().contiguous(), nested_code.float().contiguous()]
        scales.qabsmax, scales.nested_absmax, scales.nested_code = keep[1].data_ptr(), keep[3].data_ptr(), keep[4].data_ptr()
        scales.offset = float(offset)
    return keep, scales


def set_simd(enabled: Optional[bool]) -> None:
    """Force the portable (False) or detected (None) code paths of the C kernels; for tests."""
    lib = _library()
    if lib is not None and hasattr(lib, "lnf4_set_avx512"):
        lib.lnf4_set_avx512(ctypes.c_int(-1 if enabled is None else int(enabled)))


def has_gemv(in_features: int, blocksize: int) -> bool:
    """Whether the fused 1-token kernel takes this layout (whole blocks per row, blocks of 32+ values)."""
    lib = _library()
    return lib is not None and hasattr(lib, "lnf4_gemv_4bit_bf16x") and in_features % blocksize == 0 and blocksize % 32 == 0


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``W @ x`` for one token read straight from the packed codes, in fp32, returned in ``x``'s dtype:
    generation on a CPU reads a quarter of the bytes of a bf16 matvec and writes no float weight."""
    lib = _library()
    assert lib is not None and has_gemv(in_features, blocksize)
    keep, scales = _scales(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize)
    out = torch.empty(out_features, dtype=torch.float32, device="cpu")
    if x.dtype == torch.bfloat16:  # read in place, two elements per 32-bit word
        x = x.reshape(-1).contiguous()
        if x.data_ptr() % 4:
            x = x.clone()
        keep.append(x)
        fn, x_args = lib.lnf4_gemv_4bit_bf16x, (x.data_ptr(),)
    else:
        xf = x.reshape(-1).float()
        x_even, x_odd = xf[0::2].contiguous(), xf[1::2].contiguous()
        keep += [x_even, x_odd]
        fn, x_args = lib.lnf4_gemv_4bit, (x_even.data_ptr(), x_odd.data_ptr())
    args = (keep[0].data_ptr(), ctypes.byref(scales), keep[2].data_ptr(), *x_args, in_features, blocksize, out.data_ptr())
    _run_blocks(fn, args, out_features, min_per_task=max(1, (1 << 19) // in_features))
    return out.to(x.dtype)


def supports(dtype: torch.dtype) -> bool:
    return available() and dtype in _SUFFIX
