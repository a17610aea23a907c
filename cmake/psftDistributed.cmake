# Whether this build can create c10d Gloo process groups: LibTorch's
# c10d/ProcessGroupGloo.hpp includes gloo's own headers, which LibTorch
# distributions do not all ship (the torch wheel does not; Debian's
# libgloo-dev provides them). Only psft's tests and examples need this:
# psft/distributed/c10d.hpp itself uses the generic c10d::ProcessGroup.
include_guard(GLOBAL)

option(PSFT_GLOO "Build psft's c10d Gloo tests and example when gloo's headers are found" ON)

# Sets out_var to ON when PSFT_GLOO is on and ProcessGroupGloo.hpp and
# gloo's headers are both found, OFF otherwise, and out_var_REASON to why not.
function(psft_find_c10d_gloo out_var)
  set(c10d_header "")
  foreach(dir IN LISTS TORCH_INCLUDE_DIRS)
    if(EXISTS "${dir}/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
      set(c10d_header "${dir}/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
      break()
    endif()
  endforeach()
  find_path(PSFT_GLOO_INCLUDE_DIR gloo/config.h DOC "Directory holding gloo/config.h")
  if(NOT PSFT_GLOO)
    set(${out_var} OFF PARENT_SCOPE)
    set(${out_var}_REASON "PSFT_GLOO is OFF" PARENT_SCOPE)
  elseif(NOT c10d_header)
    set(${out_var} OFF PARENT_SCOPE)
    set(${out_var}_REASON "LibTorch has no c10d/ProcessGroupGloo.hpp (built without distributed)"
        PARENT_SCOPE)
  elseif(NOT PSFT_GLOO_INCLUDE_DIR)
    set(${out_var} OFF PARENT_SCOPE)
    set(${out_var}_REASON "gloo's headers (gloo/config.h) were not found; install libgloo-dev"
        PARENT_SCOPE)
  else()
    set(${out_var} ON PARENT_SCOPE)
    set(${out_var}_REASON "" PARENT_SCOPE)
  endif()
endfunction()
