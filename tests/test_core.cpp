// Torch-free tests of include/psft/core/ and include/psft/eigen/ against the
// independent double-precision reference in reference/clipped_reference.hpp.
//
// Tolerances (relative; the loss is compared relative to the sum of the
// magnitudes of its terms, so cancellation between tokens does not matter):
//   double: 1e-12 on loss, gradient and metrics (same inputs, same formulas,
//           only summation order and exp's last bits differ)
//   float:  1e-5 (ratios and per-token products rounded to float; sums in
//           double)
//   finite differences (double, h = 1e-6, central): 1e-7 absolute plus 1e-6
//           relative; tokens whose loss is constant in logp (clamped or
//           clipped) must give exactly 0 both ways.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/core/validate.hpp"
#include "psft/eigen/policy_loss.hpp"
#include "reference/clipped_reference.hpp"
#include "support/reductions.hpp"
#include "support/reference_adapter.hpp"

namespace {

template <class T>
using Array = psft::eigen::TokenArray<T>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

using test_support::kReductions;

using test_support::name_of;

using test_support::settings_for;

template <class T>
std::vector<double> to_vector(const Array<T>& a) {
  std::vector<double> v;
  v.reserve(static_cast<std::size_t>(a.size()));
  for (Eigen::Index r = 0; r < a.rows(); ++r)
    for (Eigen::Index c = 0; c < a.cols(); ++c) v.push_back(static_cast<double>(a(r, c)));
  return v;
}

template <class T>
struct Batch {
  Array<T> logp, old_logp, advantages, mask;
};

/// A log-ratio from a mixture that covers the trust region, both clip sides,
/// large in-range ratios and clamped ones (|d| in (20, 30]).
double draw_log_ratio(std::mt19937& g) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double pick = u(g);
  if (pick < 0.4) return std::normal_distribution<double>(0.0, 0.25)(g);
  if (pick < 0.7) return std::uniform_real_distribution<double>(-4.0, 4.0)(g);
  if (pick < 0.9) return std::uniform_real_distribution<double>(-19.9, 19.9)(g);
  const double magnitude = std::uniform_real_distribution<double>(20.5, 30.0)(g);
  return u(g) < 0.5 ? -magnitude : magnitude;
}

/// Random batch; row 1 (if any) is fully masked; weighted masks use 0.5 and 2.
template <class T>
Batch<T> random_batch(std::uint32_t seed, Eigen::Index rows, Eigen::Index cols,
                      bool weighted = false) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  Batch<T> b;
  b.logp.resize(rows, cols);
  b.old_logp.resize(rows, cols);
  b.advantages.resize(rows, cols);
  b.mask.resize(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      const double old = -std::uniform_real_distribution<double>(0.01, 8.0)(g);
      b.old_logp(r, c) = static_cast<T>(old);
      b.logp(r, c) = static_cast<T>(old + draw_log_ratio(g));
      b.advantages(r, c) = static_cast<T>(normal(g));
      double w = u(g) < 0.8 ? 1.0 : 0.0;
      if (weighted && w != 0) w = u(g) < 0.5 ? 0.5 : 2.0;
      if (r == 1) w = 0.0;
      b.mask(r, c) = static_cast<T>(w);
    }
  }
  return b;
}

template <class T>
reference::Result run_reference(const Batch<T>& b, const psft::LossOptions& o) {
  return reference::clipped_loss(static_cast<std::size_t>(b.logp.rows()),
                                 static_cast<std::size_t>(b.logp.cols()), to_vector(b.logp),
                                 to_vector(b.old_logp), to_vector(b.advantages), to_vector(b.mask),
                                 settings_for(o));
}

bool close(double got, double expected, double rtol, double atol = 0.0) {
  return std::fabs(got - expected) <= atol + rtol * std::fabs(expected);
}

void check_metrics(const psft::core::MetricValues& m, const reference::Metrics& e, double tol) {
  CHECK(close(m.clip_frac, e.clip_frac, tol, tol));
  CHECK(close(m.clip_frac_dual, e.clip_frac_dual, tol, tol));
  CHECK(close(m.clip_frac_high, e.clip_frac_high, tol, tol));
  CHECK(close(m.clip_frac_low, e.clip_frac_low, tol, tol));
  CHECK(close(m.approx_kl_k1, e.approx_kl_k1, tol, tol));
  CHECK(close(m.approx_kl_k3, e.approx_kl_k3, tol, tol));
  CHECK(close(m.ratio_mean, e.ratio_mean, tol, tol));
  CHECK(close(m.ratio_min, e.ratio_min, tol, tol));
  CHECK(close(m.ratio_max, e.ratio_max, tol, tol));
  CHECK(m.token_count == Approx(e.token_count).epsilon(1e-15).margin(0));
}

