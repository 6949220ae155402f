/* Threshold selection for the CPU engine: the one piece of tiny-knn written in C.
 *
 * Each query row owns a pool of packed 64-bit keys (score descending, then doc index ascending), so the
 * k best candidates are simply the k smallest keys. A score tile is scanned once against the row's
 * threshold (a score the k-th best so far is at least as good as); only survivors are appended, and a
 * full pool is compacted back to about k keys around a sampled pivot. Selection cost is therefore one
 * vectorised compare per score plus O(1) amortised work per survivor, instead of a top-k over every score.
 *
 * Precondition: for a given row, tiles arrive in ascending doc order. Then a new score equal to the
 * threshold always loses the tie to the key that set it (its index is larger), so a strict ">" is exact.
 *
 * Built as a Python extension only so that pip compiles it; Python calls it through ctypes, which
 * releases the GIL, so row ranges run on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

#if defined(__SSE2__) || defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define TK_HAVE_SSE2 1
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TK_HAVE_AVX2 1 /* compiled per function (target attribute), chosen at run time */
#endif

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

static inline void tk_swap(uint64_t *a, uint64_t *b)
{
    uint64_t t = *a;
    *a = *b;
    *b = t;
}

/* Reorders keys[0..n) so that keys[nth] is in sorted position, smaller keys before it, larger after.
 * Keys within a row are distinct (one per doc). The partition is branchless (Lomuto with an
 * unconditional swap): survivors arrive in random order, so a branchy partition mispredicts on
 * half its comparisons. */
static void tk_select_nth(uint64_t *keys, int64_t n, int64_t nth)
{
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < keys[lo]) tk_swap(&keys[mid], &keys[lo]);
        if (keys[hi] < keys[lo]) tk_swap(&keys[hi], &keys[lo]);
        if (keys[hi] < keys[mid]) tk_swap(&keys[hi], &keys[mid]);
        tk_swap(&keys[mid], &keys[hi]); /* median of three as pivot, parked at hi */
        uint64_t pivot = keys[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++) {
            uint64_t x = keys[i];
            keys[i] = keys[store];
            keys[store] = x;
            store += (x < pivot);
        }
        tk_swap(&keys[store], &keys[hi]);
        if (nth == store) return;
        if (nth < store) hi = store - 1;
        else lo = store + 1;
    }
}

/* Frees pool space: keeps a prefix of keys that holds at least the k best and returns its length;
 * *threshold becomes a score that the k-th best key is at least as good as. The pivot comes from a
 * strided sample, aimed a little past rank k, so one branchless pass usually suffices; if the sample
 * was unlucky (fewer than k kept, or too few freed) it falls back to an exact quickselect. */
static int64_t tk_compact(uint64_t *pool, int64_t n, int64_t k, float *threshold)
{
    enum { SAMPLE = 96 };
    uint64_t sample[SAMPLE];
    int64_t step = n / SAMPLE;
    int64_t rank = (int64_t)((double)k * 1.12 / (double)n * SAMPLE) + 1;
    if (step >= 1 && rank < SAMPLE) {
        for (int i = 0; i < SAMPLE; i++) sample[i] = pool[i * step];
        tk_select_nth(sample, SAMPLE, rank);
        uint64_t pivot = sample[rank];
        int64_t store = 0;
        for (int64_t i = 0; i < n; i++) {
            uint64_t x = pool[i];
            pool[i] = pool[store];
            pool[store] = x;
            store += (x <= pivot);
        }
        if (store >= k && store <= n - (n - k) / 2) {
            *threshold = tk_key_score(pivot);
            return store;
        }
    }
    tk_select_nth(pool, n, k - 1);
    *threshold = tk_key_score(pool[k - 1]);
    return k;
}

static inline float tk_push(uint64_t *pool, int64_t capacity, int32_t *fill, int64_t k, float threshold,
                            float score, uint32_t doc)
{
    if (*fill == capacity) {
        *fill = (int32_t)tk_compact(pool, capacity, k, &threshold);
        if (!(score > threshold)) return threshold;
    }
    pool[(*fill)++] = tk_key(score, doc);
    return threshold;
}

/* Pushes every score of row[j..cols) above the threshold. Returns the survivors. */
static inline int64_t tk_scan_tail(const float *row, int64_t j, int64_t cols, int64_t first_doc, float *threshold,
                                   uint64_t *pool, int64_t capacity, int32_t *fill, int64_t k)
{
    int64_t survivors = 0;
    for (; j < cols; j++) {
        float score = row[j];
        if (score > *threshold) {
            *threshold = tk_push(pool, capacity, fill, k, *threshold, score, (uint32_t)(first_doc + j));
            survivors++;
        }
    }
    return survivors;
}

/* Pushes the scores of row[j + bit] for each set bit of mask that still beat the threshold. */
static inline int64_t tk_scan_mask(const float *row, int64_t j, unsigned mask, int64_t first_doc, float *threshold,
                                   uint64_t *pool, int64_t capacity, int32_t *fill, int64_t k)
{
    int64_t survivors = 0;
    while (mask) {
        int bit = __builtin_ctz(mask);
        mask &= mask - 1;
        float score = row[j + bit];
        if (score > *threshold) {
            *threshold = tk_push(pool, capacity, fill, k, *threshold, score, (uint32_t)(first_doc + j + bit));
            survivors++;
        }
    }
    return survivors;
}

/* Scans one row of a tile (SSE2, 8 scores per step where available). Returns the survivors. */
static int64_t tk_scan_row(const float *row, int64_t cols, int64_t first_doc, float *threshold, uint64_t *pool,
                           int64_t capacity, int32_t *fill, int64_t k)
{
    int64_t survivors = 0, j = 0;
#ifdef TK_HAVE_SSE2
    for (; j + 8 <= cols; j += 8) {
        __m128 t = _mm_set1_ps(*threshold);
        unsigned mask = (unsigned)(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j), t)) |
                                   (_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j + 4), t)) << 4));
        if (mask) survivors += tk_scan_mask(row, j, mask, first_doc, threshold, pool, capacity, fill, k);
    }
