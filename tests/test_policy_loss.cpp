// Tests of psft::policy_loss, psft::psft_loss, psft::trust_region_mask,
// psft::count_normaliser and psft::backend_for with LibTorch, for the fused
// CPU backend and the composed ATen backend, against the independent
// double-precision reference in reference/clipped_reference.hpp.
//
// Tolerance table (relative; the loss is compared relative to the sum of the
// magnitudes of its terms, so cancellation between tokens does not matter).
// The reference is always evaluated on the SAME rounded inputs that psft sees
// (every tensor converted to double after its dtype rounding):
//
//   logp dtype | loss  | gradient                 | metrics
//   -----------+-------+--------------------------+--------
//   float64    | 1e-12 | 1e-12                    | 1e-12
//   float32    | 1e-5  | 1e-5                     | 1e-5
//   bfloat16   | 1e-5  | 8e-3 (2 units of bf16    | 1e-5
//              |       | rounding, 2^-8 each)     |
//   float16    | 1e-5  | 1e-3 (2 units of fp16    | 1e-5
//              |       | rounding, 2^-11 each)    |
//              |       | + 1e-7 absolute (fp16    |
//              |       | subnormals)              |
//
// bf16 / fp16 inputs accumulate in float and the loss stays float32, so only
// the gradient, which is returned in logp's dtype, carries the coarse
// rounding. float16 runs keep in-range log-ratios within +-8 so that the
// gradient stays inside float16's range (clamped tokens, |d| up to 30, have
// zero gradient and are still drawn). Finite differences (float64, central,
// h = 1e-6): 1e-6 relative plus 1e-7 absolute; tokens whose loss is constant
// in logp (masked, clipped, clamped) must give exactly 0 both ways.

// LibTorch's logging header defines its own CHECK macro (glog's or c10's),
// which aborts the process instead of recording a Catch2 assertion. Include
// LibTorch first and drop that macro so that Catch2's CHECK is the one used.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "psft/compat/trl.hpp"
#include "psft/compat/verl.hpp"
#include "psft/cpu/capability.hpp"
#include "psft/psft.hpp"
#include "reference/clipped_reference.hpp"
#include "support/reductions.hpp"
#include "support/reference_adapter.hpp"

namespace {

using torch::Tensor;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

using test_support::kReductions;

using test_support::name_of;

using test_support::settings_for;

psft::LossOptions options(psft::Backend backend, psft::Reduction reduction,
                          std::optional<double> dual_clip = {}) {
  psft::LossOptions o;
  o.backend = backend;
  o.reduction = reduction;
  o.clip.dual_clip = dual_clip;
  return o;
}

/// A tensor's values as doubles, row-major.
std::vector<double> values(const Tensor& t) {
  const Tensor c = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

bool close(double got, double expected, double rtol, double atol = 0.0) {
  return std::fabs(got - expected) <= atol + rtol * std::fabs(expected);
}

struct Tolerance {
  double loss, grad, metric, grad_atol;
};

/// The tolerance table at the top of this file.
Tolerance tolerance_for(torch::Dtype logp_dtype) {
  switch (logp_dtype) {
    case torch::kDouble:
      return {1e-12, 1e-12, 1e-12, 0.0};
    case torch::kFloat:
      return {1e-5, 1e-5, 1e-5, 0.0};
    case torch::kBFloat16:
      return {1e-5, 8e-3, 1e-5, 0.0};
    case torch::kHalf:
      return {1e-5, 1e-3, 1e-5, 1e-7};
    default:
      throw std::logic_error("no tolerance for this dtype");
  }
}

/// A log-ratio from a mixture that covers the trust region, both clip sides,
/// large in-range ratios (|d| <= in_range_max) and clamped ones (|d| in
/// [20.5, 30]).
double draw_log_ratio(std::mt19937& g, double in_range_max) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double pick = u(g);
  if (pick < 0.4) return std::normal_distribution<double>(0.0, 0.25)(g);
  if (pick < 0.7) return std::uniform_real_distribution<double>(-4.0, 4.0)(g);
  if (pick < 0.9) return std::uniform_real_distribution<double>(-in_range_max, in_range_max)(g);
  const double magnitude = std::uniform_real_distribution<double>(20.5, 30.0)(g);
  return u(g) < 0.5 ? -magnitude : magnitude;
}

enum class AdvShape { PerToken, Column, Row, Scalar };  // [B, T], [B, 1], [B], 0-d
enum class MaskKind { Bool, Weights, None };

struct Draw {
  std::uint32_t seed = 1;
  std::int64_t rows = 6, cols = 37;
  torch::Dtype logp_dtype = torch::kDouble;
  torch::Dtype old_dtype = torch::kDouble;
  torch::Dtype adv_dtype = torch::kDouble;
  AdvShape adv = AdvShape::PerToken;
  MaskKind mask = MaskKind::Bool;
  double in_range_max = 19.9;
  bool flat = false;  ///< [N] inputs with N = rows * cols
};

struct Inputs {
  Tensor logp, old_logp, advantages, mask;
};

/// Seeded random inputs; logp is a leaf that requires grad. With more than
/// one row, row 1 is fully masked.
Inputs draw(const Draw& d) {
  std::mt19937 g(d.seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::int64_t n = d.rows * d.cols;
  std::vector<double> logp(n), old(n), mask(n);
  for (std::int64_t i = 0; i < n; ++i) {
    old[i] = -std::uniform_real_distribution<double>(0.01, 8.0)(g);
    logp[i] = old[i] + draw_log_ratio(g, d.in_range_max);
    double w = u(g) < 0.8 ? 1.0 : 0.0;
    if (d.mask == MaskKind::Weights && w != 0) w = u(g) < 0.5 ? 0.5 : 2.0;
    if (!d.flat && d.rows > 1 && i / d.cols == 1) w = 0.0;
    mask[i] = w;
  }
  const auto dbl = torch::TensorOptions().dtype(torch::kDouble);
  std::vector<std::int64_t> shape =
      d.flat ? std::vector<std::int64_t>{n} : std::vector<std::int64_t>{d.rows, d.cols};
  Inputs in;
  in.logp = torch::tensor(logp, dbl).reshape(shape).to(d.logp_dtype).requires_grad_();
  in.old_logp = torch::tensor(old, dbl).reshape(shape).to(d.old_dtype);
  std::vector<std::int64_t> adv_shape;
  switch (d.adv) {
    case AdvShape::PerToken:
      adv_shape = shape;
      break;
    case AdvShape::Column:
      adv_shape = {d.rows, 1};
      break;
    case AdvShape::Row:
      adv_shape = {d.rows};
      break;
    case AdvShape::Scalar:
      adv_shape = {};
      break;
  }
  std::int64_t adv_n = 1;
  for (auto s : adv_shape) adv_n *= s;
  std::vector<double> adv(adv_n);
  for (auto& a : adv) a = normal(g);
  in.advantages = torch::tensor(adv, dbl).reshape(adv_shape).to(d.adv_dtype);
  const Tensor m = torch::tensor(mask, dbl).reshape(shape);
  if (d.mask == MaskKind::Bool) in.mask = m != 0;
  if (d.mask == MaskKind::Weights) in.mask = m.to(torch::kFloat);
  return in;
}

/// The reference on exactly the values psft receives. Advantages of shape
/// [B] or [B, 1] are one per sequence, 0-d one for all; no mask: all count.
reference::Result run_reference(const Inputs& in, const psft::LossOptions& o) {
  const Tensor& logp = in.logp;
  const std::int64_t rows = logp.dim() == 2 ? logp.size(0) : 1;
  const std::int64_t cols = logp.dim() == 2 ? logp.size(1) : logp.size(0);
  Tensor adv;
  if (in.advantages.defined()) {
    adv = in.advantages.detach().to(torch::kDouble);
    if (adv.dim() == 1 && logp.dim() == 2) adv = adv.unsqueeze(1);
    adv = adv.expand(logp.sizes());
  } else {
    adv = torch::ones(logp.sizes(), torch::kDouble);
  }
  const Tensor mask = in.mask.defined() ? in.mask : torch::ones(logp.sizes(), torch::kDouble);
  return reference::clipped_loss(static_cast<std::size_t>(rows), static_cast<std::size_t>(cols),
                                 values(logp), values(in.old_logp), values(adv), values(mask),
                                 settings_for(o));
}

/// policy_loss, or psft_loss (A = 1) where in has no advantages.
psft::LossResult call(const Inputs& in, const psft::LossOptions& o) {
  if (!in.advantages.defined()) return psft::psft_loss(in.logp, in.old_logp, in.mask, o);
  return psft::policy_loss(in.logp, in.old_logp, in.advantages, in.mask, o);
}

Tensor grad_of(const Tensor& loss, const Tensor& logp) {
  return torch::autograd::grad({loss}, {logp}, {}, /*retain_graph=*/true)[0];
}

std::int64_t count_mismatches(const Tensor& got, const std::vector<double>& expected, double rtol,
                              double atol) {
  const std::vector<double> g = values(got);
  if (g.size() != expected.size()) return -1;
  std::int64_t bad = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (!close(g[i], expected[i], rtol, atol)) {
      if (bad < 5) UNSCOPED_INFO("element " << i << ": " << g[i] << ", expected " << expected[i]);
      ++bad;
    }
  }
  return bad;
}

double item(const Tensor& t) { return t.item<double>(); }

void check_metrics(const psft::LossMetrics& m, const reference::Metrics& e, double tol) {
  const Tensor fields[] = {m.clip_frac,    m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low,
                           m.approx_kl_k1, m.approx_kl_k3,   m.ratio_mean,     m.ratio_min,
                           m.ratio_max,    m.token_count};
  for (const Tensor& f : fields) {
    REQUIRE(f.defined());
    CHECK(f.dim() == 0);
    CHECK(f.scalar_type() == torch::kDouble);
  }
  CHECK(close(item(m.clip_frac), e.clip_frac, tol, tol));
  CHECK(close(item(m.clip_frac_dual), e.clip_frac_dual, tol, tol));
  CHECK(close(item(m.clip_frac_high), e.clip_frac_high, tol, tol));
  CHECK(close(item(m.clip_frac_low), e.clip_frac_low, tol, tol));
  CHECK(close(item(m.approx_kl_k1), e.approx_kl_k1, tol, tol));
  CHECK(close(item(m.approx_kl_k3), e.approx_kl_k3, tol, tol));
  CHECK(close(item(m.ratio_mean), e.ratio_mean, tol, tol));
  CHECK(close(item(m.ratio_min), e.ratio_min, tol, tol));
  CHECK(close(item(m.ratio_max), e.ratio_max, tol, tol));
  CHECK(close(item(m.token_count), e.token_count, 1e-12));
}

/// Loss, autograd gradient and every metric of `result` against the reference.
void check_against_reference(const psft::LossResult& result, const Tensor& logp,
                             const reference::Result& e, const Tolerance& tol) {
  const Tensor& loss = result.loss;
  CHECK(loss.dim() == 0);
  CHECK(loss.scalar_type() ==
        (logp.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat));
  INFO("loss " << item(loss) << ", reference " << e.loss << " (magnitude " << e.loss_magnitude
               << ")");
  CHECK(std::fabs(item(loss) - e.loss) <= tol.loss * e.loss_magnitude);
  if (logp.requires_grad()) {
    REQUIRE(loss.requires_grad());
    const Tensor grad = grad_of(loss, logp);
    CHECK(grad.scalar_type() == logp.scalar_type());
    CHECK(grad.sizes() == logp.sizes());
    CHECK(count_mismatches(grad, e.grad, tol.grad, tol.grad_atol) == 0);
  }
  check_metrics(result.metrics, e.metrics, tol.metric);
}

#define BACKEND_INFO(backend) INFO("backend " << psft::backend_name(backend))

}  // namespace

