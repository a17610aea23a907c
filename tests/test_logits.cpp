// Tests of the logits entry points: psft::token_logprobs, psft::shift_labels,
// psft::psft_loss_from_logits, psft::policy_loss_from_logits, the entropy
// metrics and psft::EntropyTracker, for the fused CPU backend and the
// composed ATen backend, against an independent double-precision reference
// written below with plain loops (it shares no code with include/).
//
// Tolerance table. The reference is evaluated on the SAME rounded logits
// psft sees (converted to double after their dtype rounding); |got - want|
// must be <= atol + rtol |want|:
//
//   logits dtype | logp, entropy, loss     | gradient (in the logits' dtype)
//   -------------+-------------------------+----------------------------------
//   float64      | 1e-11 abs, 1e-11 rel    | 1e-11 rel + 1e-13 max
//   float32      | 2e-5 abs, 1e-5 rel      | 1e-4 rel + 2e-6 max
//   bfloat16     | 2e-5 abs, 1e-5 rel      | 8e-3 rel (2 bf16 units, 2^-8) + 2e-6 max
//   float16      | 2e-5 abs, 1e-5 rel      | 2e-3 rel (2 fp16 units) + 2e-6 max
//                |                         | + 1e-7 abs (fp16 subnormals)
//
// "max" is relative to the largest gradient entry of the tensor: the entropy
// gradient p (g + h (z - mean z)) cancels when z is near its mean, so float
// rounding there is relative to the row's large terms, not to the result.
//
// bf16/fp16 logits accumulate in float and logp/entropy are float32, so only
// the gradient carries the coarse rounding. Logits of +-1e4 (float32) are
// compared with a relative tolerance of 1e-6 on logp (ulp(1e4) ~ 1e-3).
// Finite differences (float64, central, h = 1e-6): 1e-6 relative + 1e-8.
//
// The [large] test (more than 2^31 bfloat16 logits, about 8.6 GB with its
// gradient) runs as its own ctest entry.

// LibTorch's logging header defines its own CHECK macro, which aborts
// instead of recording a Catch2 assertion: include LibTorch first and drop it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "psft/core/online_softmax.hpp"
#include "psft/cpu/capability.hpp"
#include "psft/cpu/gradient_buffers.hpp"
#include "psft/entropy.hpp"
#include "psft/logits.hpp"

namespace {

using Vec = std::vector<double>;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kIgnore = -100;

// ---------------------------------------------------------------------------
// Independent double-precision reference (plain loops; no psft code).
// ---------------------------------------------------------------------------
namespace ref {

/// Logits as [rows, vocab] doubles, already divided by the temperature.
struct Logits {
  std::int64_t rows = 0, vocab = 0;
  Vec z;
  double at(std::int64_t r, std::int64_t j) const { return z[r * vocab + j]; }
};

Logits from_tensor(const at::Tensor& logits, double temperature) {
  Logits l;
  l.vocab = logits.size(-1);
  const at::Tensor d = logits.detach().to(at::kDouble).contiguous().reshape({-1, l.vocab});
  l.rows = d.size(0);
  l.z.assign(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  for (double& v : l.z) v /= temperature;
  return l;
}

/// log_softmax, gather, entropy, and the softmax mean of z per row.
struct Softmax {
  Vec logp, entropy, lse, mean_z;
};

Softmax softmax(const Logits& l, const std::vector<std::int64_t>& labels) {
  Softmax s;
  s.logp.assign(l.rows, 0.0);
  s.entropy.assign(l.rows, 0.0);
  s.lse.assign(l.rows, 0.0);
  s.mean_z.assign(l.rows, 0.0);
  for (std::int64_t r = 0; r < l.rows; ++r) {
    if (labels[r] == kIgnore) continue;
    double m = -kInf;
    for (std::int64_t j = 0; j < l.vocab; ++j) m = std::max(m, l.at(r, j));
    double sum = 0.0;
    for (std::int64_t j = 0; j < l.vocab; ++j) sum += std::exp(l.at(r, j) - m);
    const double lse = m + std::log(sum);
    double mean = 0.0;
    for (std::int64_t j = 0; j < l.vocab; ++j) {
      const double p = std::exp(l.at(r, j) - lse);
      if (p > 0) mean += p * l.at(r, j);
    }
    s.lse[r] = lse;
    s.mean_z[r] = mean;
    s.logp[r] = l.at(r, labels[r]) - lse;
    s.entropy[r] = lse - mean;
  }
  return s;
}

/// d(sum_r g_r logp_r + h_r H_r) / d logits (the raw logits, hence / T).
Vec logits_grad(const Logits& l, const std::vector<std::int64_t>& labels, const Softmax& s,
                const Vec& g, const Vec& h, double temperature) {
  Vec out(l.z.size(), 0.0);
  for (std::int64_t r = 0; r < l.rows; ++r) {
    if (labels[r] == kIgnore) continue;
    for (std::int64_t j = 0; j < l.vocab; ++j) {
      const double p = std::exp(l.at(r, j) - s.lse[r]);
      double d = (j == labels[r] ? g[r] : 0.0);
      if (p > 0) d -= g[r] * p + h[r] * p * (l.at(r, j) - s.mean_z[r]);
      out[r * l.vocab + j] = d / temperature;
    }
  }
  return out;
}

/// verl's clipped objective, token-mean or seq-mean-token-mean, with the
/// gradient coefficient dloss/dlogp per token.
struct Loss {
  double loss = 0, clip_frac = 0, clip_frac_high = 0, ratio_min = kInf, ratio_max = -kInf,
         count = 0, kl_k1 = 0;
  Vec coef;
};

Loss clipped(const Vec& logp, const Vec& old, const Vec& adv, const std::vector<bool>& valid,
             std::int64_t rows, std::int64_t cols, double eps_low, double eps_high,
             double dual_clip /* <= 0: none */, bool seq_mean_token_mean) {
  Loss out;
  out.coef.assign(logp.size(), 0.0);
  Vec token_loss(logp.size(), 0.0), token_grad(logp.size(), 0.0);
  for (std::size_t i = 0; i < logp.size(); ++i) {
    if (!valid[i]) continue;
    const double raw = logp[i] - old[i];
    const double d = std::min(20.0, std::max(-20.0, raw));
    const double r = std::exp(d);
    const double a = adv[i];
    const double l1 = -a * r;
    const double l2 = -a * std::min(1.0 + eps_high, std::max(1.0 - eps_low, r));
    double l = std::max(l1, l2);
    bool dual = false;
    if (a < 0 && dual_clip > 0 && l > -a * dual_clip) {
      l = -a * dual_clip;
      dual = true;
    }
    const bool trusted = raw >= -20 && raw <= 20 && !(l2 > l1) && !dual;
    token_loss[i] = l;
    token_grad[i] = trusted ? -a * r : 0.0;
    out.count += 1;
    out.clip_frac += l2 > l1 ? 1 : 0;
    out.clip_frac_high += (a > 0 && r > 1 + eps_high) ? 1 : 0;
    out.ratio_min = std::min(out.ratio_min, r);
    out.ratio_max = std::max(out.ratio_max, r);
    out.kl_k1 += -d;
  }
  if (!seq_mean_token_mean) {
    const double n = out.count;
    for (std::size_t i = 0; i < logp.size(); ++i) {
      out.loss += n > 0 ? token_loss[i] / n : 0.0;
      out.coef[i] = n > 0 ? token_grad[i] / n : 0.0;
    }
  } else {
    double sequences = 0;
    for (std::int64_t b = 0; b < rows; ++b) {
      double n = 0;
      for (std::int64_t t = 0; t < cols; ++t) n += valid[b * cols + t] ? 1 : 0;
      sequences += n > 0 ? 1 : 0;
    }
    for (std::int64_t b = 0; b < rows; ++b) {
      double n = 0;
      for (std::int64_t t = 0; t < cols; ++t) n += valid[b * cols + t] ? 1 : 0;
      for (std::int64_t t = 0; t < cols; ++t) {
        const std::size_t i = b * cols + t;
        if (!valid[i] || sequences == 0) continue;
        out.loss += token_loss[i] / n / sequences;
        out.coef[i] = token_grad[i] / n / sequences;
      }
    }
  }
  if (out.count > 0) {
    out.clip_frac /= out.count;
    out.clip_frac_high /= out.count;
    out.kl_k1 /= out.count;
  } else {
    out.ratio_min = out.ratio_max = 1.0;
  }
  return out;
}

}  // namespace ref

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

Vec to_vec(const at::Tensor& t) {
  const at::Tensor d = t.detach().to(at::kDouble).contiguous();
  return Vec(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

std::vector<std::int64_t> to_labels(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(),
                                   c.data_ptr<std::int64_t>() + c.numel());
}

double scalar(const at::Tensor& t) { return t.detach().to(at::kDouble).item<double>(); }

/// |got - want| <= atol + rtol |want| + scaled max|want|. The scaled part
/// covers float cancellation inside the entropy gradient, p (g + h (z - mean)),
/// which is relative to the row's largest terms, not to the result.
struct Tol {
  double atol, rtol, scaled = 0.0;
};

/// Per-dtype tolerances (see the table at the top).
Tol value_tol(at::ScalarType t) { return t == at::kDouble ? Tol{1e-11, 1e-11} : Tol{2e-5, 1e-5}; }
Tol grad_tol(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return {1e-14, 1e-11, 1e-13};
    case at::kFloat:
      return {1e-8, 1e-4, 2e-6};
    case at::kBFloat16:
      return {1e-8, 8e-3, 2e-6};
    default:
      return {1e-7, 2e-3, 2e-6};
  }
}

/// One assertion for a whole vector: reports the worst element.
void require_close(const Vec& got, const Vec& want, Tol tol, const std::string& what) {
  REQUIRE(got.size() == want.size());
  double largest = 0.0;
  for (double w : want) largest = std::isfinite(w) ? std::max(largest, std::abs(w)) : largest;
  std::size_t worst = 0;
  double worst_excess = -kInf;
  bool ok = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i]) && got[i] == want[i]) continue;
    const double err = std::abs(got[i] - want[i]);
    const double excess = err - (tol.atol + tol.rtol * std::abs(want[i]) + tol.scaled * largest);
    if (!(excess <= 0)) ok = false;
    if (!(excess <= worst_excess)) {
      worst_excess = excess;
      worst = i;
    }
  }
  INFO(what << ": worst element " << worst << " of " << got.size() << ": got "
            << (got.empty() ? 0.0 : got[worst]) << ", want " << (want.empty() ? 0.0 : want[worst]));
  CHECK(ok);
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

