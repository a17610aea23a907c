# Helpers around find_package(Torch), shared by psft's own build and by the
# installed psftConfig.cmake (this file is installed next to it).
include_guard(GLOBAL)

# Fails when TorchConfig.cmake took libtorch/libc10 from a different LibTorch
# than its own. Its find_library() calls search the system directories before
# their PATHS hint, so with a pip wheel found only through Torch_DIR (or
# CMAKE_PREFIX_PATH=<wheel>/share/cmake) and a distribution LibTorch also
# installed, the wheel's headers would be linked against the system's
# libraries. Putting the wheel's root in CMAKE_PREFIX_PATH avoids it.
function(psft_check_torch)
  if(NOT TORCH_INSTALL_PREFIX)
    return()
  endif()
  get_filename_component(torch_prefix "${TORCH_INSTALL_PREFIX}" REALPATH)
  foreach(library_var IN ITEMS TORCH_LIBRARY c10_LIBRARY)
    if(NOT ${library_var})
      continue()
    endif()
    get_filename_component(library "${${library_var}}" REALPATH)
    string(FIND "${library}" "${torch_prefix}/" position)
    if(NOT position EQUAL 0)
      message(
        FATAL_ERROR
          "psft: LibTorch's CMake files come from ${TORCH_INSTALL_PREFIX} but "
          "${library_var} is ${${library_var}}, another LibTorch. Add "
          "${TORCH_INSTALL_PREFIX} to CMAKE_PREFIX_PATH (and start from an empty "
          "build directory) so that its libraries are found first.")
    endif()
  endforeach()
endfunction()

# Sets out_var to the flags of TORCH_CXX_FLAGS (e.g. -D_GLIBCXX_USE_CXX11_ABI=0)
# that the imported target `torch` does not already carry in its
# INTERFACE_COMPILE_OPTIONS. LibTorch releases so far all carry them, so this
# is normally empty; it guards consumers against a TorchConfig that only
# appends them to CMAKE_CXX_FLAGS.
function(psft_torch_missing_cxx_flags out_var)
  set(missing "")
  if(TORCH_CXX_FLAGS)
    separate_arguments(flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
    set(carried "")
    if(TARGET torch)
      get_target_property(carried torch INTERFACE_COMPILE_OPTIONS)
    endif()
    foreach(flag IN LISTS flags)
      list(FIND carried "${flag}" index) # not IN_LIST: consumers' policies apply here
      if(index EQUAL -1)
        list(APPEND missing "${flag}")
      endif()
    endforeach()
  endif()
  set(${out_var}
      "${missing}"
      PARENT_SCOPE)
endfunction()

# Sets out_var to the link options that let the linker resolve the torch
# wheel's own dependencies the way the loader will. The wheel's libraries
# find the CUDA libraries of pip's nvidia-* packages through their RPATH
# ($ORIGIN/../../nvidia/*/lib), but the linker tries the link line's -rpath
# first, and that holds the CUDA toolkit's lib directory when one is
# installed: a toolkit older than the wheel's CUDA then fails the link with
# undefined NCCL or cuBLAS symbols. -rpath-link, which affects only the link,
# points the linker at the wheel's copies. Empty for other LibTorch layouts.
function(psft_torch_link_options out_var)
  set(options "")
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND TORCH_INSTALL_PREFIX)
    file(
      GLOB wheel_library_dirs
      LIST_DIRECTORIES true
      "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
    if(wheel_library_dirs)
      list(PREPEND wheel_library_dirs "${TORCH_INSTALL_PREFIX}/lib")
      string(REPLACE ";" ":" joined "${wheel_library_dirs}")
      set(options "LINKER:-rpath-link,${joined}")
    endif()
  endif()
  set(${out_var}
      "${options}"
      PARENT_SCOPE)
endfunction()

# Makes the imported targets that find_package() calls created in the current
# directory global. Needed when psft is a subproject (add_subdirectory):
# LibTorch's targets refer to each other through generator expressions such
# as $<TARGET_PROPERTY:torch_cpu,...>, which are evaluated where psft::psft
# is linked, in the parent project, where directory-scoped imported targets
# are not visible. `before` is the IMPORTED_TARGETS list taken before the
# find_package() calls (empty before CMake 3.21, where a fixed list of
# LibTorch's targets is used instead).
function(psft_make_imported_targets_global before)
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.21)
    get_directory_property(targets IMPORTED_TARGETS)
    if(before)
      list(REMOVE_ITEM targets ${before})
    endif()
  else()
    set(targets
        torch
        torch_library
        torch_cpu
        torch_cpu_library
        torch_cuda
        torch_cuda_library
        c10
        c10_cuda
        Eigen3::Eigen)
  endif()
  foreach(target IN LISTS targets)
    if(TARGET ${target})
      get_target_property(imported ${target} IMPORTED)
      get_target_property(global ${target} IMPORTED_GLOBAL)
      get_target_property(aliased ${target} ALIASED_TARGET)
      if(imported AND NOT global AND NOT aliased)
        set_target_properties(${target} PROPERTIES IMPORTED_GLOBAL TRUE)
      endif()
    endif()
  endforeach()
