#!/usr/bin/env bash
# The source distribution is complete and builds: make the sdist, check that it ships every source, header and CMake
# file git tracks, install it (CPU-only: FORCE_CUDA unset, no GPU) with pip into a fresh virtual environment that
# borrows the installed torch, and run .ci/smoke.py there from outside the checkout. Then install the wheel pip built
# from that sdist into a second fresh environment and check its import and build_info().
#
# The wheel is the one pip built (and cached, in a cache private to this run) while installing the sdist, so _C is
# compiled once (about 2 minutes on 2 cores). VISIONOPS_WHEEL_FROM_CHECKOUT=1 builds it from the checkout instead
# with `pip wheel --no-build-isolation --no-deps .`, which compiles a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
unset FORCE_CUDA
tmp=$(mktemp -d "${TMPDIR:-/tmp}/visionops-sdist.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
step() { echo "-- $* ($(( $(date +%s) - t0 )) s)"; }

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
export PIP_CACHE_DIR="$tmp/pip-cache"  # the wheel pip builds from the sdist lands here, and nothing from other runs
"$tmp/venv-sdist/bin/python" -m pip install --no-build-isolation --no-deps "$sdist" > "$tmp/install.log" 2>&1 \
  || { cat "$tmp/install.log"; exit 1; }

step "smoke test (outside the checkout)"
(cd "$tmp" && "$tmp/venv-sdist/bin/python" "$repo/.ci/smoke.py" --forbid "$repo")

mkdir -p "$tmp/wheels"
if [ "${VISIONOPS_WHEEL_FROM_CHECKOUT:-0}" != 1 ]; then
  find "$tmp/pip-cache/wheels" -name 'visionops-*.whl' -exec cp {} "$tmp/wheels/" \; 2>/dev/null || true
fi
if ! ls "$tmp"/wheels/visionops-*.whl > /dev/null 2>&1; then
  step "wheel from the checkout"
  python -m pip wheel --no-build-isolation --no-deps . -w "$tmp/wheels" > "$tmp/wheel.log" 2>&1 \
    || { cat "$tmp/wheel.log"; exit 1; }
fi
wheel=$(ls "$tmp"/wheels/visionops-*.whl)
step "install $(basename "$wheel") into a second fresh venv"
python -m venv --system-site-packages "$tmp/venv-wheel"
# --force-reinstall: a visionops of the same version installed system-wide must not stand in for the wheel.
"$tmp/venv-wheel/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
(cd "$tmp" && "$tmp/venv-wheel/bin/python" "$repo/.ci/smoke.py" --forbid "$repo" --import-only)

step "sdist check done"
