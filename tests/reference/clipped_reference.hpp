#pragma once
// Independent double-precision reference of the clipped policy objective, for
// tests only. It restates the semantics of verl (and TRL for the high / low
// clip fractions) with plain loops over std::vector<double>; it shares no code
// with include/psft and must not include any psft header.
//
// Per token, with d = logp - old_logp and B = log_ratio_clamp:
//   r  = exp(clamp(d, -B, B))
//   L1 = -A min(r, delta) (TRL's delta; without it -A r)
//   L2 = -A clip(r, 1 - eps_low, 1 + eps_high),  L = max(L1, L2)
//   A < 0 with dual clip c:  L = min(L, -A c)
// The gradient d L / d logp follows torch autograd's rules (torch >= 2.14)
// for that composed expression: clamp passes the gradient iff its input lies
// strictly inside its interval (0 at a bound); maximum / minimum send it to
// the larger / smaller argument and half to each at a tie.

#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

namespace reference {

/// verl's loss_agg_mode values.
/// verl 0.9.1's loss_agg_mode values (SeqMeanTokenSumNorm: sum / S / C * D),
/// and TokenSumNorm (sum / C * D: older verl's seq-mean-token-sum-norm, TRL
/// dr_grpo).
enum class Aggregation {
  TokenMean,
  SeqMeanTokenSum,
  SeqMeanTokenMean,
  SeqMeanTokenSumNorm,
  TokenSum,
  TokenSumNorm
};

struct Settings {
  double eps_low = 0.2;
  double eps_high = 0.28;
  std::optional<double> dual_clip;  ///< verl clip_ratio_c; unset: none
  double log_ratio_clamp = 20.0;
  std::optional<double> delta;  ///< TRL's delta; unset: none
  Aggregation aggregation = Aggregation::TokenMean;
  bool count_empty_rows = false;           ///< local S counts every row (TRL grpo)
  std::optional<double> global_tokens;     ///< N override
  std::optional<double> global_sequences;  ///< S override
  std::optional<double> norm_constant;     ///< C override (default: padded length)
  double world_size = 1.0;                 ///< D
};

/// One token, before masking and aggregation.
struct Token {
  double clamped_log_ratio = 0;
  double ratio = 0;
  double loss = 0;
  double grad = 0;         ///< d loss / d logp by autograd's rules
  bool ppo_clip = false;   ///< verl pg_clipfrac: L2 > L1
  bool dual_clip = false;  ///< verl pg_clipfrac_lower: A < 0 and max(L1, L2) > -A c
  bool high_clip = false;  ///< TRL: r > 1 + eps_high and A > 0
  bool low_clip = false;   ///< TRL: r < 1 - eps_low and A < 0
  bool trusted = false;    ///< no clip binds and the clamp passes gradient
};

/// One token of the clipped objective from its log-ratio d = logp - old_logp.
inline Token evaluate_token_from_log_ratio(double d, double advantage, const Settings& s) {
  Token t;
  const double bound = s.log_ratio_clamp;
  double dc = d;
  if (dc < -bound) dc = -bound;
  if (dc > bound) dc = bound;
  const bool clamp_passes = d > -bound && d < bound;
  const double r = std::exp(dc);
  const double lo = 1.0 - s.eps_low;
  const double hi = 1.0 + s.eps_high;
  double rc = r;
  if (rc < lo) rc = lo;
  if (rc > hi) rc = hi;
  const bool clip_passes = r > lo && r < hi;
  double r1 = r;
  bool r1_passes = true;
  if (s.delta) {
    r1 = r < *s.delta ? r : *s.delta;
    r1_passes = r < *s.delta;
  }
  const double l1 = -advantage * r1;
  const double l2 = -advantage * rc;
  double loss = l1 > l2 ? l1 : l2;
  // Autograd of maximum(l1, l2) with respect to r.
  const double w1 = l1 > l2 ? 1.0 : (l1 == l2 ? 0.5 : 0.0);
  const double w2 = l2 > l1 ? 1.0 : (l1 == l2 ? 0.5 : 0.0);
  // d loss / d r = -A * slope; the slope also says whether gradient flows
  // (the trust-region indicator), advantage 0 included.
  double slope = w1 * (r1_passes ? 1.0 : 0.0) + w2 * (clip_passes ? 1.0 : 0.0);
  bool dual = false;
  if (s.dual_clip && advantage < 0) {
    const double cap = -advantage * *s.dual_clip;
    dual = loss > cap;
    const double keep = loss < cap ? 1.0 : (loss == cap ? 0.5 : 0.0);  // minimum(loss, cap)
    loss = loss < cap ? loss : cap;
    slope *= keep;
  }
  t.clamped_log_ratio = dc;
  t.ratio = r;
  t.loss = loss;
  t.grad = -advantage * slope * r * (clamp_passes ? 1.0 : 0.0);  // dr/ddc = r, ddc/dd = pass
  t.ppo_clip = l2 > l1;
  t.dual_clip = dual;
  t.high_clip = r > hi && advantage > 0;
  t.low_clip = r < lo && advantage < 0;
  t.trusted = clamp_passes && slope > 0.0;
  return t;
}

inline Token evaluate_token(double logp, double old_logp, double advantage, const Settings& s) {
  return evaluate_token_from_log_ratio(logp - old_logp, advantage, s);
}

struct Metrics {
  double clip_frac = 0, clip_frac_dual = 0, clip_frac_high = 0, clip_frac_low = 0;
  double approx_kl_k1 = 0, approx_kl_k3 = 0;
  double ratio_mean = 1, ratio_min = 1, ratio_max = 1;
  double token_count = 0;
};

struct Result {
  double loss = 0;
  /// Sum of |each token's contribution to loss|: the scale of its rounding error.
  double loss_magnitude = 0;
  std::vector<double> grad;   ///< d loss / d logp, row-major [rows, cols]
  std::vector<char> trusted;  ///< per token (regardless of the mask)
  Metrics metrics;
};

/// The aggregated loss of a [rows, cols] batch (row-major vectors; mask
/// holds token weights, 0 = ignored: a masked token's values are used only
/// for Result::trusted) with token k's terms from token(k), so that the
/// other objectives (objectives_reference.hpp) share the aggregation.
template <class TokenAt>
Result aggregate(std::size_t rows, std::size_t cols, const std::vector<double>& mask,
                 const Settings& s, const TokenAt& token) {
  const std::size_t n = rows * cols;
  if (mask.size() != n) throw std::logic_error("reference::aggregate: mask size != rows * cols");
  Result out;
  out.grad.assign(n, 0.0);
  out.trusted.assign(n, 0);
  std::vector<Token> tokens(n);
  std::vector<double> row_sum(rows, 0.0), row_abs(rows, 0.0), row_weight(rows, 0.0);

  double weight = 0, clipped = 0, dual = 0, high = 0, low = 0, k1 = 0, k3 = 0, ratio = 0;
  double ratio_min = std::numeric_limits<double>::infinity();
  double ratio_max = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < cols; ++j) {
      const std::size_t k = i * cols + j;
      const double w = mask[k];
      if (w == 0) continue;
      const Token t = token(k);
      tokens[k] = t;
      out.trusted[k] = t.trusted;
      row_sum[i] += w * t.loss;
      row_abs[i] += std::fabs(w * t.loss);
      row_weight[i] += w;
      weight += w;
      clipped += t.ppo_clip ? w : 0.0;
      dual += t.dual_clip ? w : 0.0;
      high += t.high_clip ? w : 0.0;
      low += t.low_clip ? w : 0.0;
      k1 += w * (-t.clamped_log_ratio);
      k3 += w * (t.ratio - 1.0 - t.clamped_log_ratio);
      ratio += w * t.ratio;
      if (t.ratio < ratio_min) ratio_min = t.ratio;
      if (t.ratio > ratio_max) ratio_max = t.ratio;
    }
  }
  // The indicator is defined for masked tokens too (trust_region_mask has no mask).
  for (std::size_t k = 0; k < n; ++k) {
    if (mask[k] == 0) out.trusted[k] = token(k).trusted;
  }

  double local_sequences = 0;
  for (std::size_t i = 0; i < rows; ++i)
    local_sequences += s.count_empty_rows || row_weight[i] > 0 ? 1.0 : 0.0;
  const double tokens_count = s.global_tokens ? *s.global_tokens : weight;
  const double sequences = s.global_sequences ? *s.global_sequences : local_sequences;
  const double constant = s.norm_constant ? *s.norm_constant : static_cast<double>(cols);

  double denominator = 0;
  switch (s.aggregation) {
    case Aggregation::TokenMean:
      denominator = tokens_count;
      break;
    case Aggregation::SeqMeanTokenSum:
      denominator = sequences;
      break;
    case Aggregation::SeqMeanTokenMean:
      denominator = sequences;
      break;
    case Aggregation::SeqMeanTokenSumNorm:
      denominator = sequences * constant;
      break;
    case Aggregation::TokenSum:
      denominator = 1.0;
      break;
    case Aggregation::TokenSumNorm:
      denominator = constant;
      break;
  }
  for (std::size_t i = 0; i < rows; ++i) {
    double row_scale = 0;
    if (denominator > 0) {
      row_scale = s.world_size / denominator;
      if (s.aggregation == Aggregation::SeqMeanTokenMean)
        row_scale = row_weight[i] > 0 ? row_scale / row_weight[i] : 0.0;
    }
    out.loss += row_scale * row_sum[i];
    out.loss_magnitude += row_scale * row_abs[i];
    for (std::size_t j = 0; j < cols; ++j) {
      const std::size_t k = i * cols + j;
      if (mask[k] != 0) out.grad[k] = mask[k] * tokens[k].grad * row_scale;
    }
  }

  if (weight > 0) {
    out.metrics.clip_frac = clipped / weight;
    out.metrics.clip_frac_dual = dual / weight;
    out.metrics.clip_frac_high = high / weight;
    out.metrics.clip_frac_low = low / weight;
    out.metrics.approx_kl_k1 = k1 / weight;
    out.metrics.approx_kl_k3 = k3 / weight;
    out.metrics.ratio_mean = ratio / weight;
    out.metrics.ratio_min = ratio_min;
    out.metrics.ratio_max = ratio_max;
  }
  out.metrics.token_count = weight;
  return out;
}

/// The aggregated clipped loss of a [rows, cols] batch (advantages already
/// one per token; a masked token's values may be NaN).
inline Result clipped_loss(std::size_t rows, std::size_t cols, const std::vector<double>& logp,
                           const std::vector<double>& old_logp,
                           const std::vector<double>& advantages, const std::vector<double>& mask,
                           const Settings& s) {
  const std::size_t n = rows * cols;
  if (logp.size() != n || old_logp.size() != n || advantages.size() != n || mask.size() != n)
    throw std::logic_error("reference::clipped_loss: sizes do not match rows * cols");
  return aggregate(rows, cols, mask, s, [&](std::size_t k) {
    return evaluate_token(logp[k], old_logp[k], advantages[k], s);
  });
}

}  // namespace reference
