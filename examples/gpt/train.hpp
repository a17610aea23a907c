#pragma once
/// \file
/// Training and evaluation for the GPT demo: base pretraining on the skill
/// mixture, fine-tuning on one skill (SFT, DFT, PSFT, PSFT after SFT
/// warm-up), evaluation (accuracy, entropy, KL from the base) and a
/// GRPO-style RL stage. Everything the losses see goes through psft's public
/// API: the LM head fused into the loss (token_logprobs_from_hidden,
/// sft_loss_from_hidden, psft_loss_from_hidden, policy_loss_from_hidden; with
/// `unfused` their *_from_logits counterparts on the head's logits), psft_loss
/// (for the trust-region metrics of the SFT runs), and TrustRegionMonitor
/// (whether the trust region binds at all).

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <psft/hidden.hpp>
#include <psft/train.hpp>

#include "data.hpp"
#include "model.hpp"

namespace gpt {

// ---------------------------------------------------------------- generation

/// Completions of a batch of prompts, and the tensors to score them.
struct Generation {
  std::vector<std::string> completions;  ///< generated response text
  torch::Tensor ids;                     ///< [N, kContext] prompt + completion + padding
  torch::Tensor labels;                  ///< [N, kContext] shifted, completion tokens only
};

/// Generates a response for each example's prompt: greedy when temperature
/// is 0, sampled from softmax(logits / temperature) otherwise. A response
/// ends at a terminator or at the end of the context.
inline Generation generate(Gpt& model, const std::vector<Example>& examples, double temperature) {
  torch::NoGradGuard no_grad;
  const auto n = static_cast<std::int64_t>(examples.size());
  torch::Tensor ids = torch::zeros({n, kContext}, torch::kLong);
  torch::Tensor mask = torch::zeros({n, kContext}, torch::kBool);
  std::vector<std::int64_t> length(static_cast<std::size_t>(n));
  std::vector<bool> done(static_cast<std::size_t>(n), false);
  auto id = ids.accessor<std::int64_t, 2>();
  auto m = mask.accessor<bool, 2>();
  std::int64_t longest = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::string& p = examples[static_cast<std::size_t>(i)].prompt;
    for (std::size_t t = 0; t < p.size(); ++t) id[i][static_cast<std::int64_t>(t)] = token_of(p[t]);
    length[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(p.size());
    longest = std::max(longest, static_cast<std::int64_t>(p.size()));
  }
  Generation g;
  g.completions.assign(static_cast<std::size_t>(n), std::string());
  while (true) {
    std::int64_t active = 0;
    for (std::int64_t i = 0; i < n; ++i) active += !done[i] && length[i] < kContext;
    if (active == 0) break;
    const torch::Tensor logits = model->forward(ids.slice(1, 0, longest));  // [N, longest, V]
    const torch::Tensor last = torch::tensor(length, torch::kLong).sub(1).clamp_max(longest - 1);
    torch::Tensor row =
        logits.gather(1, last.view({n, 1, 1}).expand({n, 1, logits.size(2)})).squeeze(1);
    const torch::Tensor next =
        temperature <= 0 ? row.argmax(-1)
                         : torch::multinomial(torch::softmax(row / temperature, -1), 1).squeeze(1);
    auto nx = next.accessor<std::int64_t, 1>();
    for (std::int64_t i = 0; i < n; ++i) {
      auto& len = length[static_cast<std::size_t>(i)];
      if (done[i] || len >= kContext) continue;
      id[i][len] = nx[i];
      m[i][len] = true;
      const char c = char_of(nx[i]);
      g.completions[static_cast<std::size_t>(i)] += c;
      ++len;
      if (is_terminator(c)) done[i] = true;
    }
    longest = std::min(kContext, longest + 1);
  }
  g.ids = ids;
  g.labels = psft::shift_labels(ids, mask);
  return g;
}

/// Fraction of examples whose greedy response is exactly right.
inline double accuracy(Gpt& model, const Dataset& data) {
  if (data.examples.empty()) return 0.0;
  const Generation g = generate(model, data.examples, 0.0);
  std::int64_t right = 0;
  for (std::size_t i = 0; i < data.examples.size(); ++i) {
    right += exact_match(data.examples[i], g.completions[i]);
  }
  return static_cast<double>(right) / static_cast<double>(data.examples.size());
}

/// Mean exact-match reward of `samples` sampled responses per example at
/// `temperature`, with the sampler seeded by `seed` (the RL stage's objective
/// on held-out prompts; the global torch generator is reseeded).
inline double sampled_reward(Gpt& model, const Dataset& data, std::int64_t samples,
                             double temperature, std::uint64_t seed) {
  if (data.examples.empty() || samples <= 0) return 0.0;
  torch::manual_seed(seed);
  std::vector<Example> batch;
  for (const Example& e : data.examples) {
    for (std::int64_t k = 0; k < samples; ++k) batch.push_back(e);
  }
  const Generation g = generate(model, batch, temperature);
  std::int64_t right = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) right += exact_match(batch[i], g.completions[i]);
  return static_cast<double>(right) / static_cast<double>(batch.size());
}

