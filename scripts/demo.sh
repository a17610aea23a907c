#!/usr/bin/env bash
# Builds the toy PSFT example and runs it:
#
#   scripts/demo.sh [psft_toy_psft arguments...]
#
# Uses the torch wheel and the build tree of scripts/test.sh (build/main,
# CMake preset "default"), building only the example.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
torch_cmake_dir=$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# The wheel's root, not its share/cmake: see scripts/test.sh.
PSFT_TORCH_PREFIX=$(dirname "$(dirname "$torch_cmake_dir")")
export PSFT_TORCH_PREFIX

# Configuring prints LibTorch's CUDA probing; show it only if it fails.
mkdir -p build
if ! cmake --preset default >build/demo-configure.log 2>&1; then
  cat build/demo-configure.log >&2
  exit 1
fi
cmake --build build/main --target psft_toy_psft
exec build/main/examples/psft_toy_psft "$@"
