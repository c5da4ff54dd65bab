"""A gemv kernel variant for ``gemv_sweep.py --variant chain``: the package's kernel with each loop step's products
summed as one chain of FMAs per group (two FP instructions per weight byte) instead of ``tl.sum``'s tree (a multiply
and an add per product pair, then the tree's adds: about three per byte). The same result to fp32 rounding (another
summation order). Not used by the package."""

import triton
import triton.language as tl

from lightning_nf4.kernels.triton_jit import block_scale, code_pair, gemv_split_sum_kernel, x_pairs  # noqa: F401


@triton.jit
def _halves(t):
    """[G, n] -> two [G, n // 2] (even and odd columns), register moves only."""
    return tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 2, 2]))


@triton.jit
def _fma2(a, b, acc):
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return tl.fma(a1, b1, tl.fma(a0, b0, acc))


@triton.jit
def _fma4(a, b, acc):
    a0, a1 = _halves(a)
    b0, b1 = _halves(b)
    return _fma2(a1, b1, _fma2(a0, b0, acc))


@triton.jit
def _fma8(a, b, acc):
    a0, a1 = _halves(a)
    b0, b1 = _halves(b)
    return _fma4(a1, b1, _fma4(a0, b0, acc))


@triton.jit
def _fma16(a, b, acc):
    a0, a1 = _halves(a)
    b0, b1 = _halves(b)
    return _fma8(a1, b1, _fma8(a0, b0, acc))


@triton.jit
def _fma32(a, b, acc):
    a0, a1 = _halves(a)
    b0, b1 = _halves(b)
    return _fma16(a1, b1, _fma16(a0, b0, acc))


@triton.jit
def chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row, col, block, x_even,
              x_odd, nested_blocksize: tl.constexpr, NESTED: tl.constexpr, ROW_BYTES: tl.constexpr,
              BLOCKS_PER_ROW: tl.constexpr, SHUFFLE: tl.constexpr):
    """One row's share of a step, [G]: each group's x . code as one FMA chain, times its block's absmax."""
    byte = tl.load(packed_ptr + row * ROW_BYTES + col)
    block_idx = row * BLOCKS_PER_ROW + block
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0,
                        nested_blocksize, NESTED)
    high, low = code_pair(code_ptr, byte, SHUFFLE)
    codes = tl.reshape(tl.join(high, low), [high.shape[0], 2 * high.shape[1]])
    xs = tl.reshape(tl.join(x_even, x_odd), [high.shape[0], 2 * high.shape[1]])
    if high.shape[1] == 16:
        total = _fma32(codes, xs, tl.zeros([high.shape[0]], dtype=tl.float32))
    else:  # a group narrower than 16 bytes (blocksize < 32): the tree
        total = tl.sum(codes * xs, axis=1)
    return total * tl.reshape(scale, [high.shape[0]])


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize: tl.constexpr, NESTED: tl.constexpr, X_PAIRS: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SHUFFLE: tl.constexpr,
    EVEN: tl.constexpr, SPLIT: tl.constexpr = 1,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    GROUP: tl.constexpr = 16 if HALF % 16 == 0 else HALF
    ROW_BYTES: tl.constexpr = BLOCKS_PER_ROW * HALF
    PART_BYTES: tl.constexpr = ROW_BYTES // SPLIT
    STEP_BYTES: tl.constexpr = BLOCKS_PER_STEP * HALF
    G: tl.constexpr = STEP_BYTES // GROUP
    tl.static_assert(ROWS == 1 or ROWS == 2 or ROWS == 4, "gemv_kernel takes 1, 2 or 4 rows per program")
    first = tl.program_id(0).to(tl.int64) * ROWS
    part = tl.program_id(1)
    r0, r1, r2, r3 = first, first + 1, first + 2, first + 3
    if not EVEN:
        r1, r2, r3 = tl.minimum(r1, N - 1), tl.minimum(r2, N - 1), tl.minimum(r3, N - 1)
    acc0 = tl.zeros([G], dtype=tl.float32)
    acc1 = tl.zeros([G], dtype=tl.float32)
    acc2 = tl.zeros([G], dtype=tl.float32)
    acc3 = tl.zeros([G], dtype=tl.float32)
    for start in range(0, PART_BYTES, STEP_BYTES):
        if SPLIT == 1:
            base = start
        else:
            base = part * PART_BYTES + start
        groups = tl.arange(0, G)[:, None]
        col = base + groups * GROUP + tl.arange(0, GROUP)[None, :]
        block = (base + groups * GROUP) // HALF
        x_even, x_odd = x_pairs(x_ptr, col, X_PAIRS)
        acc0 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, col, block,
                          x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 1:
            acc1 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, col, block,
                              x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 2:
            acc2 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, col, block,
                              x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc3 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, col, block,
                              x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
    out = out_ptr + part * N + first
    tl.store(out, tl.sum(acc0).to(out_ptr.dtype.element_ty))
    if ROWS > 1:
        tl.store(out + 1, tl.sum(acc1).to(out_ptr.dtype.element_ty), mask=first + 1 < N)
    if ROWS > 2:
        tl.store(out + 2, tl.sum(acc2).to(out_ptr.dtype.element_ty), mask=first + 2 < N)
        tl.store(out + 3, tl.sum(acc3).to(out_ptr.dtype.element_ty), mask=first + 3 < N)
