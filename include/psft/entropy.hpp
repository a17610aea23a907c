#pragma once
/// \file
/// Token-entropy metrics and an entropy-collapse tracker. Entropy collapse
/// (the policy's distribution sharpening onto the demonstrations until it
/// stops exploring) is the failure PSFT's trust region exists to prevent, so
/// the entropy token_logprobs computes for free is worth watching.
///
///   auto r = psft::psft_loss_from_logits(logits, labels, old_logp);
///   psft::EntropyTracker tracker(/*window=*/50, /*max_drop=*/0.5);
///   if (tracker.record(step, r.entropy_mean, r.nll_mean)) warn("entropy collapsed");

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/detail/mask.hpp"

PSFT_NAMESPACE_BEGIN

namespace detail {

/// The mask as weights in `dtype` (Note [Mask argument]): an undefined mask
/// counts every token; an integer 0/1 mask is bool; a floating mask's
/// weights must be finite and >= 0, which reading them checks (one
/// host-device synchronisation on an accelerator; a bool mask needs none).
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
  const at::Tensor m = mask_argument(api, "mask", mask);
  const at::Tensor w = m.to(dtype);
  // The weights as the sums will read them, after the cast: a float64 weight
  // that overflows a float32 entropy's dtype is an Inf weight too.
  if (m.is_floating_point() && w.numel() > 0) {
    TORCH_CHECK(at::logical_and(w.isfinite(), w >= 0).all().item<bool>(), api,
                ": mask has a negative, NaN or Inf weight");
  }
  return w;
}

}  // namespace detail

/// Entropy statistics of one batch, as float64 tensors on the entropy's
/// device. Means are mask-weighted; to combine micro-batches or ranks, add
/// `sum` and `count` and divide once, never average the means.
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
/// TokenLogprobs::entropy) under `mask` (same shape; undefined: every
/// token). Detached: these are metrics.
///
/// The mask follows the rule of every psft mask (Note [Mask argument]):
/// bool (true: the token counts), floating token weights >= 0, or an integer
/// tensor of 0 and 1 only (Hugging Face's int64 attention_mask).
/// \throws c10::Error naming `mask` for a negative, NaN or Inf weight or an
///         integer value other than 0 and 1. Those checks read the mask: on
///         an accelerator a floating or integer mask costs one host-device
///         synchronisation (acceptable for a metric; a bool mask or none
///         costs nothing).
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
///
/// `mask` as in entropy_metrics: bool, floating weights >= 0, or integer
/// 0/1; undefined counts every token.
/// \throws c10::Error naming `mask` for a negative, NaN or Inf weight or an
///         integer value other than 0 and 1. On an accelerator, checking a
///         floating or integer mask is one host-device synchronisation;
///         pass a bool mask in a loop that must not synchronise.
inline at::Tensor masked_entropy_mean(const at::Tensor& entropy, const at::Tensor& mask = {}) {
  const char* api = "psft::masked_entropy_mean";
  const at::Tensor w = detail::entropy_weights(api, entropy, mask, entropy.scalar_type());
  const at::Tensor sum = at::where(w != 0, entropy * w, at::zeros({}, entropy.options())).sum();
  const at::Tensor count = w.sum();
  // Divide by a count that is never 0, so that backward has no 0 * inf.
  return sum / at::where(count > 0, count, at::ones_like(count));
}