endfunction()

# Note [A quiet find_package(Torch)]
# find_package(Torch) of the torch wheel (a CUDA build) warns twice about
# LibTorch's own packaging, in every project that finds it:
#
# - "library kineto not found": TorchConfig.cmake appends a kineto library
#   to TORCH_LIBRARIES if find_library() finds one, but shared LibTorch
#   builds link kineto into libtorch_cpu and ship none (pytorch/pytorch
#   issues 62588, 110259, 169182). Unless a kineto library is found where
#   TorchConfig.cmake would look, psft answers its find_library() with a
#   normal variable kineto_LIBRARY=torch (find_library() takes a variable
#   that is already set as the answer and caches nothing): the target that
#   holds kineto and is on the link line anyway.
# - "pytorch is not compatible with CMAKE_CUDA_ARCHITECTURES": Torch enables
#   CUDA when it finds nvcc, which under policy CMP0104 NEW caches nvcc's
#   default architectures in CMAKE_CUDA_ARCHITECTURES, and then warns that
#   the variable is defined (Torch wants TORCH_CUDA_ARCH_LIST) and sets it
#   to OFF. With CMP0104 OLD while Torch is found, enable_language(CUDA)
#   leaves it undefined; psft then sets the plain variable to OFF itself,
#   so that CUDA targets created later see what they saw before. An
#   architecture list the user chose (-D, CUDAARCHS) still gets Torch's
#   warning: it is the user's setting that Torch ignores. What changes: no
#   cached default, so a CUDA target in a directory that sees neither the
#   plain variable nor a chosen list (a sibling of the directory that found
#   Torch) needs CMAKE_CUDA_ARCHITECTURES or psft_enable_cuda(), which sets
#   its architectures itself (Note [CUDA architectures] in psftCuda.cmake).
#
# Use: in a policy scope of its own (cmake_policy(PUSH) ... POP, or a
# package config file, which find_package() reads in one),
#   psft_prepare_find_torch()
#   find_package(Torch ...)
#   psft_finish_find_torch()
macro(psft_prepare_find_torch)
  if(POLICY CMP0104)
    cmake_policy(SET CMP0104 OLD)
  endif()
  psft_torch_kineto_hint()
endmacro()

macro(psft_finish_find_torch)
  if(CMAKE_CUDA_COMPILER_LOADED AND NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES OFF)
  endif()
  if(psft_kineto_hinted)
    unset(kineto_LIBRARY)
    unset(psft_kineto_hinted)
  endif()
endmacro()

# Sets kineto_LIBRARY=torch and psft_kineto_hinted=ON in the caller's scope
# when no kineto library is found where TorchConfig.cmake's find_library()
# would find it (the default search paths, its TORCH_INSTALL_PREFIX/lib).
function(psft_torch_kineto_hint)
  if(kineto_LIBRARY) # someone's answer, or a kineto library found earlier
    return()
  endif()
  set(hints "")
  if(DEFINED ENV{TORCH_INSTALL_PREFIX})
    list(APPEND hints "$ENV{TORCH_INSTALL_PREFIX}/lib")
  endif()
  if(Torch_DIR)
    list(APPEND hints "${Torch_DIR}/../../../lib")
  endif()
  find_library(psft_kineto_library kineto PATHS ${hints})
  set(found "${psft_kineto_library}")
  unset(psft_kineto_library CACHE)
  if(NOT found)
    set(kineto_LIBRARY
        torch
        PARENT_SCOPE)
    set(psft_kineto_hinted
        ON
        PARENT_SCOPE)
  endif()
