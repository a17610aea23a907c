// Tests of psft's fused CUDA backend (built with PSFT_CUDA=ON, which compiles
// psft/cuda/psft_cuda.cu into this binary and defines PSFT_WITH_CUDA_KERNELS).
// Without a CUDA device every test case prints "skipped: no CUDA device" and
// passes.
//
// Parity: the fused CUDA kernel against the fused CPU kernel on the same
// inputs (the CPU backend is itself tested against the independent double
// reference in test_policy_loss.cpp), and the float64 run against
// reference/clipped_reference.hpp's double-precision loss directly.
// Before each run the CUDA caching allocator is poisoned with NaN so that an
// output the kernels forget to write shows up as NaN.
//
// Tolerances (relative, loss and metrics relative to max(1, |value|)):
//   float64  1e-12    float32 / bfloat16 / float16 inputs  1e-5
//   gradient, relative to its largest entry: float64 1e-12, float32 1e-5,
//   bfloat16 8e-3, float16 1e-3, plus one subnormal step (2^-24) for
//   float16, whose small gradients are stored with that absolute spacing
// (float accumulation in both backends; exp() differs by an ulp or two).
// Note [Tokens at a clip bound]: the two backends' ratios differ by a few
// ulp (the GPU's exp2 is ex2.approx), so a token whose ratio lies within
// 2e-6 of a clip bound may be clipped on one and not the other: its
// gradient is left out of the comparison and each such token widens the
// metrics' tolerance by one token's share. The loss is continuous there.

// LibTorch's logging header defines its own CHECK macro; drop it so that
// Catch2's is used (as the other tests do).
#include <ATen/ATen.h>
#include <torch/cuda.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "psft/psft.hpp"
#include "support/reductions.hpp"

namespace {

using at::Tensor;

bool have_cuda() {
  if (torch::cuda::is_available()) return true;
  WARN("skipped: no CUDA device");
  return false;
}

/// Fills the caching allocator's free blocks with NaN bytes: one large block
/// (the large pool) and many 256 KiB ones (the pool of blocks up to 1 MiB,
/// where this file's small tensors come from).
void poison_cuda_allocator() {
  const auto nan = std::numeric_limits<float>::quiet_NaN();
  const auto cuda = at::TensorOptions().device(at::kCUDA).dtype(at::kFloat);
  at::full({std::int64_t(1) << 24}, nan, cuda);
  std::vector<Tensor> small;
  for (int i = 0; i < 64; ++i) small.push_back(at::full({std::int64_t(1) << 16}, nan, cuda));
}

Tensor metrics_of(const psft::LossResult& r) {
  const psft::LossMetrics& m = r.metrics;
  return at::stack({m.clip_frac, m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low,
                    m.approx_kl_k1, m.approx_kl_k3, m.ratio_mean, m.ratio_min, m.ratio_max,
                    m.token_count})
      .to(at::kCPU, at::kDouble);
}

double max_rel_diff(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to(at::kCPU, at::kDouble), y = b.to(at::kCPU, at::kDouble);
  if (x.numel() == 0) return 0.0;
  return ((x - y).abs() / y.abs().clamp_min(1.0)).max().item<double>();
}

/// max |a - b| relative to the largest |b|: for gradients, whose entries are
/// often far below 1 (max_rel_diff would then only bound absolute errors).
/// Entries where `skip` (a bool tensor of a's shape, or undefined) is set
/// are left out; `floor` is subtracted from every difference first (the
/// absolute spacing of the gradient's dtype near 0, grad_floor).
double max_scaled_diff(const Tensor& a, const Tensor& b, double floor = 0.0,
                       const Tensor& skip = Tensor()) {
  const Tensor x = a.to(at::kCPU, at::kDouble), y = b.to(at::kCPU, at::kDouble);
  if (x.numel() == 0) return 0.0;
  const double largest = y.abs().max().item<double>();
  Tensor diff = ((x - y).abs() - floor).clamp_min(0.0);
  if (skip.defined()) diff = diff.masked_fill(skip.to(at::kCPU).reshape(diff.sizes()), 0.0);
  return diff.max().item<double>() / (largest > 0 ? largest : 1.0);
}

/// The absolute step of the gradient dtype's subnormals: float16 stores
/// gradients below 6.1e-5 with a spacing of 2^-24, which one ulp of a ratio
/// can move, however small the relative tolerance.
double grad_floor(at::ScalarType t) { return t == at::kHalf ? std::ldexp(1.0, -24) : 0.0; }

double grad_tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return 1e-12;
    case at::kBFloat16:
      return 8e-3;
    case at::kHalf:
      return 1e-3;
    default:
      return 1e-5;
  }
}

