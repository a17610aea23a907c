#!/usr/bin/env bash
# Usage: scripts/gpu-check.sh [DEPS_DIR]
#
# Checks psft's CUDA kernels on a machine with an NVIDIA GPU, nvcc and
# PyTorch (a CUDA build) installed in python3, not psft's virtual environment:
#
#   1. checks up front everything the build needs, so that nothing is
#      compiled for minutes before a missing piece shows: cmake, ninja, a C++
#      compiler, nvcc, compute-sanitizer, torch with CUDA, a GPU that torch
#      sees, nvcc's CUDA major version equal to torch.version.cuda's, and
#      Catch2 2, Eigen 3 and Google Benchmark findable by CMake; writes
#      build/gpu/environment.txt (GPU, driver, nvcc, torch, compilers), so
#      that the figures can be attributed
#   2. configures build/gpu with LibTorch from python3's torch package and
#      PSFT_CUDA=ON, builds psft_test_cuda and psft_bench_cuda, and checks
#      with cuobjdump that the tests hold machine code, not only PTX
#   3. runs the CUDA tests (build/gpu/tests.txt)
#   4. runs the GPU benchmark (build/gpu/bench_cuda.txt) and the eager and
#      torch.compile baselines (build/gpu/compile_baseline.txt)
#   5. runs the tests except [large] under compute-sanitizer memcheck,
#      racecheck and initcheck (build/gpu/<tool>.txt), with PyTorch's
#      caching allocator off so that each tensor is its own allocation
#   6. prints the timings, then a table of what passed, last
#
# Exits 0 when every step passed. Each step runs under a time limit taken
# from what is left of PSFT_GPU_TIME_LIMIT, so the table is always printed.
#
# On a GPU machine without Catch2, Eigen or Google Benchmark, and without
# network access: on a Debian or Ubuntu machine with psft's dependencies
# (scripts/setup.sh), write them into a folder,
#
#   scripts/gpu-deps.sh build/gpu-deps
#
# copy the clone, with that folder, to the GPU machine, and there run
#
#   PSFT_GPU_DEPS=build/gpu-deps scripts/gpu-check.sh
#
# The folder is a CMake prefix (see scripts/gpu-deps.sh); the binaries find
# libbenchmark in it through their RPATH.
#
# Environment:
#   PSFT_GPU_DEPS            a prefix from scripts/gpu-deps.sh (or the argument)
#   PYTHON                   the python with torch (default: python3)
#   CUDACXX                  the nvcc to use (default: nvcc on PATH, else
#                            /usr/local/cuda/bin/nvcc); compute-sanitizer is
#                            taken from PATH, else from nvcc's CUDA toolkit
#   PSFT_CUDA_ARCHITECTURES  default "80;90"
#   PSFT_JOBS                parallel compile jobs (default: CPU count)
#   PSFT_GPU_TIME_LIMIT      seconds for the whole check (default 540)
#
# No set -e: a failed step is recorded and the next one runs.
set -uo pipefail

deps="${1:-${PSFT_GPU_DEPS:-}}"
if [ -n "$deps" ] && [ -d "$deps" ]; then
  deps=$(cd "$deps" && pwd)
fi
cd "$(dirname "$0")/.." || exit 1

python="${PYTHON:-python3}"
jobs="${PSFT_JOBS:-$(nproc)}"
archs="${PSFT_CUDA_ARCHITECTURES:-80;90}"
deadline=$((SECONDS + ${PSFT_GPU_TIME_LIMIT:-540}))
out=build/gpu
mkdir -p "$out"

results=()
status=0
record() { results+=("$(printf '%-28s %s' "$1" "$2")"); }
fail() {
  record "$1" "$2"
  status=1
}
finish() {
  echo
  echo "=== gpu-check summary ($((SECONDS))s) ==="
  printf '%s\n' "${results[@]}"
  if [ "$status" -eq 0 ]; then echo "gpu-check: PASSED"; else echo "gpu-check: FAILED"; fi
}
trap finish EXIT

# --- 1. What the build needs ------------------------------------------------

echo "=== gpu-check: requirements ==="
for tool in cmake ninja; do
  if command -v "$tool" >/dev/null; then record "$tool" "ok ($("$tool" --version | head -n 1))"; else
    fail "$tool" "MISSING (not on PATH)"
  fi
