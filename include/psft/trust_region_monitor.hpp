#pragma once
/// \file
/// TrustRegionMonitor: says, once and clearly, when PSFT's trust region never
/// binds (so the run is computing plain SFT) or binds on most tokens (the
/// learning rate is too high for it). Next to EntropyTracker (entropy.hpp),
/// which watches for entropy collapse.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "psft/core/config.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// What TrustRegionMonitor concluded from the steps recorded so far.
enum class TrustRegionState {
  /// Fewer than `patience` steps recorded, or the clip binds on some tokens
  /// but not on most: the trust region is doing its job.
  Healthy,
  /// For the last `patience` steps no token was clipped and no ratio left
  /// the trust region: the objective is plain SFT (or unclipped policy
  /// gradient).
  NeverBinds,
  /// For the last `patience` steps the clip bound on more than
  /// `most_fraction` of the tokens: most gradients are zeroed.
  BindsOnMost,
};

/// Watches each optimizer step's trust-region metrics (LossMetrics, or the
/// two numbers it needs) and reports when the clip has not bound for
/// `patience` consecutive steps (clip_frac == 0 and ratio_max <= 1 +
/// eps_high), or has bound on more than `most_fraction` of the tokens for
/// `patience` consecutive steps. It warns once per state it enters
/// (TORCH_WARN, unless warn is false) and can be queried (state(),
/// message()). Record the metrics of the last mini-batch of each global
/// batch, or of every mini-batch: the first mini-batch after an old-policy
/// recompute always has r = 1 and never binds.
class TrustRegionMonitor {
 public:
  /// \param patience       consecutive steps before a state is reported, >= 1
  /// \param eps_high       the upper clip of the run (ClipOptions::eps_high), >= 0
  /// \param most_fraction  clip fraction above which the clip "binds on most", in (0, 1]
  /// \param warn           TORCH_WARN when a state is entered
  explicit TrustRegionMonitor(std::int64_t patience = 20, double eps_high = 0.28,
                              double most_fraction = 0.5, bool warn = true)
      : patience_(patience), eps_high_(eps_high), most_fraction_(most_fraction), warn_(warn) {
    const char* api = "psft::TrustRegionMonitor";
    TORCH_CHECK(patience >= 1, api, ": patience must be >= 1, got ", patience);
    TORCH_CHECK(std::isfinite(eps_high) && eps_high >= 0, api,
                ": eps_high must be finite and >= 0, got ", eps_high);
    TORCH_CHECK(std::isfinite(most_fraction) && most_fraction > 0 && most_fraction <= 1, api,
                ": most_fraction must be in (0, 1], got ", most_fraction);
  }

  /// Adds one step's metrics (read to the host in one synchronisation) and
  /// returns state().
  TrustRegionState record(std::int64_t step, const LossMetrics& metrics) {
    const at::Tensor packed = metrics.packed().cpu();
    const double* v = packed.data_ptr<double>();
    return record(step, v[0], v[8]);  // clip_frac, ratio_max (core::MetricValues order)
  }

  /// Adds one step's clip fraction (LossMetrics::clip_frac, verl
  /// pg_clipfrac) and largest ratio (LossMetrics::ratio_max); steps strictly
  /// increasing. Returns state().
  TrustRegionState record(std::int64_t step, double clip_frac, double ratio_max) {
    const char* api = "psft::TrustRegionMonitor::record";
    TORCH_CHECK(!last_step_ || step > *last_step_, api, ": steps must increase, got ", step,
                " after ", *last_step_);
    TORCH_CHECK(std::isfinite(clip_frac) && clip_frac >= 0 && clip_frac <= 1, api,
                ": clip_frac must be in [0, 1], got ", clip_frac);
    TORCH_CHECK(!std::isnan(ratio_max) && ratio_max >= 0, api, ": ratio_max must be >= 0, got ",
                ratio_max);
    last_step_ = step;
    ++steps_;
    const bool idle = clip_frac == 0 && ratio_max <= 1 + eps_high_;
    idle_run_ = idle ? idle_run_ + 1 : 0;
    most_run_ = clip_frac > most_fraction_ ? most_run_ + 1 : 0;
    const TrustRegionState previous = state_;
    if (idle_run_ >= patience_) {
      state_ = TrustRegionState::NeverBinds;
    } else if (most_run_ >= patience_) {
      state_ = TrustRegionState::BindsOnMost;
    } else {
      state_ = TrustRegionState::Healthy;
    }
    if (state_ != previous && state_ != TrustRegionState::Healthy) {
      if (!first_report_step_) first_report_step_ = step;
      if (warn_) TORCH_WARN(message());
    }
    return state_;
  }

  /// The state after the latest step.
  TrustRegionState state() const { return state_; }
  /// Consecutive latest steps on which the clip did not bind.
  std::int64_t steps_without_binding() const { return idle_run_; }
  /// Consecutive latest steps on which it bound on more than most_fraction.
  std::int64_t steps_binding_on_most() const { return most_run_; }
  /// Steps recorded.
  std::int64_t steps() const { return steps_; }
  /// The first step at which a state other than Healthy was reported.
  std::optional<std::int64_t> first_report_step() const { return first_report_step_; }

  /// What the state means and its likely causes ("" when Healthy).
  std::string message() const {
    const std::string steps = std::to_string(patience_);
    switch (state_) {
      case TrustRegionState::NeverBinds:
        return "psft::TrustRegionMonitor: the trust region has not bound for " + steps +
               " steps (no token clipped, every ratio <= 1 + eps_high), so this run computes "
               "plain SFT. Likely causes: (1) one mini-batch per global batch, or old "
               "log-probabilities recomputed before every optimizer step, so r = 1 everywhere "
               "(use several mini-batches per old-policy recompute, as the PSFT recipe's 8); "
               "(2) a learning rate too low for the policy to move by eps_high within a global "
               "batch; (3) eps_high too large for this learning rate.";
      case TrustRegionState::BindsOnMost:
        return "psft::TrustRegionMonitor: the clip has bound on more than " +
               std::to_string(most_fraction_) + " of the tokens for " + steps +
               " steps, so most tokens pass no gradient. Likely causes: a learning rate too high "
               "for the trust region, too many mini-batches per old-policy recompute, or an "
               "eps_high too small.";
      case TrustRegionState::Healthy:
        break;
    }
    return {};
  }

 private:
  std::int64_t patience_;
  double eps_high_;
  double most_fraction_;
  bool warn_;
  std::optional<std::int64_t> last_step_;
  std::optional<std::int64_t> first_report_step_;
  std::int64_t steps_ = 0, idle_run_ = 0, most_run_ = 0;
  TrustRegionState state_ = TrustRegionState::Healthy;
};

PSFT_NAMESPACE_END
