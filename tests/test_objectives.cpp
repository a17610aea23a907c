// Tests of the objective family (LossOptions::objective: CISPO in verl's and
// TRL's forms, SAPO, the sequence-level ratio of GSPO) and of
// psft::kl_penalty, for the fused CPU backend, the composed backend and the
// Eigen API, against the independent double references in
// reference/objectives_reference.hpp. The default objective (Clipped) is
// tested by test_policy_loss.cpp; the CUDA kernels run every rule in
// test_cuda_emulated.cpp.
//
// Tolerances: float64 1e-12 relative (the loss relative to the sum of its
// terms' magnitudes); float32 / bf16 / fp16 inputs against the reference on
// the same rounded inputs: loss 1e-5, gradient 1e-5 (fp32), 8e-3 (bf16),
// 1e-3 + 1e-7 absolute (fp16). Finite differences (float64, central, h =
// 1e-6): 1e-6 relative plus 1e-7 absolute.

// LibTorch's logging header defines its own CHECK macro; drop it so that
// Catch2's is the one used.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "psft/eigen/policy_loss.hpp"
#include "psft/psft.hpp"
#include "psft/train.hpp"
#include "reference/objectives_reference.hpp"
#include "support/reductions.hpp"
#include "support/reference_adapter.hpp"

namespace {

using test_support::kReductions;
using test_support::name_of;
using test_support::settings_for;
using torch::Tensor;

std::vector<double> values(const Tensor& t) {
  const Tensor c = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

bool close(double got, double expected, double rtol, double atol = 0.0) {
  return std::fabs(got - expected) <= atol + rtol * std::fabs(expected);
}

struct Case {
  const char* name;
  psft::Objective kind;
  reference::Variant variant;
  bool sequence_level;
};

const Case kCases[] = {
    {"cispo_relative", psft::Objective::CispoRelative, reference::Variant::CispoRelative, false},
    {"cispo_capped", psft::Objective::CispoCapped, reference::Variant::CispoCapped, false},
    {"sapo", psft::Objective::Sapo, reference::Variant::Sapo, false},
    {"gspo", psft::Objective::Clipped, reference::Variant::Clipped, true},
    {"gspo_sapo", psft::Objective::Sapo, reference::Variant::Sapo, true},
    {"gspo_cispo_capped", psft::Objective::CispoCapped, reference::Variant::CispoCapped, true},
};

psft::LossOptions options_for(const Case& c, psft::Backend backend, psft::Reduction reduction) {
  psft::LossOptions o;
  o.backend = backend;
  o.reduction = reduction;
  o.objective.kind = c.kind;
  o.objective.ratio_level = c.sequence_level ? psft::RatioLevel::Sequence : psft::RatioLevel::Token;
  o.objective.cispo_cap = 1.6;  // binds for some tokens of the draws below
  o.objective.sapo_tau_pos = 1.0;
  o.objective.sapo_tau_neg = 1.05;
  return o;
}

reference::VariantSettings variant_for(const Case& c, const psft::LossOptions& o) {
  reference::VariantSettings v;
  v.variant = c.variant;
  v.sequence_level = c.sequence_level;
  v.cispo_cap = o.objective.cispo_cap;
  v.tau_pos = o.objective.sapo_tau_pos;
  v.tau_neg = o.objective.sapo_tau_neg;
  return v;
}

/// Seeded [rows, cols] inputs: log-ratios up to +-1 (so every clip and cap
/// binds somewhere), a few of +-30 (clamped), advantages of both signs, a
/// 0/1 mask with an empty row and fractional weights.
struct Batch {
  Tensor logp, old_logp, advantages, mask;
};

Batch make_batch(std::int64_t rows, std::int64_t cols, std::uint64_t seed, torch::Dtype dtype) {
  torch::manual_seed(seed);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  Batch b;
  b.old_logp = -torch::rand({rows, cols}, f64) * 4 - 0.05;
  Tensor d = (torch::rand({rows, cols}, f64) * 2 - 1);
  d.index_put_({torch::rand({rows, cols}, f64) < 0.05}, 30.0);
  d.index_put_({torch::rand({rows, cols}, f64) < 0.03}, -30.0);
  b.logp = b.old_logp + d;
  b.advantages = torch::randn({rows, cols}, f64);
  b.mask = (torch::rand({rows, cols}, f64) < 0.8).to(torch::kDouble);
  b.mask.index_put_({torch::rand({rows, cols}, f64) < 0.1}, 0.5);
  if (rows > 1) b.mask[1].zero_();
  b.logp = b.logp.to(dtype);
  b.old_logp = b.old_logp.to(dtype);
  b.advantages = b.advantages.to(dtype);
  b.mask = b.mask.to(dtype);
  return b;
}

reference::Result reference_of(const Batch& b, const Case& c, const psft::LossOptions& o) {
  const auto rows = static_cast<std::size_t>(b.logp.size(0));
  const auto cols = static_cast<std::size_t>(b.logp.size(1));
  return reference::variant_loss(rows, cols, values(b.logp), values(b.old_logp),
                                 values(b.advantages), values(b.mask), settings_for(o),
                                 variant_for(c, o));
}

void check_against_reference(const Batch& b, const Case& c, const psft::LossOptions& o,
                             double loss_tol, double grad_tol, double grad_atol) {
  const Tensor logp = b.logp.clone().requires_grad_(true);
  const psft::LossResult r = psft::policy_loss(logp, b.old_logp, b.advantages, b.mask, o);
  r.loss.backward();
  const reference::Result ref = reference_of(b, c, o);
  CHECK(close(r.loss.item<double>(), ref.loss, 0.0, loss_tol * (ref.loss_magnitude + 1e-30)));
  const std::vector<double> grad = values(logp.grad());
  int bad = 0;
  for (std::size_t k = 0; k < grad.size(); ++k)
    bad += !close(grad[k], ref.grad[k], grad_tol, grad_atol);
  CHECK(bad == 0);
  CHECK(r.metrics.clip_frac.item<double>() == Approx(ref.metrics.clip_frac).margin(1e-12));
  CHECK(r.metrics.clip_frac_high.item<double>() ==
        Approx(ref.metrics.clip_frac_high).margin(1e-12));
  CHECK(r.metrics.clip_frac_low.item<double>() == Approx(ref.metrics.clip_frac_low).margin(1e-12));
  CHECK(r.metrics.approx_kl_k1.item<double>() ==
        Approx(ref.metrics.approx_kl_k1).epsilon(loss_tol).margin(loss_tol));
  CHECK(r.metrics.ratio_max.item<double>() == Approx(ref.metrics.ratio_max).epsilon(loss_tol));
  CHECK(r.metrics.token_count.item<double>() == Approx(ref.metrics.token_count).epsilon(1e-12));
}

}  // namespace

TEST_CASE("every objective matches its reference for every backend and reduction in float64",
          "[objectives]") {
  const Batch b = make_batch(5, 37, 11, torch::kDouble);
  for (const Case& c : kCases) {
    for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
      for (psft::Reduction reduction : kReductions) {
        INFO(c.name << " " << psft::backend_name(backend) << " " << name_of(reduction));
        check_against_reference(b, c, options_for(c, backend, reduction), 1e-12, 1e-12, 1e-15);
      }
    }
  }
}

