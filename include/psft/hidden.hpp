#pragma once
/// \file
/// The losses straight from the last hidden state, with the LM head fused
/// in: token_logprobs_from_hidden, psft_loss_from_hidden,
/// policy_loss_from_hidden, sft_loss_from_hidden and asft_loss_from_hidden
/// (with the reference model's head fused in too). The logits are
/// computed a chunk of tokens at a time and never exist whole, and neither
/// does their gradient (Note [From hidden, chunked]). See docs/hidden.md.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "psft/autograd/hidden_functions.hpp"
#include "psft/backend.hpp"
#include "psft/composed/anchor_kl.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/cpu/anchor_kl.hpp"
#include "psft/detail/checks.hpp"
#include "psft/logits.hpp"
#include "psft/policy_loss.hpp"
#include "psft/sft_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// Options of the from-hidden functions: everything LogitsOptions has
/// (ignore_index, temperature, entropy_grad, check_inputs, backend), the LM
/// head's bias and the chunk size.
struct HiddenOptions : LogitsOptions {
  /// The LM head's bias, [V] in weight's dtype and on its device, or
  /// undefined (no bias, as most LLM heads). Receives a gradient when it
  /// requires one.
  at::Tensor bias;
  /// Scored tokens per chunk; 0 (the default) derives it from chunk_bytes.
  /// >= 0.
  std::int64_t chunk_tokens = 0;
  /// With chunk_tokens = 0: tokens per chunk = max(1, chunk_bytes / (V x the
  /// inputs' element size)), so that one chunk's logits take about this
  /// many bytes (its gradient takes as many again). > 0.
  std::int64_t chunk_bytes = std::int64_t(64) << 20;
};

namespace detail {

/// Checks hidden, weight, bias, labels and the options, and returns the
/// chunk schedule of a pass over them (Note [From hidden, chunked]). One
/// host read of the labels (free on the CPU): which tokens are scored.
/// vocab is the vocabulary's size when weight holds a slice of it (a sharded
/// head: labels are global ids, and the chunk size follows the whole
/// vocabulary so that every rank's schedule is the same); 0: weight.size(0).
inline HiddenPlan hidden_plan(const char* api, const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& labels, const HiddenOptions& opts,
                              std::int64_t vocab = 0) {
  check_float_tensor(api, "hidden", hidden);
  TORCH_CHECK(hidden.dim() == 2 || hidden.dim() == 3, api,
              ": hidden must have shape [B, T, H] or [N, H], got ", hidden.sizes());
  check_float_tensor(api, "weight", weight);
  const std::int64_t width = hidden.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == width && weight.size(0) >= 1, api,
              ": weight must be the LM head's [V, H] with V >= 1 and H = hidden.size(-1) = ", width,
              ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), api, ": weight is ",
              weight.scalar_type(), " but hidden is ", hidden.scalar_type(),
              "; the LM head's GEMM runs in one dtype");
  TORCH_CHECK(weight.device() == hidden.device(), api, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  const std::int64_t rows = weight.size(0);
  if (vocab == 0) vocab = rows;
  if (opts.bias.defined()) {
    check_float_tensor(api, "bias", opts.bias);
    TORCH_CHECK(opts.bias.dim() == 1 && opts.bias.size(0) == rows, api,
                ": bias must have weight's rows, [", rows, "], got ", opts.bias.sizes());
    TORCH_CHECK(opts.bias.scalar_type() == weight.scalar_type(), api, ": bias is ",
                opts.bias.scalar_type(), " but weight is ", weight.scalar_type());
    TORCH_CHECK(opts.bias.device() == weight.device(), api, ": bias is on ", opts.bias.device(),
                " but weight is on ", weight.device());
  }
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong, api, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == hidden.device(), api, ": labels is on ", labels.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(labels.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), api,
              ": labels must have hidden's shape without the hidden dimension, ",
              hidden.sizes().slice(0, hidden.dim() - 1), ", got ", labels.sizes());
  const std::string options_error = core::logits_options_error(opts);
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);
  TORCH_CHECK(opts.chunk_tokens >= 0, api,
              ": chunk_tokens must be >= 0 (0: derived from chunk_bytes), got ", opts.chunk_tokens);
  TORCH_CHECK(opts.chunk_bytes > 0, api, ": chunk_bytes must be > 0, got ", opts.chunk_bytes);

  HiddenPlan plan;
  plan.api = api;
  plan.hidden = hidden.reshape({-1, width});
  plan.weight = weight;
  plan.bias = opts.bias;
  plan.labels = labels.reshape({-1}).contiguous();
  plan.tokens = plan.labels.numel();
  plan.opts = opts;
  plan.backend = backend_for(hidden, opts.backend);

  const at::Tensor scored = plan.labels != opts.ignore_index;
  if (opts.check_inputs) {
    const at::Tensor bad =
        at::logical_and(scored, at::logical_or(plan.labels < 0, plan.labels >= vocab));
    const at::Tensor found = bad.nonzero();
    TORCH_CHECK(found.size(0) == 0, api, ": labels must be in [0, ", vocab,
                ") or equal ignore_index (", opts.ignore_index, "), got ",
                found.size(0) == 0 ? 0 : plan.labels[found[0][0]].item<std::int64_t>(),
                " at token ", found.size(0) == 0 ? 0 : found[0][0].item<std::int64_t>(),
                " (flat index over the leading dimensions)");
  }
  plan.scored = scored.sum().item<std::int64_t>();
  if (plan.scored < plan.tokens) plan.positions = scored.nonzero().reshape({-1});
  const std::int64_t row_bytes =
      vocab * static_cast<std::int64_t>(c10::elementSize(hidden.scalar_type()));
  plan.chunk = opts.chunk_tokens > 0 ? opts.chunk_tokens
                                     : std::max<std::int64_t>(1, opts.chunk_bytes / row_bytes);
  return plan;
}

