// One token through an NF4 weight on tensor cores: out[n] = sum_k code[q[n, k]] * scale[n, k / 64] * x[k].
//
// A research kernel, not used by the package: benchmarks/gemv_mma.py compiles it (NVRTC) and times it beside
// the package's Triton gemv; benchmarks/results_h200_gemv_mma.md has the outcome (not faster overall).
//
// Why tensor cores: the Triton gemv spends as much time on its codebook lookups (two warp shuffles per weight
// byte) as on reading memory (benchmarks/results_h200_gemv_probes.md). Here a weight byte (two codes) is one
// shared-memory load from a table of bf16 code pairs, and that 32-bit value is already an A-operand register of
// `mma.m16n8k16` (two consecutive k of one row), so the products and sums cost one mma per 4 bytes a lane. Each lane has its own copy of the table (bank = lane), so the loads never conflict.
//
// Layout (bitsandbytes' 4-bit format, blocksize 64): row n's byte c holds k = 2c in its high nibble, 2c + 1 in
// its low nibble. A program takes 16 rows (a tile) at a time, and its warps split the row into spans of two
// quantization blocks (64 bytes a row): lane (g = lane / 4, t = lane % 4) reads bytes [16t, 16t + 16) of rows g
// and g + 8, so lanes t = 0, 1 hold the span's first block and t = 2, 3 its second. The sum over k is order-free:
// the lane's byte i is the k pair (2t, 2t + 1) of mma i / 2 (i even) or (2t + 8, 2t + 9) (i odd), and x sits in
// B the same way, except that B's columns 0-3 keep only the first block's x and columns 4-7 only the second's
// (the other lanes read zeros). So output column 2t is the sum over the lane's own block, which the lane scales
// by that block's absmax. The warps add their sums in shared memory at the end of each tile.
//
// Programs are persistent (CTAS per multiprocessor, tiles blockIdx.x, + gridDim.x, ...), so the table is filled
// once per program. Each warp keeps RING spans of codes in flight in registers, across tile ends. A tile's scales
// are read once, coalesced, and decoded into shared memory (the next tile's are in flight during this one), so
// that a lane's scale is one conflict-free shared load. Codes are rounded to bf16 in the table (bitsandbytes'
// gemv does the same); scales, products and sums are fp32.
//
// Needs: sm_80 or newer (bf16 mma), in_features % 128 == 0, out_features % 16 == 0, 16-byte-aligned rows and x.

typedef unsigned int u32;
typedef unsigned char u8;
typedef unsigned short u16;

#define LUT_BYTES 65536  // entry e (a byte of codes) of lane L at e * 256 + 4 * L: one PRMT forms the offset