TEST_CASE("every objective in float32, bfloat16 and float16 (the reference on rounded inputs)",
          "[objectives]") {
  struct DtypeCase {
    torch::Dtype dtype;
    double grad_tol, grad_atol;
  };
  // Long rows so that the fused kernel's packet path and its scalar tail both run.
  for (const DtypeCase& d :
       {DtypeCase{torch::kFloat, 1e-5, 1e-9}, DtypeCase{torch::kBFloat16, 8e-3, 1e-9},
        DtypeCase{torch::kHalf, 1e-3, 1e-7}}) {
    Batch b = make_batch(4, 301, 5, d.dtype);
    if (d.dtype == torch::kHalf) {  // keep in-range log-ratios' gradients inside fp16's range
      b.logp = torch::where((b.logp.to(torch::kDouble) - b.old_logp.to(torch::kDouble)).abs() > 8,
                            b.old_logp, b.logp);
    }
    for (const Case& c : kCases) {
      for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
        INFO(c.name << " " << psft::backend_name(backend) << " " << d.dtype);
        check_against_reference(b, c, options_for(c, backend, psft::Reduction::TokenMean), 1e-5,
                                d.grad_tol, d.grad_atol);
      }
    }
  }
}

TEST_CASE("objective gradients equal central finite differences in float64", "[objectives][fd]") {
  // Log-ratios away from every kink (clip bounds, cap, clamp) so that the
  // loss is smooth within h of each point.
  torch::manual_seed(3);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor old_logp = -torch::rand({3, 9}, f64) * 3 - 0.1;
  const Tensor logp0 = old_logp + (torch::rand({3, 9}, f64) * 1.6 - 0.8);
  // One advantage per sequence: with advantages that vary within a
  // sequence, GSPO's straight-through gradient is not the loss value's
  // derivative (docs/objectives.md); verl's and TRL's advantages are per
  // sequence.
  const Tensor adv = torch::randn({3, 1}, f64).expand({3, 9});
  const Tensor mask = (torch::rand({3, 9}, f64) < 0.8).to(torch::kDouble);
  const double h = 1e-6;
  for (const Case& c : kCases) {
    // CISPO's gradient is by definition not the loss value's derivative
    // (sg(w) logp); its reference test checks it.
    if (c.variant == reference::Variant::CispoRelative ||
        c.variant == reference::Variant::CispoCapped)
      continue;
    psft::LossOptions o =
        options_for(c, psft::Backend::FusedCpu, psft::Reduction::SeqMeanTokenMean);
    const Tensor logp = logp0.clone().requires_grad_(true);
    psft::policy_loss(logp, old_logp, adv, mask, o).loss.backward();
    const std::vector<double> grad = values(logp.grad());
    int bad = 0;
    for (std::int64_t k = 0; k < logp0.numel(); ++k) {
      // Skip tokens within h of a kink: the reference says where they are.
      Tensor up = logp0.clone(), down = logp0.clone();
      up.view(-1)[k] += h;
      down.view(-1)[k] -= h;
      const double fd = (psft::policy_loss(up, old_logp, adv, mask, o).loss.item<double>() -
                         psft::policy_loss(down, old_logp, adv, mask, o).loss.item<double>()) /
                        (2 * h);
      const double lo = 1 - o.clip.eps_low, hi = 1 + o.clip.eps_high;
      const double d = (logp0.view(-1)[k] - old_logp.view(-1)[k]).item<double>();
      const double r = std::exp(d);
      const bool near_kink = std::fabs(r - lo) < 1e-4 || std::fabs(r - hi) < 1e-4 ||
                             std::fabs(r - o.objective.cispo_cap) < 1e-4;
      if (!c.sequence_level && near_kink) continue;
      bad += !close(grad[static_cast<std::size_t>(k)], fd, 1e-6, 1e-7);
    }
    INFO(c.name);
    CHECK(bad == 0);
  }
}

