#pragma once
/// \file
/// The KL penalty to a reference policy, aggregated like the loss it is
/// added to. Its per-token estimators are core/objectives/kl_penalty.hpp's
/// rule, run by the same fused backends as the policy objectives.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/core/options.hpp"
#include "psft/detail/checks.hpp"
#include "psft/detail/clipped_loss_types.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// The KL estimators (x = logp - ref_logp; the list and formulas are
/// core::KlEstimatorId's, core/objective_rule.hpp and
/// core/objectives/kl_penalty.hpp). verl's kl_loss_type names: K1 "kl"/"k1",
/// Abs "abs", K2 "mse"/"k2", K3 "low_var_kl"/"k3", K1StraightThrough "k1+",
/// AbsStraightThrough "abs+", K3StraightThrough "k3+"; K3Unclamped is TRL's
/// GRPO beta term.
using KlEstimator = core::KlEstimatorId;

/// Result of kl_penalty.
struct KlPenaltyResult {
  /// agg(k) with the options' reduction and normaliser (not multiplied by
  /// any coefficient): add beta * loss to the policy loss. 0-d, float32
  /// (float64 for float64 logp), connected to logp's graph.
  at::Tensor loss;
  /// Mask-weighted mean of the estimator over unmasked tokens (verl
  /// `actor/kl_loss` for TokenMean, TRL `kl`), 0-d float64; 0 without tokens.
  at::Tensor kl_mean;
};

/// The KL penalty to a reference policy: k(logp - ref_logp) per token,
/// aggregated by opts.reduction with opts.normaliser as a policy loss is, so
/// that policy_loss(...).loss + beta * kl_penalty(...).loss is verl's
/// `policy_loss + kl_loss * kl_loss_coef` (use_kl_loss) and TRL's GRPO loss
/// with beta (estimator K3Unclamped). The gradient flows to logp only;
/// ref_logp is a constant. opts.clip.log_ratio_clamp is K3's clamp (20,
/// verl's); opts.objective is ignored.
///
/// \param logp      [B, T] or [N] log-probabilities under the current policy.
/// \param ref_logp  same shape: under the reference policy.
/// \param mask      as policy_loss's (undefined: every token counts).
/// \param estimator the KL estimator (verl's K3 / low_var_kl by default).
/// \param opts      reduction, normaliser, check_finite, backend (as policy_loss).
/// \throws c10::Error naming the argument on bad input.
inline KlPenaltyResult kl_penalty(const at::Tensor& logp, const at::Tensor& ref_logp,
                                  const at::Tensor& mask, KlEstimator estimator = KlEstimator::K3,
                                  const LossOptions& opts = {}) {
  const char* api = "psft::kl_penalty";
  TORCH_CHECK(static_cast<int>(estimator) >= 0 && static_cast<int>(estimator) <= 7, api,
              ": estimator must be a psft::KlEstimator enumerator, got the value ",
              static_cast<int>(estimator));
  LossOptions kl_opts = opts;
  kl_opts.objective = ObjectiveOptions();
  detail::ClippedLossInputs in = detail::check_clipped_loss_inputs(
      api, logp, ref_logp, at::Tensor(), mask, kl_opts, "ref_logp");
  in.rule = core::RuleId::KlPenalty;
  in.kl_estimator = static_cast<core::KlEstimatorId>(estimator);
  const detail::ClippedLossValues v = detail::run_clipped_loss(in, kl_opts);
  return {v.loss, v.token_loss_mean};
}

PSFT_NAMESPACE_END
