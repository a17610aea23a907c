// Tests of psft/distributed: the data-parallel normaliser, vocabulary-parallel
// log-probabilities and loss, and globally reduced metrics.
//
// Every scenario below is written once against the injected AllReduce and
// run two ways:
//   * in one process, one thread per rank, with an in-process reducer
//     (ThreadGroup): always, in every build;
//   * one process per rank on c10d Gloo over loopback with a FileStore, the
//     test binary re-executing itself as the ranks (PSFT_TEST_GLOO), 2 and 3
//     ranks, bounded in time: children that do not finish are killed.
// Each rank compares its results with a single-process reference computed
// from the same seeded inputs (the full batch, the unsharded logits).
//
// Tolerances: float64 1e-12 relative (data parallel: the reference differs
// only in the order of the sums); vocabulary parallel float32 2e-6 relative
// to the largest magnitude of the compared values (logits up to |z| ~ 1e3
// give log-sum-exps ~1e3, whose float32 rounding is ~1e-4 absolute), float64
// 1e-12.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/version.h>

#include "psft/distributed/data_parallel.hpp"
#include "psft/distributed/metrics.hpp"
#include "psft/distributed/vocab_parallel.hpp"
#include "psft/psft.hpp"
#include "support/reductions.hpp"

#if PSFT_TEST_GLOO
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "psft/distributed/c10d.hpp"
#endif

#undef CHECK
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using at::Tensor;
using psft::distributed::AllReduce;
using psft::distributed::ReduceOp;

using test_support::kReductions;
using test_support::name_of;

// ---------------------------------------------------------------------------
// Checks that log and count instead of asserting, so that they run in the
// rank processes, where Catch2 is not running.

struct Checker {
  std::ostream& log;
  std::string rank;
  int failures = 0;

  void fail(const std::string& what) {
    ++failures;
    log << rank << " FAILED: " << what << "\n";
  }

  void that(bool ok, const std::string& what) {
    if (!ok) fail(what);
  }

  // |a - b| <= tol * max(1, max |b|) everywhere, both finite where b is.
  void close(const std::string& what, const Tensor& a, const Tensor& b, double tol) {
    if (!a.defined() || !b.defined() || a.sizes() != b.sizes()) {
      fail(what + ": shapes differ");
      return;
    }
    const Tensor x = a.detach().to(at::kDouble).cpu(), y = b.detach().to(at::kDouble).cpu();
    const Tensor finite = at::isfinite(y);
    if (!at::equal(at::isfinite(x), finite) ||
        !at::equal(at::where(finite, at::zeros_like(x), x),
                   at::where(finite, at::zeros_like(y), y))) {
      fail(what + ": non-finite entries differ");
      return;
    }
    const double diff =
        x.numel() == 0 ? 0.0
                       : at::where(finite, (x - y).abs(), at::zeros_like(x)).max().item<double>();
    const double scale = std::max(
        1.0,
        y.numel() == 0 ? 0.0 : at::where(finite, y.abs(), at::zeros_like(y)).max().item<double>());
    log << rank << " " << what << ": max|diff| = " << diff << " (scale " << scale << ")\n";
    if (!(diff <= tol * scale)) {
      std::ostringstream s;
      s << what << ": max|diff| " << diff << " > " << tol << " * " << scale;
      fail(s.str());
    }
  }

  // Float results: no further from the float64 reference `exact` than
  // `baseline` (the unsharded float result) is, up to a factor 2, plus
  // tol * scale.
  void as_accurate(const std::string& what, const Tensor& a, const Tensor& baseline,
                   const Tensor& exact, double tol) {
    const auto error = [&](const Tensor& t) {
      const Tensor d = (t.detach().to(at::kDouble) - exact.detach().to(at::kDouble)).abs();
      return d.numel() == 0 ? 0.0 : at::nan_to_num(d, 0.0, 0.0, 0.0).max().item<double>();
    };
    const double scale =
        std::max(1.0, exact.numel() == 0
                          ? 0.0
                          : at::nan_to_num(exact.detach().to(at::kDouble).abs(), 0.0, 0.0, 0.0)
                                .max()
                                .item<double>());
    const double sharded = error(a), unsharded = error(baseline);
    log << rank << " " << what << ": error " << sharded << " (unsharded " << unsharded << ", scale "
        << scale << ")\n";
    if (!(sharded <= 2 * unsharded + tol * scale)) {
      std::ostringstream s;
      s << what << ": error " << sharded << " > 2 * " << unsharded << " + " << tol << " * "
        << scale;
      fail(s.str());
    }
  }

  void all_finite(const std::string& what, const Tensor& a) {
    if (!a.defined() || !at::isfinite(a.detach()).all().item<bool>()) fail(what + " is not finite");
  }
};

// ---------------------------------------------------------------------------
// In-process reducer: one thread per rank. Bounded: a rank that waits more
// than 60 s throws instead of hanging.

