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
# Architectures: ARCHITECTURES if given, else CMAKE_CUDA_ARCHITECTURES if
# chosen (find_package(Torch) hides a -D value; Note [CUDA architectures]),
# else "80;90" (A100, H100/H200). Each architecture is one more nvcc pass
# over psft_cuda.cu (about 40 s), so a build for one GPU names just its own
# (ARCHITECTURES 90 or -DCMAKE_CUDA_ARCHITECTURES=90 on an H100 or H200, as
# scripts/gpu-check.sh does). Needs a CUDA build of LibTorch and an nvcc
# that supports the C++ standard that LibTorch asks for (C++20 for LibTorch
# 2.10 and later).
include_guard(GLOBAL)

# Where psft_cuda.cu is: next to the headers, in the source tree
# (cmake/../include) or an install (lib/cmake/psft/../../../include, or one
# level more for a multiarch libdir such as lib/x86_64-linux-gnu). Found
# from this file's own folder, which a variable set when it is included would
# not give a consumer of add_subdirectory(psft): that runs in another scope.
function(psft_cuda_source out_var)
  set(psft_cuda_cmake_dir "${CMAKE_CURRENT_FUNCTION_LIST_DIR}")
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

# Note [CUDA architectures]: find_package(Torch) enables CUDA, which caches
# nvcc's default architecture unless one was chosen (not where psft finds
# Torch: Note [A quiet find_package(Torch)] in psftTorch.cmake), and then
# sets the plain variable CMAKE_CUDA_ARCHITECTURES to OFF (psft does it
# there, in Torch's place). A target created afterwards gets
# CUDA_ARCHITECTURES OFF: nvcc sees no -gencode and builds for its default
# (sm_75 for nvcc 13, PTX that an H100 JIT-compiles). So psft always sets the
# property, from the first of: ARCHITECTURES; a plain variable that is not
# OFF (set after find_package(Torch)); the cached value if someone chose it
# (-D, a preset, the CUDAARCHS environment variable), not the default CMake
# detected, which it documents as "CUDA architectures"; "80;90".
function(psft_cuda_architectures out_var requested)
  set(current "${CMAKE_CUDA_ARCHITECTURES}") # the plain variable, else the cache
  set(cached "$CACHE{CMAKE_CUDA_ARCHITECTURES}")
  get_property(cached_doc CACHE CMAKE_CUDA_ARCHITECTURES PROPERTY HELPSTRING)
  set(cached_by_cmake OFF)
  if(cached_doc STREQUAL "CUDA architectures" AND "$ENV{CUDAARCHS}" STREQUAL "")
    set(cached_by_cmake ON)
  endif()
  if(requested)
    set(architectures "${requested}")
  elseif(current AND NOT current STREQUAL cached)
    set(architectures "${current}")
  elseif(cached AND NOT cached_by_cmake)
    set(architectures "${cached}")
  else()
    set(architectures "80;90")
  endif()
  set(${out_var}
      "${architectures}"
      PARENT_SCOPE)
endfunction()

function(psft_enable_cuda_target target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "ARCHITECTURES")
  psft_cuda_source(source)
  target_sources(${target} PRIVATE "${source}")
  target_compile_definitions(${target} PRIVATE PSFT_WITH_CUDA_KERNELS)
  psft_cuda_architectures(architectures "${arg_ARCHITECTURES}")
  set_property(TARGET ${target} PROPERTY CUDA_ARCHITECTURES "${architectures}")
  # LibTorch's shared CUDA runtime, not a second, static one.
  set_property(TARGET ${target} PROPERTY CUDA_RUNTIME_LIBRARY Shared)
  # --expt-relaxed-constexpr: c10's half/bfloat16 headers call constexpr host
  # functions from host-device code, as PyTorch's own CUDA build allows.
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
endfunction()

macro(psft_enable_cuda target)
  # Before enable_language(), which would otherwise cache nvcc's default.
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
