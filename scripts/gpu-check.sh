#!/usr/bin/env bash
# Usage: scripts/gpu-check.sh [DEPS_DIR]
#
# Checks psft's CUDA kernels on a machine with an NVIDIA GPU, nvcc and
# PyTorch (a CUDA build) installed in python3, not psft's virtual
# environment, in about six minutes (PSFT_GPU_TIME_LIMIT), in this order:
#
#   requirements  cmake, ninja, a C++ compiler, nvcc, torch with CUDA, a GPU
#                 that torch sees, nvcc's CUDA major version equal to
#                 torch.version.cuda's, Catch2 2, Eigen 3 and Google
#                 Benchmark findable by CMake; compute-sanitizer is optional.
#                 Writes build/gpu/environment.txt (GPU, driver, versions).
#   configure     build/gpu, LibTorch from python3's torch, PSFT_CUDA=ON,
#                 for the GPU's own architecture only (sm_90 on an H100 or
#                 H200: one nvcc pass per binary, not two)
#   build         psft_test_cuda and psft_bench_cuda; then cuobjdump checks
#                 that they hold machine code for that architecture
#   sass          scripts/check-sass.sh on the test binary: registers,
#                 spills, occupancy, instructions per element (seconds)
#   tests         the CUDA tests except [large]   (build/gpu/tests.txt)
#   tests-large   the [large] ones: offsets past 2^31 elements
#   memcheck      compute-sanitizer memcheck and racecheck of psft's kernels
#   racecheck     in the tests tagged [sanitize] (one small call of every
#                 kernel path), with PyTorch's caching allocator off
#   benchmark     psft_bench_cuda                 (build/gpu/bench_cuda.txt)
#   baseline      benchmarks/compile_baseline.py: eager PyTorch and
#                 torch.compile of the same math  (build/gpu/compile_baseline.txt)
#
# then prints a table of the steps and, last, the figures docs/benchmarks.md
# takes (GB/s and fraction of copy per kernel, speedups over PyTorch eager
# and torch.compile). Each step runs under its own time cap, cut to what is
# left of PSFT_GPU_TIME_LIMIT; a step left without time, skipped with
# PSFT_GPU_SKIP or lacking what it needs is reported "not run", and a
# sanitizer the driver refuses ("Device not supported") "unavailable":
# neither counts as a failure. Exits 0 when no step that ran failed.
#
# New CUDA paths need no change here: their test cases go into
# tests/test_cuda.cpp (a small one tagged [sanitize] joins the sanitizer
# runs), their benchmarks into benchmarks/bench_cuda.cpp (its summary rows
# are printed below) and their PyTorch baselines into
# benchmarks/compile_baseline.py.
#
# On a GPU machine without Catch2, Eigen or Google Benchmark, and without
# network access: on a Debian or Ubuntu machine with psft's dependencies
# (scripts/setup.sh), write them into a folder,
#
#   scripts/gpu-deps.sh build/gpu-deps
#
# copy the clone to the GPU machine WITH that folder (build/ is git-ignored,
# so a copy of the tracked files alone leaves it behind; a runner that
# copies the working tree must be told to carry build/gpu-deps), and there
# run
#
#   scripts/gpu-check.sh        # build/gpu-deps is used when it exists
#
# The folder is a CMake prefix (see scripts/gpu-deps.sh); the binaries find
# libbenchmark in it through their RPATH.
#
# Environment:
#   PSFT_GPU_DEPS            a prefix from scripts/gpu-deps.sh (or the
#                            argument; default build/gpu-deps if present)
#   PYTHON                   the python with torch (default: python3)
#   CUDACXX                  the nvcc to use (default: nvcc on PATH, else
#                            /usr/local/cuda/bin/nvcc); compute-sanitizer is
#                            taken from PATH, else from nvcc's CUDA toolkit
#   PSFT_CUDA_ARCHITECTURES  default: the GPU's (torch's device capability)
#   PSFT_JOBS                parallel compile jobs (default: CPU count)
#   PSFT_GPU_TIME_LIMIT      seconds for the whole check (default 360)
#   PSFT_GPU_SKIP            steps to leave out, comma-separated (a rerun of
#                            a few steps: e.g. build is incremental, so
#                            PSFT_GPU_SKIP=memcheck,racecheck,baseline
#                            reruns tests and benchmark quickly)
#
# No set -e: a failed step is recorded and the next one runs.
set -uo pipefail