/// The bias as the Functions' argument: the plan's, or an empty placeholder
/// (custom Functions take no undefined tensors), which gets no gradient.
inline at::Tensor bias_argument(const HiddenPlan& plan) {
  return plan.bias.defined() ? plan.bias : at::empty({0}, plan.weight.options());
}

/// opts with the plain sum over tokens as its reduction: a chunk's loss
/// under them has d / d logp_t = d l_t / d logp_t.
inline LossOptions token_sum_options(const LossOptions& opts) {
  LossOptions sum = opts;
  sum.reduction = Reduction::TokenSum;
  sum.normaliser.reset();
  sum.entropy_coeff = 0.0;
  return sum;
}

/// d loss_of(logp) / d logp at logp_c (contiguous, accumulation dtype).
template <class Loss>
at::Tensor grad_of_token_sum(const at::Tensor& logp_c, Loss&& loss_of) {
  at::AutoGradMode enable(true);
  const at::Tensor leaf = logp_c.detach().requires_grad_(true);
  return torch::autograd::grad({loss_of(leaf)}, {leaf})[0].contiguous();
}

/// Runs a loss over the chunks of plan: HiddenLossFunction when a gradient
/// is wanted (it is computed in this pass), the forward alone otherwise.
/// token_loss(positions, logp_c) is the chunk's sum of per-token losses
/// (d / d logp_c = d l_t / d logp_t); finish(logp, entropy) gives the
/// loss's value from the [N] per-token tensors.
template <class TokenLoss, class Finish>
at::Tensor run_hidden_loss(const HiddenPlan& plan, const at::Tensor& hidden,
                           const at::Tensor& weight, const at::Tensor& mask,
                           const LossOptions& loss_opts, TokenLoss&& token_loss, Finish&& finish) {
  HiddenLossHooks hooks;
  hooks.finish = finish;
  const bool grad = torch::autograd::GradMode::is_enabled() &&
                    (wants_grad(hidden) || wants_grad(weight) || wants_grad(plan.bias));
  if (!grad) {
    const HiddenTokenValues v = run_hidden_chunks(plan, at::Tensor(), [](auto&&...) {});
    return finish(v.logp, v.entropy);
  }
  const at::Tensor scale = token_scales(plan.api, mask, loss_opts);
  const double entropy_coeff = loss_opts.entropy_coeff;
  hooks.token_grads = [&](const at::Tensor& positions, const at::Tensor& logp_c,
                          const at::Tensor&) -> std::pair<at::Tensor, at::Tensor> {
    const at::Tensor s = scale.index_select(0, positions);
    const at::Tensor g = grad_of_token_sum(
        logp_c, [&](const at::Tensor& leaf) { return token_loss(positions, leaf); });
    const at::ScalarType acc = logp_c.scalar_type();
    // The entropy bonus, -entropy_coeff x agg(entropy): d / d H_t = -coeff s_t.
    at::Tensor ge;
    if (entropy_coeff != 0.0) ge = (s * -entropy_coeff).to(acc);
    return {(g.to(at::kDouble) * s).to(acc), ge};
  };
  return autograd::HiddenLossFunction::apply(hidden, weight, bias_argument(plan), &plan, &hooks)[0];
}