struct Run {
  Tensor loss, metrics, grad;
};

/// One loss + backward on `device` with the given backend.
Run run(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor& mask,
        const psft::LossOptions& opts, at::Device device) {
  const auto on = [&](const Tensor& t) { return t.defined() ? t.to(device) : t; };
  const Tensor x = logp.to(device).detach().requires_grad_();
  if (device.is_cuda()) poison_cuda_allocator();
  // No advantages: PSFT (A = 1), which policy_loss does not take.
  const psft::LossResult r = adv.defined() ? psft::policy_loss(x, on(old), on(adv), on(mask), opts)
                                           : psft::psft_loss(x, on(old), on(mask), opts);
  r.loss.backward();
  return {r.loss.detach().to(at::kCPU), metrics_of(r), x.grad().to(at::kCPU)};
}

/// Unmasked tokens whose ratio, from the inputs as stored, lies within a
/// relative 2e-6 of a clip bound: 1 - eps_low, 1 + eps_high or the dual
/// clip c (Note [Tokens at a clip bound]).
Tensor near_clip_bound(const Tensor& logp, const Tensor& old, const Tensor& mask,
                       const psft::LossOptions& opts) {
  const Tensor r = (logp.to(at::kCPU, at::kDouble) - old.to(at::kCPU, at::kDouble))
                       .clamp(-opts.clip.log_ratio_clamp, opts.clip.log_ratio_clamp)
                       .exp();
  const auto near = [&](double bound) { return ((r - bound).abs() <= 2e-6 * bound); };
  Tensor out = near(1.0 - opts.clip.eps_low) | near(1.0 + opts.clip.eps_high);
  if (opts.clip.dual_clip) out = out | near(*opts.clip.dual_clip);
  if (mask.defined()) out = out & (mask.to(at::kCPU, at::kDouble) != 0);
  return out;
}

void check_parity(const Tensor& logp, const Tensor& old, const Tensor& adv, const Tensor& mask,
                  psft::LossOptions opts) {
  opts.backend = psft::Backend::FusedCpu;
  const Run cpu = run(logp, old, adv, mask, opts, at::kCPU);
  opts.backend = psft::Backend::FusedCuda;
  const Run gpu = run(logp, old, adv, mask, opts, at::kCUDA);
  const double tol = logp.scalar_type() == at::kDouble ? 1e-12 : 1e-5;
  const Tensor at_bound = near_clip_bound(logp, old, mask, opts);
  const double bound_tokens = at_bound.sum().item<double>();
  const double tokens = std::max(1.0, cpu.metrics[9].item<double>());
  INFO(bound_tokens << " tokens at a clip bound");
  CHECK(max_rel_diff(gpu.loss, cpu.loss) <= tol);
  CHECK(max_rel_diff(gpu.metrics, cpu.metrics) <= tol + bound_tokens / tokens);
  REQUIRE(gpu.grad.defined());
  CHECK(gpu.grad.scalar_type() == logp.scalar_type());
  CHECK_FALSE(gpu.grad.isnan().any().item<bool>());
  CHECK(max_scaled_diff(gpu.grad, cpu.grad, grad_floor(logp.scalar_type()), at_bound) <=
        grad_tolerance(logp.scalar_type()));
}

using test_support::kReductions;

}  // namespace

TEST_CASE("backend_for routes CUDA tensors to the fused CUDA kernel", "[cuda][backend]") {
  CHECK(psft::has_cuda_kernels());
  if (!have_cuda()) return;
  const Tensor t = at::zeros({2}, at::TensorOptions().device(at::kCUDA));
  CHECK(psft::backend_for(t) == psft::Backend::FusedCuda);
  CHECK(psft::backend_for(t, psft::Backend::Composed) == psft::Backend::Composed);
}

