"""torch.compile and eager PyTorch baselines for psft's CUDA benchmark.

The same math as benchmarks/bench_cuda.cpp's API cases, written in PyTorch and
run twice in one process, eagerly and through torch.compile (default mode):

  clipped/fwd_bwd/<dtype>/1048576
      the token-mean clipped objective and psft's metrics (clip fractions, KL
      estimates, ratio mean/min/max, token count) on bf16 or fp32 logp,
      old_logp and advantages and a bool mask, and the gradient of the loss.
      The inputs go in as they are: no casts to float32 in the timed step.
  logits/fwd/bf16/16384x151936
      log_softmax of [16384, 151936] bf16 logits in float32, the label's
      log-probability and the entropy, without gradient;
  logits/fwd_bwd/bf16/16384x151936
      the same and the gradient of logp.sum() + entropy.sum();
  hidden/fwd_bwd/bf16/16384x4096x151936
      the PSFT loss from a [16384, 4096] hidden state through a [151936, 4096]
      LM head, and the gradients of hidden and weight.

Each call is timed with CUDA events after writing twice the L2 cache, as the
C++ benchmark does; the line gives the mean over at least 0.1 s of GPU time,
after warm-up (compilation). GB/s counts the same bytes as the C++ API rows.
With --psft FILE (the output of psft_bench_cuda) each line also gives psft's
fused time for the case and how much faster it is. Exits 0 without CUDA.

    python3 benchmarks/compile_baseline.py [--psft bench_cuda.txt] [--seconds N]

With --cpu the same comparison runs on the CPU, with the thread count of
PSFT_BENCH_THREADS (default 2, as the C++ benchmarks), wall-clock time per
call (mean over at least 1 s, after warm-up), for the cases of the CPU
benchmarks:

  clipped/fwd_bwd/<dtype>/1048576
      as above (psft_bench_policy_loss's size);
  logits/psft_loss/<dtype>/4096x32000
      the PSFT loss from [4096, 32000] logits as psft_bench_logits' composed
      path writes it (log_softmax in float32, the label's log-probability,
      the entropy as a metric, the token-mean clipped loss) and the gradient
      of the logits.

--psft FILE (repeatable) then takes psft_bench_logits' and
psft_bench_policy_loss's outputs (their summaries' fused ms).
scripts/bench-cpu.sh runs it after the C++ benchmarks on the same machine.

With --seconds N no case is started after N seconds (torch.compile takes
tens of seconds per case); those left print "not run (time budget)", so that
what was measured is printed in full under an outer time limit
(scripts/gpu-check.sh passes its own).

Memory: the eager logits case holds several float32 [16384, 151936] tensors
(10 GB each) at once; a case that runs out of memory prints "out of memory"
and the script goes on.
"""

import argparse
import os
import sys
import time

import torch

TOKENS = 1 << 20
LOGITS_TOKENS, VOCAB, HIDDEN = 16384, 151936, 4096
IGNORE_INDEX = -100
EPS_LOW, EPS_HIGH, LOG_RATIO_CLAMP = 0.2, 0.28, 20.0
MIN_SECONDS = 0.1
MAX_CALLS = 10000
WARMUP_CALLS = 3


def clipped_loss(logp, old_logp, advantages, mask):
    """psft.policy_loss with token-mean reduction: the loss and the metrics."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
    token_loss = torch.maximum(unclipped, clipped)
    count = mask.sum(dtype=torch.float32)
    denominator = count.clamp_min(1)
    loss = torch.where(mask, token_loss, 0).sum(dtype=torch.float32) / denominator

    r, d = ratio.detach(), log_ratio.detach()

    def mean(values):
        return torch.where(mask, values, 0).sum(dtype=torch.float32) / denominator

    def fraction(flags):
        return (flags & mask).sum(dtype=torch.float32) / denominator

    metrics = torch.stack([
        fraction(clipped.detach() > unclipped.detach()),
        fraction((r > 1 + EPS_HIGH) & (advantages > 0)),
        fraction((r < 1 - EPS_LOW) & (advantages < 0)),
        mean(-d),
        mean(r - 1 - d),
        mean(r),
        r.masked_fill(~mask, float("inf")).min().to(torch.float32),
        r.masked_fill(~mask, float("-inf")).max().to(torch.float32),
        count,
    ])
    return loss, metrics


def token_logprobs(logits, labels):
    """log p(label) and the entropy per token, as psft.token_logprobs."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    scored = labels != IGNORE_INDEX
    logp = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.where(scored, logp, 0), torch.where(scored, entropy, 0)


def time_ms(step, device="cuda"):
    """Mean GPU milliseconds per call, each call after an L2 flush; on the
    CPU, mean wall-clock milliseconds per call over at least 1 s."""
    for _ in range(WARMUP_CALLS):
        step()
    if device == "cpu":
        times = []
        while sum(times) < 1e3 and len(times) < MAX_CALLS:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
        return sum(times) / len(times)
    torch.cuda.synchronize()
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(properties, "L2_cache_size", 64 << 20)
    flush = torch.empty(2 * max(l2_bytes, 1 << 20), dtype=torch.uint8, device="cuda")
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    while sum(times) < MIN_SECONDS * 1e3 and len(times) < MAX_CALLS:
        flush.zero_()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sum(times) / len(times)


