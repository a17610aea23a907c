#pragma once
/// \file
/// Option structs of the objective. Torch-free so that the Eigen API, the CPU
/// kernels and (later) the CUDA kernels all read the same definitions.

#include <cstdint>
#include <optional>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN

/// Trust-region (clipping) settings. Defaults are the PSFT recipe's.
struct ClipOptions {
  /// Lower clip: the ratio is clipped below at 1 - eps_low (binds only for
  /// negative advantages). Must be in [0, 1).
  double eps_low = 0.2;
  /// Upper clip: the ratio is clipped above at 1 + eps_high (binds for
  /// positive advantages, so it is the PSFT trust region). Must be >= 0.
  double eps_high = 0.28;
  /// Dual clip constant c > 1 for negative advantages: the per-token loss is
  /// capped at -A c (verl's clip_ratio_c). Unset: no dual clip.
  std::optional<double> dual_clip;
  /// The log-ratio is clamped to [-log_ratio_clamp, log_ratio_clamp] before
  /// exp, as verl and OpenRLHF do (see Note [Why the log-ratio clamp]).
  double log_ratio_clamp = 20.0;
  /// TRL's `delta` (two-sided clipping): the unclipped term uses min(r,
  /// delta), so a token with A < 0 whose ratio exceeds delta stops passing
  /// gradient. Must be > 1 + eps_high. Unset: no bound.
  std::optional<double> delta;
};

/// The per-token objective (core/objectives/; docs/objectives.md). r =
/// exp(clamp(logp - old_logp)), sg = stop-gradient.
enum class Objective {
  /// PPO's clipped surrogate max(-A r, -A clip(r)) with ClipOptions' dual
  /// clip and delta (PSFT with A = 1; verl `vanilla`, TRL `grpo`/`dapo`/...).
  Clipped,
  /// verl's `cispo`: -sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp.
  CispoRelative,
  /// TRL's and Liger's `cispo`: -sg(min(r, ObjectiveOptions::cispo_cap)) A logp.
  CispoCapped,
  /// SAPO: -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_tau_pos for A > 0,
  /// sapo_tau_neg otherwise (verl `sapo`, TRL `sapo`).
  Sapo,
};

/// Whether r is the token's own ratio or its sequence's.
enum class RatioLevel {
  /// r_t = exp(logp_t - old_logp_t).
  Token,
  /// GSPO (verl `gspo`, TRL importance_sampling_level="sequence"): every
  /// token of sequence i uses s_i = exp(mean_t (logp_t - old_logp_t)) over
  /// its unmasked tokens (mask-weighted), with d s_i / d logp_t = s_i (verl's
  /// sg(s_i) pi / sg(pi)); the clamp of ClipOptions::log_ratio_clamp applies
  /// to log s_i. Needs [B, T] inputs.
  Sequence,
};

/// Which objective, and the parameters of those that have their own.
struct ObjectiveOptions {
  Objective kind = Objective::Clipped;         ///< the per-token rule
  RatioLevel ratio_level = RatioLevel::Token;  ///< token or sequence ratio (GSPO)
  /// CispoCapped's absolute cap on the weight (TRL's epsilon_high for cispo,
  /// 5.0 recommended there). Must be > 0.
  double cispo_cap = 5.0;
  /// SAPO temperature for A > 0 (verl tau_pos, TRL sapo_temperature_pos). > 0.
  double sapo_tau_pos = 1.0;
  /// SAPO temperature for A <= 0 (verl tau_neg, TRL sapo_temperature_neg). > 0.
  double sapo_tau_neg = 1.05;
};

/// How per-token losses are aggregated; definitions follow verl 0.9.1's
/// agg_loss. N = token count (sum of mask weights), S = number of sequences
/// with at least one unmasked token (every row, empty ones included, with
/// LossOptions::count_empty_sequences), n_s = tokens of sequence s, C =
/// LossOptions::norm_constant (default: the padded length T), D = world_size.
enum class Reduction {
  /// sum(m l) / N * D (verl token-mean)
  TokenMean,
  /// sum_s(sum_t m l) / S * D (verl seq-mean-token-sum)
  SeqMeanTokenSum,
  /// sum_s(sum_t m l / n_s) / S * D (verl seq-mean-token-mean)
  SeqMeanTokenMean,
  /// sum(m l) / S / C * D (verl 0.9.1 seq-mean-token-sum-norm; before 0.9.1,
  /// and in the PSFT authors' fork, verl's mode of this name was
  /// TokenSumNorm)
  SeqMeanTokenSumNorm,
  /// sum(m l) * D (verl token-sum)
  TokenSum,
  /// sum(m l) / C * D (verl's seq-mean-token-sum-norm before 0.9.1; TRL
  /// dr_grpo with C = B x max_completion_length)
  TokenSumNorm,
};

