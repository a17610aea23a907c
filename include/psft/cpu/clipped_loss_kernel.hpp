#pragma once
/// \file
/// Fused CPU kernels of the clipped objective on raw strided pointers: one
/// pass computes the loss, the metrics and the per-token gradient
/// coefficient; one pass turns the coefficients into the gradient.

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/cpu/packet_lanes.hpp"
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
  double tokens = 0;         ///< sum of w
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

// Note [Packet path]
// GCC does not vectorise the scalar token loop below (branches, and
// -ftrapping-math blocks turning them into selects), which left the fused
// pass compute-bound at ~34 cycles per token. For float accumulation,
// packet_block() runs the same objective rule on Eigen packets
// (cpu/packet_lanes.hpp; Note [Objective rules]) and sums the metrics of
// core::MetricSums::add with selects. A block with a value that fails the
// finite check is left to the scalar path, which names the bad argument.

/// Handles the leading whole packets of a block of n float tokens with
/// Rule; returns how many tokens it handled (0: the caller's scalar loop
/// does the block).
template <class Rule, class acc_t>
std::int64_t packet_block(std::int64_t n, const acc_t* logp, const acc_t* old, const acc_t* adv,
                          const acc_t* w, const core::ObjectiveParams<acc_t>& params,
                          bool check_finite, acc_t* coef_out, UnitPartial& part) {
  if constexpr (!std::is_same<acc_t, float>::value) {
    return 0;
  } else {
    namespace ei = Eigen::internal;
    using Packet = typename ei::packet_traits<acc_t>::type;
    constexpr int kLanes = ei::unpacket_traits<Packet>::size;
    if constexpr (kLanes == 1) {
      return 0;  // Eigen is not vectorised in this build
    } else {
      using Lanes = PacketLanes<Packet>;
      using V = typename Lanes::Value;
      const Lanes o;
      const Packet zero = ei::pset1<Packet>(0.f), one = ei::pset1<Packet>(1.f);
      const Packet bound = ei::pset1<Packet>(params.log_ratio_clamp);
      const Packet neg_bound = ei::pset1<Packet>(-params.log_ratio_clamp);
      const Packet inf = ei::pset1<Packet>(__builtin_huge_valf());
      const Packet neg_inf = ei::pset1<Packet>(-__builtin_huge_valf());
      const Packet largest = ei::pset1<Packet>(std::numeric_limits<float>::max());
      Packet loss = zero, weight = zero, clipped_sum = zero, dual_sum = zero, high_sum = zero,
             low_sum = zero, k1 = zero, k3 = zero, ratio_sum = zero, ratio_min = inf,
             ratio_max = neg_inf, bad = zero;
      std::int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        const Packet wi = ei::ploadu<Packet>(w + i);
        const Packet li = ei::ploadu<Packet>(logp + i);
        const Packet oi = ei::ploadu<Packet>(old + i);
        const Packet ai = ei::ploadu<Packet>(adv + i);
        const Packet valid = ei::pandnot(ei::ptrue(wi), ei::pcmp_eq(wi, zero));  // w != 0
        const Packet log_ratio = ei::psub(li, oi);
        core::TokenInput<Lanes> t;
        t.log_ratio = V{ei::pselect(valid, log_ratio, zero)};
        // Strict bounds: Note [Gradient at the bounds].
        t.in_range = {ei::pand(ei::pcmp_lt(neg_bound, log_ratio), ei::pcmp_lt(log_ratio, bound))};
        const Packet d = ei::pselect(valid, ei::pmin(ei::pmax(log_ratio, neg_bound), bound), zero);
        const Packet r = Lanes::exp(V{d}).p;
        t.clamped = V{d};
        t.ratio = V{r};
        t.advantage = V{ai};
        t.logp = V{ei::pselect(valid, li, zero)};
        const core::TokenTerms<Lanes> terms = Rule::terms(o, t, params);
        const Packet trusted = ei::pand(terms.trusted.p, valid);
        if (coef_out) {
          ei::pstoreu(coef_out + i, ei::pselect(trusted, ei::pmul(wi, terms.grad.p), zero));
        }
        const Packet wv = ei::pselect(valid, wi, zero);
        loss = ei::padd(loss, ei::pselect(valid, ei::pmul(wi, terms.loss.p), zero));
        weight = ei::padd(weight, wv);
        clipped_sum = ei::padd(clipped_sum, ei::pand(terms.clipped.p, wv));
        dual_sum = ei::padd(dual_sum, ei::pand(terms.clipped_dual.p, wv));
        high_sum = ei::padd(high_sum, ei::pand(terms.clipped_high.p, wv));
        low_sum = ei::padd(low_sum, ei::pand(terms.clipped_low.p, wv));
        k1 = ei::psub(k1, ei::pmul(wv, d));
        k3 = ei::padd(k3, ei::pmul(wv, ei::psub(ei::psub(r, one), d)));
        ratio_sum = ei::padd(ratio_sum, ei::pmul(wv, r));
        ratio_min = ei::pmin(ratio_min, ei::pselect(valid, r, inf));
        ratio_max = ei::pmax(ratio_max, ei::pselect(valid, r, neg_inf));
        if (check_finite) {
          // |x| <= FLT_MAX is false for NaN and Inf.
          const Packet finite_inputs = ei::pand(
              ei::pand(ei::pcmp_le(ei::pabs(li), largest), ei::pcmp_le(ei::pabs(oi), largest)),
              ei::pcmp_le(ei::pabs(ai), largest));
          const Packet good_weight =
              ei::pand(ei::pcmp_le(ei::pabs(wi), largest), ei::pcmp_le(zero, wi));
          bad = ei::por(bad, ei::por(ei::pandnot(valid, finite_inputs),
                                     ei::pandnot(ei::ptrue(wi), good_weight)));
        }
      }
      if (check_finite && ei::predux_any(bad)) return 0;
      part.loss += static_cast<double>(ei::predux(loss));
      part.tokens += static_cast<double>(ei::predux(weight));
      core::MetricSums& m = part.metrics;
      m.weight += static_cast<double>(ei::predux(weight));
      m.clipped += static_cast<double>(ei::predux(clipped_sum));
      m.clipped_dual += static_cast<double>(ei::predux(dual_sum));
      m.clipped_high += static_cast<double>(ei::predux(high_sum));
      m.clipped_low += static_cast<double>(ei::predux(low_sum));
      m.kl_k1 += static_cast<double>(ei::predux(k1));
      m.kl_k3 += static_cast<double>(ei::predux(k3));
      m.ratio += static_cast<double>(ei::predux(ratio_sum));
      m.ratio_min = std::min<double>(m.ratio_min, ei::predux_min(ratio_min));
      m.ratio_max = std::max<double>(m.ratio_max, ei::predux_max(ratio_max));
      return i;
    }
  }
}