TEST_CASE("objectives: empty and fully masked batches give 0 on the graph, zero gradients",
          "[objectives]") {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  for (const Case& c : kCases) {
    for (psft::Reduction reduction : kReductions) {
      for (std::int64_t cols : {0, 6}) {
        INFO(c.name << " " << name_of(reduction) << " cols " << cols);
        const Tensor logp = torch::full({3, cols}, -1.0, f32).requires_grad_(true);
        const Tensor old_logp = torch::full({3, cols}, std::nan(""), f32);  // masked: never read
        const Tensor mask = torch::zeros({3, cols}, f32);
        const psft::LossResult r =
            psft::policy_loss(logp, old_logp, torch::ones({3, cols}, f32), mask,
                              options_for(c, psft::Backend::FusedCpu, reduction));
        CHECK(r.loss.item<double>() == 0.0);
        CHECK(r.loss.requires_grad());
        r.loss.backward();
        CHECK(logp.grad().abs().sum().item<double>() == 0.0);
        CHECK(r.metrics.ratio_mean.item<double>() == 1.0);
      }
    }
  }
}

TEST_CASE("CISPO's gradient never vanishes; SAPO's is smooth; both agree with their peers' forms",
          "[objectives]") {
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  // r = e^1 with A = 1: the clipped objective passes no gradient, CISPO does.
  const Tensor old_logp = torch::full({1, 1}, -2.0, f64);
  const Tensor logp = torch::full({1, 1}, -1.0, f64).requires_grad_(true);
  const Tensor adv = torch::ones({1, 1}, f64);
  psft::LossOptions o;
  o.objective.kind = psft::Objective::CispoRelative;
  psft::policy_loss(logp, old_logp, adv, Tensor(), o).loss.backward();
  CHECK(logp.grad().item<double>() == Approx(-(1 + o.clip.eps_high)).epsilon(1e-15));
  logp.mutable_grad().zero_();
  o.objective.kind = psft::Objective::CispoCapped;
  o.objective.cispo_cap = 5.0;
  const psft::LossResult capped = psft::policy_loss(logp, old_logp, adv, Tensor(), o);
  capped.loss.backward();
  CHECK(logp.grad().item<double>() == Approx(-std::exp(1.0)).epsilon(1e-15));
  CHECK(capped.metrics.clip_frac.item<double>() == 0.0);  // e < 5
  logp.mutable_grad().zero_();
  o.objective.kind = psft::Objective::Clipped;
  psft::policy_loss(logp, old_logp, adv, Tensor(), o).loss.backward();
  CHECK(logp.grad().item<double>() == 0.0);
  // SAPO at r = 1: l = -(4 / tau) / 2 A and dl/dlogp = -A.
  logp.mutable_grad().zero_();
  o.objective.kind = psft::Objective::Sapo;
  const Tensor same = torch::full({1, 1}, -2.0, f64).requires_grad_(true);
  const psft::LossResult sapo = psft::policy_loss(same, old_logp, adv, Tensor(), o);
  sapo.loss.backward();
  CHECK(sapo.loss.item<double>() == Approx(-2.0).epsilon(1e-15));
  CHECK(same.grad().item<double>() == Approx(-1.0).epsilon(1e-15));
}

TEST_CASE("GSPO: a sequence's tokens share its ratio, and a one-token sequence is the token ratio",
          "[objectives]") {
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor old_logp = torch::tensor({{-1.0, -2.0, -3.0}, {-1.0, -1.0, -1.0}}, f64);
  const Tensor logp = torch::tensor({{-0.9, -2.2, -2.5}, {-0.8, 5.0, 5.0}}, f64);
  const Tensor mask = torch::tensor({{1.0, 1.0, 1.0}, {1.0, 0.0, 0.0}}, f64);
  psft::LossOptions seq;
  seq.objective.ratio_level = psft::RatioLevel::Sequence;
  seq.reduction = psft::Reduction::SeqMeanTokenMean;
  const psft::LossResult r = psft::policy_loss(logp, old_logp, torch::ones_like(logp), mask, seq);
  const double s0 = std::exp((0.1 - 0.2 + 0.5) / 3);  // 1.14: inside the trust region
  const double s1 = std::exp(0.2);
  CHECK(r.metrics.ratio_min.item<double>() == Approx(std::min(s0, s1)).epsilon(1e-14));
  CHECK(r.metrics.ratio_max.item<double>() == Approx(std::max(s0, s1)).epsilon(1e-14));
  // Row 1 is one token: the token-level loss of that row alone.
  psft::LossOptions token = seq;
  token.objective.ratio_level = psft::RatioLevel::Token;
  const Tensor row1 = torch::tensor({{-0.8}}, f64);
  const double alone = psft::policy_loss(row1, torch::tensor({{-1.0}}, f64),
                                         torch::ones({1, 1}, f64), Tensor(), token)
                           .loss.item<double>();
  CHECK(r.loss.item<double>() == Approx((-s0 + alone) / 2).epsilon(1e-14));
}

TEST_CASE("the Eigen API runs every objective with the same results", "[objectives][eigen]") {
  const Batch b = make_batch(4, 23, 17, torch::kDouble);
  using Array = psft::eigen::TokenArray<double>;
  const auto to_array = [](const Tensor& t) {
    const std::vector<double> v = values(t);
    return Array(Eigen::Map<const Array>(v.data(), t.size(0), t.size(1)));
  };
  for (const Case& c : kCases) {
    const psft::LossOptions o =
        options_for(c, psft::Backend::FusedCpu, psft::Reduction::SeqMeanTokenSum);
    const auto e = psft::eigen::policy_loss<double>(to_array(b.logp), to_array(b.old_logp),
                                                    to_array(b.advantages), to_array(b.mask), o);
    const reference::Result ref = reference_of(b, c, o);
    INFO(c.name);
    CHECK(close(e.loss, ref.loss, 0.0, 1e-12 * ref.loss_magnitude));
    int bad = 0;
    for (Eigen::Index k = 0; k < e.grad.size(); ++k)
      bad += !close(e.grad.data()[k], ref.grad[static_cast<std::size_t>(k)], 1e-12, 1e-15);
    CHECK(bad == 0);
    CHECK(e.metrics.clip_frac == Approx(ref.metrics.clip_frac).margin(1e-12));
  }
}

