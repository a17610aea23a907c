// Tests of the training-loop layer: psft::OldPolicy (Recompute, Snapshot,
// Ema), its save/load (a resumed run must reproduce an uninterrupted one bit
// for bit on the CPU), the SFT warm-up and learning-rate schedules, the
// recipe defaults, and the SFT objectives sft_loss / sft_loss_from_logits
// (NLL, DFT) against the independent double reference in
// reference/sft_reference.hpp plus finite differences.
//
// Tolerances: float64 loss and gradient 1e-12 relative (to the sum of term
// magnitudes), float32 1e-5; finite differences (float64, central, h = 1e-6)
// 1e-6 relative plus 1e-8 absolute. Everything the library promises to be
// exact (ratio 1 on the first mini-batch, cached old log-probs, resumed
// losses) is compared with ==.

// LibTorch defines its own CHECK macro; include it first and drop the macro
// so that Catch2's CHECK is the one used (see test_policy_loss.cpp).
#include <torch/torch.h>
#include <torch/version.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "psft/psft.hpp"
#include "psft/train.hpp"
#include "reference/sft_reference.hpp"
#include "support/reductions.hpp"
#include "support/reference_adapter.hpp"

namespace {

using torch::Tensor;

// A tiny language model: embedding, tanh, projection to the vocabulary.
// Cloneable, as OldPolicy's Snapshot and Ema strategies need. `observed`
// records the training flag of each forward, for the eval-mode test.
struct TinyLMImpl : torch::nn::Cloneable<TinyLMImpl> {
  TinyLMImpl(std::int64_t vocab, std::int64_t dim, torch::Dtype dtype)
      : vocab_(vocab), dim_(dim), dtype_(dtype) {
    reset();
  }
  void reset() override {
    embedding = register_module("embedding", torch::nn::Embedding(vocab_, dim_));
    hidden = register_module("hidden", torch::nn::Linear(dim_, dim_));
    head = register_module("head", torch::nn::Linear(dim_, vocab_));
    to(dtype_);
  }
  Tensor forward(const Tensor& ids) {
    observed.push_back(is_training());
    return head(torch::tanh(hidden(embedding(ids))));
  }
  std::int64_t vocab_, dim_;
  torch::Dtype dtype_;
  torch::nn::Embedding embedding{nullptr};
  torch::nn::Linear hidden{nullptr}, head{nullptr};
  std::vector<bool> observed;
};
TORCH_MODULE(TinyLM);

constexpr std::int64_t kVocab = 11;
constexpr std::int64_t kDim = 8;
constexpr std::int64_t kSeq = 6;

psft::TokenLogprobs score(TinyLM& net, const psft::TokenBatch& batch) {
  return psft::token_logprobs(net->forward(batch.input_ids), batch.labels);
}

// A module that is not a torch::nn::Cloneable: OldPolicy can only Recompute
// with it (psft::recompute_only).
struct PlainLMImpl : torch::nn::Module {
  PlainLMImpl() {
    embedding = register_module("embedding", torch::nn::Embedding(kVocab, kDim));
    head = register_module("head", torch::nn::Linear(kDim, kVocab));
  }
  Tensor forward(const Tensor& ids) { return head(torch::tanh(embedding(ids))); }
  torch::nn::Embedding embedding{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(PlainLM);

psft::TokenLogprobs score_plain(PlainLM& net, const psft::TokenBatch& batch) {
  return psft::token_logprobs(net->forward(batch.input_ids), batch.labels);
}

// The no-grad passes OldPolicy ran on a TinyLM: they run in eval mode, the
// training forwards in train mode.
std::ptrdiff_t no_grad_passes(const TinyLM& net) {
  return std::count(net->observed.begin(), net->observed.end(), false);
}

// Deterministic data: global batch g, mini-batch i, 3 sequences each;
// prompt positions (the first two) are ignore_index.
psft::TokenBatch make_batch(std::uint32_t seed, std::int64_t rows = 3) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::int64_t> token(0, kVocab - 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(rows * kSeq));
  for (auto& id : ids) id = token(rng);
  Tensor input_ids = torch::tensor(ids, torch::kLong).reshape({rows, kSeq});
  Tensor loss_mask = torch::ones({rows, kSeq}, torch::kBool);
  loss_mask.slice(1, 0, 2).fill_(false);
  return {input_ids, psft::shift_labels(input_ids.masked_fill(~loss_mask, 0), -100)
                         .masked_fill(~loss_mask.roll(-1, 1), -100)};
}

std::vector<psft::TokenBatch> make_global_batch(std::int64_t g, std::int64_t mini_batches) {
  std::vector<psft::TokenBatch> out;
  for (std::int64_t i = 0; i < mini_batches; ++i)
    out.push_back(make_batch(static_cast<std::uint32_t>(1000 + 31 * g + i)));
  return out;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.defined() && b.defined() && a.sizes() == b.sizes() &&
         a.scalar_type() == b.scalar_type() && torch::equal(a, b);
}

// One PSFT training run with everything a checkpoint needs: model,
// optimizer, old policy and the data position (the global step; the data
// are a function of it, so there is no RNG state to keep).
struct Run {
  static constexpr std::int64_t kMiniBatches = 4;

  explicit Run(psft::OldPolicyOptions options, std::uint64_t seed = 0) {
    torch::manual_seed(seed);
    net = TinyLM(kVocab, kDim, torch::kFloat);
    optimizer = std::make_unique<torch::optim::AdamW>(
        net->parameters(), torch::optim::AdamWOptions(1e-1).weight_decay(0.1));
    old = std::make_unique<psft::OldPolicy<TinyLM>>(net, options, score);
  }

  // One optimizer step; returns the loss and the ratio range (1 in the SFT
  // warm-up). A global batch begins at its mini-batch 0 only: a run resumed
  // inside one continues with the cache that load() restored.
  struct StepResult {
    float loss;
    double ratio_min, ratio_max, clip_frac;
  };
  StepResult step() {
    const std::int64_t g = position / kMiniBatches;
    const std::int64_t i = position % kMiniBatches;
    const auto batches = make_global_batch(g, kMiniBatches);
    if (i == 0) {
      if (warmup && skip_warmup_passes) {
        old->begin_global_batch(batches, *warmup);
      } else {
        old->begin_global_batch(batches);
      }
    }
    const psft::TokenBatch& mb = batches[static_cast<std::size_t>(i)];
    const psft::TokenLogprobs now = score(net, mb);
    StepResult out{0.0f, 1.0, 1.0, 0.0};
    Tensor loss;
    if (warmup && warmup->in_warmup(position)) {
      loss = psft::sft_loss(now.logp, mb.labels != -100).loss;
    } else {
      const Tensor old_logp = old->old_logp(i, mb, now.logp);
      const psft::LossResult r = psft::psft_loss(now.logp, old_logp, mb.labels != -100);
      loss = r.loss;
      out = {0.0f, r.metrics.ratio_min.item<double>(), r.metrics.ratio_max.item<double>(),
             r.metrics.clip_frac_high.item<double>()};
    }
    optimizer->zero_grad();
    loss.backward();
    torch::nn::utils::clip_grad_norm_(net->parameters(), 1.0);
    optimizer->step();
    old->after_optimizer_step();
    ++position;
    out.loss = loss.item<float>();
    return out;
  }