/// The logits options of a from-hidden loss (as loss_from_logits_options).
inline HiddenOptions loss_hidden_options(const char* api, const at::Tensor& labels,
                                         const at::Tensor& old_logp, const LossOptions& loss_opts,
                                         const HiddenOptions& hidden_opts) {
  HiddenOptions opts = hidden_opts;
  static_cast<LogitsOptions&>(opts) =
      loss_from_logits_options(api, labels, old_logp, loss_opts, hidden_opts);
  return opts;
}

inline TokenLogprobs token_logprobs_from_hidden(const char* api, const at::Tensor& hidden,
                                                const at::Tensor& weight, const at::Tensor& labels,
                                                const HiddenOptions& opts) {
  const HiddenPlan plan = hidden_plan(api, hidden, weight, labels, opts);
  TokenLogprobs out;
  out.backend = plan.backend;
  if (torch::autograd::GradMode::is_enabled() &&
      (wants_grad(hidden) || wants_grad(weight) || wants_grad(plan.bias))) {
    const auto outs =
        autograd::HiddenLogprobsFunction::apply(hidden, weight, bias_argument(plan), &plan);
    out.logp = outs[0].view(labels.sizes());
    out.entropy = outs[1].view(labels.sizes());
  } else {
    // The same chunks and GEMMs as the autograd path and the losses, so old
    // and new log-probabilities of unchanged weights agree to the last bit.
    const HiddenTokenValues v = run_hidden_chunks(plan, at::Tensor(), [](auto&&...) {});
    out.logp = v.logp.view(labels.sizes());
    out.entropy = v.entropy.view(labels.sizes());
  }
  return out;
}

/// A from-hidden clipped loss, checked and ready to run.
struct ClippedHiddenLoss {
  const char* api = "psft::psft_loss_from_hidden";  ///< prefix of error messages
  HiddenOptions opts;    ///< the pass's options (entropy_grad, backend resolved)
  HiddenPlan plan;       ///< the chunk schedule
  at::Tensor mask;       ///< labels != ignore_index
  at::Tensor old_flat;   ///< [N] old_logp, undefined on-policy
  at::Tensor adv_flat;   ///< [N] advantages expanded, undefined for A = 1
  LossOptions sum_opts;  ///< the per-chunk token sums' options
};

/// Every check of a from-hidden clipped loss, before any pass: the per-token
/// arguments with placeholder log-probabilities, then the plan. vocab as
/// hidden_plan's.
inline ClippedHiddenLoss check_clipped_hidden_loss(
    const char* api, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& old_logp, const at::Tensor& advantages, const LossOptions& loss_opts,
    const HiddenOptions& hidden_opts, std::int64_t vocab = 0) {
  ClippedHiddenLoss c;
  c.api = api;
  c.opts = loss_hidden_options(api, labels, old_logp, loss_opts, hidden_opts);
  c.mask = labels != c.opts.ignore_index;
  check_float_tensor(api, "hidden", hidden);
  const at::ScalarType acc = logits_accumulate_type(hidden.scalar_type());
  const at::Tensor placeholder = at::zeros(labels.sizes(), labels.options().dtype(acc));
  const ClippedLossInputs checked = check_clipped_loss_inputs(
      api, placeholder, old_logp.defined() ? old_logp : placeholder, advantages, c.mask, loss_opts);
  if (old_logp.defined()) c.old_flat = checked.old_logp.reshape({-1});
  if (checked.advantages.defined()) c.adv_flat = checked.advantages.reshape({-1});
  c.sum_opts = token_sum_options(loss_opts);
  c.plan = hidden_plan(api, hidden, weight, labels, c.opts, vocab);
  return c;
}

