#!/usr/bin/env bash
# The source distribution is complete and builds: make the sdist, check that it ships every source, header and CMake
# file git tracks, install it (CPU-only: FORCE_CUDA unset, no GPU) with pip into a fresh virtual environment that
# borrows the installed torch, and run .ci/smoke.py there from outside the checkout. Then build a wheel from the
# checkout with `pip wheel`, install it into a second fresh environment and run the smoke test again.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
unset FORCE_CUDA
tmp=$(mktemp -d "${TMPDIR:-/tmp}/visionops-sdist.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
step() { echo "-- [$(( $(date +%s) - t0 )) s] $*"; }

step "sdist"
python -c 'import build' 2>/dev/null || python -m pip install -q build
python -m build --sdist --no-isolation --outdir "$tmp/dist" . > "$tmp/sdist.log" 2>&1 || { cat "$tmp/sdist.log"; exit 1; }
sdist=$(ls "$tmp"/dist/visionops-*.tar.gz)
echo "$(basename "$sdist"): $(tar tzf "$sdist" | grep -vc '/$') files"

# Everything git tracks that a build (setup.py with or without CUDA, or CMake) or the tests can need.
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  top=$(basename "$sdist" .tar.gz)
  tar tzf "$sdist" | sed "s|^$top/||" | sort > "$tmp/shipped.txt"
  git ls-files -- csrc CMakeLists.txt cmake tests setup.py pyproject.toml MANIFEST.in README.md requirements-ci.txt \
    visionops 'LICENSE*' | sort > "$tmp/needed.txt"
  missing=$(comm -13 "$tmp/shipped.txt" "$tmp/needed.txt")
  if [ -n "$missing" ]; then
    echo "the sdist lacks files that git tracks (add them to MANIFEST.in):"; echo "$missing"; exit 1
  fi
fi

step "install the sdist into a fresh venv (system site-packages: the installed torch)"
python -m venv --system-site-packages "$tmp/venv-sdist"
# --no-cache-dir: pip would keep the wheel it builds from the sdist, under this run's temporary path, for good.
"$tmp/venv-sdist/bin/python" -m pip install --no-cache-dir --no-build-isolation --no-deps "$sdist" \
  > "$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; exit 1; }
cpu_only=()
"$tmp/venv-sdist/bin/python" -c 'import sys, torch; sys.exit(torch.cuda.is_available())' && cpu_only=(--cpu-only)

step "smoke test (outside the checkout)"
(cd "$tmp" && "$tmp/venv-sdist/bin/python" "$repo/.ci/smoke.py" --forbid "$repo" "${cpu_only[@]}")

step "wheel from the checkout"
python -m pip wheel --no-cache-dir --no-build-isolation --no-deps . -w "$tmp/wheels" > "$tmp/wheel.log" 2>&1 \
  || { cat "$tmp/wheel.log"; exit 1; }
wheel=$(ls "$tmp"/wheels/visionops-*.whl)
python -m zipfile -l "$wheel" | awk '$1 ~ /\.so$/ {print "  " $1}'

step "install $(basename "$wheel") into a second fresh venv"
python -m venv --system-site-packages "$tmp/venv-wheel"
# --force-reinstall: a visionops of the same version installed system-wide must not stand in for the wheel.
"$tmp/venv-wheel/bin/python" -m pip install -q --no-cache-dir --no-deps --force-reinstall "$wheel"
(cd "$tmp" && "$tmp/venv-wheel/bin/python" "$repo/.ci/smoke.py" --forbid "$repo" "${cpu_only[@]}")

step "sdist check done"
