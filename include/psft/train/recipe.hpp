#pragma once
/// \file
/// The PSFT recipe's defaults in one place: the settings of the PSFT paper
/// (Proximal Supervised Fine-Tuning, arXiv 2508.17784) and of the authors'
/// verl-based training script (github.com/zwhong714/PSFT,
/// verl/recipe/psft/run_psft.sh), with the SFT baseline they compare
/// against. docs/recipe.md explains each value and when to change it.
///
///   psft::PsftRecipe recipe;
///   psft::LossOptions loss = recipe.loss_options();
///   torch::optim::AdamW opt(model->parameters(),
///   recipe.adamw_options(psft::TrainingObjective::Psft));

#include <c10/util/Exception.h>
#include <torch/optim/adamw.h>

#include <cstdint>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/train/schedule.hpp"

PSFT_NAMESPACE_BEGIN

/// The PSFT recipe's hyper-parameters (arXiv 2508.17784 and its verl
/// recipe). Every field is a plain value: copy the struct and change what
/// your setting needs.
struct PsftRecipe {
  /// Lower clip of the ratio (run_psft.sh: clip_ratio_low=0.2). With
  /// advantage 1 it never binds; kept for the RL stage that follows PSFT.
  /// (The script's dual clip clip_ratio_c=10 never binds with A = 1 either.)
  double eps_low = 0.2;
  /// Upper clip (run_psft.sh: clip_ratio_high=0.28, DAPO's clip-higher): a
  /// demonstration token's probability may rise by at most a factor
  /// 1 + eps_high per global batch before its gradient stops.
  double eps_high = 0.28;
  /// Learning rate of PSFT (run_psft.sh: actor.optim.lr=1e-6). The trust
  /// region, not a small step, is what is meant to keep the model close to
  /// its start, but the recipe pairs it with this small rate.
  double psft_lr = 1e-6;
  /// Learning rate of the paper's SFT baseline (2e-5). Compare PSFT
  /// with SFT at the same rate too: the two rates confound the comparison.
  double sft_lr = 2e-5;
  /// AdamW weight decay (run_psft.sh: actor.optim.weight_decay=0.1).
  double weight_decay = 0.1;
  /// Gradient-norm clipping, torch::nn::utils::clip_grad_norm_ (run_psft.sh:
  /// actor.grad_clip=1.0).
  double grad_clip = 1.0;
  /// Linear learning-rate warm-up steps, see LinearLrWarmup (run_psft.sh:
  /// actor.optim.lr_warmup_steps=10). verl counts them in training steps,
  /// i.e. global batches: its scheduler steps once per global batch.
  std::int64_t lr_warmup_steps = 10;
  /// Demonstrations per global batch: old log-probs are computed once per
  /// global batch (verl data.train_batch_size). 64 is the paper's LIMO
  /// example (817 demonstrations, 18 epochs, 216 global batches = 12 per
  /// epoch); run_psft.sh trains on 256 per global batch in mini-batches of
  /// 32, the same 8 optimizer steps per global batch.
  std::int64_t global_batch_size = 64;
  /// Optimizer steps (mini-batches) per global batch: train_batch_size /
  /// ppo_mini_batch_size (run_psft.sh: 256 / 32 = 8). One mini-batch makes
  /// PSFT plain SFT.
  std::int64_t mini_batches_per_global_batch = 8;
  /// Aggregation of per-token losses (run_psft.sh: loss_agg_mode=token-mean).
  Reduction reduction = Reduction::TokenMean;
  /// AdamW first-moment decay (verl's default; the script keeps it).
  double adam_beta1 = 0.9;
  /// AdamW second-moment decay (verl's default; the script keeps it).
  double adam_beta2 = 0.999;

  /// Demonstrations per mini-batch (global_batch_size /
  /// mini_batches_per_global_batch).
  /// \throws c10::Error if the division is not exact or a count is < 1.
  std::int64_t mini_batch_size() const {
    TORCH_CHECK(global_batch_size >= 1 && mini_batches_per_global_batch >= 1,
                "psft::PsftRecipe: global_batch_size (", global_batch_size,
                ") and mini_batches_per_global_batch (", mini_batches_per_global_batch,
                ") must be >= 1");
    TORCH_CHECK(global_batch_size % mini_batches_per_global_batch == 0,
                "psft::PsftRecipe: global_batch_size (", global_batch_size,
                ") must be a multiple of mini_batches_per_global_batch (",
                mini_batches_per_global_batch, ")");
    return global_batch_size / mini_batches_per_global_batch;
  }

  /// The clip settings (eps_low, eps_high; no dual clip).
  ClipOptions clip_options() const {
    ClipOptions c;
    c.eps_low = eps_low;
    c.eps_high = eps_high;
    return c;
  }

  /// LossOptions with the recipe's clip and reduction (no normaliser).
  LossOptions loss_options() const {
    LossOptions o;
    o.clip = clip_options();
    o.reduction = reduction;
    return o;
  }

  /// The recipe's learning rate for an objective (psft_lr or sft_lr).
  double learning_rate(TrainingObjective objective) const {
    return objective == TrainingObjective::Psft ? psft_lr : sft_lr;
  }

  /// The linear warm-up of learning_rate(objective) over lr_warmup_steps.
  LinearLrWarmup lr_warmup(TrainingObjective objective) const {
    LinearLrWarmup w;
    w.base_lr = learning_rate(objective);
    w.warmup_steps = lr_warmup_steps;
    return w;
  }

  /// AdamW options with the recipe's rate for `objective`, weight decay and
  /// betas.
  torch::optim::AdamWOptions adamw_options(TrainingObjective objective) const {
    return torch::optim::AdamWOptions(learning_rate(objective))
        .weight_decay(weight_decay)
        .betas(std::make_tuple(adam_beta1, adam_beta2));
  }
};

PSFT_NAMESPACE_END
