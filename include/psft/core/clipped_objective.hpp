#pragma once
/// \file
/// The clipped policy objective for one token, on scalars: the log-ratio
/// clamp every rule's inputs go through, and the scalar entry points of
/// objectives/clipped.hpp (where the formula lives), for the CUDA kernels,
/// the Eigen API and the tests. Torch-free, Eigen-free, host and device.
///
///   d    = clamp(logp - old_logp, -B, B)          B = log_ratio_clamp
///   r    = exp(d)
///   L1   = -A min(r, delta),  L2 = -A clip(r, 1 - eps_low, 1 + eps_high)
///   l    = max(L1, L2);  for A < 0 with dual clip c: l = min(l, -A c)
///   dl/dlogp = -A r I_trust,  I_trust = 1 unless a clip binds or |logp-old| >= B
///
/// (delta, TRL's two-sided clip, is optional.) The gradient is the one
/// torch autograd gives the same composed expression (Note [Gradient at the
/// bounds]).

#include <cmath>

#include "psft/core/config.hpp"
#include "psft/core/lanes.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/core/objectives/clipped.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

// Note [Gradient at the bounds]
// torch.clamp's backward passes gradient only strictly inside its interval
// since torch 2.14 (at a bound it is 0), and torch.maximum / minimum send
// half the gradient to each argument at a tie. psft's gradient is the one
// torch gives verl's and TRL's composed expressions on current torch:
//   - |logp - old_logp| == B exactly: no gradient (the clamp is at its bound);
//   - r == 1 - eps_low or 1 + eps_high exactly: L1 == L2 and the clip is at
//     its bound, so half the gradient (only L1's half flows);
//   - r >= delta: the L1 branch has no gradient;
//   - l == -A c exactly (dual clip): half the gradient.
// Anywhere else the gradient is -A r or 0, as before. Torch before 2.14
// passed gradient at a clamp's bounds; these measure-zero cases are the only
// difference.

// Note [Why the log-ratio clamp]
// exp(logp - old_logp) overflows float for log-ratios above ~88, and a single
// overflowing token turns the loss into inf and the gradient into NaN. verl and
// OpenRLHF clamp the log-ratio to [-20, 20]; we do the same so that numbers
// match theirs. Like torch.clamp's backward, no gradient flows through a
// clamped log-ratio.

/// Clamps the log-ratio logp - old_logp to [-bound, bound].
template <class T>
PSFT_HOST_DEVICE inline T clamp_log_ratio(T log_ratio, T bound) {
  return log_ratio < -bound ? -bound : (log_ratio > bound ? bound : log_ratio);
}

/// True where the clamp passes gradient: |log_ratio| < bound, strictly, as
/// torch.clamp's backward (Note [Gradient at the bounds]).
template <class T>
PSFT_HOST_DEVICE inline bool log_ratio_in_range(T log_ratio, T bound) {
  return log_ratio > -bound && log_ratio < bound;
}

/// Probability ratio r = exp(clamp(logp - old_logp)).
template <class T>
PSFT_HOST_DEVICE inline T probability_ratio(T logp, T old_logp, T bound) {
  using std::exp;
  return exp(clamp_log_ratio(logp - old_logp, bound));
}

/// Everything the kernels need to know about one token of the clipped
/// objective (objectives/clipped.hpp).
template <class T>
using TokenObjective = TokenTerms<ScalarLanes<T>>;

/// The inputs of a rule for one token: the log-ratio, its clamp, the ratio
/// r = exp(clamped) (computed by the caller, possibly faster than
/// std::exp) and whether the clamp lets gradient through
/// (log_ratio_in_range).
template <class T>
PSFT_HOST_DEVICE inline TokenInput<ScalarLanes<T>> token_input(T logp, T log_ratio, T clamped,
                                                               T ratio, bool in_range,
                                                               T advantage) {
  TokenInput<ScalarLanes<T>> in;
  in.log_ratio = log_ratio;
  in.clamped = clamped;
  in.ratio = ratio;
  in.in_range = in_range;
  in.advantage = advantage;
  in.logp = logp;
  return in;
}

/// The clipped objective of one token given its ratio r = exp(d) of the
/// clamped log-ratio d and whether the clamp lets gradient through.
template <class T>
PSFT_HOST_DEVICE inline TokenObjective<T> clipped_objective_from_ratio(T ratio, bool in_range,
                                                                       T advantage,
                                                                       const ClipParams<T>& p) {
  TokenInput<ScalarLanes<T>> in{};
  in.ratio = ratio;
  in.in_range = in_range;
  in.advantage = advantage;
  return ClippedRule::terms(ScalarLanes<T>(), in, p);
}

/// Rule's terms of one token from its log-probabilities (Note [Objective
/// rules]), the ratio from exp of the clamped log-ratio.
template <class Rule, class T>
PSFT_HOST_DEVICE inline TokenObjective<T> rule_terms(T logp, T old_logp, T advantage,
                                                     const ObjectiveParams<T>& p) {
  using std::exp;
  const T log_ratio = logp - old_logp;
  const T clamped = clamp_log_ratio(log_ratio, p.log_ratio_clamp);
  return Rule::terms(ScalarLanes<T>(),
                     token_input(logp, log_ratio, clamped, T(exp(clamped)),
                                 log_ratio_in_range(log_ratio, p.log_ratio_clamp), advantage),
                     p);
}

/// Objective of one token from its log-probabilities.
template <class T>
PSFT_HOST_DEVICE inline TokenObjective<T> clipped_objective(T logp, T old_logp, T advantage,
                                                            const ClipParams<T>& p) {
  return rule_terms<ClippedRule>(logp, old_logp, advantage, p);
}

/// The trust-region indicator: 1 where the token's gradient flows, 0 where a
/// clip binds or the log-ratio is clamped.
template <class T>
PSFT_HOST_DEVICE inline bool in_trust_region(T logp, T old_logp, T advantage,
                                             const ClipParams<T>& p) {
  return clipped_objective(logp, old_logp, advantage, p).trusted;
}

/// Approximate KL(old || new) estimators from a clamped log-ratio d = logp -
/// old_logp, for tokens sampled from the old policy: k1 = -d, k3 = e^d - 1 - d
/// (Schulman's unbiased, non-negative estimator). This one is k1.
template <class T>
PSFT_HOST_DEVICE inline T approx_kl_k1(T clamped_log_ratio) {
  return -clamped_log_ratio;
}
/// The k3 estimator e^d - 1 - d, given d and the ratio r = e^d already computed.
template <class T>
PSFT_HOST_DEVICE inline T approx_kl_k3(T clamped_log_ratio, T ratio) {
  return ratio - T(1) - clamped_log_ratio;
}

}  // namespace core
PSFT_NAMESPACE_END
