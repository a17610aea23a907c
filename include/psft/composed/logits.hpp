#pragma once
/// \file
/// The composed backend of token_logprobs: the math of
/// core/online_softmax.hpp written with ATen ops, for devices without a
/// fused psft kernel (CUDA without psft's CUDA translation unit, MPS, ...).
/// Rows are processed in chunks so that the float32 temporaries stay
/// bounded (LogitsOptions::composed_chunk_bytes) however many tokens come;
/// the gradient is written chunk by chunk into one tensor in the logits'
/// dtype. No host-device synchronisation except the optional input check
/// (one per call). Mirrors the fused kernel (Note [Logits backends mirror
/// core]): same shift by the row max, same cutoff, same saved statistics.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/online_softmax.hpp"

PSFT_NAMESPACE_BEGIN
namespace composed {

/// Note [Softmax cutoff] in the accumulation type acc (float or double).
inline double softmax_cutoff_for(at::ScalarType acc) {
  return acc == at::kDouble ? core::softmax_cutoff<double>() : core::softmax_cutoff<float>();
}

/// 1 / temperature as the kernels accumulating in acc compute it (rounded
/// to float for float), so that every path scales by the same number.
inline double inv_temperature_for(at::ScalarType acc, double temperature) {
  return acc == at::kDouble ? 1.0 / temperature
                            : static_cast<double>(static_cast<float>(1.0 / temperature));
}

/// Rows per chunk: one float32 [rows, V] temporary takes about
/// opts.composed_chunk_bytes.
inline std::int64_t chunk_rows(const LogitsOptions& opts, std::int64_t vocab) {
  const std::int64_t row_bytes = std::max<std::int64_t>(vocab, 1) * 4;
  return std::max<std::int64_t>(1, opts.composed_chunk_bytes / row_bytes);
}

/// Calls fn(first_row, rows_view) for consecutive chunks of at most `rows`
/// rows of [B, T, V] or [N, V] logits, each a [n, V] view (no copy; a
/// [B, T, V] tensor whose rows cannot be flattened into one view is walked
/// sequence by sequence).
inline void for_each_row_chunk(const at::Tensor& logits, std::int64_t rows,
                               const std::function<void(std::int64_t, const at::Tensor&)>& fn) {
  const std::int64_t vocab = logits.size(-1);
  const bool flat = logits.dim() == 2 || logits.size(0) <= 1 || logits.size(1) <= 1 ||
                    logits.stride(0) == logits.size(1) * logits.stride(1);
  if (flat) {
    const at::Tensor view =
        logits.dim() == 2
            ? logits
            : logits.as_strided(
                  {logits.size(0) * logits.size(1), vocab},
                  {logits.size(1) <= 1 ? logits.stride(0) : logits.stride(1), logits.stride(2)});
    for (std::int64_t r = 0; r < view.size(0); r += rows) {
      fn(r, view.narrow(0, r, std::min(rows, view.size(0) - r)));
    }
    return;
  }
  const std::int64_t seq = logits.size(1);
  for (std::int64_t b = 0; b < logits.size(0); ++b) {
    const at::Tensor sequence = logits.select(0, b);
    for (std::int64_t t = 0; t < seq; t += rows) {
      fn(b * seq + t, sequence.narrow(0, t, std::min(rows, seq - t)));
    }
  }
}

/// The chunk's logits in the accumulation dtype, divided by the temperature
/// the way the fused kernel does (times 1 / T in that dtype).
inline at::Tensor scaled_logits(const at::Tensor& chunk, at::ScalarType acc,
                                const LogitsOptions& opts) {
  at::Tensor z = chunk.to(acc);
  if (opts.temperature != 1.0) {
    const double inv = acc == at::kDouble
                           ? 1.0 / opts.temperature
                           : static_cast<double>(static_cast<float>(1.0 / opts.temperature));
    z = z * inv;
  }
  return z;
}

/// Forward (see cpu::token_logprobs_forward for the contract). labels is
/// contiguous int64 on the logits' device; logp and entropy (labels' shape,
/// acc dtype) and stats ([N, 3] or undefined) are written. Rows whose label
/// is ignore_index get 0.
inline void token_logprobs_forward(const char* api, const at::Tensor& logits,
                                   const at::Tensor& all_labels, const LogitsOptions& opts,
                                   const at::Tensor& logp, const at::Tensor& entropy,
                                   const at::Tensor& stats) {
  const at::Tensor labels = all_labels.reshape({-1});
  const std::int64_t vocab = logits.size(-1);
  const at::ScalarType acc = logp.scalar_type();
  const double cutoff = softmax_cutoff_for(acc);
  const at::Tensor flat_logp = logp.reshape({-1});
  const at::Tensor flat_entropy = entropy.reshape({-1});
  at::Tensor bad_rows = at::zeros({}, labels.options().dtype(at::kLong));
  at::Tensor bad_labels = at::zeros({}, labels.options().dtype(at::kLong));

  for_each_row_chunk(
      logits, chunk_rows(opts, vocab), [&](std::int64_t first, const at::Tensor& chunk) {
        const std::int64_t n = chunk.size(0);
        const at::Tensor label = labels.narrow(0, first, n);
        const at::Tensor scored = label != opts.ignore_index;
        const at::Tensor z = scaled_logits(chunk, acc, opts);
        const at::Tensor m = std::get<0>(z.max(1, /*keepdim=*/true));  // NaN-propagating
        const at::Tensor y = z - m;
        const at::Tensor kept = y >= cutoff;
        const at::Tensor y_cut = y.clamp_min(cutoff);
        at::Tensor e = y_cut.exp().mul_(kept);
        const at::Tensor sum = e.sum(1);
        const at::Tensor weighted = e.mul_(y_cut).sum(1);
        const at::Tensor log_sum = sum.log();
        const at::Tensor mean_shifted = weighted / sum;
        const at::Tensor index = label.clamp(0, std::max<std::int64_t>(vocab - 1, 0)).unsqueeze(1);
        const at::Tensor y_label = y.gather(1, index).squeeze(1);
        const at::Tensor zero = at::zeros({}, z.options());
        flat_logp.narrow(0, first, n).copy_(at::where(scored, y_label - log_sum, zero));
        flat_entropy.narrow(0, first, n).copy_(at::where(scored, log_sum - mean_shifted, zero));
        if (stats.defined()) {
          stats.narrow(0, first, n)
              .copy_(at::where(scored.unsqueeze(1),
                               at::stack({m.squeeze(1), log_sum, mean_shifted}, 1), zero));
        }
        if (opts.check_inputs) {
          // NaN/+inf and all -inf rows all make S NaN (y = inf - inf or -inf + inf).
          bad_rows.add_(at::logical_and(scored, sum.isnan()).sum());
          bad_labels.add_(at::logical_and(scored, at::logical_or(label < 0, label >= vocab)).sum());
        }
      });

  if (opts.check_inputs) {
    // One synchronisation for both checks.
    const at::Tensor counts = at::stack({bad_labels, bad_rows}).cpu();
    const std::int64_t* c = counts.data_ptr<std::int64_t>();
    TORCH_CHECK(c[0] == 0, api, ": labels has ", c[0], " value(s) outside [0, ", vocab,
                ") that are not ignore_index (", opts.ignore_index, ")");
    TORCH_CHECK(c[1] == 0, api, ": logits has ", c[1],
                " scored token(s) with a NaN or +inf entry, or with every entry -inf (rows "
                "whose label is ignore_index are not checked)");
  }
}

/// Backward (see cpu::token_logprobs_backward): the gradient in logits'
/// dtype, written chunk by chunk. grad_logp / grad_entropy are flat in the
/// accumulation dtype, or undefined (zero).
inline at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& all_labels,
                                          const at::Tensor& stats, const at::Tensor& grad_logp,
                                          const at::Tensor& grad_entropy,
                                          const LogitsOptions& opts) {
  const at::Tensor labels = all_labels.reshape({-1});
  at::Tensor grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const std::int64_t vocab = logits.size(-1);
  if (grad.numel() == 0) return grad;
  const at::ScalarType acc = stats.scalar_type();
  const double cutoff = softmax_cutoff_for(acc);
  const double inv_temperature = inv_temperature_for(acc, opts.temperature);
  const at::Tensor flat_grad = grad.view({-1, vocab});
  const at::Tensor zeros_rows = at::zeros({labels.numel()}, stats.options());
  const at::Tensor g_all = grad_logp.defined() ? grad_logp : zeros_rows;
  const at::Tensor h_all = grad_entropy.defined() ? grad_entropy : zeros_rows;

  for_each_row_chunk(logits, chunk_rows(opts, vocab),
                     [&](std::int64_t first, const at::Tensor& chunk) {
                       const std::int64_t n = chunk.size(0);
                       const at::Tensor label = labels.narrow(0, first, n);
                       const at::Tensor scored = (label != opts.ignore_index).unsqueeze(1);
                       const at::Tensor s = stats.narrow(0, first, n);
                       const at::Tensor m = s.select(1, 0).unsqueeze(1);
                       const at::Tensor log_sum = s.select(1, 1).unsqueeze(1);
                       const at::Tensor mean_shifted = s.select(1, 2).unsqueeze(1);
                       const at::Tensor g = g_all.narrow(0, first, n).unsqueeze(1);
                       const at::Tensor h = h_all.narrow(0, first, n).unsqueeze(1);
                       // d = p (c0 + c1 y), the gradient of every entry but the label's
                       // (core::token_logprob_grad times 1 / T), plus g / T at the label.
                       const at::Tensor c0 = (g - h * mean_shifted) * -inv_temperature;
                       const at::Tensor c1 = h * -inv_temperature;
                       const at::Tensor y = scaled_logits(chunk, acc, opts) - m;
                       const at::Tensor t = y - log_sum;
                       at::Tensor d = t.clamp_min(cutoff).exp_().mul_(t >= cutoff);
                       d.mul_(y.clamp_min(cutoff).mul_(c1).add_(c0));
                       const at::Tensor index = label.clamp(0, vocab - 1).unsqueeze(1);
                       d.scatter_add_(1, index, g * inv_temperature);
                       d.masked_fill_(scored.logical_not(), 0);
                       flat_grad.narrow(0, first, n).copy_(d);
                     });
  return grad;
}

}  // namespace composed
PSFT_NAMESPACE_END
