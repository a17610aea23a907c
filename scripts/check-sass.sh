#!/usr/bin/env bash
# Usage: scripts/check-sass.sh [FILE]
#
# A static check of psft's CUDA kernels, from their machine code (SASS) for
# sm_90, with no GPU: for every psft kernel it reports registers, shared
# memory, spills and stack frame, and the blocks per SM those allow, and for
# the hot paths the SASS instructions per element:
#
#   logits forward / backward   the loop over 16-byte groups of a row (the
#                               innermost loop with a 16-byte load):
#                               instructions in the loop / entries it reads
#   clipped backward            likewise (the loops with 16-byte loads)
#   clipped forward (typed)     a thread's fast path, straight-line code from
#                               its first 16-byte load to its last 16-byte
#                               coefficient store, leaving out the blocks
#                               with element-wise loads or stores (the
#                               partial-group path): instructions / 8 tokens
#
# It fails when a kernel spills or has a stack frame, when the logits
# forward's hot loop takes more than 20 instructions per logit (issue #17),
# or when the float forward_units of the plain clipped rule (PSFT's) on
# typed inputs fits fewer than 4 blocks per SM (Note [Forward registers]);
# the figures are recorded in docs/cuda.md.
#
# FILE is an executable, object or cubin holding psft's kernels for sm_90
# (scripts/test.sh passes the cuda-build phase's psft_test_cuda). Without
# it, the script compiles include/psft/cuda/*.cuh alone, the instantiations
# psft_cuda.cu launches, into build/sass/kernels.cubin (torch-free, about
# 30 s with nvcc).
#
# Tools: nvcc (CUDACXX, else PATH, else /usr/local/cuda/bin/nvcc) only
# without FILE; cuobjdump: CUOBJDUMP, else PATH, else next to nvcc, else the
# one the triton wheel ships (a dependency of the torch wheel in psft's
# virtual environment, PSFT_VENV as for scripts/setup.sh); python3; c++filt.
set -euo pipefail
cd "$(dirname "$0")/.."

file="${1:-}"
arch=sm_90
venv="${PSFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/psft/venv}"

nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi

cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [ -z "$cuobjdump" ] && [ -n "$nvcc" ] && [ -x "$(dirname "$nvcc")/cuobjdump" ]; then
  cuobjdump="$(dirname "$nvcc")/cuobjdump"
fi
if [ -z "$cuobjdump" ] && [ -x "$venv/bin/python" ]; then
  triton_bin=$("$venv/bin/python" -c \
    'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))' \
    2>/dev/null || true)
  [ -n "$triton_bin" ] && [ -x "$triton_bin/cuobjdump" ] && cuobjdump="$triton_bin/cuobjdump"
fi
if [ -z "$cuobjdump" ]; then
  echo "check-sass: no cuobjdump (set CUOBJDUMP, or install the torch wheel with scripts/setup.sh)" >&2
  exit 1
fi

if [ -z "$file" ]; then
  if [ -z "$nvcc" ]; then
    echo "check-sass: no nvcc to compile the kernels with (set CUDACXX), and no FILE given" >&2
    exit 1
  fi
  mkdir -p build/sass
  # The kernels psft_cuda.cu instantiates, without its tensor glue.
  cat >build/sass/kernels.cu <<'EOF'
#include "psft/cuda/clipped_loss.cuh"
#include "psft/cuda/logits.cuh"
namespace k = ::psft::cuda;
using Float32Bool = k::TypedInputs<float, unsigned char>;
using Float32Float = k::TypedInputs<float, float>;
using BFloat16Bool = k::TypedInputs<__nv_bfloat16, unsigned char>;
using BFloat16Float = k::TypedInputs<__nv_bfloat16, float>;
namespace c = ::psft::core;
// The clipped objective on every input path (with and without the dual
// clip); the other rules on RuntimeInputs only (kernels::with_forward_kernel).
#define PSFT_FORWARD_RULE(acc, inputs, rule) \
  template __global__ void k::forward_units<acc, inputs, rule>(const k::ForwardParams<acc>);
#define PSFT_FORWARD(acc, inputs)                        \
  PSFT_FORWARD_RULE(acc, inputs, k::PlainClippedRule) \
  PSFT_FORWARD_RULE(acc, inputs, c::ClippedRule)
#define PSFT_FORWARD_OTHER_RULES(acc)                             \
  PSFT_FORWARD_RULE(acc, k::RuntimeInputs, c::CispoRelativeRule) \
  PSFT_FORWARD_RULE(acc, k::RuntimeInputs, c::CispoCappedRule)   \
  PSFT_FORWARD_RULE(acc, k::RuntimeInputs, c::SapoRule)          \
  PSFT_FORWARD_RULE(acc, k::RuntimeInputs, c::KlPenaltyRule)
