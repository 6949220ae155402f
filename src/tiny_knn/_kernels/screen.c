/* The screen: exact answers from estimates. Every (query, doc) score is first estimated, by any of the
 * estimators (a bfloat16 product, VDPBF16PS; the float32 product of product.c; or, from a tile in memory, a
 * BLAS's float32 or bfloat16 product), and only pairs whose estimate comes within a proven bound of their row's
 * k-th best exact score so far are scored exactly (tk_dot, or tk_l2) and offered to the selection. Every other
 * pair provably scores below the threshold, so the answer is that of scoring every pair exactly, whatever the
 * estimator: the estimates decide only which pairs are scored.
 *
 * The bound, for inner products. An estimate is within slack(q, d) = a_q n_d + b_q r_d of the exact score
 * tk_dot(q, d), from two factors per row computed as rows are prepared (tk_prepare_rows):
 * - float32 estimators: any order of float32 sums of the dim products, with or without FMA, is within
 *   gamma |q| |d| of q.d (gamma = dim u / (1 - dim u), u = 2^-24; Higham, Accuracy and Stability of Numerical
 *   Algorithms, 2nd ed., section 3.1), and so is tk_dot: a_q = 2 gamma' |q|, n_d = |d|, b_q = r_d = 0, with
 *   gamma' = (dim + 8) u, generous.
 * - bfloat16 estimators: the rows rounded to bfloat16 (to nearest even; subnormals flushed to zero, as VDPBF16PS
 *   and AMX read them) give q~.d~ - q.d = (q~ - q).d~ + q.(d~ - d), at most r_q |d~| + |q| r_d, where r_x is what
 *   rounding moved the row; the products of bfloat16 values are exact in float32, and their float32 sums are
 *   within gamma as above: a_q = r_q + 2 gamma' |q|, n_d = |d|, b_q = |q|, r_d = r_d. Hardware that flushes
 *   subnormal products or sums moves each step by at most 2^-126: a_q is floored at 4 (dim + 8) 2^-86, with norms
 *   floored at 2^-40. Norms are max(|x|, |x~|), summed in double and rounded up.
 * Rows with a norm of 2^60 or more (or not finite) get infinite factors: all their pairs are scored exactly,
 * and nothing in the estimates can overflow. The comparison lets NaN through, so a NaN is never screened out.
 *
 * For l2 (score = -tk_l2, so that the best is the highest), a pair is screened on its key q.d - |d|^2 / 2,
 * estimated as estimate(q.d) - h_d, h_d = |d|^2 / 2 rounded down. A pair whose exact score is at least the row's
 * threshold T (<= 0) has -|q - d|^2 >= T - 2^-22 |T| (tk_l2 rounds a float64 sum once), so its key is at least
 * K = (T - 2^-22 |T| + |q|^2) / 2, and its estimated key at least K - slack(q, d), all rounded down.
 *
 * The threshold arithmetic rounds down (AVX-512's embedded rounding, or double with a margin). */
#include "tk.h"

#define TK_SEED_DOCS 1024
#define TK_SCREEN_BLOCK 1024 /* query rows per block at most */

enum { TK_BF16 = 1, TK_QUERY = 2, TK_L2 = 4 }; /* tk_prepare_rows's flags */

static inline float tk_round_up(double x)
{
    float f = (float)x;
    return (double)f < x ? nextafterf(f, INFINITY) : f;
}

static inline float tk_round_down(double x)
{
    float f = (float)x;
    return (double)f > x ? nextafterf(f, -INFINITY) : f;
}

/* The bfloat16 bits of x: to nearest, ties to even; NaN stays NaN; subnormals become zeros (as VDPBF16PS
 * reads them). */
static inline uint32_t tk_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    bits >>= 16;
    return (bits & 0x7f80u) ? bits : bits & 0x8000u;
}