class ThreadGroup {
 public:
  explicit ThreadGroup(int world) : world_(world), contributions_(world) {}

  // Reduces in rank order, so that the result does not depend on which rank
  // arrives first (as a deterministic collective).
  void all_reduce(int rank, Tensor& tensor, ReduceOp op) {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::int64_t generation = generation_;
    contributions_[rank] = tensor.clone();
    if (++arrived_ == world_) {
      Tensor acc = contributions_[0];
      for (int r = 1; r < world_; ++r) {
        TORCH_CHECK(contributions_[r].sizes() == acc.sizes(), "ThreadGroup: sizes differ");
        acc = op == ReduceOp::Sum ? acc + contributions_[r] : at::maximum(acc, contributions_[r]);
      }
      result_ = acc;
      arrived_ = 0;
      ++generation_;
      ready_.notify_all();
    } else if (!ready_.wait_for(lock, std::chrono::seconds(60),
                                [&] { return generation_ != generation; })) {
      TORCH_CHECK(false, "ThreadGroup: a rank did not reach the all-reduce within 60 s");
    }
    tensor.copy_(result_);
  }

  AllReduce callback(int rank) {
    return [this, rank](Tensor& t, ReduceOp op) { all_reduce(rank, t, op); };
  }

 private:
  int world_;
  std::vector<Tensor> contributions_;
  std::mutex mutex_;
  std::condition_variable ready_;
  int arrived_ = 0;
  std::int64_t generation_ = 0;
  Tensor result_;
};

at::Generator generator(std::uint64_t seed) { return at::detail::createCPUGenerator(seed); }

// ---------------------------------------------------------------------------
// Data parallel. A toy model logp = log sigmoid(x . theta) per token; every
// rank holds micro-batches of different sizes with uneven token counts.

struct MicroBatch {
  Tensor x;         // [B, T, F]
  Tensor old_logp;  // [B, T]
  Tensor adv;       // [B]
  Tensor mask;      // [B, T], float 0/1
};

constexpr std::int64_t kT = 7, kF = 4;

// empty_mode: 0 every rank has tokens; 1 the last rank's only micro-batch is
// fully masked; 2 the last rank has no micro-batch at all.
std::vector<std::vector<MicroBatch>> make_dp_data(int world, int empty_mode, const Tensor& theta0) {
  at::Generator gen = generator(1234 + world * 10 + empty_mode);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  std::vector<std::vector<MicroBatch>> data(world);
  for (int r = 0; r < world; ++r) {
    const bool empty = empty_mode != 0 && r == world - 1;
    std::vector<std::int64_t> sizes;
    if (empty) {
      if (empty_mode == 1) sizes = {2};
    } else {
      sizes = r % 2 == 0 ? std::vector<std::int64_t>{3, 1} : std::vector<std::int64_t>{2, 4, 1};
    }
    for (std::int64_t b : sizes) {
      MicroBatch mb;
      mb.x = at::randn({b, kT, kF}, gen, opt);
      mb.old_logp = at::log_sigmoid(at::matmul(mb.x, theta0)) + 0.3 * at::randn({b, kT}, gen, opt);
      mb.adv = at::randn({b}, gen, opt);
      // Prompt of random length, then a response of random length (0 to T).
      const Tensor start = at::randint(0, kT, {b, 1}, gen, opt.dtype(at::kLong));
      const Tensor length = at::randint(0, kT + 1, {b, 1}, gen, opt.dtype(at::kLong));
      const Tensor t = at::arange(kT, opt.dtype(at::kLong)).unsqueeze(0);
      mb.mask = at::logical_and(t >= start, t < start + length).to(at::kDouble);
      if (empty) mb.mask.zero_();
      data[r].push_back(mb);
    }
  }
  return data;
}

Tensor dp_logp(const MicroBatch& mb, const Tensor& theta) {
  return at::log_sigmoid(at::matmul(mb.x, theta));
}

MicroBatch concat(const std::vector<MicroBatch>& parts) {
  std::vector<Tensor> x, old, adv, mask;
  for (const MicroBatch& p : parts) {
    x.push_back(p.x);
    old.push_back(p.old_logp);
    adv.push_back(p.adv);
    mask.push_back(p.mask);
  }
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  MicroBatch all;
  all.x = parts.empty() ? at::zeros({0, kT, kF}, opt) : at::cat(x);
  all.old_logp = parts.empty() ? at::zeros({0, kT}, opt) : at::cat(old);
  all.adv = parts.empty() ? at::zeros({0}, opt) : at::cat(adv);
  all.mask = parts.empty() ? at::zeros({0, kT}, opt) : at::cat(mask);
  return all;
}

psft::LossOptions dp_options(psft::Reduction reduction) {
  psft::LossOptions opts;
  opts.reduction = reduction;
  opts.clip.dual_clip = 3.0;
  return opts;
}

