"""Triton kernels for GPUs (CUDA, and Intel XPU through Intel's Triton backend).

Both kernels do one pass over memory: quantize reads the weight once and writes codes and absmax;
dequantize reads codes (and, with double quantization, the 8-bit statistics) and writes the output,
decoding the nested absmax in registers rather than in a separate launch.
"""

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
    """Compile-on-import of the Triton code; None where Triton is missing (plain PyTorch then serves)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequantize_kernel(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        numel, num_blocks, blocksize, nested_blocksize,
        NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr,
    ):
        # Rows of HALF bytes (a whole quantization block, or a slice of one): the scale is decoded once
        # per row, never per element, and each row's output is one contiguous, vectorised store.
        ROWS: tl.constexpr = OUTPUTS // (2 * HALF)
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        block = (rows * (2 * HALF)) // blocksize
        row_ok = block < num_blocks
        if NESTED:
            qabs = tl.load(absmax_ptr + block, mask=row_ok, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + qabs) * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=row_ok, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=row_ok, other=0.0)
        byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
        values = tl.interleave(high.to(out_ptr.dtype.element_ty), low.to(out_ptr.dtype.element_ty))
        out_idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel)

    @triton.jit
    def quantize_kernel(
        x_ptr, mids_ptr, packed_ptr, absmax_ptr, numel, num_blocks,
        BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCKSIZE)
        idx = rows[:, None] * BLOCKSIZE + cols[None, :]
        x = tl.load(x_ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
        amax = tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1)  # NaN marks the block non-finite
        safe = tl.maximum(amax, 1e-38).to(tl.float32)
        partial = (rows + 1) * BLOCKSIZE > numel  # the tail block is normalised by division
        inverse = tl.math.div_rn(tl.zeros_like(safe) + 1.0, safe).to(tl.float32)  # IEEE, as torch's 1 / absmax
        scaled = tl.where(partial[:, None], tl.math.div_rn(x, safe[:, None]), x * inverse[:, None])
        q = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
        for k in tl.static_range(15):
            q += (scaled > tl.load(mids_ptr + k)).to(tl.int32)
        even, odd = tl.split(tl.reshape(q, [ROWS, BLOCKSIZE // 2, 2]))
        packed = ((even << 4) | odd).to(tl.uint8)
        pidx = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + pidx, packed, mask=pidx < (numel + 1) // 2)
        tl.store(absmax_ptr + rows, amax, mask=rows < num_blocks)

    @triton.jit
    def quantize_8bit_kernel(x_ptr, lut_ptr, q_ptr, absmax_ptr, n, num_blocks, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
        # bitsandbytes' CPU rounding: the normalised value picks one of 65536 grid points, whose
        # nearest code comes from a lookup table; an all-zero block gets code 0.
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        ok = idx < n
        x = tl.load(x_ptr + idx, mask=ok, other=0.0)
        amax = tl.max(tl.abs(x), axis=1)
        scaled = tl.math.div_rn(x, tl.maximum(amax, 1e-38).to(tl.float32)[:, None])  # IEEE division, as the reference
        scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
        grid_index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
        q = tl.load(lut_ptr + grid_index, mask=ok, other=0)
        q = tl.where((amax == 0.0)[:, None], 0, q)
        tl.store(q_ptr + idx, q.to(tl.uint8), mask=ok)
        tl.store(absmax_ptr + rows, amax, mask=rows < num_blocks)

    @triton.jit
    def gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N, K,
        nested_blocksize, NESTED: tl.constexpr, X_PAIRS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr,
        BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr,
    ):
        # out[n] = sum_k x[k] * code[q[n, k]] * scale[n, k // BLOCKSIZE]: reads the packed weight once
        # (a quarter of the bf16 bytes) and never writes a dequantized copy. K % BLOCKSIZE == 0.
        # Products accumulate element-wise and are reduced once at the end, not per step.
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        HALF: tl.constexpr = BLOCKSIZE // 2
        acc = tl.zeros([ROWS, BLOCKS_PER_STEP, HALF], dtype=tl.float32)
        for b0 in range(0, BLOCKS_PER_ROW, BLOCKS_PER_STEP):  # a loop, not unrolled: unrolling spilled registers
            blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
            block_ok = blocks < BLOCKS_PER_ROW
            pair = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte p of the row holds x[2p], x[2p + 1]
            if X_PAIRS == 1:  # bf16 x read as 32-bit words: x[2p] in the low half, x[2p + 1] in the high half
                word = tl.load(x_ptr + pair, mask=block_ok[:, None], other=0)
                x_even = (word << 16).to(tl.float32, bitcast=True)
                x_odd = (word & -65536).to(tl.float32, bitcast=True)
            elif X_PAIRS == 2:  # fp16 x, the same words
                word = tl.load(x_ptr + pair, mask=block_ok[:, None], other=0)
                x_even = (word & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_odd = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                x_even = tl.load(x_ptr + 2 * pair, mask=block_ok[:, None], other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + 2 * pair + 1, mask=block_ok[:, None], other=0.0).to(tl.float32)
            ok = row_ok[:, None, None] & block_ok[None, :, None]
            byte = tl.load(packed_ptr + rows[:, None, None] * (K // 2) + pair[None, :, :], mask=ok, other=0).to(tl.int32)
            block_idx = rows[:, None] * BLOCKS_PER_ROW + blocks[None, :]
            block_mask = row_ok[:, None] & block_ok[None, :]
            if NESTED:
                qabs = tl.load(absmax_ptr + block_idx, mask=block_mask, other=0).to(tl.int32)
                scale = tl.load(nested_code_ptr + qabs) * tl.load(nested_absmax_ptr + block_idx // nested_blocksize, mask=block_mask, other=0.0)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block_idx, mask=block_mask, other=0.0)
            products = tl.load(code_ptr + (byte >> 4)) * x_even[None, :, :] + tl.load(code_ptr + (byte & 15)) * x_odd[None, :, :]
            acc += products * scale[:, :, None]
        tl.store(out_ptr + rows, tl.sum(tl.sum(acc, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)

    return dequantize_kernel, quantize_kernel, quantize_8bit_kernel, gemv_kernel


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
    kernels[1][grid](weight, mids, packed, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4)
    return packed, absmax


# Dequantize launch settings (outputs per program, warps). Each card and size class times the
# candidates once, on first use: 4096/4 was best on an H100 but reached only 46-60% of copy bandwidth on
# an H200. Rows are capped at 32 bytes (64 outputs): wider rows hit a misaligned-address fault in
# Triton 3.6's interleaved store (seen on an H200 at blocksize 256). DEQUANT_CONFIG forces one setting.
DEQUANT_CANDIDATES = ((4096, 4), (8192, 8), (2048, 4), (16384, 8))
DEQUANT_CONFIG: Optional[dict] = None  # e.g. {"outputs": 4096, "num_warps": 4}; None: timed per card
GEMV_CONFIG = {"rows": 8, "elements_per_step": 1024, "num_warps": 4}  # see benchmarks/NOTES.md
_dequantize_choice: dict[tuple, tuple[int, int]] = {}


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
        out, numel, -(-numel // blocksize), blocksize, nested_blocksize,
    )

    def launch(setting: tuple[int, int]) -> None:
        outputs, warps = setting
        kernels[0][(-(-num_rows // (outputs // (2 * half))),)](
            *args, NESTED=nested, HALF=half, OUTPUTS=outputs, num_warps=warps,
            enable_fp_fusion=False,  # code * nested_absmax + offset rounds twice, as the reference does
        )

    launch(_choose(_dequantize_key(packed.device, numel, nested, half, dtype), packed.device, launch))
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
    kernels[2][(-(-num_blocks // rows),)](x, lut, q, absmax, n, num_blocks, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4, enable_fp_fusion=False)
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
    blocks_per_step = max(1, GEMV_CONFIG["elements_per_step"] // blocksize)
    kernels[3][(-(-out_features // rows),)](
        x, packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, out_features, in_features, nested_blocksize, NESTED=nested, X_PAIRS=pairs,
        BLOCKSIZE=blocksize, BLOCKS_PER_ROW=in_features // blocksize, BLOCKS_PER_STEP=blocks_per_step, ROWS=rows, num_warps=warps,
    )
    return out