static inline float tk_bf16_float(uint32_t bits)
{
    uint32_t wide = bits << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

/* One row's dimensions [from, dim) (from even): their squares, their bfloat16 values' squares and what rounding
 * moved them squared added to sums[0..2]; their bfloat16 words stored at packed[q * panel] for pair q (if packed),
 * their bfloat16 values at rounded[i] (if rounded). */
static void tk_row_bf16(const float *src, int64_t from, int64_t dim, int64_t panel, uint32_t *packed, float *rounded,
                        double sums[3])
{
    for (int64_t q = from / 2; 2 * q < dim; q++) {
        uint32_t word = 0;
        for (int h = 0; h < 2 && 2 * q + h < dim; h++) {
            uint32_t bits = tk_bf16(src[2 * q + h]);
            double value = (double)src[2 * q + h], round = (double)tk_bf16_float(bits);
            sums[0] += value * value;
            sums[1] += round * round;
            sums[2] += (round - value) * (round - value);
            word |= bits << (16 * h);
            if (rounded) rounded[2 * q + h] = tk_bf16_float(bits);
        }
        if (packed) packed[q * panel] = word;
    }
}

#ifdef TK_X86
/* The same for dimensions [0, dim), 16 at a time (tk_bf16 lane by lane), the rest as above: the same words and
 * values, the sums added in another order. */
__attribute__((target("avx512f,avx512bw"))) static void tk_row_bf16_avx512(const float *src, int64_t dim,
                                                                           int64_t panel, uint32_t *packed,
                                                                           float *rounded, double sums[3])
{
    __m512d sq = _mm512_setzero_pd(), rounded_sq = sq, moved_sq = sq;
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        __m512 x = _mm512_loadu_ps(src + d);
        __m512i bits = _mm512_castps_si512(x);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, magnitude), _mm512_set1_epi32(0x7f800000));
        __m512i half = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                               _mm512_and_si512(_mm512_srli_epi32(bits, 16), one)));
        half = _mm512_mask_mov_epi32(_mm512_srli_epi32(half, 16), nan, _mm512_set1_epi32(0x7fc0));
        __mmask16 tiny = _mm512_testn_epi32_mask(half, _mm512_set1_epi32(0x7f80)); /* subnormal or zero */
        half = _mm512_mask_and_epi32(half, tiny, half, _mm512_set1_epi32(0x8000));
        __m512 round = _mm512_castsi512_ps(_mm512_slli_epi32(half, 16));
        if (rounded) _mm512_storeu_ps(rounded + d, round);
        for (int part = 0; part < 2; part++) {
            __m256 x8 = part ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)) : _mm512_castps512_ps256(x);
            __m256 r8 = part ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(round), 1))
                             : _mm512_castps512_ps256(round);
            __m512d value = _mm512_cvtps_pd(x8), wide = _mm512_cvtps_pd(r8), moved = _mm512_sub_pd(wide, value);
            sq = _mm512_fmadd_pd(value, value, sq);
            rounded_sq = _mm512_fmadd_pd(wide, wide, rounded_sq);
            moved_sq = _mm512_fmadd_pd(moved, moved, moved_sq);
        }
        if (packed) {
            uint32_t words[8];
            _mm256_storeu_si256((__m256i *)words, _mm512_cvtepi32_epi16(half)); /* pairs, low half first */
            for (int w = 0; w < 8; w++) packed[(d / 2 + w) * panel] = words[w];
        }
    }
    sums[0] += _mm512_reduce_add_pd(sq);
    sums[1] += _mm512_reduce_add_pd(rounded_sq);
    sums[2] += _mm512_reduce_add_pd(moved_sq);
    tk_row_bf16(src, d, dim, panel, packed, rounded, sums);
}
#endif

/* The sum of a row's squares in double (all a float32 estimator's factors need). */
static double tk_row_squares(const float *src, int64_t dim)
{
    double sum = 0.0;
    for (int64_t d = 0; d < dim; d++) sum += (double)src[d] * (double)src[d];
    return sum;
}

#ifdef TK_X86
TK_AVX512 static double tk_row_squares_avx512(const float *src, int64_t dim)
{
    __m512d low = _mm512_setzero_pd(), high = low;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        __m512 x = _mm512_loadu_ps(src + d);
        __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
        low = _mm512_fmadd_pd(a, a, low);
        high = _mm512_fmadd_pd(b, b, high);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(low, high)) + tk_row_squares(src + d, dim - d);
}
#endif

/* Prepares rows [0, rows) of x (row_stride floats apart) for the screen (see the bound above):
 * - first[i], second[i]: for queries (TK_QUERY) a_q and b_q, for docs n_d and r_d, of a bfloat16 estimator
 *   (TK_BF16) or a float32 one;
 * - third[i] with TK_L2: for queries |q|^2, for docs |d|^2 / 2, rounded down (0 for rows with infinite factors);
 * - packed (if not NULL; rows a multiple of panel): the rows in bfloat16 panels of `panel` rows for VDPBF16PS:
 *   per pair of dimensions (2p, 2p + 1), one 32-bit word per row, dimension 2p in the low half;
 * - rounded (if not NULL; rounded_stride floats apart): the rows' bfloat16 values, as float32. */
void tk_prepare_rows(const float *x, int64_t row_stride, int64_t rows, int64_t dim, int32_t flags, int64_t panel,
                     uint32_t *packed, float *rounded, int64_t rounded_stride, float *first, float *second, float *third)
{
    int64_t pairs = (dim + 1) / 2;
    double unit = ldexp(1.0, -24), gamma = 2.0 * (double)(dim + 8) * unit;
    double floor = 4.0 * (double)(dim + 8) * ldexp(1.0, -86), below = 1.0 - (double)(dim + 8) * ldexp(1.0, -52);
    int bf16 = flags & TK_BF16;
    for (int64_t i = 0; i < rows; i++) {
        const float *src = x + i * row_stride;
        uint32_t *words = packed ? packed + (i / panel) * panel * pairs + i % panel : NULL;
        float *values = rounded ? rounded + i * rounded_stride : NULL;
        double sums[3] = {0.0, 0.0, 0.0};
        if (!bf16 && !words && !values) { /* a float32 estimator's: the squares alone */
#ifdef TK_X86
            sums[0] = (tk_cpu() & TK_HAS_AVX512) ? tk_row_squares_avx512(src, dim) : tk_row_squares(src, dim);
#else
            sums[0] = tk_row_squares(src, dim);
#endif
        }
#ifdef TK_X86
        else if (tk_cpu() & TK_HAS_AVX512BW) tk_row_bf16_avx512(src, dim, panel, words, values, sums);
#endif
        else
            tk_row_bf16(src, 0, dim, panel, words, values, sums);
        double size = sqrt(bf16 && sums[1] > sums[0] ? sums[1] : sums[0]), moved = bf16 ? sqrt(sums[2]) : 0.0;
        int huge = !(size < ldexp(1.0, 60)); /* NaN too */
        if (huge) size = INFINITY, moved = bf16 ? INFINITY : 0.0;
        if (size < ldexp(1.0, -40)) size = ldexp(1.0, -40);
        if (flags & TK_QUERY) {
            double a = moved + gamma * size;
            first[i] = tk_round_up(a > floor ? a : floor);
            second[i] = bf16 ? tk_round_up(size) : 0.0f;
        } else {
            first[i] = tk_round_up(size);
            second[i] = tk_round_up(moved);
        }
        if (flags & TK_L2) third[i] = huge ? 0.0f : tk_round_down(sums[0] * below * ((flags & TK_QUERY) ? 1.0 : 0.5));
    }
}

