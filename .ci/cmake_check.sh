#!/usr/bin/env bash
# Builds the CMake target (CPU-only) against the installed torch, installs it, and checks it in processes of its
# own (never beside visionops._C, which registers the same ops): torch.ops.load_library from Python, and a libtorch
# program that uses the exported CMake package and calls every op once through csrc/visionops.h.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${VISIONOPS_CMAKE_BUILD:-build-cmake}
torch_prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
torch_lib=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
# The pip CUDA build of torch makes find_package(Torch) look for a toolkit and an explicit arch list.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
cuda_args=()
if [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_args=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
  "${cuda_args[@]}" -Wno-dev > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build"
cmake --install "$build" --prefix "$build/install" > /dev/null
lib=$(ls "$build"/install/lib*/libvisionops.so | head -1)

python - "$lib" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
keep = torch.ops.visionops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
print("cmake library via torch.ops.load_library: nms ok;", torch.ops.visionops._build_info())
PY

cmake -S tests/cpp -B "$build/consumer" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$PWD/$build/install" "${cuda_args[@]}" -Wno-dev > "$build.consumer.log" 2>&1 \
  || { cat "$build.consumer.log"; exit 1; }
cmake --build "$build/consumer"
LD_LIBRARY_PATH="$torch_lib:$(dirname "$lib"):${LD_LIBRARY_PATH:-}" "$build/consumer/consumer"