// ---------------------------------------------------------------------------
// Values against the reference

TEST_CASE("policy_loss matches the reference for every backend, reduction and dual clip",
          "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const psft::Reduction reduction =
      GENERATE(from_range(std::begin(kReductions), std::end(kReductions)));
  const double dual = GENERATE(0.0, 3.0, 10.0);
  const MaskKind mask = GENERATE(MaskKind::Bool, MaskKind::Weights, MaskKind::None);
  BACKEND_INFO(backend);
  INFO(name_of(reduction) << " dual " << dual << " mask kind " << static_cast<int>(mask));
  Draw d;
  d.seed = 100 + static_cast<std::uint32_t>(reduction) * 7 + static_cast<std::uint32_t>(dual);
  d.mask = mask;
  const Inputs in = draw(d);
  psft::LossOptions o =
      options(backend, reduction, dual > 0 ? std::optional<double>(dual) : std::nullopt);
  const reference::Result e = run_reference(in, o);
  check_against_reference(call(in, o), in.logp, e, tolerance_for(torch::kDouble));
  // The draw exercises the clips.
  CHECK(e.metrics.clip_frac > 0.05);
  CHECK(e.metrics.clip_frac_high > 0.0);
  CHECK(e.metrics.clip_frac_low > 0.0);
  if (dual > 0) CHECK(e.metrics.clip_frac_dual > 0.0);

  SECTION("asymmetric eps, global counts, world size and norm constant") {
    o.clip.eps_low = 0.05;
    o.clip.eps_high = 0.6;
    psft::Normaliser n;
    n.tokens = 2000.0;
    n.sequences = 50.0;
    n.world_size = 4;
    o.normaliser = n;
    o.norm_constant = 64.0;
    check_against_reference(call(in, o), in.logp, run_reference(in, o),
                            tolerance_for(torch::kDouble));
  }
  SECTION("TRL's delta bounds the unclipped ratio") {
    o.clip.delta = 1.6;
    const reference::Result with_delta = run_reference(in, o);
    check_against_reference(call(in, o), in.logp, with_delta, tolerance_for(torch::kDouble));
    CHECK(with_delta.loss != e.loss);  // the draw has A < 0 tokens with r > delta
  }
  SECTION("empty rows counted in S (TRL grpo, verl global_batch_size)") {
    o.count_empty_sequences = true;
    check_against_reference(call(in, o), in.logp, run_reference(in, o),
                            tolerance_for(torch::kDouble));
  }
  SECTION("without autograd (logp does not require grad)") {
    Inputs plain = in;
    plain.logp = in.logp.detach();
    const psft::LossResult r = call(plain, o);
    CHECK_FALSE(r.loss.requires_grad());
    check_against_reference(r, plain.logp, e, tolerance_for(torch::kDouble));
  }
  SECTION("under NoGradGuard") {
    torch::NoGradGuard no_grad;
    const psft::LossResult r = call(in, o);
    CHECK_FALSE(r.loss.requires_grad());
    CHECK(std::fabs(item(r.loss) - e.loss) <= 1e-12 * e.loss_magnitude);
    check_metrics(r.metrics, e.metrics, 1e-12);
  }
}

TEST_CASE("every logp dtype matches the reference on the same rounded inputs",
          "[policy_loss][dtype]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype =
      GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf);
  const bool old_fp32 = GENERATE(true, false);  // false: old_logp in logp's dtype
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  BACKEND_INFO(backend);
  INFO("logp " << dtype << (old_fp32 ? ", old_logp float32" : ", old_logp same dtype") << ", "
               << name_of(reduction));
  Draw d;
  d.seed = 2000 + static_cast<std::uint32_t>(reduction);
  d.rows = 7;
  d.cols = 45;
  d.logp_dtype = dtype;
  d.old_dtype = old_fp32 && dtype != torch::kDouble ? torch::kFloat : dtype;
  d.adv_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  d.mask = MaskKind::Weights;
  if (dtype == torch::kHalf) d.in_range_max = 8.0;
  const Inputs in = draw(d);
  const psft::LossOptions o = options(backend, reduction, 3.0);
  check_against_reference(call(in, o), in.logp, run_reference(in, o), tolerance_for(dtype));
}

TEST_CASE("mixed dtypes: bf16 logp, fp32 old_logp, bf16 advantages, fp16 mask weights",
          "[policy_loss][dtype]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  Draw d;
  d.seed = 31;
  d.logp_dtype = torch::kBFloat16;
  d.old_dtype = torch::kFloat;
  d.adv_dtype = torch::kBFloat16;
  d.mask = MaskKind::Weights;
  Inputs in = draw(d);
  in.mask = in.mask.to(torch::kHalf);
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 10.0);
    check_against_reference(call(in, o), in.logp, run_reference(in, o),
                            tolerance_for(torch::kBFloat16));
  }
}

TEST_CASE("advantages of shape [B, T], [B, 1], [B] and 0-d", "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const AdvShape shape =
      GENERATE(AdvShape::PerToken, AdvShape::Column, AdvShape::Row, AdvShape::Scalar);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat);
  BACKEND_INFO(backend);
  INFO("advantage shape " << static_cast<int>(shape) << " " << dtype);
  Draw d;
  d.seed = 3000 + static_cast<std::uint32_t>(shape);
  d.rows = 9;  // B != T, so that [B] cannot pass as a trailing broadcast
  d.cols = 23;
  d.logp_dtype = d.old_dtype = d.adv_dtype = dtype;
  d.adv = shape;
  const Inputs in = draw(d);
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    check_against_reference(call(in, o), in.logp, run_reference(in, o), tolerance_for(dtype));
  }
  if (shape == AdvShape::Row) {
    // A [B] tensor is one advantage per sequence: the same as [B, 1].
    Inputs column = in;
    column.advantages = in.advantages.unsqueeze(1);
    const psft::LossOptions o = options(backend, psft::Reduction::TokenMean);
    CHECK(item(call(in, o).loss) == item(call(column, o).loss));
  }
}

TEST_CASE("psft_loss is the clipped objective with A = 1", "[psft_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16);
  BACKEND_INFO(backend);
  INFO(dtype);
  Draw d;
  d.seed = 404;
  d.logp_dtype = dtype;
  d.old_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  Inputs in = draw(d);
  in.advantages = Tensor();  // the reference takes A = 1
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    psft::LossOptions o = options(backend, reduction, 3.0);
    o.clip.eps_low = 0.9;  // never binds with A = 1
    const psft::LossResult r = psft::psft_loss(in.logp, in.old_logp, in.mask, o);
    check_against_reference(r, in.logp, run_reference(in, o), tolerance_for(dtype));
    CHECK(item(r.metrics.clip_frac_low) == 0.0);
    CHECK(item(r.metrics.clip_frac_dual) == 0.0);
    CHECK(item(r.metrics.clip_frac) == item(r.metrics.clip_frac_high));
    CHECK(item(r.metrics.clip_frac_high) > 0.0);
  }
}

