#!/usr/bin/env python3
"""Turns a psft C++ notebook (xeus-cling, kernel xcpp17) into a program.

    notebook_to_cpp.py NOTEBOOK.ipynb OUT.cpp      # a C++ file for g++
    notebook_to_cpp.py --cling NOTEBOOK.ipynb      # run the cells under cling (cppyy)

The convention the notebooks follow, so that each one is also a program that
CI compiles and runs:

  * Code cells run in order. A cell whose first line is the comment
    `// file scope` holds declarations (#include, functions, structs,
    constants) and goes to file scope; every other cell holds statements and
    goes, in order, into one main(), so that variables declared in one cell
    are visible in the next, as in the notebook.
  * `#pragma cling ...` lines (the first cell's paths and libraries) are
    removed for g++, which gets the same paths from CMake.
  * Every statement ends with `;` (no bare expressions for cling to print)
    and a failed check throws, which makes main() return 1.

Under --cling the cells run through cppyy's cling, the interpreter that
xeus-cling uses: declaration cells with cppdef, statement cells with
cppexec, and the pragmas as the equivalent calls (load: dlopen with
RTLD_GLOBAL, see load_global), with the LibTorch prefix
/opt/libtorch replaced by --torch-prefix and the psft include path
../../include by --psft-include.
"""

import argparse
import json
import os
import re
import sys

MARKER = "// file scope"
PRAGMA = re.compile(r'^\s*#pragma\s+cling\s+(\w+)\s*\(\s*"([^"]*)"\s*\)\s*$')
DEFAULT_TORCH_PREFIX = "/opt/libtorch"
DEFAULT_PSFT_INCLUDE = "../../include"


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    kernel = notebook.get("metadata", {}).get("kernelspec", {}).get("name")
    if kernel != "xcpp17":
        sys.exit(f"{path}: kernelspec is {kernel!r}, expected 'xcpp17'")
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        text = "".join(source) if isinstance(source, list) else source
        lines = text.split("\n")
        file_scope = bool(lines) and lines[0].strip() == MARKER
        yield index, file_scope, lines


def to_cpp(path):
    declarations, statements = [], []
    for index, file_scope, lines in code_cells(path):
        kept = [line for line in lines if not PRAGMA.match(line)]
        stray = [line for line in kept if line.lstrip().startswith("#pragma cling")]
        if stray:
            sys.exit(f"{path}: cell {index}: unrecognised cling pragma: {stray[0]}")
        block = f"// ---- cell {index}\n" + "\n".join(kept).rstrip() + "\n"
        (declarations if file_scope else statements).append(block)
    body = "".join("  " + line + "\n" if line else "\n" for block in statements
                   for line in block.rstrip("\n").split("\n"))
    return (
        f"// Generated from {path.split('/')[-1]} by notebook_to_cpp.py; do not edit.\n"
        + "\n".join(declarations)
        + "\n#include <exception>\n#include <iostream>\n\n"
        + "int main() {\n  try {\n"
        + body
        + "  } catch (const std::exception& e) {\n"
        + '    std::cerr << "notebook failed: " << e.what() << "\\n";\n'
        + "    return 1;\n  }\n  return 0;\n}\n"
    )


def load_global(name, library_paths):
    """dlopen(RTLD_GLOBAL) of a library from the pragmas' library paths.

    cppyy.load_library() loads LibTorch but leaves its symbols invisible to
    cppyy's JIT linker (every call into LibTorch is then an unresolved
    symbol), so the libraries are opened globally instead, as xeus-cling's
    `#pragma cling load` does."""
    import ctypes  # noqa: PLC0415

    for directory in library_paths:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)  # the loader's own search


def run_cling(path, torch_prefix, psft_include):
    import cppyy  # noqa: PLC0415 (only this mode needs it)

    library_paths = []
    for index, file_scope, lines in code_cells(path):
        code = []
        for line in lines:
            match = PRAGMA.match(line)
            if not match:
                code.append(line)
                continue
            what, arg = match.groups()
            arg = arg.replace(DEFAULT_TORCH_PREFIX, torch_prefix)
            if arg == DEFAULT_PSFT_INCLUDE:
                arg = psft_include
            if what == "add_include_path":
                cppyy.add_include_path(arg)
            elif what == "add_library_path":
                library_paths.append(arg)
            elif what == "load":
                load_global(arg, library_paths)
            else:
                sys.exit(f"{path}: cell {index}: unsupported pragma {what}")
        text = "\n".join(code)
        print(f"--- cling: cell {index} ({'file scope' if file_scope else 'statements'})",
              flush=True)
        if file_scope:
            if not cppyy.cppdef(text):
                sys.exit(f"{path}: cell {index} failed under cling")
        else:
            cppyy.cppexec(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebook")
    parser.add_argument("output", nargs="?")
    parser.add_argument("--cling", action="store_true", help="run the cells with cppyy")
    parser.add_argument("--torch-prefix", default=DEFAULT_TORCH_PREFIX)
    parser.add_argument("--psft-include", default=DEFAULT_PSFT_INCLUDE)
    args = parser.parse_args()
    if args.cling:
        run_cling(args.notebook, args.torch_prefix, args.psft_include)
        return
    if not args.output:
        parser.error("OUT.cpp is required without --cling")
    text = to_cpp(args.notebook)
    try:
        with open(args.output, encoding="utf-8") as f:
            if f.read() == text:
                return  # unchanged: keep the timestamp, no rebuild
    except FileNotFoundError:
        pass
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