#endif
    return survivors + tk_scan_tail(row, j, cols, first_doc, threshold, pool, capacity, fill, k);
}

#ifdef TK_HAVE_AVX2
/* The same, 32 scores per step: once the threshold is high, almost every step is 4 compares and a test. */
__attribute__((target("avx2"))) static int64_t tk_scan_row_avx2(const float *row, int64_t cols, int64_t first_doc,
                                                                 float *threshold, uint64_t *pool, int64_t capacity,
                                                                 int32_t *fill, int64_t k)
{
    int64_t survivors = 0, j = 0;
    for (; j + 32 <= cols; j += 32) {
        __m256 t = _mm256_set1_ps(*threshold);
        __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(row + j), t, _CMP_GT_OQ);
        __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 8), t, _CMP_GT_OQ);
        __m256 c = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 16), t, _CMP_GT_OQ);
        __m256 d = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 24), t, _CMP_GT_OQ);
        __m256 any = _mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c, d));
        if (_mm256_testz_ps(any, any)) continue;
        unsigned mask = (unsigned)_mm256_movemask_ps(a) | ((unsigned)_mm256_movemask_ps(b) << 8) |
                        ((unsigned)_mm256_movemask_ps(c) << 16) | ((unsigned)_mm256_movemask_ps(d) << 24);
        survivors += tk_scan_mask(row, j, mask, first_doc, threshold, pool, capacity, fill, k);
    }
    return survivors + tk_scan_tail(row, j, cols, first_doc, threshold, pool, capacity, fill, k);
}

/* AVX-512: 64 scores per step, and no branch per survivor. Where a step has survivors, every lane's key is
 * built, the survivors' keys are compressed to the front of a register and stored at the end of the pool,
 * and the fill advances by their count. The AVX2 scan mispredicts about once per survivor (the bit loop's
 * exit, the step's test); at the survivor rates of large k (1-3% of scores) that was most of its time. */
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

/* Needs capacity >= k + 128 (pool_capacity gives k + 256 or more): a step stores up to 64 keys, so the pool is
 * compacted while 64 slots are still free, before the step's keys are appended; a compaction may keep up to
 * (n + k) / 2 keys, which leaves (capacity - k) / 2 >= 64 slots free. */
TK_AVX512 static int64_t tk_scan_row_avx512(const float *row, int64_t cols, int64_t first_doc, float *threshold,
                                            uint64_t *pool, int64_t capacity, int32_t *fill, int64_t k)
{
    int64_t j = 0, n = *fill, start = *fill;
    __m512 t = _mm512_set1_ps(*threshold);
    for (; j + 64 <= cols; j += 64) {
        __m512 a = _mm512_loadu_ps(row + j), b = _mm512_loadu_ps(row + j + 16);
        __m512 c = _mm512_loadu_ps(row + j + 32), d = _mm512_loadu_ps(row + j + 48);
        __mmask16 ma = _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), mb = _mm512_cmp_ps_mask(b, t, _CMP_GT_OQ);
        __mmask16 mc = _mm512_cmp_ps_mask(c, t, _CMP_GT_OQ), md = _mm512_cmp_ps_mask(d, t, _CMP_GT_OQ);
        if (!(ma | mb | mc | md)) continue;
        if (capacity - n < 64) {
            int64_t kept = tk_compact(pool, n, k, threshold);
            start -= n - kept; /* survivors count appends, not what compaction keeps */
            n = kept;
            t = _mm512_set1_ps(*threshold);
            ma = _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), mb = _mm512_cmp_ps_mask(b, t, _CMP_GT_OQ);
            mc = _mm512_cmp_ps_mask(c, t, _CMP_GT_OQ), md = _mm512_cmp_ps_mask(d, t, _CMP_GT_OQ);
        }
        uint32_t doc = (uint32_t)(first_doc + j);
        n += tk_append16_avx512(a, ma, doc, pool + n);
        n += tk_append16_avx512(b, mb, doc + 16, pool + n);
        n += tk_append16_avx512(c, mc, doc + 32, pool + n);
        n += tk_append16_avx512(d, md, doc + 48, pool + n);
    }
    *fill = (int32_t)n;
    return n - start + tk_scan_tail(row, j, cols, first_doc, threshold, pool, capacity, fill, k);
}
#endif

typedef int64_t (*tk_row_scanner)(const float *, int64_t, int64_t, float *, uint64_t *, int64_t, int32_t *, int64_t);

/* Scans rows [0, rows) of a score tile. Returns the number of survivors appended. Uses the widest scan the CPU
 * has; they push different candidates (AVX-512 compacts a little earlier) but every doc that can still be among
 * the k best, so results do not depend on the CPU. */
int64_t tk_scan(const float *scores, int64_t row_stride, int64_t rows, int64_t cols, int64_t first_doc,
                float *thresholds, uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k)
{
    tk_row_scanner scan_row = tk_scan_row;
#ifdef TK_HAVE_AVX2
    /* 2: AVX-512, 1: AVX2, 0: SSE2. TINY_KNN_NO_AVX512 and TINY_KNN_NO_AVX2 (tests) force the narrower scans. */
    static int simd = -1;
    if (simd < 0) {
        int avx2 = __builtin_cpu_supports("avx2") && !getenv("TINY_KNN_NO_AVX2");
        int avx512 = avx2 && __builtin_cpu_supports("avx512f") && !getenv("TINY_KNN_NO_AVX512");
        simd = avx512 ? 2 : avx2;
    }
    if (simd == 2 && capacity >= k + 128) scan_row = tk_scan_row_avx512;
    else if (simd >= 1) scan_row = tk_scan_row_avx2;
#endif
    int64_t survivors = 0;
    for (int64_t r = 0; r < rows; r++) {
        survivors += scan_row(scores + r * row_stride, cols, first_doc, &thresholds[r], pools + r * capacity,
                              capacity, &fills[r], k);
    }
    return survivors;
}