/// Random logits of scale `scale`, rounded to `dtype`, as a leaf.
at::Tensor random_logits(at::IntArrayRef shape, at::ScalarType dtype, double scale = 3.0) {
  return (at::randn(shape, at::kDouble) * scale).to(dtype).requires_grad_(true);
}

/// Random labels in [0, vocab), about `ignored` of them ignore_index.
at::Tensor random_labels(at::IntArrayRef shape, std::int64_t vocab, double ignored = 0.2) {
  at::Tensor labels = at::randint(0, vocab, shape, at::kLong);
  return at::where(at::rand(shape, at::kDouble) < ignored, at::full({}, kIgnore, at::kLong),
                   labels);
}

psft::LogitsOptions logits_options(psft::Backend backend, double temperature = 1.0,
                                   bool entropy_grad = false) {
  psft::LogitsOptions o;
  o.backend = backend;
  o.temperature = temperature;
  o.entropy_grad = entropy_grad;
  return o;
}

const psft::Backend kBackends[] = {psft::Backend::FusedCpu, psft::Backend::Composed};

}  // namespace

// ---------------------------------------------------------------------------
// Core accumulator (torch-free): merge order, -inf, NaN.
// ---------------------------------------------------------------------------

TEST_CASE("core::OnlineSoftmax adds, merges and poisons like the reference", "[logits][core]") {
  const std::vector<double> z = {0.5, -1.0, 3.0, -kInf, 2.0, -7.5, 3.0, 1e-3};
  psft::core::OnlineSoftmax<double> all;
  for (double v : z) all.add(v);
  psft::core::OnlineSoftmax<double> left, right;
  for (std::size_t i = 0; i < 3; ++i) left.add(z[i]);
  for (std::size_t i = 3; i < z.size(); ++i) right.add(z[i]);
  right.merge(left);  // any order

  double m = -kInf, sum = 0, mean = 0;
  for (double v : z) m = std::max(m, v);
  for (double v : z) sum += std::exp(v - m);
  const double lse = m + std::log(sum);
  for (double v : z) mean += v == -kInf ? 0.0 : std::exp(v - lse) * v;
  for (const auto* s : {&all, &right}) {
    CHECK(s->logsumexp() == Approx(lse).epsilon(1e-14));
    CHECK(s->entropy() == Approx(lse - mean).epsilon(1e-13));
    CHECK(s->log_prob(2.0) == Approx(2.0 - lse).epsilon(1e-14));
    CHECK(s->log_prob(-kInf) == -kInf);
  }
  psft::core::OnlineSoftmax<float> empty;
  empty.add(-std::numeric_limits<float>::infinity());
  CHECK(empty.empty());
  CHECK_FALSE(empty.invalid());
  psft::core::OnlineSoftmax<float> poisoned;
  poisoned.add(1.0f);
  poisoned.add(std::numeric_limits<float>::quiet_NaN());
  CHECK(poisoned.invalid());
  psft::core::OnlineSoftmax<float> one;
  one.add(42.0f);
  CHECK(one.entropy() == 0.0f);
  CHECK(one.log_prob(42.0f) == 0.0f);
}

// ---------------------------------------------------------------------------
// token_logprobs parity.
// ---------------------------------------------------------------------------

TEST_CASE("token_logprobs matches the double reference: values and gradient", "[logits][parity]") {
  torch::manual_seed(1);
  const at::ScalarType dtypes[] = {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf};
  const std::int64_t vocabs[] = {1, 7, 33, 1000, 4099};
  for (at::ScalarType dtype : dtypes) {
    for (std::int64_t vocab : vocabs) {
      for (psft::Backend backend : kBackends) {
        for (double temperature : {1.0, 0.7}) {
          for (bool entropy_grad : {false, true}) {
            for (bool flat : {false, true}) {
              INFO(dtype_name(dtype)
                   << " V=" << vocab << " " << psft::backend_name(backend) << " T=" << temperature
                   << " entropy_grad=" << entropy_grad << (flat ? " [N, V]" : " [B, T, V]"));
              const at::Tensor logits =
                  flat ? random_logits({9, vocab}, dtype) : random_logits({2, 5, vocab}, dtype);
              const at::Tensor labels =
                  random_labels(logits.sizes().slice(0, logits.dim() - 1), vocab);
              const psft::LogitsOptions opts = logits_options(backend, temperature, entropy_grad);
              const psft::TokenLogprobs out = psft::token_logprobs(logits, labels, opts);
              REQUIRE(out.backend == backend);
              REQUIRE(out.logp.sizes() == labels.sizes());
              REQUIRE(out.logp.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat));
              REQUIRE(out.logp.requires_grad());
              REQUIRE(out.entropy.requires_grad() == entropy_grad);

              const std::vector<std::int64_t> lab = to_labels(labels);
              const ref::Logits l = ref::from_tensor(logits, temperature);
              const ref::Softmax s = ref::softmax(l, lab);
              require_close(to_vec(out.logp), s.logp, value_tol(dtype), "logp");
              require_close(to_vec(out.entropy), s.entropy, value_tol(dtype), "entropy");

              // Backward of sum(g logp) (+ sum(h H)).
              const at::Tensor g = at::randn(labels.sizes(), out.logp.options());
              const at::Tensor h = at::randn(labels.sizes(), out.logp.options());
              at::Tensor objective = (out.logp * g).sum();
              if (entropy_grad) objective = objective + (out.entropy * h).sum();
              objective.backward();
              const Vec h_ref = entropy_grad ? to_vec(h) : Vec(lab.size(), 0.0);
              const Vec want = ref::logits_grad(l, lab, s, to_vec(g), h_ref, temperature);
              REQUIRE(logits.grad().scalar_type() == dtype);
              require_close(to_vec(logits.grad()), want, grad_tol(dtype), "grad");
            }
          }
        }
      }
    }
  }
}

TEST_CASE("token_logprobs without grad, and its backend choice", "[logits]") {
  torch::manual_seed(2);
  const at::Tensor logits = random_logits({3, 4, 50}, at::kFloat);
  const at::Tensor labels = random_labels({3, 4}, 50);
  {
    torch::NoGradGuard no_grad;
    const psft::TokenLogprobs out = psft::token_logprobs(logits, labels);
    CHECK_FALSE(out.logp.requires_grad());
    CHECK(out.backend == psft::Backend::FusedCpu);
  }
  const psft::TokenLogprobs detached = psft::token_logprobs(logits.detach(), labels);
  CHECK_FALSE(detached.logp.requires_grad());
  const psft::TokenLogprobs with_grad = psft::token_logprobs(logits, labels);
  CHECK(torch::equal(detached.logp, with_grad.logp));
  CHECK(torch::equal(detached.entropy, with_grad.entropy));
  CHECK_FALSE(with_grad.entropy.requires_grad());  // a metric by default
  psft::LogitsOptions cuda;
  cuda.backend = psft::Backend::FusedCuda;
  CHECK_THROWS_WITH(psft::token_logprobs(logits, labels, cuda), Catch::Contains("FusedCuda"));
}

// ---------------------------------------------------------------------------
// The loss from logits.
// ---------------------------------------------------------------------------

TEST_CASE("psft_loss_from_logits matches the reference loss, metrics and gradient",
          "[logits][loss]") {
  torch::manual_seed(3);
  const at::ScalarType dtypes[] = {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf};
  for (at::ScalarType dtype : dtypes) {
    for (psft::Backend backend : kBackends) {
      for (double temperature : {1.0, 1.3}) {
        INFO(dtype_name(dtype) << " " << psft::backend_name(backend) << " T=" << temperature);
        const std::int64_t B = 3, T = 7, V = 257;
        const at::Tensor logits = random_logits({B, T, V}, dtype);
        const at::Tensor labels = random_labels({B, T}, V, 0.3);
        const psft::LogitsOptions opts = logits_options(backend, temperature);
        const std::vector<std::int64_t> lab = to_labels(labels);
        const ref::Logits l = ref::from_tensor(logits, temperature);
        const ref::Softmax s = ref::softmax(l, lab);
        // Old log-probs 0-0.6 nats off, so that some tokens clip.
        const at::Tensor old_logp = (torch::tensor(s.logp, at::kDouble).reshape({B, T}) +
                                     (at::rand({B, T}, at::kDouble) * 0.8 - 0.4))
                                        .to(at::kFloat);
        const psft::LogitsLossResult out =
            psft::psft_loss_from_logits(logits, labels, old_logp, {}, opts);
        REQUIRE(out.backend == backend);
        std::vector<bool> valid(lab.size());
        for (std::size_t i = 0; i < lab.size(); ++i) valid[i] = lab[i] != kIgnore;
        const ref::Loss want = ref::clipped(s.logp, to_vec(old_logp), Vec(lab.size(), 1.0), valid,
                                            B, T, 0.2, 0.28, 0.0, false);
        const Tol tol = value_tol(dtype);
        CHECK(std::abs(scalar(out.loss) - want.loss) <= tol.atol + tol.rtol * std::abs(want.loss));
        CHECK(scalar(out.metrics.clip_frac_high) == Approx(want.clip_frac_high));
        CHECK(scalar(out.metrics.clip_frac) == Approx(want.clip_frac));
        CHECK(scalar(out.metrics.token_count) == want.count);
        CHECK(scalar(out.metrics.ratio_max) == Approx(want.ratio_max).epsilon(1e-4));
        CHECK(scalar(out.metrics.ratio_min) == Approx(want.ratio_min).epsilon(1e-4));
        double entropy_sum = 0;
        for (std::size_t i = 0; i < lab.size(); ++i) entropy_sum += valid[i] ? s.entropy[i] : 0.0;
        CHECK(scalar(out.entropy_mean) == Approx(entropy_sum / want.count).epsilon(1e-5));
        require_close(to_vec(out.logp), s.logp, tol, "logp");

        out.loss.backward();
        const Vec grad = ref::logits_grad(l, lab, s, want.coef, Vec(lab.size(), 0.0), temperature);
        require_close(to_vec(logits.grad()), grad, grad_tol(dtype), "grad");
      }
    }
  }
}

