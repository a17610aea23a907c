#pragma once
/// \file
/// The custom autograd Function from logits to per-token log-probabilities
/// and entropy. Forward is one pass over the logits (fused CPU kernel or
/// chunked composed ops); backward is one more pass that writes the gradient
/// in the logits' dtype. Saves the logits themselves (the graph holds them
/// anyway), the labels and three numbers per token (row max, log-sum-exp
/// relative to it, mean shifted logit), never a [tokens, V] intermediate.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdint>

#include "psft/backend.hpp"
#include "psft/composed/logits.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/cpu/logits.hpp"
// CUDA dispatch hook (see autograd/clipped_loss_function.hpp).
#if defined(PSFT_WITH_CUDA_KERNELS)
#include "psft/cuda/logits.hpp"
#endif

PSFT_NAMESPACE_BEGIN
namespace detail {

/// Float32 for float32/bfloat16/float16 logits, float64 for float64.
inline at::ScalarType logits_accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

/// The logits as the kernels read them: last dimension with stride 1. A
/// tensor without that gets one contiguous copy per pass (documented in
/// token_logprobs).
inline at::Tensor vocab_contiguous(const at::Tensor& logits) {
  return logits.size(-1) <= 1 || logits.stride(-1) == 1 ? logits : logits.contiguous();
}

/// Runs the chosen backend's forward. logp and entropy have labels' shape
/// and the accumulation dtype; stats is [N, 3] or undefined (no backward).
inline void run_token_logprobs_forward(const char* api, const at::Tensor& logits,
                                       const at::Tensor& labels, const LogitsOptions& opts,
                                       Backend backend, const at::Tensor& logp,
                                       const at::Tensor& entropy, const at::Tensor& stats) {
  const at::Tensor readable = vocab_contiguous(logits);
  if (backend == Backend::FusedCpu) {
    cpu::token_logprobs_forward(api, readable, labels, opts, logp, entropy, stats);
#if defined(PSFT_WITH_CUDA_KERNELS)
  } else if (backend == Backend::FusedCuda) {
    cuda::token_logprobs_forward(api, readable, labels, opts, logp, entropy, stats);
#endif
  } else {
    TORCH_CHECK(backend == Backend::Composed, api, ": backend ", backend_name(backend),
                " has no logits kernel in this build");
    composed::token_logprobs_forward(api, readable, labels, opts, logp, entropy, stats);
  }
}

/// Runs the backward of the backend that ran the forward: d(sum grad_logp
/// logp + grad_entropy entropy) / d logits, contiguous, in the logits' dtype.
/// grad_logp and grad_entropy are contiguous in the accumulation dtype, or
/// undefined (zero); logits has a last dimension of stride 1.
inline at::Tensor run_token_logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                                              const at::Tensor& stats, const at::Tensor& grad_logp,
                                              const at::Tensor& grad_entropy,
                                              const LogitsOptions& opts, Backend backend) {
  if (backend == Backend::FusedCpu) {
    return cpu::token_logprobs_backward(logits, labels, stats, grad_logp, grad_entropy, opts);
  }
#if defined(PSFT_WITH_CUDA_KERNELS)
  if (backend == Backend::FusedCuda) {
    return cuda::token_logprobs_backward(logits, labels, stats, grad_logp, grad_entropy, opts);
  }
#endif
  return composed::token_logprobs_backward(logits, labels, stats, grad_logp, grad_entropy, opts);
}

/// Stores in ctx what a logits backward reads: the stats of the forward
/// pass, the options and the backend (see load_logits_backward_state).
inline void save_logits_backward_state(torch::autograd::AutogradContext* ctx,
                                       const at::Tensor& stats, const LogitsOptions& opts,
                                       Backend backend) {
  ctx->saved_data["stats"] = stats;
  ctx->saved_data["ignore_index"] = opts.ignore_index;
  ctx->saved_data["temperature"] = opts.temperature;
  ctx->saved_data["entropy_grad"] = opts.entropy_grad;
  ctx->saved_data["composed_chunk_bytes"] = opts.composed_chunk_bytes;
  ctx->saved_data["backend"] = static_cast<int64_t>(backend);
}

