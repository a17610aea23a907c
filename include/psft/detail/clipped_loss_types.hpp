#pragma once
/// \file
/// Internal hand-off between the public ops, the autograd Function and the
/// backends of the clipped objective.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "psft/core/config.hpp"
#include "psft/core/objective.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN
namespace detail {

/// Validated inputs. advantages and mask may be undefined (A = 1, all tokens
/// count); a defined advantages tensor is expanded to logp's shape.
struct ClippedLossInputs {
  at::Tensor logp, old_logp, advantages, mask;
  std::int64_t rows = 0;                  ///< B ([N] inputs: 1)
  std::int64_t cols = 0;                  ///< T ([N] inputs: N)
  const char* api = "psft::policy_loss";  ///< prefix of error messages
  const char* old_name =
      "old_logp";  ///< old_logp's name in messages ("ref_logp" for the KL penalty)
  /// The objective rule (Note [Objective rules]); KlPenalty reads ref_logp
  /// in old_logp's place.
  core::RuleId rule = core::RuleId::Clipped;
  /// Which KL estimator the KlPenalty rule computes.
  core::KlEstimatorId kl_estimator = core::KlEstimatorId::K3;

  /// The rule's parameters in a kernel's accumulation type.
  template <class T>
  core::ObjectiveParams<T> params(const LossOptions& opts) const {
    core::ObjectiveParams<T> p = core::objective_params<T>(opts);
    p.kl_estimator = static_cast<int>(kl_estimator);
    return p;
  }
};

/// What a backend's forward returns.
struct ClippedLossOutputs {
  at::Tensor loss;     ///< 0-d, float (double for fp64 logp)
  at::Tensor metrics;  ///< [core::kMetricCount] float64, MetricValues order
  /// Backends that write the gradient in backward: logp's shape,
  /// accumulation dtype, w dl/dlogp; undefined without grad.
  at::Tensor coef;
  at::Tensor scale;  ///< with coef: [rows] (per-row reductions) or [1], the reduction's factor
  /// Backends that write the gradient in forward (the fused CPU one): d loss /
  /// d logp for grad_output 1, logp's shape and dtype; undefined without grad.
  at::Tensor grad;
  /// 0-d float64: sum(w l) / sum(w), the mask-weighted mean per-token loss
  /// (0 without tokens); the KL penalty's kl_mean.
  at::Tensor token_loss_mean;
};

/// Float accumulation for bf16/fp16/fp32, double for fp64.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

/// Padded length C of SeqMeanTokenSumNorm.
inline double norm_constant(const LossOptions& opts, std::int64_t cols) {
  return opts.norm_constant ? *opts.norm_constant : static_cast<double>(cols);
}

/// World size D the loss is multiplied by.
inline double world_size(const LossOptions& opts) {
  return opts.normaliser ? static_cast<double>(opts.normaliser->world_size) : 1.0;
}

}  // namespace detail
PSFT_NAMESPACE_END
