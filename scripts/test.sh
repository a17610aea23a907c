#!/usr/bin/env bash
# Builds psft and runs every check CI runs (.ci/run calls this), in phases:
#
#   setup     scripts/setup.sh (installs only what is missing)
#   main      LibTorch from the torch wheel, build/main (CMake preset
#             "default"): tests including [large], header check, benchmark
#             smoke runs, examples, find_package and add_subdirectory consumers
#   compat    Debian's LibTorch 1.13, build/torch1.13 (preset "torch1.13"):
#             the tests
#   sanitize  ASan + UBSan against the torch wheel, build/asan (preset "asan"):
#             the tests except [large]
#   cuda-build  PSFT_CUDA=ON against the torch wheel, build/cuda: builds only
#             the CUDA test and benchmark binaries (nvcc, sm_80 and sm_90)
#             and runs them, which skip without a GPU; then
#             scripts/check-sass.sh reads the test binary's sm_90 machine
#             code: registers, spills, occupancy and SASS instructions per
#             element of the hot loops, failing on spills or a logits
#             forward over its target. The phase is skipped when nvcc is
#             absent. Catch2, Eigen and Google Benchmark come from a
#             scripts/gpu-deps.sh prefix made into build/gpu-deps, which
#             proves that prefix is complete for scripts/gpu-check.sh.
#             (The kernels themselves also run on the CPU, emulated, in the
#             main, compat and sanitize phases: psft_test_cuda_emulated.)
#   docs      scripts/check-docs.sh: Doxygen API reference (docs/Doxyfile)
#             over the public headers and docs/*.md, failing on any warning
#   packaging scripts/check-packaging.sh: the vcpkg port staged with the
#             portfile's own options and consumed, and `conan create` of
#             conanfile.py with test_package/, offline (build/packaging)
#   notebooks scripts/check-notebooks.sh: the code cells of each
#             examples/notebooks/*.ipynb compiled with g++ and run, and run
#             cell by cell in clang 19's interpreter (psft_notebook_repl)
#             against the torch wheel (build/notebooks)
#   peers     scripts/check-peers.sh: psft's numbers against the real verl
#             0.9.1 and TRL 1.16.0 from PyPI (installed into the tools
#             environment with --no-deps, only what is missing), through a
#             test-only Python extension cached in build/peers;
#             PSFT_SKIP_PEERS=1 leaves it out
#   format    clang-format --dry-run --Werror over include/ tests/
#             benchmarks/ examples/ test_package/
#
# Build trees live under build/ in the clone and are reused, so later runs are
# incremental. Stops at the first failing phase.
#
# Environment:
#   PSFT_SKIP_COMPAT=1    leave out the LibTorch 1.13 phase
#   PSFT_SKIP_SANITIZE=1  leave out the sanitizer phase
#   PSFT_SKIP_CUDA=1      leave out the cuda-build phase
#   PSFT_SKIP_DOCS=1, PSFT_SKIP_PACKAGING=1, PSFT_SKIP_NOTEBOOKS=1
#                         leave out the docs, packaging or notebooks phase
#   PSFT_CLING_VENV       a virtual environment with cppyy: the notebooks
#                         phase also runs them under cling (see
#                         scripts/check-notebooks.sh)
#   CUDACXX               the nvcc to use (default: nvcc on PATH, else
#                         /usr/local/cuda/bin/nvcc)
#   PSFT_JOBS             parallel build and test jobs (default: CPU count)
#   PSFT_VENV, PSFT_TORCH as for scripts/setup.sh
#   CLANG_FORMAT          the clang-format to use (default: clang-format)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${PSFT_JOBS:-$(nproc)}"
finished=()    # "phase time" of each finished phase
phase=""       # the phase running now
phase_start=0

duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

begin() {
  phase="$1"
  phase_start=$SECONDS
  echo
  echo "=== test.sh: $phase ==="
}

end() {
  finished+=("$phase $(duration $((SECONDS - phase_start)))")
  phase=""
}

summary() {
  local status=$?
  local done_list="none"
  if [ "${#finished[@]}" -gt 0 ]; then
    done_list=$(printf '%s, ' "${finished[@]}")
    done_list="${done_list%, }"
  fi
  echo
  if [ "$status" -eq 0 ]; then
    echo "test.sh: PASSED in $(duration "$SECONDS") ($done_list)"
  else
    echo "test.sh: FAILED in phase ${phase:-?} after $(duration "$SECONDS") (passed: $done_list)"
  fi
}
trap summary EXIT

begin setup
./scripts/setup.sh
# The presets take the root of the wheel's LibTorch (see torch-prefix.sh).
PSFT_TORCH_PREFIX=$(./scripts/torch-prefix.sh)
export PSFT_TORCH_PREFIX
end

begin main
cmake --preset default
cmake --build build/main -j "$jobs"
ctest --test-dir build/main --output-on-failure -j "$jobs"
end