TEST_CASE("objectives through psft_loss_from_logits equal token_logprobs + policy_loss",
          "[objectives][logits]") {
  torch::manual_seed(9);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor logits0 = torch::randn({3, 5, 11}, f64);
  const Tensor labels = torch::randint(0, 11, {3, 5}, torch::kLong);
  const Tensor old_logp = torch::log_softmax(logits0 + 0.3 * torch::randn({3, 5, 11}, f64), -1)
                              .gather(-1, labels.unsqueeze(-1))
                              .squeeze(-1);
  const Tensor adv = torch::randn({3, 1}, f64);
  for (const Case& c : kCases) {
    const psft::LossOptions o = options_for(c, psft::Backend::Auto, psft::Reduction::TokenMean);
    const Tensor a = logits0.clone().requires_grad_(true);
    psft::policy_loss_from_logits(a, labels, old_logp, adv, o).loss.backward();
    const Tensor b = logits0.clone().requires_grad_(true);
    const Tensor logp = torch::log_softmax(b, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1);
    psft::policy_loss(logp, old_logp, adv.expand({3, 5}), Tensor(), o).loss.backward();
    INFO(c.name);
    CHECK(torch::allclose(a.grad(), b.grad(), 1e-12, 1e-14));
  }
}

TEST_CASE("fused objectives are bitwise identical for 1, 2 and 3 threads",
          "[objectives][threads]") {
  const Batch b = make_batch(3, 5000, 21, torch::kFloat);
  for (const Case& c : kCases) {
    std::vector<Tensor> losses, grads;
    for (int threads : {1, 2, 3}) {
      at::set_num_threads(threads);
      const Tensor logp = b.logp.clone().requires_grad_(true);
      const psft::LossResult r = psft::policy_loss(
          logp, b.old_logp, b.advantages, b.mask,
          options_for(c, psft::Backend::FusedCpu, psft::Reduction::SeqMeanTokenMean));
      r.loss.backward();
      losses.push_back(r.loss.detach());
      grads.push_back(logp.grad());
    }
    at::set_num_threads(1);
    INFO(c.name);
    CHECK(torch::equal(losses[0], losses[1]));
    CHECK(torch::equal(losses[0], losses[2]));
    CHECK(torch::equal(grads[0], grads[2]));
  }
}

TEST_CASE("kl_penalty: every estimator matches verl's and TRL's definitions", "[kl_penalty]") {
  const Batch b = make_batch(4, 41, 31, torch::kDouble);
  // Log-ratios beyond 20 and estimator values beyond 10 are in the draw.
  const Tensor ref_logp = b.old_logp;
  struct KlCase {
    psft::KlEstimator estimator;
    reference::KlKind kind;
    const char* name;
  };
  const KlCase cases[] = {
      {psft::KlEstimator::K1, reference::KlKind::K1, "k1"},
      {psft::KlEstimator::Abs, reference::KlKind::Abs, "abs"},
      {psft::KlEstimator::K2, reference::KlKind::K2, "k2"},
      {psft::KlEstimator::K3, reference::KlKind::K3, "low_var_kl"},
      {psft::KlEstimator::K3Unclamped, reference::KlKind::K3Unclamped, "trl k3"},
      {psft::KlEstimator::K1StraightThrough, reference::KlKind::K1Plus, "k1+"},
      {psft::KlEstimator::AbsStraightThrough, reference::KlKind::AbsPlus, "abs+"},
      {psft::KlEstimator::K3StraightThrough, reference::KlKind::K3Plus, "k3+"},
  };
  for (const KlCase& k : cases) {
    for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
      for (psft::Reduction reduction : kReductions) {
        INFO(k.name << " " << psft::backend_name(backend) << " " << name_of(reduction));
        psft::LossOptions o;
        o.backend = backend;
        o.reduction = reduction;
        const Tensor logp = b.logp.clone().requires_grad_(true);
        const psft::KlPenaltyResult r = psft::kl_penalty(logp, ref_logp, b.mask, k.estimator, o);
        r.loss.backward();
        const reference::KlResult ref = reference::kl_loss(4, 41, values(b.logp), values(ref_logp),
                                                           values(b.mask), settings_for(o), k.kind);
        CHECK(close(r.loss.item<double>(), ref.aggregated.loss, 0.0,
                    1e-12 * (ref.aggregated.loss_magnitude + 1e-30)));
        CHECK(r.kl_mean.item<double>() == Approx(ref.kl_mean).epsilon(1e-12));
        const std::vector<double> grad = values(logp.grad());
        int bad = 0;
        for (std::size_t i = 0; i < grad.size(); ++i)
          bad += !close(grad[i], ref.aggregated.grad[i], 1e-12, 1e-15);
        CHECK(bad == 0);
      }
    }
  }
}

