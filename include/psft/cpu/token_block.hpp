#pragma once
/// \file
/// One block of tokens of the clipped objective's CPU kernel: the strided
/// inputs, their conversion to the accumulation type, a unit's partial sums,
/// and the vector loop (packet_block) written once over a lane type, which
/// Eigen's packets (cpu/packet_lanes.hpp) and the run-time dispatched
/// vectors of cpu/simd_blocks.hpp both provide.

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/cpu/packet_warnings.hpp"

// Note [Packet warnings]
PSFT_PACKET_WARNINGS_PUSH

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// A read-only [rows, cols] view of any dtype and strides (in elements).
/// data == nullptr means "absent" (the kernel substitutes its default).
struct StridedInput {
  const void* data = nullptr;                      ///< first element, or nullptr
  c10::ScalarType dtype = c10::ScalarType::Float;  ///< element type
  std::int64_t row_stride = 0;                     ///< 0 for a [cols] input
  std::int64_t col_stride = 0;                     ///< stride between columns
};

/// Tokens per work unit. Units are rows cut into fixed-length chunks, so
/// the partial sums, and hence the results, do not depend on the thread
/// count (Note [Deterministic reduction]).
constexpr std::int64_t kChunk = 2048;
/// Tokens converted to the accumulation type at once (fits in L1).
constexpr std::int64_t kBlock = 256;

// Note [Deterministic reduction]
// Each unit (row r, chunk c) writes its own partial sums; they are combined
// afterwards in unit order on one thread. The float results are therefore
// bit-identical for any number of threads, which makes runs reproducible
// and lets a resumed run match an uninterrupted one.

/// Partial results of one unit.
struct UnitPartial {
  double loss = 0;           ///< sum of w * l
  core::MetricSums metrics;  ///< metric sums of the unit
  ///@{
  /// Whether a non-finite logp / old_logp / advantage or a bad mask weight
  /// was seen.
  bool bad_logp = false, bad_old = false, bad_advantage = false, bad_mask = false;
  ///@}
};

/// Converts n elements of row `row` starting at column `col` to acc_t.
template <class acc_t, class src_t>
inline void gather(const StridedInput& in, std::int64_t row, std::int64_t col, std::int64_t n,
                   acc_t* out) {
  const src_t* p = static_cast<const src_t*>(in.data) + row * in.row_stride + col * in.col_stride;
  if (in.col_stride == 1) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]);
  } else {
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i * in.col_stride]);
  }
}

/// gather() with the dtype switch hoisted out of the element loop.
template <class acc_t>
inline void load(const StridedInput& in, std::int64_t row, std::int64_t col, std::int64_t n,
                 acc_t* out) {
  switch (in.dtype) {
    case c10::ScalarType::Float:
      return gather<acc_t, float>(in, row, col, n, out);
    case c10::ScalarType::Double:
      return gather<acc_t, double>(in, row, col, n, out);
    case c10::ScalarType::BFloat16:
      return gather<acc_t, c10::BFloat16>(in, row, col, n, out);
    case c10::ScalarType::Half:
      return gather<acc_t, c10::Half>(in, row, col, n, out);
    case c10::ScalarType::Bool:
      return gather<acc_t, bool>(in, row, col, n, out);
    default:
      TORCH_CHECK(false, "psft: unsupported dtype ", in.dtype, " in the CPU kernel");
  }
}

/// The contiguous float elements of row `row` from column `col` when the
/// input already is float with unit column stride (nothing to convert),
/// else nullptr.
inline const float* float_row(const StridedInput& in, std::int64_t row, std::int64_t col) {
  if (in.dtype != c10::ScalarType::Float || in.col_stride != 1) return nullptr;
  return static_cast<const float*>(in.data) + row * in.row_stride + col;
}

/// One block of n tokens in float, as packet_block reads it.
struct TokenBlock {
  std::int64_t n = 0;           ///< tokens
  const float* logp = nullptr;  ///< current log-probabilities
  const float* old = nullptr;   ///< old (or reference) log-probabilities
  const float* adv = nullptr;   ///< advantages; nullptr: A = 1
  const float* w = nullptr;     ///< mask weights; nullptr: w = 1
  float grad_scale = 1.f;       ///< coef_out[i] = w dl/dlogp * grad_scale
};

// Note [Packet path]
// GCC does not vectorise the scalar token loop of clipped_loss_forward
// (branches, and -ftrapping-math blocks turning them into selects), which
// left the fused pass compute-bound at ~34 cycles per token. For float
// accumulation, packet_block() runs the same objective rule on a vector of
// tokens (Note [Objective rules]) and sums the metrics of
// core::MetricSums::add with selects, in float within the block and in
// double across blocks. It is written once over Lanes, which adds to the
// rule's lane operations kLanes, load, store, exp_bounded (e^x for
// |x| <= bound) and the lane reductions sum, lowest and highest. A block with a value that fails
// the finite check is left to the scalar path, which names the bad argument.
//
// Note [Finite probe]
// The finite check costs two lane operations per vector instead of a
// comparison per input: one running sum of masked log-ratio + masked
// advantage + weight, which is finite only if each of them is (a NaN or
// an infinity reaches the sum, inf - inf included), and one running
// minimum of the weights, negative only where a weight is. The masked
// log-ratio logp - old_logp carries both log-probabilities: it is
// non-finite when either is. Finite inputs whose difference or sum
// overflows also make the probe non-finite; such a block goes to the
// scalar path too, which checks each input and computes it in full, so
// the probe can only cost time, never a result.

