#!/usr/bin/env bash
# Checks psft's numbers against the real code of the peers users compare it
# with: verl 0.9.1 (the vanilla, gspo, cispo and sapo policy losses, agg_loss
# in every mode, kl_penalty for every kl_loss_type, its log-prob and entropy
# helpers) and TRL 1.16.0 (GRPOTrainer._compute_loss for each loss type,
# sapo and cispo included, at token and sequence level, with and without
# the beta KL term; SFTTrainer.compute_loss for nll and dft), through the
# presets in include/psft/compat/ and psft::kl_penalty
# (tests/peers/check_peers.py says how each peer function is called and
# which differences are intended).
#
#   1. Installs the pinned packages of tests/peers/requirements.txt into the
#      tools virtual environment with `pip install --no-deps`, only those
#      whose exact version is missing (a rerun installs nothing). A failed
#      installation fails the check; nothing is skipped.
#   2. check_peers.py builds a test-only Python extension over psft's API
#      (tests/peers/psft_peers.cpp) with torch.utils.cpp_extension, cached in
#      build/peers, and compares loss, gradient and metrics in float64
#      (1e-12), with float32 and bf16 spot checks; it prints a table and exits
#      non-zero on any difference that is not one of the documented ones.
#
# Runnable alone after scripts/setup.sh.
#
# Environment:
#   PSFT_VENV        as for scripts/setup.sh
#   PSFT_SETUP_LOG   the pip log (default: as for scripts/setup.sh)
#   PSFT_JOBS        compile jobs for the extension (default: 1)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/psft"
venv="${PSFT_VENV:-$cache/venv}"
log="${PSFT_SETUP_LOG:-$cache/setup.log}"
python="$venv/bin/python"
requirements=tests/peers/requirements.txt

if ! "$python" -c 'import torch, numpy' >/dev/null 2>&1; then
  echo "check-peers: no torch and numpy in $venv; run scripts/setup.sh first" >&2
  exit 1
fi

# The pins whose exact version is not installed.
missing_pins() {
  "$python" - "$requirements" <<'EOF'
import importlib.metadata as md
import sys

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    try:
        if md.version(name) == version:
            continue
    except md.PackageNotFoundError:
        pass
    print(line)
EOF
}

start=$SECONDS
mapfile -t missing < <(missing_pins)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "check-peers: installing into $venv with --no-deps: ${missing[*]} (log: $log)"
  mkdir -p "$(dirname "$log")"
  echo "+ pip install --no-deps ${missing[*]}" >>"$log"
  if ! "$python" -m pip install --no-deps --disable-pip-version-check -q "${missing[@]}" >>"$log" 2>&1; then
    echo "check-peers: FAILED: pip could not install ${missing[*]}; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  mapfile -t still < <(missing_pins)
  if [ "${#still[@]}" -gt 0 ]; then
    echo "check-peers: FAILED: still missing after installation: ${still[*]}" >&2
    exit 1
  fi
  echo "check-peers: installed in $((SECONDS - start)) s"
else
  echo "check-peers: the ${requirements} pins are installed"
fi

export TOKENIZERS_PARALLELISM=false
export MAX_JOBS="${PSFT_JOBS:-1}"
exec "$python" tests/peers/check_peers.py
