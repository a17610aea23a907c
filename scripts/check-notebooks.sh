#!/usr/bin/env bash
# Keeps the C++ notebooks in examples/notebooks/ (xeus-cling, kernel xcpp17)
# from rotting: each notebook's code cells are extracted in order
# (examples/notebooks/notebook_to_cpp.py: `// file scope` cells at file
# scope, the others in one main(), `#pragma cling` lines removed), compiled
# with g++ against LibTorch through examples/notebooks/CMakeLists.txt, and
# run; a notebook's own checks make it fail when psft's numbers change.
#
# If cppyy (PyPI; it ships cling, the interpreter behind xeus-cling) is
# installed in $PSFT_CLING_VENV, the notebooks also run cell by cell under
# cling, pragmas included, as a smoke test of the notebook form itself.
#
# Build tree: build/notebooks (the notebooks write their SVG plots there).
# Runnable alone after scripts/setup.sh.
#
# Environment:
#   PSFT_TORCH_PREFIX  the LibTorch root (default: the torch wheel's package
#                      directory in the tools virtual environment)
#   PSFT_VENV          as for scripts/setup.sh
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

cmake -S examples/notebooks -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PSFT_TORCH_PREFIX" >"$out.configure.log" 2>&1 ||
  { cat "$out.configure.log"; exit 1; }
cmake --build "$out" -j "${PSFT_JOBS:-1}"
for notebook in "${notebooks[@]}"; do
  name=$(basename "$notebook" .ipynb)
  echo "--- check-notebooks: $name (g++)"
  (cd "$out" && "./notebook_$name")
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
echo "check-notebooks: ${#notebooks[@]} notebooks passed"
