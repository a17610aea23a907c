#pragma once
/// \file
/// The supervised fine-tuning objectives PSFT is compared with, on the same
/// per-token log-probabilities and with the same aggregation
/// (LossOptions::reduction, normaliser, norm_constant) as psft_loss:
///
///   Nll  l_t = -log p_t                       plain SFT (cross-entropy)
///   Dft  l_t = -sg(p_t) log p_t               Dynamic Fine-Tuning, sg = stop-gradient
///
/// DFT's gradient, -p_t d log p_t, is the NLL's gradient weighted by the
/// token's own probability, so tokens the model finds unlikely move less.
///
///   auto r = psft::sft_loss(logp, mask, psft::SftVariant::Dft);
///   r.loss.backward();

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "psft/autograd/anchor_kl_function.hpp"
#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/core/validate.hpp"
#include "psft/detail/checks.hpp"
#include "psft/detail/clipped_loss_types.hpp"
#include "psft/detail/mask.hpp"
#include "psft/logits.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// Which SFT objective sft_loss computes.
enum class SftVariant {
  /// Negative log-likelihood, l = -log p (plain SFT).
  Nll,
  /// Dynamic Fine-Tuning, l = -sg(p) log p (arXiv 2508.05629).
  Dft,
};

/// Result of sft_loss.
struct SftLossResult {
  /// The aggregated loss, 0-d, float32 (float64 for float64 logp),
  /// connected to logp's graph even when every token is masked.
  at::Tensor loss;
  /// Mask-weighted mean of -log p over this batch's tokens (0-d float64,
  /// detached; 0 without tokens), whatever the variant: comparable across
  /// runs.
  at::Tensor nll_mean;
  /// Sum of mask weights of this batch (0-d float64).
  at::Tensor token_count;
};

