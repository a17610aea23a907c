#pragma once
/// \file
/// From logits to the PSFT loss without a vocabulary-sized float32 tensor:
/// token_logprobs (log p of each label and the token entropy, fused), the
/// next-token label shift, and psft_loss_from_logits /
/// policy_loss_from_logits (one pass over the logits forward, one backward).
/// See docs/logits.md.
///
/// Label convention (Note [Label shift]): psft scores logits[b, t] against
/// labels[b, t] and does not shift. A causal LM's logits at position t
/// predict token t + 1, so build labels with shift_labels(input_ids):
///
///   input_ids  [BOS, p1, p2, r1, r2, EOS]       (p prompt, r response)
///   loss_mask  [ 0,  0,  0,  1,  1,  1 ]        (tokens to learn)
///   labels = psft::shift_labels(input_ids, loss_mask)
///          = [-100, -100, r1, r2, EOS, -100]

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdint>
#include <string>

#include "psft/autograd/logits_loss_function.hpp"
#include "psft/autograd/token_logprobs_function.hpp"
#include "psft/backend.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/options.hpp"
#include "psft/detail/checks.hpp"
#include "psft/entropy.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// Per-token results of token_logprobs.
struct TokenLogprobs {
  /// log p(label) under softmax(logits / temperature), labels' shape,
  /// float32 (float64 for float64 logits); 0 where the label is
  /// ignore_index; -inf where the label's logit is -inf. Differentiable.
  at::Tensor logp;
  /// Entropy of softmax(logits / temperature) in nats, same shape and dtype;
  /// 0 where the label is ignore_index. Differentiable only with
  /// LogitsOptions::entropy_grad.
  at::Tensor entropy;
  /// The implementation that ran (FusedCpu or Composed).
  Backend backend = Backend::Auto;
};

/// Result of psft_loss_from_logits and policy_loss_from_logits.
struct LogitsLossResult {
  /// The aggregated loss (as psft_loss / policy_loss), 0-d, connected to
  /// the logits' graph even when every label is ignore_index.
  at::Tensor loss;
  /// Trust-region metrics of the loss (clip fractions, KL, ratio range,
  /// token count).
  LossMetrics metrics;
  /// Per-token log-probabilities (TokenLogprobs::logp). Detach and keep them
  /// as the next step's old_logp only if the weights did not change; usually
  /// old_logp comes from token_logprobs under NoGradGuard before the step.
  at::Tensor logp;
  /// Per-token entropy (TokenLogprobs::entropy).
  at::Tensor entropy;
  /// Masked token-entropy mean, global sum / count over this batch, 0-d in
  /// the entropy's dtype (float32; float64 for float64 logits);
  /// differentiable with LogitsOptions::entropy_grad.
  at::Tensor entropy_mean;
  /// Mean of -logp over the scored tokens, 0-d float64, detached; 0 without
  /// tokens. The PSFT loss sits near -1 for the whole run and says little
  /// about progress; this is the number to watch (as for SFT).
  at::Tensor nll_mean;
  /// The implementation of the logits pass (FusedCpu or Composed).
  Backend backend = Backend::Auto;
};

namespace detail {

/// sum(w (-logp)) / sum(w) over tokens with weight w != 0 (masked values,
/// even NaN, never read), 0-d float64, detached; 0 without tokens. The one
/// definition of every result's nll_mean.
inline at::Tensor masked_nll_mean(const at::Tensor& logp, const at::Tensor& weight) {
  const at::Tensor w = weight.detach().to(at::kDouble);
  const at::Tensor valid = w != 0;
  const at::Tensor zero = at::zeros({}, w.options());
  const at::Tensor sum = at::where(valid, -logp.detach().to(at::kDouble) * w, zero).sum();
  const at::Tensor count = at::where(valid, w, zero).sum();
  return at::where(count > 0, sum / at::where(count > 0, count, at::ones_like(count)), zero);
}

/// The backend of the logits pass: the fused kernel of the logits' device
/// when this build has one, composed ATen ops otherwise (see backend_for).
inline Backend logits_backend_for(const at::Tensor& logits, Backend requested) {
  return backend_for(logits, requested);
}

/// The checks of labels against [.., V] logits (any vocabulary slice) and of
/// the options, shared by every logits path.
inline void check_labels_and_options(const char* api, const at::Tensor& logits,
                                     const at::Tensor& labels, const LogitsOptions& opts) {
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong, api, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), api, ": labels is on ", labels.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), api,
              ": labels must have logits' shape without the vocabulary dimension, ",
              logits.sizes().slice(0, logits.dim() - 1), ", got ", labels.sizes());
  const std::string options_error = core::logits_options_error(opts);
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);
}