TEST_CASE("policy_loss_from_logits: advantages, dual clip, SeqMeanTokenMean", "[logits][loss]") {
  torch::manual_seed(4);
  for (psft::Backend backend : kBackends) {
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      INFO(dtype_name(dtype) << " " << psft::backend_name(backend));
      const std::int64_t B = 4, T = 6, V = 100;
      const at::Tensor logits = random_logits({B, T, V}, dtype);
      at::Tensor labels = random_labels({B, T}, V, 0.25);
      labels.select(0, 3).fill_(kIgnore);  // an empty sequence
      const std::vector<std::int64_t> lab = to_labels(labels);
      const ref::Logits l = ref::from_tensor(logits, 1.0);
      const ref::Softmax s = ref::softmax(l, lab);
      const at::Tensor old_logp = (torch::tensor(s.logp, at::kDouble).reshape({B, T}) +
                                   (at::rand({B, T}, at::kDouble) * 1.6 - 0.8))
                                      .to(at::kFloat);
      const at::Tensor advantages = torch::tensor({1.5, -2.0, -0.5, 1.0}, at::kFloat);
      psft::LossOptions loss_opts;
      loss_opts.clip.dual_clip = 1.5;
      loss_opts.reduction = psft::Reduction::SeqMeanTokenMean;
      const psft::LogitsLossResult out = psft::policy_loss_from_logits(
          logits, labels, old_logp, advantages, loss_opts, logits_options(backend));
      std::vector<bool> valid(lab.size());
      Vec adv(lab.size());
      for (std::size_t i = 0; i < lab.size(); ++i) {
        valid[i] = lab[i] != kIgnore;
        adv[i] = to_vec(advantages)[i / T];
      }
      const ref::Loss want =
          ref::clipped(s.logp, to_vec(old_logp), adv, valid, B, T, 0.2, 0.28, 1.5, true);
      CHECK(scalar(out.loss) == Approx(want.loss).epsilon(1e-5).margin(1e-7));
      CHECK(scalar(out.metrics.clip_frac) == Approx(want.clip_frac));
      CHECK(scalar(out.metrics.approx_kl_k1) == Approx(want.kl_k1).epsilon(1e-5).margin(1e-7));
      out.loss.backward();
      const Vec grad = ref::logits_grad(l, lab, s, want.coef, Vec(lab.size(), 0.0), 1.0);
      require_close(to_vec(logits.grad()), grad, grad_tol(dtype), "grad");
    }
  }
}

/// Whether t's gradient comes from LogitsLossFunction (the gradient
/// computed in the forward pass).
bool gradient_from_forward(const at::Tensor& t) {
  return t.grad_fn() && t.grad_fn()->name().find("LogitsLossFunction") != std::string::npos;
}

TEST_CASE("the gradient computed in the forward pass equals the two-pass path's",
          "[logits][loss]") {
  torch::manual_seed(21);
  struct Case {
    const char* name;
    psft::Reduction reduction;
    double entropy_coeff;
    bool advantages;    // policy_loss_from_logits with per-sequence advantages, dual clip
    bool on_policy;     // old_logp undefined
    double grad_scale;  // grad_output of the loss
    bool extra;         // a further gradient through logp and entropy
  };
  const Case cases[] = {
      {"token-mean", psft::Reduction::TokenMean, 0.0, false, false, 1.0, false},
      {"seq-mean-token-mean, advantages", psft::Reduction::SeqMeanTokenMean, 0.0, true, false, 1.0,
       false},
      {"entropy bonus, grad_output 3", psft::Reduction::TokenMean, 0.01, false, false, 3.0, false},
      {"on-policy, token-sum, grad through logp", psft::Reduction::TokenSum, 0.0, false, true, 0.5,
       true},
      {"seq-mean-token-sum-norm, entropy bonus, grad through logp and entropy",
       psft::Reduction::SeqMeanTokenSumNorm, 0.02, true, false, 1.0, true},
  };
  // V = 300: one vocabulary block; V = 4099: three, the second 30 below the
  // first (its exponentials scaled by e^(m_b - m) < e^-20), the third (3
  // entries) -inf in one row, so that a kept block's max is -inf.
  for (const std::int64_t V : {300, 4099}) {
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
      for (const double temperature : {1.0, 1.3}) {
        for (const Case& c : cases) {
          INFO(dtype_name(dtype) << " V=" << V << " T=" << temperature << " " << c.name);
          const std::int64_t B = 3, T = 7;
          const at::Tensor logits = random_logits({B, T, V}, dtype);
          if (V > 4096) {
            at::NoGradGuard no_grad;
            logits.narrow(2, 2048, 2048).sub_(30.0);
            logits[1][2].narrow(0, 4096, 3).fill_(-std::numeric_limits<double>::infinity());
            logits[2][4][5].fill_(-std::numeric_limits<double>::infinity());
          }
          const at::Tensor labels = random_labels({B, T}, V, 0.3);
          if (V > 4096) labels[1][2].fill_(7), labels[2][4].fill_(9);  // not on a -inf entry
          at::Tensor old_logp;
          {
            at::NoGradGuard no_grad;
            old_logp = psft::token_logprobs(logits, labels,
                                            logits_options(psft::Backend::FusedCpu, temperature))
                           .logp +
                       (at::rand({B, T}) * 0.8 - 0.4);
          }
          const at::Tensor advantages = torch::tensor({1.5, -2.0, 0.5});
          const at::Tensor wl = at::randn({B, T}), we = at::randn({B, T});
          const auto run = [&](bool in_forward) {
            logits.mutable_grad() = at::Tensor();
            psft::LogitsOptions o = logits_options(psft::Backend::FusedCpu, temperature, c.extra);
            o.gradient_in_forward = in_forward;
            psft::LossOptions lo;
            lo.reduction = c.reduction;
            lo.entropy_coeff = c.entropy_coeff;
            if (c.advantages) lo.clip.dual_clip = 2.0;
            const at::Tensor old = c.on_policy ? at::Tensor() : old_logp;
            const psft::LogitsLossResult out =
                c.advantages ? psft::policy_loss_from_logits(logits, labels, old, advantages, lo, o)
                             : psft::psft_loss_from_logits(logits, labels, old, lo, o);
            CHECK(gradient_from_forward(out.loss) == in_forward);
            at::Tensor total = out.loss * c.grad_scale;
            if (c.extra) total = total + (out.logp * wl).sum() + (out.entropy * we).sum();
            total.backward();
            return std::make_pair(out, logits.grad().clone());
          };
          const auto [fused, fused_grad] = run(true);
          const auto [two_pass, two_pass_grad] = run(false);
          // The values come from the same kernels: bitwise equal.
          CHECK(scalar(fused.loss) == scalar(two_pass.loss));
          CHECK(torch::equal(fused.logp, two_pass.logp));
          CHECK(torch::equal(fused.entropy, two_pass.entropy));
          CHECK(scalar(fused.entropy_mean) == scalar(two_pass.entropy_mean));
          CHECK(scalar(fused.nll_mean) == scalar(two_pass.nll_mean));
          CHECK(scalar(fused.metrics.clip_frac) == scalar(two_pass.metrics.clip_frac));
          CHECK(scalar(fused.metrics.ratio_max) == scalar(two_pass.metrics.ratio_max));
          // The gradient up to the rounding of the ratio's exp (and, in
          // bf16/fp16, of one rounding more where grad_output != 1).
          const Tol tol = dtype == at::kDouble  ? Tol{1e-15, 1e-12, 1e-15}
                          : dtype == at::kFloat ? Tol{1e-9, 2e-6, 1e-7}
                          : dtype == at::kHalf  ? Tol{1e-7, 2e-3, 1e-6}
                                                : Tol{1e-8, 8e-3, 1e-6};
          require_close(to_vec(fused_grad), to_vec(two_pass_grad), tol, "grad");
          CHECK(fused_grad.abs().sum().item<double>() > 0);
        }
      }
    }
  }
}