/* Moves each row's k best keys (fill >= k required) to the front of its pool, in no particular order. */
void tk_select_best(uint64_t *pools, int64_t capacity, const int32_t *fills, int64_t rows, int64_t k)
{
    for (int64_t r = 0; r < rows; r++) {
        if (fills[r] > k) tk_select_nth(pools + r * capacity, fills[r], k - 1);
    }
}

/* Unpacks n keys into scores and doc indices. */
void tk_decode(const uint64_t *keys, int64_t n, float *scores, int64_t *indices)
{
    for (int64_t i = 0; i < n; i++) {
        scores[i] = tk_key_score(keys[i]);
        indices[i] = (int64_t)(uint32_t)keys[i];
    }
}

/* Exact re-scoring of candidates (refine.py): for each query row r and candidate c, with doc = row
 * indices[r * cands + c] of the float32 rows at `docs` (row_stride floats apart), out[r * cands + c] is
 *   l2 (squared = 1): sum over i of (double(doc[i]) - double(query_r[i]))^2, or
 *   ip (squared = 0): sum over i of double(doc[i]) * double(query_r[i]).
 * Differences and products of float32 values are exact in double (almost always, for the squares), so the
 * only rounding is in the sum. The sum runs over TK_LANES interleaved accumulators (lane = i mod TK_LANES)
 * combined as a fixed tree: the same bits on every machine and thread count, and the order that
 * refine.py's numpy fallback follows. */
#define TK_LANES 8
static inline double tk_term(float doc, float query, int squared)
{
    double t = (double)doc - (double)query;
    return squared ? t * t : (double)doc * (double)query;
}

static inline void tk_exact_rows(const float *docs, int64_t row_stride, const float *queries, int64_t query_stride,
                                 int64_t dim, const int64_t *indices, int64_t rows, int64_t cands, double *out,
                                 int squared)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *query = queries + r * query_stride;
        for (int64_t c = 0; c < cands; c++) {
            const float *doc = docs + indices[r * cands + c] * row_stride;
            double acc[TK_LANES] = {0};
            int64_t i = 0;
            for (; i + TK_LANES <= dim; i += TK_LANES) {
                for (int j = 0; j < TK_LANES; j++) acc[j] += tk_term(doc[i + j], query[i + j], squared);
            }
            for (; i < dim; i++) acc[i % TK_LANES] += tk_term(doc[i], query[i], squared);
            out[r * cands + c] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
    }
}

/* Reads of a memory-mapped input guarded against SIGBUS. A file that shrinks under its mapping makes the next
 * read of a page past its new end raise SIGBUS, which would kill the process. A guarded call (TK_GUARDED) sets
 * a jump target for its own thread; the handler jumps there and the call returns TK_INPUT_CHANGED instead.
 * A SIGBUS on a thread with no target is not ours: the handler puts back the one it replaced and returns, so
 * the faulting instruction runs again under it. The handler is (re)installed by each guarded call if someone
 * replaced it since (faulthandler, for one), under a lock so that it never records itself as the previous. */
#define TK_INPUT_CHANGED (-2)
static __thread sigjmp_buf *tk_guard_target;
static struct sigaction tk_guard_previous;
static pthread_mutex_t tk_guard_lock = PTHREAD_MUTEX_INITIALIZER;

static void tk_guard_handler(int signum, siginfo_t *info, void *context)
{
    sigjmp_buf *target = tk_guard_target;
    (void)signum, (void)info, (void)context;
    if (target != NULL) {
        tk_guard_target = NULL;
        siglongjmp(*target, 1);
    }
    sigaction(SIGBUS, &tk_guard_previous, NULL);
}

static void tk_guard_install(void)
{
    struct sigaction current;
    pthread_mutex_lock(&tk_guard_lock);
    if (sigaction(SIGBUS, NULL, &current) == 0 && !((current.sa_flags & SA_SIGINFO) &&
                                                    current.sa_sigaction == tk_guard_handler)) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = tk_guard_handler;
        action.sa_flags = SA_SIGINFO;
        sigemptyset(&action.sa_mask);
        sigaction(SIGBUS, &action, &tk_guard_previous);
    }
    pthread_mutex_unlock(&tk_guard_lock);
}

/* Runs `body` with this thread's SIGBUS jump target set; a fault returns TK_INPUT_CHANGED from the function. */
#define TK_GUARDED(body)                                                                                            \
    do {                                                                                                            \
        sigjmp_buf tk_jump;                                                                                         \
        tk_guard_install();                                                                                         \
        if (sigsetjmp(tk_jump, 1)) return TK_INPUT_CHANGED;                                                         \
        tk_guard_target = &tk_jump;                                                                                 \
        body;                                                                                                       \
        tk_guard_target = NULL;                                                                                     \
    } while (0)

/* Returns 0, or TK_INPUT_CHANGED if the docs (a memory-mapped file) shrank under the read. */
int32_t tk_exact(const float *docs, int64_t row_stride, const float *queries, int64_t query_stride, int64_t dim,
                 const int64_t *indices, int64_t rows, int64_t cands, double *out, int32_t squared)
{
    TK_GUARDED(if (squared) tk_exact_rows(docs, row_stride, queries, query_stride, dim, indices, rows, cands, out, 1);
               else tk_exact_rows(docs, row_stride, queries, query_stride, dim, indices, rows, cands, out, 0));
    return 0;
}

