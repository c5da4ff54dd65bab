/* CPU kernels for the bitsandbytes NF4 format.
 *
 * Plain C with no Python or libtorch dependency: the wrapper in cpu.py calls these through ctypes
 * (which releases the GIL) from a small thread pool, each call covering a range of blocks. GCC's
 * target_clones picks an AVX-512 / AVX2 / baseline body at load time, so one build runs anywhere.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LNF4_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LNF4_CLONES
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even, as torch's float -> bfloat16 cast does for finite values. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- 4-bit quantize ------------------------------------------------------------------------ */
/* mids: the 15 ascending thresholds; a value equal to a threshold takes the lower code.
 * The last block of a tensor whose size is not a multiple of blocksize is normalised by division,
 * full blocks by multiplication with the reciprocal: that is what the bitsandbytes reference does. */
#define QUANT_BODY(T, LOAD)                                                                          \
    for (int64_t b = block_begin; b < block_end; ++b) {                                              \
        const int64_t start = b * blocksize;                                                         \
        const int64_t stop = start + blocksize < n ? start + blocksize : n;                          \
        float amax = 0.0f;                                                                           \
        for (int64_t i = start; i < stop; ++i) {                                                     \
            float v = LOAD(x[i]);                                                                    \
            v = v == v ? (v < 0 ? -v : v) : INFINITY; /* NaN flags the block as non-finite */      \
            amax = v > amax ? v : amax;                                                              \
        }                                                                                            \
        absmax[b] = amax;                                                                            \
        const float safe = amax > 1e-38f ? amax : 1e-38f;                                            \
        const float inv = 1.0f / safe;                                                               \
        const int partial = (stop - start) < blocksize;                                              \
        uint8_t codes[4097];                                                                         \
        const int64_t len = stop - start;                                                            \
        for (int64_t i = 0; i < len; ++i) {                                                          \
            float s = partial ? LOAD(x[start + i]) / safe : LOAD(x[start + i]) * inv;                \
            int q = 0;                                                                               \
            for (int k = 0; k < 15; ++k) q += s > mids[k];                                           \
            codes[i] = (uint8_t)q;                                                                   \
        }                                                                                            \
        if (len & 1) codes[len] = (uint8_t)zero_code;                                                \
        uint8_t* dst = packed + start / 2;                                                           \
        for (int64_t j = 0; j < (len + 1) / 2; ++j)                                                  \
            dst[j] = (uint8_t)((codes[2 * j] << 4) | codes[2 * j + 1]);                              \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
#define LOAD_F16(v) ((float)(v))

LNF4_CLONES void lnf4_quantize_4bit_f32(const float* x, int64_t n, int64_t blocksize, const float* mids,
                                       int zero_code, uint8_t* packed, float* absmax,
                                       int64_t block_begin, int64_t block_end) {
    QUANT_BODY(float, LOAD_F32)
}

LNF4_CLONES void lnf4_quantize_4bit_bf16(const uint16_t* x, int64_t n, int64_t blocksize,
                                        const float* mids, int zero_code, uint8_t* packed,
                                        float* absmax, int64_t block_begin, int64_t block_end) {
    QUANT_BODY(uint16_t, LOAD_BF16)
}

LNF4_CLONES void lnf4_quantize_4bit_f16(const _Float16* x, int64_t n, int64_t blocksize,
                                       const float* mids, int zero_code, uint8_t* packed,
                                       float* absmax, int64_t block_begin, int64_t block_end) {
    QUANT_BODY(_Float16, LOAD_F16)
}

/* ---- 4-bit dequantize ---------------------------------------------------------------------- */
/* Scales are either fp32 (absmax) or double-quantized: nested_code[q] * nested_absmax[b / nb] + offset,
 * two roundings as in the reference. Per block, the 16 possible outputs code[k] * scale are rounded
 * to the output type once; each byte then expands to two table lookups, which equals rounding
 * code * scale per element. 16-bit outputs take the AVX-512 path below where the CPU has it. */
typedef struct {
    const float* absmax;        /* fp32 scales, or NULL when double-quantized */
    const uint8_t* qabsmax;     /* uint8 nested codes */
    const float* nested_absmax;
    const float* nested_code;
    float offset;
    int64_t nested_blocksize;
} lnf4_scales;

static inline float block_scale(const lnf4_scales* s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    volatile float decoded = s->nested_code[s->qabsmax[b]] * s->nested_absmax[b / s->nested_blocksize];
    return decoded + s->offset;
}

#define DEQUANT_BODY(T, STORE)                                                                              \
    for (int64_t b = block_begin; b < block_end; ++b) {                                              \
        const int64_t start = b * blocksize;                                                         \
        const int64_t stop = start + blocksize < n ? start + blocksize : n;                          \
        const float a = block_scale(scales, b);                                                      \
        T table[16];                                                                                 \
        for (int k = 0; k < 16; ++k) table[k] = STORE(code[k] * a);                                  \
        const uint8_t* src = packed + start / 2;                                                     \
        T* o = out + start;                                                                          \
        const int64_t pairs = (stop - start) / 2;                                                    \
        int64_t j = 0;                                                                               \
        for (; j < pairs; ++j) {                                                                     \
            const uint8_t byte = src[j];                                                             \
            o[2 * j] = table[byte >> 4];                                                             \
            o[2 * j + 1] = table[byte & 15];                                                         \
        }                                                                                            \
        if ((stop - start) & 1) o[2 * pairs] = table[src[pairs] >> 4];                               \
    }

#define STORE_F32(v) (v)
#define STORE_BF16(v) f32_to_bf16(v)
#define STORE_F16(v) ((_Float16)(v))

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* AVX-512 for 16-bit outputs, one block at a time: the 16 outputs code[k] * scale are rounded in one
 * register (bf16: round-to-nearest-even on the bits; fp16: the hardware conversion), then every 16
 * input bytes expand through two permutes into one 32-bit word per byte (even element low). */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static void dequant16_avx512(
    const uint8_t* packed, const lnf4_scales* scales, const float* code, int64_t n, int64_t blocksize,
    uint16_t* out, int64_t block_begin, int64_t block_end, int is_bf16) {
    const __m512 code_v = _mm512_loadu_ps(code);
    const __m512i low_mask = _mm512_set1_epi32(15);
    for (int64_t b = block_begin; b < block_end; ++b) {
        const int64_t start = b * blocksize;
        const int64_t stop = start + blocksize < n ? start + blocksize : n;
        const __m512 prod = _mm512_mul_ps(code_v, _mm512_set1_ps(block_scale(scales, b)));
        __m512i lut;
        if (is_bf16) {
            __m512i u = _mm512_castps_si512(prod);
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
            lut = _mm512_srli_epi32(u, 16);
        } else {
            lut = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        const uint8_t* src = packed + start / 2;
        uint16_t* o = out + start;
        const int64_t pairs = (stop - start) / 2;
        int64_t j = 0;
        for (; j + 16 <= pairs; j += 16) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + j)));
            __m512i even = _mm512_permutexvar_epi32(_mm512_srli_epi32(bytes, 4), lut);
            __m512i odd = _mm512_permutexvar_epi32(_mm512_and_si512(bytes, low_mask), lut);
            _mm512_storeu_si512((void*)(o + 2 * j), _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
        }
        if (j < pairs || ((stop - start) & 1)) { /* tail of a partial block: scalar */
            uint32_t t[16];
            _mm512_storeu_si512((void*)t, lut);
            for (; j < pairs; ++j) {
                o[2 * j] = (uint16_t)t[src[j] >> 4];
                o[2 * j + 1] = (uint16_t)t[src[j] & 15];
            }
            if ((stop - start) & 1) o[2 * pairs] = (uint16_t)t[src[pairs] >> 4];
        }
    }
}
static int lnf4_has_avx512 = -1;
/* Tests call this with 0 to run the portable paths on a machine that has AVX-512, -1 to detect again. */
void lnf4_set_avx512(int enabled) { lnf4_has_avx512 = enabled; }
static inline int has_avx512(void) {
    if (lnf4_has_avx512 < 0)
        lnf4_has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
    return lnf4_has_avx512;
}
#define TRY_AVX512(is_bf16)                                                                          \
    if (has_avx512()) {                                                                              \
        dequant16_avx512(packed, scales, code, n, blocksize, (uint16_t*)out, block_begin, block_end, \
                         is_bf16);                                                                   \
        return;                                                                                      \
    }
