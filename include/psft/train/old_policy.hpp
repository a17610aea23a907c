#pragma once
/// \file
/// psft::OldPolicy: where a PSFT (or PPO-style) training loop gets its old
/// log-probabilities from, with three strategies behind one interface.
///
///   Recompute  the official PSFT recipe: at the start of every global batch
///              one no-grad pass over each mini-batch stores fp32 old
///              log-probs (and the pre-update entropy); the mini-batch
///              updates then read them. Mini-batch 0 may reuse its own
///              forward pass (its weights have not changed yet).
///   Snapshot   a frozen copy of the module, refreshed every K optimizer
///              steps, evaluated on demand.
///   Ema        a frozen copy that follows the live weights as an
///              exponential moving average, evaluated on demand.
///
/// The loop is the same for every strategy:
///
///   psft::OldPolicy<Net, Batch> old(net, opts, score);  // score(net, batch) -> TokenLogprobs
///   for (auto& global : global_batches) {
///     old.begin_global_batch(global.mini_batches);
///     for (std::int64_t i = 0; i < n; ++i) {
///       psft::TokenLogprobs now = score(net, global.mini_batches[i]);
///       at::Tensor old_logp = old.old_logp(i, global.mini_batches[i], now.logp);
///       psft::psft_loss(now.logp, old_logp, mask, loss_opts).loss.backward();
///       optimizer.step();
///       old.after_optimizer_step();
///     }
///   }
///
/// With an SFT warm-up, pass the schedule: old.begin_global_batch(minis,
/// phases) skips the no-grad passes of the warm-up's mini-batches, which
/// use no old log-probs.
///
/// The state (counters, the cached old log-probs of the global batch in
/// progress, the frozen copy) saves and loads with torch::serialize, so a
/// run resumed from a checkpoint, even in the middle of a global batch,
/// continues exactly as an uninterrupted one. To resume inside a global
/// batch, load() and continue at the next mini-batch: do not call
/// begin_global_batch again for the interrupted global batch. load()
/// restored its cache, the old log-probs of the weights the global batch
/// started from; a new begin_global_batch would recompute them from the
/// weights as they are now, and change the trust region of the rest of it.
///
/// Snapshot and Ema clone the module, so they need a torch::nn::Cloneable
/// (is_cloneable_module). For a module that is not one, the ordinary
/// constructor does not compile; OldPolicy(psft::recompute_only, net, opts,
/// score) builds a Recompute-only old policy, which never clones.
///
/// This header uses the torch::nn front end (Module, Cloneable, the
/// serialize archives), which is why it lives in psft/train/ and is not part
/// of the lean umbrella <psft/psft.hpp>; include <psft/train.hpp>.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/logits.hpp"
#include "psft/train/schedule.hpp"

PSFT_NAMESPACE_BEGIN

/// Where the old log-probabilities come from.
enum class OldPolicyStrategy {
  /// One no-grad pass per mini-batch at the start of each global batch
  /// (the PSFT recipe, verl's compute_log_prob). Old = the weights the
  /// global batch started from.
  Recompute,
  /// A frozen copy of the module, refreshed every snapshot_interval
  /// optimizer steps.
  Snapshot,
  /// A frozen copy updated after every optimizer step as
  /// old = ema_decay * old + (1 - ema_decay) * live (parameters; buffers are
  /// copied).
  Ema,
};

/// Options of OldPolicy.
struct OldPolicyOptions {
  /// Which strategy supplies old log-probabilities.
  OldPolicyStrategy strategy = OldPolicyStrategy::Recompute;
  /// Snapshot: the copy is refreshed after every snapshot_interval-th
  /// optimizer step (counting from the start of the run). 1 makes the old
  /// policy the live one at every step, i.e. PSFT becomes plain SFT. >= 1.
  std::int64_t snapshot_interval = 1;
  /// Ema: weight of the old parameters in each update, in [0, 1]. 0 copies
  /// the live weights (PSFT becomes SFT), 1 freezes the initial weights.
  double ema_decay = 0.99;
  /// Recompute: mini-batch 0 of a global batch takes its old log-probs from
  /// the current forward pass (detached) instead of an extra no-grad pass,
  /// as the weights have not changed since the global batch began (verl
  /// #3996). Exact only when the training forward is deterministic (no
  /// dropout); otherwise set it to false.
  bool reuse_first_forward = true;
  /// Run the no-grad passes (Recompute's passes, the frozen copy) in eval
  /// mode (dropout off), restoring the module's mode afterwards, as verl's
  /// compute_log_prob does. false: use the module's current mode.
  bool eval_mode = true;
  /// Warn (TORCH_WARN, once per OldPolicy) when Recompute sees a global
  /// batch of a single mini-batch: the ratio is then 1 everywhere and PSFT
  /// is plain SFT.
  bool warn_single_mini_batch = true;
};

