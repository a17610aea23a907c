# Builds and runs one consumer project against the psft under test.
#
#   cmake -DPSFT_CONSUMER=find_package|add_subdirectory
#         -DPSFT_BUILD_DIR=<psft build>  -DPSFT_CONSUMER_ROOT=<dir>
#         -DPSFT_INSTALL_PREFIX=<dir>    -DPSFT_GENERATOR=<generator>
#         -DPSFT_CONFIG=<build type>     -P run_consumer.cmake
#
# find_package first installs <psft build> into PSFT_INSTALL_PREFIX. The
# consumer's compiler, flags and CMAKE_PREFIX_PATH come from
# <PSFT_CONSUMER_ROOT>/<consumer>-init.cmake, written by tests/CMakeLists.txt.
# Registered with ctest there; run by hand the same way.
cmake_minimum_required(VERSION 3.18)

foreach(var IN ITEMS PSFT_CONSUMER PSFT_BUILD_DIR PSFT_CONSUMER_ROOT PSFT_INSTALL_PREFIX
                     PSFT_GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

set(source_dir "${CMAKE_CURRENT_LIST_DIR}/${PSFT_CONSUMER}")
set(binary_dir "${PSFT_CONSUMER_ROOT}/${PSFT_CONSUMER}")
set(init_cache "${PSFT_CONSUMER_ROOT}/${PSFT_CONSUMER}-init.cmake")

function(run_step what)
  message(STATUS "consumer ${PSFT_CONSUMER}: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "consumer ${PSFT_CONSUMER}: ${what} failed (${result})")
  endif()
endfunction()

set(config_args "")
if(PSFT_CONFIG)
  set(config_args --config "${PSFT_CONFIG}")
endif()

if(PSFT_CONSUMER STREQUAL "find_package")
  # A fresh prefix each run, so files removed from include/ don't linger.
  # Install keeps the sources' timestamps, so the consumer rebuilds only when
  # a header really changed.
  file(REMOVE_RECURSE "${PSFT_INSTALL_PREFIX}")
  run_step("install" "${CMAKE_COMMAND}" --install "${PSFT_BUILD_DIR}" --prefix
           "${PSFT_INSTALL_PREFIX}" ${config_args})

  # The exported target must not record this machine's paths (LibTorch's
  # libraries, above all): psftConfig.cmake finds LibTorch at consume time.
  file(GLOB_RECURSE export_files "${PSFT_INSTALL_PREFIX}/psftTargets*.cmake")
  if(NOT export_files)
    message(FATAL_ERROR "consumer find_package: no psftTargets.cmake under ${PSFT_INSTALL_PREFIX}")
  endif()
  foreach(export_file IN LISTS export_files)
    file(READ "${export_file}" export_text)
    # A property value (a quoted list) with an element that starts with "/".
    if(export_text MATCHES "\n  INTERFACE_[A-Z_]+ \"([^\"]*;)?/[^\"]*")
      message(FATAL_ERROR "consumer find_package: ${export_file} records an absolute path: "
                          "${CMAKE_MATCH_0}")
    endif()
  endforeach()
endif()

run_step("configure" "${CMAKE_COMMAND}" -S "${source_dir}" -B "${binary_dir}" -G "${PSFT_GENERATOR}"
         -C "${init_cache}" "-DCMAKE_BUILD_TYPE=${PSFT_CONFIG}")
run_step("build" "${CMAKE_COMMAND}" --build "${binary_dir}" ${config_args})

set(consumer_exe "")
foreach(candidate IN ITEMS "${binary_dir}/psft_consumer" "${binary_dir}/${PSFT_CONFIG}/psft_consumer")
  if(NOT consumer_exe AND EXISTS "${candidate}${CMAKE_EXECUTABLE_SUFFIX}")
    set(consumer_exe "${candidate}${CMAKE_EXECUTABLE_SUFFIX}")
  endif()
endforeach()
if(NOT consumer_exe)
  message(FATAL_ERROR "consumer ${PSFT_CONSUMER}: no psft_consumer executable in ${binary_dir}")
endif()
message(STATUS "consumer ${PSFT_CONSUMER}: run")
execute_process(
  COMMAND "${consumer_exe}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
message("${output}")
if(NOT result EQUAL 0 OR NOT output MATCHES "(^|\n)ok\n")
  message(FATAL_ERROR "consumer ${PSFT_CONSUMER}: psft_consumer failed (${result})")
endif()
