#!/usr/bin/env bash
# Checks psft's CUDA kernels on a machine with an NVIDIA GPU, nvcc and
# PyTorch installed in the system python3 (not psft's venv):
#
#   1. configures build/gpu with LibTorch from python3's torch package and
#      PSFT_CUDA=ON, builds the CUDA test and benchmark binaries
#   2. runs the CUDA tests
#   3. runs them under compute-sanitizer (memcheck, racecheck)
#   4. runs the GPU benchmark and the torch.compile baseline
#   5. prints a short table of what passed, last
#
# Environment: PYTHON (default python3), CUDACXX (default nvcc on PATH),
# PSFT_JOBS (default: CPU count), PSFT_CUDA_ARCHITECTURES (default "80;90").
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
jobs="${PSFT_JOBS:-$(nproc)}"
nvcc_path="${CUDACXX:-$(command -v nvcc || true)}"
archs="${PSFT_CUDA_ARCHITECTURES:-80;90}"
results=()
record() { results+=("$(printf '%-28s %s' "$1" "$2")"); }
finish() {
  echo
  echo "=== gpu-check summary ==="
  printf '%s\n' "${results[@]}"
}
trap finish EXIT

if [ -z "$nvcc_path" ]; then
  record "nvcc" "MISSING"
  exit 1
fi
# The torch package directory is the prefix (see scripts/test.sh): its
# share/cmake is torch.utils.cmake_prefix_path.
torch_cmake_dir=$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || {
  record "python3 torch" "MISSING"
  exit 1
}
torch_prefix=$(dirname "$(dirname "$torch_cmake_dir")")

if cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_CUDA_COMPILER="$nvcc_path" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DPSFT_CUDA=ON -DPSFT_BUILD_TESTS=ON \
  -DPSFT_BUILD_BENCHMARKS=ON -DPSFT_BUILD_EXAMPLES=OFF -DPSFT_HEADER_CHECK=OFF \
  -DPSFT_CONSUMER_TESTS=OFF -DPSFT_INSTALL=OFF &&
  cmake --build build/gpu -j "$jobs" --target psft_test_cuda psft_bench_cuda; then
  record "build" "ok"
else
  record "build" "FAILED"
  exit 1
fi

status=0
run_step() {
  local name="$1"
  shift
  echo
  echo "=== gpu-check: $name ==="
  if "$@"; then record "$name" "ok"; else
    record "$name" "FAILED"
    status=1
  fi
}

test_binary=build/gpu/tests/psft_test_cuda
run_step "tests" "$test_binary"
if command -v compute-sanitizer >/dev/null; then
  run_step "compute-sanitizer memcheck" compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$test_binary"
  run_step "compute-sanitizer racecheck" compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$test_binary"
else
  record "compute-sanitizer" "MISSING"
  status=1
fi
bench_log=build/gpu/bench_cuda.txt
run_step "benchmark" bash -c "build/gpu/benchmarks/psft_bench_cuda | tee $bench_log"
compile_log=build/gpu/compile_baseline.txt
run_step "torch.compile baseline" bash -c "'$python' benchmarks/compile_baseline.py | tee $compile_log"

echo
echo "=== gpu-check: timings ==="
cat "$bench_log" "$compile_log" 2>/dev/null
exit $status
