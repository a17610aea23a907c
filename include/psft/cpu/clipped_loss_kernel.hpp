#pragma once
/// \file
/// Fused CPU kernel of the clipped objective on raw strided pointers: a
/// pass over the mask counts each row's tokens, then one pass computes the
/// loss, the metrics and the gradient.

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

/// Where the forward kernel writes d loss / d logp for grad_output 1
/// (Note [Gradient in the forward pass]): a contiguous [rows, cols] buffer
/// in logp's dtype; row r's coefficients are scaled by scale[r].
struct GradTarget {
  void* data = nullptr;                            ///< nullptr: no gradient
  c10::ScalarType dtype = c10::ScalarType::Float;  ///< logp's dtype
  const double* scale = nullptr;                   ///< [rows] the reduction's factors
};

// Note [Gradient in the forward pass]
// The reduction's factors depend only on the token counts, so a first,
// cheap pass counts each row's tokens (it reads the mask alone, and is
// skipped without one); the forward pass then writes the gradient
// (w dl/dlogp) * factor in logp's dtype while the block is in cache, as
// ClippedLossFunction's backward would for grad_output 1, and backward
// only hands it on (scaled where grad_output is not 1). A float or double
// gradient is written in place by the vector loop; a bf16 or fp16 one goes
// through a block of float and is narrowed. This saves the coefficient
// buffer (4 bytes per token) and the backward pass over it. Where
// grad_output is not 1, a bf16 or fp16 gradient is rounded twice (the
// product with the factor, then with grad_output); a power-of-two
// grad_output, such as 1 / accumulation steps of 2, 4 or 8, is exact.

/// What the forward kernel produces.
struct ForwardResult {
  std::vector<double> row_loss;  ///< sum_t w l per row
  core::MetricSums metrics;      ///< metric sums over all tokens
  ///@{
  /// Whether a non-finite logp / old_logp / advantage or a bad mask weight
  /// was seen.
  bool bad_logp = false, bad_old = false, bad_advantage = false, bad_mask = false;
  ///@}
};

/// One work unit: columns [begin, end) of row `row`.
struct TokenUnit {
  std::int64_t row;    ///< the row
  std::int64_t begin;  ///< its first column
  std::int64_t end;    ///< one past its last column
};

/// The work units of the [rows, cols] token grid: rows cut into chunks of
/// kChunk tokens (Note [Deterministic reduction]).
struct TokenUnits {
  std::int64_t cols;            ///< tokens in a row
  std::int64_t chunks_per_row;  ///< chunks in a row
  std::int64_t count;           ///< units in all
  std::int64_t grain;           ///< units per at::parallel_for task

  /// Unit u (units are numbered row by row, chunk by chunk).
  TokenUnit unit(std::int64_t u) const {
    const std::int64_t begin = (u % chunks_per_row) * kChunk;
    return {u / chunks_per_row, begin, std::min(cols, begin + kChunk)};
  }
};

/// The units of a [rows, cols] grid.
inline TokenUnits token_units(std::int64_t rows, std::int64_t cols) {
  const std::int64_t chunks_per_row = (cols + kChunk - 1) / kChunk;
  return {cols, chunks_per_row, rows * chunks_per_row, std::max<std::int64_t>(1, 16384 / kChunk)};
}

/// sum_t w per row in acc_t's weights, summed in double per unit in column
/// order and over a row's units in order, so that it does not depend on the
/// thread count; cols per row where the mask is absent.
template <class acc_t>
std::vector<double> row_token_counts(const ForwardArgs& a) {
  const auto rows = static_cast<std::size_t>(a.rows);
  if (!a.mask.data) return std::vector<double>(rows, static_cast<double>(a.cols));
  const TokenUnits units = token_units(a.rows, a.cols);
  std::vector<double> unit_tokens(static_cast<std::size_t>(units.count));
  at::parallel_for(0, units.count, units.grain, [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t w[kBlock];
    for (std::int64_t u = begin; u < end; ++u) {
      const auto [row, chunk_begin, chunk_end] = units.unit(u);
      double sum = 0;
      if (a.mask.dtype == c10::ScalarType::Bool) {
        // 0 / 1 bytes: an exact integer count, which vectorises (32-bit lanes).
        const std::int64_t stride = a.mask.col_stride;
        const auto* p = static_cast<const std::uint8_t*>(a.mask.data) + row * a.mask.row_stride +
                        chunk_begin * stride;
        std::uint32_t count = 0;  // at most kChunk
        if (stride == 1) {
          for (std::int64_t c = 0; c < chunk_end - chunk_begin; ++c) count += p[c];
        } else {
          for (std::int64_t c = 0; c < chunk_end - chunk_begin; ++c) count += p[c * stride];
        }
        sum = static_cast<double>(count);
      } else {
        // Four running sums, so that the additions do not wait on each other.
        double part[4] = {0, 0, 0, 0};
        for (std::int64_t col = chunk_begin; col < chunk_end; col += kBlock) {
          const std::int64_t n = std::min(kBlock, chunk_end - col);
          load(a.mask, row, col, n, w);
          for (std::int64_t i = 0; i < n; ++i) part[i % 4] += static_cast<double>(w[i]);
        }
        sum = (part[0] + part[1]) + (part[2] + part[3]);
      }
      unit_tokens[static_cast<std::size_t>(u)] = sum;
    }
  });
  std::vector<double> out(rows, 0.0);
  for (std::int64_t u = 0; u < units.count; ++u) {
    out[static_cast<std::size_t>(u / units.chunks_per_row)] +=
        unit_tokens[static_cast<std::size_t>(u)];
  }
  return out;
}

