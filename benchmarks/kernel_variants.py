"""Candidate gemv and dequantize kernels, checked against the reference and timed side by side (not a test).

The sweep (commit 6e97f2d) for the two unmet kernel targets of issue 6 (1-token matvec >= 2x faster than dense
bf16; dequantize >= 85% of copy bandwidth). Each candidate is checked against the float reference
before it is timed; the winner moves into ``lightning_nf4/kernels/triton_jit.py``.

    python benchmarks/kernel_variants.py [--quick]
    TRITON_INTERPRET=1 python benchmarks/kernel_variants.py --check   # CPU: correctness of each variant only
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import triton
import triton.language as tl

import lightning_nf4 as L
from lightning_nf4.kernels.triton_jit import block_scale, lane_code
from lightning_nf4.kernels.triton_jit import code_pair_shuffle as code_pair_shfl  # the variant that won, now in the package

CHECK_ONLY = "--check" in sys.argv
DEVICE = "cpu" if CHECK_ONLY else "cuda"


@triton.jit
def gather_step(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                nested_blocksize, rows, row_ok, blocks, block_ok, blocks_per_row, NESTED: tl.constexpr, HALF: tl.constexpr):
    """One step of the gather kernels: [ROWS, blocks] sums of code * x per block, each scaled once."""
    pair = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    word = tl.load(x_ptr + pair, mask=block_ok[:, None], other=0)
    x_even = (word << 16).to(tl.float32, bitcast=True)
    x_odd = (word & -65536).to(tl.float32, bitcast=True)
    ok = row_ok[:, None, None] & block_ok[None, :, None]
    byte = tl.load(packed_ptr + rows[:, None, None] * (blocks_per_row * HALF) + pair[None, :, :], mask=ok, other=0).to(tl.int32)
    block_idx = rows[:, None] * blocks_per_row + blocks[None, :]
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx,
                        row_ok[:, None] & block_ok[None, :], nested_blocksize, NESTED)
    products = tl.load(code_ptr + (byte >> 4)) * x_even[None, :, :] + tl.load(code_ptr + (byte & 15)) * x_odd[None, :, :]
    return tl.sum(products, axis=2) * scale


@triton.jit
def gemv_reduce_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N, K,
    nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, blocks_per_row: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
):
    # Each step's products are summed within their quantization block and scaled once per block, so the
    # accumulator is [ROWS, BLOCKS_PER_STEP], not [ROWS, BLOCKS_PER_STEP, HALF]: fewer registers, more
    # programs in flight per SM.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    HALF: tl.constexpr = BLOCKSIZE // 2
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    for b0 in tl.range(0, blocks_per_row, BLOCKS_PER_STEP, num_stages=STAGES):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        block_ok = blocks < blocks_per_row
        acc += gather_step(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           nested_blocksize, rows, row_ok, blocks, block_ok, blocks_per_row, NESTED, HALF)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def gemv_splitk_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N, K,
    nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, blocks_per_row: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
):
    # One program per (ROWS rows, 1/SPLIT of K): fp32 partial sums atomically added into a zeroed
    # fp32 ``out``; more, shorter programs when N is small.
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    HALF: tl.constexpr = BLOCKSIZE // 2
    PER_PART: tl.constexpr = (blocks_per_row + SPLIT - 1) // SPLIT
    lo = part * PER_PART
    hi = tl.minimum(lo + PER_PART, blocks_per_row)
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    for i in range(0, PER_PART, BLOCKS_PER_STEP):
        blocks = lo + i + tl.arange(0, BLOCKS_PER_STEP)
        block_ok = blocks < hi
        acc += gather_step(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           nested_blocksize, rows, row_ok, blocks, block_ok, blocks_per_row, NESTED, HALF)
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def dequantize_hinted_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize,
    NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr, STREAM: tl.constexpr,
):
    # The one-weight dequantize with cache hints: the packed codes are read once (evict first) and the
    # output is streamed past L2 (.cs) when STREAM.
    ROWS: tl.constexpr = OUTPUTS // (2 * HALF)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    block = (rows * (2 * HALF)) // blocksize
    row_ok = block < (numel + blocksize - 1) // blocksize
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, row_ok, nested_blocksize, NESTED)
    byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    if STREAM:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0, eviction_policy="evict_first").to(tl.int32)
    else:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    values = tl.interleave(high.to(out_ptr.dtype.element_ty), low.to(out_ptr.dtype.element_ty))
    out_idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    if STREAM:
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel, cache_modifier=".cs")
    else:
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel)


@triton.jit
def code_pair(code_ptr, byte, ASM: tl.constexpr):
    """code[byte >> 4], code[byte & 15]. With ASM, as read-only loads in inline PTX: Triton then keeps the
    vectorised layout of the packed bytes instead of moving them through shared memory for a gather."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 h, l; .reg .b64 a, b; shr.u32 h, $2, 4; and.b32 l, $2, 15; "
            "mad.wide.u32 a, h, 4, $3; mad.wide.u32 b, l, 4, $3; ld.global.nc.f32 $0, [a]; ld.global.nc.f32 $1, [b]; }",
            "=r,=r,r,l", [byte, code_ptr], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15))


