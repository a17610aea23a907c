#!/usr/bin/env bash
# Launches N local ranks of a psft distributed program (default: the
# example examples/distributed/psft_distributed_example.cpp), one process
# per rank, on a FileStore in a fresh temporary directory, and waits for
# them. Every rank's output is prefixed with its rank. If a rank fails, or
# the ranks take longer than PSFT_DISTRIBUTED_TIMEOUT seconds (default 300),
# the others are stopped and the script exits non-zero.
#
#   scripts/run-distributed.sh N [program [args...]]
#
# The program reads RANK, WORLD_SIZE and PSFT_STORE_FILE.
set -euo pipefail

usage() {
  echo "usage: $0 N [program [args...]]   (N >= 1 local ranks)" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
world=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $# -ge 1 ]]; then
  program=("$@")
else
  program=("${PSFT_BUILD_DIR:-$root/build/main}/examples/psft_distributed_example")
fi
command -v -- "${program[0]}" > /dev/null || {
  echo "run-distributed.sh: ${program[0]} is not an executable (build it first:" \
    "cmake --build build/main --target psft_distributed_example)" >&2
  exit 2
}

store_dir=$(mktemp -d "${TMPDIR:-/tmp}/psft-distributed.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$store_dir"
}
trap cleanup EXIT

for ((rank = 0; rank < world; ++rank)); do
  RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$rank PSFT_STORE_FILE="$store_dir/store" \
    "${program[@]}" > >(sed "s/^/[rank $rank] /") 2>&1 &
  pids+=("$!")
done

deadline=$((SECONDS + ${PSFT_DISTRIBUTED_TIMEOUT:-300}))
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]} > 0)); do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    elif ! wait "$pid"; then
      echo "run-distributed.sh: a rank failed; stopping the others" >&2
      status=1
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if ((status != 0)); then break; fi
  if ((SECONDS > deadline)); then
    echo "run-distributed.sh: timed out after ${PSFT_DISTRIBUTED_TIMEOUT:-300} s" >&2
    status=1
    break
  fi
  ((${#remaining[@]} == 0)) || sleep 0.2
done
exit "$status"
