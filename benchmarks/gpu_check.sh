#!/usr/bin/env bash
# The one prepared GPU check (issue 15): run this on a machine with one H100/H200 and paste
# ${OUT}/summary.md into benchmarks/RESULTS.md. Budget: at most 8 minutes there.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   OUT=/tmp/gpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Steps (each one's output in ${OUT}/<step>.txt, JSON beside it; the time limit of each
# keeps the whole under 8 minutes: 120 + 60 + 150 + 30 + 30 + 90 = 480 s at most, one by one):
#   1. gpu         the gpu-marked tests (Triton kernels on CUDA against float64 references)
#   2. kernels     `stfuse kernels --quick` for the local arch: regs, spills, tensor cores, ...
#   3. gemm        bench_gpu_kernels.py: the paper's GEMM, fp32 and bf16, R over 1..118 (same
#                  shape; FULL=1 adds every R and the mixed-shape sweep)
#   4. host        bench_host_overhead.py: host work per fused call, launches real
#   5. graphs      bench_graphs.py: whole fused programs replayed as CUDA graphs against op by
#                  op (kernels/graphs.py; the gpu step's test_graphs.py checks their outputs)
#   6. models      bench_models.py --quick on CUDA
# Without CUDA (a dry run) it says what it skips, runs what works on a CPU (kernels for
# sm_90, host overhead with the launch stubbed, both shortened) and exits 0.
# FULL=1 runs the full kernel sweep and every R (longer than 8 minutes).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # real kernels; the test suite's conftest sets it only without CUDA

CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  ARCH=$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'sm_{a}{b}')")
  echo "gpu_check: $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())"), $ARCH -> $OUT"
else
  ARCH=sm_90
  echo "gpu_check: DRY RUN, no CUDA device: GPU steps are skipped, CPU-capable ones shortened -> $OUT"
fi
QUICK=--quick; RS=(--rs 1 2 4 8 16 32 64 118 --no-mixed)
if [ "${FULL:-0}" = 1 ]; then QUICK=; RS=(--full); fi

STATUS=()
step() {  # step NAME LIMIT_S NEEDS_CUDA(1/0) COMMAND...
  local name=$1 limit=$2 needs=$3; shift 3
  if [ "$needs" = 1 ] && [ "$CUDA" != 1 ]; then
    echo "SKIPPED $name (needs CUDA): $*" | tee "$OUT/$name.txt"
    STATUS+=("$name: skipped (no CUDA)")
    return
  fi
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.txt"
  STATUS+=("$name: rc=$rc in $((SECONDS - start)) s")
}

step gpu 120 1 "$PYTHON" -m pytest -q -m gpu tests
step kernels 60 0 "$PYTHON" -m stfuse.cli kernels $QUICK -q --jobs "$(nproc 2>/dev/null || echo 4)" --arch "$ARCH" \
  --json "$OUT/kernels.json"
step gemm 150 1 "$PYTHON" benchmarks/bench_gpu_kernels.py "${RS[@]}" --out "$OUT/gpu_kernels.json"
if [ "$CUDA" = 1 ]; then HOST_REPEAT=200; else HOST_REPEAT=20; fi
step host 30 0 "$PYTHON" benchmarks/bench_host_overhead.py --repeat "$HOST_REPEAT" --json "$OUT/host_overhead.json"
step graphs 30 1 "$PYTHON" benchmarks/bench_graphs.py --rs 8 --repeat 30 --json "$OUT/graphs.json"
step models 90 1 "$PYTHON" benchmarks/bench_models.py --quick --device cuda --out "$OUT/models.json"

"$PYTHON" benchmarks/gpu_summary.py "$OUT" "${STATUS[@]}" >"$OUT/summary.md"
echo "wrote $OUT/summary.md:"
cat "$OUT/summary.md"
exit 0