// ---------------------------------------------------------------- optimizer

/// Masked mean of a [B, T] tensor.
inline torch::Tensor masked_mean(const torch::Tensor& x, const torch::Tensor& mask) {
  const torch::Tensor w = mask.to(x.scalar_type());
  return (x * w).sum() / w.sum().clamp_min(1.0);
}

// ---------------------------------------------------------------- LM head

/// The model run over a batch up to what psft's losses read, either of two
/// ways: by default the last hidden state, with the LM head fused into the
/// loss (psft's *_from_hidden functions compute the logits a chunk of tokens
/// at a time, and neither they nor their gradient ever exist whole), or with
/// `unfused` the head's logits and the *_from_logits functions (the demo's
/// earlier path, kept for comparison: the same figures up to rounding).
/// Old log-probabilities and the loss they enter must come from the same
/// path, so that unchanged weights give a ratio of exactly 1.
class HeadPass {
 public:
  HeadPass(Gpt& model, const torch::Tensor& ids, bool unfused, const psft::LogitsOptions& opts = {})
      : unfused_(unfused) {
    static_cast<psft::LogitsOptions&>(opts_) = opts;
    if (unfused_) {
      logits_ = model->forward(ids);
    } else {
      hidden_ = model->hidden(ids);
      weight_ = model->head->weight;
      opts_.bias = model->head->bias;
    }
  }

  psft::TokenLogprobs token_logprobs(const torch::Tensor& labels) const {
    return unfused_ ? psft::token_logprobs(logits_, labels, opts_)
                    : psft::token_logprobs_from_hidden(hidden_, weight_, labels, opts_);
  }

  psft::SftLogitsLossResult sft_loss(const torch::Tensor& labels, psft::SftVariant variant,
                                     const psft::LossOptions& loss_opts) const {
    return unfused_
               ? psft::sft_loss_from_logits(logits_, labels, variant, loss_opts, opts_)
               : psft::sft_loss_from_hidden(hidden_, weight_, labels, variant, loss_opts, opts_);
  }

  psft::LogitsLossResult psft_loss(const torch::Tensor& labels, const torch::Tensor& old_logp,
                                   const psft::LossOptions& loss_opts) const {
    return unfused_
               ? psft::psft_loss_from_logits(logits_, labels, old_logp, loss_opts, opts_)
               : psft::psft_loss_from_hidden(hidden_, weight_, labels, old_logp, loss_opts, opts_);
  }

  psft::LogitsLossResult policy_loss(const torch::Tensor& labels, const torch::Tensor& old_logp,
                                     const torch::Tensor& advantages,
                                     const psft::LossOptions& loss_opts) const {
    return unfused_ ? psft::policy_loss_from_logits(logits_, labels, old_logp, advantages,
                                                    loss_opts, opts_)
                    : psft::policy_loss_from_hidden(hidden_, weight_, labels, old_logp, advantages,
                                                    loss_opts, opts_);
  }

