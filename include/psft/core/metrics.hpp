#pragma once
/// \file
/// Trust-region metric accumulators: sums and counts that merge exactly
/// across chunks, micro-batches and ranks, finalised as sum / count (never a
/// mean of means). Torch-free.

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// Final metric values (all means are mask-weighted over unmasked tokens).
struct MetricValues {
  double clip_frac;       ///< verl pg_clipfrac
  double clip_frac_dual;  ///< verl pg_clipfrac_lower
  double clip_frac_high;  ///< TRL high clip ratio
  double clip_frac_low;   ///< TRL low clip ratio
  double approx_kl_k1;    ///< mean(old_logp - logp)
  double approx_kl_k3;    ///< mean(r - 1 - log r)
  double ratio_mean;      ///< mean(r)
  double ratio_min;       ///< min(r) over unmasked tokens
  double ratio_max;       ///< max(r) over unmasked tokens
  double token_count;     ///< sum of mask weights
};

/// Number of values in MetricValues, in declaration order.
constexpr int kMetricCount = 10;

/// Running sums of one chunk of tokens; merge() combines chunks exactly.
struct MetricSums {
  double weight = 0;  ///< sum of mask weights
  ///@{
  /// Weighted counts of tokens where each clip indicator holds (see
  /// MetricValues for which fraction is which).
  double clipped = 0, clipped_dual = 0, clipped_high = 0, clipped_low = 0;
  ///@}
  ///@{
  /// Weighted sums of the KL estimators k1, k3 and of the ratio.
  double kl_k1 = 0, kl_k3 = 0, ratio = 0;
  ///@}
  // __builtin_huge_val: +inf usable in device code without nvcc's relaxed-constexpr flag.
  double ratio_min = __builtin_huge_val();   ///< smallest ratio seen (+inf if none)
  double ratio_max = -__builtin_huge_val();  ///< largest ratio seen (-inf if none)

  /// Adds one token with mask weight w > 0.
  template <class T>
  PSFT_HOST_DEVICE void add(const TokenObjective<T>& t, T clamped_log_ratio, T ratio_value, T w) {
    const double wd = static_cast<double>(w);
    weight += wd;
    clipped += t.clipped ? wd : 0.0;
    clipped_dual += t.clipped_dual ? wd : 0.0;
    clipped_high += t.clipped_high ? wd : 0.0;
    clipped_low += t.clipped_low ? wd : 0.0;
    kl_k1 += wd * static_cast<double>(approx_kl_k1(clamped_log_ratio));
    kl_k3 += wd * static_cast<double>(approx_kl_k3(clamped_log_ratio, ratio_value));
    const double r = static_cast<double>(ratio_value);
    ratio += wd * r;
    ratio_min = r < ratio_min ? r : ratio_min;
    ratio_max = r > ratio_max ? r : ratio_max;
  }

  /// Adds another chunk's sums (exact: sums add, extrema combine).
  PSFT_HOST_DEVICE void merge(const MetricSums& o) {
    weight += o.weight;
    clipped += o.clipped;
    clipped_dual += o.clipped_dual;
    clipped_high += o.clipped_high;
    clipped_low += o.clipped_low;
    kl_k1 += o.kl_k1;
    kl_k3 += o.kl_k3;
    ratio += o.ratio;
    ratio_min = o.ratio_min < ratio_min ? o.ratio_min : ratio_min;
    ratio_max = o.ratio_max > ratio_max ? o.ratio_max : ratio_max;
  }

  /// Means as sum / weight. With no tokens, fractions and KL are 0 and the
  /// ratio statistics are 1 (a policy compared with itself), never NaN.
  PSFT_HOST_DEVICE MetricValues finalize() const {
    const bool any = weight > 0;
    const double inv = any ? 1.0 / weight : 0.0;
    MetricValues v;
    v.clip_frac = clipped * inv;
    v.clip_frac_dual = clipped_dual * inv;
    v.clip_frac_high = clipped_high * inv;
    v.clip_frac_low = clipped_low * inv;
    v.approx_kl_k1 = kl_k1 * inv;
    v.approx_kl_k3 = kl_k3 * inv;
    v.ratio_mean = any ? ratio * inv : 1.0;
    v.ratio_min = any ? ratio_min : 1.0;
    v.ratio_max = any ? ratio_max : 1.0;
    v.token_count = weight;
    return v;
  }
};

}  // namespace core
PSFT_NAMESPACE_END
