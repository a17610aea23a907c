# Compile options for psft's own targets (tests, benchmarks, examples, header
# check); nothing here reaches consumers of psft::psft.
include_guard(GLOBAL)

# Warnings for our code. Torch, Eigen, Catch2 and Google Benchmark come in
# through imported targets, so their headers are -isystem and stay quiet.
function(psft_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4)
  endif()
endfunction()

# PSFT_SANITIZE (e.g. "address,undefined") for test targets: compile and link.
function(psft_target_sanitize target)
  if(NOT PSFT_SANITIZE)
    return()
  endif()
  target_compile_options(${target} PRIVATE -fsanitize=${PSFT_SANITIZE} -fno-omit-frame-pointer)
  get_target_property(type ${target} TYPE)
  if(NOT type STREQUAL "OBJECT_LIBRARY")
    target_link_options(${target} PRIVATE -fsanitize=${PSFT_SANITIZE})
  endif()
endfunction()

# The environment a sanitized test runs in. LeakSanitizer is off: LibTorch
# keeps process-lifetime state (thread pools, registries) that it never
# frees, which LSan can count as leaks. UBSan findings must fail the test.
set(PSFT_SANITIZE_TEST_ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0"
                                   "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