TEST_CASE("kl_penalty adds to a policy loss as verl's use_kl_loss does", "[kl_penalty]") {
  const Batch b = make_batch(3, 17, 41, torch::kFloat);
  psft::LossOptions o;
  o.reduction = psft::Reduction::SeqMeanTokenMean;
  const Tensor logp = b.logp.clone().requires_grad_(true);
  const psft::LossResult pg = psft::policy_loss(logp, b.old_logp, b.advantages, b.mask, o);
  const psft::KlPenaltyResult kl =
      psft::kl_penalty(logp, b.old_logp - 0.1, b.mask, psft::KlEstimator::K3, o);
  const Tensor total = pg.loss + 0.05 * kl.loss;
  total.backward();
  CHECK(std::isfinite(total.item<double>()));
  CHECK(kl.kl_mean.item<double>() >= 0.0);
  CHECK(logp.grad().isfinite().all().item<bool>());
  // Empty: zero on the graph.
  const Tensor empty = torch::zeros({2, 0}).requires_grad_(true);
  const psft::KlPenaltyResult none = psft::kl_penalty(empty, torch::zeros({2, 0}), Tensor());
  CHECK(none.loss.item<double>() == 0.0);
  CHECK(none.kl_mean.item<double>() == 0.0);
  none.loss.backward();
}

TEST_CASE("bad objective options and KL arguments raise c10::Error naming them",
          "[objectives][errors]") {
  const Tensor logp = torch::zeros({2, 3});
  const Tensor old_logp = torch::zeros({2, 3});
  const auto fails_with = [&](const psft::LossOptions& o, const std::string& what) {
    try {
      psft::psft_loss(logp, old_logp, Tensor(), o);
    } catch (const c10::Error& e) {
      const std::string message = e.what();
      INFO(message);
      CHECK(message.find(what) != std::string::npos);
      return;
    }
    FAIL("no error for " << what);
  };
  psft::LossOptions o;
  o.objective.kind = static_cast<psft::Objective>(9);
  fails_with(o, "objective.kind");
  o = {};
  o.objective.ratio_level = static_cast<psft::RatioLevel>(5);
  fails_with(o, "objective.ratio_level");
  o = {};
  o.objective.cispo_cap = 0;
  fails_with(o, "objective.cispo_cap");
  o = {};
  o.objective.sapo_tau_pos = -1;
  fails_with(o, "objective.sapo_tau_pos");
  o = {};
  o.objective.sapo_tau_neg = std::nan("");
  fails_with(o, "objective.sapo_tau_neg");
  o = {};
  o.objective.ratio_level = psft::RatioLevel::Sequence;
  CHECK_THROWS_WITH(psft::psft_loss(torch::zeros({4}), torch::zeros({4}), Tensor(), o),
                    Catch::Contains("objective.ratio_level Sequence"));
  CHECK_THROWS_WITH(psft::kl_penalty(logp, torch::zeros({3, 2}), Tensor()),
                    Catch::Contains("ref_logp must have logp's shape"));
  CHECK_THROWS_WITH(psft::kl_penalty(logp, torch::full({2, 3}, std::nan("")), Tensor()),
                    Catch::Contains("ref_logp has NaN"));
  CHECK_THROWS_WITH(psft::kl_penalty(logp, old_logp, Tensor(), static_cast<psft::KlEstimator>(8)),
                    Catch::Contains("estimator must be"));
}

TEST_CASE("TrustRegionMonitor reports a trust region that never binds, or binds on most tokens",
          "[monitor]") {
  psft::TrustRegionMonitor quiet(3, 0.28, 0.5, /*warn=*/false);
  CHECK(quiet.record(0, 0.0, 1.0) == psft::TrustRegionState::Healthy);
  CHECK(quiet.record(1, 0.0, 1.2) == psft::TrustRegionState::Healthy);
  CHECK(quiet.record(2, 0.0, 1.28) == psft::TrustRegionState::NeverBinds);
  CHECK(quiet.first_report_step() == 2);
  CHECK(quiet.message().find("plain SFT") != std::string::npos);
  // A ratio past the bound without a clipped token (A < 0 there) still counts as binding.
  CHECK(quiet.record(3, 0.0, 1.3) == psft::TrustRegionState::Healthy);
  CHECK(quiet.steps_without_binding() == 0);
  CHECK(quiet.message().empty());
  for (int s = 4; s < 7; ++s) quiet.record(s, 0.8, 2.0);
  CHECK(quiet.state() == psft::TrustRegionState::BindsOnMost);
  CHECK(quiet.message().find("learning rate too high") != std::string::npos);
  CHECK(quiet.record(7, 0.1, 1.4) == psft::TrustRegionState::Healthy);

  // From a loss call's metrics: one mini-batch per global batch means r == 1.
  psft::TrustRegionMonitor from_metrics(2, 0.28, 0.5, false);
  const Tensor logp = torch::randn({2, 5});
  for (int s = 0; s < 2; ++s) from_metrics.record(s, psft::psft_loss(logp, logp, Tensor()).metrics);
  CHECK(from_metrics.state() == psft::TrustRegionState::NeverBinds);

  CHECK_THROWS_WITH(psft::TrustRegionMonitor(0), Catch::Contains("patience"));
  CHECK_THROWS_WITH(psft::TrustRegionMonitor(5, -1.0), Catch::Contains("eps_high"));
  CHECK_THROWS_WITH(psft::TrustRegionMonitor(5, 0.2, 0.0), Catch::Contains("most_fraction"));
  CHECK_THROWS_WITH(quiet.record(7, 0.0, 1.0), Catch::Contains("steps must increase"));
  CHECK_THROWS_WITH(quiet.record(8, 1.5, 1.0), Catch::Contains("clip_frac"));
}

