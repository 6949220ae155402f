/* What tiny-knn's compiled kernels share: the packed keys and pools of the selection, the exact scores, the CPU
 * features (probed once at load), the panel sizes of the packed products, and the floating-point state that
 * exact scores are computed in.
 *
 * The files: select.c (the module, the selection: pools, compaction, threshold scans), exact.c (the exact
 * score of a pair, on every CPU), product.c (the float32 AVX-512 product), screen.c (the screen: estimates
 * within a proven bound, and exact scores for the pairs the bound cannot rule out). Python calls them through
 * ctypes, which releases the GIL, so row ranges run on several threads.
 */
#ifndef TK_H
#define TK_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TK_X86 1 /* the x86 kernels are compiled per function (target attribute) and chosen at run time */
#endif

/* Panels of the packed products (float32 and bfloat16 alike): query rows and doc rows per micro-kernel call.
 * Exported by tk_panels and checked from Python. */
#define TK_MR 8
#define TK_NR 32

/* CPU features (tk_cpu). TINY_KNN_NO_AVX512 and TINY_KNN_NO_AVX2, read once at load, hide the wider ones
 * (tests use them to run the narrower code on a wide CPU). */
enum { TK_HAS_AVX2_FMA = 1, TK_HAS_AVX512 = 2, TK_HAS_AVX512BW = 4, TK_HAS_AVX512BF16 = 8 };
int tk_cpu(void);

/* ---- Keys: (score descending, doc ascending) as one 64-bit integer, smallest first. */

static inline uint64_t tk_key(float score, uint32_t doc)
{
    uint32_t bits;
    score += 0.0f; /* -0.0 -> +0.0, so that equal scores compare equal */
    memcpy(&bits, &score, sizeof bits);
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u); /* monotone: larger score, larger bits */
    return ((uint64_t)(~bits) << 32) | (uint64_t)doc;
}

static inline float tk_key_score(uint64_t key)
{
    uint32_t bits = ~(uint32_t)(key >> 32);
    float score;
    bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
    memcpy(&score, &bits, sizeof score);
    return score;
}

void tk_select_nth(uint64_t *keys, int64_t n, int64_t nth);
int64_t tk_compact(uint64_t *pool, int64_t n, int64_t k, float *threshold);

/* Appends (score, doc) to a row's pool if it beats the threshold, compacting a full pool first. Returns the
 * threshold, which compaction may have raised. */
static inline float tk_push(uint64_t *pool, int64_t capacity, int32_t *fill, int64_t k, float threshold, float score,
                            uint32_t doc)
{
    if (*fill == capacity) {
        *fill = (int32_t)tk_compact(pool, capacity, k, &threshold);
        if (!(score > threshold)) return threshold;
    }
    pool[(*fill)++] = tk_key(score, doc);
    return threshold;
}

/* ---- Excluded pairs: each row's excluded docs, ascending, at docs[offsets[r]..offsets[r + 1]) (exclusions.py);
 * offsets NULL where nothing is excluded. Excluded pairs are never offered to the selection, nor seed it. */

/* The first position in list[0..n) whose doc is at least `doc`. */
static inline int64_t tk_lower_bound(const int64_t *list, int64_t n, int64_t doc)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (list[mid] < doc) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Bit i set where doc first + i (i < 32) is excluded for the row. */
static inline uint32_t tk_excluded32(const int64_t *offsets, const int64_t *docs, int64_t row, int64_t first)
{
    if (!offsets) return 0;
    const int64_t *list = docs + offsets[row];
    int64_t n = offsets[row + 1] - offsets[row];
    uint32_t mask = 0;
    for (int64_t i = tk_lower_bound(list, n, first); i < n && list[i] < first + 32; i++) mask |= 1u << (list[i] - first);
    return mask;
}

static inline int tk_is_excluded(const int64_t *offsets, const int64_t *docs, int64_t row, int64_t doc)
{
    if (!offsets) return 0;
    const int64_t *list = docs + offsets[row];
    int64_t n = offsets[row + 1] - offsets[row], at = tk_lower_bound(list, n, doc);
    return at < n && list[at] == doc;
}