void dp_scenario(Checker& check, int rank, int world, const AllReduce& all_reduce, int empty_mode) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const Tensor theta0 = at::randn({kF}, generator(99), opt);
  const auto data = make_dp_data(world, empty_mode, theta0);
  std::vector<MicroBatch> everything;
  for (const auto& rank_data : data)
    everything.insert(everything.end(), rank_data.begin(), rank_data.end());
  const MicroBatch full = concat(everything);
  const std::string tag = "dp(empty_mode " + std::to_string(empty_mode) + ")";

  std::vector<Tensor> masks;
  for (const MicroBatch& mb : data[rank]) masks.push_back(mb.mask);
  const psft::Normaliser global = psft::distributed::global_normaliser(masks, all_reduce, world);
  const psft::Normaliser expected = psft::count_normaliser(full.mask);
  check.that(global.tokens == expected.tokens && global.sequences == expected.sequences &&
                 global.world_size == world,
             tag + ": global_normaliser counts");
  // From counts this rank made itself (psft::count_normaliser).
  psft::Normaliser local_counts;
  for (const Tensor& mask : masks) local_counts += psft::count_normaliser(mask);
  const psft::Normaliser from_counts =
      psft::distributed::global_normaliser(local_counts, all_reduce, world);
  check.that(from_counts.tokens == expected.tokens && from_counts.sequences == expected.sequences &&
                 from_counts.world_size == world,
             tag + ": global_normaliser counts from a local Normaliser");

  for (psft::Reduction reduction : kReductions) {
    const std::string what = tag + " " + name_of(reduction);
    // Single process, full batch.
    const Tensor theta_ref = theta0.clone().requires_grad_(true);
    const psft::LossResult ref = psft::policy_loss(dp_logp(full, theta_ref), full.old_logp,
                                                   full.adv, full.mask, dp_options(reduction));
    ref.loss.backward();

    // This rank's micro-batches, then DDP's average emulated by an
    // all-reduce of the gradients divided by the world size.
    const Tensor theta = theta0.clone().requires_grad_(true);
    psft::LossOptions opts = dp_options(reduction);
    opts.normaliser = global;
    Tensor loss_sum = at::zeros({1}, opt);
    for (const MicroBatch& mb : data[rank]) {
      const psft::LossResult r =
          psft::policy_loss(dp_logp(mb, theta), mb.old_logp, mb.adv, mb.mask, opts);
      check.all_finite(what + " micro-batch loss", r.loss);
      loss_sum += r.loss.detach();
      r.loss.backward();
    }
    Tensor grad = theta.grad().defined() ? theta.grad().clone() : at::zeros_like(theta0);
    check.all_finite(what + " local gradient", grad);
    all_reduce(grad, ReduceOp::Sum);
    grad.div_(world);
    all_reduce(loss_sum, ReduceOp::Sum);
    check.close(what + " DDP-averaged gradient", grad, theta_ref.grad(), 1e-12);
    check.close(what + " loss (sum over ranks / world)", loss_sum.div(world).reshape({}), ref.loss,
                1e-12);
  }

  // Metrics of this rank's whole share, reduced globally.
  const MicroBatch local = concat(data[rank]);
  const psft::LossResult local_result =
      psft::policy_loss(dp_logp(local, theta0), local.old_logp, local.adv, local.mask,
                        dp_options(psft::Reduction::TokenMean));
  const psft::LossResult full_result =
      psft::policy_loss(dp_logp(full, theta0), full.old_logp, full.adv, full.mask,
                        dp_options(psft::Reduction::TokenMean));
  const psft::LossMetrics g = psft::distributed::reduce_metrics(local_result.metrics, all_reduce);
  const psft::LossMetrics& f = full_result.metrics;
  const std::pair<const char*, std::pair<Tensor, Tensor>> metrics[] = {
      {"clip_frac", {g.clip_frac, f.clip_frac}},
      {"clip_frac_dual", {g.clip_frac_dual, f.clip_frac_dual}},
      {"clip_frac_high", {g.clip_frac_high, f.clip_frac_high}},
      {"clip_frac_low", {g.clip_frac_low, f.clip_frac_low}},
      {"approx_kl_k1", {g.approx_kl_k1, f.approx_kl_k1}},
      {"approx_kl_k3", {g.approx_kl_k3, f.approx_kl_k3}},
      {"ratio_mean", {g.ratio_mean, f.ratio_mean}},
      {"ratio_min", {g.ratio_min, f.ratio_min}},
      {"ratio_max", {g.ratio_max, f.ratio_max}},
      {"token_count", {g.token_count, f.token_count}}};
  for (const auto& m : metrics) {
    check.close(tag + " global metric " + m.first, m.second.first, m.second.second.to(at::kDouble),
                1e-12);
  }
  // The same from the micro-batches' own metrics (none on an empty rank).
  std::vector<psft::LossMetrics> per_micro_batch;
  for (const MicroBatch& mb : data[rank]) {
    per_micro_batch.push_back(psft::policy_loss(dp_logp(mb, theta0), mb.old_logp, mb.adv, mb.mask,
                                                dp_options(psft::Reduction::TokenMean))
                                  .metrics);
  }
  const psft::LossMetrics h = psft::distributed::reduce_metrics(per_micro_batch, all_reduce);
  check.close(tag + " micro-batch metrics clip_frac", h.clip_frac, f.clip_frac.to(at::kDouble),
              1e-12);
  check.close(tag + " micro-batch metrics approx_kl_k3", h.approx_kl_k3,
              f.approx_kl_k3.to(at::kDouble), 1e-12);
  check.close(tag + " micro-batch metrics ratio_min", h.ratio_min, f.ratio_min.to(at::kDouble),
              1e-12);
  check.close(tag + " micro-batch metrics ratio_max", h.ratio_max, f.ratio_max.to(at::kDouble),
              1e-12);
  check.close(tag + " micro-batch metrics token_count", h.token_count,
              f.token_count.to(at::kDouble), 0.0);
  // Entropy-style sum / count means.
  const Tensor mean =
      psft::distributed::global_mean(local.mask.sum() * 2.0, local.mask.sum(), all_reduce);
  check.close(tag + " global_mean", mean,
              at::full({}, full.mask.sum().item<double>() > 0 ? 2.0 : 0.0, opt), 1e-15);
}