/// Compares an Eigen result with the reference: loss, every gradient element
/// and every metric.
template <class T>
void check_against_reference(const psft::eigen::LossResult<T>& got, const reference::Result& e,
                             Eigen::Index rows, Eigen::Index cols, double tol) {
  INFO("loss " << static_cast<double>(got.loss) << " reference " << e.loss << " magnitude "
               << e.loss_magnitude);
  CHECK(std::fabs(static_cast<double>(got.loss) - e.loss) <= tol * e.loss_magnitude + 1e-300);
  REQUIRE(got.grad.rows() == rows);
  REQUIRE(got.grad.cols() == cols);
  std::int64_t bad = 0;
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      const double g = static_cast<double>(got.grad(r, c));
      const double x = e.grad[static_cast<std::size_t>(r * cols + c)];
      if (!close(g, x, tol)) {
        if (bad < 5) UNSCOPED_INFO("grad(" << r << ", " << c << ") = " << g << ", reference " << x);
        ++bad;
      }
    }
  }
  CHECK(bad == 0);
  check_metrics(got.metrics, e.metrics, tol);
}

psft::LossOptions options(psft::Reduction reduction, std::optional<double> dual_clip = {},
                          double eps_low = 0.2, double eps_high = 0.28) {
  psft::LossOptions o;
  o.reduction = reduction;
  o.clip.dual_clip = dual_clip;
  o.clip.eps_low = eps_low;
  o.clip.eps_high = eps_high;
  return o;
}

}  // namespace

// ---------------------------------------------------------------------------
// core/clipped_objective.hpp

TEST_CASE("core: the log-ratio clamp and its gradient gate at the bounds", "[core]") {
  using psft::core::clamp_log_ratio;
  using psft::core::log_ratio_in_range;
  CHECK(clamp_log_ratio(30.0, 20.0) == 20.0);
  CHECK(clamp_log_ratio(-30.0, 20.0) == -20.0);
  CHECK(clamp_log_ratio(20.0, 20.0) == 20.0);
  CHECK(clamp_log_ratio(-3.5, 20.0) == -3.5);
  // Like torch.clamp's backward since torch 2.14, the bounds themselves pass
  // no gradient; just inside them it flows.
  CHECK_FALSE(log_ratio_in_range(20.0, 20.0));
  CHECK_FALSE(log_ratio_in_range(-20.0, 20.0));
  CHECK(log_ratio_in_range(std::nextafter(20.0, 0.0), 20.0));
  CHECK(log_ratio_in_range(std::nextafter(-20.0, 0.0), 20.0));
  CHECK_FALSE(log_ratio_in_range(std::nextafter(20.0, kInf), 20.0));
  CHECK_FALSE(log_ratio_in_range(std::nextafter(-20.0, -kInf), 20.0));
  CHECK_FALSE(log_ratio_in_range(kNaN, 20.0));
  CHECK(psft::core::probability_ratio(10.0, -20.0, 20.0) == std::exp(20.0));
  CHECK(psft::core::probability_ratio(-25.0, 5.0, 20.0) == std::exp(-20.0));
  CHECK(psft::core::probability_ratio(-1.5, -1.5, 20.0) == 1.0);
  CHECK(psft::core::clamp_log_ratio(30.0f, 20.0f) == 20.0f);
}

TEST_CASE("core: clipped_objective matches the reference token by token", "[core]") {
  std::mt19937 g(1234);
  std::normal_distribution<double> normal(0.0, 1.5);
  const std::optional<double> duals[] = {std::nullopt, 3.0, 10.0};
  const double eps[][2] = {{0.2, 0.28}, {0.1, 0.1}, {0.0, 0.0}, {0.5, 2.0}};
  int checked = 0, trusted = 0, dual_bound = 0, clamped = 0;
  for (const auto& dual : duals) {
    for (const auto& e : eps) {
      psft::core::ClipParams<double> p{e[0], e[1], dual ? *dual : 0.0, 20.0};
      reference::Settings s;
      s.eps_low = e[0];
      s.eps_high = e[1];
      s.dual_clip = dual;
      for (int i = 0; i < 400; ++i) {
        const double old = -std::uniform_real_distribution<double>(0.0, 8.0)(g);
        const double logp = old + draw_log_ratio(g);
        const double adv = i % 50 == 0 ? 0.0 : normal(g);
        const psft::core::TokenObjective<double> t =
            psft::core::clipped_objective(logp, old, adv, p);
        const reference::Token x = reference::evaluate_token(logp, old, adv, s);
        INFO("logp " << logp << " old " << old << " A " << adv << " eps " << e[0] << "/" << e[1]
                     << " dual " << (dual ? *dual : 0.0));
        CHECK(close(t.loss, x.loss, 1e-14));
        CHECK(close(t.grad, x.grad, 1e-14));
        CHECK(t.clipped == x.ppo_clip);
        CHECK(t.clipped_dual == x.dual_clip);
        CHECK(t.clipped_high == x.high_clip);
        CHECK(t.clipped_low == x.low_clip);
        CHECK(t.trusted == x.trusted);
        CHECK(psft::core::in_trust_region(logp, old, adv, p) == x.trusted);
        const double dc = psft::core::clamp_log_ratio(logp - old, 20.0);
        CHECK(dc == x.clamped_log_ratio);
        CHECK(psft::core::approx_kl_k1(dc) == -x.clamped_log_ratio);
        CHECK(close(psft::core::approx_kl_k3(dc, std::exp(dc)), x.ratio - 1.0 - x.clamped_log_ratio,
                    1e-14, 1e-15));
        ++checked;
        trusted += x.trusted;
        dual_bound += x.dual_clip;
        clamped += std::fabs(logp - old) > 20.0;
      }
    }
  }
  // The draw reaches every branch.
  CHECK(checked == 4800);
  CHECK(trusted > 500);
  CHECK(dual_bound > 50);
  CHECK(clamped > 100);
}

