#pragma once
/// \file
/// The fused CPU backend of the clipped objective: tensors in, one kernel
/// pass that also writes the gradient, ClippedLossOutputs out.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective.hpp"
#include "psft/core/reduction.hpp"
#include "psft/cpu/clipped_loss_kernel.hpp"
#include "psft/detail/clipped_loss_types.hpp"

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// Describes a [rows, cols] or [cols] tensor (or an undefined one) to the kernel.
inline StridedInput strided_input(const at::Tensor& t) {
  StridedInput in;
  if (!t.defined()) return in;
  in.data = t.data_ptr();
  in.dtype = t.scalar_type();
  in.row_stride = t.dim() == 2 ? t.stride(0) : 0;
  in.col_stride = t.dim() == 2 ? t.stride(1) : t.stride(0);
  return in;
}

/// Forward: loss, metrics and (when need_grad) d loss / d logp for
/// grad_output 1, written in the same pass (Note [Gradient in the forward
/// pass]).
inline detail::ClippedLossOutputs clipped_loss_forward(const detail::ClippedLossInputs& in,
                                                       const LossOptions& opts, bool need_grad) {
  const at::ScalarType acc = detail::accumulate_type(in.logp.scalar_type());
  const bool acc_double = acc == at::ScalarType::Double;
  ForwardArgs args;
  args.rows = in.rows;
  args.cols = in.cols;
  args.logp = strided_input(in.logp);
  args.old_logp = strided_input(in.old_logp);
  args.advantages = strided_input(in.advantages);
  args.mask = strided_input(in.mask);
  args.check_finite = opts.check_finite;

  // The reduction's factors first, from the token counts, so that the pass
  // can write the gradient.
  const std::vector<double> row_tokens =
      acc_double ? row_token_counts<double>(args) : row_token_counts<float>(args);
  std::vector<double> row_scale(static_cast<std::size_t>(in.rows));
  const core::RowReduction scales =
      core::row_scales(opts, in.rows, in.cols, row_tokens.data(), row_scale.data());
  TORCH_CHECK(scales.error.empty(), in.api, ": ", scales.error);

  detail::ClippedLossOutputs out;
  GradTarget grad;
  if (need_grad) {
    out.grad = at::empty(in.logp.sizes(), in.logp.options());
    grad.data = out.grad.data_ptr();
    grad.dtype = out.grad.scalar_type();
    grad.scale = row_scale.data();
  }
  const ForwardResult fwd = core::visit_rule(in.rule, [&](auto rule) {
    using Rule = decltype(rule);
    if (acc_double) return clipped_loss_forward<Rule, double>(args, in.params<double>(opts), grad);
    return clipped_loss_forward<Rule, float>(args, in.params<float>(opts), grad);
  });
  TORCH_CHECK(!fwd.bad_logp, in.api,
              ": logp has NaN or Inf at an unmasked token (set "
              "LossOptions::check_finite = false to skip this check)");
  TORCH_CHECK(!fwd.bad_old, in.api, ": ", in.old_name,
              " has NaN or Inf at an unmasked token (set "
              "LossOptions::check_finite = false to skip this check)");
  TORCH_CHECK(!fwd.bad_advantage, in.api,
              ": advantages has NaN or Inf at an unmasked token (set "
              "LossOptions::check_finite = false to skip this check)");
  TORCH_CHECK(!fwd.bad_mask, in.api, ": mask has a negative, NaN or Inf weight");

  out.loss = at::scalar_tensor(core::reduced_loss(opts.reduction, in.rows, fwd.row_loss.data(),
                                                  row_tokens.data(), scales.global_factor),
                               at::TensorOptions().dtype(acc));
  double loss_sum = 0, tokens = 0;
  for (std::size_t r = 0; r < fwd.row_loss.size(); ++r) {
    loss_sum += fwd.row_loss[r];
    tokens += row_tokens[r];
  }
  out.token_loss_mean = at::scalar_tensor(tokens > 0 ? loss_sum / tokens : 0.0,
                                          at::TensorOptions().dtype(at::kDouble));

  const core::MetricValues m = fwd.metrics.finalize();
  out.metrics =
      at::tensor({m.clip_frac, m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low, m.approx_kl_k1,
                  m.approx_kl_k3, m.ratio_mean, m.ratio_min, m.ratio_max, m.token_count},
                 at::TensorOptions().dtype(at::kDouble));
  return out;
}

}  // namespace cpu
PSFT_NAMESPACE_END
