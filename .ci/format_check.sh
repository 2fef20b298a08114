#!/usr/bin/env bash
# Fails when a C++/CUDA file under csrc/ or tests/cpp/ differs from what clang-format makes of it (style: the
# repository's .clang-format; files formatted with clang-format 23.1.5, `pip install clang-format==23.1.5`; other
# major versions may break lines differently). To fix, format in place:
#   clang-format -i $(find csrc tests/cpp \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \))
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find csrc tests/cpp \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) | sort)
echo "clang-format $(clang-format --version | grep -o '[0-9][0-9.]*' | head -1) on ${#files[@]} files"
clang-format --dry-run --Werror "${files[@]}"
# ruff: added by the Python side