  void save(const std::string& path) const {
    torch::serialize::OutputArchive archive;
    torch::serialize::OutputArchive model(archive.compilation_unit());
    net->save(model);
    archive.write("model", model);
    torch::serialize::OutputArchive optim(archive.compilation_unit());
    optimizer->save(optim);
    archive.write("optimizer", optim);
    torch::serialize::OutputArchive old_policy(archive.compilation_unit());
    old->save(old_policy);
    archive.write("old_policy", old_policy);
    archive.write("position", c10::IValue(position));
    archive.save_to(path);
  }

  void load(const std::string& path) {
    torch::serialize::InputArchive archive;
    archive.load_from(path);
    torch::serialize::InputArchive model, optim, old_policy;
    archive.read("model", model);
    net->load(model);
    archive.read("optimizer", optim);
    optimizer->load(optim);
    archive.read("old_policy", old_policy);
    old->load(old_policy);
    c10::IValue p;
    archive.read("position", p);
    position = p.toInt();
  }

  TinyLM net{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer;
  std::unique_ptr<psft::OldPolicy<TinyLM>> old;
  std::int64_t position = 0;
  // An SFT warm-up (plain SFT loss at its steps), and whether
  // begin_global_batch is given it (so it skips the warm-up's passes).
  std::optional<psft::SftWarmupSchedule> warmup;
  bool skip_warmup_passes = false;
};

psft::OldPolicyOptions options_for(psft::OldPolicyStrategy strategy) {
  psft::OldPolicyOptions o;
  o.strategy = strategy;
  o.snapshot_interval = 3;
  o.ema_decay = 0.75;
  return o;
}

const char* name_of(psft::OldPolicyStrategy s) {
  switch (s) {
    case psft::OldPolicyStrategy::Recompute:
      return "Recompute";
    case psft::OldPolicyStrategy::Snapshot:
      return "Snapshot";
    case psft::OldPolicyStrategy::Ema:
      return "Ema";
  }
  return "?";
}

// Captures TORCH_WARN messages (the handler interface changed in 2.0).
struct WarningCollector : c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& msg, const bool) override {
    messages.push_back(msg);
  }
#endif
  std::vector<std::string> messages;
};
#if TORCH_VERSION_MAJOR >= 2
using WarningHandlerGuard = c10::WarningUtils::WarningHandlerGuard;
#else
using WarningHandlerGuard = c10::Warning::WarningHandlerGuard;
#endif

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

// ---------------------------------------------------------------------------
// OldPolicy: Recompute

TEST_CASE("Recompute: mini-batch 0 has ratio exactly 1, later ones read the global batch's start",
          "[train][old_policy]") {
  for (const bool reuse : {true, false}) {
    DYNAMIC_SECTION("reuse_first_forward " << reuse) {
      psft::OldPolicyOptions o;
      o.reuse_first_forward = reuse;
      Run run(o);
      const auto batches = make_global_batch(0, Run::kMiniBatches);
      // The initial weights' log-probs of every mini-batch, from a frozen copy.
      std::vector<Tensor> initial, initial_entropy;
      {
        torch::NoGradGuard no_grad;
        for (const auto& mb : batches) {
          const psft::TokenLogprobs t = score(run.net, mb);
          initial.push_back(t.logp.clone());
          initial_entropy.push_back(t.entropy.clone());
        }
      }
      const std::size_t passes_before = run.net->observed.size();
      run.old->begin_global_batch(batches);
      // One no-grad pass per mini-batch, mini-batch 0 deferred when reused.
      CHECK(run.net->observed.size() - passes_before == (reuse ? 3u : 4u));
      for (std::int64_t i = 0; i < Run::kMiniBatches; ++i) {
        const auto& mb = batches[static_cast<std::size_t>(i)];
        const psft::TokenLogprobs now = score(run.net, mb);
        const psft::TokenLogprobs old = run.old->old(i, mb, now);
        CHECK_FALSE(old.logp.requires_grad());
        CHECK(old.logp.scalar_type() == torch::kFloat);
        CHECK(bitwise_equal(old.logp, initial[static_cast<std::size_t>(i)]));
        // The pre-update entropy, also for mini-batch 0 taken from `now`.
        CHECK(bitwise_equal(old.entropy, initial_entropy[static_cast<std::size_t>(i)]));
        const psft::LossResult r = psft::psft_loss(now.logp, old.logp, mb.labels != -100);
        if (i == 0) {
          CHECK(r.metrics.ratio_min.item<double>() == 1.0);
          CHECK(r.metrics.ratio_max.item<double>() == 1.0);
          CHECK(r.metrics.clip_frac.item<double>() == 0.0);
          CHECK(r.metrics.clip_frac_high.item<double>() == 0.0);
        } else {
          CHECK(r.metrics.ratio_max.item<double>() != 1.0);  // the weights moved
        }
        run.optimizer->zero_grad();
        r.loss.backward();
        run.optimizer->step();
        run.old->after_optimizer_step();
      }
      CHECK(run.old->steps() == 4);
      CHECK(run.old->global_batches() == 1);
      CHECK(run.old->steps_in_global_batch() == 4);
    }
  }
}

TEST_CASE("Recompute with the fused losses: mini-batch 0's old log-probs come from the loss itself",
          "[train][old_policy][fused]") {
  for (const bool from_hidden : {false, true}) {
    DYNAMIC_SECTION((from_hidden ? "psft_loss_from_hidden" : "psft_loss_from_logits")) {
      torch::manual_seed(5);
      TinyLM net(kVocab, kDim, torch::kFloat);
      torch::optim::AdamW optimizer(net->parameters(), torch::optim::AdamWOptions(1e-1));
      const auto hidden_of = [](TinyLM& n, const Tensor& ids) {
        n->observed.push_back(n->is_training());
        return torch::tanh(n->hidden(n->embedding(ids)));
      };
      const auto head_options = [](TinyLM& n) {
        psft::HiddenOptions h;
        h.bias = n->head->bias;
        h.chunk_tokens = 5;
        return h;
      };
      // The scorer and the loss take the same path, so that mini-batch 0's
      // cached old log-probs equal what a no-grad pass would have given.
      const auto scorer = [&](TinyLM& n, const psft::TokenBatch& b) {
        return from_hidden
                   ? psft::token_logprobs_from_hidden(hidden_of(n, b.input_ids), n->head->weight,
                                                      b.labels, head_options(n))
                   : score(n, b);
      };
      psft::OldPolicy<TinyLM> old(net, psft::OldPolicyOptions{}, scorer);
      const auto batches = make_global_batch(3, Run::kMiniBatches);
      std::vector<Tensor> initial;
      {
        torch::NoGradGuard no_grad;
        for (const auto& mb : batches) initial.push_back(scorer(net, mb).logp.clone());
      }
      const std::size_t passes_before = net->observed.size();
      old.begin_global_batch(batches);
      CHECK(net->observed.size() - passes_before == 3u);  // mini-batch 0 deferred
      for (int epoch = 0; epoch < 2; ++epoch) {
        for (std::int64_t i = 0; i < Run::kMiniBatches; ++i) {
          const auto& mb = batches[static_cast<std::size_t>(i)];
          const Tensor old_logp = old.fused_old_logp(i, mb);
          CHECK(old_logp.defined() == (epoch > 0 || i > 0));
          const psft::LogitsLossResult r =
              from_hidden
                  ? psft::psft_loss_from_hidden(hidden_of(net, mb.input_ids), net->head->weight,
                                                mb.labels, old_logp, {}, head_options(net))
                  : psft::psft_loss_from_logits(net->forward(mb.input_ids), mb.labels, old_logp);
          if (!old_logp.defined()) {
            CHECK(r.metrics.ratio_min.item<double>() == 1.0);
            CHECK(r.metrics.ratio_max.item<double>() == 1.0);
            old.keep_current(i, mb, {r.logp, r.entropy});
          }
          // Bit for bit what the no-grad pass at the global batch's start gave.
          CHECK(bitwise_equal(old.old_logp(i, mb), initial[static_cast<std::size_t>(i)]));
          optimizer.zero_grad();
          r.loss.backward();
          optimizer.step();
          old.after_optimizer_step();
        }
      }
      // No no-grad pass beyond begin_global_batch's three.
      CHECK(net->observed.size() - passes_before == 3u + 2u * Run::kMiniBatches);
    }
  }
}

TEST_CASE("Recompute: the no-grad passes run in eval mode and restore the module's mode",
          "[train][old_policy]") {
  for (const bool eval : {true, false}) {
    psft::OldPolicyOptions o;
    o.eval_mode = eval;
    o.reuse_first_forward = false;
    Run run(o);
    run.net->train();
    run.net->observed.clear();
    run.old->begin_global_batch(make_global_batch(0, 2));
    REQUIRE(run.net->observed.size() == 2);
    CHECK(run.net->observed[0] == !eval);
    CHECK(run.net->observed[1] == !eval);
    CHECK(run.net->is_training());
  }
}

TEST_CASE("Recompute: a single mini-batch per global batch warns once", "[train][old_policy]") {
  WarningCollector collector;
  WarningHandlerGuard guard(&collector);
  Run run(psft::OldPolicyOptions{});
  run.old->begin_global_batch(make_global_batch(0, 1));
  run.old->begin_global_batch(make_global_batch(1, 1));
  REQUIRE(collector.messages.size() == 1);
  CHECK(collector.messages[0].find("single mini-batch") != std::string::npos);
  CHECK(collector.messages[0].find("PSFT is plain SFT") != std::string::npos);

  WarningCollector quiet;
  WarningHandlerGuard quiet_guard(&quiet);
  Run several(psft::OldPolicyOptions{});
  several.old->begin_global_batch(make_global_batch(0, 2));
  psft::OldPolicyOptions off;
  off.warn_single_mini_batch = false;
  Run silenced(off);
  silenced.old->begin_global_batch(make_global_batch(0, 1));
  Run snapshot(options_for(psft::OldPolicyStrategy::Snapshot));
  snapshot.old->begin_global_batch(make_global_batch(0, 1));
  CHECK(quiet.messages.empty());
}

TEST_CASE("Recompute: old() refuses a batch whose labels' shape is not the cached one's",
          "[train][old_policy][errors]") {
  Run run(psft::OldPolicyOptions{});
  const std::vector<psft::TokenBatch> batches = {make_batch(1, 3), make_batch(2, 3),
                                                 make_batch(3, 2)};
  run.old->begin_global_batch(batches);
  const std::string error = error_of([&] { run.old->old_logp(2, batches[1]); });
  CHECK_THAT(error, Catch::Contains("batch (mini-batch 2)") && Catch::Contains("[3, 6]") &&
                        Catch::Contains("[2, 6]"));
  CHECK_THAT(error_of([&] { run.old->old_logp(1, batches[2]); }),
             Catch::Contains("batch (mini-batch 1)"));
  CHECK_NOTHROW(run.old->old_logp(1, batches[1]));
  CHECK_NOTHROW(run.old->old_logp(2, batches[2]));
  // After a checkpoint the restored cache is checked the same way.
  const std::string path = "psft_test_train_batch_check.pt";
  torch::save(*run.old, path);
  Run resumed(psft::OldPolicyOptions{});
  torch::load(*resumed.old, path);
  std::remove(path.c_str());
  CHECK_THAT(error_of([&] { resumed.old->old_logp(2, batches[0]); }),
             Catch::Contains("batch (mini-batch 2)"));
  CHECK(bitwise_equal(resumed.old->old_logp(2, batches[2]), run.old->old_logp(2, batches[2])));
}

TEST_CASE("Recompute: begin_global_batch with an SFT warm-up runs no pass for warm-up steps",
          "[train][old_policy][warmup]") {
  // 4 mini-batches per global batch and 6 warm-up steps: global batch 0 is
  // all SFT; global batch 1 has SFT steps 4, 5 and PSFT steps 6, 7, whose
  // old log-probs come from the weights global batch 1 starts from; global
  // batch 2 is all PSFT.
  for (const bool reuse : {true, false}) {
    DYNAMIC_SECTION("reuse_first_forward " << reuse) {
      psft::OldPolicyOptions o;
      o.reuse_first_forward = reuse;
      Run skipping(o), computing(o);
      skipping.warmup = computing.warmup = psft::SftWarmupSchedule{6};
      skipping.skip_warmup_passes = true;
      std::vector<std::ptrdiff_t> passes;  // after each global batch
      for (std::int64_t s = 0; s < 3 * Run::kMiniBatches; ++s) {
        const Run::StepResult x = skipping.step();
        const Run::StepResult y = computing.step();
        INFO("step " << s);
        // The skipped passes were never used: the run is the same.
        CHECK(x.loss == y.loss);
        CHECK(x.ratio_max == y.ratio_max);
        if (s == 4) {  // inside global batch 1
          CHECK_FALSE(skipping.old->needs_old(0));
          CHECK_FALSE(skipping.old->needs_old(1));
          CHECK(skipping.old->needs_old(2));
          CHECK(skipping.old->needs_old(3));
          const auto batches = make_global_batch(1, Run::kMiniBatches);
          CHECK_THAT(error_of([&] { skipping.old->old_logp(1, batches[1]); }),
                     Catch::Contains("SFT warm-up") && Catch::Contains("step 5"));
          CHECK(computing.old->needs_old(1));
        }
        if (s % Run::kMiniBatches == Run::kMiniBatches - 1)
          passes.push_back(no_grad_passes(skipping.net));
      }
      // Mini-batch 0 of global batch 2 reuses its training forward.
      CHECK(passes == std::vector<std::ptrdiff_t>{0, 2, reuse ? 5 : 6});
      CHECK(no_grad_passes(computing.net) == (reuse ? 9 : 12));
      CHECK(skipping.old->steps() == 12);
      CHECK(skipping.old->global_batches() == 3);
    }
  }
}

// ---------------------------------------------------------------------------
// OldPolicy: Snapshot and Ema

TEST_CASE("Snapshot: the copy is refreshed after every K-th optimizer step",
          "[train][old_policy]") {
  Run run(options_for(psft::OldPolicyStrategy::Snapshot));  // K = 3
  const psft::TokenBatch probe = make_batch(7);
  const auto live_logp = [&] {
    torch::NoGradGuard no_grad;
    return score(run.net, probe).logp.clone();
  };
  Tensor expected = live_logp();  // the snapshot taken at construction
  run.old->begin_global_batch(make_global_batch(0, Run::kMiniBatches));
  for (std::int64_t s = 0; s < 8; ++s) {
    const Tensor old = run.old->old_logp(0, probe);
    CHECK(bitwise_equal(old, expected));
    CHECK_FALSE(old.requires_grad());
    run.step();
    if (run.old->steps() % 3 == 0) {
      expected = live_logp();
    } else {
      CHECK_FALSE(bitwise_equal(live_logp(), expected));
    }
  }
  CHECK(run.old->steps() == 8);
  for (const auto& p : run.old->frozen()->parameters()) CHECK_FALSE(p.requires_grad());
}

TEST_CASE("Snapshot every global batch is Recompute, bit for bit", "[train][old_policy]") {
  psft::OldPolicyOptions snapshot = options_for(psft::OldPolicyStrategy::Snapshot);
  snapshot.snapshot_interval = Run::kMiniBatches;
  Run a(snapshot);
  Run b(options_for(psft::OldPolicyStrategy::Recompute));
  for (int s = 0; s < 3 * Run::kMiniBatches; ++s) {
    const Run::StepResult x = a.step();
    const Run::StepResult y = b.step();
    CHECK(x.loss == y.loss);
    CHECK(x.ratio_max == y.ratio_max);
  }
}

TEST_CASE("Ema: the copy follows old = decay * old + (1 - decay) * live", "[train][old_policy]") {
  psft::OldPolicyOptions o = options_for(psft::OldPolicyStrategy::Ema);  // decay 0.75
  torch::manual_seed(3);
  TinyLM net(kVocab, kDim, torch::kDouble);
  psft::OldPolicy<TinyLM> old(net, o, score);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.5));
  std::vector<Tensor> by_hand;
  for (const auto& p : net->parameters()) by_hand.push_back(p.detach().clone());
  const psft::TokenBatch mb = make_batch(5);
  old.begin_global_batch({mb, mb});
  for (int s = 0; s < 5; ++s) {
    const psft::TokenLogprobs now = score(net, mb);
    sgd.zero_grad();
    psft::sft_loss(now.logp, mb.labels != -100).loss.backward();
    sgd.step();
    old.after_optimizer_step();
    const auto live = net->parameters();
    const auto frozen = old.frozen()->parameters();
    REQUIRE(frozen.size() == by_hand.size());
    for (std::size_t k = 0; k < by_hand.size(); ++k) {
      by_hand[k] = 0.75 * by_hand[k] + 0.25 * live[k].detach();
      CHECK(torch::allclose(frozen[k], by_hand[k], 1e-14, 1e-15));
      CHECK_FALSE(frozen[k].requires_grad());
    }
  }
  // The old log-probs are the frozen copy's, in the model's float64.
  const Tensor old_logp = old.old_logp(1, mb);
  torch::NoGradGuard no_grad;
  TinyLM frozen = old.frozen();
  CHECK(bitwise_equal(old_logp, score(frozen, mb).logp));
  CHECK(old_logp.scalar_type() == torch::kDouble);
}