TEST_CASE("log-ratios of +-30 are clamped; the bounds +-20 pass no gradient", "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat);
  BACKEND_INFO(backend);
  INFO(dtype);
  // old = -5 and integral log-ratios: every value is exact in float.
  const Tensor d =
      torch::tensor({30.0, -30.0, 20.0, -20.0, 21.0, -21.0, 0.0, 19.5}, torch::kDouble);
  const Tensor old = torch::full({2, 8}, -5.0, torch::kDouble).to(dtype);
  Inputs in;
  in.logp = (old.to(torch::kDouble) + d).to(dtype).requires_grad_();
  in.old_logp = old;
  in.advantages = torch::tensor({-0.5, 1.0}, torch::kDouble).to(dtype);  // per row
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction);
    const psft::LossResult r = call(in, o);
    check_against_reference(r, in.logp, run_reference(in, o), tolerance_for(dtype));
    CHECK(std::isfinite(item(r.loss)));
    CHECK(item(r.metrics.ratio_max) == Approx(std::exp(20.0)).epsilon(1e-6));
    CHECK(item(r.metrics.ratio_min) == Approx(std::exp(-20.0)).epsilon(1e-6));
    const Tensor g = grad_of(call(in, o).loss, in.logp);
    // Clamped, or exactly at a bound: no gradient (torch.clamp's backward
    // since torch 2.14, Note [Gradient at the bounds]).
    for (int c : {0, 1, 2, 3, 4, 5}) {
      CHECK(g[0][c].item<double>() == 0.0);
      CHECK(g[1][c].item<double>() == 0.0);
    }
    CHECK(g[0][7].item<double>() > 0.0);   // A < 0, d = 19.5: inside the clamp
    CHECK(g[1][7].item<double>() == 0.0);  // A > 0, r = e^19.5: the upper clip binds
  }
}

TEST_CASE("flat [N] inputs: token-mean works, sequence reductions throw", "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16);
  BACKEND_INFO(backend);
  INFO(dtype);
  Draw d;
  d.seed = 55;
  d.rows = 1;
  d.cols = 301;
  d.flat = true;
  d.logp_dtype = dtype;
  d.old_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  d.adv_dtype = d.old_dtype;
  Inputs in = draw(d);
  REQUIRE(in.logp.dim() == 1);
  const psft::LossOptions o = options(backend, psft::Reduction::TokenMean, 3.0);
  check_against_reference(call(in, o), in.logp, run_reference(in, o), tolerance_for(dtype));
  Inputs scalar_adv = in;
  scalar_adv.advantages = torch::tensor(-0.7, torch::kDouble).to(d.adv_dtype);
  check_against_reference(call(scalar_adv, o), in.logp, run_reference(scalar_adv, o),
                          tolerance_for(dtype));
  for (psft::Reduction reduction :
       {psft::Reduction::SeqMeanTokenSum, psft::Reduction::SeqMeanTokenMean,
        psft::Reduction::SeqMeanTokenSumNorm}) {
    INFO(name_of(reduction));
    REQUIRE_THROWS_AS(call(in, options(backend, reduction)), c10::Error);
    REQUIRE_THROWS_WITH(call(in, options(backend, reduction)), Catch::Contains("reduction"));
  }
}