/// The SFT objective `variant` on per-token log-probabilities, aggregated
/// exactly as psft_loss aggregates its per-token losses (Reduction,
/// Normaliser for gradient accumulation and data parallel, norm_constant;
/// opts.clip and opts.backend are not used).
///
/// Note [SFT reduction on the host]: the per-row token counts are read to
/// the host and turned into row factors by core::reduce_rows, the same code
/// the fused clipped loss uses, so both objectives share one definition of
/// every reduction. That read is one host-device synchronisation per call on
/// an accelerator (free on the CPU).
///
/// \param logp    [B, T] or [N] log-probabilities of the target tokens,
///                any float dtype; differentiable.
/// \param mask    same shape, bool, float weights or integer 0/1 (Note [Mask
///                argument]); undefined: every token counts.
/// \param variant Nll or Dft.
/// \param opts    reduction, normaliser, norm_constant, check_finite (logp
///                must then be finite at unmasked tokens and mask weights
///                finite and >= 0).
/// \throws c10::Error naming the argument on bad input.
inline SftLossResult sft_loss(const at::Tensor& logp, const at::Tensor& mask,
                              SftVariant variant = SftVariant::Nll, const LossOptions& opts = {}) {
  const char* api = "psft::sft_loss";
  detail::check_float_tensor(api, "logp", logp);
  TORCH_CHECK(opts.entropy_coeff == 0.0, api, ": entropy_coeff (", opts.entropy_coeff,
              ") needs the logits; use sft_loss_from_logits");
  TORCH_CHECK(logp.dim() == 1 || logp.dim() == 2, api, ": logp must have shape [B, T] or [N], got ",
              logp.sizes());
  at::Tensor checked_mask;
  if (mask.defined()) {
    TORCH_CHECK(mask.device() == logp.device(), api, ": mask is on ", mask.device(),
                " but logp is on ", logp.device());
    TORCH_CHECK(mask.sizes() == logp.sizes(), api, ": mask must have logp's shape ", logp.sizes(),
                ", got ", mask.sizes());
    checked_mask = detail::mask_argument(api, "mask", mask);
  }
  TORCH_CHECK(variant == SftVariant::Nll || variant == SftVariant::Dft, api,
              ": variant must be SftVariant::Nll or SftVariant::Dft, got ",
              static_cast<int>(variant));
  const std::string options_error = core::loss_options_error(opts, static_cast<int>(logp.dim()));
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);

  const std::int64_t rows = logp.dim() == 2 ? logp.size(0) : 1;
  const std::int64_t cols = logp.dim() == 2 ? logp.size(1) : logp.size(0);
  const at::ScalarType acc = detail::accumulate_type(logp.scalar_type());
  const at::Tensor lp = logp.reshape({rows, cols}).to(acc);
  const at::Tensor weight = checked_mask.defined() ? checked_mask.reshape({rows, cols}).to(acc)
                                                   : at::ones_like(lp).detach();
  const at::Tensor valid = weight != 0;
  if (opts.check_finite) {
    // One read for both checks (a synchronisation on an accelerator).
    const at::Tensor bad =
        at::stack({at::logical_and(valid, lp.detach().isfinite().logical_not()).any(),
                   at::logical_or(weight.isfinite().logical_not(), weight < 0).any()})
            .cpu();
    TORCH_CHECK(!bad[0].item<bool>(), api,
                ": logp has NaN or Inf at an unmasked token (set LossOptions::check_finite = "
                "false to skip this check)");
    TORCH_CHECK(!bad[1].item<bool>(), api, ": mask has a negative, NaN or Inf weight");
  }
  const at::Tensor zero = at::zeros({}, lp.options().requires_grad(false));
  // Masked tokens contribute nothing, whatever their values (even NaN or
  // -inf): they are replaced before any formula sees them, so that no NaN
  // reaches their gradient either (DFT's weight exp(logp) would).
  const at::Tensor lp_valid = at::where(valid, lp, zero);
  const at::Tensor token_loss =
      variant == SftVariant::Nll ? -lp_valid : -lp_valid.detach().exp() * lp_valid;
  const at::Tensor row_loss = at::where(valid, token_loss * weight, zero).sum(1);
  const at::Tensor row_tokens = at::where(valid, weight, zero).sum(1, false, at::kDouble);

  // Row factors from the shared reduction code (Note [SFT reduction on the host]).
  const at::Tensor row_tokens_host = row_tokens.cpu().contiguous();
  std::vector<double> row_loss_unused(static_cast<std::size_t>(rows), 0.0);
  at::Tensor row_scale = at::empty({rows}, at::TensorOptions().dtype(at::kDouble));
  const core::RowReduction reduced = core::reduce_rows(
      core::resolve_sequence_count(opts, rows), rows, cols, row_loss_unused.data(),
      row_tokens_host.data_ptr<double>(), row_scale.data_ptr<double>());
  TORCH_CHECK(reduced.error.empty(), api, ": ", reduced.error);

  SftLossResult result;
  result.loss = (row_loss * row_scale.to(lp.device()).to(acc)).sum();
  const at::Tensor count = row_tokens.sum();
  result.token_count = count;
  result.nll_mean = detail::masked_nll_mean(lp, weight);
  return result;
}

/// Result of sft_loss_from_logits: the loss and the per-token outputs of the
/// logits pass, for logging.
struct SftLogitsLossResult {
  /// The aggregated loss (as sft_loss).
  at::Tensor loss;
  /// Mask-weighted mean of -log p (as sft_loss).
  at::Tensor nll_mean;
  /// Number of scored labels (0-d float64).
  at::Tensor token_count;
  /// Per-token log-probabilities (0 at ignore_index).
  at::Tensor logp;
  /// Per-token entropy (0 at ignore_index), without gradient unless
  /// LogitsOptions::entropy_grad.
  at::Tensor entropy;
  /// Masked token-entropy mean over this batch, 0-d in the entropy's dtype,
  /// differentiable with LogitsOptions::entropy_grad (as
  /// LogitsLossResult::entropy_mean).
  at::Tensor entropy_mean;
};

namespace detail {

/// sft_loss of token log-probabilities t (from any logits path), with the
/// entropy bonus and the per-token tensors alongside.
inline SftLogitsLossResult sft_loss_from_token_logprobs(const char* api, const TokenLogprobs& t,
                                                        const at::Tensor& labels,
                                                        SftVariant variant, const LossOptions& opts,
                                                        std::int64_t ignore_index) {
  const at::Tensor mask = labels != ignore_index;
  LossOptions sft_opts = opts;
  sft_opts.entropy_coeff = 0.0;
  const SftLossResult r = sft_loss(t.logp, mask, variant, sft_opts);
  SftLogitsLossResult out;
  out.loss = r.loss;
  if (opts.entropy_coeff != 0.0) {  // loss - entropy_coeff x agg(entropy), as the policy losses
    out.loss =
        out.loss - opts.entropy_coeff *
                       aggregate_tokens(api, t.entropy, mask, sft_opts).to(out.loss.scalar_type());
  }
  out.nll_mean = r.nll_mean;
  out.token_count = r.token_count;
  out.logp = t.logp;
  out.entropy = t.entropy;
  out.entropy_mean = masked_entropy_mean(t.entropy, mask);
  return out;
}

}  // namespace detail