/// grad[offset + i] = coef[i] for i < n, narrowed to grad's dtype (bf16 or
/// fp16; a float or double gradient is written in place by the pass) with
/// the token-block functions Tokens.
template <class Tokens>
void store_gradient(const float* coef, std::int64_t n, const GradTarget& grad,
                    std::int64_t offset) {
  switch (grad.dtype) {
    case c10::ScalarType::BFloat16:
      return Tokens::scale(coef, n, 1.f, static_cast<c10::BFloat16*>(grad.data) + offset);
    case c10::ScalarType::Half:
      return Tokens::scale(coef, n, 1.f, static_cast<c10::Half*>(grad.data) + offset);
    default:
      TORCH_CHECK(false, "psft: unsupported gradient dtype ", grad.dtype, " in the CPU kernel");
  }
}

/// One pass over the tokens with the objective rule Rule (Note [Objective
/// rules]) and the token-block functions Tokens (EigenTokens or a
/// dispatched instruction set's). Writes the gradient to grad when
/// grad.data is not null (Note [Gradient in the forward pass]).
template <class Rule, class acc_t, class Tokens>
ForwardResult clipped_loss_forward_with(const ForwardArgs& a,
                                        const core::ObjectiveParams<acc_t>& clip,
                                        const GradTarget& grad) {
  using Array = Eigen::Array<acc_t, Eigen::Dynamic, 1>;
  const TokenUnits units = token_units(a.rows, a.cols);
  std::vector<UnitPartial> partials(static_cast<std::size_t>(units.count));

  at::parallel_for(0, units.count, units.grain, [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t logp_buf[kBlock], old_buf[kBlock], adv_buf[kBlock], w_buf[kBlock];
    alignas(64) acc_t ratio[kBlock], clamped[kBlock], coef[kBlock];
    // A gradient in acc_t is written in place; bf16 and fp16 go through coef.
    const bool in_place = grad.data && grad.dtype == c10::CppTypeToScalarType<acc_t>::value;
    for (std::int64_t u = begin; u < end; ++u) {
      const auto [row, chunk_begin, chunk_end] = units.unit(u);
      const auto s = grad.data ? static_cast<acc_t>(grad.scale[row]) : acc_t(0);
      UnitPartial part;
      for (std::int64_t col = chunk_begin; col < chunk_end; col += kBlock) {
        const std::int64_t n = std::min(kBlock, chunk_end - col);
        // The block in acc_t; adv and w stay null where absent (A = 1, w = 1).
        const acc_t *logp, *old, *adv, *w;
        acc_t* const coef_out = !grad.data ? nullptr
                                : in_place ? static_cast<acc_t*>(grad.data) + row * a.cols + col
                                           : coef;
        std::int64_t done = 0;
        if constexpr (std::is_same<acc_t, float>::value) {
          TokenBlock b;
          b.n = n;
          b.logp = logp = Tokens::stage(a.logp, row, col, n, logp_buf);
          b.old = old = Tokens::stage(a.old_logp, row, col, n, old_buf);
          b.adv = adv = Tokens::stage(a.advantages, row, col, n, adv_buf);
          b.w = w = Tokens::stage(a.mask, row, col, n, w_buf);
          b.grad_scale = s;
          done = Tokens::template block<Rule>(b, clip, a.check_finite, coef_out, part);
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
        if (done < n) {
          // The scalar path: the clamped log-ratios, then their exp at once.
          for (std::int64_t i = done; i < n; ++i) {
            clamped[i] = core::clamp_log_ratio(logp[i] - old[i], clip.log_ratio_clamp);
          }
          Eigen::Map<Array>(ratio + done, n - done) =
              Eigen::Map<const Array>(clamped + done, n - done).exp();
        }
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
          part.metrics.add(t, clamped[i], ratio[i], wi);
          if (coef_out) coef_out[i] = wi * t.grad * s;
        }
        if constexpr (std::is_same<acc_t, float>::value) {
          if (grad.data && !in_place) store_gradient<Tokens>(coef, n, grad, row * a.cols + col);
        }
      }
      partials[static_cast<std::size_t>(u)] = part;
    }
  });

  ForwardResult out;
  out.row_loss.assign(static_cast<std::size_t>(a.rows), 0.0);
  for (std::int64_t u = 0; u < units.count; ++u) {
    const UnitPartial& p = partials[static_cast<std::size_t>(u)];
    out.row_loss[static_cast<std::size_t>(u / units.chunks_per_row)] += p.loss;
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
                                   const GradTarget& grad) {
  if constexpr (std::is_same<acc_t, float>::value) {
    return with_tokens([&](auto tokens) {
      return clipped_loss_forward_with<Rule, acc_t, decltype(tokens)>(a, clip, grad);
    });
  } else {
    return clipped_loss_forward_with<Rule, acc_t, EigenTokens>(a, clip, grad);
  }
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