TEST_CASE("core: PSFT (A = 1) is -min(r, 1 + eps_high); eps_low and the dual clip never bind",
          "[core]") {
  for (double d : {-25.0, -3.0, -0.5, 0.0, 0.2, std::log(1.28) - 1e-9, std::log(1.28) + 1e-9, 1.0,
                   19.0, 25.0}) {
    INFO("d = " << d);
    for (double eps_low : {0.0, 0.2, 0.9}) {
      psft::core::ClipParams<double> p{eps_low, 0.28, 10.0, 20.0};
      const double logp = -2.0 + d;
      const double exact_d = logp - (-2.0);
      const auto t = psft::core::clipped_objective(logp, -2.0, 1.0, p);
      const double r = std::exp(std::min(20.0, std::max(-20.0, exact_d)));
      const double hi = 1.0 + 0.28;
      CHECK(t.loss == -std::min(r, hi));
      // Ties at a clip bound get half (Note [Gradient at the bounds]).
      const double lo = 1.0 - eps_low;
      const double slope = r > hi ? 0.0 : (r == hi || r == lo ? 0.5 : 1.0);
      CHECK(t.grad == (std::fabs(exact_d) < 20.0 ? -r * slope : 0.0));
      CHECK(t.clipped_high == (r > hi));
      CHECK_FALSE(t.clipped_dual);
      CHECK_FALSE(t.clipped_low);
    }
  }
}

// ---------------------------------------------------------------------------
// core/metrics.hpp

TEST_CASE("core: MetricSums merges chunks exactly and finalises to the reference", "[core]") {
  std::mt19937 g(77);
  const psft::core::ClipParams<double> p{0.2, 0.28, 3.0, 20.0};
  reference::Settings s;
  s.dual_clip = 3.0;
  std::vector<double> logp, old, adv, mask;
  for (int i = 0; i < 300; ++i) {
    old.push_back(-std::uniform_real_distribution<double>(0.0, 5.0)(g));
    logp.push_back(old.back() + draw_log_ratio(g));
    adv.push_back(std::normal_distribution<double>(0.0, 1.0)(g));
    mask.push_back(i % 7 == 0 ? 0.0 : (i % 3 == 0 ? 0.5 : 1.0));
  }
  psft::core::MetricSums whole, first, second;
  for (std::size_t i = 0; i < logp.size(); ++i) {
    if (mask[i] == 0) continue;
    const double dc = psft::core::clamp_log_ratio(logp[i] - old[i], 20.0);
    const double r = std::exp(dc);
    const auto t = psft::core::clipped_objective(logp[i], old[i], adv[i], p);
    whole.add(t, dc, r, mask[i]);
    (i < 123 ? first : second).add(t, dc, r, mask[i]);
  }
  first.merge(second);
  const psft::core::MetricValues a = whole.finalize(), b = first.finalize();
  const reference::Result e = reference::clipped_loss(1, logp.size(), logp, old, adv, mask, s);
  check_metrics(a, e.metrics, 1e-12);
  check_metrics(b, e.metrics, 1e-12);
  CHECK(b.ratio_min == a.ratio_min);
  CHECK(b.ratio_max == a.ratio_max);
  CHECK(b.token_count == a.token_count);

  // No tokens: fractions and KL 0, ratio statistics 1, never NaN.
  const psft::core::MetricValues none = psft::core::MetricSums{}.finalize();
  check_metrics(none, reference::Metrics{}, 0.0);
  CHECK(none.ratio_min == 1.0);
  CHECK(none.ratio_max == 1.0);
  CHECK(none.token_count == 0.0);
}

