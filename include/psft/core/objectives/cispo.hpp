#pragma once
/// \file
/// CISPO (MiniMax-M1, arXiv 2506.13585): the policy gradient weighted by a
/// clipped, stop-gradient importance ratio, so that no token loses its
/// gradient:
///
///   l = -sg(w) A logp,  dl/dlogp = -w A
///
/// The peers clip w differently, so there are two rules:
///   CispoRelativeRule (verl): w = clip(r, 1 - eps_low, 1 + eps_high),
///     clipped where w != r;
///   CispoCappedRule (TRL, Liger): w = min(r, cispo_cap) (TRL's
///     epsilon_high, 5 recommended), clipped where r > cispo_cap and A > 0
///     (TRL's cispo_clip_ratio).

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// The terms of -sg(w) A logp, given the weight w and the clip flag.
template <class Lanes>
PSFT_HOST_DEVICE inline TokenTerms<Lanes> cispo_terms(
    const Lanes& o, const TokenInput<Lanes>& t, const typename Lanes::Value& weight,
    const typename Lanes::Mask& clipped, const ObjectiveParams<typename Lanes::Scalar>& p) {
  using S = typename Lanes::Scalar;
  using V = typename Lanes::Value;
  const V zero = o.splat(S(0));
  const V lower = o.splat(S(1) - p.eps_low), upper = o.splat(S(1) + p.eps_high);
  const V scaled = -weight * t.advantage;  // -sg(w) A, verl's and TRL's order
  TokenTerms<Lanes> out;
  out.loss = scaled * t.logp;
  out.grad = scaled;
  out.clipped = clipped;
  out.clipped_dual = o.none();
  out.clipped_high = o.both(zero < t.advantage, upper < t.ratio);
  out.clipped_low = o.both(t.advantage < zero, t.ratio < lower);
  out.trusted = o.negate(o.none());  // the gradient always flows
  return out;
}

/// verl's cispo: w = clip(r, 1 - eps_low, 1 + eps_high).
struct CispoRelativeRule {
  /// The terms of one token, packet or tensor (Note [Objective rules]).
  template <class Lanes>
  PSFT_HOST_DEVICE static TokenTerms<Lanes> terms(
      const Lanes& o, const TokenInput<Lanes>& t,
      const ObjectiveParams<typename Lanes::Scalar>& p) {
    using S = typename Lanes::Scalar;
    using V = typename Lanes::Value;
    const V lower = o.splat(S(1) - p.eps_low), upper = o.splat(S(1) + p.eps_high);
    const V weight = o.min(o.max(t.ratio, lower), upper);
    return cispo_terms(o, t, weight, o.either(t.ratio < lower, upper < t.ratio), p);
  }
};

/// TRL's and Liger's cispo: w = min(r, cispo_cap).
struct CispoCappedRule {
  /// The terms of one token, packet or tensor (Note [Objective rules]).
  template <class Lanes>
  PSFT_HOST_DEVICE static TokenTerms<Lanes> terms(
      const Lanes& o, const TokenInput<Lanes>& t,
      const ObjectiveParams<typename Lanes::Scalar>& p) {
    using S = typename Lanes::Scalar;
    using V = typename Lanes::Value;
    const V cap = o.splat(p.cispo_cap);
    const V weight = o.min(t.ratio, cap);
    return cispo_terms(o, t, weight, o.both(o.splat(S(0)) < t.advantage, cap < t.ratio), p);
  }
};

}  // namespace core
PSFT_NAMESPACE_END