TEST_CASE("non-contiguous inputs: transposed views, step-2 slices, expanded advantages",
          "[policy_loss][strides]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16);
  const bool transposed = GENERATE(true, false);  // false: step-2 slices
  BACKEND_INFO(backend);
  INFO(dtype << (transposed ? " transposed" : " step-2 slices"));
  Draw d;
  d.seed = 77;
  d.rows = 5;
  d.cols = 29;
  d.logp_dtype = dtype;
  d.old_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  d.adv_dtype = d.old_dtype;
  d.adv = AdvShape::Row;
  const Inputs in = draw(d);
  const std::int64_t B = d.rows, T = d.cols;

  // The same values behind other strides.
  const auto strided = [&](const Tensor& t) {
    if (transposed) return t.detach().t().contiguous().t();
    Tensor big = torch::zeros({B, 2 * T}, t.options().requires_grad(false));
    big.slice(1, 0, 2 * T, 2).copy_(t.detach());
    return big.slice(1, 0, 2 * T, 2);
  };
  Inputs nc;
  Tensor logp_base;  // the leaf behind the non-contiguous logp
  if (transposed) {
    logp_base = in.logp.detach().t().contiguous().requires_grad_();
    nc.logp = logp_base.t();
  } else {
    logp_base = torch::zeros({B, 2 * T}, in.logp.options().requires_grad(false));
    logp_base.slice(1, 0, 2 * T, 2).copy_(in.logp.detach());
    logp_base.requires_grad_();
    nc.logp = logp_base.slice(1, 0, 2 * T, 2);
  }
  nc.old_logp = strided(in.old_logp);
  nc.mask = strided(in.mask);
  Tensor adv_big = torch::zeros({2 * B}, in.advantages.options());
  adv_big.slice(0, 0, 2 * B, 2).copy_(in.advantages);
  nc.advantages = adv_big.slice(0, 0, 2 * B, 2);  // [B] with stride 2
  REQUIRE_FALSE(nc.logp.is_contiguous());
  REQUIRE_FALSE(nc.old_logp.is_contiguous());
  REQUIRE_FALSE(nc.mask.is_contiguous());
  REQUIRE_FALSE(nc.advantages.is_contiguous());
  Inputs expanded = nc;  // [B, T] advantages with column stride 0
  expanded.advantages = nc.advantages.unsqueeze(1).expand({B, T});

  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    const reference::Result e = run_reference(in, o);
    const psft::LossResult contiguous = call(in, o);
    const Tensor contiguous_grad = grad_of(contiguous.loss, in.logp);
    for (const Inputs* v : {&nc, &expanded}) {
      const psft::LossResult r = call(*v, o);
      check_against_reference(r, v->logp, e, tolerance_for(dtype));
      if (backend == psft::Backend::FusedCpu) {
        // The fused kernel reads strides directly: bit-identical results.
        CHECK(torch::equal(r.loss, contiguous.loss));
        CHECK(torch::equal(grad_of(call(*v, o).loss, v->logp), contiguous_grad));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Gradients

namespace {

bool away_from_kinks(double d, double dual, double margin) {
  const double kinks[] = {std::log(0.8), std::log(1.28), std::log(dual)};
  for (double k : kinks)
    if (std::fabs(d - k) < margin) return false;
  return std::fabs(std::fabs(d) - 20.0) >= margin;
}

}  // namespace

TEST_CASE("autograd gradient equals central finite differences in double", "[policy_loss][fd]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  BACKEND_INFO(backend);
  INFO(name_of(reduction));
  const double dual = 3.0;
  std::mt19937 g(9000 + static_cast<std::uint32_t>(reduction));
  const std::int64_t B = 4, T = 15;
  std::vector<double> logp(B * T), old(B * T), adv(B * T), mask(B * T);
  for (std::int64_t i = 0; i < B * T; ++i) {
    double d;
    do {
      const std::int64_t c = i % T;
      d = c % 3 == 2 ? std::uniform_real_distribution<double>(-2.5, 2.5)(g)
                     : std::uniform_real_distribution<double>(-0.3, 0.3)(g);
      if (c % 7 == 3) d = (c % 2 ? 1 : -1) * std::uniform_real_distribution<double>(20.5, 30.0)(g);
    } while (!away_from_kinks(d, dual, 1e-3));
    old[i] = -std::uniform_real_distribution<double>(0.1, 5.0)(g);
    logp[i] = old[i] + d;
    adv[i] = std::normal_distribution<double>(0.0, 1.0)(g);
    mask[i] = i % 11 == 4 ? 0.0 : (i % 4 == 1 ? 0.5 : 1.0);
  }
  const auto dbl = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor x = torch::tensor(logp, dbl).reshape({B, T}).requires_grad_();
  const Tensor o_ = torch::tensor(old, dbl).reshape({B, T});
  const Tensor a = torch::tensor(adv, dbl).reshape({B, T});
  const Tensor m = torch::tensor(mask, dbl).reshape({B, T});
  const psft::LossOptions o = options(backend, reduction, dual);
  const Tensor grad = grad_of(psft::policy_loss(x, o_, a, m, o).loss, x);
  const Tensor trusted = psft::trust_region_mask(x.detach(), o_, a, o.clip);

  torch::NoGradGuard no_grad;
  const double h = 1e-6;
  const auto loss_at = [&](std::int64_t i, double delta) {
    Tensor p = x.detach().clone();
    p.view({-1})[i] += delta;
    return psft::policy_loss(p, o_, a, m, o).loss.item<double>();
  };
  int compared = 0, constant = 0;
  for (std::int64_t i = 0; i < B * T; ++i) {
    const double fd = (loss_at(i, h) - loss_at(i, -h)) / (2 * h);
    const double gi = grad.view({-1})[i].item<double>();
    INFO("token " << i << " d = " << logp[i] - old[i] << " A " << adv[i] << " fd " << fd << " grad "
                  << gi);
    if (mask[i] == 0 || !trusted.view({-1})[i].item<bool>()) {
      CHECK(fd == 0.0);
      CHECK(gi == 0.0);
      ++constant;
    } else {
      CHECK(close(gi, fd, 1e-6, 1e-7));
      ++compared;
    }
  }
  CHECK(compared > 20);
  CHECK(constant > 5);
}

TEST_CASE("double backward (create_graph = true) raises", "[policy_loss][autograd]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  const Inputs in = draw(Draw{});
  const psft::LossResult r = call(in, options(backend, psft::Reduction::TokenMean));
  REQUIRE_THROWS_AS(torch::autograd::grad({r.loss}, {in.logp}, {}, true, true), c10::Error);
  const psft::LossResult r2 = call(in, options(backend, psft::Reduction::TokenMean));
  REQUIRE_THROWS_WITH(torch::autograd::grad({r2.loss}, {in.logp}, {}, true, true),
                      Catch::Contains("double backward"));
}

TEST_CASE("backward scales by the incoming gradient and accumulates into .grad",
          "[policy_loss][autograd]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  const Inputs in = draw(Draw{});
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    const reference::Result e = run_reference(in, o);
    in.logp.mutable_grad() = Tensor();
    (call(in, o).loss * 2.5).backward();
    call(in, o).loss.backward();
    std::vector<double> expected = e.grad;
    for (double& v : expected) v *= 3.5;
    CHECK(count_mismatches(in.logp.grad(), expected, 1e-12, 0.0) == 0);
  }
  in.logp.mutable_grad() = Tensor();
}

TEST_CASE("the gradient flows to logp only; metrics are not differentiable",
          "[policy_loss][autograd]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  const Inputs in = draw(Draw{});
  Inputs leaves = in;
  leaves.old_logp = in.old_logp.clone().requires_grad_();
  leaves.advantages = in.advantages.clone().requires_grad_();
  leaves.mask = in.mask.to(torch::kDouble).requires_grad_();
  const psft::LossOptions o = options(backend, psft::Reduction::SeqMeanTokenMean, 3.0);
  const psft::LossResult r = call(leaves, o);
  const auto grads = torch::autograd::grad(
      {r.loss}, {leaves.logp, leaves.old_logp, leaves.advantages, leaves.mask}, {},
      /*retain_graph=*/true, /*create_graph=*/false, /*allow_unused=*/true);
  REQUIRE(grads.size() == 4);
  REQUIRE(grads[0].defined());
  CHECK(count_mismatches(grads[0], run_reference(in, o).grad, 1e-12, 0.0) == 0);
  for (std::size_t k = 1; k < 4; ++k) {
    // Either no gradient at all, or an explicit zero.
    CHECK((!grads[k].defined() || (grads[k] == 0).all().item<bool>()));
  }
  const Tensor metrics[] = {r.metrics.clip_frac,      r.metrics.clip_frac_dual,
                            r.metrics.clip_frac_high, r.metrics.clip_frac_low,
                            r.metrics.approx_kl_k1,   r.metrics.approx_kl_k3,
                            r.metrics.ratio_mean,     r.metrics.ratio_min,
                            r.metrics.ratio_max,      r.metrics.token_count};
  for (const Tensor& m : metrics) CHECK_FALSE(m.requires_grad());
}

TEST_CASE(
    "the gradient written in the forward pass: scaled by grad_output, unchanged by a second "
    "backward and by accumulation into logp.grad",
    "[policy_loss][autograd]") {
  // The fused CPU backend saves d loss / d logp for grad_output 1 and hands
  // it on (Note [Gradient in the forward pass]); the composed one runs a
  // backward pass. Both must scale by grad_output and leave the saved
  // gradient intact for a retained graph.
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16);
  BACKEND_INFO(backend);
  INFO("dtype " << dtype);
  Draw d;
  d.seed = 5;
  d.cols = 300;  // whole vectors and a tail
  d.logp_dtype = d.old_dtype = d.adv_dtype = dtype;
  const Inputs in = draw(d);
  const psft::LossOptions o = options(backend, psft::Reduction::SeqMeanTokenMean, 3.0);
  const std::vector<double> ref = run_reference(in, o).grad;
  const double tol = dtype == torch::kDouble ? 1e-12 : dtype == torch::kFloat ? 1e-5 : 1e-2;
  std::vector<double> scaled(ref), doubled(ref);
  for (double& v : scaled) v *= -0.3;
  for (double& v : doubled) v *= 2.0;

  const psft::LossResult r = call(in, o);
  CHECK(count_mismatches(grad_of(r.loss * -0.3, in.logp), scaled, tol, tol * 1e-3) == 0);
  CHECK(count_mismatches(grad_of(r.loss, in.logp), ref, tol, tol * 1e-3) == 0);
  // Two backward passes through the retained graph accumulate 2x into the
  // leaf's .grad; the saved gradient itself stays what it was.
  r.loss.backward({}, /*retain_graph=*/true);
  r.loss.backward({}, /*retain_graph=*/true);
  CHECK(count_mismatches(in.logp.grad(), doubled, tol, tol * 1e-3) == 0);
  CHECK(count_mismatches(grad_of(r.loss, in.logp), ref, tol, tol * 1e-3) == 0);
}

// ---------------------------------------------------------------------------
// Micro-batches, gradient accumulation and data parallelism

TEST_CASE("count_normaliser counts tokens and non-empty sequences", "[normaliser]") {
  Draw d;
  d.seed = 12;
  d.mask = MaskKind::Weights;
  const Inputs in = draw(d);
  for (const Tensor& mask : {in.mask, Tensor(in.mask != 0), in.mask.to(torch::kDouble)}) {
    const std::vector<double> w = values(mask);
    double tokens = 0, sequences = 0;
    for (std::int64_t r = 0; r < d.rows; ++r) {
      double n = 0;
      for (std::int64_t c = 0; c < d.cols; ++c) n += w[r * d.cols + c];
      tokens += n;
      sequences += n > 0;
    }
    const psft::Normaliser n = psft::count_normaliser(mask);
    REQUIRE(n.tokens.has_value());
    REQUIRE(n.sequences.has_value());
    CHECK(*n.tokens == tokens);
    CHECK(*n.sequences == sequences);
    CHECK(sequences == d.rows - 1);  // row 1 is empty
    CHECK(n.world_size == 1);
    const psft::Normaliser flat = psft::count_normaliser(mask.reshape({-1}));
    CHECK(*flat.tokens == tokens);
    CHECK(*flat.sequences == 1.0);
  }
  const psft::Normaliser empty = psft::count_normaliser(torch::zeros({0, 4}, torch::kBool));
  CHECK(*empty.tokens == 0.0);
  CHECK(*empty.sequences == 0.0);
  REQUIRE_THROWS_WITH(psft::count_normaliser(torch::ones({2, 3, 4})), Catch::Contains("mask"));
}

namespace {

Inputs rows_of(const Inputs& in, std::int64_t begin, std::int64_t end) {
  Inputs part;
  part.logp = in.logp.detach().slice(0, begin, end).clone().requires_grad_();
  part.old_logp = in.old_logp.slice(0, begin, end);
  part.advantages = in.advantages.dim() == 0 ? in.advantages : in.advantages.slice(0, begin, end);
  part.mask = in.mask.slice(0, begin, end);
  return part;
}

}  // namespace

TEST_CASE("micro-batches with a global Normaliser reproduce the full batch, also over ranks",
          "[normaliser]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const psft::Reduction reduction =
      GENERATE(psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
               psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat);
  const std::int64_t world_size = GENERATE(1, 2);
  BACKEND_INFO(backend);
  INFO(name_of(reduction) << " " << dtype << " world size " << world_size);
  Draw d;
  d.seed = 4321 + static_cast<std::uint32_t>(reduction);
  d.rows = 11;
  d.cols = 33;
  d.logp_dtype = dtype;
  d.old_dtype = d.adv_dtype = dtype;
  d.adv = AdvShape::Column;
  d.mask = MaskKind::Weights;
  const Inputs in = draw(d);

  const psft::LossOptions full_opts = options(backend, reduction, 3.0);
  const psft::LossResult full = call(in, full_opts);
  const reference::Result e = run_reference(in, full_opts);
  check_against_reference(full, in.logp, e, tolerance_for(dtype));
  const Tensor full_grad = grad_of(full.loss, in.logp);

  // Four micro-batches (rows [0,3), [3,4), [4,8), [8,11)); with two ranks,
  // rank 0 owns the first two and rank 1 the others.
  const std::int64_t bounds[] = {0, 3, 4, 8, 11};
  std::vector<Inputs> parts;
  psft::Normaliser step;
  for (int k = 0; k < 4; ++k) {
    parts.push_back(rows_of(in, bounds[k], bounds[k + 1]));
    step += psft::count_normaliser(parts.back().mask);
  }
  step.world_size = world_size;
  psft::LossOptions o = full_opts;
  o.normaliser = step;

  // Tolerances "to rounding": float64 1e-12, float32 (each micro-batch loss
  // rounded to float once more) 1e-6.
  const double rtol = dtype == torch::kDouble ? 1e-12 : 1e-6;
  double loss_sum = 0;
  std::vector<Tensor> grads;
  for (const Inputs& p : parts) {
    const psft::LossResult r = call(p, o);
    loss_sum += item(r.loss);
    grads.push_back(grad_of(r.loss, p.logp));
  }
  const double D = static_cast<double>(world_size);
  CHECK(std::fabs(loss_sum / D - item(full.loss)) <= rtol * e.loss_magnitude);
  // DDP averages the ranks' gradients: each token's gradient divided by D.
  const Tensor accumulated = torch::cat(grads, 0).to(torch::kDouble) / D;
  CHECK(count_mismatches(accumulated, values(full_grad), rtol, 0.0) == 0);

  SECTION("a micro-batch's own counts would change the objective") {
    // Sanity check that the test can fail: without the normaliser, the
    // sum of the parts differs from the full batch (except for the
    // constant-normalised reduction).
    double naive = 0;
    for (const Inputs& p : parts) naive += item(call(p, full_opts).loss);
    if (reduction != psft::Reduction::SeqMeanTokenSumNorm)
      CHECK(std::fabs(naive - item(full.loss)) > 1e-3 * e.loss_magnitude);
  }
}

// ---------------------------------------------------------------------------
// Empty, fully masked and poisoned batches

TEST_CASE("empty and fully masked batches: loss 0 on the graph, zero grads, neutral metrics",
          "[policy_loss][empty]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat, torch::kBFloat16);
  const int shape_kind = GENERATE(0, 1, 2, 3);  // [0, T], [B, 0], [0], fully masked [B, T]
  BACKEND_INFO(backend);
  std::vector<std::int64_t> shape;
  switch (shape_kind) {
    case 0:
      shape = {0, 7};
      break;
    case 1:
      shape = {4, 0};
      break;
    case 2:
      shape = {0};
      break;
    default:
      shape = {4, 7};
      break;
  }
  INFO(dtype << " shape " << c10::IntArrayRef(shape) << (shape_kind == 3 ? " fully masked" : ""));
  const Tensor logp = torch::randn(shape, torch::kDouble).to(dtype).requires_grad_();
  const Tensor old = torch::randn(shape, torch::kFloat);
  const Tensor adv = torch::randn(shape, torch::kFloat);
  const Tensor mask = torch::zeros(shape, torch::kBool);
  for (psft::Reduction reduction : kReductions) {
    if (shape.size() == 1 && reduction != psft::Reduction::TokenMean) continue;
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    const psft::LossResult r = psft::policy_loss(logp, old, adv, mask, o);
    CHECK(item(r.loss) == 0.0);
    CHECK(r.loss.requires_grad());
    logp.mutable_grad() = Tensor();
    r.loss.backward();
    const Tensor g = logp.grad();
    REQUIRE(g.defined());
    CHECK(g.sizes() == logp.sizes());
    CHECK(g.isfinite().all().item<bool>());
    CHECK((g == 0).all().item<bool>());
    check_metrics(r.metrics, reference::Metrics{}, 0.0);
    const Tensor mf = r.metrics.token_count;
    CHECK_FALSE(torch::stack({r.metrics.clip_frac, r.metrics.approx_kl_k1, r.metrics.approx_kl_k3,
                              r.metrics.ratio_mean, r.metrics.ratio_min, mf})
                    .isnan()
                    .any()
                    .item<bool>());
    const Tensor trusted = psft::trust_region_mask(logp, old, adv, o.clip);
    CHECK(trusted.scalar_type() == torch::kBool);
    CHECK(trusted.sizes() == logp.sizes());
    // The same with psft_loss and with no mask at all on an empty batch.
    const psft::LossResult p = psft::psft_loss(logp, old, mask, o);
    CHECK(item(p.loss) == 0.0);
    CHECK(p.loss.requires_grad());
    if (logp.numel() == 0) {
      const psft::LossResult u = psft::policy_loss(logp, old, adv, Tensor(), o);
      CHECK(item(u.loss) == 0.0);
      check_metrics(u.metrics, reference::Metrics{}, 0.0);
    }
  }
}

TEST_CASE("masked positions with NaN or Inf in old_logp and advantages are ignored",
          "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat);
  BACKEND_INFO(backend);
  INFO(dtype);
  Draw d;
  d.seed = 666;
  d.logp_dtype = d.old_dtype = d.adv_dtype = dtype;
  d.mask = MaskKind::Weights;
  Inputs in = draw(d);
  const Tensor masked = in.mask == 0;
  in.old_logp = in.old_logp.masked_fill(masked, kNaN);
  in.advantages =
      in.advantages.masked_fill(masked, kInf)
          .masked_fill(torch::logical_and(masked, torch::rand_like(in.mask) < 0.5), kNaN);
  REQUIRE(in.old_logp.isnan().any().item<bool>());
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    const psft::LossResult r = call(in, o);  // check_finite is on: must not throw
    check_against_reference(r, in.logp, run_reference(in, o), tolerance_for(dtype));
    CHECK(grad_of(call(in, o).loss, in.logp).isfinite().all().item<bool>());
  }
}