/// Checks logits and labels and returns the labels as the kernels read them
/// (contiguous int64, same shape).
inline at::Tensor check_logits_inputs(const char* api, const at::Tensor& logits,
                                      const at::Tensor& labels, const LogitsOptions& opts) {
  check_float_tensor(api, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, api,
              ": logits must have shape [B, T, V] or [N, V], got ", logits.sizes());
  const std::int64_t vocab = logits.size(-1);
  TORCH_CHECK(vocab >= 1, api, ": logits must have a non-empty vocabulary dimension, got ",
              logits.sizes());
  check_labels_and_options(api, logits, labels, opts);

  at::Tensor flat = labels.contiguous();
  if (opts.check_inputs && flat.device().is_cpu()) {
    // Host labels are checked here, before any logit is read; device labels
    // are checked by the composed pass, with one synchronisation.
    const std::int64_t* l = flat.data_ptr<std::int64_t>();
    for (std::int64_t i = 0, n = flat.numel(); i < n; ++i) {
      TORCH_CHECK(l[i] == opts.ignore_index || (l[i] >= 0 && l[i] < vocab), api,
                  ": labels must be in [0, ", vocab, ") or equal ignore_index (", opts.ignore_index,
                  "), got ", l[i], " at token ", i, " (flat index over the leading dimensions)");
    }
  }
  return flat;
}

inline TokenLogprobs token_logprobs(const char* api, const at::Tensor& logits,
                                    const at::Tensor& labels, const LogitsOptions& opts) {
  const at::Tensor checked_labels = check_logits_inputs(api, logits, labels, opts);
  TokenLogprobs out;
  out.backend = logits_backend_for(logits, opts.backend);
  if (logits.requires_grad() && torch::autograd::GradMode::is_enabled()) {
    auto outs =
        autograd::TokenLogprobsFunction::apply(logits, checked_labels, opts, out.backend, api);
    out.logp = outs[0];
    out.entropy = outs[1];
  } else {
    // Same kernel and arguments as the autograd path, so old and new
    // log-probabilities of unchanged weights agree to the last bit.
    const at::ScalarType acc = logits_accumulate_type(logits.scalar_type());
    out.logp = at::empty(checked_labels.sizes(), checked_labels.options().dtype(acc));
    out.entropy = at::empty(checked_labels.sizes(), checked_labels.options().dtype(acc));
    run_token_logprobs_forward(api, logits.detach(), checked_labels, opts, out.backend, out.logp,
                               out.entropy, at::Tensor());
  }
  return out;
}

/// The checks of every from-logits loss before its (expensive) logits pass;
/// returns the logits options with Backend::Auto resolved to the loss's choice.
inline LogitsOptions loss_from_logits_options(const char* api, const at::Tensor& labels,
                                              const at::Tensor& old_logp,
                                              const LossOptions& loss_opts,
                                              const LogitsOptions& logits_opts) {
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  // An undefined old_logp is the on-policy case: old = logp (detached).
  TORCH_CHECK(!old_logp.defined() || old_logp.sizes() == labels.sizes(), api,
              ": old_logp must have labels' shape ", labels.sizes(), ", got ", old_logp.sizes());
  LogitsOptions opts = logits_opts;
  // The entropy bonus differentiates the entropy.
  if (loss_opts.entropy_coeff != 0.0) opts.entropy_grad = true;
  // Auto follows the loss's choice.
  if (opts.backend == Backend::Auto) {
    opts.backend = loss_opts.backend;
  }
  const std::string loss_error =
      core::loss_options_error(loss_opts, static_cast<int>(labels.dim()));
  TORCH_CHECK(loss_error.empty(), api, ": ", loss_error);
  return opts;
}

