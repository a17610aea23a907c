#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md from one run on one machine:
# psft_bench_logits (from logits, [4096, 32000]: fused, composed ATen ops and
# the copy ceiling) and psft_bench_policy_loss (the log-prob loss at 2^20
# tokens) built twice, as a consumer's default build (CMake Release, no
# architecture flags) and with -march=native, then torch.compile and eager
# PyTorch of the same math (benchmarks/compile_baseline.py --cpu) with the
# same thread count, against the default build's fused times. The default
# build's from-logits pass is also run on each narrower instruction set
# (PSFT_CPU_CAPABILITY=default, avx2).
#
#   ./scripts/bench-cpu.sh               # 2 threads
#   PSFT_BENCH_THREADS=1 ./scripts/bench-cpu.sh
#
# Needs scripts/setup.sh's tools (the torch wheel's LibTorch and Python).
# Logs go to build/bench-cpu/; the summaries are printed at the end. Run it
# on an otherwise idle machine: the figures are wall-clock times.
set -euo pipefail
cd "$(dirname "$0")/.."
export PSFT_BENCH_THREADS="${PSFT_BENCH_THREADS:-2}"
venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"
prefix=$(./scripts/torch-prefix.sh)
out=build/bench-cpu
mkdir -p "$out"

for build in default native; do
  native=OFF
  [ "$build" = native ] && native=ON
  cmake -S . -B "build/bench-$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix" -DPSFT_BUILD_TESTS=OFF -DPSFT_BUILD_BENCHMARKS=ON \
    -DPSFT_BUILD_EXAMPLES=OFF -DPSFT_HEADER_CHECK=OFF -DPSFT_CONSUMER_TESTS=OFF \
    -DPSFT_BENCH_NATIVE="$native" >"$out/configure-$build.log"
  ninja -C "build/bench-$build" psft_bench_logits psft_bench_policy_loss >"$out/build-$build.log"
done

for build in default native; do
  echo "bench-cpu: $build build: psft_bench_logits" >&2
  "build/bench-$build/benchmarks/psft_bench_logits" --benchmark_filter=/4096/32000 \
    >"$out/logits-$build.txt"
  echo "bench-cpu: $build build: psft_bench_policy_loss" >&2
  "build/bench-$build/benchmarks/psft_bench_policy_loss" --benchmark_filter=/1048576 \
    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true >"$out/policy-$build.txt"
done
# The default build's narrower paths (Note [Run-time ISA dispatch]): the
# fused from-logits pass and the copy, forced to each.
for cap in default avx2; do
  echo "bench-cpu: default build, PSFT_CPU_CAPABILITY=$cap: psft_bench_logits" >&2
  PSFT_CPU_CAPABILITY=$cap "build/bench-default/benchmarks/psft_bench_logits" \
    '--benchmark_filter=(fused|copy)/.*/4096/32000' >"$out/logits-default-$cap.txt"
done
echo "bench-cpu: torch.compile and eager PyTorch" >&2
"$venv/bin/python" benchmarks/compile_baseline.py --cpu --psft "$out/logits-default.txt" \
  --psft "$out/policy-default.txt" \
  >"$out/compile_baseline.txt" 2>"$out/compile_baseline.err" || {
  echo "bench-cpu: compile_baseline.py failed; see $out/compile_baseline.err" >&2
  exit 1
}

echo "=== bench-cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $PSFT_BENCH_THREADS threads"
for build in default native; do
  echo "--- $build build: psft_bench_logits"
  sed -n '/^Summary (/,$p' "$out/logits-$build.txt"
  echo "--- $build build: psft_bench_policy_loss"
  sed -n '/^Summary/,$p' "$out/policy-$build.txt"
done
for cap in default avx2; do
  echo "--- default build, PSFT_CPU_CAPABILITY=$cap (capped at what the CPU runs)"
  sed -n '/^dtype/,$p' "$out/logits-default-$cap.txt"
done
echo "--- torch.compile and eager (psft_speedup against the default build)"
cat "$out/compile_baseline.txt"
