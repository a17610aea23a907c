#!/usr/bin/env bash
# Installs everything psft's build, tests, benchmarks and demo need, and
# nothing that is already there. Safe to run again: each step checks first.
#
#   Debian packages: compiler, CMake, Ninja, Catch2, Eigen, Google Benchmark,
#                    Doxygen, clang-format, and libtorch-dev (LibTorch 1.13,
#                    the oldest LibTorch psft supports), libgloo-dev (gloo's
#                    headers, for the Gloo tests and example), clang 19's
#                    interpreter library and headers (libclang-19-dev,
#                    clang-19, whose package holds ClangConfig.cmake,
#                    libclang-cpp19-dev, llvm-19-dev) and nlohmann-json3-dev,
#                    for the notebooks' cell-by-cell run
#                    (scripts/check-notebooks.sh).
#   PyPI:            the torch wheel (LibTorch 2.x) in a virtual environment
#                    kept outside the clone, so later runs and CI reuse it;
#                    in the same environment, matplotlib (the demo's plot)
#                    and conan (the Conan package test).
#
# The package managers' output goes to a log file; its end is shown if a
# step fails.
#
# Environment:
#   PSFT_VENV       where the virtual environment lives
#                   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv)
#   PSFT_TORCH      the pip requirement for torch (default: torch)
#   PSFT_SETUP_LOG  the log file
#                   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/psft/setup.log)
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/psft"
venv="${PSFT_VENV:-$cache/venv}"
torch_req="${PSFT_TORCH:-torch}"
log="${PSFT_SETUP_LOG:-$cache/setup.log}"

debian_packages=(
  build-essential cmake ninja-build pkg-config git
  python3 python3-venv python3-pip
  catch2 libeigen3-dev libbenchmark-dev doxygen clang-format
  libtorch-dev libgloo-dev
  libclang-19-dev clang-19 libclang-cpp19-dev llvm-19-dev nlohmann-json3-dev
)

# Runs a command with its output appended to $log; on failure shows the end
# of the log and stops.
logged() {
  mkdir -p "$(dirname "$log")"
  echo "+ $*" >>"$log"
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: failed: $*" >&2
    echo "setup: last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]} (log: $log)"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  logged "${sudo_cmd[@]}" apt-get update -qq
  logged "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  mkdir -p "$(dirname "$venv")"
  logged python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  echo "setup: installing $torch_req into $venv (a large download, once; log: $log)"
  logged "$venv/bin/python" -m pip install -q --upgrade pip
  logged "$venv/bin/python" -m pip install -q "$torch_req" numpy
fi
# Small tools, checked one by one so that adding one later installs only it.
for tool in matplotlib conan; do
  if ! "$venv/bin/python" -c "import $tool" >/dev/null 2>&1; then
    echo "setup: installing $tool into $venv (log: $log)"
    logged "$venv/bin/python" -m pip install -q "$tool"
  fi
done