#else
#define TRY_AVX512(is_bf16)
#endif

void lnf4_dequantize_4bit_f32(const uint8_t* packed, const lnf4_scales* scales, const float* code,
                              int64_t n, int64_t blocksize, float* out, int64_t block_begin,
                              int64_t block_end) {
    DEQUANT_BODY(float, STORE_F32)
}

void lnf4_dequantize_4bit_bf16(const uint8_t* packed, const lnf4_scales* scales, const float* code,
                               int64_t n, int64_t blocksize, uint16_t* out, int64_t block_begin,
                               int64_t block_end) {
    TRY_AVX512(1)
    DEQUANT_BODY(uint16_t, STORE_BF16)
}

void lnf4_dequantize_4bit_f16(const uint8_t* packed, const lnf4_scales* scales, const float* code,
                              int64_t n, int64_t blocksize, _Float16* out, int64_t block_begin,
                              int64_t block_end) {
    TRY_AVX512(0)
    DEQUANT_BODY(_Float16, STORE_F16)
}

/* ---- 1-token gemv, straight from the packed codes ---------------------------------------------- */
/* out[r] = sum over blocks b of row r: scale(b) * sum_j code[q_j] * x_j, in fp32. Byte p of a row holds
 * the codes of x[2p] (high nibble) and x[2p + 1] (low nibble). x comes in one of two layouts:
 *  - x_pairs (a bf16 x read in place as 32-bit words): x[2p] is the low half of word p, x[2p + 1] the
 *    high half, so even and odd elements are a shift and a mask apart;
 *  - x_even / x_odd (any other dtype, converted to fp32 and split by the caller).
 * Rows [row_begin, row_end); in_features is a whole number of blocks and blocksize a multiple of 32.
 * Decoding reads a quarter of the bytes a bf16 matvec does and writes no dequantized copy. Each layout
 * has its own entry point; both share the bodies below, inlined with the layout fixed. */
