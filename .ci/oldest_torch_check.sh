#!/usr/bin/env bash
# The torch floor in pyproject.toml (`torch>=X.Y`) holds: in a fresh virtual environment WITHOUT the system
# site-packages, install torch X.Y.0 from the package index (and the libraries it needs to import, but not triton),
# build visionops CPU-only against it with `pip install --no-build-isolation --no-deps .`, and run .ci/smoke.py from
# outside the checkout, checking on the way that visionops imports without triton.
#
# VISIONOPS_OLDEST_TORCH=2.x.y tests another torch release instead of the floor.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
unset FORCE_CUDA
tmp=$(mktemp -d "${TMPDIR:-/tmp}/visionops-oldest-torch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
step() { echo "-- [$(( $(date +%s) - t0 )) s] $*"; }

floor=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
(spec,) = [d for d in deps if re.match(r"torch\b", d)]
m = re.fullmatch(r"torch\s*>=\s*([0-9]+(?:\.[0-9]+)*)", spec.strip())
assert m, f"expected torch>=X.Y in pyproject.toml dependencies, got {spec!r}"
v = m.group(1).split(".")
print(".".join((v + ["0", "0"])[:3]))
PY
)
version=${VISIONOPS_OLDEST_TORCH:-$floor}
step "torch $version (pyproject.toml: torch>=${floor%.0}) into a fresh venv without system site-packages"
python -m venv "$tmp/venv"
py=$tmp/venv/bin/python
# torch's PyPI wheels for Linux are CUDA builds whose libraries link the CUDA runtime even for CPU use: install torch
# without its dependencies, then all of them (the nvidia-* libraries included) except triton.
"$py" -m pip install -q --no-deps "torch==$version" > "$tmp/torch.log" 2>&1 || { cat "$tmp/torch.log"; exit 1; }
"$py" - > "$tmp/torch-deps.txt" <<'PY'
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement

for line in md.requires("torch") or []:
    req = Requirement(line)
    if req.name == "triton" or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PY
"$py" -m pip install -q -r "$tmp/torch-deps.txt" numpy "setuptools>=64" wheel ninja pytest > "$tmp/deps.log" 2>&1 \
  || { cat "$tmp/deps.log"; exit 1; }
if "$py" -c 'import triton' 2>/dev/null; then echo "triton is installed: this check must run without it"; exit 1; fi
"$py" -c 'import torch, setuptools; print("torch", torch.__version__, "| setuptools", setuptools.__version__)'

step "build visionops (CPU) against torch $version"
"$py" -m pip install -v --no-build-isolation --no-deps . > "$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
grep -o -m1 -e '-std=c++[0-9a-z]*' "$tmp/build.log" | sed 's/^/compiled with /' || true
# Every requirement of visionops and of torch is met, except torch's triton, which is left out on purpose.
problems=$("$py" -m pip check 2>&1 | grep -v -E "^(No broken requirements found|torch .* requires triton, which is not installed)" || true)
if [ -n "$problems" ]; then echo "pip check: $problems"; exit 1; fi

step "smoke test without triton (outside the checkout)"
cpu_only=()
"$py" -c 'import sys, torch; sys.exit(torch.cuda.is_available())' && cpu_only=(--cpu-only)
(cd "$tmp" && "$py" "$repo/.ci/smoke.py" --no-triton --forbid "$repo" "${cpu_only[@]}")

step "oldest torch check done"