/// sft_loss on the log-probabilities of labels under logits, computed by
/// token_logprobs (one fused pass, no [tokens, V] float32 tensor); labels
/// equal to logits_opts.ignore_index are masked.
/// \param logits      [B, T, V] or [N, V] (see token_logprobs).
/// \param labels      int64, logits' shape without V (Note [Label shift]: no
///                    shift is applied).
/// \param variant     Nll or Dft.
/// \param opts        reduction, normaliser, norm_constant (as sft_loss), and
///                    entropy_coeff: the entropy bonus, loss - entropy_coeff x
///                    agg(entropy) (as the policy losses from logits).
/// \param logits_opts ignore_index, temperature, backend (as token_logprobs).
/// \throws c10::Error naming the argument on bad input.
inline SftLogitsLossResult sft_loss_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                                SftVariant variant = SftVariant::Nll,
                                                const LossOptions& opts = {},
                                                const LogitsOptions& logits_opts = {}) {
  const char* api = "psft::sft_loss_from_logits";
  TORCH_CHECK(labels.defined(), api, ": labels is an undefined tensor");
  LogitsOptions pass_opts = logits_opts;
  if (opts.entropy_coeff != 0.0) pass_opts.entropy_grad = true;  // the entropy bonus
  const TokenLogprobs t = token_logprobs(logits, labels, pass_opts);
  return detail::sft_loss_from_token_logprobs(api, t, labels, variant, opts,
                                              logits_opts.ignore_index);
}

/// Result of asft_loss_from_logits.
struct AsftLossResult {
  /// agg(-sg(p) log p) + kl_coef x agg(KL(pi_ref || pi_theta)), 0-d.
  at::Tensor loss;
  /// Mask-weighted mean of -log p over the scored tokens (float64).
  at::Tensor nll_mean;
  /// Mask-weighted mean of the per-token KL(pi_ref || pi_theta) (float64).
  at::Tensor kl_mean;
  /// Per-token log-probabilities (0 at ignore_index).
  at::Tensor logp;
  /// Per-token KL(pi_ref || pi_theta) over the vocabulary (0 at ignore_index).
  at::Tensor kl;
};

namespace detail {

/// ASFT's checks that need neither logits nor hidden states.
inline void check_asft_options(const char* api, double kl_coef, const LossOptions& opts) {
  TORCH_CHECK(std::isfinite(kl_coef) && kl_coef >= 0, api,
              ": kl_coef must be finite and >= 0, got ", kl_coef);
  TORCH_CHECK(opts.entropy_coeff == 0.0, api, ": entropy_coeff is not part of ASFT");
}

/// ASFT's result from DFT's and the per-token KL (labels' shape, 0 where
/// not scored): loss = dft.loss + kl_coef x agg(kl), the KL's mean, and
/// opts.check_finite's check of the KL.
inline AsftLossResult asft_result(const char* api, const SftLogitsLossResult& dft,
                                  const at::Tensor& kl, const at::Tensor& scored, double kl_coef,
                                  const LossOptions& opts) {
  if (opts.check_finite) {
    TORCH_CHECK(
        at::logical_and(scored, kl.detach().isfinite().logical_not()).any().item<bool>() == false,
        api,
        ": the anchor KL is NaN or Inf at a scored token (a NaN or +-inf in the reference's "
        "logits?)");
  }
  AsftLossResult out;
  out.loss =
      dft.loss + kl_coef * aggregate_tokens(api, kl, scored, opts).to(dft.loss.scalar_type());
  out.nll_mean = dft.nll_mean;
  out.kl_mean = masked_nll_mean(-kl.detach(), scored);  // the mean of kl
  out.logp = dft.logp;
  out.kl = kl;
  return out;
}

}  // namespace detail