 private:
  bool unfused_;
  psft::HiddenOptions opts_;       ///< the LogitsOptions given, and the head's bias
  torch::Tensor logits_;           ///< unfused: [B, T, V]
  torch::Tensor hidden_, weight_;  ///< fused: [B, T, dim] and the head's [V, dim]
};

// ---------------------------------------------------------------- pretraining

/// Base pretraining: fresh examples of the skill mixture every step.
struct PretrainConfig {
  GptConfig model;
  std::int64_t steps = 3000;
  std::int64_t batch = 128;
  double lr = 3e-3;
  std::vector<double> mixture = {0.05, 0.32, 0.32, 0.31};  ///< weight of each Skill
  std::uint64_t seed = 1;

  /// A string that changes whenever the checkpoint would.
  std::string key() const {
    std::string k = "gpt-v1-d" + std::to_string(model.dim) + "-h" + std::to_string(model.heads) +
                    "-l" + std::to_string(model.layers) + "-s" + std::to_string(steps) + "-b" +
                    std::to_string(batch) + "-lr" + std::to_string(lr) + "-seed" +
                    std::to_string(seed);
    for (double w : mixture) k += "-" + std::to_string(w);
    return k;
  }
};

/// Trains a base model from scratch; `progress(step, loss)` is called every
/// step. Always through the logits (HeadPass's `unfused` does not apply):
/// the checkpoint is cached under PretrainConfig::key alone, so fused and
/// --unfused demos start from the same base model, bit for bit.
inline Gpt pretrain(const PretrainConfig& c,
                    const std::function<void(std::int64_t, double)>& progress) {
  torch::manual_seed(static_cast<std::uint64_t>(c.seed));
  Gpt model(c.model);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(c.lr).weight_decay(0.01));
  const std::vector<Skill> skills = {Skill::Add, Skill::Reverse, Skill::Sort, Skill::Next};
  for (std::int64_t step = 0; step < c.steps; ++step) {
    // Linear warm-up over 100 steps, then cosine decay to 10%.
    const double warm = std::min(1.0, static_cast<double>(step + 1) / 100.0);
    const double progress_frac = static_cast<double>(step) / static_cast<double>(c.steps);
    psft::set_learning_rate(
        opt, c.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * progress_frac))));
    const Dataset d = make_dataset(skills, c.mixture, c.batch, c.seed * 1000003ULL + step);
    const torch::Tensor logits = model->forward(d.batch.ids);
    const psft::TokenLogprobs tl = psft::token_logprobs(logits, d.batch.labels);
    const torch::Tensor loss = -masked_mean(tl.logp, d.batch.labels != -100);
    opt.zero_grad();
    loss.backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    opt.step();
    progress(step, loss.item<double>());
  }
  return model;
}

// ---------------------------------------------------------------- evaluation

/// Held-out evaluation sets and the base model's log-probabilities on them.
struct Evaluator {
  Skill task = Skill::Add;
  std::vector<Dataset> per_skill;  ///< indexed by Skill
  Batch teacher;                   ///< all skills' test examples, for KL
  torch::Tensor base_log_probs;    ///< [N, kContext, V] of the base on `teacher`
  bool unfused = false;            ///< the entropy from the logits (HeadPass)

  Evaluator(Gpt& base, Skill task, std::int64_t per_skill_count,
            const std::vector<Example>& exclude, bool unfused = false)
      : task(task), unfused(unfused) {
    std::vector<std::string> seen;
    for (const Example& e : exclude) seen.push_back(e.prompt);
    std::sort(seen.begin(), seen.end());
    std::vector<Example> all;
    for (int s = 0; s < kSkillCount; ++s) {
      std::mt19937_64 rng(777 + s);
      Dataset d;
      while (static_cast<std::int64_t>(d.examples.size()) < per_skill_count) {
        Example e = make_example(static_cast<Skill>(s), rng);
        if (!std::binary_search(seen.begin(), seen.end(), e.prompt)) d.examples.push_back(e);
      }
      d.batch = to_batch(d.examples);
      all.insert(all.end(), d.examples.begin(), d.examples.end());
      per_skill.push_back(std::move(d));
    }
    teacher = to_batch(all);
    torch::NoGradGuard no_grad;
    base_log_probs = torch::log_softmax(base->forward(teacher.ids), -1);
  }

