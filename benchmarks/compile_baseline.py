"""torch.compile baseline for psft's CUDA benchmark (run by scripts/gpu-check.sh).

The clipped objective at N = 2**20 tokens written in PyTorch and compiled with
torch.compile, forward + backward, timed like benchmarks/bench_cuda.cpp
(median of 50 runs after warm-up). Prints lines in the same format.
"""

import time

import torch


def clipped_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, bound=20.0):
    ratio = torch.exp(torch.clamp(logp - old_logp, -bound, bound))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    weight = mask.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1)


def median_ms(body, iterations=50):
    for _ in range(5):
        body()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        body()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        print("compile_baseline: skipped: no CUDA device")
        return
    n = 1 << 20
    compiled = torch.compile(clipped_loss)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        logp = (torch.randn(n, device="cuda") * 0.3 - 1.0).to(dtype)
        old = (logp.float() + torch.randn(n, device="cuda") * 0.3).to(dtype)
        adv = torch.randn(n, device="cuda").to(dtype)
        mask = torch.rand(n, device="cuda") > 0.1
        nbytes = n * (3 * logp.element_size() + 1)
        x = logp.detach().float().requires_grad_()

        def step():
            x.grad = None
            compiled(x, old.float(), adv.float(), mask).backward()

        ms = median_ms(step)
        label = f"policy_loss fwd+bwd torch.compile ({name})"
        print(f"{label:<44} {ms:10.4f} {nbytes / (ms * 1e-3) / 1e9:12.1f}")


if __name__ == "__main__":
    main()
