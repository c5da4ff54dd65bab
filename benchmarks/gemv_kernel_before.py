"""The gemv kernel as it was at commit 37018f5 (rows spread over warps, x loaded once per row, bytes loaded one
at a time), kept only so that ``gemv_sweep.py --before`` times it beside the package's kernel in one run."""

import triton
import triton.language as tl

from lightning_nf4.kernels.triton_jit import block_scale, code_pair, gemv_split_sum_kernel  # noqa: F401 - the shim's sum


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N,
    nested_blocksize, NESTED: tl.constexpr, X_PAIRS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, ROWS: tl.constexpr, SHUFFLE: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr = 1,
):
    # out[n] = sum_k x[k] * code[q[n, k]] * scale[n, k // BLOCKSIZE]: reads the packed weight once (a
    # quarter of the bf16 bytes) and writes no dequantized copy. BLOCKS_PER_ROW % (BLOCKS_PER_STEP * SPLIT) == 0;
    # EVEN: N % ROWS == 0. Products are summed within each quantization block and scaled once per block.
    # x is loaded per row, in the layout of the packed bytes (it stays in L1): a shared x would be moved
    # through shared memory to that layout at every step.
    # SPLIT > 1 (split-K): program (i, s) sums the s-th of SPLIT slices of the rows into fp32 partials
    # out_ptr[s * N + row], and gemv_split_sum_kernel adds them: more programs, and so more bytes in flight,
    # for weights with few rows (a 1024-row weight makes 256 programs of 4 rows for 132 SMs).
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    HALF: tl.constexpr = BLOCKSIZE // 2
    PART_BLOCKS: tl.constexpr = BLOCKS_PER_ROW // SPLIT
    acc = tl.zeros([ROWS, BLOCKS_PER_STEP], dtype=tl.float32)
    for step in range(0, PART_BLOCKS, BLOCKS_PER_STEP):  # a loop, not unrolled: unrolling spilled registers
        if SPLIT == 1:  # constant bounds either way (Triton's interpreter before 3.7 takes no others)
            blocks = step + tl.arange(0, BLOCKS_PER_STEP)
        else:
            blocks = part * PART_BLOCKS + step + tl.arange(0, BLOCKS_PER_STEP)
        pair = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte p of the row holds x[2p], x[2p + 1]
        x_at = pair[None, :, :] + 0 * rows[:, None, None]
        if X_PAIRS == 1:  # bf16 x read as 32-bit words: x[2p] in the low half, x[2p + 1] in the high half
            word = tl.load(x_ptr + x_at)
            x_even = (word << 16).to(tl.float32, bitcast=True)
            x_odd = (word & -65536).to(tl.float32, bitcast=True)
        elif X_PAIRS == 2:  # fp16 x, the same words
            word = tl.load(x_ptr + x_at)
            x_even = (word & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x_odd = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            x_even = tl.load(x_ptr + 2 * x_at).to(tl.float32)
            x_odd = tl.load(x_ptr + 2 * x_at + 1).to(tl.float32)
        byte_at = packed_ptr + rows[:, None, None] * (BLOCKS_PER_ROW * HALF) + pair[None, :, :]
        block_idx = rows[:, None] * BLOCKS_PER_ROW + blocks[None, :]
        if EVEN:
            byte = tl.load(byte_at)
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, block_idx >= 0, nested_blocksize, NESTED)
        else:
            byte = tl.load(byte_at, mask=row_ok[:, None, None], other=0)
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_idx, row_ok[:, None], nested_blocksize, NESTED)
        high, low = code_pair(code_ptr, byte, SHUFFLE)
        acc += tl.sum(high * x_even + low * x_odd, axis=2) * scale
    total = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(out_ptr + part * N + rows, total, mask=row_ok)

