#pragma once
/// \file
/// kl = AnchorKlFunction::apply(logits, ref_logits, scored, temperature,
/// chunk_bytes): per-token KL(pi_ref || pi_theta) over the vocabulary
/// (composed/anchor_kl.hpp). Gradient to the policy's logits only; the
/// reference's logits are a constant.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

#include "psft/composed/anchor_kl.hpp"
#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace autograd {

/// Saves the two logits tensors (no copy) and recomputes the softmaxes in
/// backward, chunk by chunk.
class AnchorKlFunction : public torch::autograd::Function<AnchorKlFunction> {
 public:
  /// The per-token KL; saves the inputs (no copy) for backward.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& ref_logits, const at::Tensor& scored,
                            double temperature, std::int64_t chunk_bytes) {
    ctx->save_for_backward({logits, ref_logits, scored});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    return composed::anchor_kl_forward(logits, ref_logits, scored, temperature, chunk_bytes);
  }

  /// d / d logits, chunk by chunk; one entry per forward input.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: the ASFT anchor does not support double backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grads[0].defined()) {
      grad_logits = composed::anchor_kl_backward(
          saved[0], saved[1], saved[2], grads[0].contiguous(),
          ctx->saved_data["temperature"].toDouble(), ctx->saved_data["chunk_bytes"].toInt());
    }
    return {grad_logits,    // logits
            at::Tensor(),   // ref_logits (a constant)
            at::Tensor(),   // scored
            at::Tensor(),   // temperature
            at::Tensor()};  // chunk_bytes
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
