#pragma once
/// \file
/// The custom autograd Functions from the last hidden state to per-token
/// results with the LM head fused in (Note [From hidden, chunked]):
/// HiddenLogprobsFunction (log-probabilities and entropy; backward
/// recomputes each chunk's logits) and HiddenLossFunction (a loss whose
/// gradients wrt hidden, weight and bias are computed in its forward pass;
/// backward only scales them). Neither ever allocates a [tokens, V] tensor.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "psft/autograd/token_logprobs_function.hpp"
#include "psft/backend.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"

PSFT_NAMESPACE_BEGIN

// Note [From hidden, chunked]
// logits = hidden @ weight^T (+ bias) is computed a chunk of tokens at a
// time, by the backend's GEMM in the inputs' dtype, and each chunk's
// logits go straight to the fused per-row logits kernel while they are
// still the most recent thing written. Only the scored tokens (label !=
// ignore_index) are multiplied: when some are not, each chunk gathers its
// rows of hidden by index, so prompt and padding tokens cost no GEMM. The
// chunk schedule (HiddenPlan) depends only on the labels, the dtype, V and
// the options, and every pass over the same inputs uses it, with the same
// GEMM calls in the same order: token_logprobs_from_hidden under no-grad
// and a loss's forward give bitwise identical log-probabilities, so PSFT's
// ratio is exactly 1 for unchanged weights. The largest temporaries are one
// chunk's logits and its gradient, [chunk, V] each in the inputs' dtype.

namespace detail {

/// A per-row logits pass other than the fused kernels of the plan's
/// backend: the vocabulary-parallel one (psft/distributed/vocab_parallel.hpp),
/// whose every chunk communicates. Only HiddenLossFunction and the no-grad
/// pass run one (HiddenLogprobsFunction's backward could not reach it).
struct RowPass {
  virtual ~RowPass() = default;
  /// Fills logp and entropy ([len]) and stats ([len, 3], or undefined: no
  /// backward follows) from the logits [len, V'] and labels [len] of the
  /// chunk of the plan's rows [start, start + len).
  virtual void forward(const char* api, std::int64_t start, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& entropy,
                       const at::Tensor& stats) const = 0;
  /// The dlogits of the chunk forward saw last, from the gradients of its
  /// logp and entropy (called at most once per chunk, right after forward).
  virtual at::Tensor backward(const at::Tensor& logits, const at::Tensor& labels,
                              const at::Tensor& stats, const at::Tensor& grad_logp,
                              const at::Tensor& grad_entropy) const = 0;
  /// Completes hidden's [N, H] gradient after the last chunk (a sharded
  /// head sums the ranks' parts).
  virtual void finish_grad_hidden(at::Tensor& grad_hidden) const = 0;
};

/// The chunk schedule of a from-hidden pass over validated inputs.
struct HiddenPlan {
  at::Tensor hidden;        ///< [N, H] (a view of the caller's tensor where possible)
  at::Tensor weight;        ///< [V, H]
  at::Tensor bias;          ///< [V] or undefined
  at::Tensor labels;        ///< [N] contiguous int64, already checked
  at::Tensor positions;     ///< [M] int64 flat indices of the scored tokens; undefined: all N
  std::int64_t tokens = 0;  ///< N
  std::int64_t scored = 0;  ///< M: rows the passes multiply
  std::int64_t chunk = 1;   ///< rows per chunk (>= 1)
  LogitsOptions opts;       ///< the per-row kernel's options
  Backend backend = Backend::Auto;                       ///< resolved: the per-row kernel's backend
  const char* api = "psft::token_logprobs_from_hidden";  ///< prefix of error messages
  const RowPass* rows = nullptr;  ///< the per-row pass; null: the fused kernels of backend

  /// The flat token indices of rows [start, start + len) of the schedule.
  at::Tensor chunk_positions(std::int64_t start, std::int64_t len) const {
    if (positions.defined()) return positions.narrow(0, start, len);
    return at::arange(start, start + len, labels.options());
  }