  /// One evaluation of `model`.
  struct Result {
    double in_domain = 0;       ///< greedy exact-match accuracy on the task's test set
    double out_of_domain = 0;   ///< mean over the other skills
    std::vector<double> skill;  ///< per skill
    double entropy = 0;         ///< token entropy on the task's test responses (teacher forced)
    double kl_from_base = 0;    ///< KL(model || base) per response token, all skills
  };

  Result operator()(Gpt& model) const {
    torch::NoGradGuard no_grad;
    Result r;
    double ood = 0;
    for (int s = 0; s < kSkillCount; ++s) {
      const double a = accuracy(model, per_skill[static_cast<std::size_t>(s)]);
      r.skill.push_back(a);
      if (s == static_cast<int>(task)) {
        r.in_domain = a;
      } else {
        ood += a;
      }
    }
    r.out_of_domain = ood / (kSkillCount - 1);
    const Batch& in = per_skill[static_cast<std::size_t>(task)].batch;
    const psft::TokenLogprobs tl = HeadPass(model, in.ids, unfused).token_logprobs(in.labels);
    r.entropy = masked_mean(tl.entropy, in.labels != -100).item<double>();
    // KL over the whole vocabulary needs every logit.
    const torch::Tensor log_probs = torch::log_softmax(model->forward(teacher.ids), -1);
    const torch::Tensor kl = (log_probs.exp() * (log_probs - base_log_probs)).sum(-1);
    r.kl_from_base = masked_mean(kl, teacher.labels != -100).item<double>();
    return r;
  }
};

// ---------------------------------------------------------------- fine-tuning

enum class Objective { Sft, Dft, Psft };

/// One fine-tuning run.
struct RunSpec {
  std::string name;
  Objective objective = Objective::Sft;
  double lr = 1e-3;
  std::int64_t sft_warmup_steps = 0;  ///< PSFT only: plain SFT for this many steps first
  double eps_high = 0.28;             ///< PSFT's upper clip (also what SFT's clip metric uses)
  /// The old policy of this run, if not FinetuneConfig::old_policy.
  std::optional<psft::OldPolicyOptions> old_policy;
};

/// Shared settings of the fine-tuning runs (the PSFT recipe's shape).
struct FinetuneConfig {
  std::int64_t epochs = 16;
  std::int64_t global_batch = 64;
  std::int64_t mini_batches = 8;  ///< optimizer steps per global batch
  std::int64_t ppo_epochs = 1;    ///< passes over each global batch
  std::int64_t lr_warmup = 10;    ///< linear lr warm-up steps
  std::int64_t eval_every = 128;  ///< optimizer steps between evaluations
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  psft::ClipOptions clip;  ///< eps_low 0.2, eps_high 0.28
  /// Where old log-probabilities come from: Recompute (the recipe) or a
  /// Snapshot refreshed every snapshot_interval steps, or an Ema copy.
  psft::OldPolicyOptions old_policy;
  std::uint64_t seed = 3;
  bool unfused = false;  ///< losses and old log-probabilities from the logits (HeadPass)

  /// Optimizer steps of a run over `demonstrations`.
  std::int64_t steps(std::int64_t demonstrations) const {
    return epochs * (demonstrations / global_batch) * mini_batches * ppo_epochs;
  }
};