/// Whether OldPolicy's Snapshot and Ema strategies can copy the module of
/// holder type ModuleHolder (a TORCH_MODULE holder): true when its Impl
/// derives from torch::nn::Cloneable<Impl>, whose clone() deep-copies it.
/// torch::nn::Module::clone() of any other module throws at run time, which
/// is why OldPolicy checks this at compile time instead.
template <typename ModuleHolder>
struct is_cloneable_module
    : std::is_base_of<torch::nn::Cloneable<typename ModuleHolder::ContainedType>,
                      typename ModuleHolder::ContainedType> {};

/// is_cloneable_module<ModuleHolder>::value.
template <typename ModuleHolder>
inline constexpr bool is_cloneable_module_v = is_cloneable_module<ModuleHolder>::value;

/// Tag of OldPolicy's Recompute-only constructor (see psft::recompute_only).
struct RecomputeOnly {
  explicit RecomputeOnly() = default;
};

/// OldPolicy(psft::recompute_only, live, options, scorer): an old policy
/// that only ever recomputes, for a module that is not a
/// torch::nn::Cloneable (it works for any module).
inline constexpr RecomputeOnly recompute_only{};

/// The default mini-batch type: token ids in, next-token labels out (labels
/// equal to ignore_index are not scored). Any copyable type works as
/// OldPolicy's Batch; the scorer is what reads it.
struct TokenBatch {
  /// Model inputs, e.g. [B, T] int64 token ids.
  at::Tensor input_ids;
  /// [B, T] int64 labels scored against the logits (see shift_labels).
  at::Tensor labels;
};

/// Old log-probabilities for a PSFT / PPO loop: one interface over the
/// Recompute, Snapshot and Ema strategies (see OldPolicyStrategy).
///
/// \tparam ModuleHolder a TORCH_MODULE holder (torch::nn::ModuleHolder). The
///         ordinary constructor needs a torch::nn::Cloneable<Impl>, so that
///         Snapshot and Ema can clone it, and does not compile otherwise
///         (is_cloneable_module); any module works with the
///         Recompute-only constructor.
/// \tparam Batch the mini-batch type handed to the scorer. When it has an
///         at::Tensor member `labels` (as TokenBatch), Recompute checks that
///         the mini-batch given to old() has the shape of the cached one.
///
/// Old log-probabilities are returned detached, in float32 (float64 when
/// the scorer returns float64), on the scorer's device; bf16/fp16 models
/// therefore get fp32 old log-probs (see PEERS: bf16 noise in ratios).
/// Not thread-safe; one OldPolicy per live module.
template <typename ModuleHolder, typename Batch = TokenBatch>
class OldPolicy {
 public:
  /// The module's implementation type (Impl of TORCH_MODULE(Name)).
  using Impl = typename ModuleHolder::ContainedType;
  /// Maps (module, mini-batch) to per-token log-probabilities of the
  /// mini-batch's labels ([B, T] or [N]) and, optionally, the token entropy
  /// (leave it undefined if not needed). It must compute them exactly as
  /// the training step does (same code path, e.g. psft::token_logprobs), so
  /// that unchanged weights give a ratio of exactly 1. It is called under
  /// torch::NoGradGuard by OldPolicy.
  using Scorer = std::function<TokenLogprobs(ModuleHolder&, const Batch&)>;

  /// \param live    the module being trained (shared, not copied); a
  ///                torch::nn::Cloneable (is_cloneable_module).
  /// \param options strategy and its settings.
  /// \param scorer  see Scorer.
  /// \throws c10::Error naming the argument for an empty module holder, an
  ///         empty scorer or invalid options.
  template <typename Holder = ModuleHolder,
            std::enable_if_t<is_cloneable_module_v<Holder>, int> = 0>
  OldPolicy(ModuleHolder live, OldPolicyOptions options, Scorer scorer)
      : OldPolicy(Unchecked{}, std::move(live), options, std::move(scorer)) {}