/* K for l2 (see the bound above): a lower bound on the key of any pair whose exact score is at least t. */
static inline float tk_l2_key_bound(float t, float query_sq)
{
    double magnitude = fabs((double)t), wide = (double)t - magnitude * 0x1p-22 + (double)query_sq;
    return tk_round_down(wide * 0.5 - (magnitude + (double)query_sq) * 0x1p-50);
}

/* ---- The screen on estimates in registers (AVX-512): the products and the screen in one pass. */
#ifdef TK_X86
#define TK_SCREEN_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,popcnt")))
#define TK_SCREEN_F32 __attribute__((target("avx512f,avx512bw,popcnt")))

/* The TK_MR x TK_NR bfloat16 estimates of a packed query panel by a packed doc panel (tk_prepare_rows), left
 * in acc. */
TK_SCREEN_BF16 static inline __attribute__((always_inline)) void tk_micro_bf16(const uint32_t *a, const uint32_t *b,
                                                                               int64_t pairs, __m512 acc[TK_MR][2])
{
    for (int i = 0; i < TK_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * TK_NR);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * TK_NR + 16);
        for (int i = 0; i < TK_MR; i++) {
            __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[p * TK_MR + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
}

/* x - slack(q, d) for 16 docs, rounded down: a lower bound on the exact scores if x holds their estimates. */
TK_AVX512 static inline __m512 tk_minus_slack(__m512 x, float a, float b, const float *norms, const float *resid)
{
    const int down = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    __m512 partial = _mm512_fnmadd_round_ps(_mm512_set1_ps(a), _mm512_loadu_ps(norms), x, down);
    return _mm512_fnmadd_round_ps(_mm512_set1_ps(b), _mm512_loadu_ps(resid), partial, down);
}

/* The lowest estimate (of q.d) that 16 docs may have and still be among row's k best: (the threshold, or K for
 * l2) - slack (+ h_d for l2), rounded down. */
TK_AVX512 static inline __m512 tk_lowest(float bound, float a, float b, const float *norms, const float *resid,
                                         const float *halves)
{
    __m512 lowest = tk_minus_slack(_mm512_set1_ps(bound), a, b, norms, resid);
    if (halves) lowest = _mm512_add_round_ps(lowest, _mm512_loadu_ps(halves), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return lowest;
}

/* The screen's pass, for one estimator: MICRO(a, b, width, acc), packed operands of ELEM, `width` of them per
 * row. Query rows row_lo.. against the chunk's doc_count (padded) docs, the first real_docs real; thresholds,
 * pools and fills start at row row_lo's; queries (float32) start at row 0 of the batch, docs at the chunk's
 * first. For each block of rows and doc panel: 1. the estimates, screened, each row's candidates as codes
 * (row << 5 | lane); 2. their exact scores, in one loop of independent dot products (they overlap);
 * 3. appended row by row (tk_append32_avx512). */
#define TK_SCREEN_PASS(MICRO, ELEM, width)                                                                          \
    int64_t survivors = 0;                                                                                          \
    int64_t block = (int64_t)(1 << 18) / ((width) * (int64_t)sizeof(ELEM)) / TK_MR * TK_MR;                          \
    block = block < TK_MR ? TK_MR : block > TK_SCREEN_BLOCK ? TK_SCREEN_BLOCK : block;                              \
    uint32_t *masks = malloc((size_t)block * (1 + 2 * TK_NR) * sizeof *masks);                                     \
    if (!masks) return -1;                                                                                          \
    uint32_t *codes = masks + block;                                                                                \
    float *exact = (float *)(codes + block * TK_NR);                                                                \
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);                 \
    __mmask16 bad = 0;                                                                                              \
    for (int64_t r0 = 0; r0 < rows; r0 += block) {                                                                  \
        int64_t r1 = r0 + block < rows ? r0 + block : rows, last = r1 < real_rows ? r1 : real_rows;                 \
        for (int64_t j = 0; j < doc_count; j += TK_NR) {                                                            \
            const ELEM *b = packed_docs + j * (width);                                                              \
            const float *doc_rows = docs + j * doc_stride;                                                          \
            int64_t left = real_docs - j, count = 0;                                                                \
            __mmask16 valid0 = tk_first_lanes(left), valid1 = tk_first_lanes(left - 16);                            \
            for (int64_t r = r0; r < r1; r += TK_MR) {                                                              \
                __m512 acc[TK_MR][2];                                                                               \
                MICRO(packed_queries + (row_lo + r) * (width), b, (width), acc);                                    \
                for (int i = 0; i < TK_MR && r + i < last; i++) {                                                   \
                    int64_t row = r + i, q = row_lo + row;                                                          \
                    float bound = l2 ? tk_l2_key_bound(thresholds[row], query_sq[q]) : thresholds[row];            \
                    const float *halves = l2 ? doc_halves + j : NULL;                                               \
                    __m512 t0 = tk_lowest(bound, query_a[q], query_b[q], doc_norms + j, doc_resid + j, halves);     \
                    __m512 t1 = tk_lowest(bound, query_a[q], query_b[q], doc_norms + j + 16, doc_resid + j + 16,    \
                                          halves ? halves + 16 : NULL);                                             \
                    __mmask16 m0 = _mm512_mask_cmp_ps_mask(valid0, acc[i][0], t0, _CMP_NLT_UQ);                     \
                    __mmask16 m1 = _mm512_mask_cmp_ps_mask(valid1, acc[i][1], t1, _CMP_NLT_UQ);                     \
                    __m512i code = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)((row - r0) << 5)));              \
                    masks[row - r0] = m0 | ((uint32_t)m1 << 16);                                                    \
                    _mm512_mask_compressstoreu_epi32(codes + count, m0, code);                                      \
                    count += __builtin_popcount(m0);                                                                \
                    _mm512_mask_compressstoreu_epi32(codes + count, m1, _mm512_add_epi32(code, _mm512_set1_epi32(16))); \
                    count += __builtin_popcount(m1);                                                                \
                }                                                                                                   \
            }                                                                                                       \
            if (!count) continue;                                                                                   \
            for (int64_t c = 0; c < count;) {                                                                       \
                const float *query = queries + (row_lo + r0 + (codes[c] >> 5)) * query_stride;                      \
                if (!l2 && c + 4 <= count && codes[c] >> 5 == codes[c + 3] >> 5) { /* four of one row */           \
                    const float *four[4];                                                                           \
                    for (int f = 0; f < 4; f++) four[f] = doc_rows + (codes[c + f] & 31) * doc_stride;              \
                    tk_dot4_avx512(query, four, dim, exact + c);                                                    \
                    c += 4;                                                                                         \
                    continue;                                                                                       \
                }                                                                                                   \
                const float *doc = doc_rows + (codes[c] & 31) * doc_stride;                                         \
                exact[c] = l2 ? -tk_l2(query, doc, dim) : tk_dot_avx512(query, doc, dim);                           \
                c++;                                                                                                \
            }                                                                                                       \
            for (int64_t c = 0; c < count;) {                                                                       \
                /* the row's exact scores are its candidates' (its mask's lanes), in lane order: expanded into     \
                 * their lanes (not stored lane by lane and loaded whole, which stalls store forwarding) */        \
                int64_t row = r0 + (codes[c] >> 5);                                                                 \
                uint32_t found = masks[row - r0];                                                                   \
                __m512 e0 = _mm512_maskz_expandloadu_ps((__mmask16)found, exact + c);                               \
                __m512 e1 = _mm512_maskz_expandloadu_ps((__mmask16)(found >> 16),                                   \
                                                        exact + c + __builtin_popcount(found & 0xffffu));           \
                c += __builtin_popcount(found);                                                                     \
                uint32_t offered = found & ~tk_excluded32(excluded_offsets, excluded_docs, row, first_doc + j);     \
                __mmask16 m0 = (__mmask16)offered, m1 = (__mmask16)(offered >> 16);                                 \
                bad |= tk_non_finite(m0, e0) | tk_non_finite(m1, e1);                                               \
                survivors += tk_append32_avx512(e0, e1, m0, m1, (uint32_t)(first_doc + j), &thresholds[row],        \
                                                pools + row * capacity, capacity, &fills[row], k);                  \
            }                                                                                                       \
        }                                                                                                           \
    }                                                                                                               \
    free(masks);                                                                                                    \
    if (bad) *non_finite = 1;                                                                                       \
    return survivors

