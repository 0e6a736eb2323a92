#!/usr/bin/env bash
# The test suite and the bench on a GPU machine (no network): build, pytest on CUDA, compute-sanitizer over a few
# tests, pmrl-bench (M = 4, and the Gram target at M = 16), ncu on the Gram kernels. Each step has its own timeout
# (build 150 s, pytest 60, bench 45, bench_m16 30, memcheck and racecheck 30 each, ncu 30 + 10); a step cut by its
# timeout gets SIGINT first, so pytest and the bench still write what they have. A failed step does not stop the
# others, and the script exits 1 when any step failed.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh
#   PMRL_K="cuda and not triton" bash benchmarks/gpu_run.sh              # a subset of the tests (pytest -k)
#   PMRL_BENCH_SIZES="B=4096,65536;M=4;D=512" bash benchmarks/gpu_run.sh  # the bench's --sizes
#   PMRL_BENCH_ARGS="--targets loss --providers torch,compiled,cuda,blocked" bash benchmarks/gpu_run.sh
#   PMRL_CUDA_MAX_LANES=8 bash benchmarks/gpu_run.sh   # the CUDA kernels at 8 lanes an instance (read each launch)
#   bash benchmarks/gpu_run.sh --cpu-smoke   # CPU only: the pytest and bench steps at CPU sizes
#   bash benchmarks/gpu_run.sh --dry-run     # print each step's command, run nothing (with or without --cpu-smoke)
#
# Variables (defaults below): PMRL_TESTS (test files), PMRL_K (-k of the test step), PMRL_SANITIZER_K (-k of the
# sanitizer steps), PMRL_BENCH_SIZES, PMRL_BENCH_ARGS (the bench's other flags), PYTHON. Written into $OUT
# (default ./out/gpu_run): steps.tsv (step, exit status, seconds; the build's seconds are the build time),
# pytest.xml, memcheck.xml, racecheck.xml (JUnit XML), bench/ and bench_m16/ (the bench's rows.json, rows.csv,
# report.txt, plot.png), ncu.ncu-rep and ncu.csv, and each step's output as <step>.log.
set -uo pipefail  # no -e: a failing step is recorded and the next one runs

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
MODE=gpu DRY=0
for arg in "$@"; do
  case $arg in
    --cpu-smoke) MODE=cpu ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu_run.sh [--cpu-smoke] [--dry-run]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out/gpu_run}
((DRY)) || { mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); }
if [[ $MODE == cpu ]]; then  # the same steps at CPU sizes, Triton in its interpreter
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  DEFAULT_K="blocked and float32 and 9x2x7" DEFAULT_SIZES="B=32,64;M=4;D=16" DEFAULT_BENCH_ARGS=--quick DEVICE=cpu
else
  # the two kernels' own targets, without torch.compile (seconds of compiling a cell): PMRL_BENCH_ARGS= (empty)
  # runs every target and provider
  DEFAULT_K="cuda and float32" DEFAULT_SIZES="B=65536;M=4;D=512" DEVICE=cuda
  DEFAULT_BENCH_ARGS="--targets gram_svd,contrastive --providers recipe,svd,torch,reference,cuda,blocked,triton"
fi
DEFAULT_TESTS="tests/test_conformance.py tests/test_extension.py tests/test_blocked.py tests/test_triton.py"
read -ra TESTS <<<"${PMRL_TESTS:-$DEFAULT_TESTS}"
# M = 3 and 2 (the CUDA kernels with whole matrices a lane, Triton's chunked-fault input) and 11 (the warp kernels)
SAN_K=${PMRL_SANITIZER_K:-cuda and float32 and (7x3x33 or 9x2x7 or 3x11x17)}
read -ra BENCH_ARGS <<<"${PMRL_BENCH_ARGS-$DEFAULT_BENCH_ARGS}"
PYTEST=("$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider)
BENCH=("$PY" -m pmrl_kernels.bench --no-progress --device "$DEVICE")
NCU_METRICS=dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,launch__registers_per_thread,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1
FAILED=()
((DRY)) || printf 'step\trc\tseconds\n' >"$OUT/steps.tsv"

step() {  # step NAME SECONDS CMD...: CMD under timeout (SIGINT first: the bench then writes the rows it has)
  local name=$1 secs=$2 t0=$SECONDS rc
  shift 2
  if ((DRY)); then printf '%s\t' "$name"; printf '%q ' "$@"; echo; return 0; fi
  echo "== $name (timeout ${secs}s): $*"
  timeout -s INT -k 15 "$secs" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  ((rc == 0)) || FAILED+=("$name")
  return "$rc"
}

par=()
if [[ $MODE != cpu ]]; then
  [[ -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null && export PATH=/usr/local/cuda/bin:$PATH
  if step build 150 env MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    export PMRL_REQUIRE_EXTENSION=1  # a built extension is tested, not skipped
  else
    export PMRL_SKIP_EXTENSION=1  # a failed build is not compiled again on first use by every later step
  fi
  "$PY" -c 'import xdist' 2>/dev/null && par=(-n 8)
fi
step pytest 60 "${PYTEST[@]}" "${par[@]}" "${TESTS[@]}" -k "${PMRL_K:-$DEFAULT_K}" --junitxml "$OUT/pytest.xml"
step bench 45 "${BENCH[@]}" --sizes "${PMRL_BENCH_SIZES:-$DEFAULT_SIZES}" --out "$OUT/bench" "${BENCH_ARGS[@]}"
if [[ $MODE != cpu ]]; then
  # the eigen-solve at M = 16 (CUDA's warp kernels, Triton, the chunked torch baselines); the contrastive term does
  # not depend on M
  step bench_m16 30 "${BENCH[@]}" --sizes "B=65536;M=16;D=512" --out "$OUT/bench_m16" --targets gram_svd \
    --providers svd,torch,reference,cuda,triton
  # every tensor its own cudaMalloc, or memcheck cannot see an overrun inside a cached block
  step memcheck 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    --target-processes all "${PYTEST[@]}" "${TESTS[@]}" -k "$SAN_K" --junitxml "$OUT/memcheck.xml"
  # shared memory: Triton's kernels, and the CUDA warp backward's coefficient rows
  step racecheck 30 compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
    "${PYTEST[@]}" "${TESTS[@]}" -k "$SAN_K" --junitxml "$OUT/racecheck.xml"
  step ncu 30 ncu --target-processes all --clock-control none --kernel-name-base demangled \
    --kernel-name "regex:gram_eig|forward_kernel|backward_kernel" --launch-count 12 --metrics "$NCU_METRICS" \
    --export "$OUT/ncu" --force-overwrite "${BENCH[@]}" --no-save --targets gram_svd --modes full \
    --providers cuda,triton --sizes "B=65536;M=4,16;D=512" --repeats 1
  step ncu_csv 10 ncu --import "$OUT/ncu.ncu-rep" --csv --page raw --log-file "$OUT/ncu.csv"
fi

((DRY)) && exit 0
if ((${#FAILED[@]})); then echo "failed steps: ${FAILED[*]}"; exit 1; fi
echo "every step passed"