TEST_CASE("the gradient computed in the forward pass: retain_graph, no grad, other backends",
          "[logits][loss]") {
  torch::manual_seed(22);
  const at::Tensor logits = random_logits({6, 500}, at::kFloat);
  const at::Tensor labels = random_labels({6}, 500);
  const at::Tensor old_logp = at::randn({6}) * 0.1 - 6.0;
  const psft::LogitsOptions fused = logits_options(psft::Backend::FusedCpu);
  psft::LogitsOptions two_pass = fused;
  two_pass.gradient_in_forward = false;

  psft::psft_loss_from_logits(logits, labels, old_logp, {}, two_pass).loss.backward();
  const at::Tensor want = logits.grad().clone();
  logits.mutable_grad() = at::Tensor();

  // A second backward of the same graph recomputes the gradient it gave away.
  const psft::LogitsLossResult out =
      psft::psft_loss_from_logits(logits, labels, old_logp, {}, fused);
  REQUIRE(gradient_from_forward(out.loss));
  out.loss.backward({}, /*retain_graph=*/true);
  require_close(to_vec(logits.grad()), to_vec(want), {1e-9, 2e-6, 1e-7}, "first backward");
  out.loss.backward();
  require_close(to_vec(logits.grad()), to_vec(want * 2), {1e-9, 2e-6, 1e-7}, "second backward");

  // No gradient wanted, a sequence-level ratio, or the composed backend:
  // the two-pass path.
  {
    at::NoGradGuard no_grad;
    CHECK(!gradient_from_forward(psft::psft_loss_from_logits(logits, labels, old_logp).loss));
  }
  CHECK(!gradient_from_forward(
      psft::psft_loss_from_logits(logits.detach(), labels, old_logp, {}, fused).loss));
  psft::LossOptions gspo;
  gspo.objective.ratio_level = psft::RatioLevel::Sequence;
  CHECK(!gradient_from_forward(psft::psft_loss_from_logits(logits.view({2, 3, 500}),
                                                           labels.view({2, 3}),
                                                           old_logp.view({2, 3}), gspo, fused)
                                   .loss));
  CHECK(!gradient_from_forward(psft::psft_loss_from_logits(logits, labels, old_logp, {},
                                                           logits_options(psft::Backend::Composed))
                                   .loss));
  // Bad loss arguments are refused before the pass, naming the argument.
  CHECK_THROWS_WITH(psft::psft_loss_from_logits(logits, labels, at::zeros({5}), {}, fused),
                    Catch::Contains("old_logp"));
  CHECK_THROWS_WITH(
      psft::policy_loss_from_logits(logits, labels, old_logp, at::ones({4}), {}, fused),
      Catch::Contains("advantages"));
}

TEST_CASE("finite differences in float64", "[logits][gradcheck]") {
  torch::manual_seed(5);
  const std::int64_t B = 2, T = 3, V = 6;
  const double h = 1e-6;
  for (psft::Backend backend : kBackends) {
    INFO(psft::backend_name(backend));
    const at::Tensor base = at::randn({B, T, V}, at::kDouble) * 2;
    const at::Tensor labels = torch::tensor({{1, -100, 5}, {0, 3, 2}}, at::kLong);
    const psft::LogitsOptions opts = logits_options(backend, 0.8, /*entropy_grad=*/true);

    // The PSFT loss: old log-probs chosen so that ratios sit well away from
    // the clip edge (1.82 is clipped, the others are trusted).
    at::Tensor logp0;
    {
      torch::NoGradGuard no_grad;
      logp0 = psft::token_logprobs(base, labels, opts).logp;
    }
    const at::Tensor offsets = torch::tensor({{-0.6, 0.0, 0.1}, {0.5, -0.1, 0.3}}, at::kDouble);
    const at::Tensor old_logp = logp0 + offsets;
    const auto loss_of = [&](const at::Tensor& x) {
      torch::NoGradGuard no_grad;
      return scalar(psft::psft_loss_from_logits(x, labels, old_logp, {}, opts).loss);
    };
    // token_logprobs with an entropy term, weights fixed.
    const at::Tensor w = torch::tensor({{0.3, 0.0, -1.2}, {0.7, 2.0, -0.4}}, at::kDouble);
    const at::Tensor u = torch::tensor({{-0.5, 0.0, 1.1}, {0.9, -0.8, 0.25}}, at::kDouble);
    const auto objective_of = [&](const at::Tensor& x) {
      torch::NoGradGuard no_grad;
      const psft::TokenLogprobs t = psft::token_logprobs(x, labels, opts);
      return scalar((t.logp * w).sum() + (t.entropy * u).sum());
    };

    const at::Tensor x1 = base.clone().requires_grad_(true);
    psft::psft_loss_from_logits(x1, labels, old_logp, {}, opts).loss.backward();
    const at::Tensor x2 = base.clone().requires_grad_(true);
    {
      const psft::TokenLogprobs t = psft::token_logprobs(x2, labels, opts);
      ((t.logp * w).sum() + (t.entropy * u).sum()).backward();
    }
    const Vec g1 = to_vec(x1.grad()), g2 = to_vec(x2.grad());
    Vec fd1(g1.size()), fd2(g2.size());
    for (std::int64_t i = 0; i < base.numel(); ++i) {
      at::Tensor plus = base.clone(), minus = base.clone();
      plus.view({-1})[i] += h;
      minus.view({-1})[i] -= h;
      fd1[i] = (loss_of(plus) - loss_of(minus)) / (2 * h);
      fd2[i] = (objective_of(plus) - objective_of(minus)) / (2 * h);
    }
    require_close(g1, fd1, {1e-8, 1e-6}, "psft_loss_from_logits");
    require_close(g2, fd2, {1e-8, 1e-6}, "token_logprobs with entropy_grad");
    // The ignored token's row has exactly zero gradient.
    CHECK(x1.grad()[0][1].abs().max().item<double>() == 0.0);
    CHECK(x2.grad()[0][1].abs().max().item<double>() == 0.0);
  }
}

// ---------------------------------------------------------------------------
// PSFT's invariant: unchanged weights, unchanged numbers.
// ---------------------------------------------------------------------------

TEST_CASE("lr = 0 round trip: ratio exactly 1 and nothing clipped", "[logits][roundtrip]") {
  torch::manual_seed(6);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (psft::Backend backend : kBackends) {
      for (double temperature : {1.0, 0.6}) {
        INFO(dtype_name(dtype) << " " << psft::backend_name(backend) << " T=" << temperature);
        // Non-contiguous too: every other position of a longer sequence.
        const at::Tensor wide = random_logits({4, 64, 3001}, dtype, 4.0);
        const at::Tensor logits = wide.slice(1, 0, 64, 2);
        const at::Tensor labels = random_labels({4, 32}, 3001);
        const psft::LogitsOptions opts = logits_options(backend, temperature);
        at::Tensor old_logp;
        {
          torch::NoGradGuard no_grad;
          old_logp = psft::token_logprobs(logits, labels, opts).logp;
        }
        REQUIRE(old_logp.scalar_type() == at::kFloat);
        const psft::LogitsLossResult out =
            psft::psft_loss_from_logits(logits, labels, old_logp, {}, opts);
        CHECK(scalar(out.metrics.ratio_min) == 1.0);
        CHECK(scalar(out.metrics.ratio_max) == 1.0);
        CHECK(scalar(out.metrics.clip_frac_high) == 0.0);
        CHECK(scalar(out.metrics.clip_frac) == 0.0);
        CHECK(scalar(out.metrics.approx_kl_k1) == 0.0);
        CHECK(torch::equal(out.logp, old_logp));
        out.loss.backward();
        CHECK(wide.grad().isfinite().all().item<bool>());
      }
    }
  }
}

/// token_logprobs' values and gradient are bitwise equal at 1 and 2+ threads.
static void check_thread_independent() {
  const at::Tensor logits = random_logits({8, 16, 5000}, at::kBFloat16);
  const at::Tensor labels = random_labels({8, 16}, 5000);
  const int threads = at::get_num_threads();
  const auto run = [&](int n) {
    at::set_num_threads(n);
    logits.mutable_grad() = at::Tensor();
    const psft::TokenLogprobs t = psft::token_logprobs(logits, labels);
    (t.logp.sum() * 0.25).backward();
    std::vector<at::Tensor> out{t.logp.detach(), t.entropy.detach(), logits.grad().clone()};
    // The loss with its gradient computed in the forward pass.
    logits.mutable_grad() = at::Tensor();
    const psft::LogitsLossResult l =
        psft::psft_loss_from_logits(logits, labels, t.logp.detach() - 0.1);
    l.loss.backward();
    out.push_back(l.loss.detach());
    out.push_back(logits.grad().clone());
    return out;
  };
  const auto one = run(1);
  const auto many = run(std::max(2, threads));
  at::set_num_threads(threads);
  for (std::size_t i = 0; i < one.size(); ++i) CHECK(torch::equal(one[i], many[i]));
}

TEST_CASE("results do not depend on the thread count", "[logits]") {
  torch::manual_seed(7);
  check_thread_independent();
}

// ---------------------------------------------------------------------------
// Extreme values.
// ---------------------------------------------------------------------------

TEST_CASE("logits of +-1e4 stay accurate", "[logits][extreme]") {
  torch::manual_seed(8);
  for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    for (psft::Backend backend : kBackends) {
      INFO(dtype_name(dtype) << " " << psft::backend_name(backend));
      const std::int64_t N = 12, V = 777;
      // Uniform in [-1e4, 1e4] plus a few near-ties at the top.
      at::Tensor x = (at::rand({N, V}, at::kDouble) * 2e4 - 1e4);
      x.select(1, 5).copy_(x.amax(1) - 0.5);
      x.select(1, 9).copy_(x.amax(1) - 3.0);
      const at::Tensor logits = x.to(dtype).requires_grad_(true);
      at::Tensor labels = random_labels({N}, V, 0.1);
      labels[0] = 5;
      labels[1] = 9;
      const psft::TokenLogprobs out = psft::token_logprobs(logits, labels, logits_options(backend));
      const std::vector<std::int64_t> lab = to_labels(labels);
      const ref::Logits l = ref::from_tensor(logits, 1.0);
      const ref::Softmax s = ref::softmax(l, lab);
      require_close(to_vec(out.logp), s.logp, {1e-5, 1e-6}, "logp");
      require_close(to_vec(out.entropy), s.entropy, {2e-5, 1e-5}, "entropy");
      out.logp.sum().backward();
      const Vec grad = ref::logits_grad(l, lab, s, Vec(lab.size(), 1.0), Vec(lab.size(), 0.0), 1.0);
      require_close(to_vec(logits.grad()), grad, {1e-6, 1e-4}, "grad");
    }
  }
}

