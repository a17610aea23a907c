// Robustness of the public API: regressions of bad or edge inputs that once
// crashed, read out of bounds or returned NaN silently, the metric helpers
// (merge_metrics, metrics_log, nll_mean), and a bounded fuzz test of every
// public entry point ([fuzz]).
//
// The fuzz oracle: a call either raises a c10::Error whose message names an
// argument of that entry point, or returns finite results equal to an
// independent double reference on the same rounded inputs. Inputs that are
// valid by the documented contract must not raise. The run is seeded and
// bounded by time: PSFT_FUZZ_SECONDS (default 2) per entry point,
// PSFT_FUZZ_SEED (default 1); the sanitizer build runs each entry point for
// about a minute (tests/CMakeLists.txt). Tolerances as in test_policy_loss.cpp
// (float64 1e-12, float accumulation 1e-5; gradients in bf16 / fp16 to two
// units of their rounding).

#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "psft/eigen/policy_loss.hpp"
#include "psft/psft.hpp"
#include "reference/clipped_reference.hpp"
#include "reference/sft_reference.hpp"
#include "support/reference_adapter.hpp"

namespace {

using Catch::Contains;
using torch::Tensor;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

double scalar(const Tensor& t) { return t.detach().to(at::kDouble).item<double>(); }

std::vector<double> values(const Tensor& t) {
  const Tensor c = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// ---------------------------------------------------------------------------
// Regressions (issue: reliability and the first hour)
// ---------------------------------------------------------------------------

TEST_CASE("out-of-range labels with check_inputs off never leave the row", "[robustness][labels]") {
  psft::LogitsOptions unchecked;
  unchecked.check_inputs = false;
  for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
    unchecked.backend = backend;
    // A label of 2^40 once read 8 TB past the row (a segfault).
    const Tensor logits = torch::randn({2, 8});
    const Tensor far = torch::tensor(std::vector<std::int64_t>{0, std::int64_t(1) << 40});
    const psft::TokenLogprobs t = psft::token_logprobs(logits, far, unchecked);
    // The clamped entry: the last column.
    const Tensor want = torch::log_softmax(logits, 1);
    CHECK(scalar(t.logp[1]) == Approx(scalar(want[1][7])).epsilon(1e-6));
    CHECK(scalar(t.logp[0]) == Approx(scalar(want[0][0])).epsilon(1e-6));

    // A label of -7 once wrote row 1's label gradient into row 0.
    const Tensor x = torch::randn({2, 64}, torch::kDouble).requires_grad_(true);
    const Tensor labels = torch::tensor(std::vector<std::int64_t>{0, -7});
    psft::token_logprobs(x, labels, unchecked).logp.sum().backward();
    const Tensor p = torch::softmax(x.detach(), 1);
    Tensor expected = -p;
    expected[0][0] += 1.0;
    expected[1][0] += 1.0;  // the clamped entry of row 1 itself
    CHECK(torch::allclose(x.grad(), expected, 1e-12, 1e-12));
  }
  // Checked (the default), the same labels raise, naming them.
  CHECK_THROWS_WITH(
      psft::token_logprobs(torch::randn({2, 8}),
                           torch::tensor(std::vector<std::int64_t>{0, std::int64_t(1) << 40})),
      Contains("labels"));
}

TEST_CASE("the fused CPU kernel clamps and reports labels it is handed unchecked",
          "[robustness][labels]") {
  // The raw-pointer layer, below every entry check: no option reaches
  // memory outside a row even if a caller skips validation.
  const Tensor logits = torch::randn({3, 5});
  const std::int64_t labels[] = {-3, 2, 99};
  const psft::cpu::LogitsRows rows = psft::cpu::logits_rows(logits);
  std::vector<float> logp(3), entropy(3), stats(9);
  const psft::cpu::LogitsForwardStatus status = psft::cpu::token_logprobs_forward<float, float>(
      rows, labels, -100, 1.0f, logp.data(), entropy.data(), stats.data());
  CHECK(status.first_bad_label_row == 0);
  const Tensor want = torch::log_softmax(logits, 1);
  CHECK(logp[0] == Approx(scalar(want[0][0])).epsilon(1e-6));
  CHECK(logp[2] == Approx(scalar(want[2][4])).epsilon(1e-6));
  std::vector<float> grad(15, kNaN), g = {1, 1, 1};
  psft::cpu::token_logprobs_backward<float, float>(rows, labels, -100, 1.0f, stats.data(), g.data(),
                                                   nullptr, grad.data());
  for (float v : grad) CHECK(std::isfinite(v));
}

TEST_CASE("DFT with NaN logp at a masked token keeps that gradient at 0", "[robustness][sft]") {
  for (psft::SftVariant variant : {psft::SftVariant::Nll, psft::SftVariant::Dft}) {
    const Tensor logp = torch::tensor({{-0.5, kNaN, -1.0}}, torch::kDouble).requires_grad_(true);
    const Tensor mask = torch::tensor({{true, false, true}});
    const psft::SftLossResult r = psft::sft_loss(logp, mask, variant);
    r.loss.backward();
    CHECK(std::isfinite(scalar(r.loss)));
    CHECK(scalar(logp.grad()[0][1]) == 0.0);
    CHECK(std::isfinite(scalar(r.nll_mean)));
  }
}

TEST_CASE("NaN or Inf logp at an unmasked token raises in every loss entry point",
          "[robustness][finite]") {
  const Tensor mask = torch::tensor({{true, true, false}});
  const Tensor old_logp = torch::full({1, 3}, -1.0);
  for (double poison : {kNaN, kInf, -kInf}) {
    const Tensor logp = torch::tensor({{-1.0, poison, -1.0}});
    for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
      psft::LossOptions o;
      o.backend = backend;
      CHECK_THROWS_WITH(psft::psft_loss(logp, old_logp, mask, o), Contains("logp has NaN or Inf"));
      CHECK_THROWS_WITH(psft::policy_loss(logp, old_logp, torch::ones({1, 3}), mask, o),
                        Contains("logp has NaN or Inf"));
      // At a masked token it is never read.
      const Tensor masked = torch::tensor({{-1.0, -1.0, poison}});
      CHECK(std::isfinite(scalar(psft::psft_loss(masked, old_logp, mask, o).loss)));
      o.check_finite = false;
      CHECK_NOTHROW(psft::psft_loss(logp, old_logp, mask, o));
    }
    CHECK_THROWS_WITH(psft::sft_loss(logp, mask), Contains("logp has NaN or Inf"));
    // The Eigen API too.
    using Array = psft::eigen::TokenArray<double>;
    Array lp(1, 3), old(1, 3), m(1, 3);
    lp << -1.0, poison, -1.0;
    old << -1.0, -1.0, -1.0;
    m << 1.0, 1.0, 0.0;
    CHECK_THROWS_WITH(psft::eigen::psft_loss<double>(lp, old, m), Contains("logp has NaN or Inf"));
    m << 1.0, 0.0, 1.0;
    CHECK(std::isfinite(psft::eigen::psft_loss<double>(lp, old, m).loss));
  }
}