// ---------------------------------------------------------------------------
// OldPolicy: resume

TEST_CASE("OldPolicy: a resumed run reproduces the uninterrupted one bit for bit",
          "[train][old_policy][resume]") {
  constexpr std::int64_t kTotal = 12;
  for (const auto strategy : {psft::OldPolicyStrategy::Recompute, psft::OldPolicyStrategy::Snapshot,
                              psft::OldPolicyStrategy::Ema}) {
    // 6: mid global batch (the cache of mini-batches 2 and 3 must come back);
    // 8: at a global batch boundary.
    for (const std::int64_t stop : {std::int64_t(6), std::int64_t(8)}) {
      DYNAMIC_SECTION(name_of(strategy) << ", stop after " << stop) {
        const psft::OldPolicyOptions o = options_for(strategy);
        std::vector<Run::StepResult> straight;
        Run reference(o);
        for (std::int64_t s = 0; s < kTotal; ++s) straight.push_back(reference.step());

        const std::string path = std::string("psft_test_train_resume_") + name_of(strategy) + ".pt";
        std::vector<Run::StepResult> resumed;
        {
          Run first(o);
          for (std::int64_t s = 0; s < stop; ++s) resumed.push_back(first.step());
          first.save(path);
        }
        Run second(o, /*seed=*/99);  // other initial weights: load must replace them
        second.load(path);
        std::remove(path.c_str());
        CHECK(second.position == stop);
        CHECK(second.old->steps() == stop);
        for (std::int64_t s = stop; s < kTotal; ++s) resumed.push_back(second.step());

        REQUIRE(resumed.size() == straight.size());
        double clipped = 0;
        for (std::size_t s = 0; s < straight.size(); ++s) {
          INFO("step " << s);
          CHECK(resumed[s].loss == straight[s].loss);
          CHECK(resumed[s].ratio_max == straight[s].ratio_max);
          clipped += straight[s].clip_frac;
        }
        // The trust region engaged, so the old policy mattered to the losses.
        CHECK(clipped > 0);
        // The weights at the end are identical too.
        const auto a = reference.net->parameters();
        const auto b = second.net->parameters();
        for (std::size_t k = 0; k < a.size(); ++k) CHECK(torch::equal(a[k], b[k]));
      }
    }
  }
}