deps="${1:-${PSFT_GPU_DEPS:-}}"
cd "$(dirname "$0")/.." || exit 1
if [ -z "$deps" ] && [ -d build/gpu-deps ]; then
  deps=build/gpu-deps
fi
if [ -n "$deps" ] && [ -d "$deps" ]; then
  deps=$(cd "$deps" && pwd)
fi

python="${PYTHON:-python3}"
jobs="${PSFT_JOBS:-$(nproc)}"
deadline=$((SECONDS + ${PSFT_GPU_TIME_LIMIT:-360}))
skip=",${PSFT_GPU_SKIP:-},"
out=build/gpu
mkdir -p "$out"

results=()
failed=0
not_run=0
record() { results+=("$(printf '%-22s %s' "$1" "$2")"); }
fail() {
  record "$1" "$2"
  failed=$((failed + 1))
}
skipped() {
  record "$1" "not run ($2)"
  not_run=$((not_run + 1))
}

# The figures docs/benchmarks.md takes, from the logs of the steps that ran.
print_figures() {
  echo
  echo "=== gpu-check: figures for docs/benchmarks.md ==="
  [ -s "$out/environment.txt" ] && sed -n 's/^\(gpu\|torch\|nvcc\|psft\|cuda architectures\): /\1: /p' \
    "$out/environment.txt"
  timeout 10 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>/dev/null | sed 's/^/driver: /'
  if [ -s "$out/bench_cuda.txt" ] && grep -q '^Summary (' "$out/bench_cuda.txt"; then
    echo
    sed -n '/^Summary (/,$p' "$out/bench_cuda.txt"
  else
    echo "(no psft_bench_cuda summary: the benchmark did not finish)"
  fi
  if [ -s "$out/compile_baseline.txt" ]; then
    echo
    cat "$out/compile_baseline.txt"
  fi
  if [ -s "$out/sass.txt" ]; then
    echo
    sed -n '/^kernel /,$p' "$out/sass.txt"
  fi
}

finish() {
  echo
  echo "=== gpu-check summary ($((SECONDS))s) ==="
  printf '%s\n' "${results[@]}"
  print_figures
  echo
  if [ "$failed" -eq 0 ]; then
    echo "gpu-check: PASSED ($not_run steps not run) in ${SECONDS}s"
  else
    echo "gpu-check: FAILED ($failed failed, $not_run not run) in ${SECONDS}s"
  fi
}
trap finish EXIT

# --- Requirements ---------------------------------------------------------

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
  record "compute-sanitizer" "absent (memcheck and racecheck will not run)"
fi

# One python start: importing torch takes seconds.
torch_info=$(timeout 90 "$python" - <<'EOF' 2>&1
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
capability=$(field capability | tr -d .)
if [ -n "$torch_prefix" ] && [ -n "$(field device)" ]; then
  record "GPU" "ok ($(field device), sm_$capability)"
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
# The GPU's own architecture only: every other one costs an nvcc pass.
archs="${PSFT_CUDA_ARCHITECTURES:-${capability:-90}}"

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
  [ -n "$sanitizer" ] && echo "compute-sanitizer: $(timeout 30 "$sanitizer" --version | tail -n 1)"
  command -v cmake >/dev/null && echo "cmake: $(cmake --version | head -n 1)"
  [ -n "$cxx" ] && echo "c++: $("$cxx" --version | head -n 1)"
  echo "cpu: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  echo "cuda architectures: $archs"
} >"$out/environment.txt"
echo
cat "$out/environment.txt"
if [ "$failed" -ne 0 ]; then
  echo "gpu-check: requirements missing, nothing built"
  exit 1
fi
printf '%s\n' "${results[@]}"

# --- Steps -------------------------------------------------------------------

# run_step <name> <seconds at most> <log file> <command...>: runs the command
# with its output shown and saved, under min(cap, time left); returns 0 when
# it passed, 1 when it failed, 2 when it did not run.
last_rc=0
run_step() {
  local name="$1" cap="$2" log="$3"
  shift 3
  if [[ "$skip" == *",$name,"* ]]; then
    skipped "$name" "PSFT_GPU_SKIP"
    return 2
  fi
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    skipped "$name" "PSFT_GPU_TIME_LIMIT reached"
    return 2
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  last_rc=0
  echo
  echo "=== gpu-check: $name (at most ${limit}s; $log) ==="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" || last_rc=$?
  local took="$((SECONDS - start))s"
  case "$last_rc" in
    0) record "$name" "ok ($took)" ;;
    124 | 137) fail "$name" "TIMED OUT after $took (cap ${limit}s; $log)" ;;
    *) fail "$name" "FAILED (exit $last_rc after $took; $log)" ;;
  esac
  [ "$last_rc" -eq 0 ]
}

