#pragma once
/// \file
/// Step schedules of a PSFT run: an optional warm-up of plain SFT steps
/// before PSFT takes over, and the linear learning-rate warm-up of the
/// recipe, applicable to any torch::optim optimizer.
///
/// Steps are counted in optimizer steps, from 0 for the first one.
///
///   psft::SftWarmupSchedule phases{/*sft_steps=*/20};
///   psft::LinearLrWarmup lr{recipe.psft_lr, recipe.lr_warmup_steps};
///   for (std::int64_t step = 0; step < total; ++step) {
///     psft::set_learning_rate(optimizer, lr.lr_at(step / mini_batches));  // per global batch
///     auto loss = phases.objective_at(step) == psft::TrainingObjective::Sft ? sft(...) :
///     psft(...);
///     ...
///   }

#include <c10/util/Exception.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <cstdint>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN

/// The objective of a training step.
enum class TrainingObjective {
  /// Plain SFT (an SftVariant, usually Nll): no trust region.
  Sft,
  /// PSFT: the clipped objective against the old policy.
  Psft,
};

/// N steps of plain SFT, then PSFT. The SFT warm-up moves the model (and so
/// the old policy) towards the demonstrations before the trust region
/// starts to bind; the PSFT authors call it optional. sft_steps = 0 is
/// PSFT from the first step.
struct SftWarmupSchedule {
  /// Optimizer steps of plain SFT at the start of the run, >= 0.
  std::int64_t sft_steps = 0;

  /// The objective of optimizer step `step` (0-based).
  /// \throws c10::Error if step or sft_steps is negative.
  TrainingObjective objective_at(std::int64_t step) const {
    TORCH_CHECK(sft_steps >= 0, "psft::SftWarmupSchedule: sft_steps must be >= 0, got ", sft_steps);
    TORCH_CHECK(step >= 0, "psft::SftWarmupSchedule::objective_at: step must be >= 0, got ", step);
    return step < sft_steps ? TrainingObjective::Sft : TrainingObjective::Psft;
  }
  /// True while step is in the SFT warm-up.
  bool in_warmup(std::int64_t step) const { return objective_at(step) == TrainingObjective::Sft; }
};

/// Linear learning-rate warm-up over warmup_steps steps, then constant:
/// lr(step) = base_lr * min(1, (step + 1) / warmup_steps), so the first step
/// already moves (base_lr / W) and step W - 1 reaches base_lr. With
/// start_at_zero the ramp is base_lr * min(1, step / W) instead, as Hugging
/// Face's and verl's get_constant_schedule_with_warmup compute it: the first
/// step then has lr 0.
///
/// What a step is, is the caller's choice: pass the optimizer step, or, to
/// follow the PSFT recipe as verl runs it (its scheduler steps once per
/// training step), the index of the global batch, so that all mini-batch
/// updates of a global batch share one rate.
struct LinearLrWarmup {
  /// The learning rate after the warm-up, >= 0.
  double base_lr = 0.0;
  /// W, >= 0; 0 means no warm-up.
  std::int64_t warmup_steps = 10;
  /// Use the Hugging Face / verl ramp (lr 0 at step 0).
  bool start_at_zero = false;

  /// The learning rate of optimizer step `step` (0-based).
  /// \throws c10::Error if step, warmup_steps or base_lr is negative.
  double lr_at(std::int64_t step) const {
    TORCH_CHECK(base_lr >= 0, "psft::LinearLrWarmup: base_lr must be >= 0, got ", base_lr);
    TORCH_CHECK(warmup_steps >= 0, "psft::LinearLrWarmup: warmup_steps must be >= 0, got ",
                warmup_steps);
    TORCH_CHECK(step >= 0, "psft::LinearLrWarmup::lr_at: step must be >= 0, got ", step);
    if (warmup_steps == 0 || step >= warmup_steps) return base_lr;
    const double done = static_cast<double>(start_at_zero ? step : step + 1);
    return base_lr * std::min(1.0, done / static_cast<double>(warmup_steps));
  }
};

/// Sets the learning rate of every parameter group of a torch::optim
/// optimizer (SGD, Adam, AdamW, ...). Call it before optimizer.step().
/// \throws c10::Error if lr is negative or not finite.
inline void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  TORCH_CHECK(lr >= 0 && lr < 1e300, "psft::set_learning_rate: lr must be finite and >= 0, got ",
              lr);
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

PSFT_NAMESPACE_END
