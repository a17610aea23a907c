#!/usr/bin/env bash
# Checks psft's plain CMake install and its packages for vcpkg and Conan,
# offline.
#
#   plain  The README's first hour: a plain configure of psft prints no
#          CMake warning and names the LibTorch it found; on a machine
#          without Catch2 and Google Benchmark (simulated with
#          CMAKE_DISABLE_FIND_PACKAGE_<package>) the configure leaves the
#          tests and benchmarks out with a message instead of failing,
#          `cmake --install` works without a build, and
#          tests/consumers/find_package builds against that prefix
#          (configured without warnings too) and runs.
#   vcpkg  The vcpkg tool itself is not run (it downloads its own tools).
#          Instead psft is configured with exactly the OPTIONS that
#          ports/psft/portfile.cmake passes to vcpkg_cmake_configure (read
#          from the portfile, so the two cannot drift), installed into a
#          staging prefix laid out as the port leaves it (no lib/, config in
#          share/psft), and tests/consumers/find_package is built against
#          that prefix and run.
#   conan  `conan create .` with a fresh CONAN_HOME under the build tree and
#          no remotes: LibTorch (the torch wheel) and Eigen (the system's)
#          are platform requirements of the profile, so nothing is
#          downloaded; test_package/ is built against the package and run.
#
# Build trees: build/packaging/. Runnable alone after scripts/setup.sh.
#
# Environment:
#   PSFT_TORCH_PREFIX  the LibTorch root (default: the torch wheel's package
#                      directory in the tools virtual environment)
#   PSFT_VENV          as for scripts/setup.sh
#   PSFT_SKIP_PLAIN=1, PSFT_SKIP_VCPKG=1, PSFT_SKIP_CONAN=1  leave out a part
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
PSFT_TORCH_PREFIX="${PSFT_TORCH_PREFIX:-$(./scripts/torch-prefix.sh)}"
torch_version=$(sed -n 's/^set(PACKAGE_VERSION "\([0-9.]*\)").*/\1/p' \
  "$PSFT_TORCH_PREFIX/share/cmake/Torch/TorchConfigVersion.cmake")
out="$root/build/packaging"
mkdir -p "$out"

# Fails if the CMake output in file $1 (what $2 configured) has a warning.
no_cmake_warnings() {
  if grep -q "CMake Warning" "$1"; then
    echo "check-packaging: configuring $2 printed CMake warnings ($1):" >&2
    grep -A 12 "CMake Warning" "$1" >&2
    exit 1
  fi
}

if [ "${PSFT_SKIP_PLAIN:-0}" != 1 ]; then
  echo "--- check-packaging: plain configure and install (LibTorch $torch_version)"
  # Fresh build trees: some warnings (CUDA architectures) come only from a
  # first configure.
  rm -rf "$out/plain-build"
  cmake -S . -B "$out/plain-build" -DCMAKE_PREFIX_PATH="$PSFT_TORCH_PREFIX" \
    >"$out/plain-configure.log" 2>&1 || { cat "$out/plain-configure.log"; exit 1; }
  no_cmake_warnings "$out/plain-configure.log" "psft"
  grep "^-- psft: using LibTorch $torch_version from " "$out/plain-configure.log" ||
    { echo "check-packaging: the configure did not say which LibTorch it found" >&2; exit 1; }

  # The README's install on a machine without the test dependencies.
  build="$out/no-test-deps-build"
  prefix="$out/no-test-deps-prefix"
  rm -rf "$build" "$prefix" "$out/no-test-deps-consumer"
  cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$PSFT_TORCH_PREFIX" \
    -DCMAKE_DISABLE_FIND_PACKAGE_Catch2=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON \
    >"$out/no-test-deps-configure.log" 2>&1 || { cat "$out/no-test-deps-configure.log"; exit 1; }
  no_cmake_warnings "$out/no-test-deps-configure.log" "psft without Catch2 and Google Benchmark"
  for part in "tests skipped: package Catch2" "benchmarks skipped: package benchmark"; do
    grep "^-- psft: $part" "$out/no-test-deps-configure.log" ||
      { echo "check-packaging: no message \"psft: $part ...\" in the configure output" >&2; exit 1; }
  done
  cmake --install "$build" --prefix "$prefix" >/dev/null
  cmake -S tests/consumers/find_package -B "$out/no-test-deps-consumer" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix;$PSFT_TORCH_PREFIX" \
    >"$out/no-test-deps-consumer-configure.log" 2>&1 ||
    { cat "$out/no-test-deps-consumer-configure.log"; exit 1; }
  no_cmake_warnings "$out/no-test-deps-consumer-configure.log" "the find_package consumer"
  cmake --build "$out/no-test-deps-consumer"
  "$out/no-test-deps-consumer/psft_consumer" | tee "$out/no-test-deps-consumer.log"
  grep -qx ok "$out/no-test-deps-consumer.log"
fi

