/* The exact score of a pair of rows: tiny-knn's one definition of a score (see tk.h), on every CPU, and the
 * functions that compute it for many pairs (tiles, candidates, rows scaled to unit length for cosine).
 *
 * tk_dot is bit-identical across its three forms: AVX-512 (tk.h), AVX2 with FMA (sixteen lanes as two
 * registers), and portable C with fmaf (one fused multiply-add per term, as the hardware's; any C99 compiler,
 * ARM included). Tests compare all three with an exactly rounded rational model. */
#define _POSIX_C_SOURCE 200809L
#include "tk.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

/* tk_dot in portable C: the same lanes, chains and tree as tk_dot_avx512. */
static float tk_dot_portable(const float *a, const float *b, int64_t dim)
{
    float acc[4][16] = {{0.0f}};
    for (int64_t i = 0; i < dim; i++) acc[(i >> 4) & 3][i & 15] = fmaf(a[i], b[i], acc[(i >> 4) & 3][i & 15]);
    float sum[16], half[8], quarter[4];
    for (int l = 0; l < 16; l++) sum[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    for (int l = 0; l < 8; l++) half[l] = sum[l] + sum[l + 8];
    for (int l = 0; l < 4; l++) quarter[l] = half[l] + half[l + 4];
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

#ifdef TK_X86
/* tk_dot with AVX2 and FMA: each sixteen-lane accumulator as two eight-lane registers. Lanes past the last
 * dimension are left untouched (a blend), as the AVX-512 form's masked lanes are: fma(0, 0, lane) would turn a
 * lane of -0.0 (a negative product that underflows rounds to -0.0) into +0.0. */
__attribute__((target("avx2,fma"))) static float tk_dot_avx2(const float *a, const float *b, int64_t dim)
{
    __m256 acc[4][2];
    for (int c = 0; c < 4; c++) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= dim; i += 64)
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++)
                acc[c][h] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16 * c + 8 * h),
                                            _mm256_loadu_ps(b + i + 16 * c + 8 * h), acc[c][h]);
    for (int c = 0; c < 4; c++)
        for (int h = 0; h < 2; h++) {
            int64_t left = dim - i - 16 * c - 8 * h;
            if (left <= 0) continue;
            __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? left : 8)), lanes);
            __m256 summed = _mm256_fmadd_ps(_mm256_maskload_ps(a + i + 16 * c + 8 * h, mask),
                                            _mm256_maskload_ps(b + i + 16 * c + 8 * h, mask), acc[c][h]);
            acc[c][h] = _mm256_blendv_ps(acc[c][h], summed, _mm256_castsi256_ps(mask));
        }
    __m256 low = _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[1][0]), _mm256_add_ps(acc[2][0], acc[3][0]));
    __m256 high = _mm256_add_ps(_mm256_add_ps(acc[0][1], acc[1][1]), _mm256_add_ps(acc[2][1], acc[3][1]));
    __m256 half = _mm256_add_ps(low, high); /* lane l: sum[l] + sum[l + 8] */
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
}

TK_AVX512 static float tk_dot_avx512_call(const float *a, const float *b, int64_t dim)
{
    return tk_dot_avx512(a, b, dim);
}
#endif

typedef float (*tk_dot_fn)(const float *, const float *, int64_t);

/* The form of tk_dot: 0 portable, 1 AVX2 with FMA, 2 AVX-512; NULL where the CPU lacks it. */
static tk_dot_fn tk_dot_form(int form)
{
#ifdef TK_X86
    if (form == 2) return (tk_cpu() & TK_HAS_AVX512) ? tk_dot_avx512_call : NULL;
    if (form == 1) return (tk_cpu() & TK_HAS_AVX2_FMA) ? tk_dot_avx2 : NULL;
#endif
    return form == 0 ? tk_dot_portable : NULL;
}

static tk_dot_fn tk_dot_widest(void)
{
    static tk_dot_fn widest = NULL;
    if (!widest) widest = tk_dot_form(2) ? tk_dot_form(2) : tk_dot_form(1) ? tk_dot_form(1) : tk_dot_portable;
    return widest;
}

float tk_dot(const float *a, const float *b, int64_t dim) { return tk_dot_widest()(a, b, dim); }

