#pragma once
/// \file
/// The composed backend of the clipped objective: the same math as
/// core/clipped_objective.hpp written with ATen ops, so it runs on any device
/// (CUDA without psft's CUDA translation unit, MPS, ...), with at most one
/// host-device synchronisation (the checks of LossOptions::check_finite).
///
/// The objective's rule runs on whole tensors (composed/tensor_lanes.hpp;
/// Note [Objective rules]).
///
/// Note [Composed path mirrors core]
/// This file restates the reductions of core/reduction.hpp as tensor
/// expressions. Any change there must be made here too; the tests run both
/// backends against the same independent reference, so a drift fails them.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>

#include "psft/composed/tensor_lanes.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective.hpp"
#include "psft/core/reduction.hpp"
#include "psft/detail/clipped_loss_types.hpp"

PSFT_NAMESPACE_BEGIN
namespace composed {

/// Per-token terms of the objective as [rows, cols] tensors.
struct TokenTerms {
  ///@{
  /// Inputs as used: mask weight, whether the token counts, its advantage.
  at::Tensor weight, valid, advantage;
  ///@}
  ///@{
  /// Clamped log-ratio and ratio r.
  at::Tensor clamped, ratio;
  ///@}
  /// The rule's terms: loss, gradient and flags (Note [Objective rules]).
  core::TokenTerms<TensorLanes> rule;
};

/// The rule of `in` on whole tensors, in the accumulation dtype.
inline TokenTerms token_terms(const detail::ClippedLossInputs& in, const LossOptions& opts) {
  const at::ScalarType acc = detail::accumulate_type(in.logp.scalar_type());
  // Work on [rows, cols] views in the accumulation dtype.
  const auto as_rows = [&](const at::Tensor& t) { return t.reshape({in.rows, in.cols}).to(acc); };
  const at::Tensor logp = as_rows(in.logp);
  TokenTerms t;
  t.weight = in.mask.defined() ? as_rows(in.mask) : at::ones({in.rows, in.cols}, logp.options());
  t.advantage = in.advantages.defined() ? as_rows(in.advantages) : at::ones_like(logp);
  t.valid = t.weight != 0;
  const at::Tensor log_ratio = logp - as_rows(in.old_logp);
  const double bound = opts.clip.log_ratio_clamp;
  t.clamped = log_ratio.clamp(-bound, bound);
  t.ratio = t.clamped.exp();
  const TensorLanes o{logp.options()};
  core::TokenInput<TensorLanes> x;
  x.log_ratio = log_ratio;
  x.clamped = t.clamped;
  x.ratio = t.ratio;
  // Strict bounds: Note [Gradient at the bounds].
  x.in_range = at::logical_and(log_ratio > -bound, log_ratio < bound);
  x.advantage = t.advantage;
  x.logp = logp;
  const core::ObjectiveParams<double> params = in.params<double>(opts);
  t.rule =
      core::visit_rule(in.rule, [&](auto rule) { return decltype(rule)::terms(o, x, params); });
  return t;
}

/// 1 / sum(row_tokens), or 0 without tokens (0-d float64).
inline at::Tensor inv_tokens(const at::Tensor& row_tokens) {
  const at::Tensor count = row_tokens.sum();
  return at::where(count > 0, count.reciprocal(), at::zeros_like(count));
}

/// Forward: loss, metrics and (when need_grad) the gradient coefficients.
inline detail::ClippedLossOutputs clipped_loss_forward(const detail::ClippedLossInputs& in,
                                                       const LossOptions& opts, bool need_grad) {
  const at::ScalarType acc = detail::accumulate_type(in.logp.scalar_type());
  const TokenTerms t = token_terms(in, opts);
  const at::Tensor& weight = t.weight;
  const at::Tensor& valid = t.valid;
  const at::Tensor& advantage = t.advantage;
  const at::Tensor& ratio = t.ratio;
  const at::Tensor& clamped = t.clamped;

  const at::Tensor zero = at::zeros({}, ratio.options());
  // Masked tokens contribute nothing, whatever their values (even NaN).
  const auto masked = [&](const at::Tensor& x) { return at::where(valid, x * weight, zero); };
  const at::Tensor row_tokens = at::where(valid, weight, zero).sum(1, false, at::kDouble);

  // The value checks and the normaliser's counts against the batch's own, in
  // one read to the host: free on the CPU, which therefore always checks the
  // normaliser; on an accelerator one synchronisation, under check_finite
  // (see LossOptions).
  const bool read_checks = opts.check_finite || in.logp.device().is_cpu();
  if (read_checks) {
    const auto bad_at_valid = [&](const at::Tensor& x) {
      return at::logical_and(valid, x.reshape({in.rows, in.cols}).isfinite().logical_not())
          .any()
          .to(at::kDouble);
    };
    const at::Tensor no = at::zeros({}, row_tokens.options());
    const at::Tensor checks = at::stack({
        opts.check_finite ? bad_at_valid(in.logp) : no,
        opts.check_finite ? bad_at_valid(in.old_logp) : no,
        opts.check_finite ? bad_at_valid(advantage) : no,
        opts.check_finite
            ? at::logical_or(weight.isfinite().logical_not(), weight < 0).any().to(at::kDouble)
            : no,
        row_tokens.sum(),
        (row_tokens > 0).sum().to(at::kDouble),
    });
    const at::Tensor host = checks.cpu();
    const double* c = host.data_ptr<double>();
    TORCH_CHECK(c[0] == 0, in.api,
                ": logp has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(c[1] == 0, in.api, ": ", in.old_name,
                " has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(c[2] == 0, in.api,
                ": advantages has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(c[3] == 0, in.api, ": mask has a negative, NaN or Inf weight");
    const std::string normaliser_error = core::normaliser_error(opts, c[4], c[5]);
    TORCH_CHECK(normaliser_error.empty(), in.api, ": ", normaliser_error);
  }

  const at::Tensor row_loss = masked(t.rule.loss).sum(1, false, at::kDouble);

  // Counts: local ones unless the normaliser supplies the step's global ones.
  at::Tensor tokens = row_tokens.sum();
  at::Tensor sequences = (row_tokens > 0).sum().to(at::kDouble);
  if (opts.normaliser && opts.normaliser->tokens)
    tokens = at::full({}, *opts.normaliser->tokens, tokens.options());
  if (opts.normaliser && opts.normaliser->sequences)
    sequences = at::full({}, *opts.normaliser->sequences, sequences.options());
  at::Tensor denominator;
  switch (opts.reduction) {
    case Reduction::TokenMean:
      denominator = tokens;
      break;
    case Reduction::SeqMeanTokenSum:
    case Reduction::SeqMeanTokenMean:
      denominator = sequences;
      break;
    case Reduction::SeqMeanTokenSumNorm:
      denominator = sequences * detail::norm_constant(opts, in.cols);
      break;
    case Reduction::TokenSum:
      denominator = at::ones({}, tokens.options());
      break;
    case Reduction::TokenSumNorm:
      denominator = at::full({}, detail::norm_constant(opts, in.cols), tokens.options());
      break;
  }
  const at::Tensor global =
      at::where(denominator > 0, denominator.reciprocal() * detail::world_size(opts),
                at::zeros_like(denominator));
  at::Tensor scale = global.reshape({1});
  if (opts.reduction == Reduction::SeqMeanTokenMean) {
    const at::Tensor row_factor =
        at::where(row_tokens > 0, row_tokens.reciprocal(), at::zeros_like(row_tokens));
    scale = row_factor * global;
  }

  detail::ClippedLossOutputs out;
  out.loss = (row_loss * scale).sum().to(acc);
  if (need_grad) {
    out.coef = masked(t.rule.grad).reshape(in.logp.sizes());
  }
  out.scale = scale;
  out.token_loss_mean = row_loss.sum() * inv_tokens(row_tokens);

  const at::Tensor count = row_tokens.sum();
  const at::Tensor any = count > 0;
  const at::Tensor inv = inv_tokens(row_tokens);
  const auto mean = [&](const at::Tensor& x) { return masked(x).sum(at::kDouble) * inv; };
  const auto fraction = [&](const at::Tensor& flag) { return mean(flag.to(acc)); };
  const at::Tensor one = at::ones({}, count.options());
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor ratio_d = ratio.to(at::kDouble);
  // min (sentinel +inf) or max (sentinel -inf) over unmasked tokens; the
  // sentinel is appended so that an empty batch reduces without error.
  const auto extremum = [&](double sentinel) {
    const at::Tensor fill = at::full({1}, sentinel, ratio_d.options());
    const at::Tensor values = at::cat({at::where(valid, ratio_d, fill).flatten(), fill});
    return sentinel > 0 ? values.min() : values.max();
  };
  out.metrics = at::stack({
      fraction(t.rule.clipped),
      fraction(t.rule.clipped_dual),
      fraction(t.rule.clipped_high),
      fraction(t.rule.clipped_low),
      mean(-clamped),
      mean(ratio - 1.0 - clamped),
      at::where(any, mean(ratio), one),
      at::where(any, extremum(inf), one),
      at::where(any, extremum(-inf), one),
      count,
  });
  return out;
}

/// Backward: d loss / d logp in logp's dtype, composed from ATen ops.
inline at::Tensor clipped_loss_backward(const at::Tensor& coef, const at::Tensor& scale,
                                        const at::Tensor& grad_output, at::ScalarType dtype) {
  const at::Tensor per_row = coef.dim() == 2 ? scale.reshape({-1, 1}) : scale;
  return (coef * (per_row * grad_output).to(coef.scalar_type())).to(dtype);
}

}  // namespace composed
PSFT_NAMESPACE_END