TEST_CASE("entropy_metrics rejects NaN, Inf and negative weights", "[robustness][entropy]") {
  const Tensor entropy = torch::ones({2, 2});
  for (double w : {kNaN, kInf, -1.0}) {
    const Tensor mask = torch::tensor({{1.0, w}, {1.0, 1.0}});
    CHECK_THROWS_WITH(psft::entropy_metrics(entropy, mask), Contains("mask"));
  }
}

TEST_CASE("out-of-range enum values are refused by every options struct", "[robustness][enums]") {
  const Tensor logp = torch::full({2, 3}, -1.0);
  psft::LossOptions bad_reduction;
  bad_reduction.reduction = static_cast<psft::Reduction>(7);
  CHECK_THROWS_WITH(psft::psft_loss(logp, logp, {}, bad_reduction), Contains("reduction"));
  CHECK_THROWS_WITH(psft::sft_loss(logp, {}, psft::SftVariant::Nll, bad_reduction),
                    Contains("reduction"));
  psft::LossOptions bad_backend;
  bad_backend.backend = static_cast<psft::Backend>(-1);
  CHECK_THROWS_WITH(psft::psft_loss(logp, logp, {}, bad_backend), Contains("backend"));
  psft::LogitsOptions bad_logits_backend;
  bad_logits_backend.backend = static_cast<psft::Backend>(9);
  CHECK_THROWS_WITH(
      psft::token_logprobs(torch::randn({2, 4}), torch::tensor(std::vector<std::int64_t>{0, 1}),
                           bad_logits_backend),
      Contains("backend"));
  CHECK_THROWS_WITH(psft::sft_loss(logp, {}, static_cast<psft::SftVariant>(5)),
                    Contains("variant"));
  psft::LossResult r = psft::psft_loss(logp, logp, {});
  CHECK_THROWS_WITH(psft::metrics_log(r, static_cast<psft::MetricNames>(3)), Contains("names"));
  CHECK_THROWS_WITH(
      psft::eigen::psft_loss<double>(psft::eigen::TokenArray<double>::Zero(1, 1),
                                     psft::eigen::TokenArray<double>::Zero(1, 1),
                                     psft::eigen::TokenArray<double>::Ones(1, 1), bad_reduction),
      Contains("reduction"));
}

TEST_CASE("a normaliser smaller than the batch's own counts raises on every CPU backend",
          "[robustness][normaliser]") {
  const Tensor logp = torch::full({2, 3}, -1.0);
  for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
    psft::LossOptions o;
    o.backend = backend;
    o.normaliser = psft::Normaliser{1.0, 2.0, 1};
    CHECK_THROWS_WITH(psft::psft_loss(logp, logp, {}, o), Contains("normaliser.tokens"));
    o.reduction = psft::Reduction::SeqMeanTokenSum;
    o.normaliser = psft::Normaliser{6.0, 1.0, 1};
    CHECK_THROWS_WITH(psft::psft_loss(logp, logp, {}, o), Contains("normaliser.sequences"));
    // Not a value check: check_finite does not turn it off on the CPU.
    o.check_finite = false;
    CHECK_THROWS_WITH(psft::psft_loss(logp, logp, {}, o), Contains("normaliser.sequences"));
  }
}

TEST_CASE("integer 0/1 masks are accepted everywhere, other integers refused",
          "[robustness][mask]") {
  const Tensor logp = torch::randn({2, 4}, torch::kDouble) - 2.0;
  const Tensor old_logp = logp + 0.1 * torch::randn({2, 4}, torch::kDouble);
  const Tensor bool_mask = torch::tensor({{1, 1, 0, 0}, {1, 1, 1, 0}}).to(torch::kBool);
  for (torch::ScalarType t : {torch::kLong, torch::kInt, torch::kByte}) {
    const Tensor int_mask = bool_mask.to(t);
    CHECK(scalar(psft::psft_loss(logp, old_logp, int_mask).loss) ==
          scalar(psft::psft_loss(logp, old_logp, bool_mask).loss));
    CHECK(scalar(psft::sft_loss(logp, int_mask).loss) ==
          scalar(psft::sft_loss(logp, bool_mask).loss));
    CHECK(scalar(psft::entropy_metrics(-logp, int_mask).mean) ==
          scalar(psft::entropy_metrics(-logp, bool_mask).mean));
    CHECK(psft::count_normaliser(int_mask).tokens == psft::count_normaliser(bool_mask).tokens);
    const Tensor two = int_mask * 2;
    CHECK_THROWS_WITH(psft::psft_loss(logp, old_logp, two), Contains("mask") && Contains("0 or 1"));
    CHECK_THROWS_WITH(psft::sft_loss(logp, two), Contains("mask"));
    CHECK_THROWS_WITH(psft::entropy_metrics(-logp, two), Contains("mask"));
    CHECK_THROWS_WITH(psft::count_normaliser(two), Contains("mask"));
  }
}

TEST_CASE("merge_metrics equals one call over the concatenated micro-batches",
          "[robustness][metrics]") {
  torch::manual_seed(3);
  const Tensor logp = torch::randn({6, 5}, torch::kDouble) - 1.0;
  const Tensor old_logp = logp + 0.4 * torch::randn({6, 5}, torch::kDouble);
  const Tensor adv = torch::randn({6, 1}, torch::kDouble);
  Tensor mask = torch::rand({6, 5}) > 0.3;
  mask[2].fill_(false);  // an empty row, and below an empty micro-batch
  mask[3].fill_(false);
  psft::LossOptions o;
  o.clip.dual_clip = 3.0;
  const psft::LossResult whole = psft::policy_loss(logp, old_logp, adv, mask, o);
  std::vector<psft::LossMetrics> parts;
  for (std::int64_t b : {0, 2, 4}) {
    parts.push_back(psft::policy_loss(logp.narrow(0, b, 2), old_logp.narrow(0, b, 2),
                                      adv.narrow(0, b, 2), mask.narrow(0, b, 2), o)
                        .metrics);
  }
  const psft::LossMetrics merged = psft::merge_metrics(parts);
  const std::vector<double> a = values(merged.packed()), b = values(whole.metrics.packed());
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(b[i]).epsilon(1e-12));
  // Nothing at all: neutral values.
  const psft::LossMetrics none = psft::merge_metrics({parts[1], parts[1]});
  CHECK(scalar(none.token_count) == 0);
  CHECK(scalar(none.ratio_min) == 1);
  CHECK(scalar(none.ratio_max) == 1);
  CHECK(scalar(none.clip_frac) == 0);
  CHECK_THROWS_WITH(psft::merge_metrics({}), Contains("parts"));
}

