#!/usr/bin/env bash
# tiny-knn's estimators on this machine's processor (for a machine the development VM is not: a GPU machine's
# host, say): the bit-for-bit tests of the exact score and of every estimator on this processor, then each
# estimator forced, the measured default and FAISS, as whole CLI processes (benchmarks/estimators.py, 4,096 x
# 200,000 x 384, k = 10 and 2000, 3 runs), on 2 threads and on all.
# Usage, from the repository root: OUT=DIR bash benchmarks/cpu_check.sh   (estimators.json copies land in OUT)
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # absolute: the benchmark's children run elsewhere
OUT=${OUT:-/tmp/cpu-check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python3 setup.py -q build_ext --inplace 2>&1 | tail -3  # a fresh machine has no kernel, and without it no estimator
python3 -c "from tiny_knn import estimators; print('estimators that run here:', estimators.available())"
lscpu | grep -E '^(Model name|CPU\(s\)|L2 cache|L3 cache)'
for flag in avx2 fma avx512f avx512bw avx512_bf16 amx_bf16; do
    grep -qw "$flag" /proc/cpuinfo && echo "$flag: yes" || echo "$flag: no"
done
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_exact.py tests/test_estimators.py 2>&1 | tail -2
python3 -c "import torch; print(torch.__config__.show())" | grep -iE 'mkl|dnn|cpu capability' | head -4
for threads in 2 "$(nproc)"; do
    echo "--- $threads threads"
    OMP_NUM_THREADS=$threads timeout 900 python3 benchmarks/estimators.py --ks 10,2000 --runs 3 --out "$WORK" \
        >"$WORK/log" 2>&1 || tail -5 "$WORK/log"
    grep -vE '^run ' "$WORK/log" | tail -24
    cp "$WORK/estimators.json" "$OUT/cpu-$threads-estimators.json" 2>/dev/null
done
rm -rf "$WORK"