TEST_CASE("OldPolicy: a run resumed inside the warm-up's last global batch reproduces it",
          "[train][old_policy][resume][warmup]") {
  // Warm-up steps 0..5 with the passes skipped: stop 2 is inside the all-SFT
  // global batch 0, stop 5 inside global batch 1 before its last SFT step,
  // stop 6 just before its first PSFT step.
  constexpr std::int64_t kTotal = 12;
  const auto make = [](std::uint64_t seed) {
    Run run(psft::OldPolicyOptions{}, seed);
    run.warmup = psft::SftWarmupSchedule{6};
    run.skip_warmup_passes = true;
    return run;
  };
  std::vector<Run::StepResult> straight;
  Run reference = make(0);
  for (std::int64_t s = 0; s < kTotal; ++s) straight.push_back(reference.step());
  for (const std::int64_t stop : {std::int64_t(2), std::int64_t(5), std::int64_t(6)}) {
    DYNAMIC_SECTION("stop after " << stop) {
      const std::string path = "psft_test_train_resume_warmup.pt";
      std::vector<Run::StepResult> resumed;
      {
        Run first = make(0);
        for (std::int64_t s = 0; s < stop; ++s) resumed.push_back(first.step());
        first.save(path);
      }
      Run second = make(99);
      second.load(path);
      std::remove(path.c_str());
      if (stop >= 4) {  // inside global batch 1: which mini-batches need old log-probs came back
        CHECK_FALSE(second.old->needs_old(1));
        CHECK(second.old->needs_old(2));
      }
      for (std::int64_t s = stop; s < kTotal; ++s) resumed.push_back(second.step());
      for (std::size_t s = 0; s < straight.size(); ++s) {
        INFO("step " << s);
        CHECK(resumed[s].loss == straight[s].loss);
        CHECK(resumed[s].ratio_max == straight[s].ratio_max);
      }
      // The resumed run did not begin the interrupted global batch again:
      // its passes are global batch 1's two (if it began it) and global
      // batch 2's three.
      CHECK(no_grad_passes(second.net) == (stop < 4 ? 5 : 3));
    }
  }
}