// ---------------------------------------------------------------------------
// core/reduction.hpp

TEST_CASE("core: reduce_rows gives verl's aggregations with stated values", "[core]") {
  // Four rows of a batch with 5 columns; row 2 is empty.
  const double row_loss[] = {2.0, -1.0, 0.0, 3.0};
  const double row_tokens[] = {2.0, 1.0, 0.0, 3.0};
  double row_scale[4];
  struct Expected {
    psft::Reduction reduction;
    double loss;
    double scale[4];
  };
  // N = 6, S = 3 (row 2 is empty), C = T = 5.
  const Expected cases[] = {
      {psft::Reduction::TokenMean, 4.0 / 6.0, {1 / 6.0, 1 / 6.0, 1 / 6.0, 1 / 6.0}},
      {psft::Reduction::SeqMeanTokenSum, 4.0 / 3.0, {1 / 3.0, 1 / 3.0, 1 / 3.0, 1 / 3.0}},
      {psft::Reduction::SeqMeanTokenMean,
       (1.0 - 1.0 + 1.0) / 3.0,
       {1 / 6.0, 1 / 3.0, 0.0, 1 / 9.0}},
      {psft::Reduction::SeqMeanTokenSumNorm,
       4.0 / 3.0 / 5.0,
       {1 / 15.0, 1 / 15.0, 1 / 15.0, 1 / 15.0}},
      {psft::Reduction::TokenSum, 4.0, {1.0, 1.0, 1.0, 1.0}},
      {psft::Reduction::TokenSumNorm, 4.0 / 5.0, {0.2, 0.2, 0.2, 0.2}},
  };
  for (const Expected& c : cases) {
    INFO(name_of(c.reduction));
    psft::LossOptions o;
    o.reduction = c.reduction;
    auto out = psft::core::reduce_rows(o, 4, 5, row_loss, row_tokens, row_scale);
    CHECK(out.error.empty());
    CHECK(out.loss == Approx(c.loss).epsilon(1e-15));
    for (int r = 0; r < 4; ++r) CHECK(row_scale[r] == Approx(c.scale[r]).epsilon(1e-15).margin(0));

    // World size 2 and global counts twice the local ones: the same loss
    // (TokenSum has no count: each rank's sum is doubled, so that DDP's
    // average is the global sum; TokenSumNorm's C is doubled by hand).
    psft::Normaliser n;
    n.tokens = 12.0;
    n.sequences = 6.0;
    n.world_size = 2;
    o.normaliser = n;
    if (c.reduction == psft::Reduction::TokenSumNorm) o.norm_constant = 10.0;
    out = psft::core::reduce_rows(o, 4, 5, row_loss, row_tokens, row_scale);
    CHECK(out.error.empty());
    CHECK(out.loss ==
          Approx(c.reduction == psft::Reduction::TokenSum ? 2 * c.loss : c.loss).epsilon(1e-15));
  }

  psft::LossOptions o;
  psft::Normaliser n;
  n.tokens = 5.0;  // smaller than this batch's own 6 tokens
  o.normaliser = n;
  auto out = psft::core::reduce_rows(o, 4, 5, row_loss, row_tokens, row_scale);
  CHECK_THAT(out.error, Catch::Contains("normaliser.tokens"));
  n.tokens = 6.0;
  n.sequences = 2.0;  // smaller than this batch's 3 non-empty rows
  o.normaliser = n;
  o.reduction = psft::Reduction::SeqMeanTokenSum;
  out = psft::core::reduce_rows(o, 4, 5, row_loss, row_tokens, row_scale);
  CHECK_THAT(out.error, Catch::Contains("normaliser.sequences"));

  // Nothing to average: loss 0 and zero scales, not 0 / 0.
  const double zeros[] = {0.0, 0.0};
  double scale2[2] = {7.0, 7.0};
  for (psft::Reduction r : kReductions) {
    psft::LossOptions e;
    e.reduction = r;
    const auto z = psft::core::reduce_rows(e, 2, r == psft::Reduction::TokenSumNorm ? 0 : 3, zeros,
                                           zeros, scale2);
    CHECK(z.error.empty());
    CHECK(z.loss == 0.0);
    // TokenSum's scale is D whatever the counts; the gradient is still 0.
    const double want = r == psft::Reduction::TokenSum ? 1.0 : 0.0;
    CHECK(scale2[0] == want);
    CHECK(scale2[1] == want);
  }
}

// ---------------------------------------------------------------------------
// core/validate.hpp and core/options.hpp

