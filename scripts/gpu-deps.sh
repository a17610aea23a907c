#!/usr/bin/env bash
# Usage: scripts/gpu-deps.sh DIR
#
# Copies the C++ libraries that psft's tests and benchmarks need besides
# LibTorch (Catch2 2, Eigen 3, Google Benchmark) from this machine's Debian
# packages (catch2, libeigen3-dev, libbenchmark-dev; scripts/setup.sh
# installs them) into DIR, a relocatable CMake prefix of about 10 MB, for a
# GPU machine that has none of them and cannot download them:
#
#   scripts/gpu-deps.sh build/gpu-deps      # here
#   scripts/gpu-check.sh                    # there (uses build/gpu-deps)
#
# build/ is git-ignored: DIR travels to the GPU machine only if it is copied
# with the clone (a runner that copies the working tree must be told to
# carry build/gpu-deps); without it the check stops at its requirements.
#
# DIR keeps the packages' layout under /usr (include/, lib/cmake/Catch2,
# share/eigen3/cmake, lib/<multiarch>/cmake/benchmark), so their CMake
# config files work unchanged from any folder. Every file is copied, not
# linked; libbenchmark is there under its real name (the one its CMake
# targets import) and under its SONAME (the one a binary linked to it
# loads). Being this machine's build, it needs a glibc and libstdc++ on the
# GPU machine at least as new as here. scripts/test.sh (phase cuda-build)
# builds against such a prefix and checks that CMake took every package
# from it. DIR is replaced if it holds an earlier copy; any other non-empty
# DIR is left alone.
set -euo pipefail

dest="${1:?usage: scripts/gpu-deps.sh DIR}"
multiarch=$(gcc -print-multiarch)
libdir="/usr/lib/$multiarch"

for file in /usr/include/catch2/catch.hpp /usr/lib/cmake/Catch2/Catch2Config.cmake \
  /usr/include/eigen3/Eigen/Core /usr/share/eigen3/cmake/Eigen3Config.cmake \
  /usr/include/benchmark/benchmark.h "$libdir/cmake/benchmark/benchmarkConfig.cmake" \
  "$libdir/libbenchmark.so"; do
  if [ ! -e "$file" ]; then
    echo "gpu-deps: $file is missing; run scripts/setup.sh first" >&2
    exit 1
  fi
done

# Real files, not links; with their times, so that builds against an
# identical copy made again stay up to date.
copy() { cp -rL --preserve=timestamps "$@"; }

marker="lib/cmake/benchmark/benchmarkConfig.cmake" # written last, below
if [ -d "$dest" ] && [ -n "$(ls -A "$dest")" ] && [ ! -f "$dest/$marker" ]; then
  echo "gpu-deps: $dest is not empty and not an earlier gpu-deps.sh copy; not replacing it" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$dest/include/eigen3" "$dest/lib/cmake" "$dest/share/eigen3" \
  "$dest/lib/$multiarch/cmake"

# Catch2 2: single header; Catch2Targets.cmake checks that the static
# Catch2WithMain library it imports exists, although psft does not link it.
copy /usr/include/catch2 "$dest/include/"
copy /usr/lib/cmake/Catch2 "$dest/lib/cmake/"
copy /usr/lib/libCatch2WithMain.a "$dest/lib/"

# Eigen 3: headers only. Not unsupported/ (3 MB), which psft does not use.
copy /usr/include/eigen3/Eigen /usr/include/eigen3/signature_of_eigen3_matrix_library \
  "$dest/include/eigen3/"
copy /usr/share/eigen3/cmake "$dest/share/eigen3/"

# Google Benchmark: headers, CMake files, libbenchmark_main.a (imported and
# checked like Catch2WithMain) and the shared library.
copy /usr/include/benchmark "$dest/include/"
copy "$libdir/cmake/benchmark" "$dest/lib/$multiarch/cmake/"
copy "$libdir/libbenchmark_main.a" "$dest/lib/$multiarch/"
library=$(readlink -f "$libdir/libbenchmark.so")
soname=$(objdump -p "$library" | awk '$1 == "SONAME" { print $2 }')
copy "$library" "$dest/lib/$multiarch/"
copy "$library" "$dest/lib/$multiarch/$soname"

# CMake looks in lib/<multiarch>/cmake only where the compiler has a
# multiarch name (Debian, Ubuntu); elsewhere it finds this forwarder.
mkdir -p "$dest/lib/cmake/benchmark"
cat >"$dest/$marker" <<EOF
# Written by psft's scripts/gpu-deps.sh: the package lives in lib/$multiarch.
include("\${CMAKE_CURRENT_LIST_DIR}/../../$multiarch/cmake/benchmark/benchmarkConfig.cmake")
EOF

echo "gpu-deps: Catch2, Eigen and Google Benchmark copied into $dest ($(du -sh "$dest" | cut -f1))"