if [ "${PSFT_SKIP_COMPAT:-0}" != 1 ]; then
  begin compat
  cmake --preset torch1.13
  cmake --build build/torch1.13 -j "$jobs"
  ctest --test-dir build/torch1.13 --output-on-failure -j "$jobs"
  end
fi

if [ "${PSFT_SKIP_SANITIZE:-0}" != 1 ]; then
  begin sanitize
  cmake --preset asan
  cmake --build build/asan -j "$jobs"
  # LibTorch keeps global state alive until exit, which LeakSanitizer would
  # report; the ctest entries set the same options.
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan --output-on-failure -j "$jobs" --label-exclude large
  end
fi

if [ "${PSFT_SKIP_CUDA:-0}" != 1 ]; then
  begin cuda-build
  nvcc_path="${CUDACXX:-$(command -v nvcc || true)}"
  if [ -z "$nvcc_path" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    nvcc_path=/usr/local/cuda/bin/nvcc
  fi
  if [ -z "$nvcc_path" ]; then
    echo "test.sh: cuda-build skipped: no nvcc (set CUDACXX or put nvcc on PATH)"
  else
    # The prefix scripts/gpu-check.sh gets on a GPU machine without these
    # libraries. It comes first in CMAKE_PREFIX_PATH; -U drops packages an
    # earlier configure found elsewhere, so that they are searched again.
    deps="$PWD/build/gpu-deps"
    ./scripts/gpu-deps.sh "$deps"
    # Only the CUDA targets: the rest is built and tested by the main phase.
    cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
      -DCMAKE_PREFIX_PATH="$deps;$PSFT_TORCH_PREFIX" -U Catch2_DIR -U Eigen3_DIR -U benchmark_DIR \
      -DCMAKE_CUDA_COMPILER="$nvcc_path" -DCMAKE_CUDA_ARCHITECTURES="80;90" -DPSFT_CUDA=ON \
      -DPSFT_BUILD_TESTS=ON -DPSFT_BUILD_BENCHMARKS=ON -DPSFT_BUILD_EXAMPLES=OFF \
      -DPSFT_HEADER_CHECK=OFF -DPSFT_CONSUMER_TESTS=OFF -DPSFT_INSTALL=OFF
    for package in Catch2 Eigen3 benchmark; do
      package_dir=$(sed -n "s/^${package}_DIR:PATH=//p" build/cuda/CMakeCache.txt)
      if [[ "$package_dir" != "$deps"/* ]]; then
        echo "test.sh: $package found in '$package_dir', not in $deps: scripts/gpu-deps.sh misses it"
        exit 1
      fi
    done
    cmake --build build/cuda -j "$jobs" --target psft_test_cuda psft_bench_cuda
    if ! ldd build/cuda/benchmarks/psft_bench_cuda | grep -F "$deps/" >/dev/null; then
      echo "test.sh: psft_bench_cuda does not load libbenchmark from $deps"
      exit 1
    fi
    # Without a GPU both print "skipped: no CUDA device" and exit 0.
    build/cuda/tests/psft_test_cuda
    build/cuda/benchmarks/psft_bench_cuda
    # The static check of the kernels' machine code (cuobjdump from the
    # CUDA toolkit, else the one the torch wheel's triton dependency ships).
    CUDACXX="$nvcc_path" ./scripts/check-sass.sh build/cuda/tests/psft_test_cuda
  fi
  end
fi

if [ "${PSFT_SKIP_DOCS:-0}" != 1 ]; then
  begin docs
  ./scripts/check-docs.sh
  end
fi

if [ "${PSFT_SKIP_PACKAGING:-0}" != 1 ]; then
  begin packaging
  ./scripts/check-packaging.sh
  end
fi

if [ "${PSFT_SKIP_NOTEBOOKS:-0}" != 1 ]; then
  begin notebooks
  PSFT_JOBS="$jobs" ./scripts/check-notebooks.sh
  end
fi

if [ "${PSFT_SKIP_PEERS:-0}" != 1 ]; then
  begin peers
  ./scripts/check-peers.sh
  end
fi

begin format
clang_format="${CLANG_FORMAT:-clang-format}"
"$clang_format" --version
# test_package/: its own sources only, not a build folder Conan may leave there.
mapfile -t sources < <({
  find include tests benchmarks examples -type f \
    \( -name '*.hpp' -o -name '*.h' -o -name '*.cpp' -o -name '*.cuh' -o -name '*.cu' \)
  find test_package -maxdepth 1 -type f -name '*.cpp'
} | sort)
unformatted=()
for source in "${sources[@]}"; do
  "$clang_format" --dry-run --Werror "$source" >/dev/null 2>&1 || unformatted+=("$source")
done
if [ "${#unformatted[@]}" -gt 0 ]; then
  echo "test.sh: ${#unformatted[@]} of ${#sources[@]} files are not clang-formatted:"
  printf '  %s\n' "${unformatted[@]}"
  echo "test.sh: fix with: $clang_format -i ${unformatted[*]}"
  exit 1
fi
echo "test.sh: ${#sources[@]} files clang-formatted"
end