float tk_l2(const float *a, const float *b, int64_t dim)
{
    double acc[TK_LANES] = {0};
    int64_t i = 0;
    for (; i + TK_LANES <= dim; i += TK_LANES)
        for (int j = 0; j < TK_LANES; j++) {
            double t = (double)a[i + j] - (double)b[i + j];
            acc[j] += t * t;
        }
    for (; i < dim; i++) {
        double t = (double)a[i] - (double)b[i];
        acc[i % TK_LANES] += t * t;
    }
    return (float)(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
}

/* Exact scores of query rows [0, rows) by doc rows [0, cols) into out (out_stride apart): tk_dot in the given
 * form (-1: the widest), or tk_l2 (squared = 1). Returns -1, writing nothing, where the CPU lacks the form. */
int32_t tk_exact_tile(int32_t form, int32_t squared, const float *queries, int64_t query_stride, int64_t rows,
                      const float *docs, int64_t doc_stride, int64_t cols, int64_t dim, float *out, int64_t out_stride)
{
    tk_dot_fn dot = form < 0 ? tk_dot_widest() : tk_dot_form(form);
    if (!dot) return -1;
    tk_fpstate saved = tk_ieee_begin();
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            const float *q = queries + r * query_stride, *d = docs + c * doc_stride;
            out[r * out_stride + c] = squared ? tk_l2(q, d, dim) : dot(q, d, dim);
        }
    tk_ieee_end(saved);
    return 0;
}

/* Scales rows [0, rows) (row_stride floats apart) to unit length in place, for cosine: x / sqrtf(tk_dot(x, x)).
 * A row whose squares sum to zero stays as it is; one whose float32 sum overflows is scaled by its norm in
 * double (rounded to float32) instead. */
void tk_normalize(float *x, int64_t row_stride, int64_t rows, int64_t dim)
{
    tk_fpstate saved = tk_ieee_begin();
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * row_stride;
        float squares = tk_dot(row, row, dim);
        if (!(squares > 0.0f)) continue; /* zero, or NaN (refused later) */
        float norm = sqrtf(squares);
        if (isinf(squares)) {
            double sum = 0.0;
            for (int64_t i = 0; i < dim; i++) sum += (double)row[i] * (double)row[i];
            norm = (float)sqrt(sum);
        }
        for (int64_t i = 0; i < dim; i++) row[i] = row[i] / norm;
    }
    tk_ieee_end(saved);
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
    if (sigaction(SIGBUS, NULL, &current) == 0 &&
        !((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == tk_guard_handler)) {
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

static inline double tk_term(float doc, float query, int squared)
{
    double t = (double)doc - (double)query;
    return squared ? t * t : (double)doc * (double)query;
}

static void tk_exact_rows(const float *docs, int64_t row_stride, const float *queries, int64_t query_stride,
                          int64_t dim, const int64_t *indices, int64_t rows, int64_t cands, double *out, int squared)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *query = queries + r * query_stride;
        for (int64_t c = 0; c < cands; c++) {
            const float *doc = docs + indices[r * cands + c] * row_stride;
            double acc[TK_LANES] = {0};
            int64_t i = 0;
            for (; i + TK_LANES <= dim; i += TK_LANES)
                for (int j = 0; j < TK_LANES; j++) acc[j] += tk_term(doc[i + j], query[i + j], squared);
            for (; i < dim; i++) acc[i % TK_LANES] += tk_term(doc[i], query[i], squared);
            out[r * cands + c] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
    }
}

/* Exact re-scoring of candidates (refine.py, for the paths that select by search keys: the GPU's, and the CPU's
 * without this kernel): for each query row r and candidate c, with doc = row indices[r * cands + c] of the
 * float32 rows at `docs` (row_stride floats apart), out[r * cands + c] is the float64 sum, in tk_l2's lanes and
 * tree, of (doc[i] - query_r[i])^2 (squared = 1; tk_l2 before its rounding to float32) or of doc[i] * query_r[i]
 * (squared = 0). The docs may be a file's memory map: returns 0, or TK_INPUT_CHANGED if it shrank under the
 * read. */
static int32_t tk_exact_guarded(const float *docs, int64_t row_stride, const float *queries, int64_t query_stride,
                                int64_t dim, const int64_t *indices, int64_t rows, int64_t cands, double *out,
                                int squared)
{
    TK_GUARDED(tk_exact_rows(docs, row_stride, queries, query_stride, dim, indices, rows, cands, out, squared));
    return 0;
}

int32_t tk_exact(const float *docs, int64_t row_stride, const float *queries, int64_t query_stride, int64_t dim,
                 const int64_t *indices, int64_t rows, int64_t cands, double *out, int32_t squared)
{
    tk_fpstate saved = tk_ieee_begin();
    int32_t status = tk_exact_guarded(docs, row_stride, queries, query_stride, dim, indices, rows, cands, out,
                                      squared != 0);
    tk_ieee_end(saved);
    return status;
}