/* The CPU's matrix product (AVX-512): scores of query rows by doc rows, each score one float32 fused
 * multiply-add chain over the dimensions in order, starting from zero. So a score's bits depend only on the
 * two rows, never on blocks, tiles or threads. Both operands are packed first (tk_pack): queries in panels of
 * TK_MR rows, docs in panels of TK_NR rows, each panel dimension-major, so that the micro-kernel reads both
 * sequentially: per dimension, TK_NR doc values as two vectors and TK_MR broadcast query values, into
 * TK_MR x TK_NR accumulators held in registers. On AMD Zen 5, where MKL's sgemm takes its AVX2 path, this
 * runs at about 2.3 x torch.mm (benchmarks/RESULTS.md). */
#define TK_MR 8
#define TK_NR 32

/* Packs rows [0, rows) of x (row_stride floats apart; rows a multiple of panel) into panels of `panel` rows,
 * each panel dim x panel floats, dimension-major. */
void tk_pack(const float *x, int64_t row_stride, int64_t rows, int64_t dim, int64_t panel, float *out)
{
    for (int64_t p = 0; p < rows; p += panel) {
        float *dst = out + p * dim;
        for (int64_t i = 0; i < panel; i++) {
            const float *src = x + (p + i) * row_stride;
            for (int64_t d = 0; d < dim; d++) dst[d * panel + i] = src[d];
        }
    }
}

int tk_product_supported(void)
{
#ifdef TK_HAVE_AVX2
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* 1 on an AMD processor: MKL's sgemm takes its AVX2 path there, and the kernel's product is the faster one. */
int tk_cpu_is_amd(void)
{
#ifdef TK_HAVE_AVX2
    return __builtin_cpu_is("amd");
#else
    return 0;
#endif
}

#ifdef TK_HAVE_AVX2
/* The TK_MR x TK_NR scores of a query panel by a doc panel, left in acc. */
TK_AVX512 static inline __attribute__((always_inline)) void tk_micro_scores(const float *a, const float *b,
                                                                            int64_t dim, __m512 acc[TK_MR][2])
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

TK_AVX512 static inline void tk_micro(const float *a, const float *b, int64_t dim, float *out, int64_t out_stride)
{
    __m512 acc[TK_MR][2];
    tk_micro_scores(a, b, dim, acc);
    for (int i = 0; i < TK_MR; i++) {
        _mm512_storeu_ps(out + i * out_stride, acc[i][0]);
        _mm512_storeu_ps(out + i * out_stride + 16, acc[i][1]);
    }
}

/* The query rows per block of a product: about 512 KiB of them, for the L2 cache. */
static int64_t tk_block_rows(int64_t dim)
{
    int64_t block = (int64_t)(1 << 19) / (dim * 4) / TK_MR * TK_MR;
    return block < TK_MR ? TK_MR : block;
}

/* out[r, j] for query rows row_lo + r (r < rows) and docs doc_lo + j (j < docs), from packed operands
 * (tk_pack with panels of TK_MR and TK_NR; row_lo and rows multiples of TK_MR, doc_lo and docs of TK_NR, as
 * tk_product checks). Query rows are taken a block at a time (about 512 KiB of them, for the L2 cache)
 * against each doc panel in turn. */
TK_AVX512 static void tk_product_avx512(const float *queries, int64_t dim, int64_t row_lo, int64_t rows,
                                        const float *docs, int64_t doc_lo, int64_t doc_count, float *out,
                                        int64_t out_stride)
{
    int64_t block = tk_block_rows(dim);
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        int64_t r1 = r0 + block < rows ? r0 + block : rows;
        for (int64_t j = 0; j < doc_count; j += TK_NR) {
            const float *b = docs + (doc_lo + j) * dim;
            for (int64_t r = r0; r < r1; r += TK_MR)
                tk_micro(queries + (row_lo + r) * dim, b, dim, out + r * out_stride + j, out_stride);
        }
    }
}

/* Appends the lanes of (s0, s1) in (valid0, valid1) that beat the threshold, as docs doc.. (s1's from doc + 16),
 * compacting first if fewer than 32 slots are free (capacity >= k + 128: see tk_scan_row_avx512). Returns
 * the keys appended. */
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

/* The product and the threshold scan in one: each TK_MR x TK_NR block of scores is compared with its rows'
 * thresholds while still in registers, and only survivors leave them (appended to the pools as in
 * tk_scan_row_avx512), so no score tile is ever written. Query rows row_lo.. (packed) against the packed docs
 * [0, doc_count) of a chunk whose first `real_docs` are real (the rest padding, never pushed) and whose first
 * doc is first_doc; thresholds, pools and fills start at row row_lo's, and only the first real_rows rows are
 * selected. *non_finite is set if any real score is NaN or infinite. Returns the survivors appended.
 * Needs capacity >= k + 128 (a block appends up to 32 keys per row; see tk_scan_row_avx512). */
