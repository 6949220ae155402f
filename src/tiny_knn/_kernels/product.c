/* The float32 product on packed operands (AVX-512): one of the screen's estimators (screen.c), and the writer of
 * its estimate tiles (for tests). Each estimate is one float32 fused multiply-add chain over the dimensions in
 * order, starting from zero. Both operands are packed first (tk_pack): queries in panels of TK_MR rows, docs in
 * panels of TK_NR rows, each panel dimension-major, so that the micro-kernel (tk_micro_f32, tk.h) reads both
 * sequentially: per dimension, TK_NR doc values as two vectors and TK_MR broadcast query values, into
 * TK_MR x TK_NR accumulators held in registers. On AMD Zen 5, where MKL's sgemm takes its AVX2 path, this runs at
 * about 2.3 x torch.mm (benchmarks/RESULTS.md). */
#include "tk.h"

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

int tk_product_supported(void) { return (tk_cpu() & TK_HAS_AVX512) != 0; }

#ifdef TK_X86
/* out[r, j] for query rows row_lo + r (r < rows) and docs doc_lo + j (j < doc_count), from packed operands. */
TK_AVX512 static void tk_product_avx512(const float *queries, int64_t dim, int64_t row_lo, int64_t rows,
                                        const float *docs, int64_t doc_lo, int64_t doc_count, float *out,
                                        int64_t out_stride)
{
    for (int64_t j = 0; j < doc_count; j += TK_NR)
        for (int64_t r = 0; r < rows; r += TK_MR) {
            __m512 acc[TK_MR][2];
            tk_micro_f32(queries + (row_lo + r) * dim, docs + (doc_lo + j) * dim, dim, acc);
            for (int i = 0; i < TK_MR; i++) {
                _mm512_storeu_ps(out + (r + i) * out_stride + j, acc[i][0]);
                _mm512_storeu_ps(out + (r + i) * out_stride + j + 16, acc[i][1]);
            }
        }
}
#endif

/* The estimates of query rows row_lo.. (rows of them) by docs doc_lo.. (doc_count), packed by tk_pack with panels
 * of TK_MR and TK_NR, into out. Returns -1 (nothing written) if the operands are not panel-aligned, or without
 * AVX-512. */
int32_t tk_product(const float *queries, int64_t dim, int64_t row_lo, int64_t rows, const float *docs,
                   int64_t doc_lo, int64_t doc_count, float *out, int64_t out_stride)
{
    if (row_lo % TK_MR || rows % TK_MR || doc_lo % TK_NR || doc_count % TK_NR || !tk_product_supported()) return -1;
#ifdef TK_X86
    tk_product_avx512(queries, dim, row_lo, rows, docs, doc_lo, doc_count, out, out_stride);
    return 0;
#else
    (void)queries, (void)dim, (void)docs, (void)out, (void)out_stride;
    return -1;
#endif
}