/* Starting thresholds for inner-product rows that have none (-inf) yet: each such row's k-th best lower bound
 * (estimate minus slack) over the chunk's first docs, just below it. At least k docs score at or above that
 * bound, so the threshold rules out only docs that cannot be among the k best; without it, every pair of the
 * first k docs and many more would be scored exactly before the first compaction. Needs real_docs >= k. */
#define TK_SEED(MICRO, ELEM, width)                                                                                 \
    /* at least k docs, and TK_SEED_DOCS, for a threshold nearer the k-th best of all (a rank of k among 1024       \
     * docs rather than among k): at k = 10 that halved the pairs scored exactly */                                 \
    int64_t want = k > TK_SEED_DOCS ? k : real_docs < TK_SEED_DOCS ? real_docs : TK_SEED_DOCS;                      \
    int64_t seen = (want + TK_NR - 1) / TK_NR * TK_NR; /* whole panels: padding scores -inf */                      \
    uint64_t *keys = NULL;                                                                                          \
    for (int64_t r = 0; r < rows; r += TK_MR) {                                                                     \
        int unset = 0;                                                                                              \
        for (int i = 0; i < TK_MR && r + i < real_rows; i++) unset |= thresholds[r + i] == -INFINITY;               \
        if (!unset) continue;                                                                                       \
        if (!keys && !(keys = malloc(TK_MR * seen * sizeof *keys))) return; /* then no seed: still exact */         \
        for (int64_t j = 0; j < seen; j += TK_NR) {                                                                 \
            __m512 acc[TK_MR][2];                                                                                   \
            MICRO(packed_queries + (row_lo + r) * (width), packed_docs + j * (width), (width), acc);                \
            for (int i = 0; i < TK_MR; i++) {                                                                       \
                for (int h = 0; h < 2; h++) {                                                                       \
                    float bound[16];                                                                                \
                    _mm512_storeu_ps(bound, tk_minus_slack(acc[i][h], query_a[row_lo + r + i], query_b[row_lo + r + i], \
                                                           doc_norms + j + 16 * h, doc_resid + j + 16 * h));        \
                    for (int lane = 0; lane < 16; lane++) {                                                         \
                        int64_t doc = j + 16 * h + lane;                                                            \
                        int usable = doc < real_docs && bound[lane] == bound[lane] && r + i < real_rows &&          \
                                     !tk_is_excluded(excluded_offsets, excluded_docs, r + i, first_doc + doc);      \
                        float b = usable ? bound[lane] : -INFINITY;                                                 \
                        keys[i * seen + doc] = tk_key(b, (uint32_t)doc);                                            \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        for (int i = 0; i < TK_MR && r + i < real_rows; i++) {                                                      \
            if (thresholds[r + i] != -INFINITY) continue;                                                           \
            tk_select_nth(keys + i * seen, seen, k - 1);                                                            \
            float bound = tk_key_score(keys[i * seen + k - 1]);                                                     \
            if (bound > -INFINITY) thresholds[r + i] = nextafterf(bound, -INFINITY);                                \
        }                                                                                                           \
    }                                                                                                               \
    free(keys)

#define TK_SCREEN_ARGS                                                                                              \
    const float *query_a, const float *query_b, const float *query_sq, const float *queries, int64_t query_stride,  \
        int64_t dim, int64_t row_lo, int64_t rows, int64_t real_rows, const float *doc_norms, const float *doc_resid, \
        const float *doc_halves, const float *docs, int64_t doc_stride, int64_t doc_count, int64_t real_docs,         \
        int64_t first_doc, float *thresholds, uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k, int l2,  \
        const int64_t *excluded_offsets, const int64_t *excluded_docs, int32_t *non_finite
#define TK_SEED_ARGS                                                                                                \
    const float *query_a, const float *query_b, int64_t row_lo, int64_t rows, int64_t real_rows,                    \
        const float *doc_norms, const float *doc_resid, int64_t real_docs, int64_t first_doc, float *thresholds,     \
        int64_t k, const int64_t *excluded_offsets, const int64_t *excluded_docs

TK_SCREEN_BF16 static void tk_seed_bf16(const uint32_t *packed_queries, const uint32_t *packed_docs, int64_t pairs,
                                        TK_SEED_ARGS)
{
    TK_SEED(tk_micro_bf16, uint32_t, pairs);
}

TK_SCREEN_F32 static void tk_seed_f32(const float *packed_queries, const float *packed_docs, int64_t dim,
                                      TK_SEED_ARGS)
{
    TK_SEED(tk_micro_f32, float, dim);
}

TK_SCREEN_BF16 static int64_t tk_screen_bf16(const uint32_t *packed_queries, const uint32_t *packed_docs,
                                             TK_SCREEN_ARGS)
{
    int64_t pairs = (dim + 1) / 2;
    if (!l2 && real_docs >= k)
        tk_seed_bf16(packed_queries, packed_docs, pairs, query_a, query_b, row_lo, rows, real_rows, doc_norms,
                     doc_resid, real_docs, first_doc, thresholds, k, excluded_offsets, excluded_docs);
    TK_SCREEN_PASS(tk_micro_bf16, uint32_t, pairs);
}

TK_SCREEN_F32 static int64_t tk_screen_f32(const float *packed_queries, const float *packed_docs, TK_SCREEN_ARGS)
{
    if (!l2 && real_docs >= k)
        tk_seed_f32(packed_queries, packed_docs, dim, query_a, query_b, row_lo, rows, real_rows, doc_norms,
                    doc_resid, real_docs, first_doc, thresholds, k, excluded_offsets, excluded_docs);
    TK_SCREEN_PASS(tk_micro_f32, float, dim);
}
#endif

#ifdef TK_X86
TK_SCREEN_BF16 static void tk_estimate_bf16_avx512(const uint32_t *packed_queries, int64_t pairs, int64_t row_lo,
                                                   int64_t rows, const uint32_t *packed_docs, int64_t doc_lo,
                                                   int64_t doc_count, float *out, int64_t out_stride)
{
    for (int64_t j = 0; j < doc_count; j += TK_NR)
        for (int64_t r = 0; r < rows; r += TK_MR) {
            __m512 acc[TK_MR][2];
            tk_micro_bf16(packed_queries + (row_lo + r) * pairs, packed_docs + (doc_lo + j) * pairs, pairs, acc);
            for (int i = 0; i < TK_MR; i++) {
                _mm512_storeu_ps(out + (r + i) * out_stride + j, acc[i][0]);
                _mm512_storeu_ps(out + (r + i) * out_stride + j + 16, acc[i][1]);
            }
        }
}
#endif

/* Which fused screens run here: 1 the bfloat16 one (AVX-512 BF16), 2 the float32 one (AVX-512), as a mask. */
int32_t tk_screen_supported(void)
{
    int features = tk_cpu();
    return ((features & TK_HAS_AVX512BF16) ? 1 : 0) | ((features & TK_HAS_AVX512BW) ? 2 : 0);
}

/* The screen with a fused estimator: `estimator` 1 for bfloat16 (operands packed by tk_prepare_rows), 2 for
 * float32 (packed by tk_pack); metric 0 for ip, 1 for l2 (with query_sq and doc_halves). Query rows row_lo..
 * (rows of them, the first real_rows real) against a chunk of doc_count docs, the first real_docs real and the
 * first doc_count numbered first_doc; thresholds, pools and fills start at row row_lo's. *non_finite is set if
 * any real score that was computed exactly is NaN or infinite (the others are provably finite). Returns the
 * survivors appended, or -1 if the operands are not panel-aligned, memory is short, or the CPU lacks it.
 * Needs capacity >= k + 128. */
int64_t tk_screen_scan(int32_t estimator, int32_t metric, const void *packed_queries, const void *packed_docs,
                       const float *query_a, const float *query_b, const float *query_sq, const float *queries,
                       int64_t query_stride, int64_t dim, int64_t row_lo, int64_t rows, int64_t real_rows,
                       const float *doc_norms, const float *doc_resid, const float *doc_halves, const float *docs,
                       int64_t doc_stride, int64_t doc_count, int64_t real_docs, int64_t first_doc, float *thresholds,
                       uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k, const int64_t *excluded_offsets,
                       const int64_t *excluded_docs, int32_t *non_finite)
{
    if (row_lo % TK_MR || rows % TK_MR || doc_count % TK_NR || capacity < k + 128 ||
        !(tk_screen_supported() & estimator) || (metric && (!query_sq || !doc_halves)))
        return -1;
#ifdef TK_X86
    tk_fpstate saved = tk_ieee_begin();
    int64_t survivors =
        estimator == 1
            ? tk_screen_bf16(packed_queries, packed_docs, query_a, query_b, query_sq, queries, query_stride, dim, row_lo,
                             rows, real_rows, doc_norms, doc_resid, doc_halves, docs, doc_stride, doc_count, real_docs,
                             first_doc, thresholds, pools, capacity, fills, k, metric, excluded_offsets, excluded_docs,
                             non_finite)
            : tk_screen_f32(packed_queries, packed_docs, query_a, query_b, query_sq, queries, query_stride, dim, row_lo,
                            rows, real_rows, doc_norms, doc_resid, doc_halves, docs, doc_stride, doc_count, real_docs,
                            first_doc, thresholds, pools, capacity, fills, k, metric, excluded_offsets, excluded_docs,
                            non_finite);
    tk_ieee_end(saved);
    return survivors;
#else
    (void)packed_queries, (void)packed_docs, (void)query_a, (void)query_b, (void)queries, (void)query_stride;
    (void)dim, (void)real_rows, (void)doc_norms, (void)doc_resid, (void)docs, (void)doc_stride, (void)real_docs;
    (void)first_doc, (void)thresholds, (void)pools, (void)fills, (void)non_finite, (void)excluded_offsets;
    (void)excluded_docs;
    return -1;
#endif
}

/* The bfloat16 estimates of packed query rows row_lo.. by packed docs doc_lo.. (tk_prepare_rows) into out: what
 * the fused screen compares, for tests of its bound. Returns -1 (nothing written) without AVX-512 BF16. */
int32_t tk_estimate_bf16(const uint32_t *packed_queries, int64_t dim, int64_t row_lo, int64_t rows,
                         const uint32_t *packed_docs, int64_t doc_lo, int64_t doc_count, float *out, int64_t out_stride)
{
    if (row_lo % TK_MR || rows % TK_MR || doc_lo % TK_NR || doc_count % TK_NR || !(tk_screen_supported() & 1))
        return -1;
#ifdef TK_X86
    tk_estimate_bf16_avx512(packed_queries, (dim + 1) / 2, row_lo, rows, packed_docs, doc_lo, doc_count, out,
                            out_stride);
    return 0;
#else
    (void)packed_queries, (void)dim, (void)packed_docs, (void)out, (void)out_stride;
    return -1;
#endif
}

/* ---- The screen on estimates in memory (any CPU): a tile of estimates from any product (a BLAS's float32 or
 * bfloat16 product, on the selector's threads). Per row, a coarse test against one bound for the whole tile
 * (the row's bound less the tile's largest slack: one compare per estimate, as the threshold scan), then the
 * pair's own bound in double (with a margin for double's rounding), then the exact score. */

typedef struct {
    const float *estimates, *norms, *resid, *halves, *docs, *query;
    int64_t doc_stride, dim, first_doc, capacity, k;
    float a, b, query_sq, norm_max, resid_max, *threshold;
    uint64_t *pool;
    int32_t *fill;
    int l2, bad;
    float key_bound, coarse; /* for the current threshold: K (l2) or the threshold, and the coarse bound */
    const int64_t *excluded_offsets, *excluded_docs; /* this row's at row 0 */
} tk_tile_row;

static void tk_tile_bounds(tk_tile_row *row)
{
    float t = *row->threshold;
    row->key_bound = row->l2 ? tk_l2_key_bound(t, row->query_sq) : t;
    double slack = (double)row->a * row->norm_max + (double)row->b * row->resid_max;
    double coarse = (double)row->key_bound - slack;
    row->coarse = tk_round_down(coarse - (fabs((double)row->key_bound) + slack) * 0x1p-50);
}

/* Estimates to compare with the coarse bound: for l2, estimate - h_d (rounded to nearest: rounding is monotone,
 * so a pair above the coarse bound stays at or above it). */
static inline float tk_tile_value(const tk_tile_row *row, int64_t c)
{
    return row->halves ? row->estimates[c] - row->halves[c] : row->estimates[c];
}

/* 1. The coarse test: the columns of [from, cols) at or above the coarse bound (NaN too), appended to found. */
static int64_t tk_tile_coarse_scalar(const tk_tile_row *row, int64_t from, int64_t cols, int32_t *found)
{
    int64_t count = 0;
    for (int64_t c = from; c < cols; c++)
        if (!(tk_tile_value(row, c) < row->coarse)) found[count++] = (int32_t)c;
    return count;
}

#ifdef TK_X86
__attribute__((target("avx2"))) static int64_t tk_tile_coarse_avx2(const tk_tile_row *row, int64_t cols,
                                                                    int32_t *found)
{
    int64_t count = 0, j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 values = _mm256_loadu_ps(row->estimates + j);
        if (row->halves) values = _mm256_sub_ps(values, _mm256_loadu_ps(row->halves + j));
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(values, _mm256_set1_ps(row->coarse), _CMP_NLT_UQ));
        while (mask) {
            found[count++] = (int32_t)(j + __builtin_ctz(mask));
            mask &= mask - 1;
        }
    }
    return count + tk_tile_coarse_scalar(row, j, cols, found + count);
}

TK_AVX512 static int64_t tk_tile_coarse_avx512(const tk_tile_row *row, int64_t cols, int32_t *found)
{
    int64_t count = 0, j = 0;
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= cols; j += 16) {
        __m512 values = _mm512_loadu_ps(row->estimates + j);
        if (row->halves) values = _mm512_sub_ps(values, _mm512_loadu_ps(row->halves + j));
        __mmask16 mask = _mm512_cmp_ps_mask(values, _mm512_set1_ps(row->coarse), _CMP_NLT_UQ);
        if (!mask) continue;
        _mm512_mask_compressstoreu_epi32(found + count, mask, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)j)));
        count += __builtin_popcount(mask);
    }
    return count + tk_tile_coarse_scalar(row, j, cols, found + count);
}
#endif