TEST_CASE("metrics_log reads every metric once, under psft's, verl's and TRL's names",
          "[robustness][metrics]") {
  const Tensor logits = torch::randn({2, 3, 7});
  const Tensor labels = torch::tensor({{1, 2, -100}, {4, -100, -100}});
  const Tensor old_logp = psft::token_logprobs(logits, labels).logp + 0.3;
  const psft::LogitsLossResult r = psft::psft_loss_from_logits(logits, labels, old_logp);
  const auto find = [](const psft::MetricLog& log, const std::string& name) {
    for (const auto& e : log)
      if (e.first == name) return e.second;
    FAIL("no metric " << name);
    return kNaN;
  };
  const psft::MetricLog mine = psft::metrics_log(r);
  const psft::MetricLog verl = psft::metrics_log(r, psft::MetricNames::Verl);
  const psft::MetricLog trl = psft::metrics_log(r, psft::MetricNames::Trl);
  REQUIRE(mine.size() == 13);
  CHECK(verl.size() == mine.size());
  CHECK(find(mine, "loss") == scalar(r.loss));
  CHECK(find(verl, "actor/pg_loss") == scalar(r.loss));
  CHECK(find(verl, "actor/pg_clipfrac") == scalar(r.metrics.clip_frac));
  CHECK(find(verl, "actor/ppo_kl") == scalar(r.metrics.approx_kl_k1));
  CHECK(find(verl, "actor/entropy") == scalar(r.entropy_mean));
  CHECK(find(verl, "psft/nll_mean") == scalar(r.nll_mean));
  CHECK(find(trl, "clip_ratio/high_mean") == scalar(r.metrics.clip_frac_high));
  CHECK(find(trl, "entropy") == scalar(r.entropy_mean));
  // nll_mean is the mean of -logp over scored tokens, float64 like the SFT result's.
  const Tensor scored = labels != -100;
  CHECK(find(mine, "nll_mean") ==
        Approx(-(r.logp.to(torch::kDouble) * scored).sum().item<double>() / 3).epsilon(1e-12));
  CHECK(r.nll_mean.scalar_type() == torch::kDouble);
  const psft::SftLogitsLossResult s = psft::sft_loss_from_logits(logits, labels);
  CHECK(s.entropy_mean.scalar_type() == r.entropy_mean.scalar_type());
  CHECK(s.nll_mean.scalar_type() == r.nll_mean.scalar_type());
  CHECK(scalar(s.nll_mean) ==
        Approx(-(r.logp.to(torch::kDouble) * scored).sum().item<double>() / 3));
  CHECK(psft::metrics_log(s).size() == 4);
}

// ---------------------------------------------------------------------------
// Fuzz
// ---------------------------------------------------------------------------

double fuzz_seconds() {
  const char* s = std::getenv("PSFT_FUZZ_SECONDS");
  return s ? std::atof(s) : 2.0;
}

std::uint64_t fuzz_seed() {
  const char* s = std::getenv("PSFT_FUZZ_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 1;
}

/// Random inputs and options, seeded.
struct Gen {
  std::mt19937_64 rng;
  explicit Gen(std::uint64_t seed) : rng(seed) {}

  int pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); }
  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }
  double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }

  torch::ScalarType float_dtype() {
    const torch::ScalarType t[] = {torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf};
    return t[pick(4)];
  }

  /// A tensor of `sizes` holding `values`-like data in dtype, laid out as a
  /// contiguous tensor, a transposed view, a step-2 slice, an expanded
  /// (stride 0) view or an overlapping as_strided view.
  Tensor layout(const Tensor& dense) {
    const int kind = pick(5);
    if (dense.dim() != 2 || dense.numel() == 0 || kind == 0) return dense.contiguous();
    const std::int64_t b = dense.size(0), t = dense.size(1);
    switch (kind) {
      case 1:
        return dense.t().contiguous().t();
      case 2: {
        Tensor wide = torch::zeros({b, 2 * t}, dense.options());
        wide.slice(1, 0, 2 * t, 2).copy_(dense);
        return wide.slice(1, 0, 2 * t, 2);
      }
      case 3:
        return dense[0].unsqueeze(0).expand({b, t});
      default:
        // Rows overlap: row i starts one element after row i - 1.
        return dense.flatten()
            .narrow(0, 0, std::min<std::int64_t>(dense.numel(), t + b - 1))
            .as_strided({b, t}, {1, 1});
    }
  }

  /// Per-token values, sometimes with a NaN or Inf.
  Tensor tokens(const std::vector<std::int64_t>& sizes, double lo, double hi, torch::ScalarType t,
                double poison_chance) {
    Tensor x = torch::empty(sizes, torch::kDouble).uniform_(lo, hi);
    if (x.numel() > 0 && chance(poison_chance)) {
      const double p[] = {kNaN, kInf, -kInf};
      x.view({-1})[pick(static_cast<int>(x.numel()))] = p[pick(3)];
    }
    return layout(x.to(t));
  }

  /// A mask: undefined, bool, float weights (sometimes bad), integer (sometimes not 0/1).
  Tensor mask(const std::vector<std::int64_t>& sizes) {
    const Tensor keep = torch::rand(sizes, torch::kDouble) < uniform(0, 1);
    switch (pick(5)) {
      case 0:
        return Tensor();
      case 1:
        return layout(keep);
      case 2: {
        Tensor w = keep.to(torch::kDouble) * torch::rand(sizes, torch::kDouble) * 2;
        if (w.numel() > 0 && chance(0.2)) {
          const double p[] = {kNaN, kInf, -0.5};
          w.view({-1})[pick(static_cast<int>(w.numel()))] = p[pick(3)];
        }
        return layout(w.to(chance(0.5) ? torch::kFloat : float_dtype()));
      }
      case 3: {
        Tensor m = keep.to(torch::kLong);
        if (m.numel() > 0 && chance(0.2)) m.view({-1})[pick(static_cast<int>(m.numel()))] = 2;
        return layout(m);
      }
      default:
        return layout(keep.to(torch::kInt));
    }
  }

  psft::LossOptions loss_options(int dim) {
    psft::LossOptions o;
    o.clip.eps_low = chance(0.05) ? -0.1 : uniform(0, 0.5);
    o.clip.eps_high = chance(0.05) ? kNaN : uniform(0, 0.5);
    if (chance(0.4)) o.clip.dual_clip = chance(0.05) ? 0.5 : uniform(1.5, 10);
    if (chance(0.1)) o.clip.log_ratio_clamp = chance(0.3) ? -1.0 : uniform(1, 30);
    o.reduction = static_cast<psft::Reduction>(chance(0.03) ? 4 + pick(3) : pick(4));
    if (dim == 1 && chance(0.8)) o.reduction = psft::Reduction::TokenMean;
    if (chance(0.2)) o.norm_constant = chance(0.1) ? -1.0 : uniform(0.5, 20);
    if (chance(0.3)) {
      psft::Normaliser n;
      if (chance(0.8)) n.tokens = uniform(-1, 60);
      if (chance(0.8)) n.sequences = uniform(-1, 8);
      n.world_size = chance(0.05) ? 0 : 1 + pick(3);
      o.normaliser = n;
    }
    o.check_finite = chance(0.85);
    const psft::Backend b[] = {psft::Backend::Auto, psft::Backend::FusedCpu,
                               psft::Backend::Composed, psft::Backend::FusedCuda};
    o.backend = chance(0.02) ? static_cast<psft::Backend>(9) : b[pick(chance(0.05) ? 4 : 3)];
    return o;
  }
};