TEST_CASE("CUDA kernel matches the CPU kernel: dtypes, reductions, dual clip, shapes",
          "[cuda][parity]") {
  if (!have_cuda()) return;
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat, at::kBFloat16, at::kHalf);
  // Odd sizes exercise the scalar tails; 5000 columns span three units;
  // 2 x 40000 and 2^16 are few long rows, which finalize sums block-wide.
  const std::vector<std::int64_t> shape =
      GENERATE(std::vector<std::int64_t>{3, 37}, std::vector<std::int64_t>{4, 5000},
               std::vector<std::int64_t>{8, 256}, std::vector<std::int64_t>{1 << 14},
               std::vector<std::int64_t>{2, 40000}, std::vector<std::int64_t>{1 << 16});
  INFO("dtype " << dtype << " shape " << c10::IntArrayRef(shape));
  at::manual_seed(7);
  const Tensor logp = (at::randn(shape, at::kDouble) * 0.3 - 1.0).to(dtype);
  const Tensor old = (logp.to(at::kDouble) + at::randn(shape, at::kDouble) * 0.3).to(at::kFloat);
  const Tensor adv = at::randn(shape, at::kFloat);
  const Tensor mask = at::rand(shape, at::kDouble) > 0.2;
  for (psft::Reduction reduction : kReductions) {
    if (shape.size() == 1 && reduction != psft::Reduction::TokenMean) continue;
    for (bool dual : {false, true}) {
      INFO("reduction " << static_cast<int>(reduction) << " dual " << dual);
      psft::LossOptions opts;
      opts.reduction = reduction;
      if (dual) opts.clip.dual_clip = 3.0;
      check_parity(logp, old, adv, mask, opts);
      // PSFT: no advantages, float mask weights.
      check_parity(logp, old, Tensor(), mask.to(at::kFloat) * 0.5, opts);
    }
  }
}

TEST_CASE("CUDA kernel: non-contiguous and misaligned inputs take the scalar path",
          "[cuda][parity]") {
  if (!have_cuda()) return;
  at::manual_seed(11);
  const Tensor base = at::randn({64, 41}, at::kFloat);
  const Tensor logp = base.t();                                         // [41, 64], strided
  const Tensor old = at::randn({41, 65}, at::kFloat).narrow(1, 1, 64);  // misaligned rows
  const Tensor adv = at::randn({41, 1}, at::kFloat).expand({41, 64});   // stride 0
  const Tensor mask = at::rand({41, 128}, at::kFloat).gt(0.3).slice(1, 0, 128, 2);
  psft::LossOptions opts;
  opts.reduction = psft::Reduction::SeqMeanTokenMean;
  check_parity(logp, old, adv, mask, opts);
}

TEST_CASE("CUDA kernel: float64 matches an independent double computation", "[cuda][reference]") {
  if (!have_cuda()) return;
  at::manual_seed(3);
  const Tensor logp = at::randn({5, 300}, at::kDouble) * 0.2 - 2.0;
  const Tensor old = logp + at::randn({5, 300}, at::kDouble) * 0.4;
  psft::LossOptions opts;  // token mean, A = 1: l = -min(r, 1 + eps_high)
  const Run gpu = run(logp, old, Tensor(), Tensor(), opts, at::kCUDA);
  const Tensor r = (logp - old).clamp(-20, 20).exp();
  const double expected = (-at::minimum(r, at::full_like(r, 1.28))).mean().item<double>();
  CHECK(std::abs(gpu.loss.item<double>() - expected) <= 1e-12 * std::max(1.0, std::abs(expected)));
  const Tensor expected_grad = at::where(r <= 1.28, -r, at::zeros_like(r)) / 1500.0;
  CHECK(max_scaled_diff(gpu.grad, expected_grad) <= 1e-12);
}