  /// hidden's rows [start, start + len) of the schedule, [len, H].
  at::Tensor chunk_hidden(std::int64_t start, std::int64_t len) const {
    if (positions.defined()) return hidden.index_select(0, positions.narrow(0, start, len));
    return hidden.narrow(0, start, len);
  }

  /// The labels of rows [start, start + len), contiguous.
  at::Tensor chunk_labels(std::int64_t start, std::int64_t len) const {
    if (positions.defined()) return labels.index_select(0, positions.narrow(0, start, len));
    return labels.narrow(0, start, len);
  }

  /// hidden_c @ weight^T (+ bias), [len, V] in the inputs' dtype: the one
  /// place a from-hidden pass computes logits.
  at::Tensor chunk_logits(const at::Tensor& hidden_c) const {
    return bias.defined() ? at::addmm(bias, hidden_c, weight.t()) : at::mm(hidden_c, weight.t());
  }

  /// The error prefix for rows [start, ...): names the chunk, whose logits
  /// the per-row kernel reports by row within it.
  std::string chunk_api(std::int64_t start) const {
    return std::string(api) + " (logits = hidden @ weight^T of the chunk from scored token " +
           std::to_string(start) + ")";
  }

  /// Writes a chunk's per-token values (contiguous, [len]) at its tokens of
  /// out ([N]).
  void scatter(const at::Tensor& out, std::int64_t start, const at::Tensor& values) const {
    if (positions.defined()) {
      out.index_copy_(0, positions.narrow(0, start, values.size(0)), values);
    } else {
      out.narrow(0, start, values.size(0)).copy_(values);
    }
  }

  /// A [N] tensor's values at rows [start, start + len), contiguous.
  at::Tensor gather(const at::Tensor& flat, std::int64_t start, std::int64_t len) const {
    if (positions.defined()) return flat.index_select(0, positions.narrow(0, start, len));
    return flat.narrow(0, start, len).contiguous();
  }
};

/// Gradients of hidden, weight and bias accumulated chunk by chunk from
/// each chunk's dlogits.
struct HiddenGrads {
  at::Tensor hidden;  ///< [N, H] in hidden's dtype, or undefined (not needed)
  at::Tensor weight;  ///< [V, H] in weight's dtype, or undefined
  at::Tensor bias;    ///< [V] accumulated in float32 (float64 for float64), or undefined
  bool any_weight_chunk = false;  ///< whether weight holds a chunk's product yet

  /// Allocates what the inputs that require a gradient need.
  HiddenGrads(const HiddenPlan& plan, bool need_hidden, bool need_weight, bool need_bias) {
    if (need_hidden) {
      const at::MemoryFormat dense = at::MemoryFormat::Contiguous;
      hidden = plan.positions.defined() || plan.scored == 0 ? at::zeros_like(plan.hidden, dense)
                                                            : at::empty_like(plan.hidden, dense);
    }
    if (need_weight) weight = at::empty_like(plan.weight, at::MemoryFormat::Contiguous);
    if (need_bias) {
      bias = at::zeros(plan.bias.sizes(),
                       plan.bias.options().dtype(logits_accumulate_type(plan.bias.scalar_type())));
    }
  }

  /// Adds the contribution of rows [start, start + len) whose logits have
  /// gradient grad_logits ([len, V]).
  void add(const HiddenPlan& plan, std::int64_t start, const at::Tensor& hidden_c,
           const at::Tensor& grad_logits) {
    if (hidden.defined()) {
      if (plan.positions.defined()) {
        hidden.index_copy_(0, plan.positions.narrow(0, start, grad_logits.size(0)),
                           at::mm(grad_logits, plan.weight));
      } else {
        at::Tensor rows = hidden.narrow(0, start, grad_logits.size(0));
        at::mm_out(rows, grad_logits, plan.weight);
      }
    }
    if (weight.defined()) {
      weight.addmm_(grad_logits.t(), hidden_c, /*beta=*/any_weight_chunk ? 1 : 0);
      any_weight_chunk = true;
    }
    if (bias.defined()) bias.add_(grad_logits.sum(0, /*keepdim=*/false, bias.scalar_type()));
  }