/// Counts that define the loss of one optimizer step. Supply them when an
/// optimizer step is split into micro-batches (gradient accumulation) or
/// across data-parallel ranks, so that the sum of the micro-batch losses (and
/// DDP's gradient average) is exactly the full-batch loss and gradient.
/// A count that the reduction needs but that is unset is an error, never a
/// silent fall-back to the micro-batch's own count.
struct Normaliser {
  /// Global token count N of the optimizer step (sum of mask weights over
  /// every micro-batch on every rank). Needed by TokenMean.
  std::optional<double> tokens;
  /// Global count S of non-empty sequences. Needed by SeqMean* modes except
  /// SeqMeanTokenSumNorm.
  std::optional<double> sequences;
  /// Number of data-parallel ranks whose gradients DDP averages; the loss is
  /// multiplied by it so that the average equals the global sum.
  std::int64_t world_size = 1;

  /// Adds the counts of another part of the same optimizer step.
  Normaliser& operator+=(const Normaliser& other) {
    tokens = tokens.value_or(0.0) + other.tokens.value_or(0.0);
    sequences = sequences.value_or(0.0) + other.sequences.value_or(0.0);
    return *this;
  }
};

/// Which implementation computes the loss.
enum class Backend {
  /// Fused kernel for the tensors' device when one is compiled in,
  /// otherwise composed ATen ops.
  Auto,
  /// One fused pass on the CPU (CPU tensors only).
  FusedCpu,
  /// Fused CUDA kernel (needs the CUDA translation unit; CUDA tensors only).
  FusedCuda,
  /// The same math composed from ATen ops; runs on any device.
  Composed,
};

/// Options of policy_loss and psft_loss.
struct LossOptions {
  ClipOptions clip;            ///< eps_low, eps_high, dual clip, log-ratio clamp
  ObjectiveOptions objective;  ///< clipped (default), CISPO, SAPO; token or sequence ratio
  Reduction reduction = Reduction::TokenMean;  ///< how per-token losses are aggregated
  /// Global counts of the optimizer step. Unset: the batch passed in is the
  /// whole optimizer step and its own counts are used.
  std::optional<Normaliser> normaliser;
  /// C of SeqMeanTokenSumNorm and TokenSumNorm. Unset: the padded length T
  /// of the batch.
  std::optional<double> norm_constant;
  /// The sequence reductions count every row in S, empty (fully masked)
  /// rows included, as TRL's `grpo` loss (a .mean() over all rows) and
  /// verl's global_batch_size do. false: only rows with a token count (verl's
  /// local path). With a Normaliser, its `sequences` is used as given; count
  /// it with count_normaliser(mask, opts) so that it counts the same way.
  bool count_empty_sequences = false;
  /// Check logp, old_logp and advantages for NaN/Inf at unmasked tokens, and
  /// mask weights for NaN/Inf and negative values. On the CPU the check is
  /// fused into the loss pass (a few percent); on other devices it costs one
  /// host-device synchronisation per call, so set it to false in a tuned GPU
  /// loop. The check that the normaliser's counts are not smaller than the
  /// batch's own is always made on the CPU (it is free there) and falls
  /// under this switch on other devices.
  bool check_finite = true;
  /// Which implementation runs; Auto picks the fused kernel for the device.
  Backend backend = Backend::Auto;
  /// Entropy bonus (verl's entropy_coeff): the from-logits losses return
  /// loss - entropy_coeff x agg(entropy), agg with this reduction and
  /// normaliser, the gradient flowing through the entropy into the logits.
  /// Needs the logits: the from-logp losses refuse a nonzero value. Finite.
  double entropy_coeff = 0.0;
};

PSFT_NAMESPACE_END