TEST_CASE("entropy bonus: the from-logits losses subtract entropy_coeff x agg(entropy)",
          "[objectives][entropy_bonus]") {
  torch::manual_seed(13);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor logits0 = torch::randn({3, 6, 13}, f64);
  Tensor labels = torch::randint(0, 13, {3, 6}, torch::kLong);
  labels.index_put_({0, 4}, -100);
  labels[2].fill_(-100);  // an empty row
  const Tensor old_logp = torch::randn({3, 6}, f64) * 0.1 - 2.5;
  for (psft::Reduction reduction :
       {psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenMean}) {
    for (psft::Backend backend : {psft::Backend::FusedCpu, psft::Backend::Composed}) {
      INFO(name_of(reduction) << " " << psft::backend_name(backend));
      psft::LossOptions o;
      o.reduction = reduction;
      o.backend = backend;
      o.entropy_coeff = 0.03;
      const Tensor a = logits0.clone().requires_grad_(true);
      const psft::LogitsLossResult got = psft::psft_loss_from_logits(a, labels, old_logp, o);
      got.loss.backward();
      // Composed in double with autograd: the same policy loss on composed
      // log-probabilities, minus the bonus aggregated by torch ops.
      const Tensor b = logits0.clone().requires_grad_(true);
      const Tensor log_probs = torch::log_softmax(b, -1);
      const Tensor valid = labels != -100;
      const Tensor logp =
          log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid;
      const Tensor entropy = -(log_probs.exp() * log_probs).sum(-1);
      psft::LossOptions plain = o;
      plain.entropy_coeff = 0;
      const Tensor pg = psft::psft_loss(logp, old_logp, valid, plain).loss;
      const Tensor m = valid.to(torch::kDouble);
      Tensor agg;
      if (reduction == psft::Reduction::TokenMean) {
        agg = (entropy * m).sum() / m.sum();
      } else {
        const Tensor n = m.sum(1);
        agg = ((entropy * m).sum(1) / n.clamp_min(1)).sum() / (n > 0).sum();
      }
      const Tensor want = pg - 0.03 * agg;
      want.backward();
      CHECK(got.loss.item<double>() == Approx(want.item<double>()).epsilon(1e-12));
      CHECK(torch::allclose(a.grad(), b.grad(), 1e-10, 1e-13));
    }
  }
  // sft_loss_from_logits takes it too; the from-logp losses refuse it.
  psft::LossOptions o;
  o.entropy_coeff = 0.03;
  const Tensor a = logits0.clone().requires_grad_(true);
  const psft::SftLogitsLossResult sft =
      psft::sft_loss_from_logits(a, labels, psft::SftVariant::Nll, o);
  const psft::SftLogitsLossResult plain = psft::sft_loss_from_logits(logits0, labels);
  CHECK(
      sft.loss.item<double>() ==
      Approx(plain.loss.item<double>() - 0.03 * plain.entropy_mean.item<double>()).epsilon(1e-12));
  CHECK_THROWS_WITH(psft::psft_loss(torch::zeros({2, 3}), torch::zeros({2, 3}), Tensor(), o),
                    Catch::Contains("entropy_coeff"));
  CHECK_THROWS_WITH(psft::sft_loss(torch::zeros({2, 3}), Tensor(), psft::SftVariant::Nll, o),
                    Catch::Contains("entropy_coeff"));
  o.entropy_coeff = std::nan("");
  CHECK_THROWS_WITH(psft::psft_loss_from_logits(logits0, labels, old_logp, o),
                    Catch::Contains("entropy_coeff must be finite"));
}

TEST_CASE("iw_sft_loss: NLL weighted by the clamped sequence or token ratio to a reference",
          "[objectives][iw_sft]") {
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  torch::manual_seed(19);
  const Tensor ref = -torch::rand({3, 7}, f64) * 3 - 0.1;
  Tensor d = torch::randn({3, 7}, f64);
  d[1].fill_(4.0);  // a sequence whose weight e^4 > 16 is clamped
  const Tensor logp0 = ref + d;
  const Tensor mask = (torch::rand({3, 7}, f64) < 0.8).to(torch::kDouble);
  // Sequence level, token-mean, against the formula written out.
  {
    const Tensor logp = logp0.clone().requires_grad_(true);
    const psft::LossResult r = psft::iw_sft_loss(logp, ref, mask);
    r.loss.backward();
    const Tensor n = mask.sum(1);
    const Tensor w = ((d * mask).sum(1) / n.clamp_min(1)).exp().clamp(0, 16).unsqueeze(1);
    const Tensor want = -(w * logp0 * mask).sum() / mask.sum();
    CHECK(r.loss.item<double>() == Approx(want.item<double>()).epsilon(1e-13));
    CHECK(torch::allclose(logp.grad(), -(w * mask) / mask.sum(), 1e-13, 1e-15));
    CHECK(r.metrics.clip_frac.item<double>() ==
          Approx((mask[1].sum() / mask.sum()).item<double>()).epsilon(1e-14));
  }
  // Token level, seq-mean-token-mean.
  {
    psft::IwSftOptions iw;
    iw.level = psft::IwSftLevel::Token;
    psft::LossOptions o;
    o.reduction = psft::Reduction::SeqMeanTokenMean;
    const Tensor logp = logp0.clone().requires_grad_(true);
    psft::iw_sft_loss(logp, ref, mask, iw, o).loss.backward();
    const Tensor w = d.exp().clamp(0.2, 1.8);
    const Tensor n = mask.sum(1, true);
    const Tensor rows = (n > 0).sum().to(torch::kDouble);
    CHECK(torch::allclose(logp.grad(), -(w * mask) / n.clamp_min(1) / rows, 1e-13, 1e-15));
  }
  psft::IwSftOptions bad;
  bad.max_weight = 0;
  CHECK_THROWS_WITH(psft::iw_sft_loss(logp0, ref, mask, bad), Catch::Contains("max_weight"));
  bad = {};
  bad.level = psft::IwSftLevel::Token;
  bad.token_low = 1.5;
  CHECK_THROWS_WITH(psft::iw_sft_loss(logp0, ref, mask, bad), Catch::Contains("token_low"));
  CHECK_THROWS_WITH(psft::iw_sft_loss(logp0, ref.narrow(1, 0, 3), mask),
                    Catch::Contains("ref_logp must have logp's shape"));
}

