# vcpkg overlay port for psft, a header-only library.
#
#   vcpkg install psft --overlay-ports=<psft>/ports
#   vcpkg install "psft[libtorch]" --overlay-ports=<psft>/ports   # LibTorch from vcpkg too
#
# The source is this repository (the port lives in <psft>/ports/psft), so the
# port always installs the checkout it sits in; there is no download step.
#
# LibTorch: without the "libtorch" feature psft uses a LibTorch that is
# already on the machine, both here (psft's configure step looks for it) and
# in the consuming project (psftConfig.cmake finds it again). Debian's
# libtorch-dev is found in /usr with no settings; for any other LibTorch (the
# libtorch zip, the torch wheel's torch/ directory) add its root to the
# triplet, e.g. in an overlay triplet:
#   set(VCPKG_CMAKE_CONFIGURE_OPTIONS "-DCMAKE_PREFIX_PATH=/opt/libtorch")
# and to the consuming project's CMAKE_PREFIX_PATH.
#
# Note [Port options are checked]: the OPTIONS below are read by the
# repository's scripts/check-packaging.sh, which configures, installs and
# consumes psft with exactly these options; keep one option per line.

set(VCPKG_BUILD_TYPE release) # header-only: one configuration is enough

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)
if(NOT EXISTS "${SOURCE_PATH}/include/psft/psft.hpp")
  message(FATAL_ERROR "psft port: ${SOURCE_PATH} is not a psft checkout; "
                      "use the port from <psft>/ports with --overlay-ports")
endif()

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -DPSFT_BUILD_TESTS=OFF
    -DPSFT_BUILD_BENCHMARKS=OFF
    -DPSFT_BUILD_EXAMPLES=OFF
    -DPSFT_HEADER_CHECK=OFF
    -DPSFT_CONSUMER_TESTS=OFF
    -DPSFT_CUDA=OFF
    -DPSFT_INSTALL=ON
    -DPSFT_INSTALL_CMAKEDIR=share/psft
)

vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME psft CONFIG_PATH share/psft)

# Header-only: nothing lands in lib/ or debug/.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/debug")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
if(EXISTS "${SOURCE_PATH}/LICENSE")
  vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
else()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright"
       "psft: see the license terms of the psft repository.\n")
endif()
