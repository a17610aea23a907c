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
#include "psft/cpu/capability.hpp"
#include "psft/cpu/packet_lanes.hpp"
#include "psft/cpu/packet_warnings.hpp"
#include "psft/cpu/simd_blocks.hpp"
#include "psft/cpu/token_block.hpp"

// Note [Packet warnings]
PSFT_PACKET_WARNINGS_PUSH

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// The token-block functions on Eigen's packets (the consumer's instruction
/// set); cpu/simd_blocks.hpp has the same for AVX2 and AVX-512 (Note
/// [Run-time ISA dispatch]).
struct EigenTokens {
  /// n elements of in's row from col in float (in's own memory where it is
  /// contiguous float); nullptr where in is absent.
  static const float* stage(const StridedInput& in, std::int64_t row, std::int64_t col,
                            std::int64_t n, float* buf) {
    if (!in.data) return nullptr;
    if (const float* direct = float_row(in, row, col)) return direct;
    load<float>(in, row, col, n, buf);
    return buf;
  }
  /// packet_block on Eigen's float packets; 0 where Eigen is not vectorised.
  template <class Rule>
  static std::int64_t block(const TokenBlock& b, const core::ObjectiveParams<float>& params,
                            bool check_finite, float* coef_out, UnitPartial& part) {
    using Packet = typename Eigen::internal::packet_traits<float>::type;
    if constexpr (Eigen::internal::unpacket_traits<Packet>::size == 1) {
      return 0;
    } else {
      return packet_block<Rule, PacketLanes<Packet>>(b, params, check_finite, coef_out, part);
    }
  }
  /// out[i] = coef[i] * s in scalar_t.
  template <class scalar_t>
  static void scale(const float* coef, std::int64_t n, float s, scalar_t* out) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(coef[i] * s);
  }
};