endfunction()

# Sets out_var to the version of the LibTorch that find_package(Torch)
# found: Torch_VERSION (from TorchConfigVersion.cmake) or, for a LibTorch
# that ships no version file, TORCH_VERSION_MAJOR/MINOR/PATCH of its
# torch/version.h (torch/headeronly/version.h since LibTorch 2.10);
# "unknown version" if neither is there.
function(psft_torch_version out_var)
  set(version "${Torch_VERSION}")
  if(NOT version)
    set(version "unknown version")
    foreach(dir IN LISTS TORCH_INCLUDE_DIRS)
      foreach(header IN ITEMS torch/headeronly/version.h torch/version.h)
        if(version STREQUAL "unknown version" AND EXISTS "${dir}/${header}")
          file(STRINGS "${dir}/${header}" defines
               REGEX "^#define TORCH_VERSION_(MAJOR|MINOR|PATCH) [0-9]+")
          set(parts "")
          foreach(part IN ITEMS MAJOR MINOR PATCH)
            foreach(define IN LISTS defines)
              if(define MATCHES "TORCH_VERSION_${part} ([0-9]+)")
                list(APPEND parts "${CMAKE_MATCH_1}")
              endif()
            endforeach()
          endforeach()
          list(LENGTH parts count)
          if(count EQUAL 3)
            string(REPLACE ";" "." version "${parts}")
          endif()
        endif()
      endforeach()
    endforeach()
  endif()
  set(${out_var}
      "${version}"
      PARENT_SCOPE)
endfunction()

# Note [One libgomp]
# The torch wheel ships its own libgomp.so.1 next to libtorch_cpu.so, and
# a program linked with LibTorch gets that directory in its runtime path,
# so the wheel's libgomp is the one loaded at run time, by LibTorch and by
# psft's OpenMP code alike. OpenMP::OpenMP_CXX links the compiler's libgomp
# instead, from a directory the linker searches implicitly, which makes
# CMake warn for every executable that it "cannot generate a safe runtime
# search path" (that libgomp.so.1 "may be hidden" by the wheel's). Linking
# the wheel's libgomp, the one that runs, removes the conflict: the link
# checks psft's OpenMP calls against the library that will serve them.
#
# Sets options_var to the compile options and libraries_var to the link
# libraries that give a target OpenMP: OpenMP::OpenMP_CXX's own, with its
# libgomp replaced by TORCH_INSTALL_PREFIX/lib/libgomp.so.1 where that
# exists, else no options and OpenMP::OpenMP_CXX itself.
function(psft_torch_openmp options_var libraries_var)
  set(options "")
  set(libraries OpenMP::OpenMP_CXX)
  set(torch_gomp "${TORCH_INSTALL_PREFIX}/lib/libgomp.so.1")
  if(TORCH_INSTALL_PREFIX
     AND EXISTS "${torch_gomp}"
     AND TARGET OpenMP::OpenMP_CXX)
    get_target_property(target_options OpenMP::OpenMP_CXX INTERFACE_COMPILE_OPTIONS)
    get_target_property(target_libraries OpenMP::OpenMP_CXX INTERFACE_LINK_LIBRARIES)
    get_target_property(target_includes OpenMP::OpenMP_CXX INTERFACE_INCLUDE_DIRECTORIES)
    get_target_property(target_link_options OpenMP::OpenMP_CXX INTERFACE_LINK_OPTIONS)
    set(replaced "")
    set(replaced_gomp OFF)
    foreach(item IN LISTS target_libraries)
      if(item MATCHES "(^|/)libgomp\\.so(\\.[0-9]+)*$")
        list(APPEND replaced "${torch_gomp}")
        set(replaced_gomp ON)
      else()
        list(APPEND replaced "${item}")
      endif()
    endforeach()
    # Only the plain GCC form: compile options plus libraries.
    if(replaced_gomp
       AND NOT target_includes
       AND NOT target_link_options)
      set(options "")
      if(target_options)
        set(options "${target_options}")
      endif()
      set(libraries "${replaced}")
    endif()
  endif()
  set(${options_var}
      "${options}"
      PARENT_SCOPE)
  set(${libraries_var}
      "${libraries}"
      PARENT_SCOPE)
endfunction()
