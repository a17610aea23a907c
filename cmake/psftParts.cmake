# psft_resolve_part(<out_var> <option> <what>
#                   [PACKAGE <package> [VERSION <version>] INSTALL <where to get it>])
#
# Decides whether one of psft's own parts (tests, benchmarks, examples) is
# built, from the value of its cache option <option>:
#
#   OFF   not built, nothing is looked for;
#   ON    built; a missing <package> is a configure error;
#   AUTO  built if <package> is found (find_package(<package> <version>
#         QUIET)), else left out with one STATUS line that names the package
#         and how to get it. The default when psft is the top-level project,
#         so that a plain configure and install need none of the parts'
#         dependencies.
#
# Sets <out_var> to ON or OFF. The part's own CMakeLists.txt still calls
# find_package(<package> REQUIRED) (which then loads what was found here).
# Simulate a machine without the package with
# -DCMAKE_DISABLE_FIND_PACKAGE_<package>=ON.
include_guard(GLOBAL)

function(psft_resolve_part out_var option what)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "PACKAGE;VERSION;INSTALL" "")
  string(TOUPPER "${${option}}" setting)
  if(setting STREQUAL "AUTO")
    set(required OFF)
  elseif(setting MATCHES "^(ON|YES|TRUE|Y|1)$")
    set(required ON)
  elseif(setting MATCHES "^(OFF|NO|FALSE|N|0|)$")
    set(${out_var}
        OFF
        PARENT_SCOPE)
    return()
  else()
    message(FATAL_ERROR "psft: ${option} is \"${${option}}\"; use ON, OFF or AUTO")
  endif()
  if(arg_PACKAGE)
    find_package(${arg_PACKAGE} ${arg_VERSION} QUIET)
    if(NOT ${arg_PACKAGE}_FOUND)
      set(package "${arg_PACKAGE}")
      if(arg_VERSION)
        string(APPEND package " (version ${arg_VERSION})")
      endif()
      if(required)
        message(
          FATAL_ERROR
            "psft: ${option} is ON but the package ${package} was not found. Install it "
            "(${arg_INSTALL}) or add its prefix to CMAKE_PREFIX_PATH, or configure with "
            "-D${option}=OFF.")
      endif()
      message(STATUS "psft: ${what} skipped: package ${package} not found; to build them, "
                     "install it (${arg_INSTALL}) and reconfigure (-D${option}=ON requires it)")
      set(${out_var}
          OFF
          PARENT_SCOPE)
      return()
    endif()
  endif()
  set(${out_var}
      ON
      PARENT_SCOPE)
endfunction()