TEST_CASE("OldPolicy: torch::save and torch::load round-trip the state", "[train][old_policy]") {
  Run run(options_for(psft::OldPolicyStrategy::Recompute));
  for (int s = 0; s < 2; ++s) run.step();
  const std::string path = "psft_test_train_roundtrip.pt";
  torch::save(*run.old, path);
  Run other(options_for(psft::OldPolicyStrategy::Recompute));
  torch::load(*other.old, path);
  std::remove(path.c_str());
  CHECK(other.old->steps() == 2);
  CHECK(other.old->global_batches() == 1);
  CHECK(other.old->mini_batch_count() == Run::kMiniBatches);
  CHECK(other.old->steps_in_global_batch() == 2);
  const auto batches = make_global_batch(0, Run::kMiniBatches);
  for (std::int64_t i = 1; i < Run::kMiniBatches; ++i) {
    CHECK(bitwise_equal(other.old->old_logp(i, batches[static_cast<std::size_t>(i)]),
                        run.old->old_logp(i, batches[static_cast<std::size_t>(i)])));
  }
}

TEST_CASE("OldPolicy: bad input errors name the argument", "[train][old_policy][errors]") {
  torch::manual_seed(0);
  TinyLM net(kVocab, kDim, torch::kFloat);
  psft::OldPolicyOptions bad_interval;
  bad_interval.snapshot_interval = 0;
  CHECK_THAT(error_of([&] { psft::OldPolicy<TinyLM>(net, bad_interval, score); }),
             Catch::Contains("snapshot_interval"));
  psft::OldPolicyOptions bad_decay;
  bad_decay.ema_decay = 1.5;
  CHECK_THAT(error_of([&] { psft::OldPolicy<TinyLM>(net, bad_decay, score); }),
             Catch::Contains("ema_decay"));
  psft::OldPolicyOptions bad_strategy;  // e.g. cast from a config integer
  bad_strategy.strategy = static_cast<psft::OldPolicyStrategy>(3);
  CHECK_THAT(error_of([&] { psft::OldPolicy<TinyLM>(net, bad_strategy, score); }),
             Catch::Contains("options.strategy"));
  CHECK_THAT(error_of([&] { psft::OldPolicy<TinyLM>(net, {}, nullptr); }),
             Catch::Contains("scorer"));
  CHECK_THAT(error_of([&] { psft::OldPolicy<TinyLM>(TinyLM(nullptr), {}, score); }),
             Catch::Contains("live"));

  psft::OldPolicy<TinyLM> old(net, {}, score);
  const psft::TokenBatch mb = make_batch(1);
  CHECK_THAT(error_of([&] { old.old_logp(0, mb); }), Catch::Contains("begin_global_batch"));
  CHECK_THAT(error_of([&] { old.begin_global_batch({}); }), Catch::Contains("mini_batches"));
  old.begin_global_batch({mb, mb});
  CHECK_THAT(error_of([&] { old.old_logp(2, mb); }), Catch::Contains("index"));
  CHECK_THAT(error_of([&] { old.old_logp(-1, mb); }), Catch::Contains("index"));
  CHECK_THAT(error_of([&] {
               old.old_logp(1, mb, torch::zeros({2, 2}));
             }),
             Catch::Contains("current.logp"));
  CHECK_THAT(error_of([&] { old.frozen(); }), Catch::Contains("Recompute"));
  old.after_optimizer_step();  // mini-batch 0 was never asked for: it is gone
  CHECK_THAT(error_of([&] { old.old_logp(0, mb); }), Catch::Contains("reuse_first_forward"));

  torch::serialize::OutputArchive archive;
  old.save(archive);
  const std::string path = "psft_test_train_errors.pt";
  archive.save_to(path);
  torch::serialize::InputArchive in;
  in.load_from(path);
  std::remove(path.c_str());
  psft::OldPolicy<TinyLM> ema(net, options_for(psft::OldPolicyStrategy::Ema), score);
  CHECK_THAT(error_of([&] { ema.load(in); }),
             Catch::Contains("Recompute") && Catch::Contains("Ema"));
}