  /// The finished gradients: weight zero if no chunk ran, bias in its dtype.
  void finish(const HiddenPlan& plan) {
    if (weight.defined() && !any_weight_chunk) weight.zero_();
    if (bias.defined()) bias = bias.to(plan.bias.scalar_type());
  }
};

/// Per-token results of the chunk loop: [N] in the accumulation dtype, 0 at
/// tokens that are not scored.
struct HiddenTokenValues {
  at::Tensor logp;     ///< log p(label)
  at::Tensor entropy;  ///< token entropy
};

/// The chunk loop shared by every from-hidden pass: for each chunk, its
/// logits, the per-row forward kernel (logp, entropy and, when stats is
/// defined ([M, 3]), what its backward needs), then on_chunk(start,
/// hidden_c, logits_c, labels_c, logp_c, entropy_c, stats_c).
template <class OnChunk>
HiddenTokenValues run_hidden_chunks(const HiddenPlan& plan, const at::Tensor& stats,
                                    OnChunk&& on_chunk) {
  const at::ScalarType acc = logits_accumulate_type(plan.hidden.scalar_type());
  const at::TensorOptions acc_opts = plan.labels.options().dtype(acc);
  HiddenTokenValues out;
  out.logp = at::zeros({plan.tokens}, acc_opts);
  out.entropy = at::zeros({plan.tokens}, acc_opts);
  for (std::int64_t start = 0; start < plan.scored; start += plan.chunk) {
    const std::int64_t len = std::min(plan.chunk, plan.scored - start);
    const at::Tensor hidden_c = plan.chunk_hidden(start, len);
    const at::Tensor labels_c = plan.chunk_labels(start, len);
    const at::Tensor logits_c = plan.chunk_logits(hidden_c);
    const at::Tensor logp_c = at::empty({len}, acc_opts);
    const at::Tensor entropy_c = at::empty({len}, acc_opts);
    const at::Tensor stats_c = stats.defined() ? stats.narrow(0, start, len) : at::Tensor();
    const std::string api = plan.chunk_api(start);
    if (plan.rows) {
      plan.rows->forward(api.c_str(), start, logits_c, labels_c, logp_c, entropy_c, stats_c);
    } else {
      run_token_logprobs_forward(api.c_str(), logits_c, labels_c, plan.opts, plan.backend, logp_c,
                                 entropy_c, stats_c);
    }
    plan.scatter(out.logp, start, logp_c);
    plan.scatter(out.entropy, start, entropy_c);
    on_chunk(start, hidden_c, logits_c, labels_c, logp_c, entropy_c, stats_c);
  }
  return out;
}

/// What a from-hidden loss supplies to HiddenLossFunction: the gradient of
/// the loss wrt each chunk's logp and entropy, and the loss's value.
struct HiddenLossHooks {
  /// (flat positions [len], logp_c, entropy_c) -> {d loss / d logp_c,
  /// d loss / d entropy_c (undefined: 0)}, contiguous in the accumulation
  /// dtype. Called once per chunk, in order, during the forward pass.
  std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&)>
      token_grads;
  /// (logp [N], entropy [N]) -> the loss, 0-d, after the last chunk.
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&)> finish;
  /// The loop's per-token values, set by HiddenLossFunction::forward.
  HiddenTokenValues values;
};

/// Whether t is defined and requires a gradient.
inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

}  // namespace detail