done
cxx="${CXX:-$(command -v c++ || command -v g++ || true)}"
if [ -n "$cxx" ]; then record "C++ compiler" "ok ($("$cxx" --version | head -n 1))"; else
  fail "C++ compiler" "MISSING (no c++ or g++ on PATH; set CXX)"
fi

nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
nvcc_cuda=""
if [ -n "$nvcc" ] && [ -x "$nvcc" ]; then
  nvcc_cuda=$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  record "nvcc" "ok ($nvcc, CUDA $nvcc_cuda)"
else
  fail "nvcc" "MISSING (set CUDACXX or put nvcc on PATH)"
  nvcc=""
fi

sanitizer=$(command -v compute-sanitizer || true)
if [ -z "$sanitizer" ] && [ -n "$nvcc" ]; then
  toolkit_bin=$(dirname "$(readlink -f "$nvcc")")
  for candidate in "$toolkit_bin/compute-sanitizer" \
    "$toolkit_bin/../compute-sanitizer/compute-sanitizer"; do
    if [ -x "$candidate" ]; then
      sanitizer="$candidate"
      break
    fi
  done
fi
if [ -n "$sanitizer" ]; then record "compute-sanitizer" "ok ($sanitizer)"; else
  fail "compute-sanitizer" "MISSING (not on PATH nor next to nvcc)"
fi

# One python start: importing torch takes seconds.
torch_info=$("$python" - <<'EOF' 2>&1
import torch, torch.utils
print("version", torch.__version__)
print("cuda", torch.version.cuda or "none")
print("cmake", torch.utils.cmake_prefix_path)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
    print("capability", "%d.%d" % torch.cuda.get_device_capability(0))
EOF
)
torch_ok=$?
field() { sed -n "s/^$1 //p" <<<"$torch_info"; }
torch_prefix=""
if [ "$torch_ok" -ne 0 ]; then
  fail "torch" "MISSING ($python cannot import torch; set PYTHON)"
  echo "$torch_info" | tail -n 3
elif [ "$(field cuda)" = none ]; then
  fail "torch" "MISSING (torch $(field version) is not a CUDA build)"
else
  record "torch" "ok (torch $(field version), CUDA $(field cuda))"
  # The torch package directory is the prefix (see scripts/torch-prefix.sh).
  torch_prefix=$(dirname "$(dirname "$(field cmake)")")
fi
if [ -n "$torch_prefix" ] && [ -n "$(field device)" ]; then
  record "GPU" "ok ($(field device), sm_$(field capability | tr -d .))"
elif [ -n "$torch_prefix" ]; then
  fail "GPU" "MISSING (torch.cuda.is_available() is False)"
fi
if [ -n "$nvcc_cuda" ] && [ -n "$torch_prefix" ]; then
  if [ "${nvcc_cuda%%.*}" = "$(field cuda | cut -d. -f1)" ]; then
    record "CUDA major versions" "ok (nvcc $nvcc_cuda, torch $(field cuda))"
  else
    fail "CUDA major versions" "MISMATCH (nvcc $nvcc_cuda, torch $(field cuda))"
  fi
fi

prefix_path="$torch_prefix"
if [ -n "$deps" ]; then
  if [ -d "$deps" ]; then
    prefix_path="$deps;$torch_prefix"
    # The binaries' RPATH names the folder too; this also covers a build
    # tree configured elsewhere.
    lib_dirs=$(find "$deps" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
    export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    record "deps prefix" "ok ($deps)"
  else
    fail "deps prefix" "MISSING ($deps is not a folder; see scripts/gpu-deps.sh)"
  fi
fi

# Catch2, Eigen and Google Benchmark, found as the build will find them.
if command -v cmake >/dev/null && command -v ninja >/dev/null && [ -n "$cxx" ]; then
  mkdir -p "$out/probe/src"
  cat >"$out/probe/src/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.18)
project(psft_gpu_check_probe LANGUAGES CXX)
find_package(Catch2 2 QUIET)
find_package(Eigen3 3.3 QUIET NO_MODULE)
find_package(benchmark QUIET)
foreach(package IN ITEMS Catch2 Eigen3 benchmark)
  message(STATUS "probe: ${package} ${${package}_FOUND} ${${package}_DIR}")
endforeach()
EOF
  rm -rf "$out/probe/build"
  cmake -S "$out/probe/src" -B "$out/probe/build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix_path" \
    >"$out/probe/cmake.txt" 2>&1
  for package in Catch2 Eigen3 benchmark; do
    found=$(sed -n "s/^-- probe: $package //p" "$out/probe/cmake.txt")
    case "$found" in
      1* | TRUE* | ON*) record "$package" "ok (${found#* })" ;;
      *) fail "$package" "MISSING (not found by CMake; PSFT_GPU_DEPS, scripts/gpu-deps.sh)" ;;
    esac
  done
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "psft: $(git rev-parse --short HEAD 2>/dev/null || echo "not a git clone")"
  echo "gpu: $(field device) (compute capability $(field capability))"
  timeout 30 nvidia-smi -L 2>/dev/null
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv 2>/dev/null
  echo "torch: $(field version), CUDA $(field cuda) ($python)"
  [ -n "$nvcc" ] && echo "nvcc: $nvcc, $("$nvcc" --version | tail -n 2 | paste -sd' ')"
  [ -n "$sanitizer" ] && echo "compute-sanitizer: $("$sanitizer" --version | tail -n 1)"
  command -v cmake >/dev/null && echo "cmake: $(cmake --version | head -n 1)"
  [ -n "$cxx" ] && echo "c++: $("$cxx" --version | head -n 1)"
  echo "cpu: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  echo "cuda architectures: $archs"
} >"$out/environment.txt"
echo
cat "$out/environment.txt"
if [ "$status" -ne 0 ]; then
  echo "gpu-check: requirements missing, nothing built"
  exit 1
