#pragma once
/// \file
/// Token-entropy metrics and an entropy-collapse tracker. Entropy collapse
/// (the policy's distribution sharpening onto the demonstrations until it
/// stops exploring) is the failure PSFT's trust region exists to prevent, so
/// the entropy token_logprobs computes for free is worth watching.
///
///   auto r = psft::psft_loss_from_logits(logits, labels, old_logp);
///   psft::EntropyTracker tracker(/*window=*/50, /*max_drop=*/0.5);
///   if (tracker.record(step, r.entropy_mean.item<double>())) warn("entropy collapsed");

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN

namespace detail {

/// The mask as weights in `dtype`: an undefined mask counts every token.
inline at::Tensor entropy_weights(const char* api, const at::Tensor& entropy,
                                  const at::Tensor& mask, at::ScalarType dtype) {
  TORCH_CHECK(entropy.defined(), api, ": entropy is an undefined tensor");
  TORCH_CHECK(entropy.is_floating_point(), api, ": entropy must be floating, got ",
              entropy.scalar_type());
  TORCH_CHECK(entropy.dim() == 1 || entropy.dim() == 2, api,
              ": entropy must have shape [B, T] or [N], got ", entropy.sizes());
  if (!mask.defined()) return at::ones(entropy.sizes(), entropy.options().dtype(dtype));
  TORCH_CHECK(mask.sizes() == entropy.sizes(), api, ": mask must have entropy's shape ",
              entropy.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == entropy.device(), api, ": mask is on ", mask.device(),
              " but entropy is on ", entropy.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.is_floating_point(), api,
              ": mask must be bool or floating (token weights), got ", mask.scalar_type());
  return mask.detach().to(dtype);
}

}  // namespace detail

/// Entropy statistics of one batch, as float64 tensors on the entropy's
/// device (no host-device synchronisation). Means are mask-weighted; to
/// combine micro-batches or ranks, add `sum` and `count` and divide once,
/// never average the means.
struct EntropyMetrics {
  /// Global token mean sum(m H) / sum(m); 0 when no token counts. 0-d.
  at::Tensor mean;
  /// Each sequence's own masked mean, [B] ([1] for flat [N] input); 0 for a
  /// sequence without tokens.
  at::Tensor per_sequence;
  /// sum(m H), 0-d.
  at::Tensor sum;
  /// sum(m), 0-d.
  at::Tensor count;
};

/// Entropy metrics of per-token entropies `entropy` ([B, T] or [N], e.g.
/// TokenLogprobs::entropy) under `mask` (same shape, bool or float weights;
/// undefined: every token). Detached: these are metrics.
inline EntropyMetrics entropy_metrics(const at::Tensor& entropy, const at::Tensor& mask = {}) {
  const char* api = "psft::entropy_metrics";
  const at::Tensor w = detail::entropy_weights(api, entropy, mask, at::kDouble);
  const at::Tensor h = entropy.detach().to(at::kDouble);
  // where(): a masked-out NaN or inf must not leak into the sums.
  const at::Tensor weighted = at::where(w != 0, h * w, at::zeros({}, h.options()));
  const at::Tensor rows_h = entropy.dim() == 2 ? weighted.sum(1) : weighted.sum().reshape({1});
  const at::Tensor rows_w = entropy.dim() == 2 ? w.sum(1) : w.sum().reshape({1});
  EntropyMetrics m;
  m.sum = rows_h.sum();
  m.count = rows_w.sum();
  m.mean = m.sum / at::where(m.count > 0, m.count, at::ones_like(m.count));
  m.per_sequence = rows_h / at::where(rows_w > 0, rows_w, at::ones_like(rows_w));
  return m;
}