// ---------------------------------------------------------------------------
// Vocabulary parallel: every rank holds logits[..., begin:end) of the same
// tokens; V = 11 is divisible by neither 2 nor 3.

constexpr std::int64_t kVocab = 11;

struct VpCase {
  at::ScalarType dtype;
  double scale;        // logit magnitude
  double temperature;  // LogitsOptions::temperature
  psft::Backend backend;
  double tol;
};

void vp_case(Checker& check, int rank, int world, const AllReduce& all_reduce, const VpCase& c,
             std::int64_t batch, bool all_ignored) {
  std::ostringstream name;
  name << "vp(" << c10::toString(c.dtype) << ", scale " << c.scale << ", T " << c.temperature
       << ", " << psft::backend_name(c.backend) << ", B " << batch
       << (all_ignored ? ", all ignored" : "") << ")";
  const std::string tag = name.str();
  at::Generator gen = generator(777 + batch);
  const auto opt = at::TensorOptions().dtype(c.dtype);
  const std::int64_t T = 5;
  const Tensor full =
      (at::randn({batch, T, kVocab}, gen, opt.dtype(at::kDouble)) * c.scale).to(c.dtype);
  Tensor labels = at::randint(0, kVocab, {batch, T}, gen, opt.dtype(at::kLong));
  const Tensor ignored = at::rand({batch, T}, gen, opt.dtype(at::kDouble)) < 0.2;
  labels = at::where(ignored, at::full({}, -100, labels.options()), labels);
  if (batch > 1) labels[1].fill_(-100);  // a sequence without tokens
  if (all_ignored) labels.fill_(-100);

  psft::LogitsOptions lopts;
  lopts.temperature = c.temperature;
  lopts.entropy_grad = true;
  lopts.backend = c.backend;
  psft::LossOptions loss_opts;
  loss_opts.backend = c.backend == psft::Backend::FusedCpu ? psft::Backend::Auto : c.backend;

  Tensor old_logp;
  {
    at::NoGradGuard no_grad;
    old_logp = psft::token_logprobs(full, labels, lopts).logp;
    old_logp = old_logp + 0.2 * at::randn(old_logp.sizes(), gen, old_logp.options());
  }

  // Unsharded reference.
  const Tensor full_leaf = full.clone().requires_grad_(true);
  const psft::LogitsLossResult ref =
      psft::psft_loss_from_logits(full_leaf, labels, old_logp, loss_opts, lopts);
  (ref.loss - 0.05 * ref.entropy_mean).backward();

  // This rank's slice.
  const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
  const Tensor slice =
      full.narrow(-1, shard.begin, shard.end - shard.begin).clone().requires_grad_(true);
  const psft::LogitsLossResult r = psft::distributed::vocab_parallel_psft_loss_from_logits(
      slice, labels, old_logp, shard, all_reduce, loss_opts, lopts);
  (r.loss - 0.05 * r.entropy_mean).backward();

  const Tensor ref_grad = full_leaf.grad().narrow(-1, shard.begin, shard.end - shard.begin);
  check.close(tag + " token_count", r.metrics.token_count, ref.metrics.token_count, 0.0);
  if (c.dtype == at::kDouble) {
    check.close(tag + " logp", r.logp, ref.logp, c.tol);
    check.close(tag + " entropy", r.entropy, ref.entropy, c.tol);
    check.close(tag + " loss", r.loss, ref.loss, c.tol);
    check.close(tag + " entropy_mean", r.entropy_mean, ref.entropy_mean, c.tol);
    check.close(tag + " clip_frac_high", r.metrics.clip_frac_high, ref.metrics.clip_frac_high,
                c.tol);
    check.close(tag + " gradient of the slice", slice.grad(), ref_grad, c.tol);
  } else {
    // float: as close to the float64 computation on the same logits as the
    // unsharded float computation is.
    const Tensor exact_leaf = full.to(at::kDouble).requires_grad_(true);
    const psft::LogitsLossResult exact =
        psft::psft_loss_from_logits(exact_leaf, labels, old_logp.to(at::kDouble), loss_opts, lopts);
    (exact.loss - 0.05 * exact.entropy_mean).backward();
    check.as_accurate(tag + " logp", r.logp, ref.logp, exact.logp, c.tol);
    check.as_accurate(tag + " entropy", r.entropy, ref.entropy, exact.entropy, c.tol);
    check.as_accurate(tag + " loss", r.loss, ref.loss, exact.loss, c.tol);
    check.as_accurate(tag + " entropy_mean", r.entropy_mean, ref.entropy_mean, exact.entropy_mean,
                      c.tol);
    check.as_accurate(tag + " gradient of the slice", slice.grad(), ref_grad,
                      exact_leaf.grad().narrow(-1, shard.begin, shard.end - shard.begin), c.tol);
  }
  check.all_finite(tag + " gradient", slice.grad());

  // No-grad path (old log-probabilities) gives the same numbers as the
  // autograd path.
  {
    at::NoGradGuard no_grad;
    const psft::TokenLogprobs t =
        psft::distributed::vocab_parallel_token_logprobs(slice, labels, shard, all_reduce, lopts);
    check.that(at::equal(t.logp, r.logp.detach()) && at::equal(t.entropy, r.entropy.detach()),
               tag + " no-grad logp/entropy equal the autograd path bitwise");
  }
}