TEST_CASE("-inf logits: finite entropy, zero gradient there, logp -inf at a -inf label",
          "[logits][extreme]") {
  torch::manual_seed(9);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (psft::Backend backend : kBackends) {
      INFO(dtype_name(dtype) << " " << psft::backend_name(backend));
      const std::int64_t N = 6, V = 2100;  // more than one kernel block
      at::Tensor x = at::randn({N, V}, at::kDouble) * 2;
      // Mask most of the vocabulary, as constrained decoding does; row 3 keeps
      // a single finite entry, row 4 has a whole block of -inf.
      x.masked_fill_(at::rand({N, V}, at::kDouble) < 0.7, -kInf);
      x.select(0, 3).fill_(-kInf);
      x[3][17] = 1.5;
      x.select(0, 4).slice(0, 0, 2048).fill_(-kInf);
      x[4][2050] = 0.25;
      const at::Tensor logits = x.to(dtype).requires_grad_(true);
      at::Tensor labels = at::empty({N}, at::kLong);
      for (std::int64_t r = 0; r < N; ++r) {
        // A finite entry for every row but row 5, whose label is masked.
        std::int64_t j = 0;
        while (std::isinf(x[r][j].item<double>())) ++j;
        labels[r] = j;
      }
      labels[3] = 17;
      std::int64_t masked = 0;
      while (!std::isinf(x[5][masked].item<double>())) ++masked;
      labels[5] = masked;

      const psft::TokenLogprobs out = psft::token_logprobs(logits, labels, logits_options(backend));
      const std::vector<std::int64_t> lab = to_labels(labels);
      const ref::Logits l = ref::from_tensor(logits, 1.0);
      const ref::Softmax s = ref::softmax(l, lab);
      CHECK(out.entropy.isfinite().all().item<bool>());
      CHECK(out.logp[5].item<double>() == -kInf);
      CHECK(out.logp[3].item<double>() == 0.0);  // a single finite entry: p = 1
      CHECK(out.entropy[3].item<double>() == 0.0);
      require_close(to_vec(out.logp), s.logp, value_tol(dtype), "logp");
      require_close(to_vec(out.entropy), s.entropy, value_tol(dtype), "entropy");

      // Through the loss: a scored token of probability 0 is an error under
      // check_finite (its logp is -inf, as an old_logp of -inf would be).
      // Unchecked, it has ratio e^-20 (clamped log-ratio), a constant, so no
      // gradient and no NaN anywhere.
      const at::Tensor old_logp = at::zeros({N}, at::kFloat);
      CHECK_THROWS_WITH(
          psft::psft_loss_from_logits(logits, labels, old_logp, {}, logits_options(backend)),
          Catch::Contains("logp has NaN or Inf"));
      psft::LossOptions unchecked;
      unchecked.check_finite = false;
      const psft::LogitsLossResult loss =
          psft::psft_loss_from_logits(logits, labels, old_logp, unchecked, logits_options(backend));
      CHECK(std::isfinite(scalar(loss.loss)));
      CHECK(scalar(loss.metrics.ratio_min) == Approx(std::exp(-20.0)).epsilon(1e-5));
      loss.loss.backward();
      const at::Tensor grad = logits.grad().to(at::kDouble);
      CHECK(grad.isfinite().all().item<bool>());
      CHECK(at::where(x.isinf(), grad, at::zeros_like(grad)).abs().max().item<double>() == 0.0);
    }
  }
}

TEST_CASE("fully ignored batches: loss 0 on the graph, zero gradient", "[logits][empty]") {
  for (psft::Backend backend : kBackends) {
    INFO(psft::backend_name(backend));
    // NaN logits at ignored positions are never read.
    const at::Tensor logits =
        at::full({2, 3, 11}, std::numeric_limits<double>::quiet_NaN(), at::kFloat)
            .requires_grad_(true);
    const at::Tensor labels = at::full({2, 3}, kIgnore, at::kLong);
    const at::Tensor old_logp = at::zeros({2, 3}, at::kFloat);
    const psft::LogitsLossResult out =
        psft::psft_loss_from_logits(logits, labels, old_logp, {}, logits_options(backend));
    CHECK(scalar(out.loss) == 0.0);
    CHECK(out.loss.requires_grad());
    CHECK(scalar(out.entropy_mean) == 0.0);
    CHECK(scalar(out.metrics.token_count) == 0.0);
    CHECK(scalar(out.metrics.ratio_min) == 1.0);
    CHECK(out.logp.abs().max().item<double>() == 0.0);
    out.loss.backward();
    REQUIRE(logits.grad().defined());
    CHECK(logits.grad().abs().max().item<double>() == 0.0);
  }
  // No tokens at all.
  const at::Tensor none = at::zeros({0, 5}, at::kFloat).requires_grad_(true);
  const at::Tensor no_labels = at::zeros({0}, at::kLong);
  const psft::LogitsLossResult out =
      psft::psft_loss_from_logits(none, no_labels, at::zeros({0}, at::kFloat));
  CHECK(scalar(out.loss) == 0.0);
  out.loss.backward();
  CHECK(none.grad().numel() == 0);
}

// ---------------------------------------------------------------------------
// Layouts.
// ---------------------------------------------------------------------------