// Snapshot and Ema clone the module: with a module that is not a
// torch::nn::Cloneable the ordinary constructor does not compile (a compile
// failure cannot be a run-time test, so its absence is asserted here), and
// the Recompute-only constructor works with any module.
static_assert(psft::is_cloneable_module_v<TinyLM>, "TinyLM derives from Cloneable");
static_assert(!psft::is_cloneable_module_v<PlainLM>, "PlainLM does not");
static_assert(std::is_constructible_v<psft::OldPolicy<TinyLM>, TinyLM, psft::OldPolicyOptions,
                                      psft::OldPolicy<TinyLM>::Scorer>,
              "every strategy for a Cloneable module");
static_assert(!std::is_constructible_v<psft::OldPolicy<PlainLM>, PlainLM, psft::OldPolicyOptions,
                                       psft::OldPolicy<PlainLM>::Scorer>,
              "no Snapshot or Ema for a module that cannot be cloned");
static_assert(std::is_constructible_v<psft::OldPolicy<PlainLM>, psft::RecomputeOnly, PlainLM,
                                      psft::OldPolicyOptions, psft::OldPolicy<PlainLM>::Scorer>,
              "Recompute works for any module");
static_assert(std::is_constructible_v<psft::OldPolicy<TinyLM>, psft::RecomputeOnly, TinyLM,
                                      psft::OldPolicyOptions, psft::OldPolicy<TinyLM>::Scorer>,
              "and for a Cloneable one");

TEST_CASE("OldPolicy: a module that is not Cloneable recomputes (psft::recompute_only)",
          "[train][old_policy]") {
  torch::manual_seed(5);
  PlainLM net;
  psft::OldPolicy<PlainLM> old(psft::recompute_only, net, {}, score_plain);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.5));
  const std::vector<psft::TokenBatch> batches = {make_batch(1), make_batch(2)};
  Tensor initial;
  {
    torch::NoGradGuard no_grad;
    initial = score_plain(net, batches[1]).logp.clone();
  }
  old.begin_global_batch(batches);
  for (std::int64_t i = 0; i < 2; ++i) {
    const psft::TokenBatch& mb = batches[static_cast<std::size_t>(i)];
    const psft::TokenLogprobs now = score_plain(net, mb);
    const Tensor old_logp = old.old_logp(i, mb, now.logp);
    if (i == 0) CHECK(torch::equal(old_logp, now.logp.detach()));
    if (i == 1) CHECK(bitwise_equal(old_logp, initial));
    sgd.zero_grad();
    psft::psft_loss(now.logp, old_logp, mb.labels != -100).loss.backward();
    sgd.step();
    old.after_optimizer_step();
  }
  CHECK(old.steps() == 2);
  psft::OldPolicyOptions snapshot;
  snapshot.strategy = psft::OldPolicyStrategy::Snapshot;
  CHECK_THAT(
      error_of([&] { psft::OldPolicy<PlainLM>(psft::recompute_only, net, snapshot, score_plain); }),
      Catch::Contains("options.strategy") && Catch::Contains("Snapshot"));
  torch::manual_seed(0);
  TinyLM tiny(kVocab, kDim, torch::kFloat);
  CHECK_THAT(error_of([&] {
               psft::OldPolicy<TinyLM>(psft::recompute_only, tiny,
                                       options_for(psft::OldPolicyStrategy::Ema), score);
             }),
             Catch::Contains("options.strategy") && Catch::Contains("Ema"));
  psft::OldPolicy<TinyLM> tiny_old(psft::recompute_only, tiny, {}, score);
  CHECK_THAT(error_of([&] { tiny_old.frozen(); }), Catch::Contains("Recompute"));
}

// ---------------------------------------------------------------------------
// Schedules and recipe

TEST_CASE("SftWarmupSchedule: N SFT steps, then PSFT", "[train][schedule]") {
  const psft::SftWarmupSchedule none{0};
  CHECK(none.objective_at(0) == psft::TrainingObjective::Psft);
  const psft::SftWarmupSchedule three{3};
  for (std::int64_t s = 0; s < 3; ++s) CHECK(three.objective_at(s) == psft::TrainingObjective::Sft);
  CHECK(three.in_warmup(2));
  CHECK_FALSE(three.in_warmup(3));
  CHECK(three.objective_at(3) == psft::TrainingObjective::Psft);
  CHECK(three.objective_at(1000) == psft::TrainingObjective::Psft);
  CHECK_THAT(error_of([&] { three.objective_at(-1); }), Catch::Contains("step"));
  const psft::SftWarmupSchedule negative{-2};
  CHECK_THAT(error_of([&] { negative.objective_at(0); }), Catch::Contains("sft_steps"));
}

TEST_CASE("LinearLrWarmup: linear ramp over W steps, then constant", "[train][schedule]") {
  psft::LinearLrWarmup w;
  w.base_lr = 8e-3;
  w.warmup_steps = 4;
  CHECK(w.lr_at(0) == 8e-3 * 0.25);
  CHECK(w.lr_at(1) == 8e-3 * 0.5);
  CHECK(w.lr_at(2) == 8e-3 * 0.75);
  CHECK(w.lr_at(3) == 8e-3);
  CHECK(w.lr_at(50) == 8e-3);
  w.start_at_zero = true;  // Hugging Face / verl's ramp
  CHECK(w.lr_at(0) == 0.0);
  CHECK(w.lr_at(1) == 8e-3 * 0.25);
  CHECK(w.lr_at(4) == 8e-3);
  w.warmup_steps = 0;
  CHECK(w.lr_at(0) == 8e-3);
  CHECK_THAT(error_of([&] { w.lr_at(-1); }), Catch::Contains("step"));
  w.warmup_steps = -1;
  CHECK_THAT(error_of([&] { w.lr_at(0); }), Catch::Contains("warmup_steps"));

  torch::manual_seed(0);
  TinyLM net(kVocab, kDim, torch::kFloat);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1.0));
  psft::set_learning_rate(adamw, 1.5e-4);
  for (auto& group : adamw.param_groups()) CHECK(group.options().get_lr() == 1.5e-4);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(1.0));
  psft::set_learning_rate(sgd, 2e-3);
  for (auto& group : sgd.param_groups()) CHECK(group.options().get_lr() == 2e-3);
  CHECK_THAT(error_of([&] { psft::set_learning_rate(sgd, -1.0); }), Catch::Contains("lr"));
}

