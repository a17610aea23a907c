#pragma once
/// \file
/// The KL penalty to a reference policy, per token, with x = logp - ref_logp
/// (the backends pass ref_logp where the other rules read old_logp):
///
///   K1   x                      grad 1
///   Abs  |x|                    grad sign(x)
///   K2   x^2 / 2                grad x
///   K3   min(e^-x' + x' - 1, 10), x' = clamp(x, -20, 20)   (verl low_var_kl)
///                               grad (1 - e^-x') where neither clamp binds
///   K3Unclamped  e^-x + x - 1   grad 1 - e^-x   (TRL's beta term)
///   *StraightThrough  the value of K1 / Abs / K3, the gradient of K2 (verl
///                     "k1+", "abs+", "k3+")
///
/// The clamp bound of K3 is ObjectiveParams::log_ratio_clamp (20 by default,
/// verl's). The gradient at a clamp's bound is 0, as torch.clamp's (Note
/// [Gradient at the bounds]).

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// The KL penalty (Note [Objective rules]).
struct KlPenaltyRule {
  /// The terms of one token, packet or tensor (Note [Objective rules]).
  template <class Lanes>
  PSFT_HOST_DEVICE static TokenTerms<Lanes> terms(
      const Lanes& o, const TokenInput<Lanes>& t,
      const ObjectiveParams<typename Lanes::Scalar>& p) {
    using S = typename Lanes::Scalar;
    using V = typename Lanes::Value;
    const V zero = o.splat(S(0)), one = o.splat(S(1)), ten = o.splat(S(10));
    const V& x = t.log_ratio;
    const auto estimator = static_cast<KlEstimatorId>(p.kl_estimator);
    TokenTerms<Lanes> out;
    switch (estimator) {
      case KlEstimatorId::K1:
      case KlEstimatorId::K1StraightThrough:
        out.loss = x;
        out.grad = one;
        break;
      case KlEstimatorId::Abs:
      case KlEstimatorId::AbsStraightThrough:
        out.loss = o.abs(x);
        out.grad = o.select(zero < x, one, o.select(x < zero, -one, zero));
        break;
      case KlEstimatorId::K2:
        out.loss = x * x * o.splat(S(0.5));
        out.grad = x;
        break;
      case KlEstimatorId::K3:
      case KlEstimatorId::K3StraightThrough: {
        const V reverse = -t.clamped;  // clamp(ref - logp), verl's kl
        const V k3 = o.exp(reverse) - reverse - one;
        out.loss = o.min(k3, ten);
        out.grad = o.select(o.both(t.in_range, k3 < ten), one - o.exp(reverse), zero);
        break;
      }
      case KlEstimatorId::K3Unclamped: {
        const V e = o.exp(-x);
        out.loss = e + x - one;
        out.grad = one - e;
        break;
      }
    }
    if (estimator == KlEstimatorId::K1StraightThrough ||
        estimator == KlEstimatorId::AbsStraightThrough ||
        estimator == KlEstimatorId::K3StraightThrough) {
      out.grad = x;
    }
    out.clipped = o.none();
    out.clipped_dual = o.none();
    out.clipped_high = o.none();
    out.clipped_low = o.none();
    out.trusted = o.negate(o.none());
    return out;
  }
};

}  // namespace core
PSFT_NAMESPACE_END