namespace autograd {

/// logp, entropy = HiddenLogprobsFunction::apply(hidden, weight, bias, &plan)
/// (bias: plan.bias, or an empty placeholder when there is none)
/// Gradient flows to hidden, weight and bias (the plan holds flat views of
/// them); entropy is differentiable only when plan.opts.entropy_grad.
/// Saves the inputs and three numbers per scored token; backward
/// recomputes each chunk's logits with the forward's GEMM.
class HiddenLogprobsFunction : public torch::autograd::Function<HiddenLogprobsFunction> {
 public:
  /// One pass over the chunks. Returns {logp, entropy}, [N] each.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& bias,
                                                const detail::HiddenPlan* plan) {
    TORCH_INTERNAL_ASSERT(!plan->rows, "a RowPass has no recomputing backward");
    const at::ScalarType acc = detail::logits_accumulate_type(hidden.scalar_type());
    const at::Tensor stats = at::empty({plan->scored, 3}, plan->labels.options().dtype(acc));
    const detail::HiddenTokenValues v = detail::run_hidden_chunks(*plan, stats, [](auto&&...) {});
    ctx->save_for_backward({hidden, weight, plan->bias.defined() ? bias : at::Tensor()});
    ctx->saved_data["labels"] = plan->labels;
    ctx->saved_data["positions"] = plan->positions;
    ctx->saved_data["scored"] = plan->scored;
    ctx->saved_data["chunk"] = plan->chunk;
    detail::save_logits_backward_state(ctx, stats, plan->opts, plan->backend);
    ctx->set_materialize_grads(false);
    if (!plan->opts.entropy_grad) ctx->mark_non_differentiable({v.entropy});
    return {v.logp, v.entropy};
  }

  /// d / d(hidden, weight, bias) from the gradients of logp and entropy,
  /// one recomputing pass over the chunks.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: token_logprobs_from_hidden does not support double backward "
                "(backward with create_graph=true)");
    const auto saved = ctx->get_saved_variables();
    const detail::LogitsBackwardState state = detail::load_logits_backward_state(ctx);
    detail::HiddenPlan plan;
    plan.hidden = saved[0].reshape({-1, saved[0].size(-1)});
    plan.weight = saved[1];
    plan.bias = saved[2];
    plan.labels = ctx->saved_data["labels"].toTensor();
    const c10::IValue positions = ctx->saved_data["positions"];
    if (positions.isTensor()) plan.positions = positions.toTensor();
    plan.tokens = plan.labels.numel();
    plan.scored = ctx->saved_data["scored"].toInt();
    plan.chunk = ctx->saved_data["chunk"].toInt();
    plan.opts = state.opts;
    plan.backend = state.backend;

    const auto flat = [&](const at::Tensor& g) {
      return g.defined() ? g.reshape({-1}).to(state.stats.scalar_type()) : at::Tensor();
    };
    const at::Tensor grad_logp = flat(grads[0]);
    const at::Tensor grad_entropy = plan.opts.entropy_grad ? flat(grads[1]) : at::Tensor();
    if (!grad_logp.defined() && !grad_entropy.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    detail::HiddenGrads g(plan, ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                          plan.bias.defined() && ctx->needs_input_grad(2));
    for (std::int64_t start = 0; start < plan.scored; start += plan.chunk) {
      const std::int64_t len = std::min(plan.chunk, plan.scored - start);
      const at::Tensor hidden_c = plan.chunk_hidden(start, len);
      const at::Tensor logits_c = plan.chunk_logits(hidden_c);
      const at::Tensor gl = grad_logp.defined() ? plan.gather(grad_logp, start, len) : at::Tensor();
      const at::Tensor ge =
          grad_entropy.defined() ? plan.gather(grad_entropy, start, len) : at::Tensor();
      const at::Tensor grad_logits = detail::run_token_logprobs_backward(
          logits_c, plan.chunk_labels(start, len), state.stats.narrow(0, start, len), gl, ge,
          plan.opts, plan.backend);
      g.add(plan, start, hidden_c, grad_logits);
    }
    g.finish(plan);
    return {g.hidden.defined() ? g.hidden.view(saved[0].sizes()) : at::Tensor(),  // hidden
            g.weight,                                                             // weight
            g.bias,                                                               // bias
            at::Tensor()};                                                        // plan
  }
};