void vp_policy_case(Checker& check, int rank, int world, const AllReduce& all_reduce) {
  at::Generator gen = generator(4242);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const Tensor full = at::randn({4, 6, kVocab}, gen, opt) * 2.0;
  const Tensor labels = at::randint(0, kVocab, {4, 6}, gen, opt.dtype(at::kLong));
  const Tensor adv = at::randn({4}, gen, opt);
  const Tensor old_logp =
      psft::token_logprobs(full, labels).logp + 0.3 * at::randn({4, 6}, gen, opt);
  psft::LossOptions loss_opts;
  loss_opts.clip.dual_clip = 3.0;
  loss_opts.reduction = psft::Reduction::SeqMeanTokenMean;
  const Tensor full_leaf = full.clone().requires_grad_(true);
  const auto ref = psft::policy_loss_from_logits(full_leaf, labels, old_logp, adv, loss_opts);
  ref.loss.backward();
  const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
  const Tensor slice =
      full.narrow(-1, shard.begin, shard.end - shard.begin).clone().requires_grad_(true);
  const auto r = psft::distributed::vocab_parallel_policy_loss_from_logits(
      slice, labels, old_logp, adv, shard, all_reduce, loss_opts);
  r.loss.backward();
  check.close("vp policy loss", r.loss, ref.loss, 1e-12);
  check.close("vp policy clip_frac_dual", r.metrics.clip_frac_dual, ref.metrics.clip_frac_dual,
              1e-12);
  check.close("vp policy gradient of the slice", slice.grad(),
              full_leaf.grad().narrow(-1, shard.begin, shard.end - shard.begin), 1e-12);
}

// A bad label on one rank only: every rank must throw, none may hang.
void vp_error_case(Checker& check, int rank, int world, const AllReduce& all_reduce) {
  const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
  const Tensor slice = at::zeros({2, shard.end - shard.begin});
  Tensor labels = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  if (rank == 0) labels[1] = kVocab + 5;
  std::string message;
  try {
    psft::distributed::vocab_parallel_token_logprobs(slice, labels, shard, all_reduce);
  } catch (const c10::Error& e) {
    message = e.what();
  }
  const std::string expected = rank == 0 ? "outside [0, 11)" : "another rank";
  check.that(message.find(expected) != std::string::npos,
             "vp error: expected an error containing '" + expected + "', got '" + message + "'");
  // The group is still usable afterwards.
  Tensor t = at::ones({1});
  all_reduce(t, ReduceOp::Sum);
  check.that(t.item<float>() == static_cast<float>(world), "vp error: group usable afterwards");
}

