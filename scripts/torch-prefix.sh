#!/usr/bin/env bash
# Prints the root of the torch wheel's LibTorch in the tools virtual
# environment (installed by scripts/setup.sh): the torch package directory,
# the parent of the parent of torch.utils.cmake_prefix_path. CMake takes it
# as CMAKE_PREFIX_PATH; the wheel's share/cmake itself would let
# TorchConfig.cmake's find_library() calls pick Debian's libtorch.so (also
# installed, for the compat build) over the wheel's.
#
# Environment: PSFT_VENV as for scripts/setup.sh.
set -euo pipefail
venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
torch_cmake_dir=$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
dirname "$(dirname "$torch_cmake_dir")"