TK_AVX512 static int64_t tk_product_scan_avx512(const float *queries, int64_t dim, int64_t row_lo, int64_t rows,
                                                int64_t real_rows, const float *docs, int64_t doc_count,
                                                int64_t real_docs, int64_t first_doc, float *thresholds,
                                                uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k,
                                                int32_t *non_finite)
{
    int64_t block = tk_block_rows(dim), survivors = 0;
    __mmask16 bad = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        int64_t r1 = r0 + block < rows ? r0 + block : rows;
        for (int64_t j = 0; j < doc_count; j += TK_NR) {
            const float *b = docs + j * dim;
            int64_t left = real_docs - j; /* real docs in this panel, if fewer than TK_NR */
            __mmask16 valid0 = tk_first_lanes(left), valid1 = tk_first_lanes(left - 16);
            uint32_t doc = (uint32_t)(first_doc + j);
            for (int64_t r = r0; r < r1; r += TK_MR) {
                __m512 acc[TK_MR][2];
                tk_micro_scores(queries + (row_lo + r) * dim, b, dim, acc);
                for (int i = 0; i < TK_MR && r + i < real_rows; i++) {
                    int64_t row = r + i;
                    bad |= tk_non_finite(valid0, acc[i][0]) | tk_non_finite(valid1, acc[i][1]);
                    survivors += tk_append32_avx512(acc[i][0], acc[i][1], valid0, valid1, doc, &thresholds[row],
                                                    pools + row * capacity, capacity, &fills[row], k);
                }
            }
        }
    }
    if (bad) *non_finite = 1;
    return survivors;
}
#endif

int64_t tk_product_scan(const float *queries, int64_t dim, int64_t row_lo, int64_t rows, int64_t real_rows,
                        const float *docs, int64_t doc_count, int64_t real_docs, int64_t first_doc, float *thresholds,
                        uint64_t *pools, int64_t capacity, int32_t *fills, int64_t k, int32_t *non_finite)
{
    if (row_lo % TK_MR || rows % TK_MR || doc_count % TK_NR || capacity < k + 128 || !tk_product_supported())
        return -1;
#ifdef TK_HAVE_AVX2
    return tk_product_scan_avx512(queries, dim, row_lo, rows, real_rows, docs, doc_count, real_docs, first_doc,
                                  thresholds, pools, capacity, fills, k, non_finite);
#else
    (void)queries, (void)dim, (void)real_rows, (void)docs, (void)real_docs, (void)first_doc, (void)thresholds;
    (void)pools, (void)fills, (void)non_finite;
    return -1;
#endif
}

/* tk_product_avx512's product; returns -1 (nothing written) if the operands are not panel-aligned, or
 * without AVX-512. */
int32_t tk_product(const float *queries, int64_t dim, int64_t row_lo, int64_t rows, const float *docs,
                   int64_t doc_lo, int64_t doc_count, float *out, int64_t out_stride)
{
    if (row_lo % TK_MR || rows % TK_MR || doc_lo % TK_NR || doc_count % TK_NR || !tk_product_supported()) return -1;
#ifdef TK_HAVE_AVX2
    tk_product_avx512(queries, dim, row_lo, rows, docs, doc_lo, doc_count, out, out_stride);
    return 0;
#else
    (void)queries, (void)dim, (void)docs, (void)out, (void)out_stride;
    return -1;
#endif
}

/* The screened product (AVX-512 BF16): exact float32 answers from a bfloat16 product, at twice the rate.
 *
 * Each score is first estimated from the two rows rounded to bfloat16 (VDPBF16PS, float32 sums). The estimate
 * is within slack(q, d) = a_q |d| + b_q r_d of the exact score (the bound is below), where r_d = |d~ - d| is
 * what rounding moved the doc row and a_q, b_q come from the query's own. Only a pair whose estimate reaches
 * its row's threshold minus the slack can still be among the k best; it is scored exactly (tk_dot) and pushed
 * as in tk_product_scan. Every other pair provably scores below the threshold, so the answer is that of
 * scoring every pair with tk_dot, whatever the estimates. At large k about 3% of pairs are scored exactly.
 *
 * The bound. Let q~, d~ be the rows in bfloat16 (to nearest even; subnormals flushed to zero, as VDPBF16PS
 * would). Then q~.d~ - q.d = (q~ - q).d~ + q.(d~ - d), at most r_q |d~| + |q| r_d (Cauchy-Schwarz). The
 * float32 sums of the estimate and of tk_dot each add at most about dim * 2^-24 |q||d| (any order; counted
 * twice over: gamma below), and VDPBF16PS's flushing of subnormal products and sums at most 2^-126 per step
 * (the floor on a_q, with norms floored at 2^-40). Norms here are max(|x|, |x~|), summed in double and rounded
 * up; the threshold minus the slack is computed rounding down. Rows with a norm of 2^60 or more (or not
 * finite) get an infinite one: all their pairs are scored exactly, and nothing in the estimates can overflow.
 * The comparison lets NaN through, so a NaN is never screened out.
 *
 * tk_dot fixes the exact score: dimension i goes to lane i mod 16 of accumulator (i / 16) mod 4, each a
 * float32 fused multiply-add chain in order of i; then the fixed tree (a0 + a1) + (a2 + a3) and halves. Its
 * bits depend only on the two rows. */
#define TK_SCREEN_MR 8
#define TK_SCREEN_NR 32
#define TK_SEED_DOCS 1024
#define TK_SCREEN_BLOCK 1024 /* query rows per block at most */