@triton.jit
def gemv_asm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, blocks_per_row: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, ASM: tl.constexpr, X3D: tl.constexpr,
):
    # N % ROWS == 0 and blocks_per_row % BLOCKS_PER_STEP == 0 (the host picks them so): no masks.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    HALF: tl.constexpr = BLOCKSIZE // 2
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    for b0 in range(0, blocks_per_row, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        pair = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + rows[:, None, None] * (blocks_per_row * HALF) + pair[None, :, :]).to(tl.int32)
        if X3D:
            word = tl.load(x_ptr + pair[None, :, :] + 0 * rows[:, None, None])
            x_even = (word << 16).to(tl.float32, bitcast=True)
            x_odd = (word & -65536).to(tl.float32, bitcast=True)
        else:
            word = tl.load(x_ptr + pair)
            x_even = (word << 16).to(tl.float32, bitcast=True)[None, :, :]
            x_odd = (word & -65536).to(tl.float32, bitcast=True)[None, :, :]
        block_idx = rows[:, None] * blocks_per_row + blocks[None, :]
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
        high, low = code_pair(code_ptr, byte, ASM)
        acc += tl.sum(high * x_even + low * x_odd, axis=2) * scale
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


@triton.jit
def dequantize_asm_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize,
    NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr,
):
    ROWS: tl.constexpr = OUTPUTS // (2 * HALF)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    block = (rows * (2 * HALF)) // blocksize
    byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    out_idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    if EVEN:  # numel % OUTPUTS == 0: no masks
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, block >= 0, nested_blocksize, NESTED)
        byte = tl.load(packed_ptr + byte_idx).to(tl.int32)
    else:
        row_ok = block < (numel + blocksize - 1) // blocksize
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, row_ok, nested_blocksize, NESTED)
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0).to(tl.int32)
    high, low = code_pair(code_ptr, byte, ASM)
    values = tl.interleave((high * scale[:, None]).to(out_ptr.dtype.element_ty), (low * scale[:, None]).to(out_ptr.dtype.element_ty))
    if EVEN:
        tl.store(out_ptr + out_idx, values)
    else:
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel)