/// Runs a checked from-hidden clipped loss: the one fused pass.
inline LogitsLossResult run_clipped_hidden_loss(const ClippedHiddenLoss& c,
                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& labels,
                                                const at::Tensor& old_logp,
                                                const at::Tensor& advantages,
                                                const LossOptions& loss_opts) {
  LogitsLossResult out;
  const auto token_loss = [&](const at::Tensor& positions, const at::Tensor& logp_c) {
    const at::Tensor old_c =
        c.old_flat.defined() ? c.old_flat.index_select(0, positions) : logp_c.detach();
    const at::Tensor adv_c =
        c.adv_flat.defined() ? c.adv_flat.index_select(0, positions) : at::Tensor();
    return run_clipped_loss(
               check_clipped_loss_inputs(c.api, logp_c, old_c, adv_c, at::Tensor(), c.sum_opts),
               c.sum_opts)
        .loss;
  };
  const auto finish = [&](const at::Tensor& logp, const at::Tensor& entropy) {
    TokenLogprobs t;
    t.logp = logp.view(labels.sizes());
    t.entropy = entropy.view(labels.sizes());
    t.backend = c.plan.backend;
    at::NoGradGuard no_grad;
    out = loss_from_token_logprobs(c.api, t, labels, old_logp, advantages, c.opts.ignore_index,
                                   loss_opts);
    return out.loss;
  };
  out.loss = run_hidden_loss(c.plan, hidden, weight, c.mask, loss_opts, token_loss, finish);
  return out;
}

inline LogitsLossResult clipped_loss_from_hidden(const char* api, const at::Tensor& hidden,
                                                 const at::Tensor& weight, const at::Tensor& labels,
                                                 const at::Tensor& old_logp,
                                                 const at::Tensor& advantages,
                                                 const LossOptions& loss_opts,
                                                 const HiddenOptions& hidden_opts) {
  if (loss_opts.objective.ratio_level == RatioLevel::Sequence) {
    // A sequence's ratio needs all its tokens before any gradient: the
    // log-probabilities first, the loss on them, and backward recomputes
    // each chunk's logits (one more logits GEMM than the fused pass).
    const HiddenOptions opts = loss_hidden_options(api, labels, old_logp, loss_opts, hidden_opts);
    const TokenLogprobs t = token_logprobs_from_hidden(api, hidden, weight, labels, opts);
    return loss_from_token_logprobs(api, t, labels, old_logp, advantages, opts.ignore_index,
                                    loss_opts);
  }
  const ClippedHiddenLoss c = check_clipped_hidden_loss(api, hidden, weight, labels, old_logp,
                                                        advantages, loss_opts, hidden_opts);
  return run_clipped_hidden_loss(c, hidden, weight, labels, old_logp, advantages, loss_opts);
}

/// Runs sft_loss's rule (Nll or Dft) over the chunks of plan (labels:
/// the caller's shape); on_result(the batch's SftLogitsLossResult, under
/// no-grad) returns the loss's value.
template <class OnResult>
at::Tensor run_sft_hidden_loss(const char* api, const HiddenPlan& plan, const at::Tensor& hidden,
                               const at::Tensor& weight, const at::Tensor& labels,
                               SftVariant variant, const LossOptions& opts, OnResult&& on_result) {
  const LossOptions sum_opts = token_sum_options(opts);
  const auto token_loss = [&](const at::Tensor&, const at::Tensor& logp_c) {
    return sft_loss(logp_c, at::Tensor(), variant, sum_opts).loss;
  };
  const auto finish = [&](const at::Tensor& logp, const at::Tensor& entropy) {
    TokenLogprobs t;
    t.logp = logp.view(labels.sizes());
    t.entropy = entropy.view(labels.sizes());
    t.backend = plan.backend;
    at::NoGradGuard no_grad;
    return on_result(
        sft_loss_from_token_logprobs(api, t, labels, variant, opts, plan.opts.ignore_index));
  };
  return run_hidden_loss(plan, hidden, weight, labels != plan.opts.ignore_index, opts, token_loss,
                         finish);
}