  /// Not a torch::nn::Cloneable, so no Snapshot or Ema (they clone it):
  /// derive Impl from torch::nn::Cloneable<Impl>, or construct a
  /// Recompute-only old policy with OldPolicy(psft::recompute_only, live,
  /// options, scorer).
  template <typename Holder = ModuleHolder,
            std::enable_if_t<!is_cloneable_module_v<Holder>, int> = 0>
  OldPolicy(ModuleHolder live, OldPolicyOptions options, Scorer scorer) = delete;

  /// A Recompute-only old policy, for any module (it never clones).
  /// \param live    the module being trained (shared, not copied).
  /// \param options its settings; options.strategy must be Recompute (the
  ///                default).
  /// \param scorer  see Scorer.
  /// \throws c10::Error as the ordinary constructor, and naming
  ///         options.strategy if it is not Recompute.
  OldPolicy(RecomputeOnly, ModuleHolder live, OldPolicyOptions options, Scorer scorer)
      : OldPolicy(Unchecked{}, std::move(live), recompute_only_options(options),
                  std::move(scorer)) {}

  /// Starts a global batch of mini_batches.size() optimizer steps. Recompute
  /// runs one no-grad pass per mini-batch (mini-batch 0 is deferred when
  /// reuse_first_forward) and caches the old log-probs and entropy;
  /// Snapshot and Ema only record the count. Call it before the first
  /// optimizer step of the global batch.
  /// \throws c10::Error if mini_batches is empty or a scorer result is
  ///         invalid.
  void begin_global_batch(const std::vector<Batch>& mini_batches);

  /// begin_global_batch for a run with an SFT warm-up: mini-batch i is
  /// optimizer step steps() + i, and the ones that `phases` puts in the
  /// warm-up (TrainingObjective::Sft) use no old log-probs, so Recompute
  /// runs no no-grad pass for them, and old() refuses them. A global batch
  /// that straddles the end of the warm-up computes the old log-probs of
  /// its PSFT mini-batches as usual, from the weights the global batch
  /// starts from. Needs after_optimizer_step() after every optimizer step,
  /// warm-up ones included, so that steps() is the loop's step.
  /// \throws c10::Error as begin_global_batch, or for a negative
  ///         phases.sft_steps.
  void begin_global_batch(const std::vector<Batch>& mini_batches, const SftWarmupSchedule& phases);

  /// Old log-probs (detached, fp32) and old entropy (undefined if the scorer
  /// gives none) of mini-batch `index` of the current global batch.
  ///
  /// \param index   0 <= index < the global batch's mini-batch count.
  /// \param batch   that mini-batch (read by Snapshot and Ema, and by
  ///                Recompute's mini-batch 0 when current is undefined).
  /// \param current the training forward of this mini-batch (logp with its
  ///                graph, entropy optional): Recompute reuses it for
  ///                mini-batch 0 (reuse_first_forward), the others ignore
  ///                it apart from a shape check. May be empty.
  /// \throws c10::Error naming the argument for an index out of range, a
  ///         call before begin_global_batch, a current whose shape differs
  ///         from the cached one, a Recompute batch whose labels' shape
  ///         differs from the cached old log-probs' (not the mini-batch
  ///         given to begin_global_batch at that index), a mini-batch of the
  ///         SFT warm-up, or Recompute's mini-batch 0 requested after the
  ///         global batch's first optimizer step without a cache.
  TokenLogprobs old(std::int64_t index, const Batch& batch, const TokenLogprobs& current = {});

  /// old(index, batch, {current_logp}).logp.
  at::Tensor old_logp(std::int64_t index, const Batch& batch,
                      const at::Tensor& current_logp = at::Tensor());

  /// The old_logp to give a fused loss (psft_loss_from_logits,
  /// psft_loss_from_hidden, ...), which computes this mini-batch's
  /// log-probabilities itself: an undefined tensor where the old policy is
  /// that very forward (Recompute's mini-batch 0 with reuse_first_forward,
  /// before the global batch's first optimizer step and not cached yet),
  /// which the fused losses read as "old = current" (r = 1); old_logp(index,
  /// batch) everywhere else. After an undefined one, give the loss's result
  /// to keep_current so that the later epochs over the global batch find it.
  /// \throws c10::Error as old().
  at::Tensor fused_old_logp(std::int64_t index, const Batch& batch);

