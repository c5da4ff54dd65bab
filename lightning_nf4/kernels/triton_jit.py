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
def dequantize_rows(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize, pid, NESTED: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr,
):
    # Rows of HALF bytes (a whole quantization block, or a slice of one): the scale is decoded once per
    # row, never per element, and each row's output is one contiguous, vectorised store.
    rows = pid * ROWS + tl.arange(0, ROWS)
    block = (rows * (2 * HALF)) // blocksize
    row_ok = block < (numel + blocksize - 1) // blocksize
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, row_ok, nested_blocksize, NESTED)
    byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (numel + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    values = tl.interleave(high.to(out_ptr.dtype.element_ty), low.to(out_ptr.dtype.element_ty))
    out_idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(out_ptr + out_idx, values, mask=out_idx < numel)


@triton.jit
def dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize,
    NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr,
):
    dequantize_rows(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        numel, blocksize, nested_blocksize, tl.program_id(0).to(tl.int64), NESTED, HALF, OUTPUTS // (2 * HALF),
    )


@triton.jit
def dequantize_group_kernel(
    table_ptr, code_ptr, nested_code_ptr, out_ptr, blocksize, nested_blocksize,
    MEMBERS: tl.constexpr, NESTED: tl.constexpr, HALF: tl.constexpr, OUTPUTS: tl.constexpr,
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
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_mask, nested_blocksize, NESTED)
        products = tl.load(code_ptr + (byte >> 4)) * x_even[None, :, :] + tl.load(code_ptr + (byte & 15)) * x_odd[None, :, :]
        acc += products * scale[:, :, None]
    tl.store(out_ptr + rows, tl.sum(tl.sum(acc, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)