/// f(tokens) with the token-block functions of the CPU capability in use.
template <class F>
decltype(auto) with_tokens(F&& f) {
#if PSFT_ISA_DISPATCH
  switch (cpu_capability()) {
    case CpuCapability::Avx512:
      return f(simd_avx512::Tokens{});
    case CpuCapability::Avx2:
      return f(simd_avx2::Tokens{});
    default:
      break;
  }
#endif
  return f(EigenTokens{});
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
/// rules]) and the token-block functions Tokens (EigenTokens or a
/// dispatched instruction set's). Writes coef[r * cols + c] = w dl/dlogp
/// (before the reduction's scale) when coef is not null.
template <class Rule, class acc_t, class Tokens>
ForwardResult clipped_loss_forward_with(const ForwardArgs& a,
                                        const core::ObjectiveParams<acc_t>& clip, acc_t* coef) {
  using Array = Eigen::Array<acc_t, Eigen::Dynamic, 1>;
  const std::int64_t chunks_per_row = (a.cols + kChunk - 1) / kChunk;
  const std::int64_t units = a.rows * chunks_per_row;
  std::vector<UnitPartial> partials(static_cast<std::size_t>(units));
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / kChunk);

  at::parallel_for(0, units, grain, [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t logp_buf[kBlock], old_buf[kBlock], adv_buf[kBlock], w_buf[kBlock];
    alignas(64) acc_t ratio[kBlock], clamped[kBlock];
    for (std::int64_t u = begin; u < end; ++u) {
      const std::int64_t row = u / chunks_per_row;
      const std::int64_t chunk_begin = (u % chunks_per_row) * kChunk;
      const std::int64_t chunk_end = std::min(a.cols, chunk_begin + kChunk);
      UnitPartial part;
      for (std::int64_t col = chunk_begin; col < chunk_end; col += kBlock) {
        const std::int64_t n = std::min(kBlock, chunk_end - col);
        // The block in acc_t; adv and w stay null where absent (A = 1, w = 1).
        const acc_t *logp, *old, *adv, *w;
        acc_t* coef_out = coef ? coef + row * a.cols + col : nullptr;
        std::int64_t done = 0;
        if constexpr (std::is_same<acc_t, float>::value) {
          TokenBlock b;
          b.n = n;
          b.logp = logp = Tokens::stage(a.logp, row, col, n, logp_buf);
          b.old = old = Tokens::stage(a.old_logp, row, col, n, old_buf);
          b.adv = adv = Tokens::stage(a.advantages, row, col, n, adv_buf);
          b.w = w = Tokens::stage(a.mask, row, col, n, w_buf);
          done = Tokens::template block<Rule>(b, clip, a.check_finite, coef_out, part);
          if (done == n) continue;
        } else {
          load(a.logp, row, col, n, logp_buf);
          load(a.old_logp, row, col, n, old_buf);
          if (a.advantages.data) load(a.advantages, row, col, n, adv_buf);
          if (a.mask.data) load(a.mask, row, col, n, w_buf);
          logp = logp_buf;
          old = old_buf;
          adv = a.advantages.data ? adv_buf : nullptr;
          w = a.mask.data ? w_buf : nullptr;
        }
        // The scalar path: the clamped log-ratios, then their exp at once.
        for (std::int64_t i = done; i < n; ++i) {
          clamped[i] = core::clamp_log_ratio(logp[i] - old[i], clip.log_ratio_clamp);
        }
        Eigen::Map<Array>(ratio + done, n - done) =
            Eigen::Map<const Array>(clamped + done, n - done).exp();

        for (std::int64_t i = done; i < n; ++i) {
          const acc_t wi = w ? w[i] : acc_t(1), ai = adv ? adv[i] : acc_t(1);
          if (wi == acc_t(0)) {
            if (coef_out) coef_out[i] = acc_t(0);
            continue;
          }
          if (a.check_finite) {
            part.bad_logp |= !std::isfinite(logp[i]);
            part.bad_old |= !std::isfinite(old[i]);
            part.bad_advantage |= !std::isfinite(ai);
            part.bad_mask |= !std::isfinite(wi) || wi < acc_t(0);
          }
          const core::TokenObjective<acc_t> t =
              Rule::terms(core::ScalarLanes<acc_t>(),
                          core::token_input(
                              logp[i], logp[i] - old[i], clamped[i], ratio[i],
                              core::log_ratio_in_range(logp[i] - old[i], clip.log_ratio_clamp), ai),
                          clip);
          part.loss += static_cast<double>(wi * t.loss);
          part.tokens += static_cast<double>(wi);
          part.metrics.add(t, clamped[i], ratio[i], wi);
          if (coef_out) coef_out[i] = wi * t.grad;
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

/// clipped_loss_forward_with on the token-block functions of the CPU
/// capability in use (Note [Run-time ISA dispatch]); Eigen's for double.
template <class Rule, class acc_t>
ForwardResult clipped_loss_forward(const ForwardArgs& a, const core::ObjectiveParams<acc_t>& clip,
                                   acc_t* coef) {
  if constexpr (std::is_same<acc_t, float>::value) {
    return with_tokens([&](auto tokens) {
      return clipped_loss_forward_with<Rule, acc_t, decltype(tokens)>(a, clip, coef);
    });
  } else {
    return clipped_loss_forward_with<Rule, acc_t, EigenTokens>(a, clip, coef);
  }
}

/// grad[r, c] = coef[r, c] * scale[r or 0] * grad_output, written in
/// scalar_t; scale has one entry per row, or one for all rows. Parallel over
/// the flat index so that a single long row still uses every thread.
template <class scalar_t, class acc_t>
void clipped_loss_backward(std::int64_t rows, std::int64_t cols, const acc_t* coef,
                           const double* scale, bool scale_per_row, double grad_output,
                           scalar_t* grad) {
  const auto run = [&](auto tokens) {
    at::parallel_for(0, rows * cols, 32768, [&](std::int64_t begin, std::int64_t end) {
      std::int64_t i = begin;
      while (i < end) {
        const std::int64_t row = i / cols;
        const std::int64_t row_end = std::min(end, (row + 1) * cols);
        const acc_t s = static_cast<acc_t>(scale[scale_per_row ? row : 0] * grad_output);
        if constexpr (std::is_same<acc_t, float>::value) {
          decltype(tokens)::scale(coef + i, row_end - i, s, grad + i);
          i = row_end;
        } else {
          for (; i < row_end; ++i) grad[i] = static_cast<scalar_t>(coef[i] * s);
        }
      }
    });
  };
  if constexpr (std::is_same<acc_t, float>::value) {
    with_tokens(run);
  } else {
    run(EigenTokens{});
  }
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