TEST_CASE("non-contiguous logits: strided rows, padded rows, strided vocabulary",
          "[logits][layout]") {
  torch::manual_seed(10);
  for (psft::Backend backend : kBackends) {
    for (bool small_chunks : {false, true}) {
      INFO(psft::backend_name(backend) << " small_chunks=" << small_chunks);
      psft::LogitsOptions opts = logits_options(backend, 0.9);
      if (small_chunks) opts.composed_chunk_bytes = 1;  // one row per chunk
      const std::int64_t V = 301;
      const at::Tensor wide = random_logits({3, 10, V + 4}, at::kFloat);
      const at::Tensor transposed_base = random_logits({3, V, 5}, at::kFloat);
      const std::vector<at::Tensor> layouts = {
          wide.slice(1, 1, 10, 3).slice(2, 0, V),                  // step along T, padded rows
          wide.select(1, 2).slice(1, 2, V + 2),                    // [N, V] with row stride V + 4
          transposed_base.transpose(1, 2),                         // vocabulary stride 5: copied
          wide.slice(1, 0, 10, 2).slice(2, 0, V).transpose(0, 1),  // [T, B, V] view
          wide.slice(0, 1, 2).slice(1, 3, 7).slice(2, 0, V),       // one sequence, offset
      };
      for (std::size_t k = 0; k < layouts.size(); ++k) {
        INFO("layout " << k);
        const at::Tensor& logits = layouts[k];
        const at::Tensor labels = random_labels(logits.sizes().slice(0, logits.dim() - 1), V);
        if (wide.grad().defined()) wide.mutable_grad().zero_();
        if (transposed_base.grad().defined()) transposed_base.mutable_grad().zero_();
        const psft::TokenLogprobs out = psft::token_logprobs(logits, labels, opts);
        const std::vector<std::int64_t> lab = to_labels(labels);
        const ref::Logits l = ref::from_tensor(logits, 0.9);
        const ref::Softmax s = ref::softmax(l, lab);
        require_close(to_vec(out.logp), s.logp, value_tol(at::kFloat), "logp");
        require_close(to_vec(out.entropy), s.entropy, value_tol(at::kFloat), "entropy");
        const at::Tensor g = at::randn(labels.sizes(), at::kFloat);
        (out.logp * g).sum().backward();
        const at::Tensor leaf = k == 2 ? transposed_base : wide;
        // The gradient lands in the leaf at the view's positions.
        at::Tensor got;
        if (k == 0) got = leaf.grad().slice(1, 1, 10, 3).slice(2, 0, V);
        if (k == 1) got = leaf.grad().select(1, 2).slice(1, 2, V + 2);
        if (k == 2) got = leaf.grad().transpose(1, 2);
        if (k == 3) got = leaf.grad().slice(1, 0, 10, 2).slice(2, 0, V).transpose(0, 1);
        if (k == 4) got = leaf.grad().slice(0, 1, 2).slice(1, 3, 7).slice(2, 0, V);
        const Vec want = ref::logits_grad(l, lab, s, to_vec(g), Vec(lab.size(), 0.0), 0.9);
        require_close(to_vec(got), want, grad_tol(at::kFloat), "grad");
        CHECK(leaf.grad().abs().sum().item<double>() ==
              Approx(got.abs().sum().item<double>()));  // nothing outside the view
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Bad inputs.
// ---------------------------------------------------------------------------

TEST_CASE("bad inputs raise c10::Error naming the argument", "[logits][errors]") {
  const at::Tensor logits = at::randn({2, 3, 10}, at::kFloat);
  const at::Tensor labels = at::randint(0, 10, {2, 3}, at::kLong);
  const at::Tensor old_logp = at::zeros({2, 3}, at::kFloat);
  using Catch::Contains;
  for (psft::Backend backend : kBackends) {
    INFO(psft::backend_name(backend));
    const psft::LogitsOptions opts = logits_options(backend);
    for (std::int64_t bad : {std::int64_t(10), std::int64_t(-1), std::int64_t(1) << 40}) {
      at::Tensor l = labels.clone();
      l[1][2] = bad;
      CHECK_THROWS_AS(psft::token_logprobs(logits, l, opts), c10::Error);
      CHECK_THROWS_WITH(psft::token_logprobs(logits, l, opts),
                        Contains("psft::token_logprobs: labels must be in [0, 10)"));
      CHECK_THROWS_WITH(psft::psft_loss_from_logits(logits, l, old_logp, {}, opts),
                        Contains("labels"));
    }
    CHECK_THROWS_WITH(psft::token_logprobs(logits, labels.to(at::kInt), opts),
                      Contains("psft::token_logprobs: labels must be int64, got Int"));
    CHECK_THROWS_WITH(psft::token_logprobs(logits, labels.view({6}), opts), Contains("labels"));
    CHECK_THROWS_WITH(psft::token_logprobs(logits.to(at::kLong), labels, opts),
                      Contains("logits must be"));
    CHECK_THROWS_WITH(psft::token_logprobs(logits.view({60}), labels.view({6}), opts),
                      Contains("logits must have shape"));
    CHECK_THROWS_WITH(psft::token_logprobs(at::zeros({6, 0}), labels.view({6}), opts),
                      Contains("vocabulary"));
    psft::LogitsOptions cold = opts;
    cold.temperature = 0.0;
    CHECK_THROWS_WITH(psft::token_logprobs(logits, labels, cold), Contains("temperature"));
    CHECK_THROWS_WITH(psft::psft_loss_from_logits(logits, labels, old_logp.view({6}), {}, opts),
                      Contains("old_logp"));
    CHECK_THROWS_WITH(
        psft::policy_loss_from_logits(logits, labels, old_logp, at::Tensor(), {}, opts),
        Contains("advantages"));

    for (double poison : {std::numeric_limits<double>::quiet_NaN(), kInf}) {
      at::Tensor x = logits.clone();
      x[1][1][7] = poison;
      CHECK_THROWS_WITH(psft::token_logprobs(x, labels, opts),
                        Contains("logits") && Contains("NaN or +inf"));
      CHECK_THROWS_WITH(psft::psft_loss_from_logits(x, labels, old_logp, {}, opts),
                        Contains("logits"));
      // An ignored row is never read.
      at::Tensor l = labels.clone();
      l[1][1] = kIgnore;
      CHECK_NOTHROW(psft::token_logprobs(x, l, opts));
      // With the check off, NaN propagates instead.
      psft::LogitsOptions unchecked = opts;
      unchecked.check_inputs = false;
      CHECK(std::isnan(psft::token_logprobs(x, labels, unchecked).logp[1][1].item<double>()));
    }
    at::Tensor all_masked = logits.clone();
    all_masked[0][2].fill_(-kInf);
    CHECK_THROWS_WITH(psft::token_logprobs(all_masked, labels, opts), Contains("-inf"));
  }
  // Rows are named by their flat token index.
  at::Tensor x = logits.clone();
  x[1][0][3] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(psft::token_logprobs(x, labels), Contains("at token 3"));
}

TEST_CASE("double backward is refused", "[logits][errors]") {
  const at::Tensor logits = at::randn({2, 9}, at::kDouble).requires_grad_(true);
  const at::Tensor labels = torch::tensor({1, 4}, at::kLong);
  const at::Tensor logp = psft::token_logprobs(logits, labels).logp;
  CHECK_THROWS_WITH(torch::autograd::grad({logp.sum()}, {logits}, {}, true, true),
                    Catch::Contains("double backward"));
}

// ---------------------------------------------------------------------------
// Labels and entropy utilities.
// ---------------------------------------------------------------------------

TEST_CASE("shift_labels builds next-token labels", "[logits][labels]") {
  const at::Tensor ids = torch::tensor({{1, 10, 11, 20, 21, 2}, {1, 12, 22, 2, 0, 0}}, at::kLong);
  const at::Tensor mask = torch::tensor({{0, 0, 0, 1, 1, 1}, {0, 0, 1, 1, 0, 0}}, at::kInt);
  CHECK(
      torch::equal(psft::shift_labels(ids),
                   torch::tensor({{10, 11, 20, 21, 2, -100}, {12, 22, 2, 0, 0, -100}}, at::kLong)));
  CHECK(torch::equal(
      psft::shift_labels(ids, mask),
      torch::tensor({{-100, -100, 20, 21, 2, -100}, {-100, 22, 2, -100, -100, -100}}, at::kLong)));
  CHECK(torch::equal(psft::shift_labels(torch::tensor({5, 6, 7}, at::kInt), -1),
                     torch::tensor({6, 7, -1}, at::kLong)));
  CHECK(psft::shift_labels(at::zeros({3, 0}, at::kLong)).numel() == 0);
  CHECK_THROWS_WITH(psft::shift_labels(at::zeros({2, 3}, at::kFloat)),
                    Catch::Contains("input_ids"));
  CHECK_THROWS_WITH(psft::shift_labels(ids, mask.view({12})), Catch::Contains("loss_mask"));
}

TEST_CASE("entropy metrics reduce globally; masked_entropy_mean is differentiable",
          "[logits][entropy]") {
  const at::Tensor entropy = torch::tensor({{1.0, 2.0, 3.0}, {4.0, 0.0, 0.0}}, at::kFloat);
  const at::Tensor mask = torch::tensor({{true, true, true}, {true, false, false}});
  const psft::EntropyMetrics m = psft::entropy_metrics(entropy, mask);
  CHECK(scalar(m.mean) == Approx(10.0 / 4.0));  // not the mean of means (3.0)
  CHECK(scalar(m.sum) == 10.0);
  CHECK(scalar(m.count) == 4.0);
  CHECK(to_vec(m.per_sequence) == Vec{2.0, 4.0});
  const psft::EntropyMetrics empty = psft::entropy_metrics(entropy, at::zeros({2, 3}, at::kBool));
  CHECK(scalar(empty.mean) == 0.0);
  CHECK(to_vec(empty.per_sequence) == Vec{0.0, 0.0});
  CHECK(scalar(psft::entropy_metrics(entropy).mean) == Approx(10.0 / 6.0));

  // An entropy bonus through the logits.
  torch::manual_seed(11);
  const at::Tensor logits = random_logits({2, 4, 30}, at::kDouble);
  const at::Tensor labels = random_labels({2, 4}, 30, 0.3);
  psft::LogitsOptions opts;
  opts.entropy_grad = true;
  const psft::LogitsLossResult out =
      psft::psft_loss_from_logits(logits, labels, at::zeros({2, 4}, at::kDouble), {}, opts);
  REQUIRE(out.entropy_mean.requires_grad());
  CHECK(scalar(out.entropy_mean) ==
        Approx(scalar(psft::entropy_metrics(out.entropy, labels != kIgnore).mean)));
  (out.loss - 0.01 * out.entropy_mean).backward();
  CHECK(logits.grad().isfinite().all().item<bool>());
  CHECK_THROWS_WITH(psft::entropy_metrics(entropy, mask.view({6})), Catch::Contains("mask"));
}

TEST_CASE("EntropyTracker flags a fractional drop within its window", "[logits][entropy]") {
  psft::EntropyTracker tracker(/*window=*/5, /*max_drop=*/0.5);
  CHECK_FALSE(tracker.record(0, 2.0));
  CHECK_FALSE(tracker.record(1, 1.8));
  CHECK_FALSE(tracker.record(2, 1.2));
  CHECK(tracker.drop() == Approx(0.4));
  CHECK(tracker.record(3, 0.9));  // 55% below the peak 2.0 of steps 0..3
  CHECK(tracker.collapsed());
  REQUIRE(tracker.first_collapse_step());
  CHECK(*tracker.first_collapse_step() == 3);
  // Step 10: only steps 6..10 are in the window, so the peak is 0.8 itself.
  CHECK_FALSE(tracker.record(10, 0.8));
  CHECK(tracker.window_peak() == 0.8);
  CHECK_FALSE(tracker.collapsed());
  CHECK(*tracker.first_collapse_step() == 3);
  CHECK(tracker.values().size() == 5);
  CHECK(tracker.record(12, torch::tensor(0.3)));  // window 8..12: peak 0.8
  CHECK_THROWS_WITH(tracker.record(12, 0.5), Catch::Contains("steps must increase"));
  CHECK_THROWS_WITH(tracker.record(13, std::nan("")), Catch::Contains("finite"));
  CHECK_THROWS_WITH(psft::EntropyTracker(0, 0.5), Catch::Contains("window"));
  CHECK_THROWS_WITH(psft::EntropyTracker(5, 1.5), Catch::Contains("max_drop"));
}

TEST_CASE("entropy_metrics and masked_entropy_mean: integer 0/1 masks count as bool",
          "[logits][entropy][mask]") {
  const at::Tensor entropy = torch::tensor({{1.0, 2.0, 3.0}, {4.0, 0.5, 0.25}}, at::kFloat);
  const at::Tensor as_bool = torch::tensor({{true, true, false}, {true, false, false}});
  const psft::EntropyMetrics want = psft::entropy_metrics(entropy, as_bool);
  const double want_mean = scalar(psft::masked_entropy_mean(entropy, as_bool));
  CHECK(want_mean == Approx(7.0 / 3.0));
  // Hugging Face's attention_mask is int64 0/1; int32 and uint8 are the same rule.
  for (const auto dtype : {at::kLong, at::kInt, at::kByte}) {
    INFO("mask dtype " << dtype);
    const at::Tensor mask = as_bool.to(dtype);
    const psft::EntropyMetrics m = psft::entropy_metrics(entropy, mask);
    CHECK(scalar(m.mean) == scalar(want.mean));
    CHECK(scalar(m.sum) == scalar(want.sum));
    CHECK(scalar(m.count) == 3.0);
    CHECK(to_vec(m.per_sequence) == to_vec(want.per_sequence));
    CHECK(scalar(psft::masked_entropy_mean(entropy, mask)) == want_mean);
  }
  // Any other integer is a bug (token ids, a count), not a weight.
  const at::Tensor twos = torch::tensor({{1, 2, 0}, {1, 0, 0}}, at::kLong);
  CHECK_THROWS_WITH(psft::entropy_metrics(entropy, twos),
                    Catch::Contains("mask") && Catch::Contains("0 or 1"));
  CHECK_THROWS_WITH(psft::masked_entropy_mean(entropy, twos),
                    Catch::Contains("mask") && Catch::Contains("0 or 1"));
  CHECK_THROWS_WITH(psft::entropy_metrics(entropy, -as_bool.to(at::kInt)), Catch::Contains("mask"));
}

TEST_CASE("entropy_metrics and masked_entropy_mean refuse negative, NaN and Inf mask weights",
          "[logits][entropy][mask]") {
  const at::Tensor entropy = torch::tensor({{1.0, 2.0}, {3.0, 4.0}}, at::kDouble);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const double bad : {-1.0, -1e-30, nan, kInf, -kInf}) {
    INFO("weight " << bad);
    for (const auto dtype : {at::kDouble, at::kFloat}) {
      const at::Tensor mask = torch::tensor({{1.0, 0.5}, {bad, 0.0}}, at::kDouble).to(dtype);
      // Before the fix: a NaN mean and a negative or NaN count.
      CHECK_THROWS_WITH(psft::entropy_metrics(entropy, mask),
                        Catch::Contains("mask has a negative, NaN or Inf weight"));
      CHECK_THROWS_WITH(psft::masked_entropy_mean(entropy.to(dtype), mask),
                        Catch::Contains("mask has a negative, NaN or Inf weight"));
    }
  }
  // A float64 weight that overflows a float32 entropy's dtype is an Inf weight there.
  const at::Tensor huge = torch::tensor({{1e300, 1.0}, {1.0, 1.0}}, at::kDouble);
  CHECK_THROWS_WITH(psft::masked_entropy_mean(entropy.to(at::kFloat), huge),
                    Catch::Contains("mask has a negative, NaN or Inf weight"));
  // Zero and positive weights, and an empty batch, are fine.
  const at::Tensor weights = torch::tensor({{2.0, 0.0}, {1.0, 0.0}}, at::kDouble);
  CHECK(scalar(psft::entropy_metrics(entropy, weights).mean) == Approx(5.0 / 3.0));
  CHECK(scalar(psft::masked_entropy_mean(entropy, weights)) == Approx(5.0 / 3.0));
  CHECK(scalar(psft::entropy_metrics(at::zeros({0, 3}), at::zeros({0, 3})).count) == 0.0);
}

namespace {

// Per-step (token entropy, NLL of the demonstrated token) of a synthetic
// run: a smooth decay to about 0.01 over 1,584 steps (the run of the issue)
// with log-normal per-step noise, mostly shared by the two (a batch of
// harder tokens raises both) and partly independent. The noise comes from
// std::mt19937 through an explicit Box-Muller transform, so that it is the
// same with every standard library (the std distributions are not).
struct EntropySeries {
  Vec entropy, nll;
};

EntropySeries determined_task_series(std::uint32_t seed, std::int64_t steps = 1584) {
  std::mt19937 rng(seed);
  const auto gauss = [&] {
    const double u1 = (static_cast<double>(rng()) + 0.5) / 4294967296.0;
    const double u2 = (static_cast<double>(rng()) + 0.5) / 4294967296.0;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  };
  EntropySeries s;
  for (std::int64_t t = 0; t < steps; ++t) {
    const double decay = std::exp(-static_cast<double>(t) / 250.0);
    const double shared = 0.15 * gauss(), own_h = 0.05 * gauss(), own_nll = 0.05 * gauss();
    s.entropy.push_back((0.01 + 2.0 * decay) * std::exp(shared + own_h));
    s.nll.push_back((0.01 + 1.5 * decay) * std::exp(shared + own_nll));
  }
  return s;
}

}  // namespace

TEST_CASE("EntropyTracker with the NLL: convergence on determined answers is no collapse",
          "[logits][entropy]") {
  for (const std::uint32_t seed : {1u, 2u, 3u}) {
    INFO("seed " << seed);
    const EntropySeries s = determined_task_series(seed);
    REQUIRE(s.entropy.back() < 0.02);
    REQUIRE(s.nll.back() < 0.02);
    psft::EntropyTracker entropy_only(/*window=*/50, /*max_drop=*/0.5);
    psft::EntropyTracker with_nll(/*window=*/50, /*max_drop=*/0.5);
    std::int64_t flagged_without = 0, flagged_with = 0;
    for (std::size_t t = 0; t < s.entropy.size(); ++t) {
      const auto step = static_cast<std::int64_t>(t);
      flagged_without += entropy_only.record(step, s.entropy[t]);
      flagged_with += with_nll.record(step, s.entropy[t], s.nll[t]);
    }
    // Entropy alone reads the noise of a small entropy as collapses (about
    // 8% of the steps, as in the 132 of 1,584); with the NLL the
    // drops are seen to be matched by the NLL's.
    CHECK(flagged_without > 50);
    CHECK(flagged_with == 0);
    CHECK_FALSE(with_nll.first_collapse_step().has_value());
    CHECK(with_nll.nlls().size() == s.nll.size());
    CHECK(entropy_only.nlls().empty());
  }
}

TEST_CASE("EntropyTracker with the NLL: a collapse is flagged at its step", "[logits][entropy]") {
  // The same run until step 999; then the entropy falls to 0.7, 0.4 and 0.2
  // of its value in three steps and stays there, while the NLL stays flat
  // and then rises: the model grew confident in what the data do not say.
  EntropySeries s = determined_task_series(1, 1100);
  const double entropy_scale[] = {0.7, 0.4, 0.2};
  const double nll_scale[] = {1.0, 1.05, 1.1};
  for (std::size_t t = 1000; t < s.entropy.size(); ++t) {
    const std::size_t k = std::min<std::size_t>(t - 1000, 2);
    s.entropy[t] *= entropy_scale[k];
    s.nll[t] *= nll_scale[k];
  }
  psft::EntropyTracker tracker(/*window=*/50, /*max_drop=*/0.5);
  std::vector<std::int64_t> flagged;
  for (std::size_t t = 0; t < s.entropy.size(); ++t) {
    const auto step = static_cast<std::int64_t>(t);
    if (tracker.record(step, s.entropy[t], s.nll[t])) flagged.push_back(step);
    if (step == 1000) {
      // 30% down against a flat NLL: not yet a halving relative to it.
      CHECK_FALSE(tracker.collapsed());
      CHECK(tracker.drop_relative_to_nll() < 0.5);
    }
    if (step == 1001) {
      CHECK(tracker.collapsed());
      CHECK(tracker.drop() >= 0.5);
      CHECK(tracker.drop_relative_to_nll() >= 0.5);
    }
  }
  REQUIRE(tracker.first_collapse_step().has_value());
  CHECK(*tracker.first_collapse_step() == 1001);
  REQUIRE_FALSE(flagged.empty());
  CHECK(flagged.front() == 1001);
  // Transient: once the window holds only collapsed steps there is no drop left to see.
  CHECK(flagged.back() < 1001 + 50);
  CHECK_FALSE(tracker.collapsed());
}

TEST_CASE("EntropyTracker with the NLL: zero NLLs, tensors and bad input", "[logits][entropy]") {
  psft::EntropyTracker tracker(/*window=*/5, /*max_drop=*/0.5);
  CHECK_FALSE(tracker.record(0, 2.0, 2.0));
  // The entropy halves while the NLL does not move: a collapse.
  CHECK(tracker.record(1, 0.8, torch::tensor(2.0).item<double>()));
  CHECK(tracker.drop() == Approx(0.6));
  CHECK(tracker.drop_relative_to_nll() == Approx(0.6));  // ratio 0.4 against step 0's 1.0
  // Both fall by the same factor: the model learnt, no collapse.
  psft::EntropyTracker learnt(5, 0.5);
  CHECK_FALSE(learnt.record(0, 2.0, 1.0));
  CHECK_FALSE(learnt.record(1, 0.5, 0.25));
  CHECK(learnt.drop() == Approx(0.75));
  CHECK(learnt.drop_relative_to_nll() == 0.0);
  // An NLL of 0 (every demonstrated token certain) is never a collapse.
  CHECK_FALSE(learnt.record(2, 0.0, 0.0));
  CHECK_FALSE(learnt.record(3, 0.0, 0.0));
  CHECK(learnt.drop_relative_to_nll() == 0.0);
  // One-element tensors.
  psft::EntropyTracker tensors(5, 0.5);
  CHECK_FALSE(tensors.record(0, torch::tensor(1.0), torch::tensor(1.0f)));
  CHECK(tensors.record(1, torch::tensor(0.1), torch::tensor(1.2, at::kDouble)));
  CHECK(tensors.nlls() == Vec{1.0, 1.2});
  CHECK_THROWS_WITH(tensors.record(2, torch::tensor(0.1), at::Tensor()), Catch::Contains("nll"));
  // Every step with an NLL or none.
  CHECK_THROWS_WITH(tensors.record(3, 0.1), Catch::Contains("nll"));
  CHECK_THROWS_WITH(tracker.record(4, 0.5, -1.0), Catch::Contains("nll"));
  CHECK_THROWS_WITH(tracker.record(4, 0.5, std::nan("")), Catch::Contains("nll"));
  psft::EntropyTracker plain(5, 0.5);
  plain.record(0, 1.0);
  CHECK_THROWS_WITH(plain.record(1, 1.0, 1.0), Catch::Contains("nll"));
}

// ---------------------------------------------------------------------------
// More than 2^31 logits.
// ---------------------------------------------------------------------------

TEST_CASE("more than 2^31 bfloat16 logits: every row right", "[logits][large]") {
  // Row r is a fixed base row rotated by shift(r), so every row's log-sum-exp
  // and entropy equal the base row's and each label's logp is known exactly
  // without a reference pass over 4 GB; a wrong 32-bit offset reads the wrong
  // rotation and fails. Labels of every 97th row are ignored.
  const std::int64_t N = 16400, V = 131075;
  REQUIRE(N * V > (std::int64_t(1) << 31));
  std::vector<c10::BFloat16> base(V);
  for (std::int64_t j = 0; j < V; ++j) {
    const std::uint64_t hash = (std::uint64_t(j) * 0x9E3779B97F4A7C15ull) >> 40;
    base[j] = c10::BFloat16(static_cast<float>(hash % 20000) / 1000.0f - 10.0f);
  }
  const auto shift = [&](std::int64_t r) { return (r * 7919) % V; };
  const at::Tensor logits = at::empty({N, V}, at::kBFloat16);
  c10::BFloat16* data = logits.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 64, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      // row[j] = base[(j + shift) % V]
      const std::int64_t s = shift(r);
      std::memcpy(data + r * V, base.data() + s, (V - s) * sizeof(c10::BFloat16));
      std::memcpy(data + r * V + (V - s), base.data(), s * sizeof(c10::BFloat16));
    }
  });
  logits.requires_grad_(true);
  at::Tensor labels = at::empty({N}, at::kLong);
  std::int64_t* lab = labels.data_ptr<std::int64_t>();
  for (std::int64_t r = 0; r < N; ++r) lab[r] = r % 97 == 5 ? kIgnore : (r * 104729 + 13) % V;

  // Reference over the base row, in double.
  double m = -kInf, sum = 0, mean = 0;
  for (std::int64_t j = 0; j < V; ++j) m = std::max(m, double(float(base[j])));
  for (std::int64_t j = 0; j < V; ++j) sum += std::exp(double(float(base[j])) - m);
  const double lse = m + std::log(sum);
  for (std::int64_t j = 0; j < V; ++j) {
    mean += std::exp(double(float(base[j])) - lse) * double(float(base[j]));
  }
  const double entropy = lse - mean;
  Vec want_logp(N, 0.0);
  double want_sum = 0, tokens = 0;
  for (std::int64_t r = 0; r < N; ++r) {
    if (lab[r] == kIgnore) continue;
    want_logp[r] = double(float(base[(lab[r] + shift(r)) % V])) - lse;
    want_sum += want_logp[r];
    tokens += 1;
  }

  at::Tensor old_logp;
  {
    torch::NoGradGuard no_grad;
    old_logp = psft::token_logprobs(logits, labels).logp;
  }
  const psft::LogitsLossResult out = psft::psft_loss_from_logits(logits, labels, old_logp);
  require_close(to_vec(out.logp), want_logp, {2e-5, 1e-6}, "logp");
  CHECK(out.logp.sum(at::kDouble).item<double>() == Approx(want_sum).epsilon(1e-6));
  CHECK(scalar(out.entropy_mean) == Approx(entropy).epsilon(1e-5));
  CHECK(scalar(out.metrics.ratio_max) == 1.0);
  CHECK(scalar(out.metrics.token_count) == tokens);

  out.loss.backward();
  const at::Tensor grad = logits.grad();
  // Rows at the start, straddling 2^31 elements and at the end, in full:
  // d loss / d logits = -(onehot - p) / tokens with the ratio exactly 1.
  const std::int64_t straddle = ((std::int64_t(1) << 31) / V);
  for (std::int64_t r : {std::int64_t(0), straddle, straddle + 1, N - 1}) {
    INFO("row " << r);
    REQUIRE(lab[r] != kIgnore);
    Vec want(V);
    for (std::int64_t j = 0; j < V; ++j) {
      const double p = std::exp(double(float(base[(j + shift(r)) % V])) - lse);
      want[j] = -((j == lab[r] ? 1.0 : 0.0) - p) / tokens;
    }
    require_close(to_vec(grad[r]), want, {1e-12, 8e-3}, "grad row");
  }
  for (std::int64_t ignored_row : {std::int64_t(5), 97 * 169 + std::int64_t(5)}) {
    REQUIRE(lab[ignored_row] == kIgnore);
    CHECK(grad[ignored_row].abs().max().item<double>() == 0.0);
  }
}