/// The mask as the reference reads it: token weights (0 = ignored).
std::vector<double> weights_of(const Tensor& mask, std::int64_t n) {
  if (!mask.defined()) return std::vector<double>(static_cast<std::size_t>(n), 1.0);
  return values(mask);
}

/// Whether mask is an acceptable mask argument whatever the value checks:
/// bool, floating, or integer with values 0 and 1 only (Note [Mask argument]).
bool mask_type_ok(const Tensor& mask) {
  if (!mask.defined() || mask.is_floating_point()) return true;
  const Tensor m = mask.to(torch::kDouble);
  return (m.eq(0) | m.eq(1)).all().item<bool>();
}

/// mask_type_ok, and floating weights finite and >= 0 (what check_finite checks).
bool valid_mask(const Tensor& mask) {
  if (!mask_type_ok(mask)) return false;
  if (!mask.defined() || !mask.is_floating_point()) return true;
  const Tensor m = mask.to(torch::kDouble);
  return m.isfinite().all().item<bool>() && (m >= 0).all().item<bool>();
}

/// Every value finite where the mask's weight is nonzero.
bool finite_where_counted(const Tensor& x, const Tensor& mask) {
  const std::vector<double> v = values(x), w = weights_of(mask, x.numel());
  for (std::size_t i = 0; i < v.size(); ++i)
    if (w[i] != 0 && !std::isfinite(v[i])) return false;
  return true;
}

/// Whether the error names one of the entry point's arguments.
bool names_an_argument(const std::string& what, const std::vector<std::string>& arguments) {
  for (const std::string& a : arguments)
    if (what.find(a) != std::string::npos) return true;
  return false;
}

const std::vector<std::string> kLossArguments = {
    "logp",          "old_logp",   "advantages", "mask",      "clip.", "reduction",
    "norm_constant", "normaliser", "backend",    "FusedCuda", "CUDA"};

/// Runs `body` with fresh seeds for the time budget; returns the iterations.
std::int64_t fuzz_for_budget(const std::function<void(Gen&)>& body) {
  const auto start = std::chrono::steady_clock::now();
  const double budget = fuzz_seconds();
  std::int64_t i = 0;
  const std::uint64_t seed = fuzz_seed();
  do {
    Gen g(seed * 1000003u + static_cast<std::uint64_t>(i));
    INFO("fuzz seed " << seed << " iteration " << i);
    body(g);
    ++i;
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() <
           budget);
  return i;
}

double tol_for(torch::ScalarType t) { return t == torch::kDouble ? 1e-12 : 1e-5; }
double grad_tol_for(torch::ScalarType t) {
  return t == torch::kDouble ? 1e-12 : t == torch::kFloat ? 1e-5 : t == torch::kHalf ? 1e-3 : 8e-3;
}

