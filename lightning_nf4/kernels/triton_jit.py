"""The ``@triton.jit`` kernels. Importing this module imports Triton; ``triton_kernels`` does so on
first use and falls back to plain PyTorch where Triton is missing.

One pass over memory each: quantize reads the weight once and writes codes and absmax; dequantize
reads codes (and, with double quantization, the 8-bit statistics) and writes the output, decoding the
nested absmax in registers rather than in a separate launch.
"""

import triton
import triton.language as tl


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, nested_blocksize, NESTED: tl.constexpr):
    """The fp32 absmax of quantization blocks ``block``, decoded from the 8-bit nested codes if NESTED."""
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + qabs) * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def lane_code(code_ptr):
    """code[lane % 16] in each lane of the warp: the table ``code_pair_shuffle`` reads."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 lane; .reg .b64 a; mov.u32 lane, %laneid; and.b32 lane, lane, 15; "
        "mad.wide.u32 a, lane, 4, $1; ld.global.nc.f32 $0, [a]; }",
        "=r,l", [code_ptr], dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def code_pair_shuffle(table, byte):
    # Four bytes per call, each nibble's value fetched by a warp shuffle from the lane that holds it:
    # no address arithmetic and no memory access per element, where a gather costs both and made Triton
    # move the bytes through shared memory. A shuffle takes its source lane from the low 5 bits of the
    # operand, and lanes 16-31 repeat the table, so a nibble needs no masking, only a shift.
    return tl.inline_asm_elementwise(
        "{ .reg .b32 s; "
        "shr.u32 s, $8, 4; shfl.sync.idx.b32 $0, $9, s, 0x1f, -1; shfl.sync.idx.b32 $4, $9, $8, 0x1f, -1; "
        "shr.u32 s, $8, 12; shfl.sync.idx.b32 $1, $9, s, 0x1f, -1; shr.u32 s, $8, 8; shfl.sync.idx.b32 $5, $9, s, 0x1f, -1; "
        "shr.u32 s, $8, 20; shfl.sync.idx.b32 $2, $9, s, 0x1f, -1; shr.u32 s, $8, 16; shfl.sync.idx.b32 $6, $9, s, 0x1f, -1; "
        "shr.u32 s, $8, 28; shfl.sync.idx.b32 $3, $9, s, 0x1f, -1; shr.u32 s, $8, 24; shfl.sync.idx.b32 $7, $9, s, 0x1f, -1; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [byte, table], dtype=(tl.float32, tl.float32), is_pure=True, pack=4,
    )


@triton.jit
def code_pair(code_ptr, byte, SHUFFLE: tl.constexpr):
    """(code[byte >> 4], code[byte & 15]) for a uint8 tensor: by warp shuffles on NVIDIA GPUs (SHUFFLE,
    inline PTX), by gathers from the 16-entry table elsewhere (Intel XPU, the interpreter)."""
    if SHUFFLE:
        return code_pair_shuffle(lane_code(code_ptr), byte)
    else:
        wide = byte.to(tl.int32)
        return tl.load(code_ptr + (wide >> 4)), tl.load(code_ptr + (wide & 15))


@triton.jit
def dequantize_rows(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize, pid,
    NESTED: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, SHUFFLE: tl.constexpr, EVEN: tl.constexpr,
):
    # Rows of HALF bytes (a whole quantization block, or a slice of one): the scale is decoded once per
    # row, never per element, and each row's output is one contiguous, vectorised store. EVEN: the
    # program's rows are all inside the weight, so no masks (and no per-element compares).
    rows = pid * ROWS + tl.arange(0, ROWS)
    block = (rows * (2 * HALF)) // blocksize
    byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    out_idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    if EVEN:
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, block >= 0, nested_blocksize, NESTED)
        byte = tl.load(packed_ptr + byte_idx)
    else:
        row_ok = block < (numel + blocksize - 1) // blocksize
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, row_ok, nested_blocksize, NESTED)
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0)
    high, low = code_pair(code_ptr, byte, SHUFFLE)
    values = tl.interleave((high * scale[:, None]).to(out_ptr.dtype.element_ty), (low * scale[:, None]).to(out_ptr.dtype.element_ty))
    if EVEN:
        tl.store(out_ptr + out_idx, values)
    else:
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel)


@triton.jit
def dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize,
    NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr, SHUFFLE: tl.constexpr, EVEN: tl.constexpr,
):
    dequantize_rows(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        numel, blocksize, nested_blocksize, tl.program_id(0).to(tl.int64), NESTED, HALF, OUTPUTS // (2 * HALF), SHUFFLE, EVEN,
    )


@triton.jit
def dequantize_group_kernel(
    table_ptr, code_ptr, nested_code_ptr, out_ptr, blocksize, nested_blocksize,
    MEMBERS: tl.constexpr, NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr, SHUFFLE: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Several weights in one launch, each into its own slice of ``out``. ``table`` holds one row of six
    # int64 per weight: the addresses of packed, absmax, nested absmax and offset, the weight's first
    # element in ``out``, and its numel. Programs are dealt out to the weights in table order.
    ROWS: tl.constexpr = OUTPUTS // (2 * HALF)
    pid = tl.program_id(0).to(tl.int64)
    member = 0
    first = pid * 0
    end = pid * 0
    for m in tl.static_range(MEMBERS):
        numel_m = tl.load(table_ptr + m * 6 + 5)
        end_m = end + ((numel_m + 2 * HALF - 1) // (2 * HALF) + ROWS - 1) // ROWS
        past = pid >= end_m
        member = tl.where(past, m + 1, member)
        first = tl.where(past, end_m, first)
        end = end_m
    # The host keeps every address 16-byte aligned and every numel and output start a multiple of 64;
    # the hints let the compiler vectorise loads and stores as it does for the one-weight kernel.
    row = table_ptr + member * 6
    packed_ptr = tl.multiple_of(tl.load(row), 16).to(tl.pointer_type(tl.uint8))
    if NESTED:
        absmax_ptr = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(tl.uint8))
    else:
        absmax_ptr = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(tl.float32))
    nested_absmax_ptr = tl.multiple_of(tl.load(row + 2), 16).to(tl.pointer_type(tl.float32))
    offset_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    out_start = tl.multiple_of(tl.load(row + 4), 64)
    dequantize_rows(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
        out_ptr + out_start, tl.multiple_of(tl.load(row + 5), 64), blocksize, nested_blocksize, pid - first, NESTED, HALF, ROWS,
        SHUFFLE, EVEN,
    )


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
def x_pairs(x_ptr, col, X_PAIRS: tl.constexpr):
    """(x[2c], x[2c + 1]) in fp32 for the byte offsets ``col`` of a packed row: the two inputs a byte's nibbles multiply."""
    if X_PAIRS == 1:  # bf16 x read as 32-bit words: x[2c] in the low half, x[2c + 1] in the high half
        word = tl.load(x_ptr + col)
        return (word << 16).to(tl.float32, bitcast=True), (word & -65536).to(tl.float32, bitcast=True)
    elif X_PAIRS == 2:  # fp16 x, the same words
        word = tl.load(x_ptr + col)
        return ((word & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))
    else:
        return tl.load(x_ptr + 2 * col).to(tl.float32), tl.load(x_ptr + 2 * col + 1).to(tl.float32)


