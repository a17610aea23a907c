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
#include <vector>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// A read-only [rows, cols] view of any dtype and strides (in elements).
/// data == nullptr means "absent" (the kernel substitutes its default).
struct StridedInput {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::int64_t row_stride = 0;
  std::int64_t col_stride = 0;
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
  double loss = 0;    // sum of w * l
  double tokens = 0;  // sum of w
  core::MetricSums metrics;
  bool bad_old = false, bad_advantage = false, bad_mask = false;
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

/// Everything the forward kernel reads.
struct ForwardArgs {
  std::int64_t rows = 0, cols = 0;
  StridedInput logp, old_logp;
  StridedInput advantages;  ///< absent: A = 1 (PSFT)
  StridedInput mask;        ///< absent: every token counts with weight 1
  bool check_finite = true;
};

/// What the forward kernel produces.
struct ForwardResult {
  std::vector<double> row_loss;    ///< sum_t w l per row
  std::vector<double> row_tokens;  ///< sum_t w per row
  core::MetricSums metrics;
  bool bad_old = false, bad_advantage = false, bad_mask = false;
};

/// One pass over the tokens. Writes coef[r * cols + c] = w dl/dlogp (before
/// the reduction's scale) when coef is not null.
template <class acc_t>
ForwardResult clipped_loss_forward(const ForwardArgs& a, const core::ClipParams<acc_t>& clip,
                                   acc_t* coef) {
  using Array = Eigen::Array<acc_t, Eigen::Dynamic, 1>;
  const std::int64_t chunks_per_row = (a.cols + kChunk - 1) / kChunk;
  const std::int64_t units = a.rows * chunks_per_row;
  std::vector<UnitPartial> partials(static_cast<std::size_t>(units));
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / kChunk);

  at::parallel_for(0, units, grain, [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t logp[kBlock], old[kBlock], adv[kBlock], w[kBlock], ratio[kBlock];
    bool in_range[kBlock];
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
        // logp becomes the clamped log-ratio, ratio its exp (vectorised).
        for (std::int64_t i = 0; i < n; ++i) {
          const acc_t log_ratio = logp[i] - old[i];
          in_range[i] = core::log_ratio_in_range(log_ratio, clip.log_ratio_clamp);
          logp[i] = core::clamp_log_ratio(log_ratio, clip.log_ratio_clamp);
        }
        Eigen::Map<Array>(ratio, n) = Eigen::Map<const Array>(logp, n).exp();

        acc_t* coef_out = coef ? coef + row * a.cols + col : nullptr;
        for (std::int64_t i = 0; i < n; ++i) {
          if (w[i] == acc_t(0)) {
            if (coef_out) coef_out[i] = acc_t(0);
            continue;
          }
          if (a.check_finite) {
            part.bad_old |= !std::isfinite(old[i]);
            part.bad_advantage |= !std::isfinite(adv[i]);
            part.bad_mask |= !std::isfinite(w[i]) || w[i] < acc_t(0);
          }
          const core::TokenObjective<acc_t> t =
              core::clipped_objective_from_ratio(ratio[i], in_range[i], adv[i], clip);
          part.loss += static_cast<double>(w[i] * t.loss);
          part.tokens += static_cast<double>(w[i]);
          part.metrics.add(t, logp[i], ratio[i], w[i]);
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