/// Metrics of one optimizer step (eval fields are NaN between evaluations).
struct StepLog {
  std::string run;
  std::string stage;      ///< "finetune" or "rl"
  std::int64_t step = 0;  ///< optimizer steps (RL: sampled batches) done, this row's included
  double epoch = 0;
  double loss = 0;
  double entropy = 0;         ///< mean token entropy of the mini-batch
  double clip_frac_high = 0;  ///< tokens with r > 1 + eps_high (would-be, for SFT/DFT)
  double ratio_max = 1;
  double approx_kl = 0;  ///< k3 KL(old || new) of the mini-batch
  double lr = 0;
  double reward = NAN;  ///< RL: mean reward of the step's samples
  Evaluator::Result eval;
  bool evaluated = false;
};

/// Fine-tunes a copy of `base` on `demos`; `log` gets every step.
///
/// The loop is the PSFT recipe's: per global batch, psft::OldPolicy
/// (strategy Recompute by default) records the old log-probabilities of every
/// mini-batch under the weights the global batch starts from, then each
/// mini-batch takes one optimizer step (ppo_epochs passes over the global
/// batch). SFT and DFT runs go through the same loop and log what PSFT's
/// trust region would have clipped. `monitor`, if given, records the
/// trust-region metrics of the last mini-batch of every global batch (the
/// first one has r = 1 under Recompute and says nothing), before `log` sees
/// that step.
inline Gpt finetune(const Gpt& base, const Dataset& demos, const RunSpec& run,
                    const FinetuneConfig& c, const Evaluator& evaluator,
                    const std::function<void(const StepLog&)>& log,
                    psft::TrustRegionMonitor* monitor = nullptr) {
  Gpt model = clone_model(base);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(run.lr).weight_decay(c.weight_decay));
  psft::OldPolicyOptions old_opts = run.old_policy.value_or(c.old_policy);
  old_opts.reuse_first_forward = false;  // the PSFT path computes logp inside the loss
  // The old policy scores a mini-batch by the training step's path, so that
  // unchanged weights give a ratio of exactly 1.
  psft::OldPolicy<Gpt, Batch> old_policy(
      model, old_opts, [unfused = c.unfused](Gpt& m, const Batch& b) {
        return HeadPass(m, b.ids, unfused).token_logprobs(b.labels);
      });
  const psft::SftWarmupSchedule phases{run.objective == Objective::Psft ? run.sft_warmup_steps : 0};
  const psft::LinearLrWarmup lr_schedule{run.lr, c.lr_warmup};

  const std::int64_t n = demos.batch.size();
  const std::int64_t groups = n / c.global_batch;
  const std::int64_t mini = c.global_batch / c.mini_batches;
  const std::int64_t total = c.steps(n);
  TORCH_CHECK(c.mini_batches > 0 && c.global_batch % c.mini_batches == 0,
              "gpt::finetune: global_batch ", c.global_batch, " is not a multiple of mini_batches ",
              c.mini_batches);
  TORCH_CHECK(groups > 0, "gpt::finetune: ", n, " demonstrations make no global batch of ",
              c.global_batch);
  psft::LossOptions loss_opts;
  loss_opts.clip = c.clip;
  loss_opts.clip.eps_high = run.eps_high;
  std::mt19937_64 rng(c.seed);  // the same sample order for every run
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::int64_t step = 0;
  for (std::int64_t epoch = 0; epoch < c.epochs; ++epoch) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const torch::Tensor perm = torch::tensor(order, torch::kLong);
    for (std::int64_t g = 0; g < groups; ++g) {
      const Batch global =
          demos.batch.select(perm.slice(0, g * c.global_batch, (g + 1) * c.global_batch));
      std::vector<Batch> minis;
      for (std::int64_t pass = 0; pass < c.ppo_epochs; ++pass) {
        for (std::int64_t k = 0; k < c.mini_batches; ++k)
          minis.push_back(global.rows(k * mini, (k + 1) * mini));
      }
      old_policy.begin_global_batch(minis);
      for (std::size_t k = 0; k < minis.size(); ++k) {
        const Batch& b = minis[k];
        const torch::Tensor old = old_policy.old_logp(static_cast<std::int64_t>(k), b);
        const torch::Tensor mask = b.labels != -100;
        const HeadPass pass(model, b.ids, c.unfused);
        StepLog s;
        s.run = run.name;
        s.stage = "finetune";
        s.step = step + 1;
        s.epoch = static_cast<double>(step) / static_cast<double>(total / c.epochs);
        torch::Tensor loss;
        psft::LossMetrics metrics;
        if (run.objective == Objective::Psft &&
            phases.objective_at(step) == psft::TrainingObjective::Psft) {
          const psft::LogitsLossResult r = pass.psft_loss(b.labels, old, loss_opts);
          loss = r.loss;
          metrics = r.metrics;
          s.entropy = r.entropy_mean.item<double>();
        } else {
          const psft::SftLogitsLossResult r = pass.sft_loss(
              b.labels,
              run.objective == Objective::Dft ? psft::SftVariant::Dft : psft::SftVariant::Nll,
              loss_opts);
          loss = r.loss;
          // What PSFT's trust region would have clipped at this step.
          metrics = psft::psft_loss(r.logp.detach(), old, mask, loss_opts).metrics;
          s.entropy = masked_mean(r.entropy, mask).item<double>();
        }
        s.lr = lr_schedule.lr_at(step);
        psft::set_learning_rate(opt, s.lr);
        opt.zero_grad();
        loss.backward();
        torch::nn::utils::clip_grad_norm_(model->parameters(), c.grad_clip);
        opt.step();
        old_policy.after_optimizer_step();
        s.loss = loss.item<double>();
        s.clip_frac_high = metrics.clip_frac_high.item<double>();
        s.ratio_max = metrics.ratio_max.item<double>();
        s.approx_kl = metrics.approx_kl_k3.item<double>();
        if (monitor != nullptr && k + 1 == minis.size()) monitor->record(s.step, metrics);
        ++step;
        if (step % c.eval_every == 0 || step == total) {
          s.eval = evaluator(model);
          s.evaluated = true;
        }
        log(s);
      }
    }
  }
  return model;
}

