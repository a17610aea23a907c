#!/usr/bin/env python3
"""Turns a psft C++ notebook (xeus-cling, kernel xcpp17) into a program.

    notebook_to_cpp.py NOTEBOOK.ipynb OUT.cpp      # a C++ file for g++
    notebook_to_cpp.py --repl NOTEBOOK.ipynb --driver psft_notebook_repl --workdir DIR
                                                   # run the cells in clang's interpreter
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

Under --repl the cells run one by one, whole and as written, in clang's
incremental interpreter (psft_notebook_repl, built from notebook_repl.cpp:
clang 19's clang::Interpreter, the engine of clang-repl and xeus-cpp), with
the first cell's paths edited as a user edits them (/opt/libtorch to
--torch-prefix, ../../include to --psft-include) and kernel_stub/ on the
include path, so that the display hook (xcpp::display) is compiled and run
too. It fails if a cell does not compile or link, throws, or the
interpreter crashes, naming the cell, and then checks the plots: every SVG
file a cell wrote ("wrote FILE") parses, and each was displayed once, with
the same text. A cell whose leading comment lines include
`// not in the interpreter: <reason>` is left out of this run (and only of
this run); see README.md for when that is allowed.

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
import signal
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

MARKER = "// file scope"
NOT_IN_INTERPRETER = re.compile(r"^\s*//\s*not in the interpreter:\s*(\S.*)$")
# The interpreter's compiler flags, the argv of a xeus-cpp kernelspec:
# LibTorch 2.x needs C++20 (README.md, "Under an interpreter").
INTERPRETER_FLAGS = ["-std=c++20"]
KERNEL_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_stub")
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


def leading_comments(lines):
    """The cell's comment lines before its first line of code."""
    comments = []
    for line in lines:
        if not line.strip().startswith("//"):
            break
        comments.append(line)
    return comments


def edit_paths(line, torch_prefix, psft_include):
    """A first-cell pragma with the user's paths, as a user edits it."""
    match = PRAGMA.match(line)
    if not match:
        return line
    arg = match.group(2)
    edited = psft_include if arg == DEFAULT_PSFT_INCLUDE else arg.replace(
        DEFAULT_TORCH_PREFIX, torch_prefix)
    return line[:match.start(2)] + edited + line[match.end(2):]


def check_plots(path, workdir, written):
    """Every SVG a cell wrote parses; the display hook showed each one once."""
    if not written:
        sys.exit(f"{path}: no cell wrote a plot under the interpreter")
    for file in written:
        try:
            root = ElementTree.parse(os.path.join(workdir, file)).getroot()
        except (OSError, ElementTree.ParseError) as error:
            sys.exit(f"{path}: plot {file}: {error}")
        if root.tag != "{http://www.w3.org/2000/svg}svg" or not root.findall(
                "{http://www.w3.org/2000/svg}polyline"):
            sys.exit(f"{path}: plot {file} is not an SVG line plot")
    shown = sorted((f for f in os.listdir(workdir) if re.fullmatch(r"display-\d+\.json", f)),
                   key=lambda f: int(f[len("display-"):-len(".json")]))
    if len(shown) != len(written):
        sys.exit(f"{path}: {len(written)} plots written but {len(shown)} displayed")
    for file, bundle_file in zip(written, shown):
        with open(os.path.join(workdir, bundle_file), encoding="utf-8") as f:
            bundle = json.load(f)
        with open(os.path.join(workdir, file), encoding="utf-8") as f:
            text = f.read()
        if bundle.get("image/svg+xml") != text:
            sys.exit(f"{path}: {bundle_file} is not the image/svg+xml bundle of {file}")
    print(f"--- repl: {len(written)} plots written, parsed and displayed: {', '.join(written)}")


def run_repl(path, driver, workdir, torch_prefix, psft_include):
    """The cells, one at a time, in clang's interpreter (see the header)."""
    name = os.path.basename(path).rsplit(".", 1)[0]
    cells_dir = os.path.join(workdir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    for directory in (workdir, cells_dir):  # outputs of an earlier run
        for file in os.listdir(directory):
            if re.fullmatch(r"cell-\d+\.cpp|display-\d+\.json|.*\.svg", file):
                os.remove(os.path.join(directory, file))
    cell_files = []
    for index, _, lines in code_cells(path):
        reasons = [m.group(1) for m in map(NOT_IN_INTERPRETER.match, leading_comments(lines)) if m]
        if reasons:
            print(f"--- repl: {name} cell {index} left out of the interpreter run: {reasons[0]}")
            continue
        cell_file = os.path.join(cells_dir, f"cell-{index}.cpp")
        with open(cell_file, "w", encoding="utf-8") as f:
            f.write("\n".join(edit_paths(line, torch_prefix, psft_include) for line in lines))
        cell_files.append(cell_file)
    command = [driver, "--name", name]
    command += [f"--Xcc={flag}" for flag in INTERPRETER_FLAGS + ["-I" + KERNEL_STUB]]
    process = subprocess.Popen(command + cell_files, cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    cell, written = None, []
    started = re.compile(r"^--- " + re.escape(name) + r" (cell \d+)$")
    for line in process.stdout:
        print(line, end="", flush=True)
        if match := started.match(line.rstrip("\n")):
            cell = match.group(1)
        elif line.startswith("wrote "):
            written.append(line[len("wrote "):].strip())
    status = process.wait()
    if status < 0:
        sys.exit(f"{path}: the interpreter crashed ({signal.Signals(-status).name}) in {cell}")
    if status != 0:
        sys.exit(f"{path}: failed in the interpreter ({cell})")
    check_plots(path, workdir, written)


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
    parser.add_argument("--repl", action="store_true",
                        help="run the cells with psft_notebook_repl (clang's interpreter)")
    parser.add_argument("--driver", help="the psft_notebook_repl executable (--repl)")
    parser.add_argument("--workdir", help="where --repl writes the cells and the plots")
    parser.add_argument("--torch-prefix", default=DEFAULT_TORCH_PREFIX)
    parser.add_argument("--psft-include", default=DEFAULT_PSFT_INCLUDE)
    args = parser.parse_args()
    if args.repl:
        if not args.driver or not args.workdir:
            parser.error("--repl needs --driver and --workdir")
        # Relative paths as the kernel sees them: from the notebook's folder.
        psft_include = os.path.join(os.path.dirname(os.path.abspath(args.notebook)),
                                    args.psft_include)
        run_repl(args.notebook, os.path.abspath(args.driver), os.path.abspath(args.workdir),
                 args.torch_prefix, os.path.normpath(psft_include))
        return
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