__device__ __forceinline__ u32 bf16_bits(float f) {  // round to nearest even (codes are finite)
    u32 b = __float_as_uint(f);
    return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ u32 lookup(const char* table, u32 word, u32 lane4, u32 selector) {
    // byte 0: lane * 4, byte 1: the weight byte, bytes 2-3: zero -> e * 256 + 4 * lane
    return *reinterpret_cast<const u32*>(table + __byte_perm(word, lane4, selector));
}

__device__ __forceinline__ void mma(float& c0, float& c1, float& c2, float& c3, u32 a0, u32 a1, u32 a2, u32 a3,
                                    u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Compiled per weight shape and setting, with these defined (-D): BLOCKS (quantization blocks per row, K / 64),
// WARPS (per program), CTAS (programs per multiprocessor), RING (spans a warp keeps in flight), NESTED (1: absmax are 8-bit codes, bitsandbytes'
// double quantization) and NESTED_SHIFT (log2 of the nested block size). Constant bounds let loops unroll.
#define SPANS (BLOCKS / 2)
#define ITEMS ((SPANS + WARPS - 1) / WARPS)                    // a warp's spans per tile (some may be past the row)
#define TILE_SCALES (16 * BLOCKS)                              // a tile's absmax: contiguous in memory
#define SCALES_PER_THREAD ((TILE_SCALES + WARPS * 32 - 1) / (WARPS * 32))
#define SCALE_STRIDE (BLOCKS + 2)                              // a row of decoded scales in shared memory (no conflicts)

extern "C" __global__ void __launch_bounds__(WARPS * 32, CTAS) nf4_gemv_mma(
    const u16* __restrict__ x,              // [K] bf16, 16-byte aligned
    const u8* __restrict__ packed,          // [N, K / 2]
    const void* __restrict__ absmax,        // NESTED: u8 [N * BLOCKS]; else fp32 [N * BLOCKS]
    const float* __restrict__ code,         // [16]
    const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code,  // [256]
    const float* __restrict__ offset,       // [1]
    u16* __restrict__ out,                  // [N] bf16
    int tiles) {                            // N / 16
    // shared: the table (64 KB); x (K bf16) and 64 zero bytes; the nested codes (256 fp32); per tile parity, the
    // decoded scales (16 x SCALE_STRIDE fp32) and the warps' row sums (WARPS x 16 fp32)
    extern __shared__ __align__(16) char smem[];
    u16* xs = reinterpret_cast<u16*>(smem + LUT_BYTES);
    float* ncode = reinterpret_cast<float*>(xs + BLOCKS * 64 + 32);
    float* scl = ncode + 256;
    float* sums = scl + 2 * 16 * SCALE_STRIDE;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, half = t >> 1;  // half: the lane's block in a span
    const int my_tiles = (tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    const int items = my_tiles * ITEMS;
#if NESTED
    typedef u8 scale_t;
#else
    typedef float scale_t;
#endif
    const scale_t* scales = reinterpret_cast<const scale_t*>(absmax);

    // A tile's scales: this thread's share (i = threadIdx.x + WARPS * 32 * c), loaded a tile ahead
    scale_t sq[SCALES_PER_THREAD];
    float sn[SCALES_PER_THREAD];
#define LOAD_SCALES(j)                                                                               \
    if ((j) < my_tiles) {                                                                            \
        const int first_ = ((int)blockIdx.x + (int)gridDim.x * (j)) * TILE_SCALES;                   \
        _Pragma("unroll") for (int c = 0; c < SCALES_PER_THREAD; ++c) {                              \
            const int i_ = threadIdx.x + WARPS * 32 * c;                                             \
            if (TILE_SCALES % (WARPS * 32) == 0 || i_ < TILE_SCALES) {                               \
                sq[c] = __ldg(scales + first_ + i_);                                                 \
                if (NESTED) sn[c] = __ldg(nested_absmax + ((first_ + i_) >> NESTED_SHIFT));          \
            }                                                                                        \
        }                                                                                            \
    }
#if NESTED
#define DECODE(c) (ncode[sq[c]] * sn[c] + shift)
#else
#define DECODE(c) (sq[c])
#endif
#define STORE_SCALES(j)                                                                              \
    if ((j) < my_tiles) {                                                                            \
        float* to_ = scl + ((j) & 1) * 16 * SCALE_STRIDE;                                            \
        _Pragma("unroll") for (int c = 0; c < SCALES_PER_THREAD; ++c) {                              \
            const int i_ = threadIdx.x + WARPS * 32 * c;                                             \
            if (TILE_SCALES % (WARPS * 32) == 0 || i_ < TILE_SCALES)                                 \
                to_[(i_ / BLOCKS) * SCALE_STRIDE + i_ % BLOCKS] = DECODE(c);                         \
        }                                                                                            \
    }

    // Slot r of the ring holds item it: span warp + WARPS * (it % ITEMS) of tile blockIdx.x + gridDim.x * (it / ITEMS),
    // the lane's 16 bytes of rows g and g + 8.
    uint4 q0[RING], q1[RING];
#define LOAD(r, it)                                                                                  \
    {                                                                                                \
        const int j_ = (it) / ITEMS, sp_ = warp + WARPS * ((it) - j_ * ITEMS);                       \
        if ((it) < items && (SPANS % WARPS == 0 || sp_ < SPANS)) {                                   \
            const int row_ = ((int)blockIdx.x + (int)gridDim.x * j_) * 16 + g;                       \
            const u8* w_ = packed + (long)row_ * (BLOCKS * 32) + sp_ * 64 + t * 16;                  \
            q0[r] = __ldg(reinterpret_cast<const uint4*>(w_));                                       \
            q1[r] = __ldg(reinterpret_cast<const uint4*>(w_ + 8 * BLOCKS * 32));                     \
        }                                                                                            \
    }
#pragma unroll
    for (int r = 0; r < RING; ++r) LOAD(r, r)  // in flight while the tables are filled
    LOAD_SCALES(0)

    for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {  // the table: entry e, lanes 4j..4j+3 per store
        const int e = i >> 3;
        const u32 pair = bf16_bits(__ldg(code + (e >> 4))) | (bf16_bits(__ldg(code + (e & 15))) << 16);
        *reinterpret_cast<uint4*>(smem + e * 256 + (i & 7) * 16) = make_uint4(pair, pair, pair, pair);
    }
    for (int i = threadIdx.x; i < BLOCKS * 8 + 4; i += WARPS * 32)
        reinterpret_cast<uint4*>(xs)[i] = i < BLOCKS * 8 ? __ldg(reinterpret_cast<const uint4*>(x) + i) : make_uint4(0, 0, 0, 0);
#if NESTED
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) ncode[i] = __ldg(nested_code + i);
    const float shift = __ldg(offset);
    __syncthreads();  // ncode, before the first decode
#endif
    STORE_SCALES(0)
    LOAD_SCALES(1)
    __syncthreads();

    const u32 lane4 = lane * 4;
    // B's column g keeps x of the first block (g < 4) or the second (g >= 4): the other lanes read the zeros
    const bool keep = (t < 2) == (g < 4);
    const u16* xl = keep ? xs + t * 32 : xs + BLOCKS * 64;
    const int xstep = keep ? 128 : 0;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int base = 0; base < items; base += RING) {
#pragma unroll
        for (int r = 0; r < RING; ++r) {
            const int it = base + r;
            if (it >= items) break;
            const int j = it / ITEMS, i = it - j * ITEMS, sp = warp + WARPS * i;
            if (SPANS % WARPS == 0 || sp < SPANS) {
                const uint4 c0 = q0[r], c1 = q1[r];
                LOAD(r, it + RING)  // the slot's next item goes in flight before this one is worked
                const float* sc = scl + (j & 1) * 16 * SCALE_STRIDE + g * SCALE_STRIDE + 2 * sp + half;
                const float f0 = sc[0], f1 = sc[8 * SCALE_STRIDE];
                const uint4* xv = reinterpret_cast<const uint4*>(xl + sp * xstep);
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma unroll
                for (int h = 0; h < 4; ++h) {  // x pairs 4h..4h+3 go with bytes 4h..4h+3 (register h of the rows)
                    const uint4 xp = xv[h];
                    const u32 r0 = h == 0 ? c0.x : h == 1 ? c0.y : h == 2 ? c0.z : c0.w;
                    const u32 r1 = h == 0 ? c1.x : h == 1 ? c1.y : h == 2 ? c1.z : c1.w;
                    mma(d0, d1, d2, d3, lookup(smem, r0, lane4, 0x5504u), lookup(smem, r1, lane4, 0x5504u),
                        lookup(smem, r0, lane4, 0x5514u), lookup(smem, r1, lane4, 0x5514u), xp.x, xp.y);
                    mma(d0, d1, d2, d3, lookup(smem, r0, lane4, 0x5524u), lookup(smem, r1, lane4, 0x5524u),
                        lookup(smem, r0, lane4, 0x5534u), lookup(smem, r1, lane4, 0x5534u), xp.z, xp.w);
                }
                acc0 += d0 * f0;  // column 2t of rows g and g + 8: the sum over the lane's own block
                acc1 += d2 * f1;
            } else {
                LOAD(r, it + RING)
            }
            if (i == ITEMS - 1) {  // the tile's last span: add the warps' sums up; the next tile's scales go in
                float* part = sums + (j & 1) * WARPS * 16;
                acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);  // the span's two blocks: lanes t and t ^ 2
                acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
                if (t == 0) {
                    part[warp * 16 + g] = acc0;
                    part[warp * 16 + g + 8] = acc1;
                }
                acc0 = acc1 = 0.0f;
                STORE_SCALES(j + 1)
                LOAD_SCALES(j + 2)
                __syncthreads();
                if (threadIdx.x < 16) {
                    float total = 0.0f;
                    for (int w = 0; w < WARPS; ++w) total += part[w * 16 + threadIdx.x];
                    out[((int)blockIdx.x + (int)gridDim.x * j) * 16 + threadIdx.x] = (u16)bf16_bits(total);
                }
            }
        }
    }
}