@triton.jit
def gemv_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row, col, block, x_even, x_odd,
             nested_blocksize: tl.constexpr, NESTED: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr,
             SHUFFLE: tl.constexpr):
    """One weight row's share of a loop step, [groups, 1]: each group's sum of x * code, times its block's absmax."""
    byte = tl.load(packed_ptr + row * ROW_BYTES + col)
    block_idx = row * BLOCKS_PER_ROW + block
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
    high, low = code_pair(code_ptr, byte, SHUFFLE)
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
        acc0 += gemv_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r0, col, block,
                         x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 1:
            acc1 += gemv_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r1, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
        if ROWS > 2:
            acc2 += gemv_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r2, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
            acc3 += gemv_row(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, r3, col, block,
                             x_even, x_odd, nested_blocksize, NESTED, ROW_BYTES, BLOCKS_PER_ROW, SHUFFLE)
    out = out_ptr + part * N + first
    tl.store(out, tl.sum(acc0).to(out_ptr.dtype.element_ty))
    if ROWS > 1:
        tl.store(out + 1, tl.sum(acc1).to(out_ptr.dtype.element_ty), mask=first + 1 < N)
    if ROWS > 2:
        tl.store(out + 2, tl.sum(acc2).to(out_ptr.dtype.element_ty), mask=first + 2 < N)
        tl.store(out + 3, tl.sum(acc3).to(out_ptr.dtype.element_ty), mask=first + 3 < N)


@triton.jit
def gemv_split_sum_kernel(partial_ptr, out_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # out[n] = sum over s of partial[s, n], in a fixed order (the result does not depend on scheduling).
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        total += tl.load(partial_ptr + s * N + rows, mask=ok, other=0.0)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=ok)
