#pragma once
/// \file
/// The fused CPU backend of the clipped objective: tensors in, one kernel
/// pass, ClippedLossOutputs out; and its one-pass backward.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
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

/// Forward: loss, metrics and (when need_grad) the gradient coefficients.
inline detail::ClippedLossOutputs clipped_loss_forward(const detail::ClippedLossInputs& in,
                                                       const LossOptions& opts, bool need_grad) {
  const at::ScalarType acc = detail::accumulate_type(in.logp.scalar_type());
  ForwardArgs args;
  args.rows = in.rows;
  args.cols = in.cols;
  args.logp = strided_input(in.logp);
  args.old_logp = strided_input(in.old_logp);
  args.advantages = strided_input(in.advantages);
  args.mask = strided_input(in.mask);
  args.check_finite = opts.check_finite;

  detail::ClippedLossOutputs out;
  if (need_grad) out.coef = at::empty(in.logp.sizes(), in.logp.options().dtype(acc));
  const ForwardResult fwd = core::visit_rule(in.rule, [&](auto rule) {
    using Rule = decltype(rule);
    if (acc == at::ScalarType::Double) {
      return clipped_loss_forward<Rule, double>(args, in.params<double>(opts),
                                                need_grad ? out.coef.data_ptr<double>() : nullptr);
    }
    return clipped_loss_forward<Rule, float>(args, in.params<float>(opts),
                                             need_grad ? out.coef.data_ptr<float>() : nullptr);
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

  // Only SeqMeanTokenMean scales rows differently; the other reductions
  // keep a single scale so that backward reads one number.
  const bool per_row = core::uses_row_factor(opts.reduction);
  out.scale = at::empty({per_row ? in.rows : 1}, at::TensorOptions().dtype(at::kDouble));
  std::vector<double> row_scale(static_cast<std::size_t>(in.rows));
  const core::RowReduction reduced = core::reduce_rows(opts, in.rows, in.cols, fwd.row_loss.data(),
                                                       fwd.row_tokens.data(), row_scale.data());
  TORCH_CHECK(reduced.error.empty(), in.api, ": ", reduced.error);
  if (per_row) {
    std::copy(row_scale.begin(), row_scale.end(), out.scale.data_ptr<double>());
  } else {
    out.scale.data_ptr<double>()[0] = reduced.global_factor;
  }
  out.loss = at::scalar_tensor(reduced.loss, at::TensorOptions().dtype(acc));
  double loss_sum = 0, tokens = 0;
  for (std::size_t r = 0; r < fwd.row_loss.size(); ++r) {
    loss_sum += fwd.row_loss[r];
    tokens += fwd.row_tokens[r];
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

/// Backward: d loss / d logp in logp's dtype, one pass over the coefficients.
inline at::Tensor clipped_loss_backward(const at::Tensor& coef, const at::Tensor& scale,
                                        const at::Tensor& grad_output, at::ScalarType dtype) {
  at::Tensor grad = at::empty(coef.sizes(), coef.options().dtype(dtype));
  const std::int64_t cols = coef.dim() == 2 ? coef.size(1) : coef.numel();
  const std::int64_t rows = cols == 0 ? 0 : coef.numel() / cols;
  if (coef.numel() == 0) return grad;
  const double go = grad_output.to(at::kDouble).item<double>();
  const bool per_row = scale.numel() > 1;
  const double* s = scale.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "psft_clipped_loss_backward", [&] {
        if (coef.scalar_type() == at::kDouble) {
          clipped_loss_backward<scalar_t, double>(rows, cols, coef.data_ptr<double>(), s, per_row,
                                                  go, grad.data_ptr<scalar_t>());
        } else {
          clipped_loss_backward<scalar_t, float>(rows, cols, coef.data_ptr<float>(), s, per_row, go,
                                                 grad.data_ptr<scalar_t>());
        }
      });
  return grad;
}

}  // namespace cpu
PSFT_NAMESPACE_END
