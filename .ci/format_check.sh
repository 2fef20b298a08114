#!/usr/bin/env bash
# Lint and format check. Python: `ruff check` and `ruff format --check` (settings in pyproject.toml; fix with
# `ruff check --fix . && ruff format .`). C++/CUDA under csrc/ and tests/cpp/: clang-format with the repository's
# .clang-format (files formatted with clang-format 23.1.5; other major versions may break lines differently; fix with
#   clang-format -i $(find csrc tests/cpp \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \)) ).
# Both tools are pinned in requirements-ci.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find csrc tests/cpp \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) | sort)
echo "clang-format $(clang-format --version | grep -o '[0-9][0-9.]*' | head -1) on ${#files[@]} files"
clang-format --dry-run --Werror "${files[@]}"
echo "ruff $(ruff --version | grep -o '[0-9][0-9.]*' | head -1)"
ruff check .
ruff format --check .