static inline float tk_round_up(double x)
{
    float f = (float)x;
    return (double)f < x ? nextafterf(f, INFINITY) : f;
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

static inline double tk_bf16_value(uint32_t bits)
{
    uint32_t wide = bits << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return (double)f;
}

/* Packs one row's dimensions [from, dim) (from even) into words dst[q * panel] from pair q = from / 2 on, and
 * adds their squares, their bfloat16 values' squares and what rounding moved them squared to sums[0..2]. */
static void tk_pack_row_bf16(const float *src, int64_t from, int64_t dim, int64_t panel, uint32_t *dst, double sums[3])
{
    for (int64_t q = from / 2; 2 * q < dim; q++) {
        uint32_t word = 0;
        for (int h = 0; h < 2 && 2 * q + h < dim; h++) {
            uint32_t bits = tk_bf16(src[2 * q + h]);
            double value = (double)src[2 * q + h], rounded = tk_bf16_value(bits);
            sums[0] += value * value;
            sums[1] += rounded * rounded;
            sums[2] += (rounded - value) * (rounded - value);
            word |= bits << (16 * h);
        }
        dst[q * panel] = word;
    }
}

#ifdef TK_HAVE_AVX2
/* The same for dimensions [0, dim), 16 at a time (tk_bf16 lane by lane), the rest as above: the same words, the
 * sums added in another order. */
__attribute__((target("avx512f,avx512bw"))) static void tk_pack_row_bf16_avx512(const float *src, int64_t dim,
                                                                                int64_t panel, uint32_t *dst,
                                                                                double sums[3])
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
        __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(half, 16));
        for (int part = 0; part < 2; part++) {
            __m256 x8 = part ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)) : _mm512_castps512_ps256(x);
            __m256 r8 = part ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(rounded), 1))
                             : _mm512_castps512_ps256(rounded);
            __m512d value = _mm512_cvtps_pd(x8), round = _mm512_cvtps_pd(r8), moved = _mm512_sub_pd(round, value);
            sq = _mm512_fmadd_pd(value, value, sq);
            rounded_sq = _mm512_fmadd_pd(round, round, rounded_sq);
            moved_sq = _mm512_fmadd_pd(moved, moved, moved_sq);
        }
        uint32_t words[8];
        _mm256_storeu_si256((__m256i *)words, _mm512_cvtepi32_epi16(half)); /* pairs, low half first */
        for (int w = 0; w < 8; w++) dst[(d / 2 + w) * panel] = words[w];
    }
    sums[0] += _mm512_reduce_add_pd(sq);
    sums[1] += _mm512_reduce_add_pd(rounded_sq);
    sums[2] += _mm512_reduce_add_pd(moved_sq);
    tk_pack_row_bf16(src, d, dim, panel, dst, sums);
}
#endif

/* Packs rows [0, rows) of x (row_stride floats apart; rows a multiple of panel) as bfloat16 into panels of
 * `panel` rows: per pair of dimensions (2p, 2p + 1), one 32-bit word per row (dimension 2p in the low half;
 * an odd dim is padded with a zero). Also writes each row's two slack factors (see the bound above): for docs
 * (query = 0) norm[i] = |d| and resid[i] = r_d; for queries norm[i] = a_q and resid[i] = b_q = |q|. The sums
 * in double are exact to far less than gamma's factor 2 covers. */
void tk_pack_bf16(const float *x, int64_t row_stride, int64_t rows, int64_t dim, int64_t panel, int32_t query,
                  uint32_t *out, float *norm, float *resid)
{
    int64_t pairs = (dim + 1) / 2;
    double gamma = 2.0 * (double)(dim + 8) * ldexp(1.0, -24), floor = 4.0 * (double)(dim + 8) * ldexp(1.0, -86);
#ifdef TK_HAVE_AVX2
    int wide = __builtin_cpu_supports("avx512bw");
#endif
    for (int64_t p = 0; p < rows; p += panel) {
        uint32_t *dst = out + p * pairs;
        for (int64_t i = 0; i < panel; i++) {
            const float *src = x + (p + i) * row_stride;
            double sums[3] = {0.0, 0.0, 0.0};
#ifdef TK_HAVE_AVX2
            if (wide) tk_pack_row_bf16_avx512(src, dim, panel, dst + i, sums);
            else
#endif
                tk_pack_row_bf16(src, 0, dim, panel, dst + i, sums);
            double size = sqrt(sums[0] > sums[1] ? sums[0] : sums[1]), moved = sqrt(sums[2]);
            if (!(size < ldexp(1.0, 60))) size = moved = INFINITY; /* NaN too */
            if (size < ldexp(1.0, -40)) size = ldexp(1.0, -40);
            if (query) {
                double a = moved + gamma * size;
                norm[p + i] = tk_round_up(a > floor ? a : floor);
                resid[p + i] = tk_round_up(size);
            } else {
                norm[p + i] = tk_round_up(size);
                resid[p + i] = tk_round_up(moved);
            }
        }
    }
}

int tk_screen_supported(void)
{
#ifdef TK_HAVE_AVX2
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

#ifdef TK_HAVE_AVX2
#define TK_SCREEN __attribute__((target("avx512f,avx512bw,avx512bf16,popcnt")))

/* The exact score of two float32 rows (see above). */
TK_AVX512 static inline float tk_dot(const float *a, const float *b, int64_t dim)
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

/* Exact scores (tk_dot) of query rows [0, rows) by doc rows [0, cols) into out (out_stride apart): the
 * straightforward method the screen is tested against, and the scores of tiles the screen does not take. */
TK_AVX512 static void tk_dot_tile_avx512(const float *queries, int64_t query_stride, int64_t rows, const float *docs,
                                         int64_t doc_stride, int64_t cols, int64_t dim, float *out, int64_t out_stride)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            out[r * out_stride + c] = tk_dot(queries + r * query_stride, docs + c * doc_stride, dim);
}