TEST_CASE("core: option validation names the offending option", "[core]") {
  psft::ClipOptions c;
  CHECK(psft::core::clip_options_error(c).empty());
  c.eps_low = 1.0;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("eps_low"));
  c.eps_low = -0.1;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("eps_low"));
  c.eps_low = kNaN;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("eps_low"));
  c = {};
  c.eps_high = -0.01;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("eps_high"));
  c = {};
  c.dual_clip = 1.0;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("dual_clip"));
  c.dual_clip = 0.5;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("dual_clip"));
  c.dual_clip = 1.0001;
  CHECK(psft::core::clip_options_error(c).empty());
  c = {};
  c.log_ratio_clamp = 0.0;
  CHECK_THAT(psft::core::clip_options_error(c), Catch::Contains("log_ratio_clamp"));

  psft::LossOptions o;
  CHECK(psft::core::loss_options_error(o, 1).empty());
  o.reduction = psft::Reduction::SeqMeanTokenSum;
  CHECK_THAT(psft::core::loss_options_error(o, 1), Catch::Contains("SeqMeanTokenSum"));
  CHECK(psft::core::loss_options_error(o, 2).empty());
  o.normaliser = psft::Normaliser{};
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("normaliser.sequences"));
  o.reduction = psft::Reduction::TokenMean;
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("normaliser.tokens"));
  o.normaliser->tokens = 3.0;
  CHECK(psft::core::loss_options_error(o, 2).empty());
  o.normaliser->world_size = 0;
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("world_size"));
  o.normaliser->world_size = 1;
  o.norm_constant = 0.0;
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("norm_constant"));
  o.norm_constant.reset();
  o.reduction = psft::Reduction::TokenSumNorm;
  o.normaliser = psft::Normaliser{};  // C is a constant: no count needed
  CHECK(psft::core::loss_options_error(o, 2).empty());
  CHECK(psft::core::loss_options_error(o, 1).empty());  // and no sequences
  o.reduction = psft::Reduction::SeqMeanTokenSumNorm;   // verl 0.9.1: sum / S / C
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("normaliser.sequences"));
  o.clip.delta = 1.2;  // not above 1 + eps_high = 1.28
  CHECK_THAT(psft::core::loss_options_error(o, 2), Catch::Contains("clip.delta"));
}

TEST_CASE("core: Normaliser += adds the counts of the parts of a step", "[core]") {
  psft::Normaliser step;
  psft::Normaliser a;
  a.tokens = 10.0;
  a.sequences = 3.0;
  psft::Normaliser b;
  b.tokens = 2.5;
  b.sequences = 1.0;
  step += a;
  step += b;
  REQUIRE(step.tokens.has_value());
  REQUIRE(step.sequences.has_value());
  CHECK(*step.tokens == 12.5);
  CHECK(*step.sequences == 4.0);
  CHECK(step.world_size == 1);
}

// ---------------------------------------------------------------------------
// eigen/policy_loss.hpp

TEST_CASE("eigen::policy_loss matches the reference for every reduction and dual clip", "[eigen]") {
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  const double dual = GENERATE(0.0, 3.0, 10.0);
  const bool weighted = GENERATE(false, true);
  INFO(name_of(reduction) << " dual " << dual << " weighted " << weighted);
  const auto b = random_batch<double>(
      1000 + static_cast<std::uint32_t>(dual) + 17 * static_cast<std::uint32_t>(reduction), 7, 53,
      weighted);
  psft::LossOptions o = options(reduction, dual > 0 ? std::optional<double>(dual) : std::nullopt);
  const auto got = psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o);
  const reference::Result e = run_reference(b, o);
  check_against_reference(got, e, 7, 53, 1e-12);
  CHECK(e.metrics.clip_frac > 0);  // the batch exercises the clip
  if (dual > 0) CHECK(e.metrics.clip_frac_dual > 0);

  SECTION("asymmetric eps") {
    o.clip.eps_low = 0.05;
    o.clip.eps_high = 0.6;
    check_against_reference(
        psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o),
        run_reference(b, o), 7, 53, 1e-12);
  }
  SECTION("global counts, world size and norm constant") {
    psft::Normaliser n;
    n.tokens = 1000.0;
    n.sequences = 40.0;
    n.world_size = 3;
    o.normaliser = n;
    o.norm_constant = 77.0;
    check_against_reference(
        psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o),
        run_reference(b, o), 7, 53, 1e-12);
  }
}

TEST_CASE("eigen::policy_loss in float matches the reference on the same inputs", "[eigen]") {
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  INFO(name_of(reduction));
  const auto b = random_batch<float>(31 + static_cast<std::uint32_t>(reduction), 5, 64, true);
  const psft::LossOptions o = options(reduction, 3.0);
  check_against_reference(
      psft::eigen::policy_loss<float>(b.logp, b.old_logp, b.advantages, b.mask, o),
      run_reference(b, o), 5, 64, 1e-5);
}