/* 2. Each column's own bound, in double with a margin for double's rounding: keeps, in order, the columns whose
 * estimate may belong to the k best. */
static int64_t tk_tile_fine(const tk_tile_row *row, const int32_t *found, int64_t count, int32_t *kept)
{
    int64_t left = 0;
    for (int64_t i = 0; i < count; i++) {
        int64_t c = found[i];
        double estimate = (double)row->estimates[c], half = row->halves ? (double)row->halves[c] : 0.0;
        double slack = (double)row->a * row->norms[c] + (double)row->b * row->resid[c];
        double margin = (fabs((double)row->key_bound) + slack + fabs(estimate) + half) * 0x1p-50;
        if (!(estimate - half < (double)row->key_bound - slack - margin)) kept[left++] = (int32_t)c; /* NaN passes */
    }
    return left;
}

/* 3. Their exact scores, in one loop of independent dot products (they overlap). */
static void tk_tile_exact(const tk_tile_row *row, const int32_t *kept, int64_t count, float *exact)
{
    for (int64_t i = 0; i < count; i++) {
        const float *doc = row->docs + kept[i] * row->doc_stride;
        exact[i] = row->l2 ? -tk_l2(row->query, doc, row->dim) : tk_dot(row->query, doc, row->dim);
    }
}