TEST_CASE("exact ties at a clip bound get half the gradient, as torch autograd gives",
          "[policy_loss]") {
  // eps 0 and r = 1: L1 == L2 with the clip at its bound. torch.maximum sends
  // half the gradient to each side and (torch >= 2.14) the clamp passes none
  // at its bound, so d l / d logp = -A / 2 (Note [Gradient at the bounds]).
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  Inputs in;
  const Tensor old = torch::full({2, 16}, -1.5, torch::kDouble);
  in.logp = old.clone().requires_grad_();
  in.old_logp = old;
  in.advantages = torch::tensor({1.0, -2.0}, torch::kDouble);
  psft::LossOptions o = options(backend, psft::Reduction::TokenSum);
  o.clip.eps_low = 0.0;
  o.clip.eps_high = 0.0;
  check_against_reference(call(in, o), in.logp, run_reference(in, o),
                          tolerance_for(torch::kDouble));
  const Tensor g = grad_of(call(in, o).loss, in.logp);
  CHECK(g[0][3].item<double>() == -0.5);
  CHECK(g[1][3].item<double>() == 1.0);
}

TEST_CASE("logp == old_logp (lr = 0): ratio exactly 1, nothing clipped", "[policy_loss]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  const torch::Dtype dtype = GENERATE(torch::kFloat, torch::kBFloat16, torch::kHalf);
  BACKEND_INFO(backend);
  INFO(dtype);
  Draw d;
  d.seed = 8;
  d.logp_dtype = dtype;
  d.adv_dtype = torch::kFloat;
  Inputs in = draw(d);
  // old_logp in fp32, computed from the same values (the recommended setup).
  in.old_logp = in.logp.detach().to(torch::kFloat);
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(backend, reduction, 3.0);
    const psft::LossResult r = call(in, o);
    check_against_reference(r, in.logp, run_reference(in, o), tolerance_for(dtype));
    CHECK(item(r.metrics.ratio_mean) == 1.0);
    CHECK(item(r.metrics.ratio_min) == 1.0);
    CHECK(item(r.metrics.ratio_max) == 1.0);
    CHECK(item(r.metrics.clip_frac) == 0.0);
    CHECK(item(r.metrics.clip_frac_high) == 0.0);
    CHECK(item(r.metrics.clip_frac_low) == 0.0);
    CHECK(item(r.metrics.clip_frac_dual) == 0.0);
    CHECK(item(r.metrics.approx_kl_k1) == 0.0);
    CHECK(item(r.metrics.approx_kl_k3) == 0.0);
    // Every unmasked token is in the trust region.
    const Tensor trusted =
        psft::trust_region_mask(in.logp.detach(), in.old_logp, in.advantages, o.clip);
    CHECK(trusted.all().item<bool>());
  }
}

// ---------------------------------------------------------------------------
// Determinism

TEST_CASE("fused CPU results are bitwise identical for 1, 2 and 3 threads",
          "[policy_loss][determinism]") {
  const torch::Dtype dtype = GENERATE(torch::kFloat, torch::kBFloat16);
  INFO(dtype);
  Draw d;
  d.seed = 1;
  d.rows = 24;
  d.cols = 5000;  // several chunks per row, many work units
  d.logp_dtype = dtype;
  d.old_dtype = torch::kFloat;
  d.adv_dtype = torch::kFloat;
  d.mask = MaskKind::Weights;
  const Inputs in = draw(d);
  const int saved = at::get_num_threads();
  for (psft::Reduction reduction : kReductions) {
    INFO(name_of(reduction));
    const psft::LossOptions o = options(psft::Backend::FusedCpu, reduction, 3.0);
    std::vector<Tensor> losses, grads, metrics;
    for (int threads : {1, 2, 3}) {
      at::set_num_threads(threads);
      const psft::LossResult r = call(in, o);
      losses.push_back(r.loss.detach());
      grads.push_back(grad_of(r.loss, in.logp));
      metrics.push_back(
          torch::stack({r.metrics.clip_frac, r.metrics.approx_kl_k1, r.metrics.approx_kl_k3,
                        r.metrics.ratio_mean, r.metrics.token_count}));
    }
    at::set_num_threads(saved);
    for (std::size_t k = 1; k < losses.size(); ++k) {
      CHECK(torch::equal(losses[k], losses[0]));
      CHECK(torch::equal(grads[k], grads[0]));
      CHECK(torch::equal(metrics[k], metrics[0]));
    }
    const reference::Result e = run_reference(in, o);
    CHECK(std::fabs(item(losses[0]) - e.loss) <= tolerance_for(dtype).loss * e.loss_magnitude);
    CHECK(count_mismatches(grads[0], e.grad, tolerance_for(dtype).grad, 0.0) == 0);
  }
  at::set_num_threads(saved);
}