TEST_CASE("asft_loss_from_logits: DFT plus the KL anchor over the vocabulary, chunked",
          "[objectives][asft]") {
  torch::manual_seed(23);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor logits0 = torch::randn({2, 5, 17}, f64);
  const Tensor ref = logits0 + 0.5 * torch::randn({2, 5, 17}, f64);
  Tensor labels = torch::randint(0, 17, {2, 5}, torch::kLong);
  labels.index_put_({1, 3}, -100);
  for (std::int64_t chunk_bytes : {std::int64_t(64) << 20, std::int64_t(1)}) {
    INFO("chunk bytes " << chunk_bytes);
    psft::LogitsOptions lo;
    lo.composed_chunk_bytes = chunk_bytes;
    lo.temperature = 0.7;
    const Tensor a = logits0.clone().requires_grad_(true);
    const psft::AsftLossResult got = psft::asft_loss_from_logits(a, ref, labels, 0.1, {}, lo);
    got.loss.backward();
    // Composed in double with autograd.
    const Tensor b = logits0.clone().requires_grad_(true);
    const Tensor lp_all = torch::log_softmax(b / 0.7, -1);
    const Tensor lr_all = torch::log_softmax(ref / 0.7, -1);
    const Tensor valid = (labels != -100).to(torch::kDouble);
    const Tensor lp = lp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    const Tensor dft = -(lp.detach().exp() * lp * valid).sum() / valid.sum();
    const Tensor kl = (lr_all.exp() * (lr_all - lp_all)).sum(-1);
    const Tensor want = dft + 0.1 * (kl * valid).sum() / valid.sum();
    want.backward();
    CHECK(got.loss.item<double>() == Approx(want.item<double>()).epsilon(1e-12));
    CHECK(torch::allclose(a.grad(), b.grad(), 1e-11, 1e-14));
    CHECK(got.kl_mean.item<double>() ==
          Approx(((kl * valid).sum() / valid.sum()).item<double>()).epsilon(1e-12));
    CHECK(got.kl[1][3].item<double>() == 0.0);
  }
  // bf16 logits: within bf16 rounding of the double result on the same inputs.
  {
    const Tensor lb = logits0.to(torch::kBFloat16).requires_grad_(true);
    const psft::AsftLossResult got =
        psft::asft_loss_from_logits(lb, ref.to(torch::kBFloat16), labels);
    got.loss.backward();
    const psft::AsftLossResult exact = psft::asft_loss_from_logits(
        lb.detach().to(torch::kDouble), ref.to(torch::kBFloat16).to(torch::kDouble), labels);
    CHECK(got.loss.item<double>() == Approx(exact.loss.item<double>()).epsilon(1e-5));
    CHECK(lb.grad().isfinite().all().item<bool>());
  }
  CHECK_THROWS_WITH(psft::asft_loss_from_logits(logits0, ref.narrow(2, 0, 3), labels),
                    Catch::Contains("ref_logits must have logits' shape"));
  CHECK_THROWS_WITH(psft::asft_loss_from_logits(logits0, ref, labels, -1.0),
                    Catch::Contains("kl_coef"));
}