test_binary="$out/tests/psft_test_cuda"
bench_binary="$out/benchmarks/psft_bench_cuda"
built=0
run_step configure 60 "$out/configure.txt" \
  cmake -S . -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$prefix_path" -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DPSFT_CUDA=ON -DPSFT_BUILD_TESTS=ON \
  -DPSFT_BUILD_BENCHMARKS=ON -DPSFT_BUILD_EXAMPLES=OFF -DPSFT_HEADER_CHECK=OFF \
  -DPSFT_CONSUMER_TESTS=OFF -DPSFT_INSTALL=OFF
if [ $? -ne 1 ]; then
  run_step build 150 "$out/build.txt" \
    cmake --build "$out" -j "$jobs" --target psft_test_cuda psft_bench_cuda
  # Skipped (a rerun) counts as built when the binaries are there.
  [ $? -ne 1 ] && [ -x "$test_binary" ] && [ -x "$bench_binary" ] && built=1
else
  skipped build "configure failed"
fi

if [ "$built" -eq 1 ]; then
  # Machine code for the architecture, not only PTX for the driver to
  # compile at load time (Note [CUDA architectures] in cmake/psftCuda.cmake).
  # cuobjdump: on PATH, next to nvcc, or the one the triton wheel (a torch
  # dependency) ships.
  cuobjdump=$(command -v cuobjdump || echo "$(dirname "$nvcc")/cuobjdump")
  if [ ! -x "$cuobjdump" ]; then
    cuobjdump=$(timeout 60 "$python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)
  fi
  if [ -n "$cuobjdump" ] && [ -x "$cuobjdump" ]; then
    sass=$("$cuobjdump" --list-elf "$test_binary" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | paste -sd' ')
    if [ -n "$sass" ]; then record "device code" "ok (SASS for $sass)"; else
      fail "device code" "FAILED (no SASS in $test_binary, only PTX)"
    fi
    if [[ ";$archs;" == *";90;"* ]]; then
      CUOBJDUMP="$cuobjdump" run_step sass 30 "$out/sass.txt" scripts/check-sass.sh "$test_binary"
    else
      skipped sass "check-sass.sh reads sm_90 code; built for $archs"
    fi
  else
    skipped "device code" "no cuobjdump"
    skipped sass "no cuobjdump"
  fi
  run_step tests 60 "$out/tests.txt" "$test_binary" "~[large]" --durations yes
  run_step tests-large 45 "$out/tests-large.txt" "$test_binary" "[large]" --durations yes
  # A small tagged subset: the sanitizers slow kernels and API calls alike.
  # Only psft's kernels are instrumented (--kernel-name: PyTorch's run at
  # full speed), and the CUDA API's own error codes, which PyTorch's probes
  # return as a matter of course, are not reported.
  for tool in memcheck racecheck; do
    if [ -z "$sanitizer" ]; then
      skipped "$tool" "no compute-sanitizer"
      continue
    fi
    run_step "$tool" 40 "$out/$tool.txt" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=psft --report-api-errors no "$test_binary" "[sanitize]"
    if [ "$last_rc" -ne 0 ] && grep -qiE "device not supported|not supported on this|unable to find injection|no supported device" \
      "$out/$tool.txt"; then
      # The runtime refused the tool: not a failure of psft's.
      unset 'results[-1]'
      failed=$((failed - 1))
      record "$tool" "unavailable ($(grep -iE -m 1 "not supported|unable to find" "$out/$tool.txt" | cut -c1-80))"
    fi
  done
  run_step benchmark 75 "$out/bench_cuda.txt" "$bench_binary"
  baseline_args=()
  grep -q '^Summary (' "$out/bench_cuda.txt" 2>/dev/null && baseline_args=(--psft "$out/bench_cuda.txt")
  # The baseline stops starting cases a little before its cap, so that
  # what it measured is printed rather than cut off.
  left=$((deadline - SECONDS))
  cap=$((75 < left ? 75 : left))
  run_step baseline 75 "$out/compile_baseline.txt" \
    "$python" benchmarks/compile_baseline.py "${baseline_args[@]}" --seconds $((cap - 5))
else
  for step in sass tests tests-large memcheck racecheck benchmark baseline; do
    skipped "$step" "no build"
  done
fi

[ "$failed" -eq 0 ]