TEST_CASE("CUDA kernel: empty and fully masked batches give loss 0 and zero gradients",
          "[cuda][empty]") {
  if (!have_cuda()) return;
  const std::vector<std::int64_t> shape =
      GENERATE(std::vector<std::int64_t>{0, 7}, std::vector<std::int64_t>{4, 0},
               std::vector<std::int64_t>{4, 7});
  INFO("shape " << c10::IntArrayRef(shape));
  for (psft::Reduction reduction : kReductions) {
    psft::LossOptions opts;
    opts.reduction = reduction;
    const Tensor logp = at::randn(shape, at::kFloat);
    const Tensor mask = at::zeros(shape, at::kBool);
    const Run gpu = run(logp, at::randn(shape, at::kFloat), Tensor(), mask, opts, at::kCUDA);
    CHECK(gpu.loss.item<double>() == 0.0);
    CHECK((gpu.grad == 0).all().item<bool>());
    const std::vector<double> neutral = {0, 0, 0, 0, 0, 0, 1, 1, 1, 0};
    CHECK(at::equal(gpu.metrics, at::tensor(neutral, at::kDouble)));
  }
}

TEST_CASE("CUDA kernel: results are bitwise reproducible", "[cuda][determinism]") {
  if (!have_cuda()) return;
  at::manual_seed(5);
  const Tensor logp = at::randn({16, 9000}, at::kFloat);
  const Tensor old = logp + at::randn({16, 9000}, at::kFloat) * 0.3;
  const Tensor adv = at::randn({16, 9000}, at::kFloat);
  psft::LossOptions opts;
  const Run a = run(logp, old, adv, Tensor(), opts, at::kCUDA);
  const Run b = run(logp, old, adv, Tensor(), opts, at::kCUDA);
  CHECK(at::equal(a.loss, b.loss));
  CHECK(at::equal(a.metrics, b.metrics));
  CHECK(at::equal(a.grad, b.grad));
}

TEST_CASE("CUDA kernel: NaN logp or old_logp at an unmasked token raises",
          "[cuda][errors][sanitize]") {
  if (!have_cuda()) return;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  psft::LossOptions opts;
  Tensor logp = at::zeros({2, 3}, cuda), old = at::zeros({2, 3}, cuda);
  old.index_put_({1, 2}, std::numeric_limits<double>::quiet_NaN());
  CHECK_THROWS_WITH(psft::psft_loss(logp, old, Tensor(), opts),
                    Catch::Contains("old_logp has NaN or Inf"));
  logp.index_put_({0, 1}, std::numeric_limits<double>::infinity());
  old.index_put_({1, 2}, 0.0);
  CHECK_THROWS_WITH(psft::psft_loss(logp, old, Tensor(), opts),
                    Catch::Contains("logp has NaN or Inf"));
  // Under a zero mask weight the same values are never read.
  const Tensor mask = at::ones({2, 3}, cuda).index_put_({0, 1}, 0.0);
  CHECK_NOTHROW(psft::psft_loss(logp, old, mask, opts));
}

TEST_CASE("CUDA kernels: one small call of every path (the compute-sanitizer subset)",
          "[cuda][parity][sanitize]") {
  if (!have_cuda()) return;
  // Clipped objective: the typed fast paths (bf16 / fp32 with a bool or
  // float mask), the runtime-dtype path (fp16, fp64, mixed), with and
  // without a dual clip; rows of several units with a partial last group
  // (row trees), and more rows than a combine node has children (two levels
  // of the batch tree); one long row whose row tree has two levels.
  struct Case {
    at::ScalarType logp, old;
    std::vector<std::int64_t> shape;
    bool float_mask, dual;
  };
  const std::vector<Case> cases = {{at::kBFloat16, at::kBFloat16, {3, 4104}, false, false},
                                   {at::kFloat, at::kFloat, {300, 40}, true, true},
                                   {at::kHalf, at::kFloat, {5, 37}, false, true},
                                   {at::kDouble, at::kDouble, {4, 2050}, true, false},
                                   {at::kFloat, at::kFloat, {2048 * 257 + 3}, false, false}};
  for (const Case& c : cases) {
    INFO("logp " << c.logp << " old " << c.old << " shape " << c10::IntArrayRef(c.shape));
    at::manual_seed(23);
    const Tensor logp = (at::randn(c.shape, at::kDouble) * 0.3 - 1.0).to(c.logp);
    const Tensor old = (logp.to(at::kDouble) + at::randn(c.shape, at::kDouble) * 0.3).to(c.old);
    const Tensor adv = at::randn(c.shape, at::kDouble).to(c.logp);
    Tensor mask = at::rand(c.shape, at::kDouble) > 0.2;
    if (c.float_mask) mask = mask.to(at::kFloat) * 0.5;
    psft::LossOptions opts;
    opts.reduction =
        c.shape.size() == 2 ? psft::Reduction::SeqMeanTokenMean : psft::Reduction::TokenMean;
    if (c.dual) opts.clip.dual_clip = 3.0;
    check_parity(logp, old, adv, mask, opts);
  }
}