// ---------------------------------------------------------------- RL

/// GRPO-style RL on the task: sampled groups, exact-match rewards,
/// group-normalised advantages, the clipped objective of policy_loss (or
/// the rule `loss.objective` selects: GSPO's sequence ratio, CISPO)
/// against the sampling policy's log-probabilities, several passes per
/// sampled batch.
struct RlConfig {
  std::int64_t steps = 40;
  std::int64_t prompts = 64;      ///< prompts per step
  std::int64_t group = 8;         ///< samples per prompt
  std::int64_t mini_batches = 4;  ///< optimizer steps per pass over a sampled batch
  std::int64_t ppo_epochs = 4;    ///< passes over each sampled batch (the clip acts from the 2nd)
  double lr = 1e-4;
  double temperature = 1.0;
  /// Leave out of the updates the groups whose samples all got the same
  /// reward (their advantages are 0): they would only dilute the token mean.
  bool skip_uniform_groups = true;
  std::uint64_t seed = 11;
  bool unfused = false;  ///< losses and old log-probabilities from the logits (HeadPass)
  /// The objective: eps 0.2 / 0.28, token mean, the clipped rule at token
  /// level by default (GRPO's); main.cpp's --rl-objective sets GSPO's
  /// sequence-level ratio or CISPO here.
  psft::LossOptions loss;
};

/// Group-normalised advantages of `rewards` [prompts, group]:
/// (r - mean) / (std + 1e-6) within each group, 0 in a group whose rewards
/// are all equal.
inline torch::Tensor group_advantages(const torch::Tensor& rewards) {
  return (rewards - rewards.mean(1, true)) / (rewards.std(1, true, true) + 1e-6);
}

