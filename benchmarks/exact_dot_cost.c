/* The cost of one exact score (tk_dot4_avx512: one query row by four doc rows, tk_dot's order) by where the rows
 * live: random doc rows among `docs`, query rows among `queries` (dim 384, 64-byte aligned, 24 pairs a query row).
 * It bounds what scoring the screen's survivors exactly can cost (benchmarks/RESULTS.md, #19). x86 with AVX-512 only.
 *
 *   gcc -O3 -std=c99 -ffp-contract=off -Isrc/tiny_knn/_kernels benchmarks/exact_dot_cost.c -o /tmp/exact_dot_cost
 *   for size in "16 4 200000" "256 256 2000" "1024 1024 500" "4096 1024 500" "200000 4096 50"; do
 *       /tmp/exact_dot_cost $size; done        # docs, queries, repeats
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <time.h>

#include "tk.h"

int tk_cpu(void) { return TK_HAS_AVX512; } /* tk.h declares it; the kernel's probes the CPU */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s DOCS QUERIES REPEATS\n", argv[0]);
        return 2;
    }
    int64_t dim = 384, docs = atoll(argv[1]), queries = atoll(argv[2]), repeats = atoll(argv[3]);
    float *d, *q;
    int32_t *picks = malloc((size_t)queries * 24 * sizeof *picks);
    if (posix_memalign((void **)&d, 64, (size_t)(docs * dim) * 4) ||
        posix_memalign((void **)&q, 64, (size_t)(queries * dim) * 4) || !picks)
        return 1;
    for (int64_t i = 0; i < docs * dim; i++) d[i] = (float)rand() / (float)RAND_MAX;
    for (int64_t i = 0; i < queries * dim; i++) q[i] = (float)rand() / (float)RAND_MAX;
    for (int64_t i = 0; i < queries * 24; i++) picks[i] = rand() % (int)docs;
    float out[4], sink = 0.0f;
    int64_t pairs = 0;
    double started = now();
    for (int64_t repeat = 0; repeat < repeats; repeat++)
        for (int64_t r = 0; r < queries; r++)
            for (int i = 0; i < 24; i += 4) {
                const int32_t *p = picks + r * 24 + i;
                const float *four[4] = {d + p[0] * dim, d + p[1] * dim, d + p[2] * dim, d + p[3] * dim};
                tk_dot4_avx512(q + r * dim, four, dim, out);
                sink += out[0] + out[3];
                pairs += 4;
            }
    double seconds = now() - started;
    printf("docs %lld, queries %lld (%.1f MiB of rows): %.1f ns a pair (%g)\n", (long long)docs, (long long)queries,
           (double)((docs + queries) * dim * 4) / 1048576.0, seconds / (double)pairs * 1e9, (double)sink);
    return 0;
}