/// The clipped loss of token log-probabilities t (from any logits path), with
/// the per-token tensors and the entropy mean alongside. An undefined
/// old_logp is the on-policy case: old = t.logp detached (r = 1).
inline LogitsLossResult loss_from_token_logprobs(
    const char* api, const TokenLogprobs& t, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, std::int64_t ignore_index, const LossOptions& loss_opts) {
  const at::Tensor mask = labels != ignore_index;
  LossOptions policy_opts = loss_opts;
  policy_opts.entropy_coeff = 0.0;
  const LossResult loss = clipped_loss(api, t.logp, old_logp.defined() ? old_logp : t.logp.detach(),
                                       advantages, mask, policy_opts);
  LogitsLossResult out;
  out.loss = loss.loss;
  // Entropy bonus: verl's pg_loss - entropy_coeff * agg_loss(entropy).
  if (loss_opts.entropy_coeff != 0.0) {
    out.loss = out.loss -
               loss_opts.entropy_coeff *
                   aggregate_tokens(api, t.entropy, mask, policy_opts).to(out.loss.scalar_type());
  }
  out.metrics = loss.metrics;
  out.logp = t.logp;
  out.entropy = t.entropy;
  out.entropy_mean = masked_entropy_mean(t.entropy, mask);
  out.nll_mean = masked_nll_mean(t.logp, mask);
  out.backend = t.backend;
  return out;
}

/// Whether a from-logits clipped loss runs as LogitsLossFunction, its
/// gradient written in the forward pass (Note [Gradient in the forward
/// pass]): on the fused CPU backend, when a gradient is wanted, with token
/// ratios (a sequence's ratio needs all its tokens first).
inline bool gradient_in_forward(const at::Tensor& logits, const LogitsOptions& opts,
                                const LossOptions& loss_opts) {
  return opts.gradient_in_forward && logits.requires_grad() &&
         torch::autograd::GradMode::is_enabled() &&
         logits_backend_for(logits, opts.backend) == Backend::FusedCpu &&
         loss_opts.objective.ratio_level == RatioLevel::Token;
}

/// The clipped loss from logits through LogitsLossFunction: one read of the
/// logits gives the loss and its gradient. Same results as the two-pass
/// path (token_logprobs, then the loss on its logp) up to the rounding of
/// the ratio's exp in the gradient.
inline LogitsLossResult clipped_loss_from_logits_fused(
    const char* api, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const LossOptions& loss_opts, const LogitsOptions& opts) {
  const at::Tensor checked_labels = check_logits_inputs(api, logits, labels, opts);
  const at::Tensor mask = labels != opts.ignore_index;
  const at::ScalarType acc = logits_accumulate_type(logits.scalar_type());
  // The loss's arguments, checked before the pass, as the kernel reads them.
  const at::Tensor placeholder = at::zeros(labels.sizes(), labels.options().dtype(acc));
  LossOptions policy_opts = loss_opts;
  policy_opts.entropy_coeff = 0.0;
  const ClippedLossInputs checked = check_clipped_loss_inputs(
      api, placeholder, old_logp.defined() ? old_logp : placeholder, advantages, mask, policy_opts);
  const auto flat = [&](const at::Tensor& t) {
    return t.defined() ? t.reshape({-1}).to(acc).contiguous() : at::Tensor();
  };
  const at::Tensor old_flat = old_logp.defined() ? flat(checked.old_logp) : at::Tensor();
  const at::Tensor adv_flat = flat(checked.advantages);
  const at::Tensor scale = token_scales(api, mask, policy_opts);

  LogitsLossHooks hooks;
  hooks.forward = [&](const at::Tensor& logp, const at::Tensor& entropy, const at::Tensor& stats,
                      const at::Tensor& g, const at::Tensor& h) {
    const at::Tensor readable = vocab_contiguous(logits.detach());
    return core::visit_rule(checked.rule, [&](auto rule) {
      const auto run = [&](auto row_grad) {
        using acc_t = typename decltype(row_grad)::acc_type;
        row_grad.old = old_flat.defined() ? old_flat.data_ptr<acc_t>() : nullptr;
        row_grad.adv = adv_flat.defined() ? adv_flat.data_ptr<acc_t>() : nullptr;
        row_grad.scale = scale.data_ptr<double>();
        row_grad.params = checked.params<acc_t>(policy_opts);
        row_grad.entropy_coeff = loss_opts.entropy_coeff;
        row_grad.g_out = g.data_ptr<acc_t>();
        row_grad.h_out = h.data_ptr<acc_t>();
        return cpu::token_logprobs_forward_backward(api, readable, checked_labels, opts,
                                                    logp.view({-1}), entropy.view({-1}), stats,
                                                    row_grad);
      };
      using Rule = decltype(rule);
      if (acc == at::kDouble) return run(ClippedRowGrad<Rule, double>{});
      return run(ClippedRowGrad<Rule, float>{});
    });
  };
  LogitsLossResult out;
  hooks.finish = [&](const at::Tensor& logp, const at::Tensor& entropy) {
    TokenLogprobs t;
    t.logp = logp;
    t.entropy = entropy;
    t.backend = Backend::FusedCpu;
    out = loss_from_token_logprobs(api, t, labels, old_logp, advantages, opts.ignore_index,
                                   loss_opts);
    return out.loss;
  };
  const auto outs = autograd::LogitsLossFunction::apply(logits, checked_labels, opts, &hooks);
  // The same values, now on the graph.
  out.loss = outs[0];
  out.logp = outs[1];
  out.entropy = outs[2];
  out.entropy_mean = masked_entropy_mean(out.entropy, mask);
  return out;
}