@triton.jit
def code_pair_table(pair_ptr, byte, ASM: tl.constexpr):
    """(code[byte >> 4], code[byte & 15]) with one 8-byte load from a 256-entry table of fp32 pairs."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 a; mad.wide.u32 a, $2, 8, $3; ld.global.nc.v2.f32 {$0, $1}, [a]; }",
            "=r,=r,r,l", [byte, pair_ptr], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.load(pair_ptr + 2 * byte), tl.load(pair_ptr + 2 * byte + 1)


@triton.jit
def gemv_pf_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, blocks_per_row: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr, PAIRS: tl.constexpr,
):
    # asm3d plus: PREFETCH loads the next step's codes before this step's arithmetic; PAIRS reads both
    # nibbles' values with one 8-byte load from a 256-entry pair table (code_ptr then points to it).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    HALF: tl.constexpr = BLOCKSIZE // 2
    STEPS: tl.constexpr = blocks_per_row // BLOCKS_PER_STEP
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    lanes = tl.arange(0, BLOCKS_PER_STEP)[:, None] * HALF + tl.arange(0, HALF)[None, :]
    row_base = packed_ptr + rows[:, None, None] * (blocks_per_row * HALF)
    byte = tl.load(row_base + lanes[None, :, :])
    for step in range(STEPS):
        b0 = step * BLOCKS_PER_STEP
        if PREFETCH:
            nxt = tl.minimum(step + 1, STEPS - 1) * (BLOCKS_PER_STEP * HALF)
            byte_next = tl.load(row_base + nxt + lanes[None, :, :])
        else:
            byte = tl.load(row_base + b0 * HALF + lanes[None, :, :])
        pair = b0 * HALF + lanes
        word = tl.load(x_ptr + pair[None, :, :] + 0 * rows[:, None, None])
        x_even = (word << 16).to(tl.float32, bitcast=True)
        x_odd = (word & -65536).to(tl.float32, bitcast=True)
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        block_idx = rows[:, None] * blocks_per_row + blocks[None, :]
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
        if PAIRS:
            high, low = code_pair_table(code_ptr, byte.to(tl.int32), ASM)
        else:
            high, low = code_pair(code_ptr, byte.to(tl.int32), ASM)
        acc += tl.sum(high * x_even + low * x_odd, axis=2) * scale
        if PREFETCH:
            byte = byte_next
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


@triton.jit
def gemv_shfl_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, blocks_per_row: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SHFL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    HALF: tl.constexpr = BLOCKSIZE // 2
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    if SHFL:
        table = lane_code(code_ptr)
    for b0 in range(0, blocks_per_row, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        pair = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + rows[:, None, None] * (blocks_per_row * HALF) + pair[None, :, :])
        word = tl.load(x_ptr + pair[None, :, :] + 0 * rows[:, None, None])
        x_even = (word << 16).to(tl.float32, bitcast=True)
        x_odd = (word & -65536).to(tl.float32, bitcast=True)
        block_idx = rows[:, None] * blocks_per_row + blocks[None, :]
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
        if SHFL:
            high, low = code_pair_shfl(table, byte)
        else:
            high, low = code_pair(code_ptr, byte.to(tl.int32), False)
        acc += tl.sum(high * x_even + low * x_odd, axis=2) * scale
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


@triton.jit
def dequantize_shfl_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize, NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr,
):
    # numel % OUTPUTS == 0 (no masks: every lane must reach the shuffles)
    ROWS: tl.constexpr = OUTPUTS // (2 * HALF)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    block = (rows * (2 * HALF)) // blocksize
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, block >= 0, nested_blocksize, NESTED)
    byte = tl.load(packed_ptr + rows[:, None] * HALF + tl.arange(0, HALF)[None, :])
    high, low = code_pair_shfl(lane_code(code_ptr), byte)
    values = tl.interleave((high * scale[:, None]).to(out_ptr.dtype.element_ty), (low * scale[:, None]).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :], values)


def _nested(q):
    if q.nested is None:
        return q.absmax, q.code, q.absmax, False, 256
    return q.nested.absmax, q.nested.code, q.nested.offset, True, q.nested.blocksize


_pair_tables: dict = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    key = (code.data_ptr(), code.device)
    if key not in _pair_tables:
        b = torch.arange(256, device=code.device)
        _pair_tables[key] = torch.stack([code[b >> 4], code[b & 15]], dim=1).float().contiguous()
    return _pair_tables[key]


def gemv(kind: str, x: torch.Tensor, q, n: int, k: int, rows: int, bps: int, warps: int, extra: int) -> torch.Tensor:
    nabs, ncode, off, nested, nbs = _nested(q)
    xw = x.contiguous().view(torch.int32)
    blocks_per_row = k // q.blocksize
    if kind == "reduce":
        out = torch.empty(n, dtype=x.dtype, device=x.device)
        gemv_reduce_kernel[(triton.cdiv(n, rows),)](
            xw, q.packed, q.absmax, q.code, nabs, ncode, off, out, n, k, nbs,
            NESTED=nested, BLOCKSIZE=q.blocksize, blocks_per_row=blocks_per_row, BLOCKS_PER_STEP=bps, ROWS=rows, STAGES=extra, num_warps=warps)
        return out
    if kind == "shfl":
        out = torch.empty(n, dtype=x.dtype, device=x.device)
        while blocks_per_row % bps:
            bps //= 2
        gemv_shfl_kernel[(triton.cdiv(n, rows),)](
            xw, q.packed, q.absmax, q.code, nabs, ncode, off, out, n, nbs,
            NESTED=nested, BLOCKSIZE=q.blocksize, blocks_per_row=blocks_per_row, BLOCKS_PER_STEP=bps, ROWS=rows,
            SHFL=not CHECK_ONLY, num_warps=warps)
        return out
    if kind in ("pf", "pairs", "pf+pairs"):
        out = torch.empty(n, dtype=x.dtype, device=x.device)
        while blocks_per_row % bps:
            bps //= 2
        table = _pair_table(q.code) if "pairs" in kind else q.code
        gemv_pf_kernel[(triton.cdiv(n, rows),)](
            xw, q.packed, q.absmax, table, nabs, ncode, off, out, n, nbs,
            NESTED=nested, BLOCKSIZE=q.blocksize, blocks_per_row=blocks_per_row, BLOCKS_PER_STEP=bps, ROWS=rows,
            ASM=not CHECK_ONLY, PREFETCH="pf" in kind, PAIRS="pairs" in kind, num_warps=warps)
        return out
    if kind.startswith("asm"):
        out = torch.empty(n, dtype=x.dtype, device=x.device)
        while blocks_per_row % bps:
            bps //= 2
        gemv_asm_kernel[(triton.cdiv(n, rows),)](
            xw, q.packed, q.absmax, q.code, nabs, ncode, off, out, n, nbs,
            NESTED=nested, BLOCKSIZE=q.blocksize, blocks_per_row=blocks_per_row, BLOCKS_PER_STEP=bps, ROWS=rows,
            ASM=not CHECK_ONLY, X3D=kind == "asm3d", num_warps=warps)
        return out
    out = torch.zeros(n, dtype=torch.float32, device=x.device)
    gemv_splitk_kernel[(triton.cdiv(n, rows), extra)](
        xw, q.packed, q.absmax, q.code, nabs, ncode, off, out, n, k, nbs,
        NESTED=nested, BLOCKSIZE=q.blocksize, blocks_per_row=blocks_per_row, BLOCKS_PER_STEP=bps, ROWS=rows, SPLIT=extra, num_warps=warps)
    return out.to(x.dtype)


def dequantize(q, outputs: int, warps: int, stream, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    nabs, ncode, off, nested, nbs = _nested(q)
    out = torch.empty(q.numel, dtype=dtype, device=q.packed.device)
    rows = outputs // 64
    if stream == "shfl":
        assert q.numel % outputs == 0
        dequantize_shfl_kernel[(q.numel // outputs,)](
            q.packed, q.absmax, q.code, nabs, ncode, off, out, q.numel, q.blocksize, nbs,
            NESTED=nested, HALF=32, OUTPUTS=outputs, num_warps=warps, enable_fp_fusion=False)
        return out
    if stream == "asm":
        dequantize_asm_kernel[(triton.cdiv(triton.cdiv(q.numel, 64), rows),)](
            q.packed, q.absmax, q.code, nabs, ncode, off, out, q.numel, q.blocksize, nbs,
            NESTED=nested, HALF=32, OUTPUTS=outputs, ASM=not CHECK_ONLY, EVEN=q.numel % outputs == 0,
            num_warps=warps, enable_fp_fusion=False)
        return out
    dequantize_hinted_kernel[(triton.cdiv(triton.cdiv(q.numel, 64), rows),)](
        q.packed, q.absmax, q.code, nabs, ncode, off, out, q.numel, q.blocksize, nbs,
        NESTED=nested, HALF=32, OUTPUTS=outputs, STREAM=stream, num_warps=warps, enable_fp_fusion=False)
    return out


GEMV_SHAPES = ((8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336))
GEMV_SETTINGS = [("asm3d", 2, 32, 4, 0), ("asm3d", 4, 16, 4, 0), ("asm3d", 4, 32, 8, 0)]
GEMV_SETTINGS += [("shfl", r, b, w, 0) for r, b, w in itertools.product((1, 2, 4, 8), (8, 16, 32), (2, 4, 8))]
DEQUANT_SETTINGS = [(o, w, k) for o, w, k in itertools.product((4096, 8192, 16384), (2, 4, 8), ("asm", "shfl"))] + [(4096, 4, False)]


def check() -> None:
    """Correctness of every variant on small shapes (runs under TRITON_INTERPRET=1 on the CPU)."""
    torch.manual_seed(0)
    for n, k in ((24, 256), (8, 128)):
        w = torch.randn(n, k, device=DEVICE) * 0.02
        x = torch.randn(k, device=DEVICE).bfloat16()
        for dq in (True, False):
            q = L.quantize_nf4(w.bfloat16(), 64, dq)
            expected = q.dequantize(torch.float32) @ x.float()
            for kind, r, b, wp, s in [("reduce", 4, 2, 4, 1), ("reduce", 1, 4, 4, 3), ("splitk", 8, 2, 4, 2), ("splitk", 4, 1, 4, 3),
                                      ("asm", 4, 2, 4, 0), ("asm3d", 8, 4, 4, 0), ("asm", 2, 1, 2, 0),
                                      ("pf", 4, 2, 4, 0), ("pairs", 2, 4, 4, 0), ("pf+pairs", 8, 1, 4, 0), ("shfl", 4, 2, 4, 0)]:
                got = gemv(kind, x, q, n, k, r, b, wp, s).float()
                err = (got - expected).abs().max().item()
                assert err < 2e-2 * expected.abs().max().item() + 1e-3, (kind, r, b, dq, err)
            expected_dq = q.dequantize(torch.float32).reshape(-1)  # fp32: the interpreter rounds bf16 its own way
            for stream in (False, True, "asm"):
                assert torch.equal(dequantize(q, 128, 4, stream, torch.float32), expected_dq), ("dequantize", dq, stream)
            assert torch.equal(dequantize(q, 256, 4, "asm", torch.float32), expected_dq), ("dequantize", dq, "asm odd")
    print("all variants match the reference")


def sweep(quick: bool) -> None:
    from triton.testing import do_bench

    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    print(torch.cuda.get_device_name(), f"triton {triton.__version__}")
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) / 1e6
    del src, dst
    print(f"copy {copy_gbs:.0f} GB/s\n\ndequantize 8192x8192 (outputs, warps, stream): us, % of copy")
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
    for dq in (True, False):
        q = L.quantize_nf4(w, 64, dq)
        expected = q.dequantize(torch.float32).bfloat16().reshape(-1)
        ms = bench(lambda: q.dequantize(torch.bfloat16))
        cells = [f"current {ms * 1e3:.1f} ({100 * w.numel() * 2.5 / ms / 1e6 / copy_gbs:.1f}%)"]
        for outputs, warps, stream in DEQUANT_SETTINGS:
            ok = torch.equal(dequantize(q, outputs, warps, stream), expected)
            ms = bench(lambda: dequantize(q, outputs, warps, stream))
            cells.append(f"{outputs}/{warps}/{stream} {ms * 1e3:.1f} ({100 * w.numel() * 2.5 / ms / 1e6 / copy_gbs:.1f}%){'' if ok else ' WRONG'}")
        print(f"dq={dq}: " + "; ".join(cells), flush=True)
    del w
    torch.manual_seed(0)
    cases = {}
    for n, k in GEMV_SHAPES:
        wt = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        q = L.quantize_nf4(wt, 64, True)
        dense = bench(lambda: wt @ x)
        layer = L.NF4Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer._set_quant(q)
        with torch.no_grad():
            current = bench(lambda: layer(x[None]))
        cases[n, k] = (x, q, q.dequantize(torch.float32) @ x.float(), dense)
        print(f"{n}x{k}: dense {dense * 1e3:.1f} us; current gemv {current * 1e3:.1f} us ({current / dense:.2f}x)")
    print("\ngemv (kind, rows, blocks/step, warps, stages|split): us per shape (x dense)")
    for kind, r, b, wp, s in GEMV_SETTINGS[: 8 if quick else None]:
        cells = []
        for (n, k), (x, q, expected, dense) in cases.items():
            try:
                got = gemv(kind, x, q, n, k, r, b, wp, s).float()
                ok = (got - expected).abs().max().item() < 2e-2 * expected.abs().max().item() + 1e-3
                ms = bench(lambda: gemv(kind, x, q, n, k, r, b, wp, s))
                cells.append(f"{ms * 1e3:.1f} ({ms / dense:.2f}x){'' if ok else ' WRONG'}")
            except Exception as err:  # noqa: BLE001 - a setting that does not compile is reported
                cells.append(f"fail {type(err).__name__}")
        print(f"{kind} {r}/{b}/{wp}/{s}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    if CHECK_ONLY:
        assert os.environ.get("TRITON_INTERPRET") == "1", "run the check with TRITON_INTERPRET=1"
        check()
    else:
        sweep("--quick" in sys.argv)