/// packet_block with the advantages read (kAdvantages) or A = 1 known at
/// compile time, so that PSFT's blocks fold the rule's terms in A away.
template <class Rule, class Lanes, bool kAdvantages>
std::int64_t packet_block_with(const TokenBlock& block,
                               const core::ObjectiveParams<float>& objective_params,
                               bool check_finite, float* coef_out, UnitPartial& part) {
  // Local copies: coef_out's stores could alias the references, which would
  // make the compiler reload every parameter and pointer per vector.
  const TokenBlock b = block;
  const core::ObjectiveParams<float> params = objective_params;
  using V = typename Lanes::Value;
  using M = typename Lanes::Mask;
  constexpr int kLanes = Lanes::kLanes;
  const Lanes o;
  const V zero = o.splat(0.f), one = o.splat(1.f);
  const V bound = o.splat(params.log_ratio_clamp), neg_bound = o.splat(-params.log_ratio_clamp);
  V loss = zero, weight = zero, clipped_sum = zero, dual_sum = zero, high_sum = zero,
    low_sum = zero, k1 = zero, k3 = zero, ratio_sum = zero;
  V ratio_min = o.splat(__builtin_huge_valf()), ratio_max = o.splat(-__builtin_huge_valf());
  V probe = zero, lowest_weight = zero;  // Note [Finite probe]
  const V grad_scale = o.splat(b.grad_scale);
  std::int64_t i = 0;
  for (; i + kLanes <= b.n; i += kLanes) {
    const V wi = b.w ? o.load(b.w + i) : one;
    const V li = o.load(b.logp + i);
    const V oi = o.load(b.old + i);
    const V ai = kAdvantages ? o.load(b.adv + i) : one;
    const M valid = o.negate(wi == zero);
    const V log_ratio = li - oi;
    core::TokenInput<Lanes> t;
    t.log_ratio = o.select(valid, log_ratio, zero);
    // Strict bounds: Note [Gradient at the bounds].
    t.in_range = o.both(neg_bound < log_ratio, log_ratio < bound);
    const V d = o.select(valid, o.min(o.max(log_ratio, neg_bound), bound), zero);
    const V r = o.exp_bounded(d, params.log_ratio_clamp);
    t.clamped = d;
    t.ratio = r;
    t.advantage = ai;
    t.logp = o.select(valid, li, zero);
    const core::TokenTerms<Lanes> terms = Rule::terms(o, t, params);
    if (coef_out) {
      o.store(coef_out + i,
              o.select(o.both(terms.trusted, valid), wi * terms.grad * grad_scale, zero));
    }
    // Sums in the form select(m, sum + x, sum): one masked instruction
    // where the instruction set has masks.
    const V wv = o.select(valid, wi, zero);
    loss = o.select(valid, loss + wi * terms.loss, loss);
    weight = weight + wv;
    clipped_sum = o.select(terms.clipped, clipped_sum + wv, clipped_sum);
    dual_sum = o.select(terms.clipped_dual, dual_sum + wv, dual_sum);
    high_sum = o.select(terms.clipped_high, high_sum + wv, high_sum);
    low_sum = o.select(terms.clipped_low, low_sum + wv, low_sum);
    k1 = k1 - wv * d;
    k3 = k3 + wv * ((r - one) - d);
    ratio_sum = ratio_sum + wv * r;
    ratio_min = o.select(valid, o.min(ratio_min, r), ratio_min);
    ratio_max = o.select(valid, o.max(ratio_max, r), ratio_max);
    if (check_finite) {
      const V inputs = kAdvantages ? t.log_ratio + o.select(valid, ai, zero) : t.log_ratio;
      probe = probe + (inputs + wi);
      lowest_weight = o.min(lowest_weight, wi);
    }
  }
  if (check_finite && !(std::isfinite(o.sum(probe)) && o.lowest(lowest_weight) >= 0.f)) return 0;
  const auto weight_sum = static_cast<double>(o.sum(weight));
  part.loss += static_cast<double>(o.sum(loss));
  core::MetricSums& m = part.metrics;
  m.weight += weight_sum;
  m.clipped += static_cast<double>(o.sum(clipped_sum));
  m.clipped_dual += static_cast<double>(o.sum(dual_sum));
  m.clipped_high += static_cast<double>(o.sum(high_sum));
  m.clipped_low += static_cast<double>(o.sum(low_sum));
  m.kl_k1 += static_cast<double>(o.sum(k1));
  m.kl_k3 += static_cast<double>(o.sum(k3));
  m.ratio += static_cast<double>(o.sum(ratio_sum));
  m.ratio_min = std::min<double>(m.ratio_min, o.lowest(ratio_min));
  m.ratio_max = std::max<double>(m.ratio_max, o.highest(ratio_max));
  return i;
}

/// Handles the leading whole vectors of block b with Rule on Lanes; returns
/// how many tokens it handled (0: the caller's scalar loop does the block).
/// Writes coef_out[i] = w dl/dlogp * b.grad_scale when coef_out is not null.
template <class Rule, class Lanes>
std::int64_t packet_block(const TokenBlock& b, const core::ObjectiveParams<float>& params,
                          bool check_finite, float* coef_out, UnitPartial& part) {
  return b.adv ? packet_block_with<Rule, Lanes, true>(b, params, check_finite, coef_out, part)
               : packet_block_with<Rule, Lanes, false>(b, params, check_finite, coef_out, part);
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
