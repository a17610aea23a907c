#!/usr/bin/env bash
# The main demo: PSFT vs SFT on a small GPT, end to end (docs/demo.md).
#
#   scripts/demo.sh [psft_gpt arguments...]     e.g. --out DIR, --quick, --seeds 3
#
# Builds examples/gpt (psft_gpt) against the torch wheel in the build tree of
# scripts/test.sh (build/main, CMake preset "default"), runs it (output in
# build/demo unless --out says otherwise; the base model is cached under
# ~/.cache/psft), then draws DIR/curves.png with examples/gpt/plot.py (with
# --seeds N: DIR/seed-K/curves.png for every seed).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
PSFT_TORCH_PREFIX=$(./scripts/torch-prefix.sh)
export PSFT_TORCH_PREFIX

# Configuring prints LibTorch's CUDA probing; show it only if it fails.
mkdir -p build
if ! cmake --preset default >build/demo-configure.log 2>&1; then
  cat build/demo-configure.log >&2
  exit 1
fi
cmake --build build/main --target psft_gpt

# Output directory: --out DIR if given, else build/demo.
out=build/demo
args=("$@")
has_out=0
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ ${args[i]} == --out ]]; then
    has_out=1
    if ((i + 1 < ${#args[@]})); then out=${args[i + 1]}; fi
  fi
done
if ((has_out == 0)); then args+=(--out "$out"); fi

build/main/examples/psft_gpt "${args[@]}"
for metrics in "$out"/metrics.csv "$out"/seed-*/metrics.csv; do
  if [[ -f $metrics ]]; then
    "$venv/bin/python" examples/gpt/plot.py "$metrics" "$(dirname "$metrics")/curves.png"
  fi
done
