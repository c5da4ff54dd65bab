"""A probe for ``gemv_sweep.py --variant probe_loads`` (not a gemv: its result is meaningless): the package kernel's
loads (each row's 16-byte groups, x, the nested scales) with almost no arithmetic, XOR-folded so the compiler keeps
them. Its time is the floor the package's loop and occupancy allow for memory alone."""

import triton
import triton.language as tl

from lightning_nf4.kernels.triton_jit import block_scale, gemv_split_sum_kernel  # noqa: F401


@triton.jit
def _row_words(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row, base, block, G: tl.constexpr,
               nested_blocksize: tl.constexpr, NESTED: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr):
    words = packed_ptr.to(tl.pointer_type(tl.int32))
    offs = (row * ROW_BYTES + base) // 4 + tl.arange(0, G)[:, None] * 4 + tl.arange(0, 4)[None, :]
    w = tl.load(words + tl.max_contiguous(tl.multiple_of(offs, [1, 4]), [1, 4]))
    block_idx = row * BLOCKS_PER_ROW + block
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
    return w, scale


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize: tl.constexpr, NESTED: tl.constexpr, X_PAIRS: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SHUFFLE: tl.constexpr,
    EVEN: tl.constexpr, SPLIT: tl.constexpr = 1,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    GROUP: tl.constexpr = 16
    ROW_BYTES: tl.constexpr = BLOCKS_PER_ROW * HALF
    PART_BYTES: tl.constexpr = ROW_BYTES // SPLIT
    STEP_BYTES: tl.constexpr = BLOCKS_PER_STEP * HALF
    G: tl.constexpr = STEP_BYTES // GROUP
    tl.static_assert(HALF % 16 == 0, "probe_loads takes blocksize >= 32")
    first = tl.program_id(0).to(tl.int64) * ROWS
    part = tl.program_id(1)
    r0, r1, r2, r3 = first, first + 1, first + 2, first + 3
    if not EVEN:
        r1, r2, r3 = tl.minimum(r1, N - 1), tl.minimum(r2, N - 1), tl.minimum(r3, N - 1)
    bits = tl.zeros([G, 4], dtype=tl.int32)
    xbits = tl.zeros([G], dtype=tl.int32)
    total = tl.zeros([G], dtype=tl.float32)
    for start in range(0, PART_BYTES, STEP_BYTES):
        if SPLIT == 1:
            base = start
        else:
            base = part * PART_BYTES + start
        groups = tl.arange(0, G)
        block = (base + groups * GROUP) // HALF
        xw = tl.load(x_ptr + base + groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :])
        xbits ^= tl.xor_sum(xw, axis=1)
        w, s = _row_words(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, base, block, G,
                          nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW)
        bits ^= w
        total += s
        if ROWS > 1:
            w, s = _row_words(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, base, block, G,
                              nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW)
            bits ^= w
            total += s
        if ROWS > 2:
            w, s = _row_words(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, base, block, G,
                              nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW)
            bits ^= w
            total += s
            w, s = _row_words(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, base, block, G,
                              nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW)
            bits ^= w
            total += s
    value = (tl.sum(total) + (tl.xor_sum(tl.xor_sum(bits, axis=1), axis=0) ^ tl.xor_sum(xbits, axis=0)).to(tl.float32)).to(out_ptr.dtype.element_ty)
    out = out_ptr + part * N + first
    tl.store(out, value)
    if ROWS > 1:
        tl.store(out + 1, value, mask=first + 1 < N)
    if ROWS > 2:
        tl.store(out + 2, value, mask=first + 2 < N)
        tl.store(out + 3, value, mask=first + 3 < N)