TEST_CASE("PsftRecipe: the published defaults in one place", "[train][recipe]") {
  const psft::PsftRecipe r;
  CHECK(r.eps_low == 0.2);
  CHECK(r.eps_high == 0.28);
  CHECK(r.psft_lr == 1e-6);
  CHECK(r.sft_lr == 2e-5);
  CHECK(r.weight_decay == 0.1);
  CHECK(r.grad_clip == 1.0);
  CHECK(r.lr_warmup_steps == 10);
  CHECK(r.global_batch_size == 64);
  CHECK(r.mini_batches_per_global_batch == 8);
  CHECK(r.mini_batch_size() == 8);
  CHECK(r.reduction == psft::Reduction::TokenMean);
  const psft::LossOptions lo = r.loss_options();
  CHECK(lo.clip.eps_low == 0.2);
  CHECK(lo.clip.eps_high == 0.28);
  CHECK_FALSE(lo.clip.dual_clip.has_value());
  CHECK(lo.reduction == psft::Reduction::TokenMean);
  CHECK(r.learning_rate(psft::TrainingObjective::Psft) == 1e-6);
  CHECK(r.learning_rate(psft::TrainingObjective::Sft) == 2e-5);
  CHECK(r.lr_warmup(psft::TrainingObjective::Sft).lr_at(0) == 2e-5 / 10);
  const auto adamw = r.adamw_options(psft::TrainingObjective::Psft);
  CHECK(adamw.lr() == 1e-6);
  CHECK(adamw.weight_decay() == 0.1);
  psft::PsftRecipe odd;
  odd.global_batch_size = 60;
  CHECK_THAT(error_of([&] { odd.mini_batch_size(); }), Catch::Contains("global_batch_size"));
}

// ---------------------------------------------------------------------------
// SFT objectives

namespace {

struct SftCase {
  std::int64_t rows, cols;
  std::vector<double> logp, mask;
};

SftCase random_sft_case(std::uint32_t seed, std::int64_t rows, std::int64_t cols) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> lp(-6.0, -1e-3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  SftCase c{rows, cols, {}, {}};
  for (std::int64_t k = 0; k < rows * cols; ++k) {
    c.logp.push_back(lp(rng));
    c.mask.push_back(u(rng) < 0.3 ? 0.0 : (u(rng) < 0.5 ? 1.0 : 0.5 + u(rng)));
  }
  // Row 0 fully masked: an empty sequence, which the reductions skip.
  for (std::int64_t j = 0; j < cols; ++j) c.mask[static_cast<std::size_t>(j)] = 0.0;
  return c;
}

double magnitude(const std::vector<double>& logp, const std::vector<double>& mask) {
  double m = 0;
  for (std::size_t k = 0; k < logp.size(); ++k) m += std::fabs(logp[k] * mask[k]);
  return m;
}

using test_support::kReductions;

}  // namespace

TEST_CASE("sft_loss: NLL and DFT match the double reference, every reduction and dtype",
          "[train][sft_loss]") {
  const SftCase c = random_sft_case(17, 5, 7);
  const Tensor logp64 = torch::tensor(c.logp, torch::kDouble).reshape({c.rows, c.cols});
  const Tensor mask64 = torch::tensor(c.mask, torch::kDouble).reshape({c.rows, c.cols});
  for (const auto variant : {psft::SftVariant::Nll, psft::SftVariant::Dft}) {
    for (const auto reduction : kReductions) {
      for (const bool with_normaliser : {false, true}) {
        for (const auto dtype : {torch::kDouble, torch::kFloat}) {
          psft::LossOptions o;
          o.reduction = reduction;
          if (with_normaliser) {
            psft::Normaliser n = psft::count_normaliser(mask64);
            n.tokens = *n.tokens + 3.0;
            n.sequences = *n.sequences + 2.0;
            n.world_size = 2;
            o.normaliser = n;
            o.norm_constant = 4.5;
          }
          DYNAMIC_SECTION("variant " << int(variant) << " reduction " << int(reduction)
                                     << " normaliser " << with_normaliser << " dtype " << dtype) {
            const Tensor logp = logp64.to(dtype).requires_grad_(true);
            // Reference on the inputs as psft sees them (after dtype rounding).
            const Tensor rounded = logp.detach().to(torch::kDouble).contiguous();
            const std::vector<double> lp(rounded.data_ptr<double>(),
                                         rounded.data_ptr<double>() + rounded.numel());
            const Tensor mask_rounded = mask64.to(dtype).to(torch::kDouble).contiguous();
            const std::vector<double> mask(mask_rounded.data_ptr<double>(),
                                           mask_rounded.data_ptr<double>() + mask_rounded.numel());
            const reference::SftResult ref =
                reference::sft_loss(std::size_t(c.rows), std::size_t(c.cols), lp, mask,
                                    variant == psft::SftVariant::Nll ? reference::SftKind::Nll
                                                                     : reference::SftKind::Dft,
                                    test_support::settings_for(o));
            const psft::SftLossResult r = psft::sft_loss(logp, mask64.to(dtype), variant, o);
            r.loss.backward();
            const double tol = dtype == torch::kDouble ? 1e-12 : 1e-5;
            CHECK(r.loss.scalar_type() == dtype);
            CHECK(std::fabs(r.loss.item<double>() - ref.loss) <=
                  tol * (magnitude(lp, mask) + 1e-30));
            const Tensor grad = logp.grad().to(torch::kDouble).contiguous();
            for (std::size_t k = 0; k < ref.grad.size(); ++k) {
              CHECK(std::fabs(grad.data_ptr<double>()[k] - ref.grad[k]) <=
                    tol * (std::fabs(ref.grad[k]) + 1e-3));
            }
            double tokens = 0;
            for (double w : mask) tokens += w;
            CHECK(std::fabs(r.token_count.item<double>() - tokens) <= 1e-12 * tokens);
          }
        }
      }
    }
  }
}

TEST_CASE("sft_loss: gradients agree with finite differences (DFT with p held fixed)",
          "[train][sft_loss]") {
  const SftCase c = random_sft_case(23, 3, 4);
  for (const auto variant : {psft::SftVariant::Nll, psft::SftVariant::Dft}) {
    for (const auto reduction : kReductions) {
      psft::LossOptions o;
      o.reduction = reduction;
      const Tensor logp =
          torch::tensor(c.logp, torch::kDouble).reshape({3, 4}).requires_grad_(true);
      const Tensor mask = torch::tensor(c.mask, torch::kDouble).reshape({3, 4});
      psft::sft_loss(logp, mask, variant, o).loss.backward();
      const Tensor grad = logp.grad().contiguous();
      const auto kind =
          variant == psft::SftVariant::Nll ? reference::SftKind::Nll : reference::SftKind::Dft;
      const reference::Settings s = test_support::settings_for(o);
      const double h = 1e-6;
      for (std::size_t k = 0; k < c.logp.size(); ++k) {
        std::vector<double> plus = c.logp, minus = c.logp;
        plus[k] += h;
        minus[k] -= h;
        // DFT's weight is a stop-gradient: finite differences keep it at the
        // unperturbed p, as autograd does.
        const double fd = (reference::sft_loss(3, 4, plus, c.mask, kind, s, &c.logp).loss -
                           reference::sft_loss(3, 4, minus, c.mask, kind, s, &c.logp).loss) /
                          (2 * h);
        const double g = grad.data_ptr<double>()[k];
        INFO("variant " << int(variant) << " reduction " << int(reduction) << " token " << k);
        if (c.mask[k] == 0) {
          CHECK(g == 0.0);
          CHECK(fd == 0.0);
        } else {
          CHECK(std::fabs(g - fd) <= 1e-6 * std::fabs(fd) + 1e-8);
        }
      }
    }
  }
}