namespace {

struct LogitsRun {
  Tensor logp, entropy, grad;
  psft::Backend backend;
};

LogitsRun run_logits(const Tensor& logits, const Tensor& labels, psft::LogitsOptions opts,
                     at::Device device) {
  const Tensor x = logits.to(device).detach().requires_grad_();
  if (device.is_cuda()) poison_cuda_allocator();
  const psft::TokenLogprobs t = psft::token_logprobs(x, labels.to(device), opts);
  // A loss that reaches every row: sum of w * logp + v * entropy.
  const Tensor w =
      at::linspace(-1.0, 1.0, t.logp.numel(), t.logp.options()).reshape(t.logp.sizes());
  (t.logp * w + t.entropy * 0.5).sum().backward();
  return {t.logp.detach().to(at::kCPU), t.entropy.detach().to(at::kCPU), x.grad().to(at::kCPU),
          t.backend};
}

}  // namespace

TEST_CASE("CUDA logits kernel matches the CPU kernel", "[cuda][logits]") {
  if (!have_cuda()) return;
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat, at::kBFloat16, at::kHalf);
  const double temperature = GENERATE(1.0, 0.7);
  // 1001: most rows start unaligned (entry-by-entry loads); 4096: every row
  // is read and written 16 bytes at a time.
  const std::int64_t vocab = GENERATE(1001, 4096);
  INFO("dtype " << dtype << " temperature " << temperature << " vocab " << vocab);
  at::manual_seed(13);
  const Tensor logits = (at::randn({3, 5, vocab}, at::kDouble) * 3.0).to(dtype);
  Tensor labels = at::randint(0, vocab, {3, 5}, at::kLong);
  labels.index_put_({0, 1}, -100);  // ignored rows: zeros, not read
  labels.index_put_({2, 4}, -100);
  psft::LogitsOptions opts;
  opts.temperature = temperature;
  opts.entropy_grad = true;
  opts.backend = psft::Backend::FusedCpu;
  const LogitsRun cpu = run_logits(logits, labels, opts, at::kCPU);
  opts.backend = psft::Backend::Auto;
  const LogitsRun gpu = run_logits(logits, labels, opts, at::kCUDA);
  CHECK(gpu.backend == psft::Backend::FusedCuda);
  const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
  CHECK(max_rel_diff(gpu.logp, cpu.logp) <= tol);
  CHECK(max_rel_diff(gpu.entropy, cpu.entropy) <= tol);
  CHECK(gpu.grad.scalar_type() == dtype);
  CHECK_FALSE(gpu.grad.isnan().any().item<bool>());
  CHECK(max_scaled_diff(gpu.grad, cpu.grad, grad_floor(dtype)) <= grad_tolerance(dtype));
}

TEST_CASE("CUDA logits kernels: aligned and unaligned rows, small (the compute-sanitizer subset)",
          "[cuda][logits][sanitize]") {
  if (!have_cuda()) return;
  for (const std::int64_t vocab : {1001, 4096}) {
    for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
      INFO("dtype " << dtype << " vocab " << vocab);
      at::manual_seed(29);
      const Tensor logits = (at::randn({2, 3, vocab}, at::kDouble) * 3.0).to(dtype);
      Tensor labels = at::randint(0, vocab, {2, 3}, at::kLong);
      labels.index_put_({1, 1}, -100);
      psft::LogitsOptions opts;
      opts.temperature = 0.7;
      opts.entropy_grad = true;
      opts.backend = psft::Backend::FusedCpu;
      const LogitsRun cpu = run_logits(logits, labels, opts, at::kCPU);
      opts.backend = psft::Backend::Auto;
      const LogitsRun gpu = run_logits(logits, labels, opts, at::kCUDA);
      CHECK(gpu.backend == psft::Backend::FusedCuda);
      CHECK(max_rel_diff(gpu.logp, cpu.logp) <= 1e-5);
      CHECK(max_rel_diff(gpu.entropy, cpu.entropy) <= 1e-5);
      CHECK(max_scaled_diff(gpu.grad, cpu.grad, grad_floor(dtype)) <= grad_tolerance(dtype));
    }
  }
}