/* The TK_SCREEN_MR x TK_SCREEN_NR estimates of a packed query panel by a packed doc panel, left in acc. */
TK_SCREEN static inline __attribute__((always_inline)) void tk_micro_bf16(const uint32_t *a, const uint32_t *b,
                                                                          int64_t pairs, __m512 acc[TK_SCREEN_MR][2])
{
    for (int i = 0; i < TK_SCREEN_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * TK_SCREEN_NR);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * TK_SCREEN_NR + 16);
        for (int i = 0; i < TK_SCREEN_MR; i++) {
            __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[p * TK_SCREEN_MR + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
}

/* x - slack(q, d) for 16 docs, rounded down: a lower bound on the exact scores if x holds their estimates. */
TK_SCREEN static inline __m512 tk_minus_slack(__m512 x, float a, float b, const float *norms, const float *resid)
{
    const int down = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    __m512 partial = _mm512_fnmadd_round_ps(_mm512_set1_ps(a), _mm512_loadu_ps(norms), x, down);
    return _mm512_fnmadd_round_ps(_mm512_set1_ps(b), _mm512_loadu_ps(resid), partial, down);
}

/* Starting thresholds for rows that have none (-inf) yet: each such row's k-th best lower bound (estimate
 * minus slack) over the chunk's first docs, just below it. At least k docs score at or above that bound, so
 * the threshold rules out only docs that cannot be among the k best; without it, every pair of the first k
 * docs and many more would be scored exactly before the first compaction. Needs real_docs >= k. */
TK_SCREEN static void tk_screen_seed(const uint32_t *packed_queries, const float *query_a, const float *query_b,
                                     int64_t pairs, int64_t row_lo, int64_t rows, int64_t real_rows,
                                     const uint32_t *packed_docs, const float *doc_norms, const float *doc_resid,
                                     int64_t real_docs, float *thresholds, int64_t k)
{
    /* at least k docs, and TK_SEED_DOCS, for a threshold nearer the k-th best of all (a rank of k among 1024
     * docs rather than among k): at k = 10 that halved the pairs scored exactly */
    int64_t want = k > TK_SEED_DOCS ? k : real_docs < TK_SEED_DOCS ? real_docs : TK_SEED_DOCS;
    int64_t seen = (want + TK_SCREEN_NR - 1) / TK_SCREEN_NR * TK_SCREEN_NR; /* whole panels: padding scores -inf */
    uint64_t *keys = NULL;
    for (int64_t r = 0; r < rows; r += TK_SCREEN_MR) {
        int unset = 0;
        for (int i = 0; i < TK_SCREEN_MR && r + i < real_rows; i++) unset |= thresholds[r + i] == -INFINITY;
        if (!unset) continue;
        if (!keys && !(keys = malloc(TK_SCREEN_MR * seen * sizeof *keys))) return; /* then no seed: still exact */
        for (int64_t j = 0; j < seen; j += TK_SCREEN_NR) {
            __m512 acc[TK_SCREEN_MR][2];
            tk_micro_bf16(packed_queries + (row_lo + r) * pairs, packed_docs + j * pairs, pairs, acc);
            for (int i = 0; i < TK_SCREEN_MR; i++) {
                for (int h = 0; h < 2; h++) {
                    float bound[16];
                    _mm512_storeu_ps(bound, tk_minus_slack(acc[i][h], query_a[row_lo + r + i], query_b[row_lo + r + i],
                                                           doc_norms + j + 16 * h, doc_resid + j + 16 * h));
                    for (int lane = 0; lane < 16; lane++) {
                        int64_t doc = j + 16 * h + lane;
                        float b = doc < real_docs && bound[lane] == bound[lane] ? bound[lane] : -INFINITY;
                        keys[i * seen + doc] = tk_key(b, (uint32_t)doc);
                    }
                }
            }
        }
        for (int i = 0; i < TK_SCREEN_MR && r + i < real_rows; i++) {
            if (thresholds[r + i] != -INFINITY) continue;
            tk_select_nth(keys + i * seen, seen, k - 1);
            float bound = tk_key_score(keys[i * seen + k - 1]);
            if (bound > -INFINITY) thresholds[r + i] = nextafterf(bound, -INFINITY);
        }
    }
    free(keys);
}

/* tk_product_scan's work, screened: query rows row_lo.. (packed by tk_pack_bf16 with panels of TK_SCREEN_MR,
 * with their factors query_a and query_b; float32 rows at `queries`, query_stride apart, row 0 first) against
 * the chunk's docs (packed in panels of TK_SCREEN_NR, with their norms and residuals; float32 rows at `docs`,
 * doc_stride apart), the first real_docs of doc_count real. Returns the survivors appended, or -1 if out of
 * memory. */
TK_SCREEN static int64_t tk_screen_scan_avx512(const uint32_t *packed_queries, const float *query_a,
                                               const float *query_b, const float *queries, int64_t query_stride,
                                               int64_t dim, int64_t row_lo, int64_t rows, int64_t real_rows,
                                               const uint32_t *packed_docs, const float *doc_norms,
                                               const float *doc_resid, const float *docs, int64_t doc_stride,
                                               int64_t doc_count, int64_t real_docs, int64_t first_doc,
                                               float *thresholds, uint64_t *pools, int64_t capacity, int32_t *fills,
                                               int64_t k, int32_t *non_finite)
{
    int64_t pairs = (dim + 1) / 2, survivors = 0;
    /* Query rows per block: 256 KiB of them in bfloat16, with their 512 KiB in float32 (for the exact scores)
     * well within a 1-2 MiB L2 */
    int64_t block = (int64_t)(1 << 18) / (pairs * 4) / TK_SCREEN_MR * TK_SCREEN_MR;
    block = block < TK_SCREEN_MR ? TK_SCREEN_MR : block > TK_SCREEN_BLOCK ? TK_SCREEN_BLOCK : block;
    /* A block's candidates against one doc panel: their masks per row, (row << 5 | lane) codes, exact scores */
    uint32_t *masks = malloc((size_t)block * (1 + 2 * TK_SCREEN_NR) * sizeof *masks);
    if (!masks) return -1;
    uint32_t *codes = masks + block;
    float *exact = (float *)(codes + block * TK_SCREEN_NR);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 bad = 0;
    if (real_docs >= k)
        tk_screen_seed(packed_queries, query_a, query_b, pairs, row_lo, rows, real_rows, packed_docs, doc_norms,
                       doc_resid, real_docs, thresholds, k);
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        int64_t r1 = r0 + block < rows ? r0 + block : rows, last = r1 < real_rows ? r1 : real_rows;
        for (int64_t j = 0; j < doc_count; j += TK_SCREEN_NR) {
            const uint32_t *b = packed_docs + j * pairs;
            const float *doc_rows = docs + j * doc_stride;
            int64_t left = real_docs - j, count = 0;
            __mmask16 valid0 = tk_first_lanes(left), valid1 = tk_first_lanes(left - 16);
            /* 1. Estimates, screened: each row's candidates, as codes in row order, lanes ascending */
            for (int64_t r = r0; r < r1; r += TK_SCREEN_MR) {
                __m512 acc[TK_SCREEN_MR][2];
                tk_micro_bf16(packed_queries + (row_lo + r) * pairs, b, pairs, acc);
                for (int i = 0; i < TK_SCREEN_MR && r + i < last; i++) {
                    int64_t row = r + i;
                    __m512 t = _mm512_set1_ps(thresholds[row]);
                    float qa = query_a[row_lo + row], qb = query_b[row_lo + row];
                    __m512 t0 = tk_minus_slack(t, qa, qb, doc_norms + j, doc_resid + j);
                    __m512 t1 = tk_minus_slack(t, qa, qb, doc_norms + j + 16, doc_resid + j + 16);
                    __mmask16 m0 = _mm512_mask_cmp_ps_mask(valid0, acc[i][0], t0, _CMP_NLT_UQ);
                    __mmask16 m1 = _mm512_mask_cmp_ps_mask(valid1, acc[i][1], t1, _CMP_NLT_UQ);
                    __m512i code = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)((row - r0) << 5)));
                    masks[row - r0] = m0 | ((uint32_t)m1 << 16);
                    _mm512_mask_compressstoreu_epi32(codes + count, m0, code);
                    count += __builtin_popcount(m0);
                    _mm512_mask_compressstoreu_epi32(codes + count, m1, _mm512_add_epi32(code, _mm512_set1_epi32(16)));
                    count += __builtin_popcount(m1);
                }
            }
            if (!count) continue;
            /* 2. Their exact scores, in one loop of independent dot products (they overlap) */
            for (int64_t c = 0; c < count; c++) {
                const float *query = queries + (row_lo + r0 + (codes[c] >> 5)) * query_stride;
                exact[c] = tk_dot(query, doc_rows + (codes[c] & 31) * doc_stride, dim);
            }
            /* 3. Appended row by row, as tk_product_scan appends */
            for (int64_t c = 0; c < count;) {
                int64_t row = r0 + (codes[c] >> 5);
                float scores[TK_SCREEN_NR] = {0};
                for (; c < count && r0 + (codes[c] >> 5) == row; c++) scores[codes[c] & 31] = exact[c];
                __mmask16 m0 = (__mmask16)masks[row - r0], m1 = (__mmask16)(masks[row - r0] >> 16);
                __m512 e0 = _mm512_loadu_ps(scores), e1 = _mm512_loadu_ps(scores + 16);
                bad |= tk_non_finite(m0, e0) | tk_non_finite(m1, e1);
                survivors += tk_append32_avx512(e0, e1, m0, m1, (uint32_t)(first_doc + j), &thresholds[row],
                                                pools + row * capacity, capacity, &fills[row], k);
            }
        }
    }
    free(masks);
    if (bad) *non_finite = 1;
    return survivors;
}
#endif