#ifdef TK_X86
TK_AVX512 static void tk_tile_exact_avx512(const tk_tile_row *row, const int32_t *kept, int64_t count, float *exact)
{
    if (row->l2) {
        tk_tile_exact(row, kept, count, exact);
        return;
    }
    int64_t i = 0;
    for (; i + 4 <= count; i += 4) {
        const float *docs[4];
        for (int r = 0; r < 4; r++) docs[r] = row->docs + kept[i + r] * row->doc_stride;
        tk_dot4_avx512(row->query, docs, row->dim, exact + i);
    }
    for (; i < count; i++) exact[i] = tk_dot_avx512(row->query, row->docs + kept[i] * row->doc_stride, row->dim);
}
#endif

/* Screens one row of the tile: the coarse test, then, TK_TILE_BATCH candidates at a time, their own bounds (against
 * the threshold as it is then: offering exact scores raises it), their exact scores and their offer to the pool,
 * in doc order. Returns the pairs scored exactly. */
#define TK_TILE_BATCH 32
static int64_t tk_tile_screen_row(tk_tile_row *row, int64_t cols, int32_t *found, float *exact)
{
    int64_t count, scored = 0;
#ifdef TK_X86
    if (tk_cpu() & TK_HAS_AVX512) count = tk_tile_coarse_avx512(row, cols, found);
    else if (tk_cpu() & TK_HAS_AVX2_FMA) count = tk_tile_coarse_avx2(row, cols, found);
    else
#endif
        count = tk_tile_coarse_scalar(row, 0, cols, found);
    if (count) { /* the pool's next slots, fetched while the candidates are scored exactly (a store there misses) */
        for (int64_t line = 0; line < 3; line++) __builtin_prefetch(row->pool + *row->fill + 8 * line, 1, 3);
    }
    for (int64_t start = 0; start < count; start += TK_TILE_BATCH) {
        int32_t *batch = found + start;
        int64_t kept = tk_tile_fine(row, batch, count - start < TK_TILE_BATCH ? count - start : TK_TILE_BATCH, batch);
#ifdef TK_X86
        if (tk_cpu() & TK_HAS_AVX512) tk_tile_exact_avx512(row, batch, kept, exact);
        else
#endif
            tk_tile_exact(row, batch, kept, exact);
        float threshold = *row->threshold;
        for (int64_t i = 0; i < kept; i++) {
            row->bad |= !isfinite(exact[i]);
            if (exact[i] > threshold &&
                !tk_is_excluded(row->excluded_offsets, row->excluded_docs, 0, row->first_doc + batch[i]))
                threshold = tk_push(row->pool, row->capacity, row->fill, row->k, threshold, exact[i],
                                    (uint32_t)(row->first_doc + batch[i]));
        }
        if (threshold != *row->threshold) {
            *row->threshold = threshold;
            tk_tile_bounds(row);
        }
        scored += kept;
    }
    return scored;
}

