"""A probe for ``gemv_sweep.py --variant probe_noshuffle`` (not a gemv: its result is meaningless): the package's
kernel with each nibble's warp-shuffle lookup (a shift and a shuffle) replaced by one logic instruction, all else the
same. Its time against the package kernel's is what the lookups cost. Inline PTX: GPU only (the interpreter says n/a)."""

import triton
import triton.language as tl

from lightning_nf4.kernels.triton_jit import block_scale, gemv_split_sum_kernel, x_pairs  # noqa: F401


@triton.jit
def fake_pair(byte):
    """Eight floats in [0.5, 1) from a word of four bytes, one lop3 each: no lookup, no shuffle."""
    return tl.inline_asm_elementwise(
        "lop3.b32 $0, $8, 0x000F0F0F, 0x3F000000, 0xEA; lop3.b32 $1, $8, 0x00F0F0F0, 0x3F000000, 0xEA; "
        "lop3.b32 $2, $8, 0x000F0F00, 0x3F000000, 0xEA; lop3.b32 $3, $8, 0x00F0F000, 0x3F000000, 0xEA; "
        "lop3.b32 $4, $8, 0x000F000F, 0x3F000000, 0xEA; lop3.b32 $5, $8, 0x00F000F0, 0x3F000000, 0xEA; "
        "lop3.b32 $6, $8, 0x00000F0F, 0x3F000000, 0xEA; lop3.b32 $7, $8, 0x0000F0F0, 0x3F000000, 0xEA;",
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte], dtype=(tl.float32, tl.float32), is_pure=True, pack=4,
    )


@triton.jit
def probe_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row, col, block, x_even, x_odd,
              nested_blocksize: tl.constexpr, NESTED: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr,
              SHUFFLE: tl.constexpr):
    byte = tl.load(packed_ptr + row * ROW_BYTES + col)
    block_idx = row * BLOCKS_PER_ROW + block
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
    high, low = fake_pair(byte)
    return tl.sum(high * x_even + low * x_odd, axis=1, keep_dims=True) * scale


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize: tl.constexpr, NESTED: tl.constexpr, X_PAIRS: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SHUFFLE: tl.constexpr,
    EVEN: tl.constexpr, SPLIT: tl.constexpr = 1,
):
    # out[n] = sum_k x[k] * code[q[n, k]] * scale[n, k // BLOCKSIZE]: reads the packed weight once (a quarter of
    # the bf16 bytes) and writes no dequantized copy. A program takes ROWS (1, 2 or 4) rows; a loop step covers
    # BLOCKS_PER_STEP blocks of each, as groups of 16 bytes, one group per thread at best (BLOCKS_PER_STEP * 2 ==
    # 32 * num_warps): one 16-byte load per row, x loaded once per step and used for every row (a single [G, 16]
    # layout throughout, so nothing moves through shared memory), and only a group's 16 products summed per step.
    # BLOCKS_PER_ROW % (BLOCKS_PER_STEP * SPLIT) == 0. EVEN: N % ROWS == 0 (else the last rows are read twice and
    # stored once). SPLIT > 1 (split-K): program (i, s) sums the s-th of SPLIT slices of its rows into fp32
    # partials out_ptr[s * N + row], and gemv_split_sum_kernel adds them, for weights with few rows.
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
    acc0 = tl.zeros([G, 1], dtype=tl.float32)
    acc1 = tl.zeros([G, 1], dtype=tl.float32)
    acc2 = tl.zeros([G, 1], dtype=tl.float32)
    acc3 = tl.zeros([G, 1], dtype=tl.float32)
    for start in range(0, PART_BYTES, STEP_BYTES):  # a loop, not unrolled: unrolling spilled registers
        if SPLIT == 1:  # constant bounds either way (Triton's interpreter before 3.7 takes no others)
            base = start
        else:
            base = part * PART_BYTES + start
        groups = tl.arange(0, G)[:, None]
        col = base + groups * GROUP + tl.arange(0, GROUP)[None, :]  # byte c of a row holds x[2c], x[2c + 1]
        block = (base + groups * GROUP) // HALF
        x_even, x_odd = x_pairs(x_ptr, col, X_PAIRS)
        acc0 += probe_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, col, block,
                         x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 1:
            acc1 += probe_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 2:
            acc2 += probe_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc3 += probe_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
    out = out_ptr + part * N + first
    tl.store(out, tl.sum(acc0).to(out_ptr.dtype.element_ty))
    if ROWS > 1:
        tl.store(out + 1, tl.sum(acc1).to(out_ptr.dtype.element_ty), mask=first + 1 < N)
    if ROWS > 2:
        tl.store(out + 2, tl.sum(acc2).to(out_ptr.dtype.element_ty), mask=first + 2 < N)
        tl.store(out + 3, tl.sum(acc3).to(out_ptr.dtype.element_ty), mask=first + 3 < N)