TEST_CASE("sft_loss: DFT is the NLL weighted by sg(p); an empty batch gives 0 with zero gradient",
          "[train][sft_loss]") {
  // Per token, DFT's gradient is p times the NLL's.
  const Tensor logp = torch::tensor({-0.1, -1.0, -3.0, -0.5}, torch::kDouble).requires_grad_(true);
  psft::sft_loss(logp, Tensor(), psft::SftVariant::Dft).loss.backward();
  const Tensor dft_grad = logp.grad().clone();
  logp.grad().zero_();
  const psft::SftLossResult nll = psft::sft_loss(logp, Tensor(), psft::SftVariant::Nll);
  nll.loss.backward();
  CHECK(torch::allclose(dft_grad, logp.grad() * logp.detach().exp(), 1e-15, 0));
  CHECK(std::fabs(nll.loss.item<double>() - 1.15) <= 1e-15);
  CHECK(std::fabs(nll.nll_mean.item<double>() - 1.15) <= 1e-15);

  for (const auto reduction : kReductions) {
    psft::LossOptions o;
    o.reduction = reduction;
    const Tensor x = torch::full({2, 3}, -std::numeric_limits<double>::infinity(), torch::kDouble)
                         .requires_grad_(true);
    const psft::SftLossResult r =
        psft::sft_loss(x, torch::zeros({2, 3}, torch::kBool), psft::SftVariant::Dft, o);
    CHECK(r.loss.item<double>() == 0.0);
    CHECK(r.nll_mean.item<double>() == 0.0);
    CHECK(r.token_count.item<double>() == 0.0);
    r.loss.backward();
    CHECK(torch::equal(x.grad(), torch::zeros({2, 3}, torch::kDouble)));
  }
}

TEST_CASE("sft_loss_from_logits: the SFT loss of token_logprobs, masked by ignore_index",
          "[train][sft_loss]") {
  torch::manual_seed(4);
  const Tensor logits = torch::randn({2, 5, 9}, torch::kDouble).requires_grad_(true);
  Tensor labels = torch::randint(0, 9, {2, 5}, torch::kLong);
  labels.index_put_({0, 0}, -100);
  labels.index_put_({1, 3}, -100);
  for (const auto variant : {psft::SftVariant::Nll, psft::SftVariant::Dft}) {
    const psft::SftLogitsLossResult r = psft::sft_loss_from_logits(logits, labels, variant);
    // Composed by hand: log_softmax, gather, -sg(p)^k log p, token mean.
    const Tensor mask = labels != -100;
    const Tensor lp =
        torch::log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    const Tensor weight =
        variant == psft::SftVariant::Nll ? torch::ones_like(lp) : lp.detach().exp();
    const Tensor expected = -(weight * lp * mask).sum() / mask.sum();
    CHECK(std::fabs(r.loss.item<double>() - expected.item<double>()) <= 1e-12);
    const Tensor g = torch::autograd::grad({r.loss}, {logits})[0];
    const Tensor g_expected = torch::autograd::grad({expected}, {logits})[0];
    CHECK(torch::allclose(g, g_expected, 1e-10, 1e-12));
    CHECK(r.token_count.item<double>() == 8.0);
    const Tensor p = torch::softmax(logits, -1);
    const Tensor entropy = -(p * torch::log_softmax(logits, -1)).sum(-1);
    CHECK(std::fabs(r.entropy_mean.item<double>() - (entropy * mask).sum().item<double>() / 8.0) <=
          1e-12);
  }
}

TEST_CASE("sft_loss: bad input errors name the argument", "[train][sft_loss][errors]") {
  const Tensor logp = torch::full({2, 3}, -1.0);
  CHECK_THAT(error_of([&] { psft::sft_loss(Tensor(), Tensor()); }), Catch::Contains("logp"));
  CHECK_THAT(error_of([&] {
               psft::sft_loss(torch::zeros({2, 3}, torch::kLong), Tensor());
             }),
             Catch::Contains("logp"));
  CHECK_THAT(error_of([&] {
               psft::sft_loss(torch::zeros({2, 3, 4}), Tensor());
             }),
             Catch::Contains("logp"));
  CHECK_THAT(error_of([&] { psft::sft_loss(logp, torch::ones({3, 2})); }), Catch::Contains("mask"));
  // An integer mask is 0/1 (Hugging Face's attention_mask), read as bool;
  // any other integer is refused (Note [Mask argument]).
  CHECK(psft::sft_loss(logp, torch::ones({2, 3}, torch::kLong)).loss.item<double>() ==
        psft::sft_loss(logp, torch::ones({2, 3}, torch::kBool)).loss.item<double>());
  CHECK_THAT(error_of([&] {
               psft::sft_loss(logp, torch::full({2, 3}, 2, torch::kLong));
             }),
             Catch::Contains("mask"));
  CHECK_THAT(error_of([&] {
               psft::sft_loss(logp, torch::full({2, 3}, -1.0));
             }),
             Catch::Contains("mask"));
  CHECK_THAT(error_of([&] { psft::sft_loss(logp, Tensor(), static_cast<psft::SftVariant>(7)); }),
             Catch::Contains("variant"));
  psft::LossOptions seq;
  seq.reduction = psft::Reduction::SeqMeanTokenMean;
  CHECK_THAT(error_of([&] { psft::sft_loss(torch::full({4}, -1.0), Tensor(), {}, seq); }),
             Catch::Contains("SeqMeanTokenMean"));
  psft::LossOptions small;
  small.normaliser = psft::Normaliser{};
  small.normaliser->tokens = 2.0;
  CHECK_THAT(error_of([&] { psft::sft_loss(logp, Tensor(), {}, small); }),
             Catch::Contains("normaliser.tokens"));
  CHECK_THAT(error_of([&] {
               psft::sft_loss_from_logits(torch::zeros({2, 3, 4}), Tensor());
             }),
             Catch::Contains("labels"));
}