/// Anchored SFT (ASFT, Zhu et al. 2025, "Anchored Supervised Fine-Tuning"):
/// DFT's loss with a KL anchor to a reference model (the model fine-tuning
/// started from) over the whole vocabulary at every scored token,
///
///   loss = agg(-sg(p) log p) + kl_coef x agg(KL(pi_ref || pi_theta)),
///   KL_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)),
///
/// both aggregated by opts.reduction with opts.normaliser (kl_coef 0.05 to
/// 0.1 in the paper). On the CPU, with ref_logits of logits' dtype, both
/// terms come from one fused pass over the two rows (cpu/anchor_kl.hpp):
/// forward reads each logit once, backward once more and writes d logits
/// once. Otherwise (CUDA, mixed dtypes, Backend::Composed) the DFT term runs
/// through the logits pass and the anchor through ATen ops over chunks of
/// rows (logits_opts.composed_chunk_bytes per float temporary), which keep
/// no [tokens, V] tensor beyond a chunk. The gradient flows to logits only;
/// ref_logits is a constant.
/// \param logits      [B, T, V] or [N, V] policy logits (see token_logprobs).
/// \param ref_logits  the reference model's logits, same shape (any float dtype).
/// \param labels      int64, logits' shape without V; ignore_index is not scored.
/// \param kl_coef     the anchor's weight lambda, finite and >= 0.
/// \param opts        reduction, normaliser, check_finite (as sft_loss).
/// \param logits_opts ignore_index, temperature, composed_chunk_bytes, backend,
///                    check_inputs (the fused pass also rejects a NaN, +inf or
///                    all -inf row of ref_logits at a scored token).
/// \throws c10::Error naming the argument on bad input.
inline AsftLossResult asft_loss_from_logits(const at::Tensor& logits, const at::Tensor& ref_logits,
                                            const at::Tensor& labels, double kl_coef = 0.05,
                                            const LossOptions& opts = {},
                                            const LogitsOptions& logits_opts = {}) {
  const char* api = "psft::asft_loss_from_logits";
  detail::check_asft_options(api, kl_coef, opts);
  TORCH_CHECK(ref_logits.defined(), api, ": ref_logits is an undefined tensor");
  TORCH_CHECK(logits.defined(), api, ": logits is an undefined tensor");
  detail::check_float_tensor(api, "ref_logits", ref_logits);
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), api, ": ref_logits must have logits' shape ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.device() == logits.device(), api, ": ref_logits is on ",
              ref_logits.device(), " but logits is on ", logits.device());
  // Labels and options first, before any logit is read.
  const at::Tensor flat_labels =
      detail::check_logits_inputs(api, logits, labels, logits_opts).reshape({-1});
  const std::int64_t vocab = logits.size(-1);
  const at::Tensor scored = labels != logits_opts.ignore_index;
  SftLogitsLossResult dft;
  at::Tensor kl;
  if (detail::logits_backend_for(logits, logits_opts.backend) == Backend::FusedCpu &&
      ref_logits.scalar_type() == logits.scalar_type()) {
    // One fused pass over both rows (cpu/anchor_kl.hpp).
    const at::Tensor policy = detail::vocab_contiguous(logits);
    const at::Tensor reference = detail::vocab_contiguous(ref_logits.detach());
    TokenLogprobs t;
    t.backend = Backend::FusedCpu;
    if (logits.requires_grad() && torch::autograd::GradMode::is_enabled()) {
      const auto outs =
          autograd::FusedAnchorFunction::apply(policy, reference, flat_labels, logits_opts, api);
      t.logp = outs[0];
      t.entropy = outs[1];
      kl = outs[2];
    } else {
      const at::TensorOptions acc =
          flat_labels.options().dtype(detail::logits_accumulate_type(logits.scalar_type()));
      t.logp = at::empty(flat_labels.sizes(), acc);
      t.entropy = at::empty(flat_labels.sizes(), acc);
      kl = at::empty(flat_labels.sizes(), acc);
      cpu::anchor_kl_forward(api, policy.detach(), reference, flat_labels, logits_opts, t.logp,
                             t.entropy, kl, at::Tensor());
    }
    t.logp = t.logp.reshape(labels.sizes());
    t.entropy = t.entropy.reshape(labels.sizes());
    kl = kl.reshape(labels.sizes());
    dft = detail::sft_loss_from_token_logprobs(api, t, labels, SftVariant::Dft, opts,
                                               logits_opts.ignore_index);
  } else {
    // Other devices, mixed dtypes, Backend::Composed: the fused logits pass
    // for DFT and ATen ops over chunks of rows for the anchor.
    dft = sft_loss_from_logits(logits, labels, SftVariant::Dft, opts, logits_opts);
    kl = autograd::AnchorKlFunction::apply(
             logits.reshape({-1, vocab}), ref_logits.detach().reshape({-1, vocab}),
             scored.reshape({-1}), logits_opts.temperature, logits_opts.composed_chunk_bytes)
             .reshape(labels.sizes());
  }
  return detail::asft_result(api, dft, kl, scored, kl_coef, opts);
}

