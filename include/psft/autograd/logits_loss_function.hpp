#pragma once
/// \file
/// The custom autograd Function of a from-logits loss whose gradient the
/// fused CPU kernel writes in its forward pass (Note [Gradient in the
/// forward pass], cpu/logits_kernel.hpp): one read of the logits gives
/// logp, entropy, the loss and d loss / d logits; backward hands that
/// gradient on, scaled by grad_output unless it is exactly 1. Used by
/// psft_loss_from_logits and policy_loss_from_logits on the fused CPU
/// backend (logits.hpp).

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdint>
#include <functional>
#include <utility>

#include "psft/autograd/token_logprobs_function.hpp"
#include "psft/backend.hpp"
#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/objective_rule.hpp"

PSFT_NAMESPACE_BEGIN
namespace detail {

/// The gradient coefficients of one row of a token-ratio clipped loss
/// (cpu::token_logprobs_forward_backward's row_grad): g = d loss / d logp,
/// as ClippedLossFunction's backward gives it for grad_output 1, and the
/// entropy bonus's h = d loss / d H. Both are kept in g_out and h_out
/// ([N], zero for rows that are not scored) for a second backward.
template <class Rule, class acc_t>
struct ClippedRowGrad {
  using acc_type = acc_t;                 ///< the accumulation type it runs in
  const acc_t* old = nullptr;             ///< [N] old log-probabilities; null: old = logp
  const acc_t* adv = nullptr;             ///< [N] advantages; null: A = 1
  const double* scale = nullptr;          ///< [N] the reduction's factor (token_scales)
  core::ObjectiveParams<acc_t> params{};  ///< the rule's parameters
  double entropy_coeff = 0;               ///< the entropy bonus: h = -entropy_coeff * scale
  acc_t* g_out = nullptr;                 ///< [N] where g is kept
  acc_t* h_out = nullptr;                 ///< [N] where h is kept

  /// {g, h} of row r with log-probability logp.
  std::pair<acc_t, acc_t> operator()(std::int64_t r, acc_t logp, acc_t /*entropy*/) const {
    const core::TokenObjective<acc_t> t =
        core::rule_terms<Rule>(logp, old ? old[r] : logp, adv ? adv[r] : acc_t(1), params);
    const acc_t g = t.grad * static_cast<acc_t>(scale[r]);
    const acc_t h = static_cast<acc_t>(scale[r] * -entropy_coeff);
    g_out[r] = g;
    h_out[r] = h;
    return {g, h};
  }
};

/// What a fused from-logits loss supplies to LogitsLossFunction.
struct LogitsLossHooks {
  /// (logp, entropy, stats, g, h) -> d loss / d logits: runs the fused
  /// pass, filling logp and entropy ([N]), stats ([N, 3]) and the rows'
  /// gradient coefficients g and h ([N], zero-initialised).
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&)>
      forward;
  /// (logp, entropy) in labels' shape -> the loss, 0-d, after the pass.
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&)> finish;
};

}  // namespace detail

namespace autograd {

/// loss, logp, entropy = LogitsLossFunction::apply(logits, labels, opts, &hooks)
/// labels: checked, contiguous int64. Gradient flows to logits from the
/// loss (computed in forward) and from logp and entropy (entropy only when
/// opts.entropy_grad), whose gradients backward adds with one more pass.
/// The loss's gradient, a [tokens, V] tensor in the logits' dtype, is held
/// from forward until the first backward takes it. A backward that also
/// has gradients of logp or entropy, or a second one (retain_graph),
/// makes one pass over the logits from the saved coefficients instead.
class LogitsLossFunction : public torch::autograd::Function<LogitsLossFunction> {
 public:
  /// One fused pass: returns {loss, logp, entropy} (logp and entropy in
  /// labels' shape, float32; float64 for float64 logits).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& labels,
                                                const LogitsOptions& opts,
                                                const detail::LogitsLossHooks* hooks) {
    const at::ScalarType acc = detail::logits_accumulate_type(logits.scalar_type());
    const at::TensorOptions acc_opts = labels.options().dtype(acc);
    const at::Tensor logp = at::empty(labels.sizes(), acc_opts);
    const at::Tensor entropy = at::empty(labels.sizes(), acc_opts);
    const at::Tensor stats = at::empty({labels.numel(), 3}, acc_opts);
    const at::Tensor g = at::zeros({labels.numel()}, acc_opts);
    const at::Tensor h = at::zeros({labels.numel()}, acc_opts);
    const at::Tensor dlogits = hooks->forward(logp, entropy, stats, g, h);
    const at::Tensor loss = hooks->finish(logp, entropy);

    ctx->save_for_backward({logits, labels});
    detail::save_logits_backward_state(ctx, stats, opts, Backend::FusedCpu);
    ctx->saved_data["dlogits"] = dlogits;
    ctx->saved_data["g"] = g;
    ctx->saved_data["h"] = h;
    ctx->set_materialize_grads(false);
    if (!opts.entropy_grad) ctx->mark_non_differentiable({entropy});
    return {loss, logp, entropy};
  }

  /// d / d logits: the forward's gradient times grad_output, plus the
  /// gradients that reached logp and entropy.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: the from-logits loss does not support double backward "
                "(backward with create_graph=true)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor logits = detail::vocab_contiguous(saved[0]);
    const at::Tensor& labels = saved[1];
    const detail::LogitsBackwardState state = detail::load_logits_backward_state(ctx);
    const auto flat = [&](const at::Tensor& t) {
      return t.defined() ? t.reshape({-1}).to(state.stats.scalar_type()).contiguous()
                         : at::Tensor();
    };

    const at::Tensor grad_logp = flat(grads[1]);
    const at::Tensor grad_entropy = state.opts.entropy_grad ? flat(grads[2]) : at::Tensor();
    c10::IValue& held = ctx->saved_data["dlogits"];
    if (grads[0].defined() && !grad_logp.defined() && !grad_entropy.defined() && held.isTensor()) {
      // Taken, not copied: with no other reference left, autograd can keep
      // this very buffer as logits.grad().
      at::Tensor grad_logits = held.toTensor();
      held = c10::IValue();
      const double go = grads[0].item<double>();
      if (go != 1.0) grad_logits.mul_(go);
      return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // The saved coefficients times grad_output plus what reached logp and
    // entropy, in one pass and one rounding: a second backward (retain_graph)
    // or a gradient through the per-token outputs.
    held = c10::IValue();  // the held gradient is not needed any more
    at::Tensor g = grad_logp, h = grad_entropy;
    if (grads[0].defined()) {
      const double go = grads[0].item<double>();
      const at::Tensor loss_g = ctx->saved_data["g"].toTensor() * go;
      const at::Tensor loss_h = ctx->saved_data["h"].toTensor() * go;
      g = g.defined() ? g + loss_g : loss_g;
      h = h.defined() ? h + loss_h : loss_h;
    }
    at::Tensor grad_logits;  // undefined: nothing reached the outputs
    if (g.defined() || h.defined()) {
      grad_logits = detail::run_token_logprobs_backward(logits, labels, state.stats, g, h,
                                                        state.opts, state.backend);
    }
    return {grad_logits,    // logits
            at::Tensor(),   // labels (integer)
            at::Tensor(),   // opts (not a tensor)
            at::Tensor()};  // hooks (not a tensor)
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
