#pragma once
/// \file
/// SAPO (arXiv 2511.20347): a smooth gate in place of the hard clip,
///
///   l = -(4 / tau) sigmoid(tau (r - 1)) A,   tau = tau_pos (A > 0), tau_neg (A <= 0)
///   dl/dlogp = -4 sigmoid (1 - sigmoid) r A   (0 where the log-ratio is clamped)
///
/// as verl's `sapo` and TRL's `loss_type="sapo"` define it (tau_pos 1.0,
/// tau_neg 1.05). No clip binds, so `clipped` is false, as both peers report.

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// The SAPO gate (Note [Objective rules]).
struct SapoRule {
  /// The terms of one token, packet or tensor (Note [Objective rules]).
  template <class Lanes>
  PSFT_HOST_DEVICE static TokenTerms<Lanes> terms(
      const Lanes& o, const TokenInput<Lanes>& t,
      const ObjectiveParams<typename Lanes::Scalar>& p) {
    using S = typename Lanes::Scalar;
    using V = typename Lanes::Value;
    const V zero = o.splat(S(0)), one = o.splat(S(1));
    const V lower = o.splat(S(1) - p.eps_low), upper = o.splat(S(1) + p.eps_high);
    const V& a = t.advantage;
    const V tau = o.select(zero < a, o.splat(p.sapo_tau_pos), o.splat(p.sapo_tau_neg));
    const V gate = one / (one + o.exp(-(tau * (t.ratio - one))));  // sigmoid(tau (r - 1))
    TokenTerms<Lanes> out;
    out.loss = -(gate * (o.splat(S(4)) / tau)) * a;
    out.grad = o.select(t.in_range, -(o.splat(S(4)) * gate * (one - gate) * t.ratio) * a, zero);
    out.clipped = o.none();
    out.clipped_dual = o.none();
    out.clipped_high = o.both(zero < a, upper < t.ratio);
    out.clipped_low = o.both(a < zero, t.ratio < lower);
    out.trusted = t.in_range;
    return out;
  }
};

}  // namespace core
PSFT_NAMESPACE_END