TEST_CASE("gradient buffers: reused after the gradient dies, never while it lives",
          "[logits][buffers]") {
  namespace cpu = psft::cpu;
  cpu::release_gradient_buffers();
  REQUIRE(cpu::kept_gradient_bytes() == 0);
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  SECTION("the pool's rules") {
    // Below 2 MiB: at::empty, nothing kept.
    { const at::Tensor small = cpu::empty_gradient({16, 1024}, f32); }
    CHECK(cpu::kept_gradient_bytes() == 0);
    void* first = nullptr;
    {
      const at::Tensor g = cpu::empty_gradient({1024, 1024}, f32);  // 4 MiB
      first = g.data_ptr();
      CHECK(reinterpret_cast<std::uintptr_t>(first) % (std::uintptr_t(2) << 20) == 0);
      CHECK(g.is_contiguous());
      CHECK(g.sizes() == at::IntArrayRef({1024, 1024}));
      // Alive: a second request gets other memory.
      const at::Tensor other = cpu::empty_gradient({1024, 1024}, f32);
      CHECK(other.data_ptr() != first);
    }
    CHECK(cpu::kept_gradient_bytes() == std::size_t(8) << 20);
    // The same size, and one at least half the block, reuse a kept block.
    {
      const at::Tensor again = cpu::empty_gradient({1024, 1024}, f32);
      CHECK(cpu::kept_gradient_bytes() == std::size_t(4) << 20);
      const at::Tensor smaller = cpu::empty_gradient({600, 1024}, f32);
      CHECK(cpu::kept_gradient_bytes() == 0);
      // Larger than every block: new memory.
      const at::Tensor larger = cpu::empty_gradient({2048, 1024}, f32);
      CHECK(larger.data_ptr() != again.data_ptr());
      CHECK(larger.data_ptr() != smaller.data_ptr());
    }
    // At most two blocks are kept: the largest.
    CHECK(cpu::kept_gradient_bytes() == (std::size_t(8) + 4) << 20);
    CHECK(cpu::release_gradient_buffers() == (std::size_t(8) + 4) << 20);
    CHECK(cpu::kept_gradient_bytes() == 0);
  }
  SECTION("backward through the logits pass reuses the memory and keeps values right") {
    torch::manual_seed(5);
    const at::Tensor labels = at::randint(0, 4096, {300}, at::kLong);
    const auto grad_of = [&](const at::Tensor& logits) {
      const at::Tensor leaf = logits.detach().requires_grad_(true);
      const at::Tensor loss = psft::token_logprobs(leaf, labels).logp.sum();
      return torch::autograd::grad({loss}, {leaf})[0];
    };
    const at::Tensor a = at::randn({300, 4096});  // 4.7 MiB of gradient
    const at::Tensor b = at::randn({300, 4096});
    at::Tensor ga = grad_of(a);
    const at::Tensor ga_copy = ga.clone();
    void* where = ga.data_ptr();
    // While ga lives, b's gradient is elsewhere and ga is untouched.
    const at::Tensor gb = grad_of(b);
    CHECK(gb.data_ptr() != where);
    CHECK(at::equal(ga, ga_copy));
    // Once ga dies its memory serves the next gradient, with the right values.
    ga = at::Tensor();
    const at::Tensor ga2 = grad_of(a);
    CHECK(ga2.data_ptr() == where);
    CHECK(at::equal(ga2, ga_copy));
  }
  cpu::release_gradient_buffers();
}