if [ "${PSFT_SKIP_VCPKG:-0}" != 1 ]; then
  echo "--- check-packaging: vcpkg port (staged, LibTorch $torch_version)"
  # The -D options of vcpkg_cmake_configure(... OPTIONS ...) in the portfile.
  mapfile -t port_options < <(awk '
    /vcpkg_cmake_configure\(/ { inside = 1; next }
    inside && /^[[:space:]]*\)/ { inside = 0 }
    inside && /OPTIONS/ { options = 1; next }
    inside && options { for (i = 1; i <= NF; i++) if ($i ~ /^-D/) print $i }
  ' ports/psft/portfile.cmake)
  if [ "${#port_options[@]}" -lt 5 ]; then
    echo "check-packaging: could not read the OPTIONS of ports/psft/portfile.cmake" >&2
    exit 1
  fi
  echo "portfile options: ${port_options[*]}"
  stage="$out/vcpkg-stage"
  # vcpkg configures with its toolchain and VCPKG_BUILD_TYPE=release.
  cmake -S . -B "$out/vcpkg-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$PSFT_TORCH_PREFIX" "${port_options[@]}" >"$out/vcpkg-configure.log" 2>&1 ||
    { cat "$out/vcpkg-configure.log"; exit 1; }
  cmake --build "$out/vcpkg-build"
  rm -rf "$stage"
  cmake --install "$out/vcpkg-build" --prefix "$stage" >/dev/null
  # What the portfile does after the install.
  rm -rf "$stage/lib" "$stage/debug"
  install -D -m 644 ports/psft/usage "$stage/share/psft/usage"
  for expected in include/psft/psft.hpp share/psft/psftConfig.cmake \
    share/psft/psftConfigVersion.cmake share/psft/psftTargets.cmake share/psft/usage; do
    [ -f "$stage/$expected" ] || { echo "check-packaging: $expected missing from the staged port" >&2; exit 1; }
  done
  if grep -E -q "INTERFACE_[A-Z_]+ \"([^\"]*;)?/" "$stage"/share/psft/psftTargets*.cmake; then
    echo "check-packaging: the staged psftTargets.cmake records an absolute path" >&2
    exit 1
  fi
  # The port's consumer: the same project as the find_package consumer test.
  cmake -S tests/consumers/find_package -B "$out/vcpkg-consumer" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$stage;$PSFT_TORCH_PREFIX" \
    >"$out/vcpkg-consumer-configure.log" 2>&1 || { cat "$out/vcpkg-consumer-configure.log"; exit 1; }
  cmake --build "$out/vcpkg-consumer"
  "$out/vcpkg-consumer/psft_consumer" | tee "$out/vcpkg-consumer.log"
  grep -qx ok "$out/vcpkg-consumer.log"
fi

if [ "${PSFT_SKIP_CONAN:-0}" != 1 ]; then
  conan="${CONAN:-$venv/bin/conan}"
  echo "--- check-packaging: conan create ($("$conan" --version), offline, LibTorch $torch_version)"
  export CONAN_HOME="$out/conan-home"
  if [ ! -f "$CONAN_HOME/profiles/default" ]; then
    "$conan" profile detect >"$out/conan-profile-detect.log" 2>&1 ||
      { cat "$out/conan-profile-detect.log"; exit 1; }
  fi
  # No remote: everything comes from this machine.
  if "$conan" remote list --format=json 2>/dev/null | grep -q '"name"'; then
    "$conan" remote remove '*' >/dev/null
  fi
  eigen_version=$(awk '/#define EIGEN_(WORLD|MAJOR|MINOR)_VERSION/ { v = v (v ? "." : "") $3 } END { print v }' \
    /usr/include/eigen3/Eigen/src/Core/util/Macros.h)
  cat >"$CONAN_HOME/profiles/psft-system" <<PROFILE
include(default)

[platform_requires]
eigen/$eigen_version
libtorch/$torch_version

[buildenv]
CMAKE_PREFIX_PATH=+(path)$PSFT_TORCH_PREFIX
PROFILE
  # The test package builds outside the source tree and writes no
  # CMakeUserPresets.json into it.
  status=0
  "$conan" create . --profile:all=psft-system --build=missing \
    -c tools.cmake.cmaketoolchain:generator=Ninja -c tools.build:jobs=1 \
    -c tools.cmake.cmake_layout:test_folder="$out/conan-test-package" \
    -c tools.cmake.cmaketoolchain:user_presets= >"$out/conan-create.log" 2>&1 || status=$?
  grep -E "^(psft/|ok$|.*ERROR)" "$out/conan-create.log" || true
  if [ "$status" -ne 0 ] || ! grep -qx ok "$out/conan-create.log"; then
    echo "check-packaging: conan create failed; the end of $out/conan-create.log:" >&2
    tail -n 40 "$out/conan-create.log" >&2
    exit 1
  fi
fi
echo "check-packaging: passed"