/// iw-SFT's importance weight: per sequence or per token.
enum class IwSftLevel {
  /// w_i = clamp(exp(mean_t (logp - ref_logp)), 0, max_weight) for the whole sequence
  Sequence,
  /// w_t = clamp(exp(logp_t - ref_logp_t), token_low, token_high)
  Token,
};

/// Settings of iw_sft_loss (the paper's values by default).
struct IwSftOptions {
  IwSftLevel level = IwSftLevel::Sequence;  ///< sequence (the paper's) or token weights
  double max_weight = 16.0;                 ///< Sequence: the weight's upper clamp, > 0
  double token_low = 0.2;                   ///< Token: the weight's lower clamp, in (0, 1]
  double token_high = 1.8;                  ///< Token: the weight's upper clamp, >= 1
};

/// Importance-weighted SFT (iw-SFT, Qin & Springenberg 2025, "Supervised
/// fine tuning on curated data is reinforcement learning"): the NLL of each
/// token weighted by sg(w), l = -sg(w) logp, with w the clamped ratio of the
/// current policy to a reference (the start of fine-tuning, or a lagged
/// copy). This is CISPO's rule with A = 1 and ref_logp as the old policy
/// (CispoCapped at sequence level, CispoRelative per token; docs/objectives.md),
/// run by the same backends. Aggregated by opts.reduction with opts.normaliser;
/// metrics.clip_frac is the fraction of tokens whose weight was clamped.
/// \throws c10::Error naming the argument on bad input.
inline LossResult iw_sft_loss(const at::Tensor& logp, const at::Tensor& ref_logp,
                              const at::Tensor& mask, const IwSftOptions& iw = {},
                              const LossOptions& opts = {}) {
  const char* api = "psft::iw_sft_loss";
  TORCH_CHECK(iw.level == IwSftLevel::Sequence || iw.level == IwSftLevel::Token, api,
              ": level must be IwSftLevel::Sequence or Token, got ", static_cast<int>(iw.level));
  LossOptions o = opts;
  if (iw.level == IwSftLevel::Sequence) {
    TORCH_CHECK(std::isfinite(iw.max_weight) && iw.max_weight > 0, api,
                ": max_weight must be finite and > 0, got ", iw.max_weight);
    o.objective.kind = Objective::CispoCapped;
    o.objective.ratio_level = RatioLevel::Sequence;
    o.objective.cispo_cap = iw.max_weight;
  } else {
    TORCH_CHECK(std::isfinite(iw.token_low) && iw.token_low > 0 && iw.token_low <= 1, api,
                ": token_low must be in (0, 1], got ", iw.token_low);
    TORCH_CHECK(std::isfinite(iw.token_high) && iw.token_high >= 1, api,
                ": token_high must be finite and >= 1, got ", iw.token_high);
    o.objective.kind = Objective::CispoRelative;
    o.objective.ratio_level = RatioLevel::Token;
    o.clip.eps_low = 1.0 - iw.token_low;
    o.clip.eps_high = iw.token_high - 1.0;
  }
  o.clip.dual_clip.reset();
  o.clip.delta.reset();
  TORCH_CHECK(o.entropy_coeff == 0.0, api, ": entropy_coeff (", o.entropy_coeff,
              ") needs the logits");
  const detail::ClippedLossValues v = detail::run_clipped_loss(
      detail::check_clipped_loss_inputs(api, logp, ref_logp, at::Tensor(), mask, o, "ref_logp"), o);
  LossResult result;
  result.loss = v.loss;
  result.metrics = LossMetrics::from_packed(v.metrics);
  return result;
}

PSFT_NAMESPACE_END
