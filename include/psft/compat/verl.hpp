#pragma once
/// \file
/// verl's actor settings, by their own names, turned into the LossOptions
/// that reproduce verl's policy loss and gradient exactly (verified against
/// verl 0.9.1's compute_policy_loss_vanilla and agg_loss by
/// scripts/check-peers.sh; docs/parameters.md has each formula).
///
///   psft::compat::verl::ActorSettings actor;   // actor_rollout_ref.actor.*
///   actor.loss_agg_mode = "seq-mean-token-mean";
///   actor.clip_ratio_high = 0.28;
///   psft::compat::verl::GlobalBatchInfo info{tokens, rows, dp_size};
///   const psft::LossOptions opts = psft::compat::verl::loss_options(actor, info);
///   psft::policy_loss(logp, old_logp, advantages, response_mask, opts);

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN
namespace compat {
namespace verl {

/// The actor config keys verl's vanilla policy loss reads, with verl
/// 0.9.1's defaults.
struct ActorSettings {
  /// token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean or
  /// seq-mean-token-sum-norm.
  std::string loss_agg_mode = "token-mean";
  /// clip_ratio: the clip widths where clip_ratio_low / _high are None.
  double clip_ratio = 0.2;
  /// eps_low. verl 0.9.1's default is 0.2, not clip_ratio: set it to
  /// std::nullopt (verl's None) to take clip_ratio.
  std::optional<double> clip_ratio_low = 0.2;
  /// eps_high; 0.2 by default, std::nullopt takes clip_ratio (as above).
  std::optional<double> clip_ratio_high = 0.2;
  /// Dual clip c, > 1. verl's vanilla loss always applies it.
  double clip_ratio_c = 3.0;
  /// C of seq-mean-token-sum-norm; unset: the mask's width (verl's default).
  /// The other modes do not read it (verl passes it to every mode and
  /// ignores it there, and so does psft).
  std::optional<double> loss_scale_factor;
  /// policy_loss.loss_mode: vanilla, gspo, cispo or sapo.
  std::string loss_mode = "vanilla";
  ///@{
  /// SAPO temperatures (policy_loss.tau_pos / tau_neg).
  double tau_pos = 1.0, tau_neg = 1.05;
  ///@}
};

/// verl's config.global_batch_info. Leave both counts unset for verl's local
/// path (one process, counts from the micro-batch itself).
struct GlobalBatchInfo {
  /// Valid tokens of the global (mini-)batch over every rank (token-mean).
  std::optional<double> batch_num_tokens;
  /// Rows of the global mini-batch, empty ones included (ppo_mini_batch_size
  /// x rollout n; the seq-mean modes).
  std::optional<double> global_batch_size;
  /// Data-parallel ranks.
  std::int64_t dp_size = 1;
};

/// The accepted loss_agg_mode values, for messages.
inline const char* accepted_loss_agg_modes() {
  return "token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, "
         "seq-mean-token-sum-norm";
}

/// verl's loss_agg_mode as a Reduction (verl 0.9.1 semantics).
/// \throws c10::Error listing the accepted values for any other string.
inline Reduction reduction(const std::string& loss_agg_mode) {
  if (loss_agg_mode == "token-mean") return Reduction::TokenMean;
  if (loss_agg_mode == "token-sum") return Reduction::TokenSum;
  if (loss_agg_mode == "seq-mean-token-sum") return Reduction::SeqMeanTokenSum;
  if (loss_agg_mode == "seq-mean-token-mean") return Reduction::SeqMeanTokenMean;
  if (loss_agg_mode == "seq-mean-token-sum-norm") return Reduction::SeqMeanTokenSumNorm;
  TORCH_CHECK(false, "psft::compat::verl: loss_agg_mode must be one of ", accepted_loss_agg_modes(),
              "; got '", loss_agg_mode, "'");
  return Reduction::TokenMean;
}

/// The LossOptions of verl's vanilla policy loss with these settings:
///
///   token-mean               sum(m l) / N * D     N = batch_num_tokens, else the micro-batch's
///   token-sum                sum(m l) * D
///   seq-mean-token-sum       sum_s(sum_t m l) / S * D
///   seq-mean-token-mean      sum_s(sum_t m l / n_s) / S * D
///   seq-mean-token-sum-norm  sum(m l) / S / C * D  C = loss_scale_factor, else T
///
/// S is global_batch_size (rows, empty ones included) when given, else the
/// micro-batch's non-empty rows, exactly as verl's two paths differ. As in
/// verl, dp_size > 1 needs the global count of the mode.
/// \throws c10::Error naming the setting on a bad value or combination.
///
/// loss_mode selects verl's other policy losses: gspo (the clipped loss on
/// the sequence-level ratio, log-ratio clamped at 10 as verl does, no dual
/// clip), cispo (CispoRelative, no dual clip) and sapo (verl always
/// aggregates it by seq-mean-token-mean, whatever loss_agg_mode says, and so
/// does this preset). verl's GSPO clamps log s only from above; psft clamps
/// it to [-10, 10], which changes a token's numbers only where its
/// sequence's mean log-ratio is below -10.
inline LossOptions loss_options(const ActorSettings& actor, const GlobalBatchInfo& info = {}) {
  const char* api = "psft::compat::verl::loss_options";
  const std::string& mode = actor.loss_mode;
  TORCH_CHECK(mode == "vanilla" || mode == "gspo" || mode == "cispo" || mode == "sapo", api,
              ": loss_mode must be one of vanilla, gspo, cispo, sapo; got '", mode, "'");
  if (mode == "sapo") {
    ActorSettings sapo = actor;
    sapo.loss_agg_mode = "seq-mean-token-mean";
    sapo.loss_mode = "vanilla";
    LossOptions o = loss_options(sapo, info);
    o.clip.dual_clip.reset();
    o.objective.kind = Objective::Sapo;
    o.objective.sapo_tau_pos = actor.tau_pos;
    o.objective.sapo_tau_neg = actor.tau_neg;
    return o;
  }
  if (mode != "vanilla") {
    ActorSettings vanilla = actor;
    vanilla.loss_mode = "vanilla";
    LossOptions o = loss_options(vanilla, info);
    o.clip.dual_clip.reset();
    if (mode == "gspo") {
      o.objective.ratio_level = RatioLevel::Sequence;
      o.clip.log_ratio_clamp = 10.0;
    } else {
      o.objective.kind = Objective::CispoRelative;
    }
    return o;
  }
  LossOptions o;
  o.reduction = reduction(actor.loss_agg_mode);
  o.clip.eps_low = actor.clip_ratio_low.value_or(actor.clip_ratio);
  o.clip.eps_high = actor.clip_ratio_high.value_or(actor.clip_ratio);
  TORCH_CHECK(std::isfinite(actor.clip_ratio_c) && actor.clip_ratio_c > 1.0, api,
              ": clip_ratio_c must be > 1 (verl asserts it), got ", actor.clip_ratio_c);
  o.clip.dual_clip = actor.clip_ratio_c;
  TORCH_CHECK(info.dp_size >= 1, api, ": dp_size must be >= 1, got ", info.dp_size);
  if (actor.loss_scale_factor && o.reduction == Reduction::SeqMeanTokenSumNorm) {
    o.norm_constant = *actor.loss_scale_factor;
  }
  const bool by_tokens = o.reduction == Reduction::TokenMean;
  const bool by_rows = o.reduction == Reduction::SeqMeanTokenSum ||
                       o.reduction == Reduction::SeqMeanTokenMean ||
                       o.reduction == Reduction::SeqMeanTokenSumNorm;
  if (by_tokens) {
    TORCH_CHECK(info.batch_num_tokens || info.dp_size == 1, api,
                ": verl needs batch_num_tokens for token-mean when dp_size > 1 (got dp_size ",
                info.dp_size, ")");
  }
  if (by_rows) {
    TORCH_CHECK(info.global_batch_size || info.dp_size == 1, api,
                ": verl needs global_batch_size for ", actor.loss_agg_mode,
                " when dp_size > 1 (got dp_size ", info.dp_size, ")");
  }
  if (info.dp_size > 1 || (by_tokens && info.batch_num_tokens) ||
      (by_rows && info.global_batch_size)) {
    Normaliser n;
    if (by_tokens) n.tokens = info.batch_num_tokens;
    if (by_rows) n.sequences = info.global_batch_size;
    n.world_size = info.dp_size;
    o.normaliser = n;
  }
  // verl's global_batch_size counts every row; its local path counts the
  // non-empty ones. A given count is used as is either way.
  o.count_empty_sequences = false;
  return o;
}

/// verl's kl_loss_type (actor.kl_loss_type with use_kl_loss) as the
/// estimator of psft::kl_penalty: kl / k1, abs, mse / k2, low_var_kl / k3,
/// and the straight-through forms k1+, abs+, k3+ / low_var_kl+ (value of the
/// estimator, gradient of k2). verl's actor adds kl_loss_coef x the penalty
/// aggregated with the actor's loss_agg_mode: pass it the same LossOptions.
/// \throws c10::Error listing the accepted values for any other string.
inline core::KlEstimatorId kl_estimator(const std::string& kl_loss_type) {
  const std::string base = !kl_loss_type.empty() && kl_loss_type.back() == '+'
                               ? kl_loss_type.substr(0, kl_loss_type.size() - 1)
                               : kl_loss_type;
  const bool plus = base.size() != kl_loss_type.size();
  using K = core::KlEstimatorId;
  if (base == "kl" || base == "k1") return plus ? K::K1StraightThrough : K::K1;
  if (base == "abs") return plus ? K::AbsStraightThrough : K::Abs;
  if (base == "mse" || base == "k2") return K::K2;  // k2+ is k2
  if (base == "low_var_kl" || base == "k3") return plus ? K::K3StraightThrough : K::K3;
  TORCH_CHECK(false,
              "psft::compat::verl: kl_loss_type must be one of kl, k1, abs, mse, k2, "
              "low_var_kl, k3 (optionally with a trailing '+'); got '",
              kl_loss_type, "'");
  return core::KlEstimatorId::K3;
}

/// The PSFT authors' recipe (their verl fork's run_psft.sh): advantage 1 on
/// every token (use psft_loss), the vanilla clipped loss with clip 0.2 /
/// 0.28, clip_ratio_c 10, token-mean. Supply GlobalBatchInfo under data
/// parallelism as for loss_options.
inline LossOptions psft_recipe(const GlobalBatchInfo& info = {}) {
  ActorSettings actor;
  actor.loss_agg_mode = "token-mean";
  actor.clip_ratio_low = 0.2;
  actor.clip_ratio_high = 0.28;
  actor.clip_ratio_c = 10.0;
  return loss_options(actor, info);
}

}  // namespace verl
}  // namespace compat
PSFT_NAMESPACE_END
