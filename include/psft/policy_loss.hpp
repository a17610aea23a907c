#pragma once
/// \file
/// The PSFT objective and the general clipped policy objective on per-token
/// log-probabilities. See docs/math.md for the derivation.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <limits>
#include <vector>

#include "psft/autograd/clipped_loss_function.hpp"
#include "psft/backend.hpp"
#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/detail/checks.hpp"
#include "psft/detail/clipped_loss_types.hpp"

PSFT_NAMESPACE_BEGIN

/// Trust-region metrics of one loss call, as 0-d float64 tensors on the
/// inputs' device. Means are mask-weighted over unmasked tokens; to combine
/// micro-batches, weight each mean by token_count (merge_metrics does that),
/// never average the means. With no tokens, fractions and KL are 0 and ratio
/// statistics are 1. metrics_log (psft/metric_log.hpp) reads them all to the
/// host in one synchronisation, under psft's, verl's or TRL's names.
struct LossMetrics {
  /// verl `pg_clipfrac`: fraction of tokens where the PPO clip binds
  /// (L2 > L1), on either side.
  at::Tensor clip_frac;
  /// verl `pg_clipfrac_lower`: fraction where the dual clip binds (A < 0).
  at::Tensor clip_frac_dual;
  /// TRL `clip_ratio/high_mean`: r > 1 + eps_high and A > 0 (the PSFT trust
  /// region is active).
  at::Tensor clip_frac_high;
  /// TRL `clip_ratio/low_mean`: r < 1 - eps_low and A < 0.
  at::Tensor clip_frac_low;
  /// mean(old_logp - logp) (verl `ppo_kl`): k1 estimate of KL(old || new).
  /// It is an unbiased estimate only for tokens sampled from the old policy.
  /// On demonstration data (SFT, PSFT) the tokens come from the dataset,
  /// and training raises their log-probability, so logp > old_logp on most
  /// tokens and k1 is negative: read it as "how far the demonstrations'
  /// likelihood moved", not as a KL. approx_kl_k3 stays >= 0.
  at::Tensor approx_kl_k1;
  /// mean(r - 1 - log r): k3 estimate of KL(old || new), >= 0.
  at::Tensor approx_kl_k3;
  /// mean(r) over unmasked tokens.
  at::Tensor ratio_mean;
  /// min(r) over unmasked tokens (1 with none).
  at::Tensor ratio_min;
  /// max(r) over unmasked tokens (1 with none).
  at::Tensor ratio_max;
  /// Sum of mask weights (the token count for a 0/1 mask).
  at::Tensor token_count;

  /// Unpacks a [core::kMetricCount] tensor in core::MetricValues order.
  static LossMetrics from_packed(const at::Tensor& packed) {
    LossMetrics m;
    at::Tensor* fields[] = {&m.clip_frac,    &m.clip_frac_dual, &m.clip_frac_high, &m.clip_frac_low,
                            &m.approx_kl_k1, &m.approx_kl_k3,   &m.ratio_mean,     &m.ratio_min,
                            &m.ratio_max,    &m.token_count};
    for (int i = 0; i < core::kMetricCount; ++i) *fields[i] = packed.select(0, i);
    return m;
  }

  /// The fields as one [core::kMetricCount] float64 tensor in
  /// core::MetricValues order (the inverse of from_packed).
  at::Tensor packed() const {
    const at::Tensor* fields[] = {&clip_frac,    &clip_frac_dual, &clip_frac_high, &clip_frac_low,
                                  &approx_kl_k1, &approx_kl_k3,   &ratio_mean,     &ratio_min,
                                  &ratio_max,    &token_count};
    std::vector<at::Tensor> values;
    for (const at::Tensor* f : fields) {
      TORCH_CHECK(f->defined() && f->numel() == 1,
                  "psft::LossMetrics::packed: every field must be a one-element tensor");
      values.push_back(f->detach().reshape({}).to(at::kDouble));
    }
    return at::stack(values);
  }
};

