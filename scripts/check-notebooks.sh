#!/usr/bin/env bash
# Keeps the C++ notebooks in examples/notebooks/ from rotting, in two ways:
#
#   g++          each notebook's code cells are extracted in order
#                (examples/notebooks/notebook_to_cpp.py: `// file scope`
#                cells at file scope, the others in one main(),
#                `#pragma cling` lines removed), compiled with g++ against
#                LibTorch through examples/notebooks/CMakeLists.txt, and run.
#   interpreter  each notebook's code cells are run one at a time, whole and
#                as written, with state kept between cells, in clang 19's
#                incremental interpreter (the engine of clang-repl and of
#                the xeus-cpp kernel) against the same LibTorch:
#                psft_notebook_repl (examples/notebooks/notebook_repl.cpp)
#                applies each cell's `#pragma cling` lines as xeus-cling
#                does, and the notebooks' display hook runs against
#                examples/notebooks/kernel_stub/. It fails on a cell that
#                does not compile or link, throws, or crashes the
#                interpreter, naming the cell; then every SVG plot a cell
#                wrote must parse and have been displayed.
#
# Either way a notebook's own checks (they throw) fail the run when psft's
# numbers change.
#
# If cppyy (PyPI; it ships cling, the interpreter behind xeus-cling) is
# installed in $PSFT_CLING_VENV, the notebooks also run cell by cell under
# cling, pragmas included, as a smoke test of the notebook form itself.
#
# Build tree: build/notebooks (the programs write their SVG plots there,
# the interpreter runs under build/notebooks/repl/<notebook>/).
# Runnable alone after scripts/setup.sh.
#
# Environment:
#   PSFT_TORCH_PREFIX  the LibTorch root (default: the torch wheel's package
#                      directory in the tools virtual environment)
#   PSFT_VENV          as for scripts/setup.sh
#   PSFT_JOBS          parallel build jobs (default: 1)
#   PSFT_CLING_VENV    a virtual environment with cppyy (default: none; the
#                      cling run is skipped without one)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

PSFT_TORCH_PREFIX="${PSFT_TORCH_PREFIX:-$(./scripts/torch-prefix.sh)}"
out="$root/build/notebooks"

mapfile -t notebooks < <(find examples/notebooks -maxdepth 1 -name '*.ipynb' | sort)
if [ "${#notebooks[@]}" -eq 0 ]; then
  echo "check-notebooks: no notebooks in examples/notebooks" >&2
  exit 1
fi

mkdir -p "$out"
cmake -S examples/notebooks -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PSFT_TORCH_PREFIX" -DPSFT_NOTEBOOK_REPL=ON >"$out.configure.log" 2>&1 ||
  {
    cat "$out.configure.log"
    echo "check-notebooks: configure failed (scripts/setup.sh installs clang 19)" >&2
    exit 1
  }
cmake --build "$out" -j "${PSFT_JOBS:-1}"
for notebook in "${notebooks[@]}"; do
  name=$(basename "$notebook" .ipynb)
  echo "--- check-notebooks: $name (g++)"
  (cd "$out" && "./notebook_$name")
done

for notebook in "${notebooks[@]}"; do
  name=$(basename "$notebook" .ipynb)
  echo "--- check-notebooks: $name (interpreter: clang 19, cell by cell)"
  start=$SECONDS
  python3 examples/notebooks/notebook_to_cpp.py --repl "$notebook" \
    --driver "$out/psft_notebook_repl" --workdir "$out/repl/$name" \
    --torch-prefix "$PSFT_TORCH_PREFIX" --psft-include "$root/include"
  echo "--- check-notebooks: $name passed in the interpreter ($((SECONDS - start)) s)"
done

if [ -n "${PSFT_CLING_VENV:-}" ]; then
  if ! "$PSFT_CLING_VENV/bin/python" -c 'import cppyy' >/dev/null 2>&1; then
    echo "check-notebooks: PSFT_CLING_VENV=$PSFT_CLING_VENV has no cppyy" >&2
    exit 1
  fi
  for notebook in "${notebooks[@]}"; do
    name=$(basename "$notebook" .ipynb)
    echo "--- check-notebooks: $name (cling, cppyy $("$PSFT_CLING_VENV/bin/python" -c 'import cppyy; print(cppyy.__version__)'))"
    mkdir -p "$out/cling"
    (cd "$out/cling" && "$PSFT_CLING_VENV/bin/python" "$root/examples/notebooks/notebook_to_cpp.py" \
      --cling "$root/$notebook" --torch-prefix "$PSFT_TORCH_PREFIX" --psft-include "$root/include")
  done
else
  echo "check-notebooks: cling run skipped (set PSFT_CLING_VENV to a virtual environment with cppyy)"
fi
echo "check-notebooks: ${#notebooks[@]} notebooks passed, compiled with g++ and cell by cell in the interpreter"