TEST_CASE("every instruction set this CPU runs: values, gradient, -inf, threads", "[logits][isa]") {
  namespace cpu = psft::cpu;
  const cpu::CpuCapability saved = cpu::cpu_capability();
  INFO("this CPU: up to " << cpu::capability_name(cpu::detected_cpu_capability()));
  CHECK_THROWS_WITH(cpu::set_cpu_capability(static_cast<cpu::CpuCapability>(3)),
                    Catch::Contains("set_cpu_capability"));
#if PSFT_ISA_DISPATCH
  // The CPUID reading agrees with the compiler runtime's.
  __builtin_cpu_init();
  const cpu::CpuCapability runtime =
      __builtin_cpu_supports("avx512f") ? cpu::CpuCapability::Avx512
      : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
          ? cpu::CpuCapability::Avx2
          : cpu::CpuCapability::Default;
  CHECK(cpu::detected_cpu_capability() == runtime);
#endif
  for (int level = 0; level <= static_cast<int>(cpu::detected_cpu_capability()); ++level) {
    const auto c = static_cast<cpu::CpuCapability>(level);
    cpu::set_cpu_capability(c);
    REQUIRE(cpu::cpu_capability() == c);
    torch::manual_seed(11);
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      for (const std::int64_t vocab : {7, 4099}) {  // 4099: two blocks and a ragged tail
        for (const double temperature : {1.0, 0.7}) {
          INFO(cpu::capability_name(c)
               << " " << dtype_name(dtype) << " V=" << vocab << " T=" << temperature);
          const at::Tensor logits = random_logits({3, 5, vocab}, dtype);
          // A masked vocabulary entry in every row: probability 0, gradient 0.
          {
            at::NoGradGuard no_grad;
            logits.select(2, 1).fill_(-std::numeric_limits<float>::infinity());
          }
          const at::Tensor labels = random_labels({3, 5}, vocab);
          const at::Tensor safe = at::where(labels == 1, at::zeros_like(labels), labels);
          const psft::TokenLogprobs out = psft::token_logprobs(
              logits, safe, logits_options(psft::Backend::FusedCpu, temperature, true));
          const std::vector<std::int64_t> lab = to_labels(safe);
          const ref::Logits l = ref::from_tensor(logits, temperature);
          const ref::Softmax s = ref::softmax(l, lab);
          require_close(to_vec(out.logp), s.logp, value_tol(dtype), "logp");
          require_close(to_vec(out.entropy), s.entropy, value_tol(dtype), "entropy");
          const at::Tensor g = at::randn(safe.sizes(), out.logp.options());
          const at::Tensor h = at::randn(safe.sizes(), out.logp.options());
          ((out.logp * g).sum() + (out.entropy * h).sum()).backward();
          const Vec want = ref::logits_grad(l, lab, s, to_vec(g), to_vec(h), temperature);
          require_close(to_vec(logits.grad()), want, grad_tol(dtype), "grad");
          CHECK(logits.grad().select(2, 1).abs().sum().item<double>() == 0.0);
        }
      }
    }
    // Bitwise independent of the thread count on every path.
    check_thread_independent();
  }
  cpu::set_cpu_capability(saved);
}
