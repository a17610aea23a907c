# Compiles and runs the code of a Markdown guide, so that documented code
# cannot rot. Every ```cpp fenced block of the file, in order, is copied into
# one generated translation unit (blocks fenced otherwise, e.g. ```text, are
# prose); together they must form a complete program whose main() returns 0.
# The file is a configure dependency: editing the guide re-runs CMake, which
# regenerates the unit (rewritten only when its content changes).
#
#   psft_add_doc_snippets(<target> <markdown file> [LABELS <labels...>]
#                         [LINK <libraries...>])
#
# adds executable <target> and a ctest entry of the same name, linked with
# LINK (default psft::psft; psft_torch_free for a guide that must build
# without LibTorch). #line directives point compiler errors at the guide's
# own lines.
include_guard(GLOBAL)

function(psft_add_doc_snippets target markdown)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "LABELS;LINK")
  if(NOT arg_LINK)
    set(arg_LINK psft::psft)
  endif()
  set_property(
    DIRECTORY
    APPEND
    PROPERTY CMAKE_CONFIGURE_DEPENDS "${markdown}")
  # The whole file as one string, searched with string(FIND): no CMake list
  # ever holds code, so semicolons and blank lines survive.
  file(READ "${markdown}" rest)
  set(rest "\n${rest}")
  set(open_fence "\n```cpp\n")
  set(close_fence "\n```\n")
  string(LENGTH "${open_fence}" open_length)
  set(source "// Generated from ${markdown} by psft_add_doc_snippets: do not edit.\n")
  set(blocks 0)
  set(line_number 0)  # lines of the guide consumed so far
  while(TRUE)
    string(FIND "${rest}" "${open_fence}" start)
    if(start EQUAL -1)
      break()
    endif()
    math(EXPR code_start "${start} + ${open_length}")
    string(SUBSTRING "${rest}" 0 ${code_start} before)
    string(SUBSTRING "${rest}" ${code_start} -1 rest)
    string(REGEX MATCHALL "\n" newlines "${before}")
    list(LENGTH newlines count)
    math(EXPR line_number "${line_number} + ${count} - 1")
    string(FIND "${rest}" "${close_fence}" stop)
    if(stop EQUAL -1)
      message(FATAL_ERROR "psft_add_doc_snippets: ${markdown} ends inside a ```cpp block")
    endif()
    string(SUBSTRING "${rest}" 0 ${stop} code)
    math(EXPR first_code_line "${line_number} + 1")
    string(APPEND source "#line ${first_code_line} \"${markdown}\"\n${code}\n")
    # Keep the closing fence's leading newline for the next search.
    string(SUBSTRING "${rest}" ${stop} -1 rest)
    string(REGEX MATCHALL "\n" newlines "${code}")
    list(LENGTH newlines count)
    math(EXPR line_number "${line_number} + ${count} + 1")
    math(EXPR blocks "${blocks} + 1")
  endwhile()
  if(blocks EQUAL 0)
    message(FATAL_ERROR "psft_add_doc_snippets: ${markdown} has no ```cpp block")
  endif()
  set(generated "${CMAKE_CURRENT_BINARY_DIR}/${target}.cpp")
  set(previous "")
  if(EXISTS "${generated}")
    file(READ "${generated}" previous)
  endif()
  if(NOT previous STREQUAL source)  # rewrite only on change: no needless rebuild
    file(WRITE "${generated}" "${source}")
  endif()
  add_executable(${target} "${generated}")
  target_link_libraries(${target} PRIVATE ${arg_LINK})
  psft_target_warnings(${target})
  psft_target_sanitize(${target})
  add_test(NAME ${target} COMMAND ${target})
  set_tests_properties(${target} PROPERTIES LABELS "${arg_LABELS}" TIMEOUT 600)
  if(PSFT_SANITIZE)
    set_tests_properties(${target} PROPERTIES ENVIRONMENT "${PSFT_SANITIZE_TEST_ENVIRONMENT}")
  endif()
endfunction()