/* ---- Exact scores (exact.c): the one definition of a score in tiny-knn.
 * ip and cosine: tk_dot, dimension i in lane i mod 16 of accumulator (i / 16) mod 4, each lane a float32 fused
 * multiply-add chain in order of i, then the fixed tree (a0 + a1) + (a2 + a3) and halves; the same bits on every
 * CPU (AVX-512, AVX2 with FMA, portable C with fmaf). l2: tk_l2, the float64 sum of (q - d)^2 in TK_LANES
 * interleaved lanes and a fixed tree, rounded once to float32. */
#define TK_LANES 8
float tk_dot(const float *a, const float *b, int64_t dim);
float tk_l2(const float *a, const float *b, int64_t dim);

/* Exact scores need IEEE arithmetic: round to nearest, subnormals kept. A library may leave flush-to-zero or
 * denormals-are-zero set on a thread (its MXCSR); every exported function that computes exact scores sets the
 * state it needs for its duration. */
#ifdef TK_X86
typedef unsigned int tk_fpstate;
static inline tk_fpstate tk_ieee_begin(void)
{
    tk_fpstate saved = _mm_getcsr();
    _mm_setcsr(saved & ~(0x8000u | 0x0040u | 0x6000u)); /* FTZ, DAZ off; round to nearest */
    return saved;
}
static inline void tk_ieee_end(tk_fpstate saved) { _mm_setcsr(saved); }
#else
typedef int tk_fpstate;
static inline tk_fpstate tk_ieee_begin(void) { return 0; }
static inline void tk_ieee_end(tk_fpstate saved) { (void)saved; }
#endif

/* ---- AVX-512 pieces shared by the threshold scan and both screens. */
#ifdef TK_X86
#define TK_AVX512 __attribute__((target("avx512f,popcnt")))

/* Lanes [0, n) of 16 (none for n <= 0, all for n >= 16). */
static inline __mmask16 tk_first_lanes(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* The lanes of mask where x is NaN or infinite (x - x is NaN there, 0 elsewhere). */
TK_AVX512 static inline __mmask16 tk_non_finite(__mmask16 mask, __m512 x)
{
    return _mm512_mask_cmp_ps_mask(mask, _mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_NEQ_UQ);
}

/* Stores the keys of the lanes of `mask` (docs first_doc + lane) at `end`, in lane order. Returns their count. */
TK_AVX512 static inline int64_t tk_append16_avx512(__m512 scores, __mmask16 mask, uint32_t first_doc, uint64_t *end)
{
    /* tk_key, lane by lane: bits of score + 0, flipped to sort descending; the doc index below them */
    __m512i bits = _mm512_castps_si512(_mm512_add_ps(scores, _mm512_setzero_ps()));
    __m512i sign = _mm512_srai_epi32(bits, 31);
    __m512i high = _mm512_xor_si512(bits, _mm512_andnot_si512(sign, _mm512_set1_epi32(0x7fffffff)));
    __m512i docs = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32((int)first_doc));
    __m512i low_keys = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(high)), 32),
                                       _mm512_cvtepu32_epi64(_mm512_castsi512_si256(docs)));
    __m512i high_keys =
        _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(high, 1)), 32),
                        _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(docs, 1)));
    __mmask8 low = (__mmask8)mask, upper = (__mmask8)(mask >> 8);
    int64_t count = __builtin_popcount(low);
    _mm512_storeu_si512(end, _mm512_maskz_compress_epi64(low, low_keys));
    _mm512_storeu_si512(end + count, _mm512_maskz_compress_epi64(upper, high_keys));
    return count + __builtin_popcount(upper);
}

/* Appends the lanes of (s0, s1) in (valid0, valid1) that beat the threshold, as docs doc.. (s1's from doc + 16),
 * compacting first if fewer than 32 slots are free (needs capacity >= k + 128: a compaction keeps at most
 * (n + k) / 2 keys, which leaves (capacity - k) / 2 >= 64 free). Returns the keys appended. */