fi
printf '%s\n' "${results[@]}"

# --- 2-5. Build, tests, benchmarks, sanitizers ------------------------------

# run_step <name> <seconds at most> <log file> <command...>: runs the command
# with its output shown and saved, under a time limit that also leaves time
# for the steps after it to be reported.
run_step() {
  local name="$1" cap="$2" log="$3"
  shift 3
  local left=$((deadline - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    fail "$name" "SKIPPED (PSFT_GPU_TIME_LIMIT reached)"
    return 1
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS rc=0
  echo
  echo "=== gpu-check: $name (at most ${limit}s; $log) ==="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" || rc=$?
  local took="$((SECONDS - start))s"
  case "$rc" in
    0) record "$name" "ok ($took)" ;;
    124 | 137) fail "$name" "TIMED OUT after $took" ;;
    *) fail "$name" "FAILED (exit $rc after $took; $log)" ;;
  esac
  return "$rc"
}

run_step "configure" 120 "$out/configure.txt" \
  cmake -S . -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$prefix_path" -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DPSFT_CUDA=ON -DPSFT_BUILD_TESTS=ON \
  -DPSFT_BUILD_BENCHMARKS=ON -DPSFT_BUILD_EXAMPLES=OFF -DPSFT_HEADER_CHECK=OFF \
  -DPSFT_CONSUMER_TESTS=OFF -DPSFT_INSTALL=OFF || exit 1
run_step "build" 360 "$out/build.txt" \
  cmake --build "$out" -j "$jobs" --target psft_test_cuda psft_bench_cuda || exit 1

test_binary="$out/tests/psft_test_cuda"
# Machine code for the listed architectures, not only PTX for the driver to
# compile at load time (Note [CUDA architectures] in cmake/psftCuda.cmake).
cuobjdump=$(command -v cuobjdump || echo "$(dirname "$nvcc")/cuobjdump")
if [ -x "$cuobjdump" ]; then
  sass=$("$cuobjdump" --list-elf "$test_binary" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | paste -sd' ')
  if [ -n "$sass" ]; then record "device code" "ok (SASS for $sass)"; else
    fail "device code" "FAILED (no SASS in $test_binary, only PTX)"
  fi
fi
run_step "tests" 180 "$out/tests.txt" "$test_binary"

bench_log="$out/bench_cuda.txt"
run_step "benchmark" 180 "$bench_log" "$out/benchmarks/psft_bench_cuda"
baseline_args=()
[ -s "$bench_log" ] && baseline_args=(--psft "$bench_log")
run_step "torch.compile baseline" 240 "$out/compile_baseline.txt" \
  "$python" benchmarks/compile_baseline.py "${baseline_args[@]}"

# [large] (tensors past 2^31 elements) ran above; under the sanitizers they
# would take most of the time limit.
for tool in memcheck racecheck initcheck; do
  run_step "compute-sanitizer $tool" 150 "$out/$tool.txt" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    "$test_binary" "~[large]"
done

echo
echo "=== gpu-check: timings ==="
cat "$bench_log" "$out/compile_baseline.txt" 2>/dev/null
exit "$status"