PSFT_FORWARD(float, k::RuntimeInputs)
PSFT_FORWARD(double, k::RuntimeInputs)
PSFT_FORWARD(float, Float32Bool)
PSFT_FORWARD(float, Float32Float)
PSFT_FORWARD(float, BFloat16Bool)
PSFT_FORWARD(float, BFloat16Float)
PSFT_FORWARD_OTHER_RULES(float)
PSFT_FORWARD_OTHER_RULES(double)
#define PSFT_BACKWARD(out, acc) \
  template __global__ void k::backward<out, acc>(const k::BackwardParams, const acc*, out*);
PSFT_BACKWARD(float, float)
PSFT_BACKWARD(__nv_bfloat16, float)
PSFT_BACKWARD(__half, float)
PSFT_BACKWARD(double, double)
#define PSFT_LOGITS(in, acc)                                                                \
  template __global__ void k::logits_forward<in, acc>(const k::LogitsForwardParams<acc>); \
  template __global__ void k::logits_backward<in, acc>(const k::LogitsBackwardParams<in, acc>);
PSFT_LOGITS(float, float)
PSFT_LOGITS(__nv_bfloat16, float)
PSFT_LOGITS(__half, float)
PSFT_LOGITS(double, double)
EOF
  file=build/sass/kernels.cubin
  echo "check-sass: compiling the kernels for $arch ($nvcc)"
  "$nvcc" -std=c++17 --expt-relaxed-constexpr -arch="$arch" -cubin -Iinclude -o "$file" \
    build/sass/kernels.cu
fi

echo "check-sass: $file ($arch), cuobjdump: $cuobjdump"
sass=$(mktemp)
resources=$(mktemp)
trap 'rm -f "$sass" "$resources"' EXIT
"$cuobjdump" -sass -arch "$arch" "$file" >"$sass"
"$cuobjdump" --dump-resource-usage -arch "$arch" "$file" >"$resources"

python3 - "$sass" "$resources" <<'PY'
"""Reads cuobjdump's SASS and resource usage; prints the report; exit 1 on a failed check."""
import re
import subprocess
import sys

THREADS = 256  # every psft kernel is launched with 256 threads (kThreads, kLogitsThreads)
TOKENS_PER_THREAD = 8  # forward_units: kGroup
LOGITS_FORWARD_TARGET = 20  # SASS instructions per logit (issue #17)
FORWARD_MIN_BLOCKS = 4  # Note [Forward registers]
# sm_90 limits: registers per SM, allocation unit per warp, warps, blocks, shared memory.
SM_REGS, REG_UNIT, SM_WARPS, SM_BLOCKS = 65536, 256, 64, 32
SM_SHARED, BLOCK_RESERVED_SHARED = 228 * 1024, 1024

sass_path, resources_path = sys.argv[1], sys.argv[2]


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


functions = {}  # mangled name -> [(address, predicate, opcode, text)]
current = None
instruction = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
with open(sass_path) as f:
    for line in f:
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            functions[current] = []
            continue
        m = instruction.search(line)
        if m and current:
            text = m.group(2)
            pred = ""
            if text.startswith("@"):
                pred, text = text.split(None, 1)
            functions[current].append((int(m.group(1), 16), pred, text.split()[0], text))