def clipped_case(dtype, device="cuda"):
    torch.manual_seed(0)
    logp = torch.rand(TOKENS, device=device) * -5.0
    old = (logp + torch.randn(TOKENS, device=device) * 0.2).clamp_max(0.0).to(dtype)
    logp = logp.to(dtype)
    advantages = torch.randn(TOKENS, device=device).to(dtype)
    mask = torch.rand(TOKENS, device=device) > 0.1
    x = logp.detach().clone().requires_grad_()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    nbytes = TOKENS * (4 * logp.element_size() + 1)

    def steps(fn):
        def step():
            loss, metrics = fn(x, old, advantages, mask)
            (grad,) = torch.autograd.grad(loss, x)
            return grad, metrics

        return step

    return f"clipped/fwd_bwd/{name}/{TOKENS}", nbytes, clipped_loss, steps


def logits_cases():
    torch.manual_seed(0)
    logits = torch.randn(LOGITS_TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16).mul_(2)
    labels = torch.randint(0, VOCAB, (LOGITS_TOKENS,), device="cuda")
    labels.masked_fill_(torch.rand(LOGITS_TOKENS, device="cuda") < 0.1, IGNORE_INDEX)
    x = logits.detach().requires_grad_()
    pass_bytes = LOGITS_TOKENS * VOCAB * logits.element_size()
    shape = f"bf16/{LOGITS_TOKENS}x{VOCAB}"

    def forward_steps(fn):
        def step():
            with torch.no_grad():
                return fn(logits, labels)

        return step

    def backward_steps(fn):
        def step():
            logp, entropy = fn(x, labels)
            (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), x)
            return grad

        return step

    return [
        (f"logits/fwd/{shape}", pass_bytes, token_logprobs, forward_steps),
        (f"logits/fwd_bwd/{shape}", 3 * pass_bytes, token_logprobs, backward_steps),
    ]


CPU_TOKENS, CPU_VOCAB = 4096, 32000


def logits_psft_loss(logits, labels, old_logp):
    """psft_bench_logits' composed path: the PSFT loss from logits (token
    mean) with the entropy and the high clip fraction as metrics."""
    mask = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    logp = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    count = mask.sum(dtype=torch.float32).clamp_min(1)
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    token_loss = torch.maximum(-ratio, -torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
    loss = torch.where(mask, token_loss, 0).sum() / count
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy_mean = torch.where(mask, entropy, 0).sum() / count
        clip_frac_high = ((ratio > 1 + EPS_HIGH) & mask).sum() / count
    return loss, entropy_mean, clip_frac_high


def cpu_logits_case(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(CPU_TOKENS, CPU_VOCAB) * 2).to(dtype)
    labels = torch.randint(0, CPU_VOCAB, (CPU_TOKENS,))
    labels.masked_fill_(torch.rand(CPU_TOKENS) < 0.1, IGNORE_INDEX)
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1))
        old = logp.squeeze(-1) + (torch.rand(CPU_TOKENS) * 0.6 - 0.3)
    x = logits.detach().requires_grad_()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    # Read the logits once, write their gradient once.
    nbytes = 2 * CPU_TOKENS * CPU_VOCAB * logits.element_size()

    def steps(fn):
        def step():
            loss, entropy_mean, clip_frac_high = fn(x, labels, old)
            (grad,) = torch.autograd.grad(loss, x)
            return grad, entropy_mean, clip_frac_high

        return step

    return f"logits/psft_loss/{name}/{CPU_TOKENS}x{CPU_VOCAB}", nbytes, logits_psft_loss, steps


def read_psft_cpu(paths):
    """Fused ms per case from the summaries of psft_bench_logits
    ("<dtype>/<tokens>/<vocab> <fused ms> ...") and psft_bench_policy_loss
    ("<N> <dtype> <fused ms> ...")."""
    fused = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                parts = line.split()
                try:
                    if len(parts) >= 2 and parts[0].count("/") == 2:
                        dtype, tokens, vocab = parts[0].split("/")
                        fused[f"logits/psft_loss/{dtype}/{tokens}x{vocab}"] = float(parts[1])
                    elif len(parts) >= 3 and parts[0].isdigit() and parts[1] in ("fp32", "bf16"):
                        fused[f"clipped/fwd_bwd/{parts[1]}/{parts[0]}"] = float(parts[2])
                except ValueError:
                    pass
    return fused


def hidden_loss(hidden, weight, labels, old_logp):
    """The PSFT loss from the last hidden state (psft.psft_loss_from_hidden):
    the LM head, log_softmax in float32, token-mean l = -min(r, 1 + eps_high)."""
    logp, _ = token_logprobs(hidden @ weight.t(), labels)
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    mask = labels != IGNORE_INDEX
    token_loss = -torch.minimum(ratio, torch.full_like(ratio, 1 + EPS_HIGH))
    return torch.where(mask, token_loss, 0).sum() / mask.sum().clamp_min(1)