int64_t tk_screen_scan(const uint32_t *packed_queries, const float *query_a, const float *query_b,
                       const float *queries, int64_t query_stride, int64_t dim, int64_t row_lo, int64_t rows,
                       int64_t real_rows, const uint32_t *packed_docs, const float *doc_norms, const float *doc_resid,
                       const float *docs, int64_t doc_stride,
                       int64_t doc_count, int64_t real_docs, int64_t first_doc, float *thresholds, uint64_t *pools,
                       int64_t capacity, int32_t *fills, int64_t k, int32_t *non_finite)
{
    if (row_lo % TK_SCREEN_MR || rows % TK_SCREEN_MR || doc_count % TK_SCREEN_NR || capacity < k + 128 ||
        !tk_screen_supported())
        return -1;
#ifdef TK_HAVE_AVX2
    return tk_screen_scan_avx512(packed_queries, query_a, query_b, queries, query_stride, dim, row_lo, rows,
                                 real_rows, packed_docs, doc_norms, doc_resid, docs, doc_stride, doc_count, real_docs,
                                 first_doc, thresholds, pools, capacity, fills, k, non_finite);
#else
    (void)packed_queries, (void)query_a, (void)query_b, (void)queries, (void)query_stride, (void)dim;
    (void)real_rows, (void)packed_docs, (void)doc_norms, (void)doc_resid, (void)docs, (void)doc_stride;
    (void)real_docs, (void)first_doc;
    (void)thresholds, (void)pools, (void)fills, (void)non_finite;
    return -1;
#endif
}

/* tk_dot_tile_avx512's scores; returns -1 (nothing written) without AVX-512. */
int32_t tk_dot_tile(const float *queries, int64_t query_stride, int64_t rows, const float *docs, int64_t doc_stride,
                    int64_t cols, int64_t dim, float *out, int64_t out_stride)
{
    if (!tk_product_supported()) return -1;
#ifdef TK_HAVE_AVX2
    tk_dot_tile_avx512(queries, query_stride, rows, docs, doc_stride, cols, dim, out, out_stride);
    return 0;
#else
    (void)queries, (void)query_stride, (void)rows, (void)docs, (void)doc_stride, (void)cols, (void)dim, (void)out;
    (void)out_stride;
    return -1;
#endif
}

static struct PyModuleDef tk_module = {PyModuleDef_HEAD_INIT, "_select", "ctypes-loaded selection kernel", -1,
                                       NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__select(void) { return PyModule_Create(&tk_module); }