TEST_CASE("CUDA logits kernel: empty batch and bad inputs", "[cuda][logits][errors][sanitize]") {
  if (!have_cuda()) return;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  psft::LogitsOptions opts;
  const psft::TokenLogprobs empty = psft::token_logprobs(
      at::zeros({0, 4, 10}, cuda), at::zeros({0, 4}, cuda.dtype(at::kLong)), opts);
  CHECK(empty.logp.numel() == 0);
  Tensor logits = at::zeros({2, 10}, cuda);
  logits.index_put_({1, 3}, std::numeric_limits<double>::quiet_NaN());
  CHECK_THROWS_AS(psft::token_logprobs(logits, at::ones({2}, cuda.dtype(at::kLong)), opts),
                  c10::Error);
  CHECK_THROWS_AS(psft::token_logprobs(at::zeros({2, 10}, cuda),
                                       at::full({2}, 10, cuda.dtype(at::kLong)), opts),
                  c10::Error);
}

TEST_CASE("CUDA logits kernel: rows past element 2^31", "[cuda][logits][large]") {
  if (!have_cuda()) return;
  // 16400 x 131075 bf16 (4.3 GB, and as much again for the gradient): row
  // 16383 straddles element 2^31. The rows around it are compared with the
  // CPU kernel on a copy of just those rows.
  const std::int64_t rows = 16400, vocab = 131075;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  at::manual_seed(17);
  const Tensor logits = (at::randn({rows, vocab}, cuda) * 3.0).to(at::kBFloat16);
  const Tensor labels = at::randint(0, vocab, {rows}, cuda.dtype(at::kLong));
  REQUIRE(16383 * vocab < (std::int64_t(1) << 31));
  REQUIRE(16384 * vocab > (std::int64_t(1) << 31));
  psft::LogitsOptions opts;
  opts.entropy_grad = true;
  const Tensor x = logits.detach().requires_grad_();
  const psft::TokenLogprobs t = psft::token_logprobs(x, labels, opts);
  CHECK(t.backend == psft::Backend::FusedCuda);
  (t.logp * 0.5 + t.entropy * 0.25).sum().backward();

  const Tensor picked =
      at::tensor(std::vector<std::int64_t>{0, 16382, 16383, 16384, 16399}, cuda.dtype(at::kLong));
  psft::LogitsOptions cpu_opts = opts;
  cpu_opts.backend = psft::Backend::FusedCpu;
  const Tensor y = logits.index_select(0, picked).cpu().requires_grad_();
  const psft::TokenLogprobs c =
      psft::token_logprobs(y, labels.index_select(0, picked).cpu(), cpu_opts);
  (c.logp * 0.5 + c.entropy * 0.25).sum().backward();
  CHECK(max_rel_diff(t.logp.index_select(0, picked), c.logp) <= 1e-5);
  CHECK(max_rel_diff(t.entropy.index_select(0, picked), c.entropy) <= 1e-5);
  CHECK(max_scaled_diff(x.grad().index_select(0, picked), y.grad()) <=
        grad_tolerance(at::kBFloat16));
}

