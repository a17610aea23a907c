#pragma once
/// \file
/// ASFT's autograd Functions. kl = AnchorKlFunction::apply(logits,
/// ref_logits, scored, temperature, chunk_bytes): per-token KL(pi_ref ||
/// pi_theta) over the vocabulary with ATen ops (composed/anchor_kl.hpp).
/// {logp, entropy, kl} = FusedAnchorFunction::apply(logits, ref_logits,
/// labels, opts, api): the same KL with the label's log-probability and the
/// entropy from one fused CPU pass over both rows (cpu/anchor_kl.hpp).
/// Gradient to the policy's logits only; the reference's logits are a
/// constant.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

#include "psft/autograd/token_logprobs_function.hpp"
#include "psft/composed/anchor_kl.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/cpu/anchor_kl.hpp"

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

/// The fused pass of asft_loss_from_logits on the CPU: logits and ref_logits
/// share one dtype and have a last dimension of stride 1; labels is flat,
/// contiguous and checked. Saves both logits (no copy) and four numbers per
/// token; backward is one more pass over both rows. The entropy is a metric
/// (not differentiable).
class FusedAnchorFunction : public torch::autograd::Function<FusedAnchorFunction> {
 public:
  /// {logp, entropy, kl}, flat, in the accumulation dtype.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits,
                                                const at::Tensor& ref_logits,
                                                const at::Tensor& labels, const LogitsOptions& opts,
                                                const char* api) {
    const at::ScalarType acc = detail::logits_accumulate_type(logits.scalar_type());
    const at::Tensor logp = at::empty(labels.sizes(), labels.options().dtype(acc));
    const at::Tensor entropy = at::empty(labels.sizes(), labels.options().dtype(acc));
    const at::Tensor kl = at::empty(labels.sizes(), labels.options().dtype(acc));
    const at::Tensor stats = at::empty({labels.numel(), 4}, labels.options().dtype(acc));
    cpu::anchor_kl_forward(api, logits, ref_logits, labels, opts, logp, entropy, kl, stats);
    ctx->save_for_backward({logits, ref_logits, labels, stats});
    ctx->saved_data["ignore_index"] = opts.ignore_index;
    ctx->saved_data["temperature"] = opts.temperature;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({entropy});
    return {logp, entropy, kl};
  }

  /// d / d logits from the gradients of logp and kl; one entry per forward input.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: the ASFT anchor does not support double backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& stats = saved[3];
    const auto flat = [&](const at::Tensor& g) {
      return g.defined() ? g.reshape({-1}).to(stats.scalar_type()).contiguous() : at::Tensor();
    };
    LogitsOptions opts;
    opts.ignore_index = ctx->saved_data["ignore_index"].toInt();
    opts.temperature = ctx->saved_data["temperature"].toDouble();
    const at::Tensor grad_logp = flat(grads[0]), grad_kl = flat(grads[2]);
    at::Tensor grad_logits;  // undefined: nothing reached logp or kl
    if (grad_logp.defined() || grad_kl.defined()) {
      grad_logits =
          cpu::anchor_kl_backward(saved[0], saved[1], saved[2], stats, grad_logp, grad_kl, opts);
    }
    return {grad_logits,    // logits
            at::Tensor(),   // ref_logits (a constant)
            at::Tensor(),   // labels (integer)
            at::Tensor(),   // opts (not a tensor)
            at::Tensor()};  // api (not a tensor)
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