/// policy_loss / psft_loss against reference::clipped_loss.
void fuzz_clipped_loss(Gen& g, bool with_advantages) {
  const int dim = g.chance(0.2) ? 1 : 2;
  const std::int64_t b = g.pick(4), t = g.pick(7);
  const std::vector<std::int64_t> sizes =
      dim == 2 ? std::vector<std::int64_t>{b, t} : std::vector<std::int64_t>{b * t};
  const torch::ScalarType dt = g.float_dtype();
  const double spread = dt == torch::kHalf ? 8.0 : 30.0;
  Tensor logp = g.tokens(sizes, -6, 0, dt, 0.0);
  Tensor old_logp = (logp.to(torch::kDouble) + torch::empty(sizes, torch::kDouble).uniform_(-1, 1) *
                                                   (g.chance(0.2) ? spread : 0.5))
                        .to(g.chance(0.7) ? torch::kFloat : g.float_dtype());
  // NaN / Inf placed in logp and old_logp independently.
  old_logp = old_logp.contiguous();
  const double poisons[] = {kNaN, kInf, -kInf};
  if (old_logp.numel() > 0 && g.chance(0.1))
    old_logp.view({-1})[g.pick(static_cast<int>(old_logp.numel()))] = poisons[g.pick(3)];
  logp = logp.contiguous();
  if (logp.numel() > 0 && g.chance(0.1))
    logp.view({-1})[g.pick(static_cast<int>(logp.numel()))] = poisons[g.pick(3)];
  logp = g.layout(logp);
  Tensor adv;
  if (with_advantages) {
    switch (g.pick(3)) {
      case 0:
        adv = g.tokens(sizes, -2, 2, g.float_dtype(), 0.05);
        break;
      case 1:
        adv = torch::randn({dim == 2 ? b : 1}, torch::kDouble).to(g.float_dtype());
        if (dim == 1) adv = adv.reshape({});
        break;
      default:
        adv = torch::randn({}, torch::kDouble);
    }
  }
  const Tensor mask = g.mask(sizes);
  const psft::LossOptions o = g.loss_options(dim);
  logp = logp.detach().requires_grad_(g.chance(0.8));

  std::optional<psft::LossResult> r;
  std::string error;
  try {
    r = with_advantages ? psft::policy_loss(logp, old_logp, adv, mask, o)
                        : psft::psft_loss(logp, old_logp, mask, o);
    if (logp.requires_grad()) r->loss.backward();
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }

  // What the contract says must succeed.
  const Tensor adv_full = !adv.defined() ? torch::ones(sizes, torch::kDouble)
                          : adv.dim() == 1 && dim == 2
                              ? adv.to(torch::kDouble).unsqueeze(1).expand(sizes)
                              : adv.to(torch::kDouble).expand(sizes);
  const bool options_ok = psft::core::loss_options_error(o, dim).empty();
  const bool backend_ok = o.backend != psft::Backend::FusedCuda;
  const bool finite_ok = !o.check_finite || (finite_where_counted(logp, mask) &&
                                             finite_where_counted(old_logp, mask) &&
                                             finite_where_counted(adv_full, mask));
  const bool mask_ok = valid_mask(mask);
  std::vector<double> w = weights_of(mask, logp.numel());
  // The normaliser must count at least the batch itself.
  double tokens = 0, sequences = 0;
  const std::int64_t rows = dim == 2 ? b : 1, cols = dim == 2 ? t : b * t;
  for (std::int64_t i = 0; i < rows; ++i) {
    double row = 0;
    for (std::int64_t j = 0; j < cols; ++j) row += w[i * cols + j] != 0 ? w[i * cols + j] : 0;
    tokens += row;
    sequences += row > 0;
  }
  const bool normaliser_ok =
      !mask_ok || !o.normaliser ||
      ((!o.normaliser->tokens || *o.normaliser->tokens >= tokens * (1 - 1e-9)) &&
       (!o.normaliser->sequences || *o.normaliser->sequences >= sequences));
  const bool must_succeed = options_ok && backend_ok && finite_ok &&
                            (mask_ok || (!o.check_finite && mask_type_ok(mask) && !o.normaliser)) &&
                            normaliser_ok;
  INFO("dtype " << dt << ", sizes " << logp.sizes() << ", error: " << error);
  if (!error.empty()) {
    CHECK(names_an_argument(error, kLossArguments));
    CHECK_FALSE(must_succeed);
    return;
  }
  // What the contract says must raise: bad options or mask types always,
  // non-finite values and bad weights under check_finite.
  const bool values_ok = finite_where_counted(logp, mask) && finite_where_counted(old_logp, mask) &&
                         finite_where_counted(adv_full, mask) && mask_ok;
  CHECK((options_ok && backend_ok && mask_type_ok(mask)));
  CHECK((values_ok || !o.check_finite));
  if (!must_succeed || !mask_ok) return;  // unchecked NaN: the caller opted out of the check
  // A finite result equal to the reference on the same rounded inputs.
  const bool all_finite = finite_where_counted(logp, mask) &&
                          finite_where_counted(old_logp, mask) &&
                          finite_where_counted(adv_full, mask);
  if (!all_finite) return;
  const reference::Result want = reference::clipped_loss(
      static_cast<std::size_t>(rows), static_cast<std::size_t>(cols), values(logp),
      values(old_logp), values(adv_full), w, test_support::settings_for(o));
  const double got = scalar(r->loss);
  REQUIRE(std::isfinite(got));
  const double tol = tol_for(psft::detail::accumulate_type(dt));
  CHECK(std::fabs(got - want.loss) <= tol * (want.loss_magnitude + 1e-300) + 1e-300);
  // Weights are read in the accumulation dtype.
  CHECK(scalar(r->metrics.token_count) == Approx(want.metrics.token_count).epsilon(tol));
  // A token whose log-ratio or ratio lies within the accumulation dtype's
  // rounding of a bound (the clamp, a clip bound, delta, the dual-clip cap)
  // may fall on the other side of it in float than in double: its clip
  // decision, and so its gradient entry and its share of the clip
  // fractions, are not comparable. Such tokens are rare (about 1 in 10^6)
  // and left out.
  const std::vector<double> lp = values(logp), old = values(old_logp), a = values(adv_full);
  const double window = psft::detail::accumulate_type(dt) == torch::kDouble ? 1e-12 : 1e-5;
  const auto near = [&](double x, double bound) {
    return std::fabs(x - bound) <= window * (1.0 + std::fabs(bound));
  };
  std::vector<char> ambiguous(lp.size(), 0);
  double ambiguous_weight = 0;
  for (std::size_t i = 0; i < lp.size(); ++i) {
    if (w[i] == 0) continue;
    const double d = lp[i] - old[i];
    const double bound = o.clip.log_ratio_clamp;
    const double r = std::exp(std::max(-bound, std::min(bound, d)));
    bool amb = near(std::fabs(d), bound) || near(r, 1 - o.clip.eps_low) ||
               near(r, 1 + o.clip.eps_high) || (o.clip.delta && near(r, *o.clip.delta));
    if (o.clip.dual_clip && a[i] < 0) amb = amb || near(r, *o.clip.dual_clip);
    ambiguous[i] = amb;
    if (amb) ambiguous_weight += w[i];
  }
  const double frac_slack =
      want.metrics.token_count > 0 ? ambiguous_weight / want.metrics.token_count : 0.0;
  CHECK(std::fabs(scalar(r->metrics.clip_frac) - want.metrics.clip_frac) <= 1e-6 + frac_slack);
  if (logp.requires_grad() && logp.grad().defined()) {
    const std::vector<double> grad = values(logp.grad());
    double scale = 0;
    for (double x : want.grad) scale = std::max(scale, std::fabs(x));
    // Expanded and overlapping views share elements: autograd sums their gradients.
    if (logp.numel() > 0 && logp.is_non_overlapping_and_dense()) {
      for (std::size_t i = 0; i < grad.size(); ++i) {
        CHECK(std::isfinite(grad[i]));
        if (ambiguous[i]) continue;
        CHECK(std::fabs(grad[i] - want.grad[i]) <= grad_tol_for(dt) * scale + 1e-7);
      }
    }
  }
}

TEST_CASE("fuzz: policy_loss", "[fuzz][fuzz_policy_loss]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_clipped_loss(g, true); });
  WARN("policy_loss: " << n << " cases");
}

TEST_CASE("fuzz: psft_loss", "[fuzz][fuzz_psft_loss]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_clipped_loss(g, false); });
  WARN("psft_loss: " << n << " cases");
}