// The LM head sharded by rows: each rank multiplies by its [V_r, H] slice;
// loss, metrics, logp, hidden's gradient and each slice's gradient against
// policy_loss_from_hidden on the whole head.
void vp_hidden_case(Checker& check, int rank, int world, const AllReduce& all_reduce,
                    at::ScalarType dtype, bool on_policy, double tol) {
  const std::string tag =
      std::string("vp from hidden (") + c10::toString(dtype) + (on_policy ? ", on-policy)" : ")");
  at::Generator gen = generator(9090);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const std::int64_t B = 3, T = 5, H = 4;
  const Tensor hidden = at::randn({B, T, H}, gen, opt).to(dtype);
  const Tensor weight = at::randn({kVocab, H}, gen, opt).to(dtype);
  const Tensor bias = at::randn({kVocab}, gen, opt).to(dtype);
  Tensor labels = at::randint(0, kVocab, {B, T}, gen, opt.dtype(at::kLong));
  labels =
      at::where(at::rand({B, T}, gen, opt) < 0.25, at::full({}, -100, labels.options()), labels);
  const Tensor adv = at::randn({B}, gen, opt);
  Tensor old_logp;
  if (!on_policy) old_logp = 0.3 * at::randn({B, T}, gen, opt.dtype(at::kFloat)) - 2.4;
  psft::LossOptions loss_opts;
  loss_opts.reduction = psft::Reduction::SeqMeanTokenMean;
  loss_opts.entropy_coeff = 0.02;
  psft::HiddenOptions ho;
  ho.chunk_tokens = 4;

  const Tensor h_ref = hidden.clone().requires_grad_(true);
  const Tensor w_ref = weight.clone().requires_grad_(true);
  ho.bias = bias.clone().requires_grad_(true);
  const psft::LogitsLossResult ref =
      psft::policy_loss_from_hidden(h_ref, w_ref, labels, old_logp, adv, loss_opts, ho);
  ref.loss.backward();
  const Tensor b_ref_grad = ho.bias.grad();

  const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
  const std::int64_t width = shard.end - shard.begin;
  const Tensor h = hidden.clone().requires_grad_(true);
  const Tensor w = weight.narrow(0, shard.begin, width).clone().requires_grad_(true);
  ho.bias = bias.narrow(0, shard.begin, width).clone().requires_grad_(true);
  const psft::LogitsLossResult r = psft::distributed::vocab_parallel_policy_loss_from_hidden(
      h, w, labels, old_logp, adv, shard, all_reduce, loss_opts, ho);
  r.loss.backward();
  check.close(tag + " loss", r.loss, ref.loss, tol);
  check.close(tag + " metrics", r.metrics.packed(), ref.metrics.packed(), tol);
  check.close(tag + " logp", r.logp, ref.logp, tol);
  check.close(tag + " entropy", r.entropy, ref.entropy, tol);
  check.close(tag + " gradient of hidden", h.grad(), h_ref.grad(), tol);
  check.close(tag + " gradient of the weight rows", w.grad(),
              w_ref.grad().narrow(0, shard.begin, width), tol);
  check.close(tag + " gradient of the bias rows", ho.bias.grad(),
              b_ref_grad.narrow(0, shard.begin, width), tol);

  // A weight slice of the wrong width on one rank: every rank raises.
  std::string message;
  try {
    const Tensor bad = rank == 0 ? weight : w;
    psft::HiddenOptions plain;
    psft::distributed::vocab_parallel_psft_loss_from_hidden(hidden, bad, labels, old_logp, shard,
                                                            all_reduce, {}, plain);
  } catch (const c10::Error& e) {
    message = e.what();
  }
  const std::string expected =
      rank == 0 && world > 1 ? "weight must be this rank's rows" : "another rank";
  if (world > 1) {
    check.that(message.find(expected) != std::string::npos,
               tag + ": expected an error containing '" + expected + "', got '" + message + "'");
  }
}

void vp_scenario(Checker& check, int rank, int world, const AllReduce& all_reduce) {
  const VpCase cases[] = {
      {at::kDouble, 3.0, 1.0, psft::Backend::FusedCpu, 1e-12},
      {at::kDouble, 3.0, 0.7, psft::Backend::Composed, 1e-12},
      {at::kFloat, 3.0, 1.0, psft::Backend::FusedCpu, 2e-6},
      {at::kFloat, 3.0, 1.0, psft::Backend::Composed, 2e-6},
      {at::kFloat, 1000.0, 0.7, psft::Backend::FusedCpu, 2e-6},
  };
  for (const VpCase& c : cases) vp_case(check, rank, world, all_reduce, c, 3, false);
  // Empty batches: no scored token, and no token at all.
  vp_case(check, rank, world, all_reduce, cases[2], 3, true);
  vp_case(check, rank, world, all_reduce, cases[2], 0, false);
  vp_policy_case(check, rank, world, all_reduce);
  vp_error_case(check, rank, world, all_reduce);
  vp_hidden_case(check, rank, world, all_reduce, at::kDouble, false, 1e-12);
  vp_hidden_case(check, rank, world, all_reduce, at::kFloat, true, 2e-5);
}