TEST_CASE("every instruction set this CPU runs: values, gradient, metrics, threads, lr = 0",
          "[policy_loss][isa]") {
  namespace cpu = psft::cpu;
  const cpu::CpuCapability saved = cpu::cpu_capability();
  const int saved_threads = at::get_num_threads();
  INFO("this CPU: up to " << cpu::capability_name(cpu::detected_cpu_capability()));
  for (int level = 0; level <= static_cast<int>(cpu::detected_cpu_capability()); ++level) {
    const auto c = static_cast<cpu::CpuCapability>(level);
    cpu::set_cpu_capability(c);
    REQUIRE(cpu::cpu_capability() == c);
    for (const torch::Dtype dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      for (const MaskKind mask : {MaskKind::Bool, MaskKind::Weights, MaskKind::None}) {
        // Per-token advantages, one 0-d advantage, none (A = 1: the kernel's
        // blocks compiled with A known).
        for (const int adv : {0, 1, 2}) {
          INFO(cpu::capability_name(c)
               << " " << dtype << " mask " << static_cast<int>(mask) << " advantages " << adv);
          Draw d;
          d.seed = 4000 + static_cast<std::uint32_t>(level);
          d.rows = 5;
          d.cols = 300;  // one whole block of 256 tokens and a ragged tail per row
          d.logp_dtype = dtype;
          d.old_dtype = torch::kFloat;
          d.adv_dtype = torch::kFloat;
          d.mask = mask;
          d.adv = adv == 0 ? AdvShape::PerToken : AdvShape::Scalar;
          if (dtype == torch::kHalf) d.in_range_max = 8.0;
          Inputs in = draw(d);
          if (adv == 2) in.advantages = Tensor();
          const psft::LossOptions o =
              options(psft::Backend::FusedCpu, psft::Reduction::SeqMeanTokenMean, 3.0);
          check_against_reference(call(in, o), in.logp, run_reference(in, o), tolerance_for(dtype));
          // Bitwise the same for 1 and 3 threads.
          std::vector<Tensor> got;
          for (const int threads : {1, 3}) {
            at::set_num_threads(threads);
            const psft::LossResult r = call(in, o);
            got.push_back(torch::cat({r.loss.detach().to(torch::kDouble).reshape({1}),
                                      grad_of(r.loss, in.logp).to(torch::kDouble).reshape({-1}),
                                      r.metrics.approx_kl_k3.reshape({1}),
                                      r.metrics.ratio_max.reshape({1})}));
          }
          at::set_num_threads(saved_threads);
          CHECK(torch::equal(got[0], got[1]));
          // lr = 0: the ratio is exactly 1 and nothing clips.
          Inputs unchanged = in;
          unchanged.old_logp = in.logp.detach();
          const psft::LossResult same = call(unchanged, o);
          CHECK(item(same.metrics.ratio_min) == 1.0);
          CHECK(item(same.metrics.ratio_max) == 1.0);
          CHECK(item(same.metrics.clip_frac) == 0.0);
        }
      }
    }
  }
  cpu::set_cpu_capability(saved);
}

// ---------------------------------------------------------------------------
// trust_region_mask

TEST_CASE("trust_region_mask matches the reference indicator", "[trust_region_mask]") {
  const torch::Dtype dtype = GENERATE(torch::kDouble, torch::kFloat);
  const AdvShape shape = GENERATE(AdvShape::PerToken, AdvShape::Row, AdvShape::Scalar);
  const double dual = GENERATE(0.0, 3.0);
  INFO(dtype << " advantage shape " << static_cast<int>(shape) << " dual " << dual);
  Draw d;
  d.seed = 1111 + static_cast<std::uint32_t>(shape);
  d.rows = 8;
  d.cols = 40;
  d.logp_dtype = d.old_dtype = d.adv_dtype = dtype;
  d.adv = shape;
  d.mask = MaskKind::None;
  const Inputs in = draw(d);
  psft::ClipOptions clip;
  if (dual > 0) clip.dual_clip = dual;
  const Tensor got = psft::trust_region_mask(in.logp, in.old_logp, in.advantages, clip);
  CHECK(got.scalar_type() == torch::kBool);
  CHECK(got.sizes() == in.logp.sizes());
  psft::LossOptions o;
  o.clip = clip;
  const reference::Result e = run_reference(in, o);
  const std::vector<double> g = values(got);
  std::int64_t bad = 0, trusted = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    bad += (g[i] != 0) != (e.trusted[i] != 0);
    trusted += e.trusted[i] != 0;
  }
  CHECK(bad == 0);
  CHECK(trusted > 0);
  CHECK(trusted < static_cast<std::int64_t>(g.size()));

  // PSFT (A = 1): undefined advantages.
  Inputs ones = in;
  ones.advantages = Tensor();
  const Tensor psft_mask = psft::trust_region_mask(in.logp, in.old_logp, Tensor(), clip);
  const reference::Result e1 = run_reference(ones, o);
  const std::vector<double> g1 = values(psft_mask);
  bad = 0;
  for (std::size_t i = 0; i < g1.size(); ++i) bad += (g1[i] != 0) != (e1.trusted[i] != 0);
  CHECK(bad == 0);

  // Flat [N].
  const Tensor flat =
      psft::trust_region_mask(in.logp.reshape({-1}), in.old_logp.reshape({-1}), Tensor(), clip);
  CHECK(torch::equal(flat, psft_mask.reshape({-1})));
  REQUIRE_THROWS_WITH(psft::trust_region_mask(in.logp, in.old_logp.slice(1, 0, 5)),
                      Catch::Contains("old_logp"));
}

// ---------------------------------------------------------------------------
// Backends and validation

TEST_CASE("backend_for picks the fused CPU kernel and rejects impossible requests", "[backend]") {
  const Tensor t = torch::zeros({2, 3});
  CHECK(psft::backend_for(t) == psft::Backend::FusedCpu);
  CHECK(psft::backend_for(t, psft::Backend::Auto) == psft::Backend::FusedCpu);
  CHECK(psft::backend_for(t, psft::Backend::FusedCpu) == psft::Backend::FusedCpu);
  CHECK(psft::backend_for(t, psft::Backend::Composed) == psft::Backend::Composed);
  REQUIRE_THROWS_AS(psft::backend_for(t, psft::Backend::FusedCuda), c10::Error);
  REQUIRE_THROWS_WITH(psft::backend_for(t, psft::Backend::FusedCuda), Catch::Contains("FusedCuda"));

  Inputs in = draw(Draw{});
  psft::LossOptions o;
  o.backend = psft::Backend::FusedCuda;
  REQUIRE_THROWS_WITH(call(in, o), Catch::Contains("FusedCuda"));
  // Auto gives the fused CPU result bit for bit.
  o.backend = psft::Backend::Auto;
  const psft::LossResult a = call(in, o);
  o.backend = psft::Backend::FusedCpu;
  CHECK(torch::equal(a.loss, call(in, o).loss));
}