/// Watches the token-entropy series of a training run and flags an entropy
/// collapse (Note [Entropy collapse rule]).
///
///   EntropyTracker t(/*window=*/50, /*max_drop=*/0.5);
///   t.record(step, entropy_mean, nll_mean);  // returns t.collapsed()
///
/// `nll_mean` is the mean negative log-probability of the demonstrated
/// tokens, over the same tokens as the entropy: LogitsLossResult::nll_mean
/// or SftLossResult::nll_mean, or -(logp * mask).sum() / mask.sum().
///
/// Note [Entropy collapse rule]
/// The latest step t is a collapse when both hold, over the `window` steps
/// that end at t (by step number, t included):
///
///   (1) the entropy fell by at least max_drop below the window's peak:
///         (max(H) - H_t) / max(H) >= max_drop;
///   (2) it fell faster than the NLL (only when the NLL is recorded): the
///       entropy-to-NLL ratio fell by max_drop below the window's,
///         H_t / NLL_t < (1 - max_drop) * sum(H) / sum(NLL),
///       the sums over the window's steps before t; evaluated as
///       H_t * sum(NLL) < (1 - max_drop) * NLL_t * sum(H), so that a zero
///       NLL never divides (NLL_t = 0 is never a collapse).
///
/// Why (2): on demonstration data the entropy H of the model's token
/// distribution and the NLL of the demonstrated token fall together while
/// the model learns. A model that is right and confident has both near 0:
/// a residual probability e = 1 - p(label) ~ NLL gives an entropy of at
/// most e (1 + log((V - 1) / e)). So on a task whose answers are determined
/// the entropy falls steadily towards 0 with the NLL, and their ratio stays
/// put or rises. A collapse is the distribution sharpening on something the
/// demonstrations do not support, or losing the diversity they have: the
/// entropy shrinks far faster than the NLL (H << NLL), and the latest
/// step's entropy-to-NLL ratio falls well below the window's. Pooling the
/// window's ratio (sum over sum) keeps per-step noise out of the reference,
/// and the per-step noise that entropy and NLL share (a batch of harder
/// tokens raises both) cancels in the ratio.
///
/// record(step, entropy) without an NLL applies (1) alone, the rule of
/// earlier versions. Entropy alone cannot tell a collapse from convergence
/// on determined answers (both drive it towards 0), and at small entropies
/// per-step noise alone often halves a value within a window: such a run
/// gets flagged. Pass the NLL. A tracker takes every step with an NLL or
/// every step without.
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
  /// >= 0) and returns collapsed(), by rule (1) alone: see the class notes
  /// for why record(step, entropy, nll) is the one to use on SFT data.
  bool record(std::int64_t step, double value) { return add(step, value, std::nullopt); }

  /// Adds the entropy and the NLL of the demonstrated tokens of `step` (both
  /// finite and >= 0, over the same tokens) and returns collapsed(), by
  /// rules (1) and (2).
  bool record(std::int64_t step, double entropy, double nll) { return add(step, entropy, nll); }

  /// record() for a 0-d tensor (e.g. entropy_mean); reads it to the host.
  bool record(std::int64_t step, const at::Tensor& value) {
    return record(step, host_value(value, "value"));
  }

  /// record(step, entropy, nll) for one-element tensors; reads them to the host.
  bool record(std::int64_t step, const at::Tensor& entropy, const at::Tensor& nll) {
    return record(step, host_value(entropy, "entropy"), host_value(nll, "nll"));
  }

  /// Whether the latest recorded value is a collapse.
  bool collapsed() const { return collapsed_; }
  /// The first step that was flagged, if any (collapses are often transient).
  std::optional<std::int64_t> first_collapse_step() const { return first_collapse_; }
  /// Fractional drop of the latest value below the window's peak (0 if none).
  double drop() const { return drop_; }
  /// Fractional drop of the latest entropy-to-NLL ratio below the pooled
  /// ratio sum(H) / sum(NLL) of the window's earlier steps, rule (2); 0 if
  /// it did not fall, or without an NLL.
  double drop_relative_to_nll() const { return drop_relative_to_nll_; }
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
  /// The recorded NLLs, one per step (empty when recorded without).
  const std::vector<double>& nlls() const { return nlls_; }

 private:
  static double host_value(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined() && t.numel() == 1, "psft::EntropyTracker::record: ", name,
                " must be a one-element tensor");
    return t.detach().to(at::kDouble).item<double>();
  }

  bool add(std::int64_t step, double value, std::optional<double> nll) {
    TORCH_CHECK(std::isfinite(value) && value >= 0,
                "psft::EntropyTracker::record: value must "
                "be finite and >= 0 (an entropy), got ",
                value, " at step ", step);
    TORCH_CHECK(!nll || (std::isfinite(*nll) && *nll >= 0),
                "psft::EntropyTracker::record: nll must be finite and >= 0 (a negative "
                "log-probability), got ",
                nll.value_or(0.0), " at step ", step);
    TORCH_CHECK(steps_.empty() || step > steps_.back(),
                "psft::EntropyTracker::record: steps "
                "must increase, got step ",
                step, " after step ", steps_.empty() ? 0 : steps_.back());
    TORCH_CHECK(steps_.empty() || nll.has_value() == !nlls_.empty(),
                "psft::EntropyTracker::record: record every step with an nll or none; step ", step,
                nll ? " has an nll but the earlier steps have none"
                    : " has no nll but the earlier steps have one");
    steps_.push_back(step);
    values_.push_back(value);
    if (nll) nlls_.push_back(*nll);
    // The window: steps step - window + 1 .. step.
    // Sums over the earlier steps only: with a short window, the latest
    // step in its own reference would hide part of its fall.
    peak_ = value;
    double entropy_sum = 0.0, nll_sum = 0.0;
    for (std::size_t i = steps_.size() - 1; i-- > 0 && steps_[i] > step - window_;) {
      peak_ = values_[i] > peak_ ? values_[i] : peak_;
      entropy_sum += values_[i];
      if (nll) nll_sum += nlls_[i];
    }
    drop_ = peak_ > 0 ? (peak_ - value) / peak_ : 0.0;
    collapsed_ = drop_ >= max_drop_;
    drop_relative_to_nll_ = 0.0;
    if (nll) {
      // Note [Entropy collapse rule] (2), without a division by an NLL.
      const double keep = 1.0 - max_drop_;
      collapsed_ = collapsed_ && value * nll_sum < keep * *nll * entropy_sum;
      if (*nll > 0 && entropy_sum > 0) {
        const double relative = (value * nll_sum) / (*nll * entropy_sum);
        drop_relative_to_nll_ = relative < 1.0 ? 1.0 - relative : 0.0;
      }
    }
    if (collapsed_ && !first_collapse_) first_collapse_ = step;
    return collapsed_;
  }

  std::int64_t window_;
  double max_drop_;
  std::vector<std::int64_t> steps_;
  std::vector<double> values_;
  std::vector<double> nlls_;
  double peak_ = 0.0;
  double drop_ = 0.0;
  double drop_relative_to_nll_ = 0.0;
  bool collapsed_ = false;
  std::optional<std::int64_t> first_collapse_;
};

PSFT_NAMESPACE_END