TEST_CASE("fuzz: sft_loss", "[fuzz][fuzz_sft_loss]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) {
    const std::int64_t b = g.pick(4), t = g.pick(7);
    const std::vector<std::int64_t> sizes{b, t};
    const torch::ScalarType dt = g.float_dtype();
    const Tensor logp = g.tokens(sizes, -6, 0, dt, 0.15).detach().requires_grad_(true);
    const Tensor mask = g.mask(sizes);
    psft::LossOptions o = g.loss_options(2);
    o.backend = psft::Backend::Auto;
    o.clip = {};  // not used by the SFT objectives (but validated)
    const psft::SftVariant variant =
        static_cast<psft::SftVariant>(g.chance(0.03) ? 2 + g.pick(3) : g.pick(2));
    std::string error;
    std::optional<psft::SftLossResult> r;
    try {
      r = psft::sft_loss(logp, mask, variant, o);
      r->loss.backward();
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
    const bool options_ok = psft::core::loss_options_error(o, 2).empty() &&
                            (variant == psft::SftVariant::Nll || variant == psft::SftVariant::Dft);
    const bool mask_ok = valid_mask(mask);
    const bool finite = finite_where_counted(logp, mask);
    INFO("error: " << error);
    if (!error.empty()) {
      CHECK(names_an_argument(error, {"logp", "mask", "variant", "reduction", "norm_constant",
                                      "normaliser", "backend"}));
      CHECK_FALSE((options_ok && mask_ok && (finite || !o.check_finite) && !o.normaliser));
      return;
    }
    CHECK((options_ok && mask_type_ok(mask)));
    CHECK(((finite && mask_ok) || !o.check_finite));
    if (!finite || !mask_ok) return;
    // Finite loss and gradient, masked tokens' gradients exactly 0.
    CHECK(std::isfinite(scalar(r->loss)));
    const std::vector<double> w = weights_of(mask, logp.numel());
    const std::vector<double> grad = values(logp.grad());
    if (logp.is_non_overlapping_and_dense()) {
      for (std::size_t i = 0; i < grad.size(); ++i) {
        CHECK(std::isfinite(grad[i]));
        if (w[i] == 0) CHECK(grad[i] == 0);
      }
    }
  });
  WARN("sft_loss: " << n << " cases");
}

/// token_logprobs and the from-logits losses against log_softmax in double.
void fuzz_logits(Gen& g, int entry) {
  const bool three_d = g.chance(0.5);
  const std::int64_t b = g.pick(3), t = g.pick(4), v = g.chance(0.05) ? 0 : 1 + g.pick(40);
  const std::vector<std::int64_t> sizes =
      three_d ? std::vector<std::int64_t>{b, t, v} : std::vector<std::int64_t>{b * t, v};
  const torch::ScalarType dt = g.float_dtype();
  Tensor dense = torch::randn(sizes, torch::kDouble) * g.uniform(0.1, 8);
  if (dense.numel() > 0 && g.chance(0.1)) {
    const double p[] = {kNaN, kInf, -kInf};
    dense.view({-1})[g.pick(static_cast<int>(dense.numel()))] = p[g.pick(3)];
  }
  Tensor logits = dense.to(dt);
  if (g.chance(0.3) && v > 0) logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2);
  if (g.chance(0.2) && b > 0 && three_d) logits = logits.narrow(0, 0, 1).expand(sizes);
  const std::vector<std::int64_t> label_sizes(sizes.begin(), sizes.end() - 1);
  Tensor labels = torch::randint(0, std::max<std::int64_t>(v, 1), label_sizes, torch::kLong);
  labels =
      torch::where(torch::rand(label_sizes) < 0.3, torch::full({}, -100, torch::kLong), labels);
  if (labels.numel() > 0 && g.chance(0.1)) {
    const std::int64_t bad[] = {-1, v, std::int64_t(1) << 40, -(std::int64_t(1) << 40)};
    labels.view({-1})[g.pick(static_cast<int>(labels.numel()))] = bad[g.pick(4)];
  }
  psft::LogitsOptions lo;
  lo.temperature = g.chance(0.05) ? 0.0 : g.uniform(0.5, 2);
  lo.entropy_grad = g.chance(0.3);
  lo.check_inputs = g.chance(0.85);
  const psft::Backend backends[] = {psft::Backend::Auto, psft::Backend::FusedCpu,
                                    psft::Backend::Composed};
  lo.backend = g.chance(0.02) ? static_cast<psft::Backend>(7) : backends[g.pick(3)];
  logits = logits.detach().requires_grad_(g.chance(0.8));
  const Tensor leaf = logits;

  std::string error;
  std::optional<psft::TokenLogprobs> tl;
  Tensor loss;
  const Tensor old_logp = torch::randn(label_sizes) - 2.0;
  psft::LossOptions o;  // valid defaults; the per-token losses are fuzzed above
  try {
    if (entry == 0) {
      tl = psft::token_logprobs(logits, labels, lo);
      loss = lo.entropy_grad ? tl->logp.sum() + 0.1 * tl->entropy.sum() : tl->logp.sum();
    } else if (entry == 1) {
      // Half the cases with advantages (policy_loss_from_logits): one per
      // sequence of [B, T] labels, one per token of [N] labels.
      const psft::LogitsLossResult r =
          g.chance(0.5) ? psft::psft_loss_from_logits(logits, labels, old_logp, o, lo)
                        : psft::policy_loss_from_logits(
                              logits, labels, old_logp,
                              torch::randn({three_d ? b : b * t}, torch::kDouble), o, lo);
      tl = psft::TokenLogprobs{r.logp, r.entropy, r.backend};
      loss = r.loss;
      CHECK(std::isfinite(scalar(r.nll_mean)) == std::isfinite(scalar(r.loss)));
    } else {
      const psft::SftLogitsLossResult r =
          psft::sft_loss_from_logits(logits, labels, psft::SftVariant::Nll, o, lo);
      tl = psft::TokenLogprobs{r.logp, r.entropy, psft::Backend::Auto};
      loss = r.loss;
    }
    if (logits.requires_grad()) loss.backward();
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  const Tensor scored = labels != -100;
  const Tensor labels_in_range = (labels >= 0) & (labels < v);
  const bool labels_ok = (scored.logical_not() | labels_in_range).all().item<bool>();
  // The rows as the call saw them (an expanded view repeats batch 0).
  const Tensor rows =
      logits.detach().to(torch::kDouble).reshape({-1, std::max<std::int64_t>(v, 1)});
  const Tensor scored_flat = scored.reshape({-1});
  bool rows_ok = true;
  for (std::int64_t i = 0; i < scored_flat.numel() && v > 0; ++i) {
    if (!scored_flat[i].item<bool>()) continue;
    const Tensor row = rows[i];
    if (row.isnan().any().item<bool>() || row.eq(kInf).any().item<bool>() ||
        row.eq(-kInf).all().item<bool>())
      rows_ok = false;
  }
  const bool options_ok = psft::core::logits_options_error(lo).empty();
  if (!options_ok || v == 0) {
    CHECK(names_an_argument(error, {"logits", "temperature", "backend"}));
    return;
  }
  // log p and entropy by log_softmax in double on the same rounded logits.
  const Tensor z = logits.detach().to(torch::kDouble).reshape({-1, v}) / lo.temperature;
  const Tensor logq = torch::log_softmax(z, 1);
  const Tensor flat_labels = labels.reshape({-1});
  const Tensor zero = torch::zeros({}, torch::kDouble);
  const Tensor want_logp = torch::where(
      scored_flat, logq.gather(1, flat_labels.clamp(0, v - 1).unsqueeze(1)).squeeze(1), zero);
  const bool logp_finite = want_logp.isfinite().all().item<bool>();
  // The losses check their logp (LossOptions::check_finite): a label whose
  // logit is -inf has logp = -inf, which token_logprobs returns as is.
  const bool must_succeed = (!lo.check_inputs || (labels_ok && rows_ok)) &&
                            (entry == 0 || (labels_ok && rows_ok && logp_finite));
  INFO("dtype " << dt << ", sizes " << logits.sizes() << ", error: " << error);
  if (!error.empty()) {
    CHECK(names_an_argument(
        error, {"logits", "labels", "logp", "temperature", "backend", "ignore_index"}));
    CHECK_FALSE(must_succeed);
    return;
  }
  CHECK(((labels_ok && rows_ok) || !lo.check_inputs));
  if (entry != 0) CHECK(logp_finite);  // the loss checks its logp
  if (!labels_ok || !rows_ok) return;  // unchecked bad input: clamped / NaN, but no crash
  const Tensor ent =
      -(logq.exp() * torch::where(logq.isfinite(), logq, torch::zeros({}, torch::kDouble))).sum(1);
  const Tensor want_entropy = torch::where(scored_flat, ent, torch::zeros({}, torch::kDouble));
  const double tol = dt == torch::kDouble ? 1e-10 : 1e-4;
  const Tensor got_logp = tl->logp.detach().to(torch::kDouble).reshape({-1});
  const Tensor finite_label = want_logp.isfinite();
  CHECK(torch::allclose(torch::where(finite_label, got_logp, torch::zeros({}, torch::kDouble)),
                        torch::where(finite_label, want_logp, torch::zeros({}, torch::kDouble)),
                        tol, tol));
  CHECK(torch::allclose(tl->entropy.detach().to(torch::kDouble).reshape({-1}), want_entropy, tol,
                        tol * std::max<std::int64_t>(v, 1)));
  if (leaf.requires_grad() && leaf.grad().defined() && entry == 0 && !lo.entropy_grad &&
      finite_label.all().item<bool>()) {
    // d sum(logp) / d z = onehot - p on scored rows.
    const Tensor p = logq.exp();
    const Tensor onehot =
        torch::zeros_like(p).scatter_(1, flat_labels.clamp(0, v - 1).unsqueeze(1), 1.0);
    Tensor want_grad =
        torch::where(scored_flat.unsqueeze(1), onehot - p, torch::zeros({}, torch::kDouble)) *
        (1.0 / lo.temperature);
    if (leaf.is_non_overlapping_and_dense()) {
      const Tensor got = leaf.grad().to(torch::kDouble).reshape({-1, v});
      CHECK(got.isfinite().all().item<bool>());
      CHECK(torch::allclose(got, want_grad, 0, grad_tol_for(dt) * 4 + 1e-9));
    }
  }
}

