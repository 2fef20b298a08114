#!/usr/bin/env bash
# One script for a lent GPU machine (torch preinstalled, no network): build for sm_90, run the CUDA and compiled
# Triton tests, compute-sanitizer on small cases, and the benchmark runner on CUDA. Everything it prints also goes
# to $OUT (or benchmarks/results/) as <card>-<date>.* files to commit. Each step runs even if an earlier one failed.
#   bash benchmarks/gpu_check.sh    at most ~9 minutes on an H100/H200 (a ~2 min build, then steps with time
#                                   limits: raise the T_* variables below where a machine is lent for longer)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
stamp=$(date -u +%Y%m%d)
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/${card}-${stamp}-gpu_check.log"
exec > >(tee "$log") 2>&1
status=0
step() { echo; echo "== $1 ($(date -u +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY -c "import torchvision; print('torchvision', torchvision.__version__)" || true

step "build (sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
t0=$(date +%s)
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . ; then
  echo "pip editable install failed; building in place"
  $PY setup.py -q build_ext --inplace || { echo "BUILD FAILED"; exit 1; }
fi
echo "build took $(( $(date +%s) - t0 )) s"
$PY -c "import visionops; print(visionops.build_info())" || { echo "IMPORT FAILED"; exit 1; }

# Step limits (seconds) keep the whole script within a lent machine's time; newest kernels first in each step.
T_NEW=${T_NEW:-90} T_TESTS=${T_TESTS:-60} T_SAN=${T_SAN:-40} T_BENCH_NEW=${T_BENCH_NEW:-50} T_BENCH=${T_BENCH:-70}
T_REL=${T_REL:-60} T_RACE=${T_RACE:-40}
NEW_TESTS=${NEW_TESTS:-"tests/test_rcnn.py tests/test_ssd.py tests/test_conv.py tests/test_multiclass_nms.py tests/test_matrix_nms.py tests/test_retinanet.py tests/test_xcorr.py tests/test_soft_nms.py"}
NEW_BENCH=${NEW_BENCH:-"fast_rcnn_\w+|faster_rcnn_\w+|mask_rcnn_\w+|ssd_\w+|conv2d|conv3d|multiclass_nms|matrix_nms|xcorr|depthwise_xcorr|soft_nms"}

step "tests on CUDA of the newest families ($NEW_TESTS; compiled Triton, not interpreted)"
VISIONOPS_TEST_CUDA=1 timeout $T_NEW $PY -m pytest $NEW_TESTS -q --maxfail=20 -p no:cacheprovider -k "cuda" \
  --junitxml="$out/${card}-${stamp}-tests-new.xml" || status=1

step "conv kernels (C++ CUDA) against F.conv2d/F.conv3d over random configurations"
timeout ${T_CONV:-30} $PY benchmarks/conv_cuda_check.py || status=1

step "the other tests on CUDA"
deselect=$(for f in $NEW_TESTS; do printf -- "--ignore=%s " "$f"; done)
VISIONOPS_TEST_CUDA=1 timeout $T_TESTS $PY -m pytest tests $deselect -q --maxfail=10 -p no:cacheprovider \
  -k "cuda or triton" --junitxml="$out/${card}-${stamp}-tests.xml" || status=1

step "reliability of every op (C++ and Triton): side stream, memory leaks, determinism, CUDA graphs, second GPU"
timeout $T_REL $PY benchmarks/cuda_reliability.py | tee "$out/${card}-${stamp}-reliability.txt" || status=1

step "compute-sanitizer memcheck on small cases of every kernel"
timeout $T_SAN compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitizer_cases.py || status=1

step "compute-sanitizer racecheck (shared memory hazards) on the same cases"
timeout $T_RACE compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 \
  $PY benchmarks/sanitizer_cases.py || status=1

step "benchmarks (CUDA), newest families first"
timeout $T_BENCH_NEW $PY -m visionops.bench --device cuda --filter "$NEW_BENCH" --no-plot --out "$out/new" || status=1
timeout $T_BENCH $PY -m visionops.bench --device cuda --filter "^(?!($NEW_BENCH) )" --out "$out" || status=1
for f in "$out"/bench-cuda-*.json "$out"/bench-cuda-*.png "$out"/new/bench-cuda-*.json; do
  [ -e "$f" ] || continue
  case "$f" in */new/*) tag=new-;; *) tag=;; esac
  mv "$f" "$out/${card}-${stamp}-${tag}$(basename "$f" | sed 's/-[0-9]\{8\}-[0-9]\{6\}//')"
done
rmdir "$out/new" 2>/dev/null

step "done: status $status"
exit $status
