#pragma once
/// \file
/// What an objective rule reads and returns for one token (or a packet of
/// tokens, or whole tensors), and the parameters every rule shares. The
/// rules themselves live one per file in core/objectives/; core/objective.hpp
/// lists them.
///
/// Note [Objective rules]
/// A variant of the policy objective (the clipped surrogate, CISPO, SAPO,
/// the KL penalty, ...) is one struct with one function,
///
/// \code
///   template <class Lanes>
///   static TokenTerms<Lanes> terms(const Lanes& o, const TokenInput<Lanes>& t,
///                                  const ObjectiveParams<typename Lanes::Scalar>& p);
/// \endcode
///
/// written once with the arithmetic operators and the lane operations of
/// Lanes (select, min, max, abs, exp, both, either, negate, splat, none).
/// Every backend is generic over it: the CPU kernel runs it on Eigen packets
/// (cpu/packet_lanes.hpp) and on scalars, the CUDA kernels and the Eigen API
/// on scalars (core/lanes.hpp), the composed backend on whole tensors
/// (composed/tensor_lanes.hpp). A rule must therefore be branch-free in its
/// per-token values: a decision on a token's value is a select, while a
/// decision on a parameter (p) may be an `if`. The backends compute the
/// inputs (the log-ratio, its clamp, the ratio), apply the mask weight, the
/// reduction and the normaliser, and sum the metrics from the flags the rule
/// returns; a rule never sees them. docs/objectives.md shows how to add one.

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// One token's inputs, as every backend computes them.
template <class Lanes>
struct TokenInput {
  using Value = typename Lanes::Value;  ///< Lanes' value type
  using Mask = typename Lanes::Mask;    ///< Lanes' mask type
  Value log_ratio;  ///< logp - old_logp (old_logp: ref_logp for the KL penalty), unclamped
  Value clamped;    ///< clamp(log_ratio, -B, B), B = log_ratio_clamp
  Value ratio;      ///< r = exp(clamped)
  Mask in_range;    ///< -B < log_ratio < B: the clamp passes gradient
  Value advantage;  ///< A (1 for PSFT and the KL penalty)
  Value logp;       ///< the current log-probability (CISPO's loss is linear in it)
};

/// What a rule returns for a token.
template <class Lanes>
struct TokenTerms {
  using Value = typename Lanes::Value;  ///< Lanes' value type
  using Mask = typename Lanes::Mask;    ///< Lanes' mask type
  /// Per-token loss l (before the mask weight and the reduction).
  Value loss;
  /// d l / d logp (before the mask weight and the reduction's scale).
  Value grad;
  /// verl pg_clipfrac: the rule's clip binds.
  Mask clipped;
  /// verl pg_clipfrac_lower: the dual clip binds.
  Mask clipped_dual;
  /// TRL clip_ratio/high: r > 1 + eps_high with A > 0.
  Mask clipped_high;
  /// TRL clip_ratio/low: r < 1 - eps_low with A < 0.
  Mask clipped_low;
  /// The token's gradient flows: no clip or clamp zeroes it.
  Mask trusted;
};

/// Which rule a loss call runs (core/objective.hpp maps it to its struct).
enum class RuleId {
  Clipped,        ///< objectives/clipped.hpp
  CispoRelative,  ///< objectives/cispo.hpp (verl)
  CispoCapped,    ///< objectives/cispo.hpp (TRL, Liger)
  Sapo,           ///< objectives/sapo.hpp
  KlPenalty,      ///< objectives/kl_penalty.hpp
};

/// KL estimators of the KL penalty (objectives/kl_penalty.hpp), with x =
/// logp - ref_logp. The numbering is part of the CUDA entry points' ABI.
enum class KlEstimatorId : int {
  K1 = 0,                  ///< x
  Abs = 1,                 ///< |x|
  K2 = 2,                  ///< x^2 / 2
  K3 = 3,                  ///< verl low_var_kl: clamp(e^-x' + x' - 1, 10), x' = clamp(x, 20)
  K3Unclamped = 4,         ///< TRL's beta term: e^-x + x - 1
  K1StraightThrough = 5,   ///< value of k1, gradient of k2 (verl "k1+")
  AbsStraightThrough = 6,  ///< value of abs, gradient of k2 (verl "abs+")
  K3StraightThrough = 7,   ///< value of k3, gradient of k2 (verl "k3+")
};

/// Parameters of every rule in the accumulation type of a kernel; each rule
/// reads the ones it needs.
template <class T>
struct ObjectiveParams {
  T eps_low;                 ///< lower clip: r >= 1 - eps_low
  T eps_high;                ///< upper clip: r <= 1 + eps_high
  T dual_clip;               ///< dual clip c for A < 0; <= 0: none
  T log_ratio_clamp;         ///< |logp - old_logp| is clamped to this before exp
  T delta = T(0);            ///< TRL's delta: L1 uses min(r, delta); <= 0: none
  T cispo_cap = T(5);        ///< CispoCapped: the weight is min(r, cispo_cap)
  T sapo_tau_pos = T(1);     ///< SAPO temperature for A > 0
  T sapo_tau_neg = T(1.05);  ///< SAPO temperature for A <= 0
  int kl_estimator = 3;      ///< KlEstimatorId of the KL penalty
};

/// The historical name of ObjectiveParams (the clipped rule's settings).
template <class T>
using ClipParams = ObjectiveParams<T>;

}  // namespace core
PSFT_NAMESPACE_END
