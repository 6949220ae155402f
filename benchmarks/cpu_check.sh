#!/usr/bin/env bash
# The CPU kernel's products (the screen and the float32 kernel) against torch.mm (MKL) on this machine's
# processor, and tiny-knn on the CPU with each, on 2 threads and on all (benchmarks/bench.py, 4,096 x
# 200,000 x 384, k = 10 and 2000); first, the screen's bit-for-bit tests on this processor's VDPBF16PS. For
# machines where MKL has its own AVX-512 path (Intel), which the development VM (AMD) cannot show.
# Usage, from the repository root: OUT=DIR bash benchmarks/cpu_check.sh   (bench.json copies land in OUT)
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # absolute: bench.py's workers run elsewhere
OUT=${OUT:-/tmp/cpu-check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python3 setup.py -q build_ext --inplace 2>&1 | tail -3  # a fresh machine has no kernel: without it, no "kernel" product
python3 -c "import tiny_knn.product as p; print('kernel product:', p.kernel_product_available(), 'screen:', p.screen_available())"
lscpu | grep -E '^(Model name|CPU\(s\)|L2 cache|L3 cache)'
grep -q avx512f /proc/cpuinfo && echo "AVX-512: yes" || echo "AVX-512: no"
grep -q avx512_bf16 /proc/cpuinfo && echo "AVX-512 BF16: yes" || echo "AVX-512 BF16: no"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_topk.py tests/test_product.py -k "screen or product" 2>&1 | tail -2
python3 -c "import torch; print(torch.__config__.show())" | grep -iE 'mkl|cpu capability' | head -3
for threads in 2 "$(nproc)"; do
    for product in screen kernel torch; do  # the floor (every product's best shape) is timed once per thread count
        if [ "$product" = screen ]; then contenders=floor,tiny-knn; else contenders=tiny-knn; fi
        export TINY_KNN_PRODUCT=$product
        echo "--- $threads threads, tiny-knn's product: $product"
        timeout 200 python3 benchmarks/bench.py --contenders "$contenders" --ks 10,2000 --repeats 2 \
            --threads "$threads" --out "$WORK" >"$WORK/log" 2>&1 || tail -5 "$WORK/log"
        grep -E '^(floor:|tiny-knn |floor |k=)' "$WORK/log"
        cp "$WORK/bench.json" "$OUT/cpu-$threads-$product.json" 2>/dev/null
    done
done
unset TINY_KNN_PRODUCT
rm -rf "$WORK"