TEST_CASE("eigen: log-ratios of +-30 are clamped to +-20, the bounds pass no gradient", "[eigen]") {
  // Columns: d = 30, -30, 20, -20, 20.5, -20.5, 0, 19.5 (old = -5, so logp is exact).
  const double d[] = {30.0, -30.0, 20.0, -20.0, 20.5, -20.5, 0.0, 19.5};
  Array<double> logp(2, 8), old(2, 8), adv(2, 8), mask(2, 8);
  for (int c = 0; c < 8; ++c) {
    old(0, c) = old(1, c) = -5.0;
    logp(0, c) = logp(1, c) = -5.0 + d[c];
    adv(0, c) = -0.5;  // row 0: A < 0, the clamp is the only bound on r
    adv(1, c) = 1.0;   // row 1: A > 0, the upper clip binds for d > log 1.28
    mask(0, c) = mask(1, c) = 1.0;
  }
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(reduction);
    const auto got = psft::eigen::policy_loss<double>(logp, old, adv, mask, o);
    const reference::Result e = reference::clipped_loss(
        2, 8, to_vector(logp), to_vector(old), to_vector(adv), to_vector(mask), settings_for(o));
    check_against_reference(got, e, 2, 8, 1e-12);
    CHECK(std::isfinite(got.loss));
    CHECK(got.metrics.ratio_max == std::exp(20.0));
    CHECK(got.metrics.ratio_min == std::exp(-20.0));
    // At and beyond the clamp's bounds: no gradient (torch >= 2.14); inside,
    // the full -A r (A < 0 row).
    for (int c : {0, 1, 2, 3, 4, 5}) {
      CHECK(got.grad(0, c) == 0.0);
      CHECK(got.grad(1, c) == 0.0);
    }
    CHECK(got.grad(0, 7) != 0.0);  // A < 0 with d = 19.5: inside the clamp
    CHECK(got.grad(1, 7) == 0.0);  // A > 0 with r = e^19.5: the upper clip binds
  }
}

namespace {

/// True when the token's log-ratio is at least `margin` away from every kink
/// of the loss (clip bounds, dual-clip cap, clamp bounds).
bool away_from_kinks(double d, double eps_low, double eps_high, double dual, double margin) {
  const double r = std::exp(d);
  const double kinks_r[] = {1.0 - eps_low, 1.0 + eps_high, dual};
  for (double k : kinks_r)
    if (k > 0 && std::fabs(std::log(r / k)) < margin) return false;
  return std::fabs(std::fabs(d) - 20.0) >= margin;
}

}  // namespace

TEST_CASE("eigen: the gradient equals central finite differences in double", "[eigen][fd]") {
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  const bool with_clamped = GENERATE(false, true);
  INFO(name_of(reduction) << (with_clamped ? " with clamped tokens" : ""));
  const double dual = 3.0;
  std::mt19937 g(4242 + static_cast<std::uint32_t>(reduction));
  const Eigen::Index rows = 4, cols = 16;
  Array<double> logp(rows, cols), old(rows, cols), adv(rows, cols), mask(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      double d;
      do {
        // Mostly inside the trust region, some tokens beyond either clip.
        d = c % 3 == 2 ? std::uniform_real_distribution<double>(-2.5, 2.5)(g)
                       : std::uniform_real_distribution<double>(-0.3, 0.3)(g);
        if (with_clamped && c % 5 == 0)
          d = (c % 2 ? 1 : -1) * std::uniform_real_distribution<double>(20.5, 30.0)(g);
      } while (!away_from_kinks(d, 0.2, 0.28, dual, 1e-3));
      old(r, c) = -std::uniform_real_distribution<double>(0.1, 5.0)(g);
      logp(r, c) = old(r, c) + d;
      adv(r, c) = std::normal_distribution<double>(0.0, 1.0)(g);
      mask(r, c) = (r == 2 && c > 3) || c == 7 ? 0.0 : (c % 4 == 1 ? 0.5 : 1.0);
    }
  }
  const psft::LossOptions o = options(reduction, dual);
  const auto base = psft::eigen::policy_loss<double>(logp, old, adv, mask, o);
  const double h = 1e-6;
  int compared = 0, zero_both = 0;
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      Array<double> plus = logp, minus = logp;
      plus(r, c) += h;
      minus(r, c) -= h;
      const double fd = (psft::eigen::policy_loss<double>(plus, old, adv, mask, o).loss -
                         psft::eigen::policy_loss<double>(minus, old, adv, mask, o).loss) /
                        (2 * h);
      const double grad = base.grad(r, c);
      INFO("token (" << r << ", " << c << ") d = " << logp(r, c) - old(r, c) << " A " << adv(r, c)
                     << " fd " << fd << " grad " << grad);
      const bool constant =
          mask(r, c) == 0 ||
          !psft::core::in_trust_region(logp(r, c), old(r, c), adv(r, c),
                                       psft::core::ClipParams<double>{0.2, 0.28, dual, 20.0});
      if (constant) {
        // The loss does not depend on this logp: bit-identical losses.
        CHECK(fd == 0.0);
        CHECK(grad == 0.0);
        ++zero_both;
      } else {
        CHECK(close(grad, fd, 1e-6, 1e-7));
        ++compared;
      }
    }
  }
  CHECK(compared > 20);
  CHECK(zero_both > 5);
}

