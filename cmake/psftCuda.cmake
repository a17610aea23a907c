# psft_enable_cuda(<target> [ARCHITECTURES <list>])
#
# Compiles psft's CUDA translation unit (psft/cuda/psft_cuda.cu) into
# <target> with nvcc and defines PSFT_WITH_CUDA_KERNELS for the whole target,
# so that psft routes CUDA tensors to its fused kernels (psft::backend_for
# then answers Backend::FusedCuda). Call it for exactly one target of a
# program: the entry points it defines are ordinary, non-inline functions.
#
# Installed next to psftConfig.cmake; a find_package(psft) consumer writes
#   include("${psft_DIR}/psftCuda.cmake")
#   psft_enable_cuda(my_trainer)
#
# It is a macro because enable_language() must run at directory scope.
# Architectures default to CMAKE_CUDA_ARCHITECTURES, else "80;90" (A100,
# H100/H200). Needs a CUDA build of LibTorch and an nvcc that supports the
# C++ standard that LibTorch asks for (C++20 for LibTorch 2.10 and later).
include_guard(GLOBAL)

set(psft_cuda_cmake_dir "${CMAKE_CURRENT_LIST_DIR}")

# Where psft_cuda.cu is: next to the headers, in the source tree
# (cmake/../include) or an install (lib/cmake/psft/../../../include, or one
# level more for a multiarch libdir such as lib/x86_64-linux-gnu).
function(psft_cuda_source out_var)
  foreach(candidate IN ITEMS "${psft_cuda_cmake_dir}/../include"
                             "${psft_cuda_cmake_dir}/../../../include"
                             "${psft_cuda_cmake_dir}/../../../../include")
    if(EXISTS "${candidate}/psft/cuda/psft_cuda.cu")
      get_filename_component(found "${candidate}/psft/cuda/psft_cuda.cu" ABSOLUTE)
      set(${out_var}
          "${found}"
          PARENT_SCOPE)
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "psft: psft/cuda/psft_cuda.cu not found next to ${psft_cuda_cmake_dir}")
endfunction()

function(psft_enable_cuda_target target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "ARCHITECTURES")
  psft_cuda_source(source)
  target_sources(${target} PRIVATE "${source}")
  target_compile_definitions(${target} PRIVATE PSFT_WITH_CUDA_KERNELS)
  if(arg_ARCHITECTURES)
    set_property(TARGET ${target} PROPERTY CUDA_ARCHITECTURES ${arg_ARCHITECTURES})
  endif()
  # LibTorch's shared CUDA runtime, not a second, static one.
  set_property(TARGET ${target} PROPERTY CUDA_RUNTIME_LIBRARY Shared)
  # --expt-relaxed-constexpr: c10's half/bfloat16 headers call constexpr host
  # functions from host-device code, as PyTorch's own CUDA build allows.
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
endfunction()

macro(psft_enable_cuda target)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "80;90")
  endif()
  enable_language(CUDA)
  # LibTorch 2.10+ asks for C++20 (compile feature cxx_std_20, which CMake
  # applies to CUDA sources too), but CMake before 3.27 has no nvcc flag for
  # it; nvcc 12+ takes -std=c++20.
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  # find_package(Torch) appends -gencode flags for every architecture its
  # wheel was built for to CMAKE_CUDA_FLAGS, some of which (compute_50) a
  # newer nvcc rejects; CUDA_ARCHITECTURES chooses the architectures instead.
  string(REGEX REPLACE "-gencode[ =]arch=compute_[0-9a-z]+,code=[a-z_0-9]+" "" CMAKE_CUDA_FLAGS
                       "${CMAKE_CUDA_FLAGS}")
  psft_enable_cuda_target(${target} ${ARGN})
endmacro()
