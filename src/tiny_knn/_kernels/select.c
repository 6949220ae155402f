/* The selection, and the module: each query row owns a pool of packed 64-bit keys (score descending, then doc
 * index ascending), so the k best candidates are simply the k smallest keys. A score tile is scanned once against
 * the row's threshold (a score the k-th best so far is at least as good as); only survivors are appended, and a
 * full pool is compacted back to about k keys around a sampled pivot. Selection cost is therefore one vectorised
 * compare per score plus O(1) amortised work per survivor, instead of a top-k over every score.
 *
 * Precondition: for a given row, scores arrive in ascending doc order. Then a new score equal to the threshold
 * always loses the tie to the key that set it (its index is larger), so a strict ">" is exact.
 *
 * Built as a Python extension only so that pip compiles it; Python calls it through ctypes (see tk.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tk.h"

#if defined(__SSE2__) || defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define TK_HAVE_SSE2 1
#endif

/* ---- CPU features: probed once (at load, from PyInit__select). */
static int tk_features = -1;

int tk_cpu(void)
{
    if (tk_features < 0) {
        int features = 0;
#ifdef TK_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !getenv("TINY_KNN_NO_AVX2")) {
            features |= TK_HAS_AVX2_FMA;
            if (__builtin_cpu_supports("avx512f") && !getenv("TINY_KNN_NO_AVX512")) {
                features |= TK_HAS_AVX512;
                if (__builtin_cpu_supports("avx512bw")) features |= TK_HAS_AVX512BW;
                if ((features & TK_HAS_AVX512BW) && __builtin_cpu_supports("avx512bf16")) features |= TK_HAS_AVX512BF16;
            }
        }
#endif
        tk_features = features;
    }
    return tk_features;
}

/* The panel sizes of the packed products, for Python to check against its own: out[0] = TK_MR, out[1] = TK_NR. */
void tk_panels(int32_t *out)
{
    out[0] = TK_MR;
    out[1] = TK_NR;
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
void tk_select_nth(uint64_t *keys, int64_t n, int64_t nth)
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
int64_t tk_compact(uint64_t *pool, int64_t n, int64_t k, float *threshold)
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

#ifdef TK_X86
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
#ifdef TK_X86
    if ((tk_cpu() & TK_HAS_AVX512) && capacity >= k + 128) scan_row = tk_scan_row_avx512;
    else if (tk_cpu() & TK_HAS_AVX2_FMA) scan_row = tk_scan_row_avx2;
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


static struct PyModuleDef tk_module = {PyModuleDef_HEAD_INIT, "_select", "ctypes-loaded kernels of tiny-knn", -1,
                                       NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__select(void)
{
    tk_cpu(); /* the CPU's features, once */
    return PyModule_Create(&tk_module);
}