TEST_CASE("bad inputs raise c10::Error naming the argument", "[policy_loss][errors]") {
  const psft::Backend backend = GENERATE(psft::Backend::FusedCpu, psft::Backend::Composed);
  BACKEND_INFO(backend);
  Draw d;
  d.rows = 3;
  d.cols = 5;
  d.logp_dtype = torch::kFloat;
  d.old_dtype = torch::kFloat;
  d.adv_dtype = torch::kFloat;
  const Inputs in = draw(d);
  const psft::LossOptions o = options(backend, psft::Reduction::TokenMean);
  const Tensor logp = in.logp, old = in.old_logp, adv = in.advantages, mask = in.mask;
  const auto loss = [&](const Tensor& l, const Tensor& ol, const Tensor& a, const Tensor& m,
                        const psft::LossOptions& opts) {
    return psft::policy_loss(l, ol, a, m, opts);
  };
#define REQUIRE_ERROR_NAMING(expr, name)              \
  do {                                                \
    REQUIRE_THROWS_AS(expr, c10::Error);              \
    REQUIRE_THROWS_WITH(expr, Catch::Contains(name)); \
  } while (false)

  SECTION("dtypes") {
    REQUIRE_ERROR_NAMING(loss(torch::randint(0, 3, {3, 5}), old, adv, mask, o), ": logp must");
    REQUIRE_ERROR_NAMING(loss(logp, old.to(torch::kInt), adv, mask, o), "old_logp");
    REQUIRE_ERROR_NAMING(loss(logp, old, adv.to(torch::kLong), mask, o), "advantages");
    // Integer masks must be 0/1 (an int 0/1 mask is accepted, test_robustness).
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask.to(torch::kInt) * 3, o), "mask");
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask.to(torch::kComplexFloat), o), "mask");
  }
  SECTION("shapes") {
    REQUIRE_ERROR_NAMING(
        loss(logp.detach().reshape({3, 5, 1}), old.reshape({3, 5, 1}), adv, mask, o),
        ": logp must");
    REQUIRE_ERROR_NAMING(loss(logp, torch::zeros({3, 6}), adv, mask, o), "old_logp");
    REQUIRE_ERROR_NAMING(loss(logp, old.t(), adv, mask, o), "old_logp");
    REQUIRE_ERROR_NAMING(loss(logp, old, torch::zeros({3, 6}), mask, o), "advantages");
    REQUIRE_ERROR_NAMING(loss(logp, old, torch::zeros({4}), mask, o), "advantages");
    REQUIRE_ERROR_NAMING(loss(logp, old, torch::zeros({5}), mask, o), "advantages");
    REQUIRE_ERROR_NAMING(loss(logp, old, torch::zeros({3, 2}), mask, o), "advantages");
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, torch::ones({3, 4}, torch::kBool), o), "mask");
    REQUIRE_ERROR_NAMING(loss(logp, old, Tensor(), mask, o), "advantages");
    REQUIRE_ERROR_NAMING(psft::psft_loss(logp, Tensor(), mask, o), "old_logp");
  }
  SECTION("NaN or Inf at unmasked tokens, and the opt-out") {
    Tensor bad_old = old.clone();
    bad_old[2][3] = kNaN;
    Tensor bad_adv = adv.clone();
    bad_adv[0][4] = -kInf;
    const Tensor all = torch::ones({3, 5}, torch::kBool);
    REQUIRE_ERROR_NAMING(loss(logp, bad_old, adv, all, o), "old_logp");
    REQUIRE_ERROR_NAMING(loss(logp, bad_old, adv, Tensor(), o), "old_logp");
    REQUIRE_ERROR_NAMING(loss(logp, old, bad_adv, all, o), "advantages");
    REQUIRE_ERROR_NAMING(psft::psft_loss(logp, bad_old, all, o), "old_logp");
    Tensor bad_mask = torch::ones({3, 5});
    bad_mask[1][1] = -1.0;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, bad_mask, o), "mask");
    psft::LossOptions unchecked = o;
    unchecked.check_finite = false;
    CHECK_NOTHROW(loss(logp, bad_old, bad_adv, all, unchecked));
  }
  SECTION("clip options") {
    psft::LossOptions bad = o;
    bad.clip.eps_low = 1.0;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "eps_low");
    bad.clip.eps_low = 1.5;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "eps_low");
    bad = o;
    bad.clip.eps_high = -0.1;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "eps_high");
    bad = o;
    bad.clip.dual_clip = 1.0;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "dual_clip");
    bad.clip.dual_clip = 0.5;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "dual_clip");
    REQUIRE_ERROR_NAMING(psft::trust_region_mask(logp, old, adv, bad.clip), "dual_clip");
  }
  SECTION("normaliser") {
    psft::LossOptions bad = o;
    bad.normaliser = psft::Normaliser{};
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "normaliser.tokens");
    bad.reduction = psft::Reduction::SeqMeanTokenSum;
    REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "normaliser.sequences");
    bad.normaliser->sequences = 10.0;
    CHECK_NOTHROW(loss(logp, old, adv, mask, bad));
    if (backend == psft::Backend::FusedCpu) {
      // A global count smaller than the batch's own is a bookkeeping bug.
      bad.reduction = psft::Reduction::TokenMean;
      bad.normaliser->tokens = 1.0;
      REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "normaliser.tokens");
      bad.reduction = psft::Reduction::SeqMeanTokenSum;
      bad.normaliser->tokens.reset();
      bad.normaliser->sequences = 1.0;  // the batch has 2 non-empty rows
      REQUIRE_ERROR_NAMING(loss(logp, old, adv, mask, bad), "normaliser.sequences");
    }
  }
#undef REQUIRE_ERROR_NAMING
}

TEST_CASE(
    "every instruction set: a bad input inside a vector block is named, a masked one and "
    "an overflowing log-ratio are not",
    "[policy_loss][isa][errors]") {
  // Rows of 300 tokens, so the bad values sit in the packet loop's whole
  // vectors, not in the scalar tail (Note [Finite probe]).
  namespace cpu = psft::cpu;
  const cpu::CpuCapability saved = cpu::cpu_capability();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (int level = 0; level <= static_cast<int>(cpu::detected_cpu_capability()); ++level) {
    const auto c = static_cast<cpu::CpuCapability>(level);
    cpu::set_cpu_capability(c);
    INFO(cpu::capability_name(c));
    Draw d;
    d.seed = 77;
    d.rows = 3;  // row 1 is fully masked
    d.cols = 300;
    d.logp_dtype = d.old_dtype = d.adv_dtype = torch::kFloat;
    d.mask = MaskKind::Weights;
    const Inputs in = draw(d);
    const psft::LossOptions o = options(psft::Backend::FusedCpu, psft::Reduction::TokenMean, 3.0);
    const auto with = [](const Tensor& t, std::int64_t r, std::int64_t col, float v) {
      Tensor out = t.detach().clone();
      out[r][col] = v;
      return out;
    };
    const auto expect_error = [&](const Inputs& bad, const char* name) {
      INFO(name);
      REQUIRE_THROWS_AS(call(bad, o), c10::Error);
      REQUIRE_THROWS_WITH(call(bad, o), Catch::Contains(std::string(name) + " has"));
    };
    // Column 40 of row 0 counts (weight > 0).
    Tensor mask = with(in.mask, 0, 40, 2.0f);
    Inputs bad = in;
    bad.mask = mask;
    bad.logp = with(in.logp, 0, 40, nan).requires_grad_(true);
    expect_error(bad, "logp");
    bad = in;
    bad.mask = mask;
    bad.old_logp = with(in.old_logp, 0, 40, inf);
    expect_error(bad, "old_logp");
    bad = in;
    bad.mask = mask;
    bad.advantages = with(in.advantages, 0, 40, -inf);
    expect_error(bad, "advantages");
    for (const float w : {-1.0f, nan, inf}) {
      INFO("weight " << w);
      bad = in;
      bad.mask = with(in.mask, 2, 130, w);
      REQUIRE_THROWS_WITH(call(bad, o), Catch::Contains("mask has a negative"));
    }
    // Masked bad values are ignored; finite log-probabilities whose
    // difference overflows float are clamped like any other log-ratio.
    Inputs fine = in;
    fine.mask = with(with(in.mask, 0, 50, 0.0f), 2, 60, 1.0f);
    fine.old_logp = with(with(in.old_logp, 0, 50, nan), 2, 60, 3e38f);
    fine.advantages = with(in.advantages, 0, 50, inf);
    fine.logp = with(in.logp, 2, 60, -3e38f).requires_grad_(true);
    const psft::LossResult r = call(fine, o);
    check_against_reference(r, fine.logp, run_reference(fine, o), tolerance_for(torch::kFloat));
    CHECK(item(r.metrics.ratio_min) == Approx(std::exp(-20.0)).epsilon(1e-6));
  }
  cpu::set_cpu_capability(saved);
}

TEST_CASE("inputs on another device are rejected (needs CUDA)", "[policy_loss][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: device-mismatch checks not run");
    return;
  }
  const Inputs in = draw(Draw{});
  const Tensor old_cuda = in.old_logp.to(torch::kCUDA);
  REQUIRE_THROWS_WITH(psft::policy_loss(in.logp, old_cuda, in.advantages, in.mask),
                      Catch::Contains("old_logp"));
  REQUIRE_THROWS_WITH(
      psft::policy_loss(in.logp, in.old_logp, in.advantages.to(torch::kCUDA), in.mask),
      Catch::Contains("advantages"));
  REQUIRE_THROWS_WITH(
      psft::policy_loss(in.logp, in.old_logp, in.advantages, in.mask.to(torch::kCUDA)),
      Catch::Contains("mask"));
}

// ---------------------------------------------------------------------------
// compat/: the peers' settings. scripts/check-peers.sh compares with their
// real code; these pin the formulas of docs/parameters.md with closed forms.

namespace {

/// sum(m l) of the batch: what every reduction scales.
double masked_sum(const Tensor& logp, const Tensor& old_logp, const Tensor& adv, const Tensor& mask,
                  const psft::ClipOptions& clip) {
  psft::LossOptions sum;
  sum.clip = clip;
  sum.reduction = psft::Reduction::TokenSum;
  return psft::policy_loss(logp, old_logp, adv, mask, sum).loss.item<double>();
}

double loss_item(const psft::LossResult& r) { return r.loss.item<double>(); }

}  // namespace