/* The starting threshold of an inner-product row that has none, from the tile (see TK_SEED): the k-th best
 * lower bound on an exact score among its cols >= k docs, just below it. */
static void tk_tile_seed(tk_tile_row *row, int64_t cols, uint64_t *keys)
{
    for (int64_t c = 0; c < cols; c++) {
        double estimate = (double)row->estimates[c];
        double slack = (double)row->a * row->norms[c] + (double)row->b * row->resid[c];
        float low = tk_round_down(estimate - slack - (fabs(estimate) + slack) * 0x1p-50);
        int usable = low == low && !tk_is_excluded(row->excluded_offsets, row->excluded_docs, 0, row->first_doc + c);
        keys[c] = tk_key(usable ? low : -INFINITY, (uint32_t)c);
    }
    tk_select_nth(keys, cols, row->k - 1);
    float low = tk_key_score(keys[row->k - 1]);
    if (low > -INFINITY) *row->threshold = nextafterf(low, -INFINITY);
}

/* The screen on a tile of estimates: estimates[r * estimate_stride + c] estimates q_r.d_c for rows [0, rows) and
 * real docs [0, cols) (numbered first_doc..), with the rows' factors (query_a, query_b; query_sq for l2), the
 * docs' (doc_norms, doc_resid; doc_halves for l2), the float32 rows (queries, query_stride apart; docs,
 * doc_stride apart) and the selection state from row 0 (thresholds, pools, fills). metric 0: ip, 1: l2.
 * *non_finite is set if any exact score computed is NaN or infinite. Returns the pairs scored exactly. */