/// ASFT's per-row pass over the chunks of a from-hidden loss: each chunk's
/// reference logits (ref_hidden @ ref_weight^T (+ ref_bias), no gradient)
/// are computed beside the policy's, and give the anchor's KL with the
/// label's log-probability and the entropy. With the fused CPU backend and
/// one dtype, one pass over both rows (cpu/anchor_kl.hpp); otherwise the
/// backend's logits kernels for logp and entropy and ATen ops for the KL
/// (composed/anchor_kl.hpp). The largest temporaries are one chunk's two
/// logits and its gradient.
struct AnchorRows : RowPass {
  const HiddenPlan* ref = nullptr;  ///< the reference head: the policy plan's rows and chunks
  LogitsOptions opts;               ///< the per-row options
  Backend backend = Backend::Auto;  ///< the policy's per-row backend
  bool fused = false;               ///< one fused pass over both rows
  at::Tensor kl;                    ///< [N] per-token KL (accumulation dtype), filled by forward
  at::Tensor kl_grad;               ///< [N] d loss / d kl_t, or undefined (no gradient)
  mutable std::int64_t start = 0;   ///< the last chunk's first row of the schedule
  mutable at::Tensor ref_logits;    ///< the last chunk's reference logits
  mutable at::Tensor stats;         ///< the last chunk's four numbers per row (fused)

  void forward(const char* api, std::int64_t chunk_start, const at::Tensor& logits,
               const at::Tensor& labels, const at::Tensor& logp, const at::Tensor& entropy,
               const at::Tensor& row_stats) const override {
    const std::int64_t len = labels.size(0);
    start = chunk_start;
    {
      at::NoGradGuard no_grad;
      ref_logits = ref->chunk_logits(ref->chunk_hidden(start, len));
    }
    at::Tensor kl_c;
    if (fused) {
      kl_c = at::empty({len}, logp.options());
      stats = at::empty({len, 4}, logp.options());
      cpu::anchor_kl_forward(api, logits, ref_logits, labels, opts, logp, entropy, kl_c, stats);
    } else {
      run_token_logprobs_forward(api, logits, labels, opts, backend, logp, entropy, row_stats);
      kl_c = composed::anchor_kl_forward(logits, ref_logits, all_scored(labels), opts.temperature,
                                         opts.composed_chunk_bytes);
    }
    ref->scatter(kl, start, kl_c.to(kl.scalar_type()));
  }

  at::Tensor backward(const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& row_stats, const at::Tensor& grad_logp,
                      const at::Tensor& grad_entropy) const override {
    TORCH_INTERNAL_ASSERT(!grad_entropy.defined(), "ASFT's entropy is a metric");
    const at::Tensor gk =
        kl_grad.defined() ? ref->gather(kl_grad, start, labels.size(0)).to(grad_logp.scalar_type())
                          : at::Tensor();
    if (fused) {
      return cpu::anchor_kl_backward(logits, ref_logits, labels, stats, grad_logp, gk, opts);
    }
    at::Tensor grad = run_token_logprobs_backward(logits, labels, row_stats, grad_logp,
                                                  at::Tensor(), opts, backend);
    if (gk.defined()) {
      grad.add_(composed::anchor_kl_backward(logits, ref_logits, all_scored(labels), gk,
                                             opts.temperature, opts.composed_chunk_bytes));
    }
    return grad;
  }

  void finish_grad_hidden(at::Tensor&) const override {}

  /// Every row of a chunk is scored (the plan multiplies only those).
  static at::Tensor all_scored(const at::Tensor& labels) {
    return at::ones(labels.sizes(), labels.options().dtype(at::kBool));
  }
};

