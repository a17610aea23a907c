// GPU benchmark of psft's fused CUDA kernels (built with PSFT_CUDA=ON):
// the clipped objective at N = 2^20 tokens, forward + backward, against
//   - a device-to-device copy of the same input bytes (the memory floor),
//   - the composed ATen backend (what runs without psft_cuda.cu);
// and token_logprobs at N = 16384 tokens, V = 151936 (Qwen's vocabulary),
// bf16 logits, forward + backward, fused against composed.
// Prints one line per case: median milliseconds over the timed runs and the
// effective bandwidth of the input bytes. Exits 0 without a GPU.

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <vector>

#include "psft/psft.hpp"

namespace {

double median_ms(const std::function<void()>& body, int iterations = 50) {
  for (int i = 0; i < 5; ++i) body();
  torch::cuda::synchronize();
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    const auto start = std::chrono::steady_clock::now();
    body();
    torch::cuda::synchronize();
    times.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main() {
  if (!torch::cuda::is_available()) {
    std::printf("bench_cuda: skipped: no CUDA device\n");
    return 0;
  }
  const std::int64_t n = std::int64_t(1) << 20;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  std::printf("%-44s %10s %12s\n", "case", "ms", "GB/s(inputs)");
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    const at::Tensor logp = (at::randn({n}, cuda) * 0.3 - 1.0).to(dtype);
    const at::Tensor old = (logp.to(at::kFloat) + at::randn({n}, cuda) * 0.3).to(dtype);
    const at::Tensor adv = at::randn({n}, cuda).to(dtype);
    const at::Tensor mask = at::rand({n}, cuda) > 0.1;
    const double bytes = double(n) * (3 * logp.element_size() + 1);
    const at::Tensor packed = at::empty({std::int64_t(bytes)}, cuda.dtype(at::kByte));
    const at::Tensor packed_copy = at::empty_like(packed);
    const char* name = dtype == at::kBFloat16 ? "bf16" : "fp32";
    const auto report = [&](const char* what, double ms) {
      std::printf("%-44s %10.4f %12.1f\n", what, ms, bytes / (ms * 1e-3) / 1e9);
    };
    char label[128];
    std::snprintf(label, sizeof label, "d2d copy of the input bytes (%s)", name);
    report(label, median_ms([&] { packed_copy.copy_(packed); }));
    for (const psft::Backend backend : {psft::Backend::FusedCuda, psft::Backend::Composed}) {
      psft::LossOptions opts;
      opts.backend = backend;
      opts.check_finite = false;  // no host synchronisation in either path
      const at::Tensor x = logp.detach().requires_grad_();
      std::snprintf(label, sizeof label, "policy_loss fwd %s (%s)", psft::backend_name(backend),
                    name);
      report(label, median_ms([&] { psft::policy_loss(x, old, adv, mask, opts); }));
      std::snprintf(label, sizeof label, "policy_loss fwd+bwd %s (%s)", psft::backend_name(backend),
                    name);
      report(label, median_ms([&] {
               x.mutable_grad() = at::Tensor();
               psft::policy_loss(x, old, adv, mask, opts).loss.backward();
             }));
    }
  }
  {
    const std::int64_t tokens = 16384, vocab = 151936;
    const at::Tensor logits = at::randn({tokens, vocab}, cuda.dtype(at::kBFloat16));
    const at::Tensor labels = at::randint(0, vocab, {tokens}, cuda.dtype(at::kLong));
    const double bytes = double(tokens) * vocab * 2;
    for (const psft::Backend backend : {psft::Backend::FusedCuda, psft::Backend::Composed}) {
      psft::LogitsOptions opts;
      opts.backend = backend;
      opts.check_inputs = false;
      const at::Tensor x = logits.detach().requires_grad_();
      char label[128];
      std::snprintf(label, sizeof label, "token_logprobs fwd %s (bf16, V=151936)",
                    psft::backend_name(backend));
      double ms = median_ms([&] { psft::token_logprobs(logits, labels, opts); }, 10);
      std::printf("%-44s %10.4f %12.1f\n", label, ms, bytes / (ms * 1e-3) / 1e9);
      std::snprintf(label, sizeof label, "token_logprobs fwd+bwd %s (bf16)",
                    psft::backend_name(backend));
      ms = median_ms(
          [&] {
            x.mutable_grad() = at::Tensor();
            psft::token_logprobs(x, labels, opts).logp.sum().backward();
          },
          10);
      std::printf("%-44s %10.4f %12.1f\n", label, ms, bytes / (ms * 1e-3) / 1e9);
    }
  }
  return 0;
}
