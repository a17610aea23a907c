#pragma once
/// \file
/// TRL's GRPO and SFT settings, by their own names, turned into the
/// LossOptions (and SFT variant) that reproduce TRL's loss and gradient
/// exactly (verified against TRL 1.16.0's GRPOTrainer._compute_loss and
/// SFTTrainer.compute_loss by scripts/check-peers.sh; docs/parameters.md has
/// each formula). TRL's loss is per micro-batch, so the options are too:
///
///   psft::compat::trl::GrpoSettings grpo;           // GRPOConfig
///   grpo.loss_type = "grpo";
///   const psft::LossOptions opts = psft::compat::trl::grpo_loss_options(
///       grpo, {completion_mask, /*num_items_in_batch=*/{}, /*GA=*/4});
///   psft::policy_loss(logp, old_logp, advantages, completion_mask, opts);

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/normaliser.hpp"
#include "psft/sft_loss.hpp"

PSFT_NAMESPACE_BEGIN
namespace compat {
namespace trl {

/// The GRPOConfig fields TRL's clipped loss reads, with TRL's defaults.
struct GrpoSettings {
  /// grpo, bnpo, dr_grpo or dapo (TRL's default).
  std::string loss_type = "dapo";
  double epsilon = 0.2;                ///< eps_low, and eps_high unless epsilon_high is set
  std::optional<double> epsilon_high;  ///< eps_high
  /// Two-sided clipping: the unclipped ratio is min(r, delta); > 1 + eps_high.
  std::optional<double> delta;
  /// dr_grpo's length constant L_max.
  std::int64_t max_completion_length = 256;
  /// accelerator.num_processes (dapo divides num_items_in_batch by it).
  std::int64_t num_processes = 1;
  /// steps_per_generation (dapo); unset: TRL's default, the gradient
  /// accumulation steps.
  std::optional<std::int64_t> steps_per_generation;
  /// "token" or "sequence" (GSPO's sequence-level ratio).
  std::string importance_sampling_level = "token";
  ///@{
  /// SAPO temperatures (sapo_temperature_pos / _neg).
  double sapo_temperature_pos = 1.0, sapo_temperature_neg = 1.05;
  ///@}
};

/// One micro-batch as TRL's _compute_loss sees it.
struct GrpoBatch {
  /// [B, T] completion mask of the micro-batch (bool, float or integer 0/1).
  at::Tensor completion_mask;
  /// dapo: inputs["num_items_in_batch"], the completion tokens of the whole
  /// generation batch over every process.
  std::optional<double> num_items_in_batch;
  /// TRL's current_gradient_accumulation_steps (the last window of an epoch
  /// may be shorter).
  std::int64_t gradient_accumulation_steps = 1;
};

/// The accepted GRPO loss types, for messages.
inline const char* accepted_grpo_loss_types() { return "grpo, bnpo, dr_grpo, dapo, sapo, cispo"; }

/// The LossOptions of TRL's GRPO loss (training mode) for one micro-batch:
///
///   grpo     mean over all B rows of (sum_t m l / max(n_s, 1)) / GA
///            = SeqMeanTokenMean, S = B x GA, empty rows counted
///   bnpo     sum(m l) / max(N, 1) / GA    = TokenMean, N x GA
///   dr_grpo  sum(m l) / (B L_max) / GA    = TokenSumNorm, C = B x L_max x GA
///   dapo     sum(m l) / (max(num_items, 1) / P x GA / spg)
///            = TokenMean, N = num_items x GA / spg, D = P
///
///   sapo     grpo's aggregation, Objective::Sapo with TRL's temperatures
///            (rounded to float32, as TRL computes them)
///   cispo    dapo's aggregation, Objective::CispoCapped with the cap
///            epsilon_high (else epsilon; TRL recommends 5)
///
/// with l = -min(A min(r, delta), A clip(r, 1 - eps, 1 + eps_high)) for the
/// clipped types; importance_sampling_level "sequence" is RatioLevel::Sequence.
/// TRL does not clamp the log-ratio (psft does, at +-20: the one documented
/// difference). TRL's beta term is psft::kl_penalty with
/// KlEstimator::K3Unclamped and these same options, times beta.
/// \throws c10::Error naming the setting on a bad value or combination.
inline LossOptions grpo_loss_options(const GrpoSettings& settings, const GrpoBatch& batch) {
  const char* api = "psft::compat::trl::grpo_loss_options";
  const std::string& type = settings.loss_type;
  TORCH_CHECK(type == "grpo" || type == "bnpo" || type == "dr_grpo" || type == "dapo" ||
                  type == "sapo" || type == "cispo",
              api, ": loss_type must be one of ", accepted_grpo_loss_types(), "; got '", type, "'");
  const std::string& level = settings.importance_sampling_level;
  TORCH_CHECK(level == "token" || level == "sequence", api,
              ": importance_sampling_level must be 'token' or 'sequence'; got '", level, "'");
  if (type == "sapo" || type == "cispo") {
    GrpoSettings clipped = settings;
    clipped.loss_type = type == "sapo" ? "grpo" : "dapo";
    LossOptions o = grpo_loss_options(clipped, batch);
    o.clip.delta.reset();
    if (type == "sapo") {
      o.objective.kind = Objective::Sapo;
      // TRL builds the temperatures with torch.where on two Python floats,
      // a float32 tensor: 1.05 is used as float32's 1.0499999523.
      o.objective.sapo_tau_pos = static_cast<float>(settings.sapo_temperature_pos);
      o.objective.sapo_tau_neg = static_cast<float>(settings.sapo_temperature_neg);
    } else {
      o.objective.kind = Objective::CispoCapped;
      o.objective.cispo_cap = settings.epsilon_high.value_or(settings.epsilon);
    }
    return o;
  }
  TORCH_CHECK(batch.gradient_accumulation_steps >= 1, api,
              ": gradient_accumulation_steps must be >= 1, got ",
              batch.gradient_accumulation_steps);
  TORCH_CHECK(settings.num_processes >= 1, api, ": num_processes must be >= 1, got ",
              settings.num_processes);
  const double ga = static_cast<double>(batch.gradient_accumulation_steps);
  LossOptions o;
  o.clip.eps_low = settings.epsilon;
  o.clip.eps_high = settings.epsilon_high.value_or(settings.epsilon);
  o.clip.delta = settings.delta;

  const bool needs_mask = type != "dapo";
  if (needs_mask) {
    TORCH_CHECK(batch.completion_mask.defined() && batch.completion_mask.dim() == 2, api,
                ": batch.completion_mask must be a [B, T] tensor for loss_type '", type, "'");
  }
  Normaliser n;
  if (type == "grpo") {
    o.reduction = Reduction::SeqMeanTokenMean;
    o.count_empty_sequences = true;
    n.sequences = static_cast<double>(batch.completion_mask.size(0)) * ga;
  } else if (type == "bnpo") {
    o.reduction = Reduction::TokenMean;
    // The micro-batch's own token count (one read to the host). TRL clamps
    // it at 1; psft's empty batch is 0 either way.
    n.tokens = *count_normaliser(batch.completion_mask).tokens * ga;
  } else if (type == "dr_grpo") {
    TORCH_CHECK(settings.max_completion_length >= 1, api,
                ": max_completion_length must be >= 1, got ", settings.max_completion_length);
    o.reduction = Reduction::TokenSumNorm;
    o.norm_constant = static_cast<double>(batch.completion_mask.size(0)) *
                      static_cast<double>(settings.max_completion_length) * ga;
  } else {  // dapo
    TORCH_CHECK(batch.num_items_in_batch.has_value(), api,
                ": loss_type 'dapo' divides by num_items_in_batch; set batch.num_items_in_batch");
    TORCH_CHECK(std::isfinite(*batch.num_items_in_batch) && *batch.num_items_in_batch >= 0, api,
                ": num_items_in_batch must be finite and >= 0, got ", *batch.num_items_in_batch);
    const std::int64_t spg =
        settings.steps_per_generation.value_or(batch.gradient_accumulation_steps);
    TORCH_CHECK(spg >= 1, api, ": steps_per_generation must be >= 1, got ", spg);
    o.reduction = Reduction::TokenMean;
    n.tokens = std::max(*batch.num_items_in_batch, 1.0) * ga / static_cast<double>(spg);
    n.world_size = settings.num_processes;
  }
  if (o.reduction != Reduction::TokenSumNorm) o.normaliser = n;
  if (level == "sequence") o.objective.ratio_level = RatioLevel::Sequence;
  return o;
}

/// The SFTConfig fields TRL's SFT loss reads.
struct SftSettings {
  /// nll (TRL's default) or dft.
  std::string loss_type = "nll";
  /// TRL's average_tokens_across_devices (default true): with
  /// num_items_in_batch the loss is multiplied by num_processes.
  bool average_tokens_across_devices = true;
  /// accelerator.num_processes.
  std::int64_t num_processes = 1;
  /// gradient_accumulation_steps: without num_items_in_batch, transformers'
  /// Trainer divides each micro-batch's loss by it.
  std::int64_t gradient_accumulation_steps = 1;
};

/// TRL's SFT loss_type as an SftVariant.
/// \throws c10::Error listing the accepted values.
inline SftVariant sft_variant(const SftSettings& settings) {
  if (settings.loss_type == "nll") return SftVariant::Nll;
  if (settings.loss_type == "dft") return SftVariant::Dft;
  TORCH_CHECK(false, "psft::compat::trl::sft_variant: loss_type must be nll or dft, got '",
              settings.loss_type, "'");
  return SftVariant::Nll;
}

/// The LossOptions of TRL's SFT loss, sum(l) / max(num_tokens, 1) x P:
/// TokenMean over num_items_in_batch (the step's tokens over every process)
/// when given, times num_processes when average_tokens_across_devices; else
/// over the micro-batch's own tokens (`mask`, read once to the host), divided
/// by gradient_accumulation_steps as transformers' Trainer does.
inline LossOptions sft_loss_options(const SftSettings& settings,
                                    std::optional<double> num_items_in_batch = {},
                                    const at::Tensor& mask = {}) {
  const char* api = "psft::compat::trl::sft_loss_options";
  sft_variant(settings);  // validates loss_type
  TORCH_CHECK(settings.num_processes >= 1, api, ": num_processes must be >= 1, got ",
              settings.num_processes);
  LossOptions o;
  o.reduction = Reduction::TokenMean;
  if (num_items_in_batch) {
    TORCH_CHECK(std::isfinite(*num_items_in_batch) && *num_items_in_batch >= 0, api,
                ": num_items_in_batch must be finite and >= 0, got ", *num_items_in_batch);
    Normaliser n;
    n.tokens = std::max(*num_items_in_batch, 1.0);
    n.world_size = settings.average_tokens_across_devices ? settings.num_processes : 1;
    o.normaliser = n;
  } else if (settings.gradient_accumulation_steps != 1) {
    TORCH_CHECK(settings.gradient_accumulation_steps >= 1, api,
                ": gradient_accumulation_steps must be >= 1, got ",
                settings.gradient_accumulation_steps);
    TORCH_CHECK(mask.defined(), api,
                ": without num_items_in_batch, gradient accumulation divides the micro-batch's own "
                "token mean by the steps; pass the micro-batch's mask");
    Normaliser n;
    n.tokens =
        *count_normaliser(mask).tokens * static_cast<double>(settings.gradient_accumulation_steps);
    o.normaliser = n;
  }
  return o;
}

}  // namespace trl
}  // namespace compat
PSFT_NAMESPACE_END