/// sum(m H) / sum(m) in the entropy's dtype, 0 when no token counts. Keeps
/// the graph: with LogitsOptions::entropy_grad, `loss - beta * mean` is an
/// entropy bonus. (Under gradient accumulation, divide the sum by the
/// step's token count instead, as the loss's normaliser does.)
inline at::Tensor masked_entropy_mean(const at::Tensor& entropy, const at::Tensor& mask = {}) {
  const char* api = "psft::masked_entropy_mean";
  const at::Tensor w = detail::entropy_weights(api, entropy, mask, entropy.scalar_type());
  const at::Tensor sum = at::where(w != 0, entropy * w, at::zeros({}, entropy.options())).sum();
  const at::Tensor count = w.sum();
  // Divide by a count that is never 0, so that backward has no 0 * inf.
  return sum / at::where(count > 0, count, at::ones_like(count));
}

/// Watches the token-entropy series of a training run and flags a collapse:
/// the latest value fell by at least `max_drop` (a fraction) below the
/// highest value of the last `window` steps.
///
///   EntropyTracker t(/*window=*/50, /*max_drop=*/0.5);
///   t.record(step, entropy_mean);   // returns t.collapsed()
///
/// Host-side and cheap; keeps the whole series for plotting or logging.
class EntropyTracker {
 public:
  /// \param window    steps looked back (by step number, the latest included), >= 1
  /// \param max_drop  fraction in (0, 1]: 0.5 flags a halving
  explicit EntropyTracker(std::int64_t window = 50, double max_drop = 0.5)
      : window_(window), max_drop_(max_drop) {
    TORCH_CHECK(window >= 1, "psft::EntropyTracker: window must be >= 1, got ", window);
    TORCH_CHECK(std::isfinite(max_drop) && max_drop > 0 && max_drop <= 1,
                "psft::EntropyTracker: max_drop must be in (0, 1], got ", max_drop);
  }

  /// Adds the entropy of `step` (steps strictly increasing, value finite and
  /// >= 0) and returns collapsed().
  bool record(std::int64_t step, double value) {
    TORCH_CHECK(std::isfinite(value) && value >= 0,
                "psft::EntropyTracker::record: value must "
                "be finite and >= 0 (an entropy), got ",
                value, " at step ", step);
    TORCH_CHECK(steps_.empty() || step > steps_.back(),
                "psft::EntropyTracker::record: steps "
                "must increase, got step ",
                step, " after step ", steps_.empty() ? 0 : steps_.back());
    steps_.push_back(step);
    values_.push_back(value);
    peak_ = value;
    for (std::size_t i = steps_.size(); i-- > 0 && steps_[i] > step - window_;) {
      peak_ = values_[i] > peak_ ? values_[i] : peak_;
    }
    drop_ = peak_ > 0 ? (peak_ - value) / peak_ : 0.0;
    collapsed_ = drop_ >= max_drop_;
    if (collapsed_ && !first_collapse_) first_collapse_ = step;
    return collapsed_;
  }

  /// record() for a 0-d tensor (e.g. entropy_mean); reads it to the host.
  bool record(std::int64_t step, const at::Tensor& value) {
    TORCH_CHECK(value.defined() && value.numel() == 1,
                "psft::EntropyTracker::record: value must be a one-element tensor");
    return record(step, value.detach().to(at::kDouble).item<double>());
  }

  /// Whether the latest recorded value is a collapse.
  bool collapsed() const { return collapsed_; }
  /// The first step that was flagged, if any (collapses are often transient).
  std::optional<std::int64_t> first_collapse_step() const { return first_collapse_; }
  /// Fractional drop of the latest value below the window's peak (0 if none).
  double drop() const { return drop_; }
  /// Highest value of the window that ends at the latest step.
  double window_peak() const { return peak_; }
  /// Steps looked back (by step number, the latest included).
  std::int64_t window() const { return window_; }
  /// The fractional drop below the window's peak that flags a collapse.
  double max_drop() const { return max_drop_; }
  /// The recorded steps.
  const std::vector<std::int64_t>& steps() const { return steps_; }
  /// The recorded values, one per step.
  const std::vector<double>& values() const { return values_; }

 private:
  std::int64_t window_;
  double max_drop_;
  std::vector<std::int64_t> steps_;
  std::vector<double> values_;
  double peak_ = 0.0;
  double drop_ = 0.0;
  bool collapsed_ = false;
  std::optional<std::int64_t> first_collapse_;
};

PSFT_NAMESPACE_END
