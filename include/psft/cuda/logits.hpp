#pragma once
/// \file
/// The fused CUDA backend of token_logprobs as the host dispatcher sees it
/// (the entry points of psft_cuda.cu, plus the input checks the CPU backend
/// makes). Included only under PSFT_WITH_CUDA_KERNELS; compiles with any C++
/// compiler.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/cuda/entry.hpp"

PSFT_NAMESPACE_BEGIN
namespace cuda {

/// Forward (contract of cpu::token_logprobs_forward). With opts.check_inputs
/// it reads the per-row flags back: one synchronisation, as the composed
/// backend on a device.
inline void token_logprobs_forward(const char* api, const at::Tensor& logits,
                                   const at::Tensor& labels, const LogitsOptions& opts,
                                   const at::Tensor& logp, const at::Tensor& entropy,
                                   const at::Tensor& stats) {
  const at::Tensor flags = psft_cuda_entry::token_logprobs_forward(
      logits, labels.reshape({-1}), opts.ignore_index, opts.temperature, logp, entropy, stats);
  if (!opts.check_inputs || flags.numel() == 0) return;
  const at::Tensor host = flags.cpu();
  const std::uint8_t* f = host.data_ptr<std::uint8_t>();
  const std::int64_t vocab = logits.size(-1);
  for (std::int64_t r = 0, n = host.numel(); r < n; ++r) {
    if (f[r] == 0) continue;
    const std::int64_t label = labels.reshape({-1})[r].item<std::int64_t>();  // error path only
    TORCH_CHECK(!(f[r] & 4), api, ": labels must be in [0, ", vocab, ") or equal ignore_index (",
                opts.ignore_index, "), got ", label, " at token ", r,
                " (flat index over the leading dimensions)");
    TORCH_CHECK(!(f[r] & 1), api, ": logits has a NaN or +inf entry at token ", r,
                " (flat index over the leading dimensions; rows whose label is ignore_index are "
                "not read)");
    TORCH_CHECK(!(f[r] & 2), api, ": logits at token ", r,
                " is -inf over the whole vocabulary, so its softmax is undefined; give that "
                "token the label ignore_index (",
                opts.ignore_index, ")");
  }
}

/// Backward (contract of cpu::token_logprobs_backward).
inline at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& stats, const at::Tensor& grad_logp,
                                          const at::Tensor& grad_entropy,
                                          const LogitsOptions& opts) {
  return psft_cuda_entry::token_logprobs_backward(logits, labels.reshape({-1}), opts.ignore_index,
                                                  opts.temperature, stats, grad_logp, grad_entropy);
}

}  // namespace cuda
PSFT_NAMESPACE_END