/// Checks the reference head of asft_loss_from_hidden against the policy's
/// plan and returns its plan: the same rows and chunks over ref_hidden,
/// ref_weight and ref_bias, all detached (the reference is a constant).
inline HiddenPlan reference_plan(const char* api, const HiddenPlan& plan, const at::Tensor& hidden,
                                 const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                                 const at::Tensor& ref_bias) {
  TORCH_CHECK(ref_hidden.defined(), api, ": ref_hidden is an undefined tensor");
  TORCH_CHECK(ref_weight.defined(), api, ": ref_weight is an undefined tensor");
  check_float_tensor(api, "ref_hidden", ref_hidden);
  check_float_tensor(api, "ref_weight", ref_weight);
  TORCH_CHECK(ref_hidden.dim() == hidden.dim() && ref_hidden.sizes().slice(0, hidden.dim() - 1) ==
                                                      hidden.sizes().slice(0, hidden.dim() - 1),
              api, ": ref_hidden must have hidden's leading shape ",
              hidden.sizes().slice(0, hidden.dim() - 1), " (any hidden size), got ",
              ref_hidden.sizes());
  const std::int64_t vocab = plan.weight.size(0);
  TORCH_CHECK(
      ref_weight.dim() == 2 && ref_weight.size(0) == vocab &&
          ref_weight.size(1) == ref_hidden.size(-1),
      api, ": ref_weight must be the reference's LM head [V, H_ref] with weight's V = ", vocab,
      " and H_ref = ref_hidden.size(-1) = ", ref_hidden.size(-1), ", got ", ref_weight.sizes());
  TORCH_CHECK(ref_weight.scalar_type() == ref_hidden.scalar_type(), api, ": ref_weight is ",
              ref_weight.scalar_type(), " but ref_hidden is ", ref_hidden.scalar_type());
  TORCH_CHECK(ref_hidden.device() == hidden.device() && ref_weight.device() == hidden.device(), api,
              ": ref_hidden and ref_weight must be on hidden's device ", hidden.device(), ", got ",
              ref_hidden.device(), " and ", ref_weight.device());
  if (ref_bias.defined()) {
    check_float_tensor(api, "ref_bias", ref_bias);
    TORCH_CHECK(ref_bias.dim() == 1 && ref_bias.size(0) == vocab, api,
                ": ref_bias must have shape [", vocab, "], got ", ref_bias.sizes());
    TORCH_CHECK(ref_bias.scalar_type() == ref_weight.scalar_type(), api, ": ref_bias is ",
                ref_bias.scalar_type(), " but ref_weight is ", ref_weight.scalar_type());
    TORCH_CHECK(ref_bias.device() == hidden.device(), api, ": ref_bias is on ", ref_bias.device(),
                " but hidden is on ", hidden.device());
  }
  HiddenPlan ref = plan;
  ref.hidden = ref_hidden.detach().reshape({-1, ref_hidden.size(-1)});
  ref.weight = ref_weight.detach();
  ref.bias = ref_bias.defined() ? ref_bias.detach() : at::Tensor();
  ref.rows = nullptr;
  return ref;
}

}  // namespace detail

/// log p of each label and the token entropy straight from the last hidden
/// state: logits = hidden @ weight^T (+ opts.bias) a chunk at a time, each
/// chunk through the fused logits kernel (token_logprobs' numbers for those
/// logits). Differentiable wrt hidden, weight and bias (the entropy only
/// with opts.entropy_grad); backward recomputes each chunk's logits. Under
/// torch::NoGradGuard it is the old-policy pass: the from-hidden losses'
/// forward gives bitwise identical logp for the same inputs and options.
///
/// \param hidden [B, T, H] or [N, H], float32/bfloat16/float16/float64, any
///               strides (copied once if they cannot be viewed as [N, H]).
/// \param weight [V, H] in hidden's dtype (torch::nn::Linear's layout; tied
///               embeddings included).
/// \param labels int64, hidden's shape without H (Note [Label shift]).
/// \param opts   ignore_index, temperature, entropy_grad, check_inputs,
///               backend, bias and chunk size (HiddenOptions).
/// \throws c10::Error naming the argument on bad shapes, dtypes, devices,
///         options or labels, and on a NaN or +inf logit at a scored token.
inline TokenLogprobs token_logprobs_from_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& labels,
                                                const HiddenOptions& opts = {}) {
  return detail::token_logprobs_from_hidden("psft::token_logprobs_from_hidden", hidden, weight,
                                            labels, opts);
}

