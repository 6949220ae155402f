#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (its image has torch, pytest, hypothesis; no faiss):
#   1. the C kernel built for that machine's Python;
#   2. tests/test_cuda.py with CUDA required, the Triton screen's check (benchmarks/gpu_screen_check.py, 5 minutes at
#      most), then the whole suite with CUDA present;
#   3. a 1-GPU torchrun run against the plain command (same result file);
#   4. bfloat16 products on the tensor cores: their rate, and their distance from the emulated keys;
#   5. benchmarks/gpu.py's figures, with the arguments given to this script;
#   6. that machine's processor: benchmarks/cpu_check.sh.
# Usage, from the repository root there: OUT=DIR bash benchmarks/gpu_check.sh [gpu.py arguments]
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1  # absolute: benchmark workers run elsewhere
OUT=${OUT:-/tmp/gpu-check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
step() { echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"

step build
python3 setup.py -q build_ext --inplace 2>&1 | tail -3
python3 -c "import tiny_knn.topk as t; print('C kernel:', t.kernel_available())"

step CUDA tests
TINY_KNN_REQUIRE_CUDA=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -4

step "the Triton screen (TINY_KNN_PRODUCT=triton): bits, bound, time against today's path"
timeout 300 python3 benchmarks/gpu_screen_check.py --out "$WORK/screen" 2>&1 | tail -22

step whole suite, CUDA present
timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests 2>&1 | tee "$OUT/suite.log" | tail -12

step torchrun, one GPU
python3 - "$WORK" <<'EOF'
import sys, torch
generator = torch.Generator().manual_seed(3)
torch.save(torch.randn(3001, 128, generator=generator), f"{sys.argv[1]}/q.pt")
torch.save(torch.randn(250001, 128, generator=generator), f"{sys.argv[1]}/d.pt")
EOF
timeout 120 python3 -m tiny_knn "$WORK/q.pt" "$WORK/d.pt" --k 500 --output-path "$WORK/plain.pt" >/dev/null
timeout 120 torchrun --standalone --nproc-per-node 1 -m tiny_knn "$WORK/q.pt" "$WORK/d.pt" --k 500 \
    --output-path "$WORK/torchrun.pt" >/dev/null 2>"$WORK/torchrun.err" || tail -5 "$WORK/torchrun.err"
python3 - "$WORK" <<'EOF'
import sys, torch
plain, ranked = (torch.load(f"{sys.argv[1]}/{name}.pt", weights_only=True) for name in ("plain", "torchrun"))
same = all(torch.equal(plain[key], ranked[key]) for key in ("scores", "indices"))
print(f"device {plain['device']} / {ranked['device']}; scores and indices identical: {same}")
EOF
cmp "$WORK/plain.pt" "$WORK/torchrun.pt" && echo "result files byte-identical"

step bfloat16 products
timeout 120 python3 - <<'EOF'
import torch
def rate(fn, flops):
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return flops * 10 / (start.elapsed_time(stop) / 1000) / 1e12
q32, d32 = torch.randn(16384, 768, device="cuda"), torch.randn(65536, 768, device="cuda")
q16, d16 = q32.bfloat16(), d32.bfloat16()
flops = 2 * 16384 * 65536 * 768
out = torch.empty(16384, 65536, device="cuda")
torch.backends.cuda.matmul.allow_tf32 = False
print(f"fp32            {rate(lambda: torch.mm(q32, d32.T, out=out), flops):7.1f} TFLOP/s")
torch.backends.cuda.matmul.allow_tf32 = True
print(f"tf32            {rate(lambda: torch.mm(q32, d32.T, out=out), flops):7.1f} TFLOP/s")
torch.backends.cuda.matmul.allow_tf32 = False
print(f"bf16 -> bf16    {rate(lambda: torch.mm(q16, d16.T), flops):7.1f} TFLOP/s")
try:
    print(f"bf16 -> fp32    {rate(lambda: torch.mm(q16, d16.T, out_dtype=torch.float32), flops):7.1f} TFLOP/s")
    real = torch.mm(q16[:512], d16.T, out_dtype=torch.float32).double()
except Exception as error:  # older torch: no out_dtype
    print("bf16 -> fp32 (out_dtype):", type(error).__name__, str(error).splitlines()[0])
    real = None
exact = q16[:512].double() @ d16.double().T
scale = q16[:512].double().abs() @ d16.double().abs().T
if real is not None:
    print(f"bf16 -> fp32 error / (sum |q_i d_i| * 2^-24): max {((real - exact).abs() / scale).max().item() * 2**24:.2f}")
emulated = torch.mm(q16[:512].float(), d16.float().T).double()
print(f"emulated fp32 error / (sum |q_i d_i| * 2^-24): max {((emulated - exact).abs() / scale).max().item() * 2**24:.2f}")
EOF

step gpu.py "$@"
timeout 300 python3 benchmarks/gpu.py --out "$WORK/bench" --json "$OUT/gpu.json" "$@" 2>&1 | tail -25
step "CPU: the estimators on the host"
bash benchmarks/cpu_check.sh
rm -rf "$WORK"
step done
