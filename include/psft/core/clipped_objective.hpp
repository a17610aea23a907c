#pragma once
/// \file
/// The clipped policy objective for one token: the one place its formula
/// lives. CPU kernels, CUDA kernels and the Eigen API all call these
/// functions. Torch-free, Eigen-free, usable on host and device.
///
///   d    = clamp(logp - old_logp, -B, B)          B = log_ratio_clamp
///   r    = exp(d)
///   L1   = -A r,  L2 = -A clip(r, 1 - eps_low, 1 + eps_high)
///   l    = max(L1, L2);  for A < 0 with dual clip c: l = min(l, -A c)
///   dl/dlogp = -A r I_trust,  I_trust = 1 unless a clip binds or |logp-old| > B

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
};

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

/// True where the clamp passes gradient (|log_ratio| <= bound, as torch.clamp).
template <class T>
PSFT_HOST_DEVICE inline bool log_ratio_in_range(T log_ratio, T bound) {
  return log_ratio >= -bound && log_ratio <= bound;
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
  /// dl/dlogp = -A r I_trust (before mask weight and normaliser).
  T grad;
  /// verl pg_clipfrac: the PPO clip binds (L2 > L1), either side.
  bool clipped;
  /// verl pg_clipfrac_lower: the dual clip binds (A < 0 and l > -A c).
  bool clipped_dual;
  /// TRL high clip: r > 1 + eps_high with A > 0.
  bool clipped_high;
  /// TRL low clip: r < 1 - eps_low with A < 0.
  bool clipped_low;
  /// Trust-region indicator: no clip binds and the log-ratio is not clamped.
  bool trusted;
};

/// Objective of one token given its clamped log-ratio d, its ratio r =
/// exp(d) (computed by the caller, possibly vectorised) and whether the
/// clamp let gradient through.
template <class T>
PSFT_HOST_DEVICE inline TokenObjective<T> clipped_objective_from_ratio(T ratio, bool in_range,
                                                                       T advantage,
                                                                       const ClipParams<T>& p) {
  const T one = T(1);
  const T lower = one - p.eps_low;
  const T upper = one + p.eps_high;
  const T clipped_ratio = ratio < lower ? lower : (ratio > upper ? upper : ratio);
  const T loss_unclipped = -advantage * ratio;
  const T loss_clipped = -advantage * clipped_ratio;
  TokenObjective<T> out;
  out.clipped = loss_clipped > loss_unclipped;
  out.loss = out.clipped ? loss_clipped : loss_unclipped;
  out.clipped_dual = false;
  if (advantage < T(0) && p.dual_clip > T(0)) {
    const T loss_cap = -advantage * p.dual_clip;
    out.clipped_dual = out.loss > loss_cap;
    if (out.clipped_dual) out.loss = loss_cap;
  }
  out.clipped_high = advantage > T(0) && ratio > upper;
  out.clipped_low = advantage < T(0) && ratio < lower;
  // Where a clip binds the loss is a constant in logp (ties with L1 == L2
  // keep the full gradient, as torch.maximum's half + half does).
  out.trusted = in_range && !out.clipped && !out.clipped_dual;
  out.grad = out.trusted ? -advantage * ratio : T(0);
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
