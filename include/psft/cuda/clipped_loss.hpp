#pragma once
/// \file
/// The fused CUDA backend of the clipped objective as the host dispatcher
/// sees it: ClippedLossInputs in, the entry points of psft_cuda.cu called,
/// ClippedLossOutputs out. Compiles with any C++ compiler; the entry points
/// must be linked in (psft_enable_cuda() in cmake/psftCuda.cmake), which is
/// why the dispatcher includes this header only under PSFT_WITH_CUDA_KERNELS.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/cuda/entry.hpp"
#include "psft/detail/clipped_loss_types.hpp"

PSFT_NAMESPACE_BEGIN
namespace cuda {

/// The entry point's configuration for these options.
inline psft_cuda_entry::ClippedLossConfig clipped_loss_config(const detail::ClippedLossInputs& in,
                                                              const LossOptions& opts,
                                                              bool need_grad) {
  psft_cuda_entry::ClippedLossConfig c;
  c.eps_low = opts.clip.eps_low;
  c.eps_high = opts.clip.eps_high;
  c.dual_clip = opts.clip.dual_clip ? *opts.clip.dual_clip : 0.0;
  c.log_ratio_clamp = opts.clip.log_ratio_clamp;
  c.delta = opts.clip.delta ? *opts.clip.delta : 0.0;
  c.rule = static_cast<int>(in.rule);
  c.cispo_cap = opts.objective.cispo_cap;
  c.sapo_tau_pos = opts.objective.sapo_tau_pos;
  c.sapo_tau_neg = opts.objective.sapo_tau_neg;
  c.kl_estimator = static_cast<int>(in.kl_estimator);
  c.reduction = static_cast<int>(opts.reduction);
  c.has_tokens = opts.normaliser && opts.normaliser->tokens;
  c.tokens = c.has_tokens ? *opts.normaliser->tokens : 0.0;
  c.has_sequences = opts.normaliser && opts.normaliser->sequences;
  c.sequences = c.has_sequences ? *opts.normaliser->sequences : 0.0;
  c.norm_constant = detail::norm_constant(opts, in.cols);
  c.world_size = detail::world_size(opts);
  c.check_finite = opts.check_finite;
  c.need_grad = need_grad;
  return c;
}

/// Forward: loss, metrics and (when need_grad) the gradient coefficients.
/// Synchronises with the device only when opts.check_finite is set (one
/// read of five numbers), as the composed backend does.
inline detail::ClippedLossOutputs clipped_loss_forward(const detail::ClippedLossInputs& in,
                                                       const LossOptions& opts, bool need_grad) {
  psft_cuda_entry::ClippedLossResult r =
      psft_cuda_entry::clipped_loss_forward(in.logp, in.old_logp, in.advantages, in.mask, in.rows,
                                            in.cols, clipped_loss_config(in, opts, need_grad));
  if (opts.check_finite) {
    const at::Tensor status = r.status.cpu();
    const double* s = status.data_ptr<double>();
    const auto flags = static_cast<unsigned>(s[0]);
    TORCH_CHECK(!(flags & 8u), in.api,
                ": logp has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(!(flags & 1u), in.api, ": ", in.old_name,
                " has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(!(flags & 2u), in.api,
                ": advantages has NaN or Inf at an unmasked token (set "
                "LossOptions::check_finite = false to skip this check)");
    TORCH_CHECK(!(flags & 4u), in.api, ": mask has a negative, NaN or Inf weight");
    if (s[1] != 0.0 || s[2] != 0.0) {
      const std::string error = core::normaliser_error(opts, s[3], s[4]);
      TORCH_CHECK(false, in.api, ": ",
                  error.empty() ? "normaliser smaller than this batch's own counts" : error);
    }
  }
  detail::ClippedLossOutputs out;
  out.loss = r.loss;
  out.metrics = r.metrics;
  out.coef = r.coef;
  out.scale = r.scale;
  // status [batch tokens, non-empty sequences, loss sum] (entry.hpp), on the device.
  const at::Tensor tokens = r.status.select(0, 3);
  out.token_loss_mean =
      at::where(tokens > 0, r.status.select(0, 5) / tokens, at::zeros_like(tokens));
  return out;
}

/// Backward: d loss / d logp in logp's dtype, one pass over the coefficients.
inline at::Tensor clipped_loss_backward(const at::Tensor& coef, const at::Tensor& scale,
                                        const at::Tensor& grad_output, at::ScalarType dtype) {
  return psft_cuda_entry::clipped_loss_backward(coef, scale, grad_output, dtype);
}

}  // namespace cuda
PSFT_NAMESPACE_END