// Every scenario in one run, in the same order on every rank.
void all_scenarios(Checker& check, int rank, int world, const AllReduce& all_reduce) {
  for (int empty_mode = 0; empty_mode <= 2; ++empty_mode) {
    dp_scenario(check, rank, world, all_reduce, empty_mode);
  }
  vp_scenario(check, rank, world, all_reduce);
}

// Runs every scenario with `world` threads as ranks; returns the failures
// and appends every rank's log to `log`.
int run_in_threads(int world, std::string& log) {
  ThreadGroup group(world);
  std::vector<std::ostringstream> logs(world);
  std::vector<int> failures(world, 0);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      Checker check{logs[rank], "[rank " + std::to_string(rank) + "]"};
      try {
        all_scenarios(check, rank, world, group.callback(rank));
      } catch (const std::exception& e) {
        check.fail(std::string("exception: ") + e.what());
      }
      failures[rank] = check.failures;
    });
  }
  for (std::thread& t : threads) t.join();
  int total = 0;
  for (int rank = 0; rank < world; ++rank) {
    total += failures[rank];
    log += logs[rank].str();
  }
  return total;
}

#if PSFT_TEST_GLOO

// ---------------------------------------------------------------------------
// Gloo ranks: this binary re-executed with PSFT_TEST_DISTRIBUTED_WORKER set
// to "<rank> <world> <store file>".

constexpr const char* kWorkerVariable = "PSFT_TEST_DISTRIBUTED_WORKER";

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(const std::string& store_path, int rank,
                                                       int world) {
  auto store = c10::make_intrusive<c10d::FileStore>(store_path, world);
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
#if TORCH_VERSION_MAJOR >= 2
  // LibTorch 2: a ProcessGroup dispatches to per-device backends.
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  return group;
#else
  return gloo;
#endif
}

int run_worker(const char* spec) {
  int rank = -1, world = 0;
  char path[4096] = {0};
  if (std::sscanf(spec, "%d %d %4095s", &rank, &world, path) != 3) {
    std::fprintf(stderr, "bad %s: %s\n", kWorkerVariable, spec);
    return 2;
  }
  std::ostringstream log;
  Checker check{log, "[rank " + std::to_string(rank) + "]"};
  try {
    auto group = make_gloo_group(path, rank, world);
    const AllReduce all_reduce = psft::distributed::c10d_all_reduce(group);
    all_scenarios(check, rank, world, all_reduce);

    // The ProcessGroup overloads give what the callback ones give.
    const Tensor mask = at::ones({2, 3}) * (rank + 1);
    const psft::Normaliser n = psft::distributed::global_normaliser({mask}, group);
    check.that(n.world_size == world && *n.tokens == 3.0 * world * (world + 1) &&
                   *n.sequences == 2.0 * world,
               "c10d global_normaliser overload");
    const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
    const Tensor full = at::randn({4, kVocab}, generator(5));
    const Tensor labels = at::arange(4, at::TensorOptions().dtype(at::kLong)) * 3;
    const Tensor slice = full.narrow(-1, shard.begin, shard.end - shard.begin);
    const psft::TokenLogprobs t =
        psft::distributed::vocab_parallel_token_logprobs(slice, labels, shard, group);
    check.close("c10d vocab_parallel_token_logprobs overload", t.logp,
                psft::token_logprobs(full, labels).logp, 2e-6);
    const Tensor m = psft::distributed::global_mean(at::ones({}), at::ones({}), group);
    check.that(m.item<double>() == 1.0, "c10d global_mean overload");
    group.reset();
  } catch (const std::exception& e) {
    check.fail(std::string("exception: ") + e.what());
  }
  std::printf("%s", log.str().c_str());
  std::printf("%s: %d failure(s)\n", check.rank.c_str(), check.failures);
  return check.failures == 0 ? 0 : 1;
}

// Intercepts the re-executed binary before Catch2's main runs. LibTorch's
// own initialisers have run by then (shared libraries first).
const int worker_hook = [] {
  const char* spec = std::getenv(kWorkerVariable);
  if (spec == nullptr) return 0;
  const int code = run_worker(spec);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}();

struct RankRun {
  int exit_code = -1;  // -1: killed (timeout)
  std::string log;
};