TEST_CASE("compat::verl: every loss_agg_mode with and without global batch info",
          "[compat][verl]") {
  torch::manual_seed(5);
  // B = 4, T = 16; row 2 empty.
  const Tensor logp = -torch::rand({4, 16}, torch::kDouble) * 3;
  const Tensor old_logp = logp + 0.3 * torch::randn({4, 16}, torch::kDouble);
  const Tensor adv = torch::randn({4, 1}, torch::kDouble);
  Tensor mask = torch::rand({4, 16}) < 0.7;
  mask[2].fill_(false);
  psft::compat::verl::ActorSettings actor;
  const double sum =
      masked_sum(logp, old_logp, adv, mask, psft::compat::verl::loss_options(actor).clip);
  const double tokens = mask.sum().item<double>();
  const auto loss = [&](const psft::LossOptions& o) {
    return loss_item(psft::policy_loss(logp, old_logp, adv, mask, o));
  };
  // Local path: N and S (non-empty rows) from the micro-batch.
  CHECK(loss(psft::compat::verl::loss_options(actor)) == Approx(sum / tokens).epsilon(1e-12));
  actor.loss_agg_mode = "token-sum";
  CHECK(loss(psft::compat::verl::loss_options(actor)) == Approx(sum).epsilon(1e-12));
  actor.loss_agg_mode = "seq-mean-token-sum";
  CHECK(loss(psft::compat::verl::loss_options(actor)) == Approx(sum / 3).epsilon(1e-12));
  // verl 0.9.1 seq-mean-token-sum-norm: sum / S / C (psft used to give
  // sum / C, 5x verl's with S = 5 global rows). C defaults to the mask width.
  actor.loss_agg_mode = "seq-mean-token-sum-norm";
  CHECK(loss(psft::compat::verl::loss_options(actor)) == Approx(sum / 3 / 16).epsilon(1e-12));
  psft::compat::verl::GlobalBatchInfo info;
  info.global_batch_size = 5;
  CHECK(loss(psft::compat::verl::loss_options(actor, info)) == Approx(sum / 5 / 16).epsilon(1e-12));
  actor.loss_scale_factor = 32;
  info.dp_size = 2;
  CHECK(loss(psft::compat::verl::loss_options(actor, info)) ==
        Approx(sum / 5 / 32 * 2).epsilon(1e-12));
  // global_batch_size counts the empty row: with 8 rows over micro-batches of
  // 4, the micro-batch losses add up to the full sum / 8 (not / 7).
  actor = {};
  actor.loss_agg_mode = "seq-mean-token-sum";
  info = {};
  info.global_batch_size = 8;
  CHECK(loss(psft::compat::verl::loss_options(actor, info)) == Approx(sum / 8).epsilon(1e-12));
  actor.loss_agg_mode = "token-mean";
  info = {};
  info.batch_num_tokens = 100;
  info.dp_size = 4;
  CHECK(loss(psft::compat::verl::loss_options(actor, info)) ==
        Approx(sum / 100 * 4).epsilon(1e-12));

  // The clip settings and the PSFT recipe.
  actor = {};
  actor.clip_ratio = 0.1;
  actor.clip_ratio_low.reset();
  actor.clip_ratio_high = 0.3;
  const psft::LossOptions o = psft::compat::verl::loss_options(actor);
  CHECK(o.clip.eps_low == 0.1);
  CHECK(o.clip.eps_high == 0.3);
  CHECK(o.clip.dual_clip == 3.0);
  const psft::LossOptions recipe = psft::compat::verl::psft_recipe();
  CHECK(recipe.clip.eps_low == 0.2);
  CHECK(recipe.clip.eps_high == 0.28);
  CHECK(recipe.clip.dual_clip == 10.0);
  CHECK(recipe.reduction == psft::Reduction::TokenMean);

  // Refused, never ignored.
  actor.loss_agg_mode = "seq-mean";
  CHECK_THROWS_WITH(psft::compat::verl::loss_options(actor),
                    Catch::Contains("loss_agg_mode") && Catch::Contains("seq-mean-token-sum-norm"));
  actor = {};
  actor.loss_scale_factor = 8;  // read by seq-mean-token-sum-norm only, as in verl
  CHECK_FALSE(psft::compat::verl::loss_options(actor).norm_constant.has_value());
  // verl's clip_ratio_low / _high default to 0.2; None (nullopt) takes clip_ratio.
  actor.clip_ratio = 0.3;
  CHECK(psft::compat::verl::loss_options(actor).clip.eps_high == 0.2);
  actor.clip_ratio_low.reset();
  actor.clip_ratio_high.reset();
  CHECK(psft::compat::verl::loss_options(actor).clip.eps_low == 0.3);
  CHECK(psft::compat::verl::loss_options(actor).clip.eps_high == 0.3);
  actor = {};
  actor.clip_ratio_c = 1.0;
  CHECK_THROWS_WITH(psft::compat::verl::loss_options(actor), Catch::Contains("clip_ratio_c"));
  info = {};
  info.dp_size = 2;
  CHECK_THROWS_WITH(psft::compat::verl::loss_options({}, info),
                    Catch::Contains("batch_num_tokens"));
}

TEST_CASE("compat::trl: every GRPO loss_type with gradient accumulation, and SFT",
          "[compat][trl]") {
  torch::manual_seed(6);
  // 6 rows, one empty (TRL's mask_truncated_completions), in 2 micro-batches of 3.
  const Tensor logp = -torch::rand({6, 10}, torch::kDouble) * 3;
  const Tensor old_logp = logp + 0.3 * torch::randn({6, 10}, torch::kDouble);
  const Tensor adv = torch::randn({6}, torch::kDouble);
  Tensor mask = torch::rand({6, 10}) < 0.7;
  mask[4].fill_(false);
  psft::compat::trl::GrpoSettings grpo;
  grpo.epsilon_high = 0.28;
  grpo.max_completion_length = 12;
  const auto micro = [&](int k, const psft::LossOptions& o) {
    return loss_item(psft::policy_loss(logp.narrow(0, 3 * k, 3), old_logp.narrow(0, 3 * k, 3),
                                       adv.narrow(0, 3 * k, 3), mask.narrow(0, 3 * k, 3), o));
  };
  const auto options = [&](int k, std::int64_t ga) {
    psft::compat::trl::GrpoBatch b;
    b.completion_mask = mask.narrow(0, 3 * k, 3);
    b.num_items_in_batch = mask.sum().item<double>();
    b.gradient_accumulation_steps = ga;
    return psft::compat::trl::grpo_loss_options(grpo, b);
  };
  psft::ClipOptions clip;
  clip.eps_low = 0.2;
  clip.eps_high = 0.28;
  psft::LossOptions per_row;
  per_row.clip = clip;
  per_row.reduction = psft::Reduction::SeqMeanTokenMean;
  per_row.count_empty_sequences = true;
  // grpo: the mean over all 6 rows of each row's token mean, / GA.
  grpo.loss_type = "grpo";
  const double grpo_whole = loss_item(psft::policy_loss(logp, old_logp, adv, mask, per_row));
  CHECK(micro(0, options(0, 2)) + micro(1, options(1, 2)) == Approx(grpo_whole).epsilon(1e-12));
  per_row.count_empty_sequences = false;  // psft's default: 6/5 of TRL's grpo
  CHECK(loss_item(psft::policy_loss(logp, old_logp, adv, mask, per_row)) ==
        Approx(grpo_whole * 6 / 5).epsilon(1e-12));
  // bnpo: each micro-batch's own token mean, / GA.
  grpo.loss_type = "bnpo";
  for (int k : {0, 1}) {
    const Tensor m = mask.narrow(0, 3 * k, 3);
    const double own = masked_sum(logp.narrow(0, 3 * k, 3), old_logp.narrow(0, 3 * k, 3),
                                  adv.narrow(0, 3 * k, 3), m, clip) /
                       m.sum().item<double>();
    CHECK(micro(k, options(k, 2)) == Approx(own / 2).epsilon(1e-12));
  }
  // dr_grpo: sum / (B L_max) / GA.
  grpo.loss_type = "dr_grpo";
  const double sum0 = masked_sum(logp.narrow(0, 0, 3), old_logp.narrow(0, 0, 3),
                                 adv.narrow(0, 0, 3), mask.narrow(0, 0, 3), clip);
  CHECK(micro(0, options(0, 2)) == Approx(sum0 / (3 * 12) / 2).epsilon(1e-12));
  // dapo: sum / num_items (one process, steps_per_generation = GA).
  grpo.loss_type = "dapo";
  CHECK(micro(0, options(0, 2)) == Approx(sum0 / mask.sum().item<double>()).epsilon(1e-12));
  // delta bounds the unclipped ratio.
  grpo.delta = 1.5;
  CHECK(options(0, 1).clip.delta == 1.5);
  grpo.delta = 1.1;  // not above 1 + epsilon_high: psft refuses it
  CHECK_THROWS_WITH(micro(0, options(0, 1)), Catch::Contains("delta"));
  grpo.delta.reset();
  grpo.loss_type = "sapo";  // grpo's aggregation with the SAPO rule (tests/test_objectives.cpp)
  CHECK(options(0, 1).objective.kind == psft::Objective::Sapo);
  CHECK(options(0, 1).reduction == psft::Reduction::SeqMeanTokenMean);
  grpo.loss_type = "cispo";
  CHECK(options(0, 1).objective.kind == psft::Objective::CispoCapped);
  grpo.loss_type = "vespo";  // not one psft has
  CHECK_THROWS_WITH(options(0, 1), Catch::Contains("loss_type") && Catch::Contains("dr_grpo"));

  // SFT: sum(l) / num_items x P.
  psft::compat::trl::SftSettings sft;
  CHECK(psft::compat::trl::sft_variant(sft) == psft::SftVariant::Nll);
  sft.loss_type = "dft";
  CHECK(psft::compat::trl::sft_variant(sft) == psft::SftVariant::Dft);
  sft.num_processes = 2;
  const psft::LossOptions s = psft::compat::trl::sft_loss_options(sft, 40.0);
  CHECK(*s.normaliser->tokens == 40.0);
  CHECK(s.normaliser->world_size == 2);
  // Without num_items_in_batch, the Trainer divides by the accumulation steps.
  sft.gradient_accumulation_steps = 4;
  const psft::LossOptions local = psft::compat::trl::sft_loss_options(sft, {}, mask);
  CHECK(*local.normaliser->tokens == mask.sum().item<double>() * 4);
  CHECK_THROWS_WITH(psft::compat::trl::sft_loss_options(sft), Catch::Contains("mask"));
  sft.loss_type = "chunked_nll";
  CHECK_THROWS_WITH(psft::compat::trl::sft_variant(sft), Catch::Contains("loss_type"));
}