/// What save_logits_backward_state stored.
struct LogitsBackwardState {
  /// [N, 3] per-row statistics of the forward pass.
  at::Tensor stats;
  /// The options backward needs (the others keep their defaults).
  LogitsOptions opts;
  /// The backend the forward pass ran on.
  Backend backend = Backend::Auto;
};

/// Reads what save_logits_backward_state stored.
inline LogitsBackwardState load_logits_backward_state(torch::autograd::AutogradContext* ctx) {
  LogitsBackwardState state;
  state.stats = ctx->saved_data["stats"].toTensor();
  state.opts.ignore_index = ctx->saved_data["ignore_index"].toInt();
  state.opts.temperature = ctx->saved_data["temperature"].toDouble();
  state.opts.entropy_grad = ctx->saved_data["entropy_grad"].toBool();
  state.opts.composed_chunk_bytes = ctx->saved_data["composed_chunk_bytes"].toInt();
  state.backend = static_cast<Backend>(ctx->saved_data["backend"].toInt());
  return state;
}

}  // namespace detail

namespace autograd {

/// logp, entropy = TokenLogprobsFunction::apply(logits, labels, opts, backend, api)
/// labels is flat, contiguous int64 on the logits' device with values
/// already checked. Gradient flows to logits only; entropy is
/// differentiable only when opts.entropy_grad.
class TokenLogprobsFunction : public torch::autograd::Function<TokenLogprobsFunction> {
 public:
  /// Log-probabilities of the labels and token entropies from the logits,
  /// one fused pass. Returns {logp, entropy}.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& labels,
                                                const LogitsOptions& opts, Backend backend,
                                                const char* api) {
    const at::ScalarType acc = detail::logits_accumulate_type(logits.scalar_type());
    const at::Tensor logp = at::empty(labels.sizes(), labels.options().dtype(acc));
    const at::Tensor entropy = at::empty(labels.sizes(), labels.options().dtype(acc));
    const at::Tensor stats = at::empty({labels.numel(), 3}, labels.options().dtype(acc));
    detail::run_token_logprobs_forward(api, logits, labels, opts, backend, logp, entropy, stats);

    ctx->save_for_backward({logits, labels});
    detail::save_logits_backward_state(ctx, stats, opts, backend);
    // Unused outputs reach backward as undefined tensors, not zeros, so a
    // metric-only entropy costs nothing there.
    ctx->set_materialize_grads(false);
    if (!opts.entropy_grad) ctx->mark_non_differentiable({entropy});
    return {logp, entropy};
  }

  /// d / d logits from the incoming gradients of logp (and of the entropy
  /// when it is differentiable); one entry per forward input.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: token_logprobs does not support double backward "
                "(backward with create_graph=true)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& labels = saved[1];
    const detail::LogitsBackwardState state = detail::load_logits_backward_state(ctx);
    const at::Tensor& stats = state.stats;
    const LogitsOptions& opts = state.opts;

    const auto flat = [&](const at::Tensor& g) {
      return g.defined() ? g.reshape({-1}).to(stats.scalar_type()).contiguous() : at::Tensor();
    };
    const at::Tensor grad_logp = flat(grads[0]);
    const at::Tensor grad_entropy = opts.entropy_grad ? flat(grads[1]) : at::Tensor();
    at::Tensor grad_logits;  // undefined: nothing reached logp or entropy
    if (grad_logp.defined() || grad_entropy.defined()) {
      grad_logits =
          detail::run_token_logprobs_backward(detail::vocab_contiguous(logits), labels, stats,
                                              grad_logp, grad_entropy, opts, state.backend);
    }
    return {grad_logits,    // logits
            at::Tensor(),   // labels (integer)
            at::Tensor(),   // opts (not a tensor)
            at::Tensor(),   // backend (not a tensor)
            at::Tensor()};  // api (not a tensor)
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