def hidden_cases():
    torch.manual_seed(2)
    hidden = torch.randn(LOGITS_TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16).mul_(0.02)
    labels = torch.randint(0, VOCAB, (LOGITS_TOKENS,), device="cuda")
    labels.masked_fill_(torch.rand(LOGITS_TOKENS, device="cuda") < 0.1, IGNORE_INDEX)
    with torch.no_grad():
        old_logp = token_logprobs((hidden @ weight.t()), labels)[0] - 0.05
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    nbytes = 2 * 2 * (LOGITS_TOKENS + VOCAB) * HIDDEN

    def steps(fn):
        def step():
            return torch.autograd.grad(fn(h, w, labels, old_logp), (h, w))

        return step

    shape = f"bf16/{LOGITS_TOKENS}x{HIDDEN}x{VOCAB}"
    return [(f"hidden/fwd_bwd/{shape}", nbytes, hidden_loss, steps)]


def read_psft(path):
    """Fused ms per case from psft_bench_cuda's summary ("<case> api <MB> <fused_ms> ...")."""
    fused = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "api":
                try:
                    fused[parts[0]] = float(parts[3])
                except ValueError:
                    pass
    return fused


def print_header(timing, psft_ms):
    """The table's legend (after the timing's description) and header."""
    print(f"{timing} vs_eager = eager ms / this ms;")
    print("psft_speedup = this ms / psft's fused ms.")
    header = f"{'case':<34} {'impl':<8} {'ms':>10} {'GB/s':>9} {'vs_eager':>9}"
    if psft_ms:
        header += f" {'psft_fused_ms':>13} {'psft_speedup':>13}"
    print(header, flush=True)


def run_case(case, nbytes, fn, steps, psft_ms, out_of_time, device="cuda"):
    eager_ms = None
    for impl in ("eager", "compile"):
        if out_of_time():
            print(f"{case:<34} {impl:<8} not run (time budget)", flush=True)
            continue
        try:
            ms = time_ms(steps(fn if impl == "eager" else torch.compile(fn)), device)
            result = f"{ms:10.4f} {nbytes / (ms * 1e-3) / 1e9:9.0f}"
            if impl == "eager":
                eager_ms = ms
                result += f" {1.0:8.2f}x"
            else:
                result += f" {eager_ms / ms:8.2f}x" if eager_ms else f" {'-':>9}"
            fused = psft_ms.get(case)
            if fused:
                result += f" {fused:13.4f} {ms / fused:12.2f}x"
        except torch.cuda.OutOfMemoryError:
            result = "out of memory"
        except Exception as error:  # a failed compilation must not hide the other lines
            result = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        print(f"{case:<34} {impl:<8} {result}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--psft", metavar="FILE", action="append",
                        help="psft_bench_cuda's output, for its fused times (with --cpu: "
                        "psft_bench_logits' or psft_bench_policy_loss's; may be repeated)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="start no case after this many seconds")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU cases, with PSFT_BENCH_THREADS threads (default 2)")
    args = parser.parse_args()
    start = time.monotonic()

    def out_of_time():
        return args.seconds is not None and time.monotonic() - start > args.seconds

    if args.cpu:
        return main_cpu(args, out_of_time)

    if not torch.cuda.is_available():
        print("compile_baseline: skipped: no CUDA device")
        return 0
    psft_ms = {}
    for path in args.psft or []:
        psft_ms.update(read_psft(path))

    device = torch.cuda.get_device_name()
    print(f"compile_baseline: torch {torch.__version__}, {device}; GPU time per call (CUDA events,")
    print_header("L2 flushed before each call), mean over >= 0.1 s.", psft_ms)
    for dtype in (torch.bfloat16, torch.float32):
        case, nbytes, fn, steps = clipped_case(dtype)
        run_case(case, nbytes, fn, steps, psft_ms, out_of_time)
    for case, nbytes, fn, steps in logits_cases():
        run_case(case, nbytes, fn, steps, psft_ms, out_of_time)
    for case, nbytes, fn, steps in hidden_cases():
        run_case(case, nbytes, fn, steps, psft_ms, out_of_time)
    return 0


def main_cpu(args, out_of_time):
    threads = int(os.environ.get("PSFT_BENCH_THREADS", "2") or 2)
    torch.set_num_threads(threads if threads > 0 else 2)
    psft_ms = read_psft_cpu(args.psft or [])
    print(f"compile_baseline: torch {torch.__version__}, CPU {cpu_model()}, "
          f"{torch.get_num_threads()} threads; wall")
    print_header("time per call, mean over >= 1 s.", psft_ms)
    for dtype in (torch.float32, torch.bfloat16):
        case, nbytes, fn, steps = clipped_case(dtype, "cpu")
        run_case(case, nbytes, fn, steps, psft_ms, out_of_time, "cpu")
        case, nbytes, fn, steps = cpu_logits_case(dtype)
        run_case(case, nbytes, fn, steps, psft_ms, out_of_time, "cpu")
    return 0


def cpu_model():
    """/proc/cpuinfo's first model name, or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