TEST_CASE("eigen: empty batches give loss 0, an empty gradient and neutral metrics", "[eigen]") {
  const Eigen::Index shapes[][2] = {{0, 0}, {0, 5}, {4, 0}};
  for (const auto& shape : shapes) {
    for (psft::Reduction reduction : kReductions) {
      INFO(shape[0] << "x" << shape[1] << " " << name_of(reduction));
      const Array<double> z(shape[0], shape[1]);
      const auto got = psft::eigen::policy_loss<double>(z, z, z, z, options(reduction, 3.0));
      CHECK(got.loss == 0.0);
      CHECK(got.grad.rows() == shape[0]);
      CHECK(got.grad.cols() == shape[1]);
      check_metrics(got.metrics, reference::Metrics{}, 0.0);
    }
  }
}

TEST_CASE("eigen: fully masked rows and batches; masked NaN is ignored", "[eigen]") {
  auto b = random_batch<double>(99, 5, 16);
  // Poison every masked token: the result must not see it.
  for (Eigen::Index r = 0; r < 5; ++r)
    for (Eigen::Index c = 0; c < 16; ++c)
      if (b.mask(r, c) == 0) {
        b.old_logp(r, c) = kNaN;
        b.advantages(r, c) = c % 2 ? kInf : kNaN;
      }
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(reduction, 3.0);
    const auto got = psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o);
    check_against_reference(got, run_reference(b, o), 5, 16, 1e-12);
    CHECK((got.grad.row(1) == 0.0).all());  // row 1 is fully masked

    Array<double> none = Array<double>::Zero(5, 16);
    const auto empty = psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, none, o);
    CHECK(empty.loss == 0.0);
    CHECK((empty.grad == 0.0).all());
    check_metrics(empty.metrics, reference::Metrics{}, 0.0);
  }
}

TEST_CASE("eigen: normaliser errors name the missing or inconsistent count", "[eigen]") {
  const auto b = random_batch<double>(5, 3, 8);
  psft::LossOptions o;
  o.normaliser = psft::Normaliser{};
  const auto call = [&] {
    return psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o);
  };
  REQUIRE_THROWS_AS(call(), std::invalid_argument);
  REQUIRE_THROWS_WITH(call(), Catch::Contains("normaliser.tokens"));
  o.reduction = psft::Reduction::SeqMeanTokenMean;
  REQUIRE_THROWS_WITH(call(), Catch::Contains("normaliser.sequences"));
  o.reduction = psft::Reduction::TokenMean;
  o.normaliser->tokens = 1.0;  // the batch itself has more
  REQUIRE_THROWS_AS(call(), std::invalid_argument);
  REQUIRE_THROWS_WITH(call(), Catch::Contains("normaliser.tokens"));
  o.normaliser->tokens = -1.0;
  REQUIRE_THROWS_WITH(call(), Catch::Contains("normaliser.tokens"));
}

TEST_CASE("eigen: invalid options and inputs throw std::invalid_argument naming them", "[eigen]") {
  const auto b = random_batch<double>(6, 3, 8);
  const auto with_clip = [&](psft::ClipOptions c) {
    psft::LossOptions o;
    o.clip = c;
    return psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, o);
  };
  psft::ClipOptions c;
  c.eps_low = 1.0;
  REQUIRE_THROWS_AS(with_clip(c), std::invalid_argument);
  REQUIRE_THROWS_WITH(with_clip(c), Catch::Contains("eps_low"));
  c.eps_low = -0.01;
  REQUIRE_THROWS_WITH(with_clip(c), Catch::Contains("eps_low"));
  c = {};
  c.eps_high = -0.5;
  REQUIRE_THROWS_WITH(with_clip(c), Catch::Contains("eps_high"));
  c = {};
  c.dual_clip = 1.0;
  REQUIRE_THROWS_AS(with_clip(c), std::invalid_argument);
  REQUIRE_THROWS_WITH(with_clip(c), Catch::Contains("dual_clip"));
  c.dual_clip = 0.3;
  REQUIRE_THROWS_WITH(with_clip(c), Catch::Contains("dual_clip"));

  const Array<double> wrong(3, 9);
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, wrong, b.advantages, b.mask),
                      Catch::Contains("old_logp"));
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, b.old_logp, wrong, b.mask),
                      Catch::Contains("advantages"));
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, wrong),
                      Catch::Contains("mask"));

  // NaN / Inf at an unmasked token, and the opt-out.
  Array<double> old = b.old_logp, adv = b.advantages, mask = Array<double>::Ones(3, 8);
  old(2, 3) = kNaN;
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, old, b.advantages, mask),
                      Catch::Contains("old_logp"));
  adv(0, 0) = -kInf;
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, b.old_logp, adv, mask),
                      Catch::Contains("advantages"));
  mask(1, 1) = -1.0;
  REQUIRE_THROWS_WITH(psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, mask),
                      Catch::Contains("mask"));
  psft::LossOptions unchecked;
  unchecked.check_finite = false;
  mask(1, 1) = 1.0;
  CHECK_NOTHROW(psft::eigen::policy_loss<double>(b.logp, old, adv, mask, unchecked));
}