/// The PSFT objective (as psft_loss_from_logits) straight from the last
/// hidden state, with the LM head fused in: one pass over chunks of tokens
/// computes each chunk's logits, its log-probabilities, entropy and
/// gradient, and the gradients wrt hidden, weight and bias; backward only
/// scales them. No [tokens, V] tensor is allocated.
///
/// The result's loss is the differentiable output; logp, entropy and
/// entropy_mean are detached values (use token_logprobs_from_hidden for a
/// loss of your own over them). old_logp may be an undefined tensor: the
/// old policy is the current one (an on-policy mini-batch: r = 1 on every
/// token), and the result's logp is then what the old-policy cache keeps.
/// With LossOptions::objective.ratio_level = Sequence (GSPO) the gradient
/// is computed in backward instead, which recomputes the logits once.
///
/// \param hidden, weight, labels as token_logprobs_from_hidden
/// \param old_logp  labels' shape, or undefined (on-policy)
/// \param loss_opts clipping, reduction, normaliser, objective, entropy_coeff
/// \param hidden_opts as token_logprobs_from_hidden
inline LogitsLossResult psft_loss_from_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                                              const at::Tensor& labels,
                                              const at::Tensor& old_logp = at::Tensor(),
                                              const LossOptions& loss_opts = {},
                                              const HiddenOptions& hidden_opts = {}) {
  return detail::clipped_loss_from_hidden("psft::psft_loss_from_hidden", hidden, weight, labels,
                                          old_logp, at::Tensor(), loss_opts, hidden_opts);
}

/// The general clipped policy objective (as policy_loss_from_logits)
/// straight from the last hidden state; otherwise as psft_loss_from_hidden.
/// advantages: labels' shape, one per sequence ([B] or [B, 1]), or 0-d.
inline LogitsLossResult policy_loss_from_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& labels,
                                                const at::Tensor& old_logp,
                                                const at::Tensor& advantages,
                                                const LossOptions& loss_opts = {},
                                                const HiddenOptions& hidden_opts = {}) {
  TORCH_CHECK(advantages.defined(),
              "psft::policy_loss_from_hidden: advantages is an undefined tensor (use "
              "psft_loss_from_hidden for A = 1)");
  return detail::clipped_loss_from_hidden("psft::policy_loss_from_hidden", hidden, weight, labels,
                                          old_logp, advantages, loss_opts, hidden_opts);
}

/// sft_loss (Nll or Dft, with the entropy bonus of opts.entropy_coeff)
/// straight from the last hidden state, fused as psft_loss_from_hidden:
/// gradients in the one forward pass, no [tokens, V] tensor. The result's
/// logp, entropy and entropy_mean are detached.
inline SftLogitsLossResult sft_loss_from_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& labels,
                                                SftVariant variant = SftVariant::Nll,
                                                const LossOptions& opts = {},
                                                const HiddenOptions& hidden_opts = {}) {
  const char* api = "psft::sft_loss_from_hidden";
  TORCH_CHECK(variant == SftVariant::Nll || variant == SftVariant::Dft, api,
              ": variant must be SftVariant::Nll or SftVariant::Dft, got ",
              static_cast<int>(variant));
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  const std::string options_error = core::loss_options_error(opts, static_cast<int>(labels.dim()));
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);
  HiddenOptions pass_opts = hidden_opts;
  if (opts.entropy_coeff != 0.0) pass_opts.entropy_grad = true;
  const detail::HiddenPlan plan = detail::hidden_plan(api, hidden, weight, labels, pass_opts);
  SftLogitsLossResult out;
  out.loss = detail::run_sft_hidden_loss(api, plan, hidden, weight, labels, variant, opts,
                                         [&](const SftLogitsLossResult& r) {
                                           out = r;
                                           return out.loss;
                                         });
  return out;
}