/// Runs GRPO-style RL from a copy of `start`; `log` gets one row per sampled
/// batch (reward, and the mean over its updates of the loss, entropy, clip
/// fraction, ratio max and approximate KL against the sampling policy).
/// `monitor`, if given, records the metrics of the last update of every
/// sampled batch (the first has r = 1), before `log` sees that step.
inline Gpt reinforce(const Gpt& start, Skill task, const std::string& name, const RlConfig& c,
                     const std::function<void(const StepLog&)>& log,
                     psft::TrustRegionMonitor* monitor = nullptr) {
  Gpt model = clone_model(start);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(c.lr).weight_decay(0.0));
  std::mt19937_64 rng(c.seed);  // the same prompts for every run
  torch::manual_seed(c.seed);   // the same sampler stream
  const psft::LossOptions& loss_opts = c.loss;
  psft::LogitsOptions logits_opts;
  logits_opts.temperature = c.temperature;
  const std::int64_t n = c.prompts * c.group;
  for (std::int64_t step = 0; step < c.steps; ++step) {
    std::vector<Example> batch;
    for (std::int64_t p = 0; p < c.prompts; ++p) {
      const Example e = make_example(task, rng);
      for (std::int64_t k = 0; k < c.group; ++k) batch.push_back(e);
    }
    const Generation g = generate(model, batch, c.temperature);
    std::vector<float> rewards(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < batch.size(); ++i) {
      rewards[i] = exact_match(batch[i], g.completions[i]) ? 1.0f : 0.0f;
    }
    const torch::Tensor r = torch::tensor(rewards).view({c.prompts, c.group});
    const torch::Tensor adv = group_advantages(r).reshape({n});
    // The samples that carry a learning signal.
    const torch::Tensor informative = c.skip_uniform_groups ? (r.std(1, true, true) > 0)
                                                                  .expand({c.prompts, c.group})
                                                                  .reshape({n})
                                                                  .nonzero()
                                                                  .view({-1})
                                                            : torch::arange(n, torch::kLong);
    const std::int64_t m = informative.size(0);
    StepLog s;
    s.run = name;
    s.stage = "rl";
    s.step = step + 1;
    s.lr = c.lr;
    s.reward = r.mean().item<double>();
    s.loss = s.entropy = s.clip_frac_high = s.approx_kl = 0;
    s.ratio_max = 1;
    if (m > 0) {
      const torch::Tensor ids = g.ids.index_select(0, informative);
      const torch::Tensor labels = g.labels.index_select(0, informative);
      const torch::Tensor a = adv.index_select(0, informative);
      torch::Tensor old_logp;  // the sampling policy's
      {
        torch::NoGradGuard no_grad;
        old_logp = HeadPass(model, ids, c.unfused, logits_opts).token_logprobs(labels).logp;
      }
      const std::int64_t chunks = std::min(c.mini_batches, m);
      std::int64_t updates = 0;
      psft::LossMetrics last_update;
      for (std::int64_t pass = 0; pass < c.ppo_epochs; ++pass) {
        // Shuffle so that each mini-batch mixes prompts.
        const torch::Tensor perm = torch::randperm(m, torch::kLong);
        for (std::int64_t k = 0; k < chunks; ++k) {
          const torch::Tensor idx = perm.slice(0, k * m / chunks, (k + 1) * m / chunks);
          const psft::LogitsLossResult out =
              HeadPass(model, ids.index_select(0, idx), c.unfused, logits_opts)
                  .policy_loss(labels.index_select(0, idx), old_logp.index_select(0, idx),
                               a.index_select(0, idx), loss_opts);
          opt.zero_grad();
          out.loss.backward();
          torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
          opt.step();
          s.loss += out.loss.item<double>();
          s.entropy += out.entropy_mean.item<double>();
          s.clip_frac_high += out.metrics.clip_frac.item<double>();
          s.approx_kl += out.metrics.approx_kl_k3.item<double>();
          s.ratio_max = std::max(s.ratio_max, out.metrics.ratio_max.item<double>());
          last_update = out.metrics;
          ++updates;
        }
      }
      s.loss /= updates;
      s.entropy /= updates;
      s.clip_frac_high /= updates;
      s.approx_kl /= updates;
      if (monitor != nullptr) monitor->record(s.step, last_update);
    }
    log(s);
  }
  return model;
}

}  // namespace gpt
