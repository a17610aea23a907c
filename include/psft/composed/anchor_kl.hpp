#pragma once
/// \file
/// KL(pi_ref || pi_theta) of whole vocabulary rows, per token, from the
/// policy's and the reference's logits, with ATen ops over chunks of rows
/// (ASFT's anchor; psft::asft_loss_from_logits). No [tokens, V] temporary
/// outlives a chunk: forward keeps only the per-token values, backward
/// recomputes both softmaxes chunk by chunk.
///
///   kl_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)),  p = softmax(z / T)
///   d kl_t / d z_theta = (p_theta - p_ref) / T

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace composed {

/// Rows per chunk so that one float [rows, V] temporary stays near `bytes`.
inline std::int64_t anchor_chunk_rows(std::int64_t vocab, std::int64_t bytes) {
  return std::max<std::int64_t>(1, bytes / (4 * std::max<std::int64_t>(vocab, 1)));
}

/// kl_t for [N, V] logits and reference logits (any float dtypes), rows
/// where `scored` is false get 0. Float32 (float64 for float64 logits).
inline at::Tensor anchor_kl_forward(const at::Tensor& logits, const at::Tensor& ref_logits,
                                    const at::Tensor& scored, double temperature,
                                    std::int64_t chunk_bytes) {
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor kl = at::zeros({n}, logits.options().dtype(acc));
  const std::int64_t step = anchor_chunk_rows(vocab, chunk_bytes);
  for (std::int64_t begin = 0; begin < n; begin += step) {
    const std::int64_t rows = std::min(step, n - begin);
    const at::Tensor lp = at::log_softmax(logits.narrow(0, begin, rows).to(acc) / temperature, -1);
    const at::Tensor lr =
        at::log_softmax(ref_logits.narrow(0, begin, rows).to(acc) / temperature, -1);
    // A reference entry of probability zero adds exactly 0, even where the
    // policy's logit is -inf too (a masked vocabulary entry: 0 * NaN otherwise).
    const at::Tensor q = lr.exp();
    kl.narrow(0, begin, rows)
        .copy_(at::where(q > 0, q * (lr - lp), at::zeros({}, q.options())).sum(-1));
  }
  return at::where(scored, kl, at::zeros({}, kl.options()));
}

/// d(sum_t grad_t kl_t) / d logits in the logits' dtype.
inline at::Tensor anchor_kl_backward(const at::Tensor& logits, const at::Tensor& ref_logits,
                                     const at::Tensor& scored, const at::Tensor& grad,
                                     double temperature, std::int64_t chunk_bytes) {
  const at::ScalarType acc = grad.scalar_type();
  const std::int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const at::Tensor g = at::where(scored, grad, at::zeros({}, grad.options())) / temperature;
  const std::int64_t step = anchor_chunk_rows(vocab, chunk_bytes);
  for (std::int64_t begin = 0; begin < n; begin += step) {
    const std::int64_t rows = std::min(step, n - begin);
    const at::Tensor p = at::softmax(logits.narrow(0, begin, rows).to(acc) / temperature, -1);
    const at::Tensor q = at::softmax(ref_logits.narrow(0, begin, rows).to(acc) / temperature, -1);
    out.narrow(0, begin, rows).copy_((p - q) * g.narrow(0, begin, rows).unsqueeze(1));
  }
  return out;
}

}  // namespace composed
PSFT_NAMESPACE_END