  /// Caches a fused loss's per-token results (its logp and entropy, detached
  /// and kept in float32) as mini-batch index's old log-probs where
  /// fused_old_logp gave an undefined tensor, as old(index, batch, current)
  /// does for an unfused forward; elsewhere only checks the shape.
  /// \throws c10::Error as old().
  void keep_current(std::int64_t index, const Batch& batch, const TokenLogprobs& current) {
    (void)old(index, batch, current);
  }

  /// Call after every optimizer step: counts it, refreshes the Snapshot copy
  /// every snapshot_interval steps, applies the Ema update.
  void after_optimizer_step();

  /// Optimizer steps taken since construction (or as loaded).
  std::int64_t steps() const { return steps_; }
  /// Global batches begun since construction (or as loaded).
  std::int64_t global_batches() const { return global_batches_; }
  /// Mini-batch count of the current global batch (0 before the first).
  std::int64_t mini_batch_count() const { return mini_batch_count_; }
  /// Optimizer steps taken in the current global batch.
  std::int64_t steps_in_global_batch() const { return steps_in_global_batch_; }
  /// Whether mini-batch `index` of the current global batch uses old
  /// log-probs: false for the SFT warm-up's mini-batches (see
  /// begin_global_batch with a schedule), true otherwise.
  /// \throws c10::Error if index is out of range.
  bool needs_old(std::int64_t index) const;
  /// The options given at construction.
  const OldPolicyOptions& options() const { return options_; }
  /// The live module.
  const ModuleHolder& live() const { return live_; }
  /// The frozen copy (Snapshot and Ema).
  /// \throws c10::Error for Recompute, which keeps no copy.
  const ModuleHolder& frozen() const {
    static_assert(is_cloneable_module_v<ModuleHolder>,
                  "psft::OldPolicy::frozen: a module that is not a torch::nn::Cloneable has no "
                  "frozen copy (only Recompute is possible)");
    TORCH_CHECK(frozen_.has_value(),
                "psft::OldPolicy::frozen: the Recompute strategy keeps no frozen copy");
    return *frozen_;
  }

  /// Writes the state: counters, the cached old log-probs and entropy of the
  /// global batch in progress (Recompute), the frozen copy (Snapshot, Ema).
  /// Options and the scorer are not saved: construct the OldPolicy the same
  /// way before loading.
  void save(torch::serialize::OutputArchive& archive) const;

  /// Reads a state written by save() into this object.
  /// \throws c10::Error if the archive was saved with another strategy.
  void load(torch::serialize::InputArchive& archive);

 private:
  struct Unchecked {};
  OldPolicy(Unchecked, ModuleHolder live, OldPolicyOptions options, Scorer scorer);
  static OldPolicyOptions recompute_only_options(const OldPolicyOptions& options);
  void start(const std::vector<Batch>& mini_batches, std::vector<bool> needs_old);
  at::Tensor as_old(const at::Tensor& t) const;
  TokenLogprobs score_no_grad(ModuleHolder& module, const Batch& batch) const;
  void copy_live_into_frozen();
  void ema_update();

  ModuleHolder live_;
  OldPolicyOptions options_;
  Scorer scorer_;
  std::optional<ModuleHolder> frozen_;
  std::int64_t steps_ = 0;
  std::int64_t global_batches_ = 0;
  std::int64_t mini_batch_count_ = 0;
  std::int64_t steps_in_global_batch_ = 0;
  std::vector<at::Tensor> cached_logp_;
  std::vector<at::Tensor> cached_entropy_;
  // Per mini-batch of the current global batch: false in the SFT warm-up.
  std::vector<bool> needs_old_;
  bool warned_single_ = false;
};

/// torch::save(old_policy, path) support: OldPolicy::save.
template <typename ModuleHolder, typename Batch>
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const OldPolicy<ModuleHolder, Batch>& old_policy) {
  old_policy.save(archive);
  return archive;
}

