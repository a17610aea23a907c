#pragma once
/// \file
/// The clipped policy objective for one token: the one place its formula
/// lives. CPU kernels, CUDA kernels and the Eigen API all call these
/// functions. Torch-free, Eigen-free, usable on host and device.
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

PSFT_NAMESPACE_BEGIN
namespace core {

/// Clip settings in the accumulation type of a kernel. dual_clip <= 0 means
/// no dual clip.
template <class T>
struct ClipParams {
  T eps_low;          ///< lower clip: r >= 1 - eps_low
  T eps_high;         ///< upper clip: r <= 1 + eps_high
  T dual_clip;        ///< dual clip c for A < 0; <= 0: none
  T log_ratio_clamp;  ///< |logp - old_logp| is clamped to this before exp
  T delta = T(0);     ///< TRL's delta: L1 uses min(r, delta); <= 0: none
};

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

/// Everything the kernels need to know about one token.
template <class T>
struct TokenObjective {
  /// Per-token loss l (before masking and aggregation).
  T loss;
  /// dl/dlogp = -A r I_trust (before mask weight and normaliser); half of it
  /// at the exact ties of Note [Gradient at the bounds].
  T grad;
  /// verl pg_clipfrac: the PPO clip binds (L2 > L1), either side.
  bool clipped;
  /// verl pg_clipfrac_lower: the dual clip binds (A < 0 and l > -A c).
  bool clipped_dual;
  /// TRL high clip: r > 1 + eps_high with A > 0.
  bool clipped_high;
  /// TRL low clip: r < 1 - eps_low with A < 0.
  bool clipped_low;
  /// Trust-region indicator: the token's gradient flows (no clip binds, the
  /// log-ratio is not clamped, r < delta on the unclipped branch).
  bool trusted;
};

/// Objective of one token given its ratio r = exp(d) of the clamped
/// log-ratio d (computed by the caller, possibly vectorised) and whether the
/// clamp lets gradient through (log_ratio_in_range).
template <class T>
PSFT_HOST_DEVICE inline TokenObjective<T> clipped_objective_from_ratio(T ratio, bool in_range,
                                                                       T advantage,
                                                                       const ClipParams<T>& p) {
  const T one = T(1);
  const T lower = one - p.eps_low;
  const T upper = one + p.eps_high;
  const bool has_delta = p.delta > T(0);
  const T clipped_ratio = ratio < lower ? lower : (ratio > upper ? upper : ratio);
  const T bounded_ratio = has_delta && ratio > p.delta ? p.delta : ratio;
  const T loss_unclipped = -advantage * bounded_ratio;
  const T loss_clipped = -advantage * clipped_ratio;
  // d l / d r in units of -A (Note [Gradient at the bounds]).
  const T unclipped_slope = has_delta && !(ratio < p.delta) ? T(0) : one;
  const T clip_slope = ratio > lower && ratio < upper ? one : T(0);
  TokenObjective<T> out;
  out.clipped = loss_clipped > loss_unclipped;
  out.loss = out.clipped ? loss_clipped : loss_unclipped;
  T slope = out.clipped ? clip_slope
                        : (loss_clipped == loss_unclipped ? (unclipped_slope + clip_slope) / T(2)
                                                          : unclipped_slope);
  out.clipped_dual = false;
  if (advantage < T(0) && p.dual_clip > T(0)) {
    const T loss_cap = -advantage * p.dual_clip;
    out.clipped_dual = out.loss > loss_cap;
    if (out.clipped_dual) {
      out.loss = loss_cap;
      slope = T(0);
    } else if (out.loss == loss_cap) {
      slope = slope / T(2);
    }
  }
  out.clipped_high = advantage > T(0) && ratio > upper;
  out.clipped_low = advantage < T(0) && ratio < lower;
  out.trusted = in_range && slope > T(0);
  out.grad = out.trusted ? -advantage * ratio * slope : T(0);
  return out;
}

/// Objective of one token from its log-probabilities.
template <class T>
PSFT_HOST_DEVICE inline TokenObjective<T> clipped_objective(T logp, T old_logp, T advantage,
                                                            const ClipParams<T>& p) {
  using std::exp;
  const T log_ratio = logp - old_logp;
  const T ratio = exp(clamp_log_ratio(log_ratio, p.log_ratio_clamp));
  return clipped_objective_from_ratio(ratio, log_ratio_in_range(log_ratio, p.log_ratio_clamp),
                                      advantage, p);
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
