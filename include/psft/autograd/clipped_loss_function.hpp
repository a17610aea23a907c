#pragma once
/// \file
/// The custom autograd Function of the clipped objective. Forward runs one
/// backend pass that also produces the gradient (the fused CPU backend) or
/// the gradient coefficients (the others); backward hands the gradient on,
/// or is a single pass over the coefficients. Saves only those, not the
/// inputs.

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "psft/backend.hpp"
#include "psft/composed/clipped_loss.hpp"
#include "psft/core/config.hpp"
#include "psft/cpu/clipped_loss.hpp"
#include "psft/detail/clipped_loss_types.hpp"
// CUDA dispatch hook: the entry points exist only where psft_cuda.cu is
// linked in (psft_enable_cuda() in cmake/psftCuda.cmake defines the macro).
#if defined(PSFT_WITH_CUDA_KERNELS)
#include "psft/cuda/clipped_loss.hpp"
#endif

PSFT_NAMESPACE_BEGIN
namespace detail {

/// Runs the chosen backend's forward.
inline ClippedLossOutputs run_clipped_loss_forward(const ClippedLossInputs& in,
                                                   const LossOptions& opts, Backend backend,
                                                   bool need_grad) {
  if (backend == Backend::FusedCpu) return cpu::clipped_loss_forward(in, opts, need_grad);
#if defined(PSFT_WITH_CUDA_KERNELS)
  if (backend == Backend::FusedCuda) return cuda::clipped_loss_forward(in, opts, need_grad);
#endif
  TORCH_CHECK(backend == Backend::Composed, in.api, ": backend ", backend_name(backend),
              " is not available in this build");
  return composed::clipped_loss_forward(in, opts, need_grad);
}

/// Runs the backward of the backend that ran the forward from its
/// coefficients (backends that write the gradient in backward).
inline at::Tensor run_clipped_loss_backward(Backend backend, const at::Tensor& coef,
                                            const at::Tensor& scale, const at::Tensor& grad_output,
                                            at::ScalarType dtype) {
#if defined(PSFT_WITH_CUDA_KERNELS)
  if (backend == Backend::FusedCuda)
    return cuda::clipped_loss_backward(coef, scale, grad_output, dtype);
#endif
  (void)backend;
  return composed::clipped_loss_backward(coef, scale, grad_output, dtype);
}

}  // namespace detail

namespace autograd {

/// loss, metrics, token_loss_mean = ClippedLossFunction::apply(logp, &inputs, &options, backend)
/// Gradient flows to logp only; old_logp, advantages and mask are constants.
class ClippedLossFunction : public torch::autograd::Function<ClippedLossFunction> {
 public:
  /// Computes the loss and metrics in one fused pass and saves what backward
  /// needs: the gradient for grad_output 1 where the backend wrote it in
  /// the pass, else the per-token gradient coefficients and the
  /// reduction's scale. Returns {loss, metrics, token_loss_mean}.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logp,
                                                const detail::ClippedLossInputs* inputs,
                                                const LossOptions* opts, Backend backend) {
    (void)logp;  // also inputs->logp; passed separately so autograd sees the edge
    detail::ClippedLossOutputs out =
        detail::run_clipped_loss_forward(*inputs, *opts, backend, /*need_grad=*/true);
    ctx->saved_data["grad"] = out.grad;
    ctx->saved_data["coef"] = out.coef;
    ctx->saved_data["scale"] = out.scale;
    ctx->saved_data["dtype"] = static_cast<int64_t>(inputs->logp.scalar_type());
    ctx->saved_data["backend"] = static_cast<int64_t>(backend);
    ctx->mark_non_differentiable({out.metrics, out.token_loss_mean});
    return {out.loss, out.metrics, out.token_loss_mean};
  }

  /// d loss / d logp: the saved gradient, times grad_output unless it is
  /// exactly 1, or one pass over the saved coefficients; one entry per
  /// forward input.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: the clipped loss does not support double backward "
                "(backward with create_graph=true)");
    const at::Tensor& grad_loss = grads[0];
    at::Tensor grad_logp;  // undefined: no gradient reached the loss
    if (grad_loss.defined()) {
      const at::Tensor grad = ctx->saved_data["grad"].toTensor();
      if (grad.defined()) {
        // Handed on, not copied. The reference kept here stops autograd from
        // accumulating into it in place, so it serves a second backward
        // (retain_graph) as well.
        const double go = grad_loss.item<double>();
        grad_logp = go == 1.0 ? grad : grad * go;
      } else {
        const at::Tensor coef = ctx->saved_data["coef"].toTensor();
        const at::Tensor scale = ctx->saved_data["scale"].toTensor();
        const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
        const auto backend = static_cast<Backend>(ctx->saved_data["backend"].toInt());
        grad_logp = detail::run_clipped_loss_backward(backend, coef, scale, grad_loss, dtype);
      }
    }
    return {grad_logp,      // logp
            at::Tensor(),   // inputs (not a tensor)
            at::Tensor(),   // opts (not a tensor)
            at::Tensor()};  // backend (not a tensor)
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
