#!/usr/bin/env bash
# One script for a lent GPU machine (torch preinstalled, no network): build for sm_90, run the CUDA and compiled
# Triton tests, compute-sanitizer on small cases, and the benchmark runner on CUDA. Everything it prints also goes
# to $OUT (or benchmarks/results/) as <card>-<date>.* files to commit. Each step runs even if an earlier one failed.
#   bash benchmarks/gpu_check.sh            (about 6-8 minutes on an H100/H200)
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

step "tests on CUDA (compiled Triton, not interpreted)"
VISIONOPS_TEST_CUDA=1 timeout 240 $PY -m pytest tests -q --maxfail=10 -p no:cacheprovider -k "cuda or triton" \
  --junitxml="$out/${card}-${stamp}-tests.xml" || status=1

step "compute-sanitizer memcheck on small cases"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitizer_cases.py || status=1

step "benchmarks (CUDA)"
timeout 240 $PY -m visionops.bench --device cuda --out "$out" || status=1
for f in "$out"/bench-cuda-*.json "$out"/bench-cuda-*.png; do
  [ -e "$f" ] && mv "$f" "$out/${card}-${stamp}-$(basename "$f" | sed 's/-[0-9]\{8\}-[0-9]\{6\}//')"
done

step "done: status $status"
exit $status