#define GEMV_ARGS                                                                                  \
    const uint8_t *packed, const lnf4_scales *scales, const float *code, const uint32_t *x_pairs, \
        const float *x_even, const float *x_odd, int64_t in_features, int64_t blocksize, float *out,  \
        int64_t row_begin, int64_t row_end
#define GEMV_PASS packed, scales, code, x_pairs, x_even, x_odd, in_features, blocksize, out, row_begin, row_end

static inline __attribute__((always_inline)) void gemv_rows(GEMV_ARGS) {
    const int64_t blocks_per_row = in_features / blocksize, half = blocksize / 2;
    for (int64_t r = row_begin; r < row_end; ++r) {
        float acc = 0.f;
        for (int64_t bb = 0; bb < blocks_per_row; ++bb) {
            const int64_t b = r * blocks_per_row + bb;
            const uint8_t* src = packed + b * half;
            float sum = 0.f;
            for (int64_t j = 0, p = bb * half; j < half; ++j, ++p) {
                const float even = x_pairs ? bf16_to_f32((uint16_t)(x_pairs[p] & 0xFFFFu)) : x_even[p];
                const float odd = x_pairs ? bf16_to_f32((uint16_t)(x_pairs[p] >> 16)) : x_odd[p];
                sum += code[src[j] >> 4] * even + code[src[j] & 15] * odd;
            }
            acc += sum * block_scale(scales, b);
        }
        out[r] = acc;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
/* AVX-512: the 16-entry table in one register, 16 bytes (32 elements) per permute pair. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline void gemv_rows_avx512(GEMV_ARGS) {
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i low_mask = _mm512_set1_epi32(15), high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const int64_t blocks_per_row = in_features / blocksize, half = blocksize / 2;
    for (int64_t r = row_begin; r < row_end; ++r) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t bb = 0; bb < blocks_per_row; ++bb) {
            const int64_t b = r * blocks_per_row + bb;
            const uint8_t* src = packed + b * half;
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0, p = bb * half; j < half; j += 16, p += 16) {
                __m512 even, odd;
                if (x_pairs) {
                    const __m512i words = _mm512_loadu_si512((const void*)(x_pairs + p));
                    even = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
                    odd = _mm512_castsi512_ps(_mm512_and_si512(words, high_half));
                } else {
                    even = _mm512_loadu_ps(x_even + p);
                    odd = _mm512_loadu_ps(x_odd + p);
                }
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + j)));
                sum = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), even, sum);
                sum = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), table), odd, sum);
            }
            acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(block_scale(scales, b)), acc);
        }
        out[r] = _mm512_reduce_add_ps(acc);
    }
}
/* One specialisation per layout (x_pairs a constant NULL or not), so the layout test leaves the loops. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void gemv_avx512_pairs(GEMV_ARGS) {
    (void)x_even, (void)x_odd;
    gemv_rows_avx512(packed, scales, code, x_pairs, NULL, NULL, in_features, blocksize, out, row_begin, row_end);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void gemv_avx512_split(GEMV_ARGS) {
    (void)x_pairs;
    gemv_rows_avx512(packed, scales, code, NULL, x_even, x_odd, in_features, blocksize, out, row_begin, row_end);
}
#define GEMV_TRY_AVX512(fn)   \
    if (has_avx512()) {       \
        fn(GEMV_PASS);        \
        return;               \
    }
#else
#define GEMV_TRY_AVX512(fn)
#endif

void lnf4_gemv_4bit(const uint8_t* packed, const lnf4_scales* scales, const float* code,
                    const float* x_even, const float* x_odd, int64_t in_features, int64_t blocksize,
                    float* out, int64_t row_begin, int64_t row_end) {
    const uint32_t* x_pairs = NULL;
    GEMV_TRY_AVX512(gemv_avx512_split)
    gemv_rows(packed, scales, code, NULL, x_even, x_odd, in_features, blocksize, out, row_begin, row_end);
}

void lnf4_gemv_4bit_bf16x(const uint8_t* packed, const lnf4_scales* scales, const float* code,
                          const uint32_t* x_pairs, int64_t in_features, int64_t blocksize, float* out,
                          int64_t row_begin, int64_t row_end) {
    const float *x_even = NULL, *x_odd = NULL;
    GEMV_TRY_AVX512(gemv_avx512_pairs)
    gemv_rows(packed, scales, code, x_pairs, NULL, NULL, in_features, blocksize, out, row_begin, row_end);
}

/* Keeps the file a valid CPython extension, so setuptools builds and names it like any other. */
#ifdef LNF4_PYTHON_MODULE
#include <Python.h>
static struct PyModuleDef lnf4_module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&lnf4_module); }
#endif