/// The metrics of several loss calls (the micro-batches of an optimizer step,
/// the ranks of a data-parallel group after gathering, ...) as if computed in
/// one call over all their tokens: means weighted by token_count, ratio_min
/// and ratio_max over the parts that have tokens, token_count summed. No
/// host-device synchronisation; every part must be on the same device.
/// With no tokens at all, fractions and KL are 0 and ratio statistics 1.
inline LossMetrics merge_metrics(const std::vector<LossMetrics>& parts) {
  const char* api = "psft::merge_metrics";
  TORCH_CHECK(!parts.empty(), api, ": parts is empty");
  std::vector<at::Tensor> packed;
  for (const LossMetrics& m : parts) packed.push_back(m.packed());
  for (const at::Tensor& p : packed) {
    TORCH_CHECK(p.device() == packed[0].device(), api, ": parts are on ", packed[0].device(),
                " and ", p.device(), "; move them to one device first");
  }
  const at::Tensor all = at::stack(packed);  // [parts, kMetricCount]
  enum { kRatioMean = 6, kRatioMin = 7, kRatioMax = 8, kTokens = 9 };
  const at::Tensor w = all.select(1, kTokens);
  const at::Tensor total = w.sum();
  const at::Tensor any = total > 0;
  const at::Tensor safe_total = at::where(any, total, at::ones_like(total));
  // Parts without tokens carry placeholder means (0, ratio 1) that get weight 0.
  const at::Tensor means = (all.narrow(1, 0, kRatioMin) * w.unsqueeze(1)).sum(0) / safe_total;
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor has = w > 0;
  const at::Tensor lo = at::where(has, all.select(1, kRatioMin), at::full({}, inf, all.options()));
  const at::Tensor hi = at::where(has, all.select(1, kRatioMax), at::full({}, -inf, all.options()));
  const at::Tensor one = at::ones({}, all.options());
  at::Tensor merged = at::cat({means, at::stack({lo.min(), hi.max(), total})});
  // With no tokens: fractions and KL stay 0 (every weight is 0); ratio stats 1.
  merged.narrow(0, kRatioMean, 3)
      .copy_(at::where(any, merged.narrow(0, kRatioMean, 3), one.expand({3})));
  return LossMetrics::from_packed(merged);
}

/// Result of a loss call.
struct LossResult {
  /// The aggregated loss, 0-d, float32 (float64 for float64 logp). Connected
  /// to logp's graph even when every token is masked.
  at::Tensor loss;
  /// Trust-region metrics of the batch (0-d tensors, not differentiable).
  LossMetrics metrics;
};

namespace detail {

/// What run_clipped_loss returns: the loss, the packed metrics and the mean
/// per-token loss (all 0-d but the metrics).
struct ClippedLossValues {
  at::Tensor loss, metrics, token_loss_mean;
};

/// old_logp' = logp - mean_t(logp - old_logp) over each row's unmasked
/// tokens (mask-weighted, the count clamped to >= 1 as verl and TRL do), so
/// that every token's log-ratio is its sequence's with d/dlogp = 1: GSPO's
/// sg(log s_i) + logp - sg(logp) (RatioLevel::Sequence).
inline at::Tensor sequence_old_logp(const ClippedLossInputs& in) {
  const at::ScalarType acc = accumulate_type(in.logp.scalar_type());
  const at::Tensor logp = in.logp.detach().reshape({in.rows, in.cols}).to(acc);
  const at::Tensor old = in.old_logp.reshape({in.rows, in.cols}).to(acc);
  const at::Tensor weight =
      in.mask.defined() ? in.mask.reshape({in.rows, in.cols}).to(acc) : at::ones_like(logp);
  const at::Tensor valid = weight != 0;
  const at::Tensor zero = at::zeros({}, logp.options());
  const at::Tensor sum = at::where(valid, (logp - old) * weight, zero).sum(1, true);
  const at::Tensor count = at::where(valid, weight, zero).sum(1, true).clamp_min(1.0);
  return (logp - sum / count).reshape(in.logp.sizes());
}

/// Validated inputs through the chosen backend, with autograd when logp
/// needs a gradient.
inline ClippedLossValues run_clipped_loss(ClippedLossInputs in, const LossOptions& user_opts) {
  const LossOptions opts = core::resolve_sequence_count(user_opts, in.rows);
  if (opts.objective.ratio_level == RatioLevel::Sequence) in.old_logp = sequence_old_logp(in);
  const Backend backend = backend_for(in.logp, opts.backend);
  ClippedLossValues v;
  if (in.logp.requires_grad() && torch::autograd::GradMode::is_enabled()) {
    auto outs = autograd::ClippedLossFunction::apply(in.logp, &in, &opts, backend);
    v.loss = outs[0];
    v.metrics = outs[1];
    v.token_loss_mean = outs[2];
  } else {
    ClippedLossOutputs out = run_clipped_loss_forward(in, opts, backend, /*need_grad=*/false);
    v.loss = out.loss;
    v.metrics = out.metrics;
    v.token_loss_mean = out.token_loss_mean;
  }
  return v;
}

inline LossResult clipped_loss(const char* api, const at::Tensor& logp, const at::Tensor& old_logp,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               const LossOptions& opts) {
  TORCH_CHECK(opts.entropy_coeff == 0.0, api, ": entropy_coeff (", opts.entropy_coeff,
              ") needs the logits; use the from-logits loss, or add -entropy_coeff x the "
              "aggregated entropy yourself");
  const ClippedLossValues v = run_clipped_loss(
      check_clipped_loss_inputs(api, logp, old_logp, advantages, mask, opts), opts);
  LossResult result;
  result.loss = v.loss;
  result.metrics = LossMetrics::from_packed(v.metrics);
  return result;
}

/// The loss's factor of every token ([N] float64 on labels' device): d
/// loss / d l_t for a per-token loss l_t, from the reduction, the
/// normaliser and each row's token count (core::reduce_rows, the fused
/// loss's own code). One host read of the row counts.
inline at::Tensor token_scales(const char* api, const at::Tensor& mask, const LossOptions& opts) {
  const std::int64_t rows = mask.dim() == 2 ? mask.size(0) : 1;
  const std::int64_t cols = mask.dim() == 2 ? mask.size(1) : mask.numel();
  const at::Tensor row_tokens =
      mask.reshape({rows, cols}).sum(1, /*keepdim=*/false, at::kDouble).cpu().contiguous();
  std::vector<double> row_loss_unused(static_cast<std::size_t>(rows), 0.0);
  at::Tensor row_scale = at::empty({rows}, at::TensorOptions().dtype(at::kDouble));
  const core::RowReduction reduced = core::reduce_rows(
      core::resolve_sequence_count(opts, rows), rows, cols, row_loss_unused.data(),
      row_tokens.data_ptr<double>(), row_scale.data_ptr<double>());
  TORCH_CHECK(reduced.error.empty(), api, ": ", reduced.error);
  return row_scale.to(mask.device()).repeat_interleave(cols);
}

/// agg(values) with opts' reduction and normaliser (the aggregation of the
/// policy loss), differentiable in values: the KL penalty's K1 rule with a
/// zero reference, whose per-token loss is the value itself and whose
/// gradient is 1 (the entropy bonus's aggregation).
inline at::Tensor aggregate_tokens(const char* api, const at::Tensor& values,
                                   const at::Tensor& mask, const LossOptions& opts) {
  LossOptions agg_opts = opts;
  agg_opts.objective = ObjectiveOptions();
  agg_opts.entropy_coeff = 0.0;
  ClippedLossInputs in = check_clipped_loss_inputs(api, values, at::zeros_like(values.detach()),
                                                   at::Tensor(), mask, agg_opts);
  in.rule = core::RuleId::KlPenalty;
  in.kl_estimator = core::KlEstimatorId::K1;
  return run_clipped_loss(in, agg_opts).loss;
}

}  // namespace detail

