#!/usr/bin/env bash
# Installs everything psft's build, tests, benchmarks and demo need, and
# nothing that is already there. Safe to run again: each step checks first.
#
#   Debian packages: compiler, CMake, Ninja, Catch2, Eigen, Google Benchmark,
#                    Doxygen, and libtorch-dev (LibTorch 1.13, the oldest
#                    LibTorch psft supports).
#   PyPI:            the torch wheel (LibTorch 2.x) in a virtual environment
#                    kept outside the clone, so later runs and CI reuse it.
#
# Environment:
#   PSFT_VENV   where the virtual environment lives
#               (default: ${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv)
#   PSFT_TORCH  the pip requirement for torch (default: torch)
set -euo pipefail

venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
torch_req="${PSFT_TORCH:-torch}"

debian_packages=(
  build-essential cmake ninja-build pkg-config git
  python3 python3-venv python3-pip
  catch2 libeigen3-dev libbenchmark-dev doxygen
  libtorch-dev
)

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  echo "setup: installing $torch_req into $venv (a large download, once)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$torch_req" numpy
fi