/// loss = HiddenLossFunction::apply(hidden, weight, bias, &plan, &hooks)
/// (bias: plan.bias, or an empty placeholder when there is none)
/// Forward makes the one pass over the chunks that gives the loss and its
/// gradients wrt hidden, weight and bias (each chunk's dlogits from
/// hooks.token_grads while its logits are fresh, then the two GEMMs);
/// backward multiplies them by the incoming gradient, and returns them as
/// they are when it is exactly 1 on the CPU. Saves only those gradients,
/// and hands them over: a second backward through the same graph is refused.
class HiddenLossFunction : public torch::autograd::Function<HiddenLossFunction> {
 public:
  /// The pass; returns {loss} and leaves the per-token values in hooks.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& bias,
                                                const detail::HiddenPlan* plan,
                                                detail::HiddenLossHooks* hooks) {
    const at::ScalarType acc = detail::logits_accumulate_type(hidden.scalar_type());
    const at::Tensor stats = at::empty({plan->scored, 3}, plan->labels.options().dtype(acc));
    detail::HiddenGrads g(*plan, detail::wants_grad(hidden), detail::wants_grad(weight),
                          plan->bias.defined() && detail::wants_grad(bias));
    hooks->values = detail::run_hidden_chunks(
        *plan, stats,
        [&](std::int64_t start, const at::Tensor& hidden_c, const at::Tensor& logits_c,
            const at::Tensor& labels_c, const at::Tensor& logp_c, const at::Tensor& entropy_c,
            const at::Tensor& stats_c) {
          const std::pair<at::Tensor, at::Tensor> token =
              hooks->token_grads(plan->chunk_positions(start, logp_c.size(0)), logp_c, entropy_c);
          const at::Tensor grad_logits =
              plan->rows
                  ? plan->rows->backward(logits_c, labels_c, stats_c, token.first, token.second)
                  : detail::run_token_logprobs_backward(logits_c, labels_c, stats_c, token.first,
                                                        token.second, plan->opts, plan->backend);
          g.add(*plan, start, hidden_c, grad_logits);
        });
    g.finish(*plan);
    if (plan->rows && g.hidden.defined()) plan->rows->finish_grad_hidden(g.hidden);
    const at::Tensor loss = hooks->finish(hooks->values.logp, hooks->values.entropy);
    ctx->saved_data["grad_hidden"] = g.hidden.defined() ? g.hidden.view(hidden.sizes()) : g.hidden;
    ctx->saved_data["grad_weight"] = g.weight;
    ctx->saved_data["grad_bias"] = g.bias;
    return {loss};
  }

  /// The saved gradients times the incoming one.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: the from-hidden losses do not support double backward "
                "(backward with create_graph=true)");
    TORCH_CHECK(!ctx->saved_data.count("released"),
                "psft: backward through a from-hidden loss a second time; its gradients were "
                "handed over by the first backward (retain_graph is not supported)");
    const at::Tensor& go = grads[0];
    // The gradients leave the context, so that autograd can take them
    // without a copy and their memory is not held until the graph dies.
    const auto take = [&](const char* name) {
      const c10::IValue v = std::move(ctx->saved_data[name]);
      ctx->saved_data.erase(name);
      return v.isTensor() ? v.toTensor() : at::Tensor();
    };
    at::Tensor out[3] = {take("grad_hidden"), take("grad_weight"), take("grad_bias")};
    ctx->saved_data["released"] = true;
    if (!go.defined())
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // On the CPU, reading grad_output costs nothing: skip the pass for 1.
    const bool one = go.device().is_cpu() && go.item<double>() == 1.0;
    if (!one) {
      for (at::Tensor& t : out) {
        if (t.defined()) t = t * go.to(t.scalar_type());
      }
    }
    return {out[0], out[1], out[2], at::Tensor(), at::Tensor()};
  }
};

}  // namespace autograd
PSFT_NAMESPACE_END
