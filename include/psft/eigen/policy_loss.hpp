#pragma once
/// \file
/// The clipped objective over Eigen arrays, for trainers that do not use
/// LibTorch and for small CPU work. Same core math, reductions and metrics
/// as psft::policy_loss; needs Eigen only.

#include <Eigen/Core>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/core/validate.hpp"

PSFT_NAMESPACE_BEGIN
namespace eigen {

/// Per-token values of a [B, T] batch, one sequence per row.
template <class T>
using TokenArray = Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Loss, gradient with respect to logp, and metrics.
template <class T>
struct LossResult {
  T loss;                      ///< the aggregated loss
  TokenArray<T> grad;          ///< d loss / d logp
  core::MetricValues metrics;  ///< clip fractions, KL, ratio statistics
};

namespace detail {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("psft::eigen::policy_loss: " + message);
}

template <class T>
void require_shape(const TokenArray<T>& a, const TokenArray<T>& logp, const char* name) {
  require(a.rows() == logp.rows() && a.cols() == logp.cols(),
          std::string(name) + " must have logp's shape [" + std::to_string(logp.rows()) + ", " +
              std::to_string(logp.cols()) + "], got [" + std::to_string(a.rows()) + ", " +
              std::to_string(a.cols()) + "]");
}

}  // namespace detail

/// The general clipped objective (see psft::policy_loss). mask holds token
/// weights (0 = masked). Throws std::invalid_argument naming the argument.
template <class T>
LossResult<T> policy_loss(const TokenArray<T>& logp, const TokenArray<T>& old_logp,
                          const TokenArray<T>& advantages, const TokenArray<T>& mask,
                          const LossOptions& opts = {}) {
  detail::require_shape(old_logp, logp, "old_logp");
  detail::require_shape(advantages, logp, "advantages");
  detail::require_shape(mask, logp, "mask");
  const std::string options_error = core::loss_options_error(opts, 2);
  detail::require(options_error.empty(), options_error);

  if (opts.objective.ratio_level == RatioLevel::Sequence) {
    // GSPO (RatioLevel::Sequence): old_logp' = logp - mean_t(logp - old_logp)
    // makes every token's log-ratio its sequence's, with gradient 1.
    TokenArray<T> sequence_old(logp.rows(), logp.cols());
    for (Eigen::Index r = 0; r < logp.rows(); ++r) {
      T sum = T(0), weight = T(0);
      for (Eigen::Index c = 0; c < logp.cols(); ++c) {
        if (mask(r, c) == T(0)) continue;
        sum += mask(r, c) * (logp(r, c) - old_logp(r, c));
        weight += mask(r, c);
      }
      const T mean = sum / (weight < T(1) ? T(1) : weight);
      sequence_old.row(r) = logp.row(r) - mean;
    }
    LossOptions token_opts = opts;
    token_opts.objective.ratio_level = RatioLevel::Token;
    return policy_loss<T>(logp, sequence_old, advantages, mask, token_opts);
  }
  const core::ObjectiveParams<T> clip = core::objective_params<T>(opts);
  const core::RuleId rule = core::rule_for(opts.objective.kind);
  const Eigen::Index rows = logp.rows(), cols = logp.cols();
  LossResult<T> out;
  out.grad = TokenArray<T>::Zero(rows, cols);
  std::vector<double> row_loss(rows, 0.0), row_tokens(rows, 0.0), row_scale(rows, 0.0);
  core::MetricSums sums;
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      const T w = mask(r, c);
      if (w == T(0)) continue;
      if (opts.check_finite) {
        detail::require(std::isfinite(logp(r, c)), "logp has NaN or Inf at an unmasked token");
        detail::require(std::isfinite(old_logp(r, c)),
                        "old_logp has NaN or Inf at an unmasked token");
        detail::require(std::isfinite(advantages(r, c)),
                        "advantages has NaN or Inf at an unmasked token");
        detail::require(std::isfinite(w) && w > T(0), "mask has a negative, NaN or Inf weight");
      }
      const T log_ratio = logp(r, c) - old_logp(r, c);
      const T clamped = core::clamp_log_ratio(log_ratio, clip.log_ratio_clamp);
      const T ratio = std::exp(clamped);
      const core::TokenObjective<T> t = core::visit_rule(rule, [&](auto rule_struct) {
        return decltype(rule_struct)::terms(
            core::ScalarLanes<T>(),
            core::token_input(logp(r, c), log_ratio, clamped, ratio,
                              core::log_ratio_in_range(log_ratio, clip.log_ratio_clamp),
                              advantages(r, c)),
            clip);
      });
      row_loss[r] += static_cast<double>(w * t.loss);
      row_tokens[r] += static_cast<double>(w);
      sums.add(t, clamped, ratio, w);
      out.grad(r, c) = w * t.grad;
    }
  }
  const core::RowReduction reduced =
      core::reduce_rows(core::resolve_sequence_count(opts, rows), rows, cols, row_loss.data(),
                        row_tokens.data(), row_scale.data());
  detail::require(reduced.error.empty(), reduced.error);
  for (Eigen::Index r = 0; r < rows; ++r) out.grad.row(r) *= static_cast<T>(row_scale[r]);
  out.loss = static_cast<T>(reduced.loss);
  out.metrics = sums.finalize();
  return out;
}

/// The PSFT objective: policy_loss with advantage 1 on every token.
template <class T>
LossResult<T> psft_loss(const TokenArray<T>& logp, const TokenArray<T>& old_logp,
                        const TokenArray<T>& mask, const LossOptions& opts = {}) {
  return policy_loss<T>(logp, old_logp, TokenArray<T>::Ones(logp.rows(), logp.cols()), mask, opts);
}

}  // namespace eigen
PSFT_NAMESPACE_END