TEST_CASE("CUDA kernel: tokens past element 2^31", "[cuda][parity][large]") {
  if (!have_cuda()) return;
  // 524163 x 4097 bf16 tokens (2.15e9): the token count and every offset
  // pass 2^31. Token mean without a mask scales every gradient by 1 / N, so
  // the rows around element 2^31 are compared with the CPU kernel on just
  // those rows, rescaled by the ratio of the token counts.
  const std::int64_t rows = 524163, cols = 4097;
  const double n = double(rows) * double(cols);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  at::manual_seed(19);
  const Tensor logp = (at::randn({rows, cols}, cuda) * 0.3 - 1.0).to(at::kBFloat16);
  const Tensor old = (logp.to(at::kFloat) + at::randn({rows, cols}, cuda) * 0.3).to(at::kBFloat16);
  psft::LossOptions opts;
  opts.check_finite = true;
  const Tensor x = logp.detach().requires_grad_();
  const psft::LossResult r = psft::psft_loss(x, old, Tensor(), opts);
  r.loss.backward();
  CHECK(std::isfinite(r.loss.item<double>()));
  CHECK(r.metrics.token_count.item<double>() == n);

  const std::int64_t middle = (std::int64_t(1) << 31) / cols;
  const Tensor picked = at::arange(middle - 1, middle + 2, cuda.dtype(at::kLong));
  psft::LossOptions cpu_opts;
  cpu_opts.backend = psft::Backend::FusedCpu;
  const Tensor y = logp.index_select(0, picked).cpu().requires_grad_();
  psft::psft_loss(y, old.index_select(0, picked).cpu(), Tensor(), cpu_opts).loss.backward();
  const double small = 3.0 * double(cols);
  const Tensor rescaled = x.grad().index_select(0, picked).to(at::kCPU, at::kDouble) * (n / small);
  CHECK(max_scaled_diff(rescaled, y.grad(), 0.0,
                        near_clip_bound(y.detach(), old.index_select(0, picked), Tensor(),
                                        cpu_opts)) <= grad_tolerance(at::kBFloat16));
}

TEST_CASE("CUDA from-hidden losses match the CPU: values and all three gradients",
          "[cuda][hidden][sanitize]") {
  if (!have_cuda()) return;
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat, at::kBFloat16);
  INFO("dtype " << dtype);
  at::manual_seed(17);
  const std::int64_t B = 3, T = 9, H = 16, V = 1001;
  const Tensor hidden = at::randn({B, T, H}, at::kDouble).to(dtype);
  const Tensor weight = (at::randn({V, H}, at::kDouble) * 0.5).to(dtype);
  const Tensor bias = at::randn({V}, at::kDouble).to(dtype);
  Tensor labels = at::randint(0, V, {B, T}, at::kLong);
  labels.index_put_({0, 2}, -100);
  labels.index_put_({2, 8}, -100);
  struct Run {
    Tensor loss, logp, g_hidden, g_weight, g_bias;
  };
  const auto run = [&](at::Device device) {
    const Tensor h = hidden.to(device).requires_grad_(true);
    const Tensor w = weight.to(device).requires_grad_(true);
    const Tensor b = bias.to(device).requires_grad_(true);
    const Tensor l = labels.to(device);
    psft::HiddenOptions o;
    o.bias = b;
    o.chunk_tokens = 5;
    Tensor old;
    {
      at::NoGradGuard no_grad;
      old = psft::token_logprobs_from_hidden(h, w, l, o).logp - 0.1;
    }
    const psft::LogitsLossResult r = psft::psft_loss_from_hidden(h, w, l, old, {}, o);
    r.loss.backward();
    return Run{r.loss.cpu(), r.logp.cpu(), h.grad().cpu(), w.grad().cpu(), b.grad().cpu()};
  };
  poison_cuda_allocator();
  const Run cpu = run(at::kCPU);
  const Run gpu = run(at::kCUDA);
  // Both GEMMs round to the dtype; cuBLAS and the CPU BLAS sum in different
  // orders, so reduced precision gets the gradient tolerance of its dtype.
  const double tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-4 : 3e-2;
  CHECK(max_rel_diff(gpu.loss, cpu.loss) <= tol);
  CHECK(max_rel_diff(gpu.logp, cpu.logp) <= tol);
  for (const auto& pair :
       {std::make_pair(gpu.g_hidden, cpu.g_hidden), std::make_pair(gpu.g_weight, cpu.g_weight),
        std::make_pair(gpu.g_bias, cpu.g_bias)}) {
    CHECK(pair.first.scalar_type() == dtype);
    CHECK_FALSE(pair.first.isnan().any().item<bool>());
    CHECK(max_scaled_diff(pair.first, pair.second, grad_floor(dtype)) <= tol);
  }
}