/// torch::load(old_policy, path) support: OldPolicy::load.
template <typename ModuleHolder, typename Batch>
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           OldPolicy<ModuleHolder, Batch>& old_policy) {
  old_policy.load(archive);
  return archive;
}

// ---------------------------------------------------------------------------
// Implementation.

namespace detail {

/// Restores a module's training flag when it leaves scope.
class TrainingModeGuard {
 public:
  TrainingModeGuard(torch::nn::Module& module, bool eval) : module_(module) {
    was_training_ = module_.is_training();
    if (eval && was_training_) module_.eval();
  }
  ~TrainingModeGuard() {
    if (was_training_ != module_.is_training()) module_.train(was_training_);
  }
  TrainingModeGuard(const TrainingModeGuard&) = delete;
  TrainingModeGuard& operator=(const TrainingModeGuard&) = delete;

 private:
  torch::nn::Module& module_;
  bool was_training_ = true;
};

/// Whether Batch has an at::Tensor member `labels` (TokenBatch does): then
/// OldPolicy can check a mini-batch against the cached old log-probs.
template <typename Batch, typename = void>
struct has_labels_tensor : std::false_type {};
template <typename Batch>
struct has_labels_tensor<Batch, std::void_t<decltype(std::declval<const Batch&>().labels)>>
    : std::is_same<std::decay_t<decltype(std::declval<const Batch&>().labels)>, at::Tensor> {};

inline const char* strategy_name(OldPolicyStrategy s) {
  switch (s) {
    case OldPolicyStrategy::Recompute:
      return "Recompute";
    case OldPolicyStrategy::Snapshot:
      return "Snapshot";
    case OldPolicyStrategy::Ema:
      return "Ema";
  }
  return "?";
}

}  // namespace detail

template <typename ModuleHolder, typename Batch>
OldPolicyOptions OldPolicy<ModuleHolder, Batch>::recompute_only_options(
    const OldPolicyOptions& options) {
  TORCH_CHECK(
      options.strategy == OldPolicyStrategy::Recompute,
      "psft::OldPolicy(psft::recompute_only, ...): options.strategy must be Recompute, got ",
      detail::strategy_name(options.strategy));
  return options;
}

template <typename ModuleHolder, typename Batch>
OldPolicy<ModuleHolder, Batch>::OldPolicy(Unchecked, ModuleHolder live, OldPolicyOptions options,
                                          Scorer scorer)
    : live_(std::move(live)), options_(options), scorer_(std::move(scorer)) {
  TORCH_CHECK(!live_.is_empty(), "psft::OldPolicy: live is an empty module holder");
  TORCH_CHECK(static_cast<bool>(scorer_), "psft::OldPolicy: scorer is an empty function");
  TORCH_CHECK(
      options_.strategy == OldPolicyStrategy::Recompute ||
          options_.strategy == OldPolicyStrategy::Snapshot ||
          options_.strategy == OldPolicyStrategy::Ema,
      "psft::OldPolicy: options.strategy must be Recompute, Snapshot or Ema, got the value ",
      static_cast<int>(options_.strategy));
  TORCH_CHECK(options_.snapshot_interval >= 1,
              "psft::OldPolicy: options.snapshot_interval must be >= 1, got ",
              options_.snapshot_interval);
  TORCH_CHECK(options_.ema_decay >= 0.0 && options_.ema_decay <= 1.0,
              "psft::OldPolicy: options.ema_decay must be in [0, 1], got ", options_.ema_decay);
  // Only the Recompute-only constructor gets here with a module that is not
  // Cloneable, and it has checked the strategy: no clone() is compiled for
  // it (torch::nn::Module::clone() would throw at run time).
  if constexpr (is_cloneable_module_v<ModuleHolder>) {
    if (options_.strategy != OldPolicyStrategy::Recompute) {
      // Note [Frozen copy]: clone() deep-copies parameters and buffers; the
      // copy never needs gradients, so autograd does not track it.
      std::shared_ptr<Impl> copy = std::dynamic_pointer_cast<Impl>(live_->clone());
      TORCH_CHECK(copy != nullptr,
                  "psft::OldPolicy: live->clone() did not return the module's type");
      for (auto& p : copy->parameters()) p.set_requires_grad(false);
      if (options_.eval_mode) copy->eval();
      frozen_.emplace(std::move(copy));
    }
  }
}