TEST_CASE("asft_loss_from_logits: the fused pass over both rows against ATen and the composed path",
          "[objectives][asft]") {
  torch::manual_seed(29);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  // V = 4099: two full blocks of the kernel and a tail shorter than a packet.
  const std::int64_t vocab = 4099;
  Tensor logits0 = 3 * torch::randn({3, 4, vocab}, f64);
  Tensor ref = logits0 + torch::randn({3, 4, vocab}, f64);
  // A masked vocabulary entry (-inf in both rows) and a reference entry of zero mass.
  logits0.select(2, 7).fill_(-std::numeric_limits<double>::infinity());
  ref.select(2, 7).fill_(-std::numeric_limits<double>::infinity());
  ref.select(2, 4000).fill_(-std::numeric_limits<double>::infinity());
  Tensor labels = torch::randint(0, vocab, {3, 4}, torch::kLong);
  labels.index_put_({0, 1}, -100);
  labels.index_put_({2, 3}, 7 + 1);
  psft::LossOptions o;
  o.reduction = psft::Reduction::SeqMeanTokenMean;
  psft::LogitsOptions lo;
  lo.temperature = 0.8;
  // ATen in double with autograd: the independent reference.
  const auto reference = [&](const Tensor& z, const Tensor& zr) {
    const Tensor lp_all = torch::log_softmax(z / 0.8, -1);
    const Tensor lr_all = torch::log_softmax(zr / 0.8, -1);
    const Tensor valid = (labels != -100).to(torch::kDouble);
    const Tensor lp = lp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    const Tensor n = valid.sum(1, true);
    const auto agg = [&](const Tensor& x) {
      return ((x * valid).sum(1, true) / n.clamp_min(1)).sum() / (n > 0).sum();
    };
    const Tensor term = torch::where(lr_all > -std::numeric_limits<double>::infinity(),
                                     lr_all.exp() * (lr_all - lp_all), torch::zeros_like(lr_all));
    return agg(-(lp.detach().exp() * lp)) + 0.07 * agg(term.sum(-1));
  };
  const Tensor a = logits0.clone().requires_grad_(true);
  const psft::AsftLossResult got = psft::asft_loss_from_logits(a, ref, labels, 0.07, o, lo);
  got.loss.backward();
  const Tensor b = logits0.clone().requires_grad_(true);
  const Tensor want = reference(b, ref);
  want.backward();
  CHECK(got.loss.item<double>() == Approx(want.item<double>()).epsilon(1e-12));
  CHECK(torch::allclose(a.grad(), b.grad(), 1e-10, 1e-15));
  CHECK(a.grad().select(2, 7).abs().max().item<double>() == 0.0);
  CHECK(got.kl[0][1].item<double>() == 0.0);
  CHECK(got.logp[0][1].item<double>() == 0.0);

  // Float32: the fused pass against the composed one, non-contiguous inputs.
  psft::LogitsOptions composed = lo;
  composed.backend = psft::Backend::Composed;
  const Tensor l32 = logits0.to(torch::kFloat).transpose(0, 1).contiguous().transpose(0, 1);
  const Tensor r32 = ref.to(torch::kFloat);
  REQUIRE_FALSE(l32.is_contiguous());
  const Tensor f = l32.clone().requires_grad_(true);
  const Tensor c = l32.clone().requires_grad_(true);
  const psft::AsftLossResult fused = psft::asft_loss_from_logits(f, r32, labels, 0.07, o, lo);
  const psft::AsftLossResult comp = psft::asft_loss_from_logits(c, r32, labels, 0.07, o, composed);
  fused.loss.backward();
  comp.loss.backward();
  CHECK(fused.loss.item<double>() == Approx(want.item<double>()).epsilon(2e-5));
  CHECK(fused.loss.item<double>() == Approx(comp.loss.item<double>()).epsilon(2e-5));
  CHECK(torch::allclose(fused.kl, comp.kl, 1e-4, 1e-5));
  CHECK(torch::allclose(f.grad(), c.grad(), 1e-4, 1e-9));
  CHECK(fused.nll_mean.item<double>() == Approx(comp.nll_mean.item<double>()).epsilon(1e-6));
  CHECK(fused.kl_mean.item<double>() == Approx(comp.kl_mean.item<double>()).epsilon(1e-4));
  // No grad: the same kernel, the same numbers.
  {
    torch::NoGradGuard no_grad;
    const psft::AsftLossResult plain = psft::asft_loss_from_logits(l32, r32, labels, 0.07, o, lo);
    CHECK(plain.loss.item<double>() == fused.loss.item<double>());
    CHECK(torch::equal(plain.kl, fused.kl.detach()));
  }
  // Mixed dtypes take the composed path: same numbers within float rounding.
  {
    const psft::AsftLossResult mixed = psft::asft_loss_from_logits(l32, ref, labels, 0.07, o, lo);
    CHECK(mixed.loss.item<double>() == Approx(want.item<double>()).epsilon(2e-5));
  }
  // bf16: within bf16 rounding of the double result on the same inputs.
  {
    const Tensor lb = logits0.to(torch::kBFloat16).requires_grad_(true);
    const Tensor rb = ref.to(torch::kBFloat16);
    const psft::AsftLossResult bf = psft::asft_loss_from_logits(lb, rb, labels, 0.07, o, lo);
    bf.loss.backward();
    const Tensor d = lb.detach().to(torch::kDouble).requires_grad_(true);
    const Tensor exact = reference(d, rb.to(torch::kDouble));
    exact.backward();
    CHECK(bf.loss.item<double>() == Approx(exact.item<double>()).epsilon(1e-5));
    CHECK(torch::allclose(lb.grad().to(torch::kDouble), d.grad(), 1e-2, 1e-6));
  }
  // Bad reference rows are named; rows whose label is ignore_index are not read.
  Tensor bad = r32.clone();
  bad.index_put_({1, 2, 5}, std::numeric_limits<float>::quiet_NaN());
  CHECK_THROWS_WITH(psft::asft_loss_from_logits(l32, bad, labels, 0.07, o, lo),
                    Catch::Contains("ref_logits at token 6"));
  Tensor ignored = r32.clone();
  ignored.index_put_({0, 1, 5}, std::numeric_limits<float>::quiet_NaN());
  CHECK(
      psft::asft_loss_from_logits(l32, ignored, labels, 0.07, o, lo).loss.isfinite().item<bool>());
  // A policy entry of -inf where the reference has mass: the KL is +inf, refused.
  Tensor hole = l32.clone();
  hole.index_put_({2, 0, 11}, -std::numeric_limits<float>::infinity());
  CHECK_THROWS_WITH(psft::asft_loss_from_logits(hole, r32, labels, 0.07, o, lo),
                    Catch::Contains("anchor KL is NaN or Inf"));
  // Bitwise independent of the thread count.
  {
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const Tensor one = l32.clone().requires_grad_(true);
    const psft::AsftLossResult r1 = psft::asft_loss_from_logits(one, r32, labels, 0.07, o, lo);
    r1.loss.backward();
    at::set_num_threads(std::max(2, threads));
    const Tensor two = l32.clone().requires_grad_(true);
    const psft::AsftLossResult r2 = psft::asft_loss_from_logits(two, r32, labels, 0.07, o, lo);
    r2.loss.backward();
    at::set_num_threads(threads);
    CHECK(torch::equal(r1.kl, r2.kl));
    CHECK(torch::equal(one.grad(), two.grad()));
  }
}