// Starts `world` ranks of this binary on a fresh FileStore in a temporary
// directory, waits up to timeout, kills what is left, removes the directory.
std::vector<RankRun> run_gloo_ranks(int world, std::chrono::seconds timeout) {
  namespace fs = std::filesystem;
  std::string pattern = (fs::temp_directory_path() / "psft-distributed-XXXXXX").string();
  TORCH_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp failed");
  const fs::path dir = pattern;
  const std::string store = (dir / "store").string();

  std::vector<pid_t> pids;
  std::vector<std::string> log_paths;
  std::string worker_prefix(kWorkerVariable);  // "NAME="
  worker_prefix += '=';
  for (int rank = 0; rank < world; ++rank) {
    const std::string log_path = (dir / ("rank" + std::to_string(rank) + ".log")).string();
    log_paths.push_back(log_path);
    // Everything the child needs is prepared before fork.
    std::vector<std::string> env_storage;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::string(*e).rfind(worker_prefix, 0) != 0) env_storage.push_back(*e);
    }
    env_storage.push_back(worker_prefix + std::to_string(rank) + " " + std::to_string(world) + " " +
                          store);
    std::vector<char*> envp;
    for (std::string& s : env_storage) envp.push_back(s.data());
    envp.push_back(nullptr);
    char self[] = "/proc/self/exe";
    char* argv[] = {self, nullptr};
    const pid_t pid = ::fork();
    TORCH_CHECK(pid >= 0, "fork failed");
    if (pid == 0) {
      const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execve(self, argv, envp.data());
      ::_exit(127);
    }
    pids.push_back(pid);
  }

  std::vector<RankRun> runs(world);
  std::vector<bool> done(world, false);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int remaining = world;
  while (remaining > 0 && std::chrono::steady_clock::now() < deadline) {
    for (int rank = 0; rank < world; ++rank) {
      if (done[rank]) continue;
      int status = 0;
      if (::waitpid(pids[rank], &status, WNOHANG) == pids[rank]) {
        done[rank] = true;
        --remaining;
        runs[rank].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (int rank = 0; rank < world; ++rank) {
    if (done[rank]) continue;
    ::kill(pids[rank], SIGKILL);
    int status = 0;
    ::waitpid(pids[rank], &status, 0);
    runs[rank].exit_code = -1;
  }
  for (int rank = 0; rank < world; ++rank) {
    std::ifstream in(log_paths[rank]);
    std::stringstream text;
    text << in.rdbuf();
    runs[rank].log = text.str();
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  return runs;
}

#endif  // PSFT_TEST_GLOO

}  // namespace

TEST_CASE("VocabShard::even splits a vocabulary not divisible by the rank count", "[distributed]") {
  std::int64_t next = 0;
  for (int rank = 0; rank < 3; ++rank) {
    const auto s = psft::distributed::VocabShard::even(11, rank, 3);
    CHECK(s.begin == next);
    CHECK(s.end - s.begin == (rank < 2 ? 4 : 3));
    next = s.end;
  }
  CHECK(next == 11);
  CHECK_THROWS_WITH(psft::distributed::VocabShard::even(2, 0, 3),
                    Catch::Contains("vocab_size must be >= world_size"));
}

TEST_CASE("distributed helpers reject bad arguments", "[distributed]") {
  ThreadGroup one(1);
  CHECK_THROWS_WITH(psft::distributed::global_normaliser({at::ones({2, 3})}, AllReduce(), 1),
                    Catch::Contains("all_reduce is an empty callback"));
  CHECK_THROWS_WITH(psft::distributed::global_normaliser({at::ones({2, 3, 4})}, one.callback(0), 1),
                    Catch::Contains("masks[0] must have shape [B, T] or [N]"));
  psft::distributed::VocabShard shard{0, 4, 11};
  CHECK_THROWS_WITH(psft::distributed::vocab_parallel_token_logprobs(
                        at::zeros({2, 4}), at::zeros({2}, at::TensorOptions().dtype(at::kLong)),
                        shard, one.callback(0)),
                    Catch::Contains("slices add up to 4 entries, not vocab_size = 11"));
  CHECK_THROWS_WITH(psft::distributed::vocab_parallel_token_logprobs(
                        at::zeros({2, 5}), at::zeros({2}, at::TensorOptions().dtype(at::kLong)),
                        shard, one.callback(0)),
                    Catch::Contains("shard's width end - begin = 4"));
}

TEST_CASE("data and vocabulary parallel, ranks as threads with an in-process reducer",
          "[distributed]") {
  for (int world : {1, 2, 3}) {
    std::string log;
    const int failures = run_in_threads(world, log);
    INFO("world " << world << "\n" << log);
    CHECK(failures == 0);
  }
}

TEST_CASE("data and vocabulary parallel on c10d Gloo, one process per rank",
          "[distributed][gloo]") {
#if PSFT_TEST_GLOO
  for (int world : {2, 3}) {
    const auto runs = run_gloo_ranks(world, std::chrono::seconds(240));
    for (int rank = 0; rank < world; ++rank) {
      INFO("world " << world << ", rank " << rank << " (exit code " << runs[rank].exit_code
                    << ", -1 = killed after the timeout):\n"
                    << runs[rank].log);
      CHECK(runs[rank].exit_code == 0);
    }
  }
#else
  WARN("SKIPPED: the c10d Gloo multi-process tests are not built here: "
       << PSFT_TEST_GLOO_SKIP_REASON
       << ". The callback API was tested with the in-process reducer (other test cases).");
#endif
}
