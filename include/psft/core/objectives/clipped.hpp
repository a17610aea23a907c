#pragma once
/// \file
/// PPO's clipped surrogate (PSFT with A = 1), with verl's dual clip and
/// TRL's delta: the default objective.
///
///   L1 = -A min(r, delta),  L2 = -A clip(r, 1 - eps_low, 1 + eps_high)
///   l  = max(L1, L2);  for A < 0 with dual clip c: l = min(l, -A c)
///   dl/dlogp = -A r I_trust,  I_trust = 1 unless a clip binds or |logp-old| >= B
///
/// with half the gradient at the exact ties of Note [Gradient at the bounds]
/// (core/clipped_objective.hpp).

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// The clipped surrogate (Note [Objective rules]).
struct ClippedRule {
  /// The terms of one token, packet or tensor (Note [Objective rules]).
  template <class Lanes>
  PSFT_HOST_DEVICE static TokenTerms<Lanes> terms(
      const Lanes& o, const TokenInput<Lanes>& t,
      const ObjectiveParams<typename Lanes::Scalar>& p) {
    using S = typename Lanes::Scalar;
    using V = typename Lanes::Value;
    using M = typename Lanes::Mask;
    const V zero = o.splat(S(0)), one = o.splat(S(1)), half = o.splat(S(0.5));
    const V lower = o.splat(S(1) - p.eps_low), upper = o.splat(S(1) + p.eps_high);
    const V& r = t.ratio;
    const V& a = t.advantage;
    // d l / d r in units of -A (Note [Gradient at the bounds]); delta only
    // where it is set.
    V bounded_ratio = r, unclipped_slope = one;
    if (p.delta > S(0)) {
      const V delta = o.splat(p.delta);
      bounded_ratio = o.min(r, delta);
      unclipped_slope = o.select(r < delta, one, zero);
    }
    const V loss_unclipped = -(a * bounded_ratio);
    const V loss_clipped = -(a * o.min(o.max(r, lower), upper));
    const V clip_slope = o.select(o.both(lower < r, r < upper), one, zero);
    TokenTerms<Lanes> out;
    out.clipped = loss_unclipped < loss_clipped;
    const M tie = loss_clipped == loss_unclipped;
    // Where the clip binds, r is outside (1 - eps_low, 1 + eps_high), so the
    // clipped branch is constant there: no gradient.
    V slope = o.select(out.clipped, zero,
                       o.select(tie, (unclipped_slope + clip_slope) * half, unclipped_slope));
    out.loss = o.select(out.clipped, loss_clipped, loss_unclipped);
    out.clipped_dual = o.none();
    if (p.dual_clip > S(0)) {
      const V cap = -(a * o.splat(p.dual_clip));
      const M negative = a < zero;
      out.clipped_dual = o.both(negative, cap < out.loss);
      const M at_cap = o.both(negative, cap == out.loss);
      out.loss = o.select(out.clipped_dual, cap, out.loss);
      slope = o.select(out.clipped_dual, zero, o.select(at_cap, slope * half, slope));
    }
    out.clipped_high = o.both(zero < a, upper < r);
    out.clipped_low = o.both(a < zero, r < lower);
    out.trusted = o.both(t.in_range, zero < slope);
    out.grad = o.select(out.trusted, -(a * r) * slope, zero);
    return out;
  }
};

}  // namespace core
PSFT_NAMESPACE_END
