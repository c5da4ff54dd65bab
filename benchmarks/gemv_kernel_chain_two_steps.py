"""A gemv kernel variant for ``gemv_sweep.py --variant chain_two_steps``: ``gemv_kernel_chain.py``'s FMA chains with
``gemv_kernel_two_steps.py``'s loop unrolled by two. Not used by the package."""

import triton
import triton.language as tl

from gemv_kernel_chain import chain_row  # this folder is on the path when the sweep runs
from lightning_nf4.kernels.triton_jit import gemv_split_sum_kernel, x_pairs  # noqa: F401


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
    tl.static_assert(PART_BYTES % (2 * STEP_BYTES) == 0, "two_steps needs an even number of steps per row part")
    first = tl.program_id(0).to(tl.int64) * ROWS
    part = tl.program_id(1)
    r0, r1, r2, r3 = first, first + 1, first + 2, first + 3
    if not EVEN:
        r1, r2, r3 = tl.minimum(r1, N - 1), tl.minimum(r2, N - 1), tl.minimum(r3, N - 1)
    acc0 = tl.zeros([G], dtype=tl.float32)
    acc1 = tl.zeros([G], dtype=tl.float32)
    acc2 = tl.zeros([G], dtype=tl.float32)
    acc3 = tl.zeros([G], dtype=tl.float32)
    for start in range(0, PART_BYTES, 2 * STEP_BYTES):
        if SPLIT == 1:
            base = start
        else:
            base = part * PART_BYTES + start
        groups = tl.arange(0, G)[:, None]
        col = base + groups * GROUP + tl.arange(0, GROUP)[None, :]
        block = (base + groups * GROUP) // HALF
        col2 = col + STEP_BYTES
        block2 = block + BLOCKS_PER_STEP
        xe, xo = x_pairs(x_ptr, col, X_PAIRS)
        xe2, xo2 = x_pairs(x_ptr, col2, X_PAIRS)
        acc0 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, col, block,
                         xe, xo, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        acc0 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, col2, block2,
                         xe2, xo2, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 1:
            acc1 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, col, block,
                             xe, xo, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc1 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, col2, block2,
                             xe2, xo2, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 2:
            acc2 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, col, block,
                             xe, xo, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc2 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, col2, block2,
                             xe2, xo2, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc3 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, col, block,
                             xe, xo, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc3 += chain_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, col2, block2,
                             xe2, xo2, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
    out = out_ptr + part * N + first
    tl.store(out, tl.sum(acc0).to(out_ptr.dtype.element_ty))
    if ROWS > 1:
        tl.store(out + 1, tl.sum(acc1).to(out_ptr.dtype.element_ty), mask=first + 1 < N)
    if ROWS > 2:
        tl.store(out + 2, tl.sum(acc2).to(out_ptr.dtype.element_ty), mask=first + 2 < N)
        tl.store(out + 3, tl.sum(acc3).to(out_ptr.dtype.element_ty), mask=first + 3 < N)