int64_t tk_screen_tile(int32_t metric, const float *estimates, int64_t estimate_stride, int64_t rows, int64_t cols,
                       const float *query_a, const float *query_b, const float *query_sq, const float *doc_norms,
                       const float *doc_resid, const float *doc_halves, const float *queries, int64_t query_stride,
                       const float *docs, int64_t doc_stride, int64_t dim, int64_t first_doc, float *thresholds,
                       uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k, const int64_t *excluded_offsets,
                       const int64_t *excluded_docs, int32_t *non_finite)
{
    if (metric && (!query_sq || !doc_halves)) return -1;
    tk_fpstate saved = tk_ieee_begin();
    float norm_max = 0.0f, resid_max = 0.0f;
    for (int64_t c = 0; c < cols; c++) {
        norm_max = doc_norms[c] > norm_max ? doc_norms[c] : norm_max;
        resid_max = doc_resid[c] > resid_max ? doc_resid[c] : resid_max;
    }
    if (norm_max != norm_max || resid_max != resid_max) norm_max = resid_max = INFINITY;
    uint64_t *keys = NULL;
    int32_t *found = malloc((size_t)(cols > 0 ? cols : 1) * (sizeof(int32_t) + sizeof(float)));
    if (!found) {
        tk_ieee_end(saved);
        return -1;
    }
    float *exact = (float *)(found + cols);
    int64_t offered = 0;
    int bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        tk_tile_row row = {estimates + r * estimate_stride, doc_norms, doc_resid, metric ? doc_halves : NULL, docs,
                           queries + r * query_stride, doc_stride, dim, first_doc, capacity, k, query_a[r],
                           query_b[r], metric ? query_sq[r] : 0.0f, norm_max, resid_max, &thresholds[r],
                           pools + r * capacity, &fills[r], metric != 0, 0, 0.0f, 0.0f,
                           excluded_offsets ? excluded_offsets + r : NULL, excluded_docs};
        if (!metric && cols >= k && thresholds[r] == -INFINITY && (keys || (keys = malloc(cols * sizeof *keys))))
            tk_tile_seed(&row, cols, keys);
        tk_tile_bounds(&row);
        offered += tk_tile_screen_row(&row, cols, found, exact);
        bad |= row.bad;
    }
    free(found);
    free(keys);
    if (bad) *non_finite = 1;
    tk_ieee_end(saved);
    return offered;
}

/* The bfloat16 values of rows [0, rows) of x (as float32, subnormals flushed), what a bfloat16 product of them
 * multiplies exactly; see tk_prepare_rows for the factors. */
void tk_round_bf16(const float *x, int64_t row_stride, int64_t rows, int64_t dim, float *out, int64_t out_stride)
{
    for (int64_t i = 0; i < rows; i++)
        for (int64_t d = 0; d < dim; d++) out[i * out_stride + d] = tk_bf16_float(tk_bf16(x[i * row_stride + d]));
}