TEST_CASE("eigen: micro-batches with a global normaliser reproduce the full batch", "[eigen]") {
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  const std::int64_t world_size = GENERATE(1, 2);
  INFO(name_of(reduction) << " world size " << world_size);
  const Eigen::Index rows = 9, cols = 21;
  const auto b = random_batch<double>(555, rows, cols, true);
  const psft::LossOptions full_opts = options(reduction, 3.0);
  const auto full =
      psft::eigen::policy_loss<double>(b.logp, b.old_logp, b.advantages, b.mask, full_opts);
  // The full batch against the reference, then its parts against the full batch.
  check_against_reference(full, run_reference(b, full_opts), rows, cols, 1e-12);

  // Micro-batches of rows [0, 2), [2, 6), [6, 9); with world size 2, rank 0
  // owns the first two and rank 1 the last.
  const Eigen::Index bounds[] = {0, 2, 6, 9};
  psft::Normaliser step;
  for (int m = 0; m < 3; ++m) {
    psft::Normaliser part;
    part.tokens = 0.0;
    part.sequences = 0.0;
    for (Eigen::Index r = bounds[m]; r < bounds[m + 1]; ++r) {
      const double n = b.mask.row(r).sum();
      *part.tokens += n;
      *part.sequences += n > 0 ? 1.0 : 0.0;
    }
    step += part;
  }
  step.world_size = world_size;
  psft::LossOptions o = full_opts;
  o.normaliser = step;

  double loss_sum = 0.0;
  Array<double> grad(rows, cols);
  for (int m = 0; m < 3; ++m) {
    const Eigen::Index r0 = bounds[m], n = bounds[m + 1] - bounds[m];
    const Array<double> logp = b.logp.middleRows(r0, n), old = b.old_logp.middleRows(r0, n),
                        adv = b.advantages.middleRows(r0, n), mask = b.mask.middleRows(r0, n);
    const auto part = psft::eigen::policy_loss<double>(logp, old, adv, mask, o);
    loss_sum += part.loss;
    grad.middleRows(r0, n) = part.grad;
    // Each micro-batch against the reference with the same global counts.
    const reference::Result e = reference::clipped_loss(
        static_cast<std::size_t>(n), static_cast<std::size_t>(cols), to_vector(logp),
        to_vector(old), to_vector(adv), to_vector(mask), settings_for(o));
    CHECK(std::fabs(part.loss - e.loss) <= 1e-12 * e.loss_magnitude);
  }
  // Ranks sum their micro-batch losses; DDP averages gradients over D ranks.
  const double d = static_cast<double>(world_size);
  const reference::Result e = run_reference(b, full_opts);
  CHECK(std::fabs(loss_sum / d - full.loss) <= 1e-12 * e.loss_magnitude);
  std::int64_t bad = 0;
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c) bad += !close(grad(r, c) / d, full.grad(r, c), 1e-12);
  CHECK(bad == 0);
}

TEST_CASE("eigen::psft_loss is policy_loss with A = 1", "[eigen]") {
  const auto b = random_batch<double>(8080, 4, 30);
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(reduction, 3.0, 0.9, 0.28);
    const auto got = psft::eigen::psft_loss<double>(b.logp, b.old_logp, b.mask, o);
    Batch<double> ones = b;
    ones.advantages = Array<double>::Ones(4, 30);
    const reference::Result e = run_reference(ones, o);
    check_against_reference(got, e, 4, 30, 1e-12);
    CHECK(got.metrics.clip_frac_low == 0.0);
    CHECK(got.metrics.clip_frac_dual == 0.0);
    CHECK(got.metrics.clip_frac == got.metrics.clip_frac_high);
    CHECK(got.metrics.clip_frac_high > 0.0);
  }
}