/// Everything the forward kernel reads.
struct ForwardArgs {
  ///@{
  /// The [rows, cols] shape (rows = 1 for a flat input).
  std::int64_t rows = 0, cols = 0;
  ///@}
  ///@{
  /// Current and old log-probabilities.
  StridedInput logp, old_logp;
  ///@}
  StridedInput advantages;   ///< absent: A = 1 (PSFT)
  StridedInput mask;         ///< absent: every token counts with weight 1
  bool check_finite = true;  ///< report non-finite inputs (LossOptions::check_finite)
};

/// What the forward kernel produces.
struct ForwardResult {
  std::vector<double> row_loss;    ///< sum_t w l per row
  std::vector<double> row_tokens;  ///< sum_t w per row
  core::MetricSums metrics;        ///< metric sums over all tokens
  ///@{
  /// Whether a non-finite logp / old_logp / advantage or a bad mask weight
  /// was seen.
  bool bad_logp = false, bad_old = false, bad_advantage = false, bad_mask = false;
  ///@}
};

/// One pass over the tokens with the objective rule Rule (Note [Objective
/// rules]). Writes coef[r * cols + c] = w dl/dlogp (before the reduction's
/// scale) when coef is not null.
template <class Rule, class acc_t>
ForwardResult clipped_loss_forward(const ForwardArgs& a, const core::ObjectiveParams<acc_t>& clip,
                                   acc_t* coef) {
  using Array = Eigen::Array<acc_t, Eigen::Dynamic, 1>;
  const std::int64_t chunks_per_row = (a.cols + kChunk - 1) / kChunk;
  const std::int64_t units = a.rows * chunks_per_row;
  std::vector<UnitPartial> partials(static_cast<std::size_t>(units));
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / kChunk);

  at::parallel_for(0, units, grain, [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t logp[kBlock], old[kBlock], adv[kBlock], w[kBlock], ratio[kBlock];
    alignas(64) acc_t clamped[kBlock];
    for (std::int64_t u = begin; u < end; ++u) {
      const std::int64_t row = u / chunks_per_row;
      const std::int64_t chunk_begin = (u % chunks_per_row) * kChunk;
      const std::int64_t chunk_end = std::min(a.cols, chunk_begin + kChunk);
      UnitPartial part;
      for (std::int64_t col = chunk_begin; col < chunk_end; col += kBlock) {
        const std::int64_t n = std::min(kBlock, chunk_end - col);
        load(a.logp, row, col, n, logp);
        load(a.old_logp, row, col, n, old);
        if (a.advantages.data) {
          load(a.advantages, row, col, n, adv);
        } else {
          std::fill(adv, adv + n, acc_t(1));
        }
        if (a.mask.data) {
          load(a.mask, row, col, n, w);
        } else {
          std::fill(w, w + n, acc_t(1));
        }
        acc_t* coef_out = coef ? coef + row * a.cols + col : nullptr;
        const std::int64_t done =
            packet_block<Rule>(n, logp, old, adv, w, clip, a.check_finite, coef_out, part);
        if (done == n) continue;
        // The scalar path: the clamped log-ratios, then their exp at once.
        for (std::int64_t i = done; i < n; ++i) {
          clamped[i] = core::clamp_log_ratio(logp[i] - old[i], clip.log_ratio_clamp);
        }
        Eigen::Map<Array>(ratio + done, n - done) =
            Eigen::Map<const Array>(clamped + done, n - done).exp();

        for (std::int64_t i = done; i < n; ++i) {
          if (w[i] == acc_t(0)) {
            if (coef_out) coef_out[i] = acc_t(0);
            continue;
          }
          if (a.check_finite) {
            part.bad_logp |= !std::isfinite(logp[i]);
            part.bad_old |= !std::isfinite(old[i]);
            part.bad_advantage |= !std::isfinite(adv[i]);
            part.bad_mask |= !std::isfinite(w[i]) || w[i] < acc_t(0);
          }
          const core::TokenObjective<acc_t> t = Rule::terms(
              core::ScalarLanes<acc_t>(),
              core::token_input(logp[i], logp[i] - old[i], clamped[i], ratio[i],
                                core::log_ratio_in_range(logp[i] - old[i], clip.log_ratio_clamp),
                                adv[i]),
              clip);
          part.loss += static_cast<double>(w[i] * t.loss);
          part.tokens += static_cast<double>(w[i]);
          part.metrics.add(t, clamped[i], ratio[i], w[i]);
          if (coef_out) coef_out[i] = w[i] * t.grad;
        }
      }
      partials[static_cast<std::size_t>(u)] = part;
    }
  });

  ForwardResult out;
  out.row_loss.assign(static_cast<std::size_t>(a.rows), 0.0);
  out.row_tokens.assign(static_cast<std::size_t>(a.rows), 0.0);
  for (std::int64_t u = 0; u < units; ++u) {
    const UnitPartial& p = partials[static_cast<std::size_t>(u)];
    const auto row = static_cast<std::size_t>(u / chunks_per_row);
    out.row_loss[row] += p.loss;
    out.row_tokens[row] += p.tokens;
    out.metrics.merge(p.metrics);
    out.bad_logp |= p.bad_logp;
    out.bad_old |= p.bad_old;
    out.bad_advantage |= p.bad_advantage;
    out.bad_mask |= p.bad_mask;
  }
  return out;
}

/// grad[r, c] = coef[r, c] * scale[r or 0] * grad_output, written in
/// scalar_t; scale has one entry per row, or one for all rows. Parallel over
/// the flat index so that a single long row still uses every thread.
template <class scalar_t, class acc_t>
void clipped_loss_backward(std::int64_t rows, std::int64_t cols, const acc_t* coef,
                           const double* scale, bool scale_per_row, double grad_output,
                           scalar_t* grad) {
  at::parallel_for(0, rows * cols, 32768, [&](std::int64_t begin, std::int64_t end) {
    std::int64_t i = begin;
    while (i < end) {
      const std::int64_t row = i / cols;
      const std::int64_t row_end = std::min(end, (row + 1) * cols);
      const acc_t s = static_cast<acc_t>(scale[scale_per_row ? row : 0] * grad_output);
      for (; i < row_end; ++i) grad[i] = static_cast<scalar_t>(coef[i] * s);
    }
  });
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
