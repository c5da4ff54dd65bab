"""Host side of the Triton kernels for GPUs (CUDA, and Intel XPU through Intel's Triton backend):
output allocation, launch settings and grids. The kernels themselves are in ``triton_jit``."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from lightning_nf4.format.codebooks import midpoints
from lightning_nf4.kernels import reference

DEVICE_TYPES = ("cuda", "xpu")


@lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, imported on first use; None where Triton is missing (plain PyTorch serves)."""
    try:
        from lightning_nf4.kernels import triton_jit
    except ImportError:
        return None
    return triton_jit


def quantize_4bit(weight: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels()
    if kernels is None:
        return reference.quantize_4bit(weight, code, blocksize)
    weight = weight.contiguous()
    n = weight.numel()
    num_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=weight.device)
    mids = midpoints(code.float()).contiguous()
    rows = max(1, 4096 // blocksize)
    grid = (-(-num_blocks // rows),)
    kernels.quantize_kernel[grid](weight, mids, packed, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4)
    return packed, absmax


# Dequantize launch settings (outputs per program, warps). Each card and size class times the
# candidates once, on first use (one setting is not best everywhere: benchmarks/NOTES.md). Rows are
# capped at 32 bytes (64 outputs): wider rows hit a misaligned-address fault in Triton 3.6's interleaved
# store (seen on an H200 at blocksize 256). DEQUANT_CONFIG forces one setting.
DEQUANT_CANDIDATES = ((4096, 4), (8192, 8), (4096, 8), (8192, 4))
DEQUANT_CONFIG: Optional[dict] = None  # e.g. {"outputs": 4096, "num_warps": 4}; None: timed per card
GEMV_CONFIG = {"rows": 4, "blocks_per_step": 16, "num_warps": 4}  # swept on an H100: benchmarks/NOTES.md
_dequantize_choice: dict[tuple, tuple[int, int]] = {}


def shuffles(device: torch.device) -> bool:
    """Whether the kernels look NF4 codes up with warp shuffles (inline PTX: NVIDIA GPUs only) rather
    than with gathers from the code table (Intel XPU, AMD)."""
    return device.type == "cuda" and torch.version.hip is None


def _dequantize_key(device: torch.device, numel: int, nested: bool, half: int, dtype: torch.dtype) -> tuple:
    return device.type, device.index, max(numel, 1).bit_length(), nested, half, dtype


def _choose(key: tuple, device: torch.device, launch) -> tuple[int, int]:
    """The fastest candidate for ``key``, timed once; the first one while a CUDA graph is captured."""
    if DEQUANT_CONFIG is not None:
        return DEQUANT_CONFIG["outputs"], DEQUANT_CONFIG["num_warps"]
    choice = _dequantize_choice.get(key)
    if choice is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return DEQUANT_CANDIDATES[0]
        from triton.testing import do_bench

        times = {c: do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median") for c in DEQUANT_CANDIDATES}
        choice = _dequantize_choice[key] = min(times, key=times.get)
    return choice


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
    kernels = _kernels()
    nested = nested_absmax is not None
    if kernels is None:
        if nested:
            absmax = reference.dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_blocksize, offset)
        return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    half = min(32, blocksize // 2)
    num_rows = -(-numel // (2 * half))
    args = (
        packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, numel, blocksize, nested_blocksize,
    )

    shuffle = shuffles(packed.device)

    def launch(setting: tuple[int, int]) -> None:
        outputs, warps = setting
        kernels.dequantize_kernel[(-(-num_rows // (outputs // (2 * half))),)](
            *args, NESTED=nested, HALF=half, OUTPUTS=outputs, SHUFFLE=shuffle, EVEN=numel % outputs == 0, num_warps=warps,
            enable_fp_fusion=False,  # code * nested_absmax + offset rounds twice, as the reference does
        )

    launch(_choose(_dequantize_key(packed.device, numel, nested, half, dtype), packed.device, launch))
    return out


_group_tables: dict[tuple, Tensor] = {}
GROUP_MAX_MEMBERS = 16  # one kernel specialization per member count


def _groupable(packed: list[Tensor], absmax: list[Tensor], nested_absmax: list[Tensor], numels: list[int]) -> bool:
    # The group kernel is told (and relies on) 16-byte aligned statistics and numels that are multiples
    # of 64: true of every LLM projection; anything else takes one launch per weight.
    tensors = [*packed, *absmax, *nested_absmax]
    return (
        0 < len(packed) <= GROUP_MAX_MEMBERS and all(n % 64 == 0 for n in numels)
        and all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors)
    )


def _group_table(device: torch.device, packed, absmax, nested_absmax, offsets, numels) -> Optional[Tensor]:
    """Per weight: addresses of packed, absmax, nested absmax and offset, output start, numel; built once
    per set of weights (their addresses do not change while they train on one device; FSDP2 gathers into
    new buffers each time) and kept on the device."""
    nested = bool(nested_absmax)
    addresses = tuple(
        (p.data_ptr(), a.data_ptr(), nested_absmax[i].data_ptr() if nested else a.data_ptr(), offsets[i].data_ptr() if nested else a.data_ptr())
        for i, (p, a) in enumerate(zip(packed, absmax))
    )
    key = (device, addresses, tuple(numels))
    table = _group_tables.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # building the table copies from the host, which a graph capture forbids
        starts = [0]
        for n in numels[:-1]:
            starts.append(starts[-1] + n)
        rows = [[*a, start, n] for a, start, n in zip(addresses, starts, numels)]
        if len(_group_tables) > 1024:
            _group_tables.clear()
        # From pinned memory without blocking: a copy from pageable memory waits for the stream to drain, which
        # under FSDP2 (fresh all-gather buffers, so a new table, every layer and pass) stalls the host each
        # layer and leaves no all-gather overlapped with compute.
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        table = _group_tables[key] = host.to(device, non_blocking=True)
    return table


def dequantize_4bit_group(
    packed: list[Tensor],
    absmax: list[Tensor],
    code: Tensor,
    blocksize: int,
    numels: list[int],
    dtype: torch.dtype,
    nested_absmax: list[Tensor],
    nested_code: Optional[Tensor],
    offsets: list[Tensor],
    nested_blocksize: int = 256,
) -> Tensor:
    """All weights in one launch: a QLoRA step is bound by host time per launch, not by the GPU."""
    kernels = _kernels()
    device = packed[0].device
    table = None
    if kernels is not None and _groupable(packed, absmax, nested_absmax, numels):
        table = _group_table(device, packed, absmax, nested_absmax, offsets, numels)
    if table is None:
        parts = [
            dequantize_4bit(p, a, code, blocksize, n, dtype, *nested, nested_blocksize)
            for p, a, n, nested in reference.group_members(packed, absmax, numels, nested_absmax, nested_code, offsets)
        ]
        return torch.cat(parts)
    nested = bool(nested_absmax)
    out = torch.empty(sum(numels), dtype=dtype, device=device)
    half = min(32, blocksize // 2)
    shuffle = shuffles(device)

    def launch(setting: tuple[int, int]) -> None:
        outputs, warps = setting
        rows = outputs // (2 * half)
        programs = sum(-(-(-(-n // (2 * half))) // rows) for n in numels)
        kernels.dequantize_group_kernel[(programs,)](
            table, code, nested_code if nested else code, out, blocksize, nested_blocksize,
            MEMBERS=len(numels), NESTED=nested, HALF=half, OUTPUTS=outputs, SHUFFLE=shuffle,
            EVEN=all(n % outputs == 0 for n in numels), num_warps=warps, enable_fp_fusion=False,
        )

    launch(_choose(_dequantize_key(device, max(numels), nested, half, dtype), device, launch))
    return out


def dequantize_launch_config(device: torch.device, numel: int, nested: bool, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> Optional[dict]:
    """The setting timed best for this size class on ``device`` (None before its first dequantize)."""
    choice = _dequantize_choice.get(_dequantize_key(torch.device(device), numel, nested, min(32, blocksize // 2), dtype))
    return None if choice is None else {"outputs": choice[0], "num_warps": choice[1]}


def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels()
    if kernels is None:
        return reference.quantize_blockwise_8bit(x, code, blocksize)
    x = x.reshape(-1).float().contiguous()
    n = x.numel()
    num_blocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
    lut = reference.nearest_code_lut(code, x.device)
    rows = max(1, 4096 // blocksize)
    kernels.quantize_8bit_kernel[(-(-num_blocks // rows),)](x, lut, q, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4, enable_fp_fusion=False)
    return q, absmax


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
    """One token, ``W @ x``, read straight from NF4: the weight is read once (a quarter of the bf16 bytes)
    and no dequantized copy is written. Falls back to dequantize + matmul where the layout does not fit."""
    kernels = _kernels()
    if kernels is None or in_features % blocksize:
        w = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, x.dtype, nested_absmax, nested_code, offset, nested_blocksize)
        return w.view(out_features, in_features) @ x
    nested = nested_absmax is not None
    out = torch.empty(out_features, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    pairs = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0)
    if pairs:
        x = (x if x.storage_offset() % 2 == 0 else x.clone()).view(torch.int32)
    rows, warps = GEMV_CONFIG["rows"], GEMV_CONFIG["num_warps"]
    blocks_per_row = in_features // blocksize
    blocks_per_step = GEMV_CONFIG["blocks_per_step"]
    while blocks_per_row % blocks_per_step:  # the kernel has no mask along K
        blocks_per_step //= 2
    kernels.gemv_kernel[(-(-out_features // rows),)](
        x, packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, out_features, nested_blocksize, NESTED=nested, X_PAIRS=pairs, BLOCKSIZE=blocksize,
        BLOCKS_PER_ROW=blocks_per_row, BLOCKS_PER_STEP=blocks_per_step, ROWS=rows, SHUFFLE=shuffles(x.device),
        EVEN=out_features % rows == 0, num_warps=warps,
    )
    return out
