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
        NESTED: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr,
    ):
        # Rows of HALF bytes (a whole quantization block, or a slice of one): the scale is decoded once
        # per row, never per element, and each row's output is one contiguous, vectorised store.
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
        nested_blocksize, NESTED: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr,
    ):
        # out[n] = sum_k x[k] * code[q[n, k]] * scale[n, k // BLOCKSIZE]: reads the packed weight once
        # (a quarter of the bf16 bytes) and never writes a dequantized copy. K % BLOCKSIZE == 0.
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        half: tl.constexpr = BLOCKSIZE // 2
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for b0 in tl.static_range(0, BLOCKS_PER_ROW, BLOCKS_PER_STEP):
            blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
            block_ok = blocks < BLOCKS_PER_ROW
            ok = row_ok[:, None, None] & block_ok[None, :, None]
            byte_idx = (rows[:, None, None] * (K // 2) + blocks[None, :, None] * half + tl.arange(0, half)[None, None, :])
            byte = tl.load(packed_ptr + byte_idx, mask=ok, other=0).to(tl.int32)
            block_idx = rows[:, None] * BLOCKS_PER_ROW + blocks[None, :]
            block_mask = row_ok[:, None] & block_ok[None, :]
            if NESTED:
                qabs = tl.load(absmax_ptr + block_idx, mask=block_mask, other=0).to(tl.int32)
                scale = tl.load(nested_code_ptr + qabs) * tl.load(nested_absmax_ptr + block_idx // nested_blocksize, mask=block_mask, other=0.0)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block_idx, mask=block_mask, other=0.0)
            k_even = blocks[:, None] * BLOCKSIZE + 2 * tl.arange(0, half)[None, :]
            x_even = tl.load(x_ptr + k_even, mask=block_ok[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + k_even + 1, mask=block_ok[:, None], other=0.0).to(tl.float32)
            partial = tl.load(code_ptr + (byte >> 4)) * x_even[None, :, :] + tl.load(code_ptr + (byte & 15)) * x_odd[None, :, :]
            acc += tl.sum(tl.sum(partial, axis=2) * scale, axis=1)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)

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


# Chosen with benchmarks/debug_triton.py: on an H100, 4096 outputs with 4 warps is within noise of the
# best setting (83% of copy bandwidth), and 8192/8 fell to 46% on an H200. Mutable so the sweep can vary it.
# Storing 32-bit words instead of interleaving was slower on the H100.
DEQUANT_CONFIG = {"outputs": 4096, "num_warps": 4}
GEMV_CONFIG = {"rows": 4, "elements_per_step": 1024, "num_warps": 4}  # best of a small H100 sweep (benchmarks/NOTES.md)


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
    num_blocks = -(-numel // blocksize)
    # Rows of 32 bytes (64 outputs) at most: wider rows hit a misaligned-address fault in Triton 3.6's
    # interleaved store (seen on an H200 at blocksize 256); narrower ones cost nothing measurable.
    half = min(32, blocksize // 2)
    rows = DEQUANT_CONFIG["outputs"] // (2 * half)
    num_rows = -(-numel // (2 * half))
    kernels[0][(-(-num_rows // rows),)](
        packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, numel, num_blocks, blocksize, nested_blocksize,
        NESTED=nested, HALF=half, ROWS=rows, num_warps=DEQUANT_CONFIG["num_warps"],
        enable_fp_fusion=False,  # code * nested_absmax + offset rounds twice, as the reference does
    )
    return out


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
    rows, warps = GEMV_CONFIG["rows"], GEMV_CONFIG["num_warps"]
    blocks_per_step = max(1, GEMV_CONFIG["elements_per_step"] // blocksize)
    kernels[3][(-(-out_features // rows),)](
        x.contiguous(), packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else absmax,
        out, out_features, in_features, nested_blocksize, NESTED=nested,
        BLOCKS_PER_ROW=in_features // blocksize, BLOCKSIZE=blocksize, BLOCKS_PER_STEP=blocks_per_step, ROWS=rows, num_warps=warps,
    )
    return out