resources = {}
with open(resources_path) as f:
    name = None
    for line in f:
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            resources[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None

kernels = sorted(n for n in functions if "4psft" in n and re.search(
    r"(forward_units|backward|logits_forward|logits_backward)", n))
pretty = demangle(kernels)


def short(name):
    s = pretty[name]
    s = re.sub(r"psft::v0_cuda::cuda::", "", s)
    s = re.sub(r"\(.*\)$", "", s)
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("unsigned char", "bool")
    s = s.replace("psft::v0_cuda::cuda::", "").replace("void ", "")
    return s


def is_branch(op):
    return op.split(".")[0] in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL")


def target(text):
    hexes = re.findall(r"0x[0-9a-f]+", text)
    return int(hexes[-1], 16) if hexes else None


def vector_load(op):
    return op.startswith("LDG") and ".128" in op


def vector_store(op):
    return op.startswith("STG") and ".128" in op


def narrow_access(op):
    return (op.startswith("LDG") or op.startswith("STG")) and not (".128" in op or ".64" in op)


def occupancy(res):
    regs = max(res.get("REG", 0), 1)
    warps = THREADS // 32
    warp_regs = -(-regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = SM_REGS // (warp_regs * warps)
    by_warps = SM_WARPS // warps
    shared = res.get("SHARED", 0)
    by_shared = SM_SHARED // (shared + BLOCK_RESERVED_SHARED)
    return min(by_regs, by_warps, by_shared, SM_BLOCKS)


def loops(code):
    """(start index, end index) of every backward branch's range."""
    index = {a: i for i, (a, _, _, _) in enumerate(code)}
    out = []
    for i, (a, _, op, text) in enumerate(code):
        if op.startswith("BRA"):
            t = target(text)
            if t is not None and t <= a and t in index:
                out.append((index[t], i))
    return out


def hot_loops(code):
    """Innermost loops with a 16-byte load: [(instructions, 16-byte loads)]."""
    found = [(s, e) for s, e in loops(code) if any(vector_load(code[k][2]) for k in range(s, e + 1))]
    innermost = [(s, e) for s, e in found
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in found)]
    return [(e - s + 1, sum(vector_load(code[k][2]) for k in range(s, e + 1))) for s, e in innermost]


def fast_path(code):
    """forward_units' straight-line fast path: (instructions, branches)."""
    loads = [i for i, c in enumerate(code) if vector_load(c[2])]
    stores = [i for i, c in enumerate(code) if vector_store(c[2])]
    if not loads or not stores:
        return None
    first, last = loads[0], stores[-1]
    targets = {target(c[3]) for c in code if is_branch(c[2])}
    blocks, start = [], first
    for i in range(first, last + 1):
        end_here = is_branch(code[i][2]) or i == last or code[i + 1][0] in targets
        if end_here:
            blocks.append((start, i))
            start = i + 1
    kept = [(s, e) for s, e in blocks if not any(narrow_access(code[k][2]) for k in range(s, e + 1))]
    count = sum(e - s + 1 for s, e in kept)
    branches = sum(1 for s, e in kept for k in range(s, e + 1) if code[k][2].startswith("BRA"))
    return count, branches


def per_16_bytes(name):
    """Elements one 16-byte load of the kernel's hot loop reads."""
    s = pretty[name]
    first = re.search(r"<([^,>]+)", s).group(1).strip()
    if "logits" in s:
        element = first
    else:  # backward<out_t, acc_t>: the loads read acc_t coefficients
        element = re.search(r"<[^,]+,\s*([^,>]+)", s).group(1).strip()
    return {"float": 4, "double": 2, "__nv_bfloat16": 8, "__half": 8}[element]


failures = []
print(f"{'kernel':<58} {'regs':>4} {'smem':>6} {'stack':>5} {'local':>5} {'blocks/SM':>9} "
      f"{'occupancy':>9}  hot path: SASS instructions per element")
for name in kernels:
    code = functions[name]
    res = resources.get(name, {})
    blocks = occupancy(res)
    label = short(name)
    stack, local = res.get("STACK", 0), res.get("LOCAL", 0)
    spills = sum(1 for c in code if c[2].startswith(("STL", "LDL")))
    if stack or local or spills:
        failures.append(f"{label}: stack {stack} B, local {local} B, {spills} spill instructions")
    hot = ""
    if "forward_units" in name:
        if "TypedInputs" in pretty[name]:
            fp = fast_path(code)
            if fp:
                count, branches = fp
                hot = (f"fast path {count} / {TOKENS_PER_THREAD} tokens = "
                       f"{count / TOKENS_PER_THREAD:.1f} per token ({branches} branches)")
        if ("<float" in pretty[name] and "TypedInputs" in pretty[name]
                and "PlainClippedRule" in pretty[name] and blocks < FORWARD_MIN_BLOCKS):
            failures.append(f"{label}: {blocks} blocks per SM, fewer than {FORWARD_MIN_BLOCKS}")
    elif "backward" in name or "logits_forward" in name:
        per_load = per_16_bytes(name)
        parts = []
        for count, vloads in hot_loops(code):
            elements = vloads * per_load
            per = count / elements
            parts.append(f"loop {count} / {elements} = {per:.2f}")
            if "logits_forward" in name and "double" not in pretty[name] and per > LOGITS_FORWARD_TARGET:
                failures.append(f"{label}: {per:.2f} instructions per logit in the hot loop, "
                                f"more than {LOGITS_FORWARD_TARGET}")
        hot = "; ".join(parts) if parts else "no loop with 16-byte loads"
        if "logits_forward" in name and "double" not in pretty[name] and not parts:
            failures.append(f"{label}: no hot loop found")
    print(f"{label:<58} {res.get('REG', 0):>4} {res.get('SHARED', 0):>6} {stack:>5} {local:>5} "
          f"{blocks:>9} {blocks * THREADS * 100 // (SM_WARPS * 32):>8}%  {hot}")

if not kernels:
    failures.append("no psft kernels in the file")
if failures:
    print("\ncheck-sass: FAILED")
    for f in failures:
        print("  " + f)
    sys.exit(1)
print(f"\ncheck-sass: passed ({len(kernels)} kernels; no spills or stack frames; logits forward "
      f"<= {LOGITS_FORWARD_TARGET} per logit; typed plain-rule float forward_units >= {FORWARD_MIN_BLOCKS} blocks/SM)")
PY
