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