/// ASFT (as asft_loss_from_logits) straight from the last hidden states of
/// the policy and of the reference model, with both LM heads fused in:
/// each chunk of scored tokens gets its policy logits (hidden @ weight^T
/// (+ hidden_opts.bias)) and its reference logits (ref_hidden @
/// ref_weight^T (+ ref_bias)), and one pass over the two rows gives the
/// label's log-probability, the KL(pi_ref || pi_theta) and the chunk's
/// gradient, which the two GEMMs of psft_loss_from_hidden take to hidden,
/// weight and bias. No [tokens, V] tensor is allocated; the largest
/// temporaries are one chunk's two logits and its gradient. The reference
/// is a constant: ref_hidden, ref_weight and ref_bias get no gradient.
/// With the CPU's fused backend and ref_hidden of hidden's dtype the pass
/// is cpu/anchor_kl.hpp's; otherwise (CUDA, Backend::Composed, mixed
/// dtypes) the backend's logits kernels and ATen ops for the KL, chunk by
/// chunk. The result's logp and kl are detached values.
///
/// \param hidden, weight, labels as token_logprobs_from_hidden
/// \param ref_hidden the reference's last hidden states: hidden's leading
///                   shape, any hidden size, any float dtype
/// \param ref_weight the reference's LM head [V, H_ref] in ref_hidden's dtype
/// \param kl_coef    the anchor's weight lambda, finite and >= 0
/// \param opts       reduction, normaliser, check_finite (as sft_loss)
/// \param hidden_opts ignore_index, temperature, check_inputs, backend, the
///                   policy head's bias and the chunk size (HiddenOptions)
/// \param ref_bias   the reference head's bias [V] in ref_weight's dtype, or
///                   undefined
/// \throws c10::Error naming the argument on bad input.
inline AsftLossResult asft_loss_from_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& ref_hidden,
                                            const at::Tensor& ref_weight, const at::Tensor& labels,
                                            double kl_coef = 0.05, const LossOptions& opts = {},
                                            const HiddenOptions& hidden_opts = {},
                                            const at::Tensor& ref_bias = at::Tensor()) {
  const char* api = "psft::asft_loss_from_hidden";
  detail::check_asft_options(api, kl_coef, opts);
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  const std::string options_error = core::loss_options_error(opts, static_cast<int>(labels.dim()));
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);
  HiddenOptions pass_opts = hidden_opts;
  pass_opts.entropy_grad = false;  // the entropy is a metric of ASFT
  detail::HiddenPlan plan = detail::hidden_plan(api, hidden, weight, labels, pass_opts);
  const detail::HiddenPlan ref =
      detail::reference_plan(api, plan, hidden, ref_hidden, ref_weight, ref_bias);
  const at::Tensor mask = labels != pass_opts.ignore_index;
  const at::ScalarType acc = detail::logits_accumulate_type(hidden.scalar_type());

  detail::AnchorRows rows;
  rows.ref = &ref;
  rows.opts = plan.opts;
  rows.backend = plan.backend;
  rows.fused =
      plan.backend == Backend::FusedCpu && ref_hidden.scalar_type() == hidden.scalar_type();
  rows.kl = at::zeros({plan.tokens}, plan.labels.options().dtype(acc));
  if (torch::autograd::GradMode::is_enabled() &&
      (detail::wants_grad(hidden) || detail::wants_grad(weight) || detail::wants_grad(plan.bias))) {
    rows.kl_grad = (detail::token_scales(api, mask, opts) * kl_coef).to(acc);
  }
  plan.rows = &rows;

  AsftLossResult out;
  out.loss = detail::run_sft_hidden_loss(
      api, plan, hidden, weight, labels, SftVariant::Dft, opts,
      [&](const SftLogitsLossResult& dft) {
        out = detail::asft_result(api, dft, rows.kl.view(labels.sizes()), mask, kl_coef, opts);
        return out.loss;
      });
  return out;
}

PSFT_NAMESPACE_END