inline LogitsLossResult clipped_loss_from_logits(
    const char* api, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const LossOptions& loss_opts, const LogitsOptions& logits_opts) {
  const LogitsOptions opts =
      loss_from_logits_options(api, labels, old_logp, loss_opts, logits_opts);
  if (gradient_in_forward(logits, opts, loss_opts)) {
    return clipped_loss_from_logits_fused(api, logits, labels, old_logp, advantages, loss_opts,
                                          opts);
  }
  const TokenLogprobs t = token_logprobs(api, logits, labels, opts);
  return loss_from_token_logprobs(api, t, labels, old_logp, advantages, opts.ignore_index,
                                  loss_opts);
}

}  // namespace detail

/// log p of each label and the token entropy, from logits in one fused pass.
///
///   logp[i]    = log softmax(logits[i] / temperature)[labels[i]]
///   entropy[i] = logsumexp(z) - sum softmax(z) z,  z = logits[i] / temperature
///
/// Accumulates in float32 (float64 for float64 logits) and never allocates a
/// [tokens, V] float32 tensor: the fused CPU path reads each scored row once
/// forward and once backward, and backward writes the gradient directly in
/// the logits' dtype. Tokens whose label is ignore_index get logp =
/// entropy = 0 and a zero gradient whatever their logits hold (the fused
/// path does not read them).
///
/// Use it under torch::NoGradGuard, in float32, for old_logp: the loss then
/// sees exactly the same numbers as the new log-probabilities when the
/// weights did not change (ratio exactly 1, nothing clipped).
///
/// \param logits [B, T, V] or [N, V], float32/bfloat16/float16/float64, any
///               strides on the leading dimensions. A last dimension with a
///               stride other than 1 is copied to contiguous once per pass.
/// \param labels int64, logits' shape without V: the token scored at each
///               position (Note [Label shift]: no shift is applied).
/// \param opts   ignore_index, temperature, whether to compute the entropy
///               and whether it is differentiable (LogitsOptions).
/// \throws c10::Error naming the argument: labels outside [0, V) other than
///         ignore_index, a NaN or +inf logit (or a row that is -inf over the
///         whole vocabulary) at a scored token, bad shapes, dtypes, devices
///         or options. A label whose logit is -inf gives logp = -inf, the
///         honest value, not an error.
inline TokenLogprobs token_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                    const LogitsOptions& opts = {}) {
  return detail::token_logprobs("psft::token_logprobs", logits, labels, opts);
}

// Note [Label shift]
// A causal LM's logits at position t are its prediction for token t + 1.
// psft's logits functions score logits[..., t, :] against labels[..., t]
// as given; the shift happens once, when the labels are built, here.