/// The general clipped policy objective (PPO / GRPO / DAPO style):
///
///   l_t  = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)),
///          capped at -A c for A < 0 when clip.dual_clip = c is set,
///   r_t  = exp(clamp(logp_t - old_logp_t, -20, 20)),
///
/// aggregated by opts.reduction (verl's definitions). The gradient flows to
/// logp only: dl/dlogp = -A r I_trust (zero where a clip binds).
/// opts.objective selects another per-token rule (CISPO, SAPO) and the
/// sequence-level ratio (GSPO); see docs/objectives.md.
///
/// \param logp        [B, T] or [N] log-probabilities of the taken tokens
///                    under the current policy; any float dtype and strides.
/// \param old_logp    same shape: log-probabilities under the old policy
///                    (a constant; fp32 recommended).
/// \param advantages  [B, T], [B, 1], [B] (one per sequence) or 0-d.
/// \param mask        same shape as logp: bool, float weights (>= 0) or
///                    integer 0/1 (Note [Mask argument]); undefined tensor:
///                    every token counts.
/// \param opts        clip settings, reduction, normaliser, NaN check, backend.
/// \throws c10::Error naming the argument on bad input (see LossOptions for
///         the NaN/Inf check and its opt-out).
inline LossResult policy_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                              const at::Tensor& advantages, const at::Tensor& mask,
                              const LossOptions& opts = {}) {
  TORCH_CHECK(advantages.defined(),
              "psft::policy_loss: advantages is an undefined tensor (use psft_loss for A = 1)");
  return detail::clipped_loss("psft::policy_loss", logp, old_logp, advantages, mask, opts);
}

/// The PSFT objective: policy_loss with advantage 1 on every token,
/// l_t = -min(r_t, 1 + eps_high). Defaults are the PSFT recipe's
/// (eps_low 0.2, eps_high 0.28, token-mean).
inline LossResult psft_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                            const at::Tensor& mask, const LossOptions& opts = {}) {
  return detail::clipped_loss("psft::psft_loss", logp, old_logp, at::Tensor(), mask, opts);
}

/// The trust-region indicator I_trust per token (bool, logp's shape): true
/// where the token's gradient flows, false where a clip binds or the
/// log-ratio is clamped. advantages may be undefined (A = 1, PSFT). Composed
/// from ATen ops; a diagnostic, not on the loss's hot path.
inline at::Tensor trust_region_mask(const at::Tensor& logp, const at::Tensor& old_logp,
                                    const at::Tensor& advantages = at::Tensor(),
                                    const ClipOptions& clip = {}) {
  const char* api = "psft::trust_region_mask";
  LossOptions opts;
  opts.clip = clip;
  const detail::ClippedLossInputs in =
      detail::check_clipped_loss_inputs(api, logp, old_logp, advantages, at::Tensor(), opts);
  at::NoGradGuard no_grad;
  return composed::token_terms(in, opts)
      .rule.trusted.expand({in.rows, in.cols})
      .reshape(logp.sizes());
}

PSFT_NAMESPACE_END