TK_AVX512 static inline int64_t tk_append32_avx512(__m512 s0, __m512 s1, __mmask16 valid0, __mmask16 valid1,
                                                   uint32_t doc, float *threshold, uint64_t *pool, int64_t capacity,
                                                   int32_t *fill, int64_t k)
{
    __m512 t = _mm512_set1_ps(*threshold);
    __mmask16 m0 = _mm512_mask_cmp_ps_mask(valid0, s0, t, _CMP_GT_OQ);
    __mmask16 m1 = _mm512_mask_cmp_ps_mask(valid1, s1, t, _CMP_GT_OQ);
    if (!(m0 | m1)) return 0;
    int64_t n = *fill;
    if (capacity - n < 32) {
        n = tk_compact(pool, n, k, threshold);
        t = _mm512_set1_ps(*threshold);
        m0 = _mm512_mask_cmp_ps_mask(valid0, s0, t, _CMP_GT_OQ);
        m1 = _mm512_mask_cmp_ps_mask(valid1, s1, t, _CMP_GT_OQ);
    }
    int64_t added = tk_append16_avx512(s0, m0, doc, pool + n);
    added += tk_append16_avx512(s1, m1, doc + 16, pool + n + added);
    *fill = (int32_t)(n + added);
    return added;
}

/* The TK_MR x TK_NR float32 estimates of a packed query panel by a packed doc panel (tk_pack), left in acc. */
TK_AVX512 static inline __attribute__((always_inline)) void tk_micro_f32(const float *a, const float *b, int64_t dim,
                                                                         __m512 acc[TK_MR][2])
{
    for (int i = 0; i < TK_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        __m512 b0 = _mm512_loadu_ps(b + d * TK_NR), b1 = _mm512_loadu_ps(b + d * TK_NR + 16);
        for (int i = 0; i < TK_MR; i++) {
            __m512 ai = _mm512_set1_ps(a[d * TK_MR + i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
}

/* tk_dot with AVX-512 (the definition above, sixteen lanes to a register), for inlining into the screens. */
TK_AVX512 static inline float tk_dot_avx512(const float *a, const float *b, int64_t dim)
{
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 64 <= dim; i += 64)
        for (int c = 0; c < 4; c++)
            acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16 * c), _mm512_loadu_ps(b + i + 16 * c), acc[c]);
    for (int c = 0; c < 4 && i + 16 * c < dim; c++) {
        __mmask16 m = tk_first_lanes(dim - i - 16 * c);
        acc[c] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i + 16 * c), _mm512_maskz_loadu_ps(m, b + i + 16 * c),
                                       acc[c], m);
    }
    __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(sum),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
}

/* tk_dot_avx512 of one query row with four doc rows at once, each in exactly tk_dot's order (so the same bits):
 * the query's values are loaded once for the four, and the four chains of additions overlap. */
TK_AVX512 static inline void tk_dot4_avx512(const float *q, const float *const d[4], int64_t dim, float out[4])
{
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= dim; i += 64)
        for (int c = 0; c < 4; c++) {
            __m512 x = _mm512_loadu_ps(q + i + 16 * c);
            for (int r = 0; r < 4; r++) acc[r][c] = _mm512_fmadd_ps(x, _mm512_loadu_ps(d[r] + i + 16 * c), acc[r][c]);
        }
    for (int c = 0; c < 4 && i + 16 * c < dim; c++) {
        __mmask16 m = tk_first_lanes(dim - i - 16 * c);
        __m512 x = _mm512_maskz_loadu_ps(m, q + i + 16 * c);
        for (int r = 0; r < 4; r++)
            acc[r][c] = _mm512_mask3_fmadd_ps(x, _mm512_maskz_loadu_ps(m, d[r] + i + 16 * c), acc[r][c], m);
    }
    for (int r = 0; r < 4; r++) {
        __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
        __m256 half = _mm256_add_ps(_mm512_castps512_ps256(sum),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
        __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
        quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
        quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
        out[r] = _mm_cvtss_f32(quarter);
    }
}
#endif

#endif