/// Next-token labels: labels[..., t] = input_ids[..., t + 1] and the last
/// position ignore_index. input_ids is [B, T] or [T] (integer); Hugging
/// Face-style unshifted labels that already hold ignore_index at prompt
/// positions may be passed instead of input_ids. Returns int64.
inline at::Tensor shift_labels(const at::Tensor& input_ids, std::int64_t ignore_index = -100) {
  const char* api = "psft::shift_labels";
  TORCH_CHECK(input_ids.defined(), api, ": input_ids is an undefined tensor");
  TORCH_CHECK(at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false), api,
              ": input_ids must be an integer tensor, got ", input_ids.scalar_type());
  TORCH_CHECK(input_ids.dim() == 1 || input_ids.dim() == 2, api,
              ": input_ids must have shape [B, T] or [T], got ", input_ids.sizes());
  const at::Tensor ids = input_ids.to(at::kLong);
  at::Tensor labels = at::full(ids.sizes(), ignore_index, ids.options());
  const std::int64_t length = ids.size(-1);
  if (length > 1) labels.narrow(-1, 0, length - 1).copy_(ids.narrow(-1, 1, length - 1));
  return labels;
}

/// Next-token labels that score only the tokens where loss_mask is nonzero:
/// labels[..., t] = loss_mask[..., t + 1] ? input_ids[..., t + 1] :
/// ignore_index (the usual "learn the response, not the prompt or the
/// padding"). loss_mask has input_ids' shape, bool, integer or float.
inline at::Tensor shift_labels(const at::Tensor& input_ids, const at::Tensor& loss_mask,
                               std::int64_t ignore_index = -100) {
  const char* api = "psft::shift_labels";
  at::Tensor labels = shift_labels(input_ids, ignore_index);
  TORCH_CHECK(loss_mask.defined(), api, ": loss_mask is an undefined tensor");
  TORCH_CHECK(loss_mask.sizes() == input_ids.sizes(), api,
              ": loss_mask must have input_ids' shape ", input_ids.sizes(), ", got ",
              loss_mask.sizes());
  TORCH_CHECK(loss_mask.device() == input_ids.device(), api, ": loss_mask is on ",
              loss_mask.device(), " but input_ids is on ", input_ids.device());
  // scored[..., t] = loss_mask[..., t + 1] != 0, false at the last position.
  at::Tensor scored = at::zeros(loss_mask.sizes(), loss_mask.options().dtype(at::kBool));
  const std::int64_t length = loss_mask.size(-1);
  if (length > 1) scored.narrow(-1, 0, length - 1).copy_(loss_mask.narrow(-1, 1, length - 1) != 0);
  return at::where(scored, labels, at::full({}, ignore_index, labels.options()));
}

/// The PSFT objective (psft_loss: A = 1, l = -min(r, 1 + eps_high)) straight
/// from logits: one fused pass gives logp and entropy, then psft_loss runs
/// on the per-token tensors with mask = labels != ignore_index. Backward
/// makes one pass over the logits and writes their gradient in their dtype.
///
/// \param logits   [B, T, V] or [N, V] (see token_logprobs)
/// \param labels   int64, [B, T] or [N]
/// \param old_logp labels' shape: log-probabilities under the old policy,
///                 ideally token_logprobs(...).logp of the same logits path
///                 under NoGradGuard, kept in float32; or an undefined
///                 tensor: the old policy is the current one (an on-policy
///                 mini-batch, r = 1), and the result's logp is what the
///                 old-policy cache keeps (OldPolicy::old with current)
/// \param loss_opts clipping, reduction, normaliser (as psft_loss)
/// \param logits_opts ignore_index, temperature, entropy_grad, backend
inline LogitsLossResult psft_loss_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                              const at::Tensor& old_logp,
                                              const LossOptions& loss_opts = {},
                                              const LogitsOptions& logits_opts = {}) {
  return detail::clipped_loss_from_logits("psft::psft_loss_from_logits", logits, labels, old_logp,
                                          at::Tensor(), loss_opts, logits_opts);
}

/// The general clipped policy objective (policy_loss: any advantages, dual
/// clip) straight from logits; otherwise as psft_loss_from_logits.
/// advantages: labels' shape, one per sequence ([B] or [B, 1]), or 0-d.
inline LogitsLossResult policy_loss_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                                const at::Tensor& old_logp,
                                                const at::Tensor& advantages,
                                                const LossOptions& loss_opts = {},
                                                const LogitsOptions& logits_opts = {}) {
  TORCH_CHECK(advantages.defined(),
              "psft::policy_loss_from_logits: advantages is an undefined tensor (use "
              "psft_loss_from_logits for A = 1)");
  return detail::clipped_loss_from_logits("psft::policy_loss_from_logits", logits, labels, old_logp,
                                          advantages, loss_opts, logits_opts);
}

PSFT_NAMESPACE_END