template <typename ModuleHolder, typename Batch>
at::Tensor OldPolicy<ModuleHolder, Batch>::as_old(const at::Tensor& t) const {
  if (!t.defined()) return t;
  // fp32 (fp64 stays fp64): bf16/fp16 old log-probs would put rounding noise
  // into every ratio.
  const at::ScalarType dtype = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.detach().to(dtype);
}

template <typename ModuleHolder, typename Batch>
TokenLogprobs OldPolicy<ModuleHolder, Batch>::score_no_grad(ModuleHolder& module,
                                                            const Batch& batch) const {
  torch::NoGradGuard no_grad;
  detail::TrainingModeGuard mode(*module, options_.eval_mode);
  TokenLogprobs out = scorer_(module, batch);
  TORCH_CHECK(out.logp.defined(), "psft::OldPolicy: the scorer returned an undefined logp");
  TORCH_CHECK(detail::is_float_dtype(out.logp.scalar_type()),
              "psft::OldPolicy: the scorer's logp must be a float tensor, got ",
              out.logp.scalar_type());
  out.logp = as_old(out.logp);
  out.entropy = as_old(out.entropy);
  return out;
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::begin_global_batch(const std::vector<Batch>& mini_batches) {
  start(mini_batches, std::vector<bool>(mini_batches.size(), true));
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::begin_global_batch(const std::vector<Batch>& mini_batches,
                                                        const SftWarmupSchedule& phases) {
  TORCH_CHECK(phases.sft_steps >= 0,
              "psft::OldPolicy::begin_global_batch: phases.sft_steps must be >= 0, got ",
              phases.sft_steps);
  std::vector<bool> needs_old(mini_batches.size());
  for (std::size_t i = 0; i < needs_old.size(); ++i) {
    needs_old[i] = !phases.in_warmup(steps_ + static_cast<std::int64_t>(i));
  }
  start(mini_batches, std::move(needs_old));
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::start(const std::vector<Batch>& mini_batches,
                                           std::vector<bool> needs_old) {
  const auto count = static_cast<std::int64_t>(mini_batches.size());
  TORCH_CHECK(count > 0, "psft::OldPolicy::begin_global_batch: mini_batches is empty");
  if (options_.strategy == OldPolicyStrategy::Recompute && count == 1 && needs_old[0] &&
      options_.warn_single_mini_batch && !warned_single_) {
    warned_single_ = true;
    TORCH_WARN(
        "psft::OldPolicy: this global batch has a single mini-batch, so the old policy equals "
        "the current one at its only optimizer step: the ratio is 1 everywhere and PSFT is plain "
        "SFT. Split each global batch into several mini-batches (the recipe uses 8).");
  }
  mini_batch_count_ = count;
  steps_in_global_batch_ = 0;
  ++global_batches_;
  cached_logp_.assign(static_cast<std::size_t>(count), at::Tensor());
  cached_entropy_.assign(static_cast<std::size_t>(count), at::Tensor());
  needs_old_ = std::move(needs_old);
  if (options_.strategy != OldPolicyStrategy::Recompute) return;
  for (std::int64_t i = options_.reuse_first_forward ? 1 : 0; i < count; ++i) {
    const auto k = static_cast<std::size_t>(i);
    if (!needs_old_[k]) continue;  // an SFT warm-up step: no old log-probs
    TokenLogprobs o = score_no_grad(live_, mini_batches[k]);
    cached_logp_[k] = o.logp;
    cached_entropy_[k] = o.entropy;
  }
}

template <typename ModuleHolder, typename Batch>
bool OldPolicy<ModuleHolder, Batch>::needs_old(std::int64_t index) const {
  TORCH_CHECK(index >= 0 && index < mini_batch_count_,
              "psft::OldPolicy::needs_old: index must be in [0, ", mini_batch_count_, "), got ",
              index);
  return needs_old_[static_cast<std::size_t>(index)];
}

template <typename ModuleHolder, typename Batch>
TokenLogprobs OldPolicy<ModuleHolder, Batch>::old(std::int64_t index, const Batch& batch,
                                                  const TokenLogprobs& current) {
  TORCH_CHECK(mini_batch_count_ > 0,
              "psft::OldPolicy::old: call begin_global_batch before asking for old log-probs");
  TORCH_CHECK(index >= 0 && index < mini_batch_count_,
              "psft::OldPolicy::old: index must be in [0, ", mini_batch_count_, "), got ", index);
  const auto i = static_cast<std::size_t>(index);
  TORCH_CHECK(needs_old_[i], "psft::OldPolicy::old: mini-batch ", index, " (optimizer step ",
              steps_ - steps_in_global_batch_ + index,
              ") is in the SFT warm-up, so begin_global_batch computed no old log-probs for it");
  TokenLogprobs out;
  if (options_.strategy == OldPolicyStrategy::Recompute) {
    if (!cached_logp_[i].defined()) {
      // Only mini-batch 0 with reuse_first_forward gets here.
      TORCH_CHECK(steps_in_global_batch_ == 0,
                  "psft::OldPolicy::old: the old log-probs of mini-batch ", index,
                  " were not computed and the weights changed since begin_global_batch (",
                  steps_in_global_batch_,
                  " optimizer steps): ask for mini-batch 0 before the global batch's first "
                  "optimizer step, or set reuse_first_forward = false");
      if (current.logp.defined()) {
        cached_logp_[i] = as_old(current.logp);
        cached_entropy_[i] = as_old(current.entropy);
      } else {
        TokenLogprobs o = score_no_grad(live_, batch);
        cached_logp_[i] = o.logp;
        cached_entropy_[i] = o.entropy;
      }
    }
    out.logp = cached_logp_[i];
    out.entropy = cached_entropy_[i];
    if constexpr (detail::has_labels_tensor<Batch>::value) {
      // The cache is by index: a mini-batch other than the one cached (a
      // loop that shuffled, or re-ran begin_global_batch on other data)
      // would silently get another batch's old log-probs. Its shape is the
      // check that costs nothing.
      const at::Tensor& labels = batch.labels;
      TORCH_CHECK(!labels.defined() || labels.sizes() == out.logp.sizes(),
                  "psft::OldPolicy::old: batch (mini-batch ", index, ") has labels of shape ",
                  labels.sizes(), " but the old log-probs cached for mini-batch ", index,
                  " have shape ", out.logp.sizes(),
                  ": pass the mini-batch given to begin_global_batch at that index");
    }
  } else {
    out = score_no_grad(*frozen_, batch);
  }
  TORCH_CHECK(!current.logp.defined() || current.logp.sizes() == out.logp.sizes(),
              "psft::OldPolicy::old: current.logp has shape ",
              current.logp.defined() ? current.logp.sizes() : at::IntArrayRef{},
              " but the old log-probs of mini-batch ", index, " have shape ", out.logp.sizes());
  return out;
}

template <typename ModuleHolder, typename Batch>
at::Tensor OldPolicy<ModuleHolder, Batch>::old_logp(std::int64_t index, const Batch& batch,
                                                    const at::Tensor& current_logp) {
  TokenLogprobs current;
  current.logp = current_logp;
  return old(index, batch, current).logp;
}

template <typename ModuleHolder, typename Batch>
at::Tensor OldPolicy<ModuleHolder, Batch>::fused_old_logp(std::int64_t index, const Batch& batch) {
  const bool in_range = index >= 0 && index < mini_batch_count_;
  const auto i = static_cast<std::size_t>(index);
  if (options_.strategy == OldPolicyStrategy::Recompute && in_range && needs_old_[i] &&
      !cached_logp_[i].defined() && steps_in_global_batch_ == 0) {
    return at::Tensor();  // the loss's own forward is the old policy
  }
  return old(index, batch).logp;  // every check, and the cached or scored value
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::copy_live_into_frozen() {
  torch::NoGradGuard no_grad;
  auto source = live_->parameters();
  auto target = (*frozen_)->parameters();
  for (std::size_t k = 0; k < target.size(); ++k) target[k].copy_(source[k]);
  auto source_buffers = live_->buffers();
  auto target_buffers = (*frozen_)->buffers();
  for (std::size_t k = 0; k < target_buffers.size(); ++k)
    target_buffers[k].copy_(source_buffers[k]);
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::ema_update() {
  torch::NoGradGuard no_grad;
  auto source = live_->parameters();
  auto target = (*frozen_)->parameters();
  const double decay = options_.ema_decay;
  // Note [EMA formula]: old = decay * old + (1 - decay) * live, evaluated as
  // old.mul_(decay).add_(live, 1 - decay); the tests recompute it by hand.
  for (std::size_t k = 0; k < target.size(); ++k)
    target[k].mul_(decay).add_(source[k], 1.0 - decay);
  auto source_buffers = live_->buffers();
  auto target_buffers = (*frozen_)->buffers();
  for (std::size_t k = 0; k < target_buffers.size(); ++k)
    target_buffers[k].copy_(source_buffers[k]);
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::after_optimizer_step() {
  ++steps_;
  ++steps_in_global_batch_;
  switch (options_.strategy) {
    case OldPolicyStrategy::Recompute:
      break;
    case OldPolicyStrategy::Snapshot:
      if (steps_ % options_.snapshot_interval == 0) copy_live_into_frozen();
      break;
    case OldPolicyStrategy::Ema:
      ema_update();
      break;
  }
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::save(torch::serialize::OutputArchive& archive) const {
  archive.write("strategy", c10::IValue(static_cast<std::int64_t>(options_.strategy)));
  archive.write("steps", c10::IValue(steps_));
  archive.write("global_batches", c10::IValue(global_batches_));
  archive.write("mini_batch_count", c10::IValue(mini_batch_count_));
  archive.write("steps_in_global_batch", c10::IValue(steps_in_global_batch_));
  for (std::size_t i = 0; i < cached_logp_.size(); ++i) {
    const std::string key = "cache." + std::to_string(i) + ".";
    archive.write(key + "needed", c10::IValue(static_cast<bool>(needs_old_[i])));
    archive.write(key + "has_logp", c10::IValue(cached_logp_[i].defined()));
    if (cached_logp_[i].defined()) archive.write(key + "logp", cached_logp_[i], /*is_buffer=*/true);
    archive.write(key + "has_entropy", c10::IValue(cached_entropy_[i].defined()));
    if (cached_entropy_[i].defined())
      archive.write(key + "entropy", cached_entropy_[i], /*is_buffer=*/true);
  }
  if (frozen_) {
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    (*frozen_)->save(nested);
    archive.write("frozen", nested);
  }
}

template <typename ModuleHolder, typename Batch>
void OldPolicy<ModuleHolder, Batch>::load(torch::serialize::InputArchive& archive) {
  const auto read_int = [&](const char* key) {
    c10::IValue v;
    archive.read(key, v);
    return v.toInt();
  };
  const auto saved = read_int("strategy");
  TORCH_CHECK(saved == static_cast<std::int64_t>(options_.strategy),
              "psft::OldPolicy::load: the archive holds a ",
              detail::strategy_name(static_cast<OldPolicyStrategy>(saved)),
              " old policy but this one uses ", detail::strategy_name(options_.strategy));
  steps_ = read_int("steps");
  global_batches_ = read_int("global_batches");
  mini_batch_count_ = read_int("mini_batch_count");
  steps_in_global_batch_ = read_int("steps_in_global_batch");
  cached_logp_.assign(static_cast<std::size_t>(mini_batch_count_), at::Tensor());
  cached_entropy_.assign(static_cast<std::size_t>(mini_batch_count_), at::Tensor());
  needs_old_.assign(static_cast<std::size_t>(mini_batch_count_), true);
  for (std::size_t i = 0; i < cached_logp_.size(); ++i) {
    const std::string key = "cache." + std::to_string(i) + ".";
    c10::IValue flag;
    // Archives written before the SFT warm-up skip have no "needed": true.
    if (archive.try_read(key + "needed", flag)) needs_old_[i] = flag.toBool();
    archive.read(key + "has_logp", flag);
    if (flag.toBool()) archive.read(key + "logp", cached_logp_[i], /*is_buffer=*/true);
    archive.read(key + "has_entropy", flag);
    if (flag.toBool()) archive.read(key + "entropy", cached_entropy_[i], /*is_buffer=*/true);
  }
  if (frozen_) {
    torch::serialize::InputArchive nested;
    archive.read("frozen", nested);
    (*frozen_)->load(nested);
    for (auto& p : (*frozen_)->parameters()) p.set_requires_grad(false);
  }
}

PSFT_NAMESPACE_END