TEST_CASE("fuzz: token_logprobs", "[fuzz][fuzz_token_logprobs]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_logits(g, 0); });
  WARN("token_logprobs: " << n << " cases");
}

TEST_CASE("fuzz: psft_loss_from_logits and policy_loss_from_logits",
          "[fuzz][fuzz_psft_loss_from_logits]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_logits(g, 1); });
  WARN("psft_loss_from_logits: " << n << " cases");
}

TEST_CASE("fuzz: sft_loss_from_logits", "[fuzz][fuzz_sft_loss_from_logits]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_logits(g, 2); });
  WARN("sft_loss_from_logits: " << n << " cases");
}

/// token_logprobs_from_hidden, psft_loss_from_hidden / policy_loss_from_hidden
/// and sft_loss_from_hidden on random shapes, dtypes, layouts, chunk sizes,
/// labels and poisoned inputs: a c10::Error naming an argument, or logp
/// within the dtype's tolerance of log_softmax in double of the logits
/// hidden @ weight^T (+ bias) as ATen's GEMM rounds them.
void fuzz_hidden(Gen& g) {
  const int entry = g.pick(3);
  const bool three_d = g.chance(0.5);
  const std::int64_t b = g.pick(3), t = g.pick(5), h = 1 + g.pick(6);
  const std::int64_t v = g.chance(0.03) ? 0 : 1 + g.pick(30);
  const std::vector<std::int64_t> label_sizes =
      three_d ? std::vector<std::int64_t>{b, t} : std::vector<std::int64_t>{b * t};
  std::vector<std::int64_t> hidden_sizes = label_sizes;
  hidden_sizes.push_back(h);
  // LibTorch 1.13 has no float16 GEMM on the CPU: float32 there instead.
  static const bool half_gemm = [] {
    try {
      at::mm(torch::ones({1, 1}, torch::kHalf), torch::ones({1, 1}, torch::kHalf));
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  torch::ScalarType dt = g.float_dtype();
  if (dt == torch::kHalf && !half_gemm) dt = torch::kFloat;
  Tensor hidden = (torch::randn(hidden_sizes, torch::kDouble) * g.uniform(0.1, 3)).to(dt);
  if (hidden.numel() > 0 && g.chance(0.1)) {
    const double p[] = {kNaN, kInf, -kInf};
    hidden.view({-1})[g.pick(static_cast<int>(hidden.numel()))] = p[g.pick(3)];
  }
  if (g.chance(0.3)) hidden = g.layout(hidden);
  const torch::ScalarType weight_dt = g.chance(0.05) ? g.float_dtype() : dt;
  Tensor weight = torch::randn({v, h}, torch::kDouble).to(weight_dt);
  if (g.chance(0.2)) weight = weight.t().contiguous().t();  // column-major [V, H]
  psft::HiddenOptions ho;
  if (g.chance(0.5)) ho.bias = torch::randn({g.chance(0.05) ? v + 1 : v}, torch::kDouble).to(dt);
  Tensor labels = torch::randint(0, std::max<std::int64_t>(v, 1), label_sizes, torch::kLong);
  labels =
      torch::where(torch::rand(label_sizes) < 0.3, torch::full({}, -100, torch::kLong), labels);
  if (labels.numel() > 0 && g.chance(0.1)) {
    const std::int64_t bad[] = {-1, v, std::int64_t(1) << 40};
    labels.view({-1})[g.pick(static_cast<int>(labels.numel()))] = bad[g.pick(3)];
  }
  ho.temperature = g.chance(0.03) ? 0.0 : g.uniform(0.5, 2);
  ho.check_inputs = g.chance(0.85);
  ho.chunk_tokens = g.chance(0.03) ? -1 : g.pick(8);
  if (g.chance(0.3)) ho.chunk_bytes = 1 + g.pick(400);
  const psft::Backend backends[] = {psft::Backend::Auto, psft::Backend::FusedCpu,
                                    psft::Backend::Composed};
  ho.backend = backends[g.pick(3)];
  hidden = hidden.detach().requires_grad_(g.chance(0.8));
  weight = weight.detach().requires_grad_(g.chance(0.7));
  psft::LossOptions o;
  if (g.chance(0.3)) o.entropy_coeff = 0.01;
  const Tensor old_logp = g.chance(0.2) ? Tensor() : torch::randn(label_sizes) - 2.0;

  std::string error;
  Tensor logp;
  try {
    Tensor loss;
    if (entry == 0) {
      const psft::TokenLogprobs tl = psft::token_logprobs_from_hidden(hidden, weight, labels, ho);
      logp = tl.logp;
      loss = tl.logp.sum();
    } else if (entry == 1) {
      const psft::LogitsLossResult r =
          g.chance(0.5) ? psft::psft_loss_from_hidden(hidden, weight, labels, old_logp, o, ho)
                        : psft::policy_loss_from_hidden(
                              hidden, weight, labels, old_logp,
                              torch::randn({three_d ? b : b * t}, torch::kDouble), o, ho);
      logp = r.logp;
      loss = r.loss;
    } else {
      const psft::SftLogitsLossResult r =
          psft::sft_loss_from_hidden(hidden, weight, labels, psft::SftVariant::Dft, o, ho);
      logp = r.logp;
      loss = r.loss;
    }
    if (loss.requires_grad()) {
      loss.backward();
      if (hidden.grad().defined()) CHECK(hidden.grad().sizes() == hidden.sizes());
    }
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  INFO("entry " << entry << ", dtype " << dt << ", hidden " << hidden.sizes() << ", V " << v
                << ", error: " << error);
  const bool shapes_ok = weight_dt == dt && v >= 1 &&
                         (!ho.bias.defined() || ho.bias.size(0) == v) && ho.chunk_tokens >= 0 &&
                         psft::core::logits_options_error(ho).empty();
  if (!shapes_ok) {
    CHECK(names_an_argument(error, {"weight", "bias", "chunk_tokens", "temperature"}));
    return;
  }
  const Tensor scored = (labels != -100).reshape({-1});
  const bool labels_ok =
      (scored.logical_not() | ((labels >= 0) & (labels < v)).reshape({-1})).all().item<bool>();
  // The logits as the GEMM in the inputs' dtype gives them, then double.
  Tensor z = hidden.detach().reshape({-1, h}).matmul(weight.detach().t());
  if (ho.bias.defined()) z = z + ho.bias;
  z = z.to(torch::kDouble) / ho.temperature;
  const Tensor z_scored = z.index_select(0, scored.nonzero().reshape({-1}));
  const bool rows_ok =
      z_scored.numel() == 0 || (!(z_scored.isnan() | z_scored.eq(kInf)).any().item<bool>() &&
                                !z_scored.eq(-kInf).all(1).any().item<bool>());
  const Tensor logq = torch::log_softmax(z, 1);
  const Tensor want = torch::where(
      scored, logq.gather(1, labels.reshape({-1}).clamp(0, v - 1).unsqueeze(1)).squeeze(1),
      torch::zeros({}, torch::kDouble));
  const bool logp_finite = want.isfinite().all().item<bool>();
  const bool must_succeed = (!ho.check_inputs || (labels_ok && rows_ok)) &&
                            (entry == 0 || (labels_ok && rows_ok && logp_finite));
  if (!error.empty()) {
    CHECK(names_an_argument(error, {"hidden", "weight", "labels", "logits", "logp", "old_logp"}));
    CHECK_FALSE(must_succeed);
    return;
  }
  if (!labels_ok || !rows_ok || !logp_finite) return;  // unchecked bad input: no crash
  // GEMMs in reduced precision round the logits at 2^-8 (bf16) or 2^-11
  // (fp16) of their size; the chunked and the whole GEMM may round apart.
  const double zmax = z_scored.numel() ? z_scored.abs().max().item<double>() : 0.0;
  const double tol = dt == torch::kDouble  ? 1e-10
                     : dt == torch::kFloat ? 1e-4 * (1 + zmax)
                     : dt == torch::kHalf  ? 4e-3 * (1 + zmax)
                                           : 3e-2 * (1 + zmax);
  CHECK(torch::allclose(logp.detach().to(torch::kDouble).reshape({-1}), want, 0, tol));
}

TEST_CASE("fuzz: token_logprobs_from_hidden and the from-hidden losses",
          "[fuzz][fuzz_from_hidden]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) { fuzz_hidden(g); });
  WARN("from-hidden: " << n << " cases");
}

TEST_CASE("fuzz: metrics, normaliser, mask and label helpers", "[fuzz][fuzz_helpers]") {
  const std::int64_t n = fuzz_for_budget([](Gen& g) {
    const std::int64_t b = g.pick(4), t = g.pick(6);
    const std::vector<std::int64_t> sizes{b, t};
    const Tensor mask = g.mask(sizes);
    const Tensor entropy = g.tokens(sizes, 0, 3, g.float_dtype(), 0.1);
    const bool mask_ok = valid_mask(mask);
    std::string error;
    try {
      const psft::EntropyMetrics m = psft::entropy_metrics(entropy, mask);
      if (finite_where_counted(entropy, mask)) {
        CHECK(std::isfinite(scalar(m.mean)));
        CHECK(scalar(m.count) >= 0);
      }
      if (mask.defined()) {
        const psft::Normaliser c = psft::count_normaliser(mask);
        CHECK(*c.tokens == Approx(scalar(m.count)).epsilon(1e-9));
      }
      const Tensor logp = g.tokens(sizes, -3, 0, torch::kFloat, 0);
      const Tensor old = logp + 0.2;
      const psft::LossResult r = psft::psft_loss(logp, old, mask);
      const psft::LossMetrics merged = psft::merge_metrics({r.metrics, r.metrics});
      CHECK(scalar(merged.token_count) == Approx(2 * scalar(r.metrics.token_count)));
      for (const auto& e : psft::metrics_log(r, static_cast<psft::MetricNames>(g.pick(3))))
        CHECK(std::isfinite(e.second));
      CHECK(psft::trust_region_mask(logp, old).sizes() == logp.sizes());
      const Tensor ids = torch::randint(0, 50, sizes, torch::kLong);
      if (mask.defined()) CHECK(psft::shift_labels(ids, mask).sizes() == ids.sizes());
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
    INFO("error: " << error);
    if (!error.empty()) {
      CHECK(names_an_argument(error, {"mask", "entropy"}));
      CHECK_FALSE(mask_ok);
    }
  });
  WARN("helpers: " << n << " cases");
}

}  // namespace
