// Tests of the from-hidden entry points (psft/hidden.hpp):
// token_logprobs_from_hidden, psft_loss_from_hidden, policy_loss_from_hidden
// and sft_loss_from_hidden, against an independent double-precision
// reference written below from ATen ops (matmul, log_softmax, gather,
// entropy, the clipped objective, the reductions and autograd; it shares no
// code with include/), and against the unfused path at::mm +
// *_from_logits for the options the reference does not spell out.
//
// Tolerances (|got - want| <= atol + rtol |want|, the reference evaluated
// on the same rounded inputs):
//
//   dtype    | loss, logp, entropy | gradients wrt hidden, weight, bias
//   ---------+---------------------+------------------------------------------
//   float64  | 1e-10               | 1e-10 (relative to the largest entry)
//   float32  | 2e-5                | 2e-4 (relative to the largest entry)
//   bfloat16 | 2e-2 (GEMM in bf16) | 4e-2 (relative to the largest entry)
//   float16  | 4e-3                | 1e-2 (relative to the largest entry)
//
// The reduced-precision rows are loose because the logits themselves are
// rounded to the input dtype by the GEMM (as the model's lm_head would
// round them), which the reference, computing them in double, does not.

// LibTorch's logging header defines its own CHECK macro, which aborts
// instead of recording a Catch2 assertion: include LibTorch first and drop it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "psft/hidden.hpp"

namespace {

constexpr std::int64_t kIgnore = -100;

// ---------------------------------------------------------------------------
// Independent double-precision reference (ATen ops and autograd only).
// ---------------------------------------------------------------------------
namespace ref {

enum class Kind { Clipped, Nll, Dft };

struct Setup {
  Kind kind = Kind::Clipped;
  double eps_low = 0.2, eps_high = 0.28;
  double dual_clip = 0.0;  // 0: none
  double temperature = 1.0;
  double entropy_coeff = 0.0;
  psft::Reduction reduction = psft::Reduction::TokenMean;
};

struct Out {
  at::Tensor loss, logp, entropy, g_hidden, g_weight, g_bias;
};

/// The loss of [B, T] per-token losses l under mask m (bool), verl's
/// definitions of the reductions written out.
at::Tensor aggregate(const at::Tensor& l, const at::Tensor& m, psft::Reduction r) {
  const at::Tensor w = m.to(at::kDouble);
  const at::Tensor row_sum = (l * w).sum(1);
  const at::Tensor row_n = w.sum(1);
  const at::Tensor nonempty = (row_n > 0).to(at::kDouble);
  const at::Tensor seqs = nonempty.sum();
  const auto safe = [](const at::Tensor& d) { return at::where(d > 0, d, at::ones_like(d)); };
  switch (r) {
    case psft::Reduction::TokenMean:
      return row_sum.sum() / safe(row_n.sum());
    case psft::Reduction::SeqMeanTokenSum:
      return row_sum.sum() / safe(seqs);
    case psft::Reduction::SeqMeanTokenMean:
      return (row_sum / safe(row_n) * nonempty).sum() / safe(seqs);
    case psft::Reduction::TokenSum:
      return row_sum.sum();
    default:
      FAIL("reduction not in the reference");
  }
  return {};
}

/// log_softmax((hidden @ weight^T + bias) / temperature) in double; the
/// double leaves hidden, weight (and bias) are appended to inputs, when given.
at::Tensor head_log_softmax(const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& bias, double temperature,
                            std::vector<at::Tensor>* inputs) {
  const bool grad = inputs != nullptr;
  const at::Tensor h = hidden.detach().to(at::kDouble).requires_grad_(grad);
  const at::Tensor w = weight.detach().to(at::kDouble).requires_grad_(grad);
  const at::Tensor b = bias.defined() ? bias.detach().to(at::kDouble).requires_grad_(grad) : bias;
  if (grad) {
    inputs->push_back(h);
    inputs->push_back(w);
    if (b.defined()) inputs->push_back(b);
  }
  at::Tensor z = at::matmul(h, w.t());
  if (b.defined()) z = z + b;
  return at::log_softmax(z / temperature, -1);
}

/// Fills o's gradients of o.loss wrt inputs (hidden, weight[, bias]) and
/// its per-token values.
void finish(Out& o, const std::vector<at::Tensor>& inputs, const at::Tensor& logp,
            const at::Tensor& per_token) {
  const auto g = torch::autograd::grad({o.loss}, inputs);
  o.g_hidden = g[0];
  o.g_weight = g[1];
  if (inputs.size() > 2) o.g_bias = g[2];
  o.logp = logp.detach();
  o.entropy = per_token.detach();
}

/// hidden [B, T, H], weight [V, H], bias [V] or undefined, labels [B, T],
/// old [B, T] or undefined (on-policy), adv [B] or undefined (A = 1).
Out evaluate(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
             const at::Tensor& labels, const at::Tensor& old, const at::Tensor& adv,
             const Setup& s) {
  Out o;
  std::vector<at::Tensor> inputs;
  const at::Tensor lsm = head_log_softmax(hidden, weight, bias, s.temperature, &inputs);
  const std::int64_t B = labels.size(0), T = labels.size(1);
  const at::Tensor m = labels != kIgnore;
  const at::Tensor safe_labels = at::where(m, labels, at::zeros_like(labels));
  const at::Tensor zero = at::zeros({}, lsm.options());
  const at::Tensor logp = at::where(m, lsm.gather(2, safe_labels.unsqueeze(2)).squeeze(2), zero);
  const at::Tensor entropy = at::where(m, -(lsm.exp() * lsm).sum(-1), zero);
  at::Tensor l;
  if (s.kind == Kind::Nll) {
    l = -logp;
  } else if (s.kind == Kind::Dft) {
    l = -logp.detach().exp() * logp;
  } else {
    const at::Tensor o_lp = old.defined() ? old.to(at::kDouble) : logp.detach();
    const at::Tensor a = adv.defined() ? adv.to(at::kDouble).reshape({B, 1}).expand({B, T})
                                       : at::ones({B, T}, lsm.options());
    const at::Tensor r = at::exp(at::clamp(logp - o_lp, -20.0, 20.0));
    l = at::max(-a * r, -a * at::clamp(r, 1 - s.eps_low, 1 + s.eps_high));
    if (s.dual_clip > 0) l = at::where(a < 0, at::min(l, -a * s.dual_clip), l);
  }
  l = at::where(m, l, zero);
  o.loss = aggregate(l, m, s.reduction);
  if (s.entropy_coeff != 0) o.loss = o.loss - s.entropy_coeff * aggregate(entropy, m, s.reduction);
  finish(o, inputs, logp, entropy);
  return o;
}

/// ASFT: agg(-sg(p) log p) + kl_coef agg(KL(pi_ref || pi_theta)), the
/// reference's head (ref_bias may be undefined) in double without gradient.
/// Out's entropy holds the per-token KL.
Out evaluate_asft(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                  const at::Tensor& ref_bias, const at::Tensor& labels, double kl_coef,
                  const Setup& s) {
  Out o;
  std::vector<at::Tensor> inputs;
  const at::Tensor lsm = head_log_softmax(hidden, weight, bias, s.temperature, &inputs);
  const at::Tensor lq =
      head_log_softmax(ref_hidden, ref_weight, ref_bias, s.temperature, nullptr).detach();
  const at::Tensor m = labels != kIgnore;
  const at::Tensor zero = at::zeros({}, lsm.options());
  const at::Tensor logp = at::where(
      m, lsm.gather(2, at::where(m, labels, at::zeros_like(labels)).unsqueeze(2)).squeeze(2), zero);
  const at::Tensor q = lq.exp();
  const at::Tensor kl = at::where(m, at::where(q > 0, q * (lq - lsm), zero).sum(-1), zero);
  o.loss = aggregate(-logp.detach().exp() * logp, m, s.reduction) +
           kl_coef * aggregate(kl, m, s.reduction);
  finish(o, inputs, logp, kl);
  return o;
}

}  // namespace ref

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

struct Problem {
  at::Tensor hidden, weight, bias, labels, old, adv;
};

/// A seeded problem of B x T tokens, hidden size H, vocabulary V, with
/// about a quarter of the labels ignored and old log-probabilities near the
/// current ones (noise 0.4: some clip binds and some does not; a small
/// noise keeps every ratio far from the clip, where a dtype's rounding of
/// the logits would flip whether it binds).
Problem make_problem(std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t V,
                     at::ScalarType dtype, std::uint64_t seed, bool with_bias = true,
                     double old_noise = 0.4) {
  torch::manual_seed(seed);
  Problem p;
  p.hidden = torch::randn({B, T, H}, torch::kDouble).to(dtype).requires_grad_(true);
  p.weight = (torch::randn({V, H}, torch::kDouble) * 0.7).to(dtype).requires_grad_(true);
  if (with_bias) p.bias = (torch::randn({V}, torch::kDouble) * 0.5).to(dtype).requires_grad_(true);
  p.labels = torch::randint(0, V, {B, T}, torch::kLong);
  p.labels.masked_fill_(torch::rand({B, T}) < 0.25, kIgnore);
  // old = the reference logp plus noise of about +-0.4.
  const ref::Out base =
      ref::evaluate(p.hidden, p.weight, p.bias, p.labels, at::Tensor(), at::Tensor(), ref::Setup{});
  p.old = (base.logp + torch::randn({B, T}, torch::kDouble) * old_noise).to(torch::kFloat);
  p.adv = torch::randn({B}, torch::kFloat);
  return p;
}

/// max |got - want| <= atol + rtol max |want| over the tensor.
void check_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                 const std::string& what) {
  INFO(what);
  REQUIRE(got.defined());
  REQUIRE(got.sizes() == want.sizes());
  const at::Tensor g = got.detach().to(at::kDouble);
  const at::Tensor w = want.detach().to(at::kDouble);
  REQUIRE(g.isfinite().all().item<bool>());
  const double err = (g - w).abs().max().item<double>();
  const double scale = w.numel() ? w.abs().max().item<double>() : 0.0;
  INFO("max error " << err << ", largest entry " << scale);
  CHECK(err <= atol + rtol * scale);
}

struct Grads {
  at::Tensor hidden, weight, bias;
};

Grads grads_of(const at::Tensor& loss, const Problem& p) {
  std::vector<at::Tensor> inputs = {p.hidden, p.weight};
  if (p.bias.defined()) inputs.push_back(p.bias);
  const auto g = torch::autograd::grad({loss}, inputs);
  return {g[0], g[1], p.bias.defined() ? g[2] : at::Tensor()};
}

/// Whether this LibTorch's bfloat16 GEMM sums in float, in the layout of
/// the from-hidden backward's d hidden = dlogits [M, V] x weight [V, H]:
/// 1024 products of ones sum to 1024 in float, but a bfloat16 sum stops at
/// 256 (256 + 1 rounds back to 256). LibTorch 1.13 sums this layout in
/// bfloat16 where oneDNN's bfloat16 GEMM is not used (CPUs without AVX-512,
/// and small products), which bounds the from-hidden gradients' accuracy
/// whatever the loss computes (docs/versions.md).
bool bf16_gemm_sums_in_float() {
  static const bool in_float = [] {
    const at::Tensor ones = at::ones({18, 1024}, at::kBFloat16);
    const at::Tensor sums = at::mm(ones, at::ones({1024, 8}, at::kBFloat16)).to(at::kDouble);
    return sums.eq(1024.0).all().item<bool>();
  }();
  return in_float;
}

/// The gradients' tolerance where the bfloat16 GEMM sums in bfloat16: its
/// relative error grows with the summed length (a vocabulary of about a
/// thousand here).
constexpr double kBf16SumTol = 1e-1;

void check_grads(const Grads& got, const ref::Out& want, double tol, const std::string& what) {
  if (got.hidden.scalar_type() == at::kBFloat16 && !bf16_gemm_sums_in_float()) {
    WARN("this LibTorch's bfloat16 GEMM sums in bfloat16: gradients compared to " << kBf16SumTol);
    tol = std::max(tol, kBf16SumTol);
  }
  check_close(got.hidden, want.g_hidden, tol, 0.0, what + ": d hidden");
  check_close(got.weight, want.g_weight, tol, 0.0, what + ": d weight");
  if (want.g_bias.defined()) check_close(got.bias, want.g_bias, tol, 0.0, what + ": d bias");
}

psft::HiddenOptions hidden_options(const Problem& p, std::int64_t chunk, double temperature = 1.0) {
  psft::HiddenOptions o;
  o.bias = p.bias;
  o.chunk_tokens = chunk;
  o.temperature = temperature;
  return o;
}

}  // namespace

TEST_CASE("psft_loss_from_hidden matches the double reference: loss, per-token values, gradients",
          "[hidden][parity]") {
  for (const std::int64_t V : {1, 7, 4099}) {
    for (const std::int64_t chunk : {1, 5, 24, 100}) {  // 1, a prime, exactly N, more than N
      for (const bool with_bias : {false, true}) {
        const Problem p = make_problem(3, 8, 6, V, torch::kDouble, 11 + V + chunk, with_bias);
        ref::Setup s;
        s.temperature = 0.8;
        s.entropy_coeff = chunk == 5 ? 0.03 : 0.0;
        psft::LossOptions lo;
        lo.entropy_coeff = s.entropy_coeff;
        const psft::LogitsLossResult r = psft::psft_loss_from_hidden(
            p.hidden, p.weight, p.labels, p.old, lo, hidden_options(p, chunk, s.temperature));
        const ref::Out want =
            ref::evaluate(p.hidden, p.weight, p.bias, p.labels, p.old, at::Tensor(), s);
        const std::string what = "V " + std::to_string(V) + ", chunk " + std::to_string(chunk) +
                                 (with_bias ? ", bias" : "");
        check_close(r.loss, want.loss, 1e-10, 1e-12, what + ": loss");
        check_close(r.logp, want.logp, 1e-10, 1e-12, what + ": logp");
        check_close(r.entropy, want.entropy, 1e-10, 1e-12, what + ": entropy");
        CHECK_FALSE(r.logp.requires_grad());
        check_grads(grads_of(r.loss, p), want, 1e-10, what);
      }
    }
  }
}

TEST_CASE("policy_loss_from_hidden: advantages, dual clip, reductions", "[hidden][parity]") {
  for (const psft::Reduction red : {psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenSum,
                                    psft::Reduction::SeqMeanTokenMean, psft::Reduction::TokenSum}) {
    const Problem p = make_problem(4, 9, 5, 37, torch::kDouble, 5 + static_cast<int>(red));
    ref::Setup s;
    s.dual_clip = 3.0;
    s.reduction = red;
    psft::LossOptions lo;
    lo.clip.dual_clip = 3.0;
    lo.reduction = red;
    const psft::LogitsLossResult r = psft::policy_loss_from_hidden(
        p.hidden, p.weight, p.labels, p.old, p.adv, lo, hidden_options(p, 7));
    const ref::Out want = ref::evaluate(p.hidden, p.weight, p.bias, p.labels, p.old, p.adv, s);
    const std::string what = "reduction " + std::to_string(static_cast<int>(red));
    check_close(r.loss, want.loss, 1e-10, 1e-12, what + ": loss");
    check_grads(grads_of(r.loss, p), want, 1e-10, what);
  }
}

TEST_CASE("from-hidden losses equal at::mm + the from-logits losses for every option",
          "[hidden][parity]") {
  // The options the reference above does not spell out: the other
  // reductions, a supplied Normaliser, norm_constant, CISPO, SAPO, GSPO.
  const Problem p = make_problem(3, 10, 6, 29, torch::kDouble, 77);
  std::vector<psft::LossOptions> cases(8);
  cases[0].reduction = psft::Reduction::SeqMeanTokenSumNorm;
  cases[0].norm_constant = 12.0;
  cases[1].reduction = psft::Reduction::TokenSumNorm;
  cases[2].normaliser = psft::Normaliser{40.0, std::nullopt, 2};
  cases[3].reduction = psft::Reduction::SeqMeanTokenMean;
  cases[3].normaliser = psft::Normaliser{std::nullopt, 7.0, 1};
  cases[4].objective.kind = psft::Objective::CispoCapped;
  cases[5].objective.kind = psft::Objective::Sapo;
  cases[6].objective.ratio_level = psft::RatioLevel::Sequence;  // GSPO: the recomputing path
  cases[7].objective.ratio_level = psft::RatioLevel::Sequence;
  cases[7].entropy_coeff = 0.05;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const psft::LossOptions& lo = cases[i];
    const psft::LogitsLossResult r = psft::policy_loss_from_hidden(
        p.hidden, p.weight, p.labels, p.old, p.adv, lo, hidden_options(p, 4));
    const at::Tensor logits =
        at::addmm(p.bias, p.hidden.reshape({-1, 6}), p.weight.t()).reshape({3, 10, 29});
    const psft::LogitsLossResult u =
        psft::policy_loss_from_logits(logits, p.labels, p.old, p.adv, lo);
    const std::string what = "case " + std::to_string(i);
    check_close(r.loss, u.loss, 1e-10, 1e-12, what + ": loss");
    check_close(r.metrics.packed(), u.metrics.packed(), 1e-10, 1e-12, what + ": metrics");
    check_close(r.entropy_mean, u.entropy_mean, 1e-10, 1e-12, what + ": entropy_mean");
    check_close(r.nll_mean, u.nll_mean, 1e-10, 1e-12, what + ": nll_mean");
    const Grads got = grads_of(r.loss, p);
    const Grads want = grads_of(u.loss, p);
    check_close(got.hidden, want.hidden, 1e-10, 1e-14, what + ": d hidden");
    check_close(got.weight, want.weight, 1e-10, 1e-14, what + ": d weight");
    check_close(got.bias, want.bias, 1e-10, 1e-14, what + ": d bias");
  }
}

TEST_CASE("sft_loss_from_hidden: Nll and Dft against the reference", "[hidden][parity]") {
  for (const auto variant : {psft::SftVariant::Nll, psft::SftVariant::Dft}) {
    for (const double coeff : {0.0, 0.02}) {
      const Problem p = make_problem(2, 11, 4, 53, torch::kDouble, 31);
      ref::Setup s;
      s.kind = variant == psft::SftVariant::Nll ? ref::Kind::Nll : ref::Kind::Dft;
      s.reduction = psft::Reduction::SeqMeanTokenMean;
      s.entropy_coeff = coeff;
      psft::LossOptions lo;
      lo.reduction = s.reduction;
      lo.entropy_coeff = coeff;
      const psft::SftLogitsLossResult r = psft::sft_loss_from_hidden(
          p.hidden, p.weight, p.labels, variant, lo, hidden_options(p, 3));
      const ref::Out want =
          ref::evaluate(p.hidden, p.weight, p.bias, p.labels, at::Tensor(), at::Tensor(), s);
      check_close(r.loss, want.loss, 1e-10, 1e-12, "loss");
      check_grads(grads_of(r.loss, p), want, 1e-10, "sft");
      check_close(r.nll_mean, -(want.logp.sum() / (p.labels != kIgnore).sum()), 1e-10, 1e-12,
                  "nll_mean");
    }
  }
}

/// The reference model's head for ASFT: hidden size H_ref = 5, V as p's,
/// in dtype, requiring a gradient (which it must not receive).
struct RefHead {
  at::Tensor hidden, weight, bias;
};

RefHead make_ref_head(const Problem& p, at::ScalarType dtype, std::uint64_t seed) {
  torch::manual_seed(seed);
  const std::int64_t V = p.weight.size(0);
  RefHead r;
  r.hidden = torch::randn({p.labels.size(0), p.labels.size(1), 5}, torch::kDouble)
                 .to(dtype)
                 .requires_grad_(true);
  r.weight = (torch::randn({V, 5}, torch::kDouble) * 0.8).to(dtype).requires_grad_(true);
  r.bias = (torch::randn({V}, torch::kDouble) * 0.5).to(dtype).requires_grad_(true);
  return r;
}

psft::AsftLossResult asft_of(const Problem& p, const RefHead& r, const psft::LossOptions& lo,
                             const psft::HiddenOptions& o, double kl_coef = 0.1) {
  return psft::asft_loss_from_hidden(p.hidden, p.weight, r.hidden, r.weight, p.labels, kl_coef, lo,
                                     o, r.bias);
}

TEST_CASE("asft_loss_from_hidden: both heads fused, against the double reference",
          "[hidden][parity][asft]") {
  const Problem p = make_problem(3, 10, 6, 29, torch::kDouble, 41);
  const at::Tensor m = p.labels != kIgnore;
  for (const auto backend : {psft::Backend::Auto, psft::Backend::Composed}) {
    for (const auto ref_dtype : {torch::kDouble, torch::kFloat}) {  // Float: the composed KL
      const RefHead r = make_ref_head(p, ref_dtype, 42);
      for (const auto reduction : {psft::Reduction::TokenMean, psft::Reduction::SeqMeanTokenMean}) {
        for (const std::int64_t chunk : {1, 7, 100}) {
          const double temperature = chunk == 7 ? 0.8 : 1.0;
          INFO("backend " << static_cast<int>(backend) << ", ref " << ref_dtype << ", reduction "
                          << static_cast<int>(reduction) << ", chunk " << chunk);
          psft::LossOptions lo;
          lo.reduction = reduction;
          psft::HiddenOptions o = hidden_options(p, chunk, temperature);
          o.backend = backend;
          const psft::AsftLossResult got = asft_of(p, r, lo, o);
          ref::Setup s;
          s.reduction = reduction;
          s.temperature = temperature;
          const ref::Out want = ref::evaluate_asft(p.hidden, p.weight, p.bias, r.hidden, r.weight,
                                                   r.bias, p.labels, 0.1, s);
          // A float32 reference head rounds its logits by its GEMM, which
          // the reference computes in double: float32's tolerance for it.
          const double tol = ref_dtype == torch::kDouble ? 1e-10 : 2e-6;
          check_close(got.loss, want.loss, tol, 1e-12, "loss");
          check_close(got.logp, want.logp, 1e-10, 1e-12, "logp");
          check_close(got.kl, want.entropy, tol, 1e-12, "kl");
          check_close(got.kl_mean, want.entropy.sum() / m.sum(), tol, 1e-12, "kl_mean");
          check_close(got.nll_mean, -want.logp.sum() / m.sum(), 1e-10, 1e-12, "nll_mean");
          check_grads(grads_of(got.loss, p), want, tol, "asft");
          // Without a gradient: the same chunks and GEMMs, the same loss.
          torch::NoGradGuard no_grad;
          CHECK(asft_of(p, r, lo, o).loss.item<double>() == got.loss.item<double>());
        }
      }
    }
  }
}

TEST_CASE("asft_loss_from_hidden: finite differences, dtypes, the reference gets no gradient",
          "[hidden][asft]") {
  SECTION("finite differences of the anchor in float64") {
    // DFT's stop-gradient makes its gradient differ from its value's
    // derivative, so the check is on the anchor: loss(kl_coef) - loss(0) is
    // kl_coef agg(kl) in value, and its gradient the difference of the two.
    const Problem p = make_problem(2, 5, 3, 11, torch::kDouble, 23);
    const RefHead r = make_ref_head(p, torch::kDouble, 24);
    psft::LossOptions lo;
    lo.reduction = psft::Reduction::SeqMeanTokenMean;
    const at::Tensor g = grads_of(asft_of(p, r, lo, hidden_options(p, 3), 0.5).loss, p).hidden -
                         grads_of(asft_of(p, r, lo, hidden_options(p, 3), 0.0).loss, p).hidden;
    const auto anchor_at = [&](const at::Tensor& h) {
      Problem q = p;
      q.hidden = h;
      return asft_of(q, r, lo, hidden_options(p, 3), 0.5).loss.item<double>() -
             asft_of(q, r, lo, hidden_options(p, 3), 0.0).loss.item<double>();
    };
    const double eps = 1e-6;
    torch::NoGradGuard no_grad;
    for (std::int64_t i = 0; i < p.hidden.numel(); i += 2) {
      const at::Tensor plus = p.hidden.detach().clone(), minus = p.hidden.detach().clone();
      plus.view({-1})[i] += eps;
      minus.view({-1})[i] -= eps;
      const double fd = (anchor_at(plus) - anchor_at(minus)) / (2 * eps);
      const double an = g.reshape({-1})[i].item<double>();
      INFO("hidden entry " << i);
      CHECK(std::abs(fd - an) <= 1e-6 * std::abs(an) + 1e-8);
    }
  }
  SECTION("float32 and bfloat16 within the stated tolerances") {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      INFO(dtype);
      const bool f32 = dtype == torch::kFloat;
      const Problem p = make_problem(2, 9, 8, 1031, dtype, 25);
      const RefHead r = make_ref_head(p, dtype, 26);
      const psft::AsftLossResult got = asft_of(p, r, {}, hidden_options(p, 5));
      ref::Setup s;
      const ref::Out want = ref::evaluate_asft(p.hidden, p.weight, p.bias, r.hidden, r.weight,
                                               r.bias, p.labels, 0.1, s);
      check_close(got.loss, want.loss, f32 ? 2e-5 : 2e-2, f32 ? 2e-5 : 2e-2, "loss");
      check_close(got.kl, want.entropy, f32 ? 2e-5 : 2e-2, f32 ? 2e-5 : 2e-2, "kl");
      check_grads(grads_of(got.loss, p), want, f32 ? 2e-4 : 4e-2, "asft");
    }
  }
  SECTION("the reference head is a constant; a fully ignored batch gives 0") {
    Problem p = make_problem(2, 6, 4, 9, torch::kFloat, 27);
    const RefHead r = make_ref_head(p, torch::kFloat, 28);
    asft_of(p, r, {}, hidden_options(p, 4)).loss.backward();
    CHECK(p.hidden.grad().defined());
    CHECK_FALSE(r.hidden.grad().defined());
    CHECK_FALSE(r.weight.grad().defined());
    CHECK_FALSE(r.bias.grad().defined());
    p.labels.fill_(kIgnore);
    const psft::AsftLossResult z = asft_of(p, r, {}, hidden_options(p, 4));
    CHECK(z.loss.item<double>() == 0.0);
    const Grads g = grads_of(z.loss, p);
    CHECK(g.hidden.abs().sum().item<double>() == 0.0);
    CHECK(g.weight.abs().sum().item<double>() == 0.0);
  }
}

TEST_CASE("asft_loss_from_hidden: bad inputs raise c10::Error naming the argument",
          "[hidden][asft][errors]") {
  const Problem p = make_problem(2, 4, 5, 11, torch::kFloat, 1);
  const RefHead r = make_ref_head(p, torch::kFloat, 2);
  const psft::HiddenOptions o = hidden_options(p, 0);
  const auto fails = [&](const RefHead& bad, double kl_coef, const psft::LossOptions& lo,
                         const std::string& needle) {
    INFO(needle);
    CHECK_THROWS_WITH(asft_of(p, bad, lo, o, kl_coef), Catch::Contains(needle));
  };
  RefHead bad = r;
  bad.weight = torch::randn({10, 5});
  fails(bad, 0.1, {}, "ref_weight must be the reference's LM head [V, H_ref] with weight's V = 11");
  bad = r;
  bad.hidden = torch::randn({2, 3, 5});
  fails(bad, 0.1, {}, "ref_hidden must have hidden's leading shape [2, 4]");
  bad = r;
  bad.bias = torch::randn({10});
  fails(bad, 0.1, {}, "ref_bias must have shape [11]");
  bad = r;
  bad.weight = r.weight.to(torch::kDouble);
  fails(bad, 0.1, {}, "ref_weight is Double but ref_hidden is Float");
  bad = r;
  bad.hidden = at::Tensor();
  fails(bad, 0.1, {}, "ref_hidden is an undefined tensor");
  fails(r, -1.0, {}, "kl_coef must be finite and >= 0");
  psft::LossOptions lo;
  lo.entropy_coeff = 0.1;
  fails(r, 0.1, lo, "entropy_coeff is not part of ASFT");
  // A NaN in the reference's hidden state reaches its logits: named, with the chunk.
  bad = r;
  bad.hidden = r.hidden.detach().clone();
  bad.hidden.view({-1})[0] = std::numeric_limits<float>::quiet_NaN();
  Problem scored = p;
  scored.labels = p.labels.clone().fill_(3);
  CHECK_THROWS_WITH(asft_of(scored, bad, {}, o), Catch::Contains("ref_logits at token 0") &&
                                                     Catch::Contains("hidden @ weight^T"));
}

TEST_CASE("token_logprobs_from_hidden: values and gradients of logp and entropy",
          "[hidden][parity]") {
  const Problem p = make_problem(2, 7, 5, 31, torch::kDouble, 3);
  psft::HiddenOptions o = hidden_options(p, 4, 1.3);
  o.entropy_grad = true;
  const psft::TokenLogprobs t = psft::token_logprobs_from_hidden(p.hidden, p.weight, p.labels, o);
  ref::Setup s;
  s.temperature = 1.3;
  const ref::Out want =
      ref::evaluate(p.hidden, p.weight, p.bias, p.labels, at::Tensor(), at::Tensor(), s);
  check_close(t.logp, want.logp, 1e-10, 1e-12, "logp");
  check_close(t.entropy, want.entropy, 1e-10, 1e-12, "entropy");
  // An arbitrary loss of both: sum(g logp + k entropy), against the same
  // loss of the reference's per-token values.
  const at::Tensor g = torch::randn({2, 7}, torch::kDouble);
  const at::Tensor k = torch::randn({2, 7}, torch::kDouble);
  const Grads got = grads_of((t.logp * g + t.entropy * k).sum(), p);
  const at::Tensor h = p.hidden.detach().requires_grad_(true);
  const at::Tensor w = p.weight.detach().requires_grad_(true);
  const at::Tensor b = p.bias.detach().requires_grad_(true);
  const at::Tensor lsm = at::log_softmax((at::matmul(h, w.t()) + b) / 1.3, -1);
  const at::Tensor m = p.labels != kIgnore;
  const at::Tensor lp = at::where(
      m, lsm.gather(2, at::where(m, p.labels, at::zeros_like(p.labels)).unsqueeze(2)).squeeze(2),
      at::zeros({}, lsm.options()));
  const at::Tensor ent = at::where(m, -(lsm.exp() * lsm).sum(-1), at::zeros({}, lsm.options()));
  const auto wg = torch::autograd::grad({(lp * g + ent * k).sum()}, {h, w, b});
  check_close(got.hidden, wg[0], 1e-10, 0.0, "d hidden");
  check_close(got.weight, wg[1], 1e-10, 0.0, "d weight");
  check_close(got.bias, wg[2], 1e-10, 0.0, "d bias");
}

TEST_CASE("from-hidden in float32, bfloat16 and float16 within the stated tolerances",
          "[hidden][dtype]") {
  struct Row {
    at::ScalarType dtype;
    double value_tol, grad_tol;
  };
  for (const Row row : {Row{torch::kFloat, 2e-5, 2e-4}, Row{torch::kBFloat16, 2e-2, 4e-2},
                        Row{torch::kHalf, 4e-3, 1e-2}}) {
    const Problem p = make_problem(3, 16, 32, 257, row.dtype, 8, true, /*old_noise=*/0.04);
    const std::string what = std::string("dtype ") + c10::toString(row.dtype);
    psft::LogitsLossResult r;
    try {
      r = psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {},
                                      hidden_options(p, 9));
    } catch (const c10::Error& e) {
      // LibTorch 1.13 has no float16 GEMM on the CPU.
      if (row.dtype == torch::kHalf && std::string(e.what()).find("Half") != std::string::npos) {
        WARN("float16 GEMM unavailable in this LibTorch: " << e.what());
        continue;
      }
      throw;
    }
    const ref::Out want =
        ref::evaluate(p.hidden, p.weight, p.bias, p.labels, p.old, at::Tensor(), ref::Setup{});
    check_close(r.loss, want.loss, row.value_tol, row.value_tol, what + ": loss");
    check_close(r.logp, want.logp, row.value_tol, row.value_tol, what + ": logp");
    const Grads g = grads_of(r.loss, p);
    CHECK(g.hidden.scalar_type() == row.dtype);
    CHECK(g.weight.scalar_type() == row.dtype);
    CHECK(g.bias.scalar_type() == row.dtype);
    check_grads(g, want, row.grad_tol, what);
  }
}

TEST_CASE("finite differences in float64", "[hidden][gradcheck]") {
  const Problem p = make_problem(2, 5, 3, 11, torch::kDouble, 21);
  psft::LossOptions lo;
  lo.entropy_coeff = 0.1;
  const auto loss_at = [&](const at::Tensor& h, const at::Tensor& w, const at::Tensor& b) {
    psft::HiddenOptions o = hidden_options(p, 3);
    o.bias = b;
    return psft::policy_loss_from_hidden(h, w, p.labels, p.old, p.adv, lo, o).loss.item<double>();
  };
  const psft::LogitsLossResult r = psft::policy_loss_from_hidden(
      p.hidden, p.weight, p.labels, p.old, p.adv, lo, hidden_options(p, 3));
  const Grads g = grads_of(r.loss, p);
  const double eps = 1e-6;
  torch::NoGradGuard no_grad;
  const at::Tensor* params[] = {&p.hidden, &p.weight, &p.bias};
  const at::Tensor* grads[] = {&g.hidden, &g.weight, &g.bias};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor flat_grad = grads[k]->reshape({-1});
    for (std::int64_t i = 0; i < params[k]->numel(); i += 3) {
      at::Tensor plus[3] = {p.hidden.detach().clone(), p.weight.detach().clone(),
                            p.bias.detach().clone()};
      at::Tensor minus[3] = {p.hidden.detach().clone(), p.weight.detach().clone(),
                             p.bias.detach().clone()};
      plus[k].view({-1})[i] += eps;
      minus[k].view({-1})[i] -= eps;
      const double fd =
          (loss_at(plus[0], plus[1], plus[2]) - loss_at(minus[0], minus[1], minus[2])) / (2 * eps);
      const double an = flat_grad[i].item<double>();
      INFO("input " << k << " entry " << i);
      CHECK(std::abs(fd - an) <= 1e-6 * std::abs(an) + 1e-8);
    }
  }
}

TEST_CASE("lr = 0 round trip: bitwise equal logp, ratio exactly 1, nothing clipped",
          "[hidden][roundtrip]") {
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const Problem p = make_problem(4, 33, 16, 301, dtype, 4);
    const psft::HiddenOptions o = hidden_options(p, 13);
    at::Tensor old;
    {
      torch::NoGradGuard no_grad;
      old = psft::token_logprobs_from_hidden(p.hidden, p.weight, p.labels, o).logp;
    }
    const psft::LogitsLossResult r =
        psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, old, {}, o);
    CHECK(at::equal(r.logp, old));
    CHECK(r.metrics.ratio_min.item<double>() == 1.0);
    CHECK(r.metrics.ratio_max.item<double>() == 1.0);
    CHECK(r.metrics.clip_frac.item<double>() == 0.0);
    // The differentiable token_logprobs_from_hidden agrees too.
    CHECK(at::equal(psft::token_logprobs_from_hidden(p.hidden, p.weight, p.labels, o).logp, old));
  }
}

TEST_CASE("on-policy: an undefined old_logp is the current policy", "[hidden][onpolicy]") {
  const Problem p = make_problem(3, 12, 8, 41, torch::kFloat, 9);
  const psft::HiddenOptions o = hidden_options(p, 5);
  at::Tensor old;
  {
    torch::NoGradGuard no_grad;
    old = psft::token_logprobs_from_hidden(p.hidden, p.weight, p.labels, o).logp;
  }
  const psft::LogitsLossResult on =
      psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, at::Tensor(), {}, o);
  const psft::LogitsLossResult off =
      psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, old, {}, o);
  CHECK(at::equal(on.loss, off.loss));
  CHECK(at::equal(on.logp, old));
  CHECK(on.metrics.ratio_max.item<double>() == 1.0);
  const Grads a = grads_of(on.loss, p);
  const Grads b = grads_of(off.loss, p);
  CHECK(at::equal(a.hidden, b.hidden));
  CHECK(at::equal(a.weight, b.weight));
  CHECK(at::equal(a.bias, b.bias));
  // And from logits.
  const at::Tensor logits =
      at::addmm(p.bias, p.hidden.reshape({-1, 8}), p.weight.t()).reshape({3, 12, 41});
  const psft::LogitsLossResult l =
      psft::psft_loss_from_logits(logits, p.labels, at::Tensor(), {}, o);
  CHECK(l.metrics.ratio_max.item<double>() == 1.0);
  check_close(l.loss, on.loss, 1e-6, 1e-6, "from-logits on-policy loss");
}

// True when the BLAS gives bitwise the same products at 1 and 2 threads for
// the GEMMs of a chunk of `rows` tokens (forward logits, d hidden, d weight).
// MKL on AVX-512 CPUs does not for some shapes: there psft's own code is still
// thread-independent, but its GEMMs are the BLAS's.
bool blas_thread_independent(std::int64_t rows, std::int64_t hidden, std::int64_t vocab) {
  torch::manual_seed(5);
  const at::Tensor h = torch::randn({rows, hidden}), w = torch::randn({vocab, hidden});
  const at::Tensor g = torch::randn({rows, vocab}), b = torch::randn({vocab});
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> out[2];
  for (int k = 0; k < 2; ++k) {
    at::set_num_threads(k == 0 ? 1 : 2);
    at::Tensor gw = torch::randn({vocab, hidden}, torch::kFloat);
    gw.addmm_(g.t(), h, 1);
    out[k] = {at::addmm(b, h, w.t()), at::mm(g, w), gw};
  }
  at::set_num_threads(threads);
  bool same = true;
  for (std::size_t i = 0; i < out[0].size(); ++i) same = same && at::equal(out[0][i], out[1][i]);
  return same;
}

TEST_CASE("results do not depend on the thread count", "[hidden]") {
  const Problem p = make_problem(4, 64, 64, 1000, torch::kFloat, 12);
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> runs[2];
  for (int k = 0; k < 2; ++k) {
    at::set_num_threads(k == 0 ? 1 : 2);
    const psft::LogitsLossResult r =
        psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {}, hidden_options(p, 50));
    const Grads g = grads_of(r.loss, p);
    runs[k] = {r.loss, r.logp, r.entropy, g.hidden, g.weight, g.bias};
  }
  at::set_num_threads(threads);
  // Bitwise where the BLAS is; within float rounding where it is not.
  const bool bitwise = blas_thread_independent(50, 64, 1000);
  if (!bitwise) WARN("this BLAS's GEMMs depend on the thread count: compared to a tolerance");
  for (std::size_t i = 0; i < runs[0].size(); ++i) {
    INFO("output " << i);
    if (bitwise) {
      CHECK(at::equal(runs[0][i], runs[1][i]));
    } else {
      check_close(runs[1][i], runs[0][i], 1e-5, 1e-6, "2 threads against 1");
    }
  }
}

TEST_CASE("empty and fully ignored batches: loss 0 on the graph, zero gradients",
          "[hidden][empty]") {
  Problem p = make_problem(2, 6, 4, 9, torch::kFloat, 2);
  for (const bool empty : {false, true}) {
    at::Tensor hidden = p.hidden, labels = p.labels.fill_(kIgnore), old = p.old;
    if (empty) {
      hidden = torch::randn({0, 6, 4}).requires_grad_(true);
      labels = torch::full({0, 6}, kIgnore, torch::kLong);
      old = torch::zeros({0, 6});
    }
    const psft::LogitsLossResult r =
        psft::psft_loss_from_hidden(hidden, p.weight, labels, old, {}, hidden_options(p, 4));
    CHECK(r.loss.item<double>() == 0.0);
    REQUIRE(r.loss.requires_grad());
    const auto g = torch::autograd::grad({r.loss}, {hidden, p.weight, p.bias});
    for (const at::Tensor& t : g) {
      CHECK(t.isfinite().all().item<bool>());
      CHECK(t.abs().sum().item<double>() == 0.0);
    }
    CHECK(r.metrics.token_count.item<double>() == 0.0);
    const psft::SftLogitsLossResult s = psft::sft_loss_from_hidden(
        hidden, p.weight, labels, psft::SftVariant::Nll, {}, hidden_options(p, 4));
    CHECK(s.loss.item<double>() == 0.0);
  }
}

TEST_CASE("a tied weight used elsewhere accumulates both gradients", "[hidden][tied]") {
  const Problem p = make_problem(2, 5, 6, 13, torch::kDouble, 6, /*with_bias=*/false);
  const at::Tensor ids = torch::randint(0, 13, {2, 5}, torch::kLong);
  // The embedding lookup of the same matrix feeds the hidden state.
  const at::Tensor hidden =
      at::tanh(p.weight.index_select(0, ids.reshape({-1})).reshape({2, 5, 6}));
  const psft::LogitsLossResult r =
      psft::psft_loss_from_hidden(hidden, p.weight, p.labels, p.old, {}, hidden_options(p, 3));
  const at::Tensor got = torch::autograd::grad({r.loss}, {p.weight})[0];
  const at::Tensor w = p.weight.detach().requires_grad_(true);
  const at::Tensor h = at::tanh(w.index_select(0, ids.reshape({-1})).reshape({2, 5, 6}));
  const at::Tensor logits = at::matmul(h, w.t());
  const psft::LogitsLossResult u = psft::psft_loss_from_logits(logits, p.labels, p.old);
  const at::Tensor want = torch::autograd::grad({u.loss}, {w})[0];
  check_close(got, want, 1e-10, 0.0, "tied weight");
}

TEST_CASE("non-contiguous hidden, frozen inputs, grad_output scaling, double backward",
          "[hidden]") {
  const Problem p = make_problem(3, 7, 5, 23, torch::kDouble, 14);
  // [B, T, H] stored as [T, B, H]: not viewable as [N, H].
  const at::Tensor leaf = p.hidden.detach().transpose(0, 1).contiguous().requires_grad_(true);
  const at::Tensor strided = leaf.transpose(0, 1);
  REQUIRE_FALSE(strided.is_contiguous());
  const psft::HiddenOptions o = hidden_options(p, 4);
  const psft::LogitsLossResult a =
      psft::psft_loss_from_hidden(strided, p.weight, p.labels, p.old, {}, o);
  const psft::LogitsLossResult b =
      psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {}, o);
  check_close(a.loss, b.loss, 1e-12, 0.0, "strided loss");
  const at::Tensor ga = torch::autograd::grad({a.loss * 3.0}, {leaf})[0];
  const at::Tensor gb = torch::autograd::grad({b.loss}, {p.hidden})[0];
  check_close(ga.transpose(0, 1), gb * 3.0, 1e-12, 0.0, "strided gradient, grad_output 3");

  // Frozen hidden: gradients reach weight and bias only.
  const at::Tensor frozen = p.hidden.detach();
  const psft::LogitsLossResult f =
      psft::psft_loss_from_hidden(frozen, p.weight, p.labels, p.old, {}, o);
  const auto g = torch::autograd::grad({f.loss}, {p.weight, p.bias});
  const Grads full =
      grads_of(psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {}, o).loss, p);
  CHECK(at::equal(g[0], full.weight));
  CHECK(at::equal(g[1], full.bias));

  // Without grad mode: the value, no graph.
  {
    torch::NoGradGuard no_grad;
    const psft::LogitsLossResult n =
        psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {}, o);
    CHECK_FALSE(n.loss.requires_grad());
    CHECK(at::equal(n.loss, b.loss.detach()));
  }

  // A second backward through the same graph is refused.
  const psft::LogitsLossResult twice =
      psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, {}, o);
  torch::autograd::grad({twice.loss}, {p.weight}, {}, /*retain_graph=*/true);
  CHECK_THROWS_WITH(torch::autograd::grad({twice.loss}, {p.weight}),
                    Catch::Contains("a second time"));
}

TEST_CASE("bad inputs raise c10::Error naming the argument", "[hidden][errors]") {
  const Problem p = make_problem(2, 4, 5, 11, torch::kFloat, 1);
  const psft::HiddenOptions o = hidden_options(p, 0);
  const auto fails = [&](const at::Tensor& h, const at::Tensor& w, const at::Tensor& l,
                         const psft::HiddenOptions& opts, const std::string& needle) {
    INFO(needle);
    CHECK_THROWS_WITH(psft::psft_loss_from_hidden(h, w, l, p.old, {}, opts),
                      Catch::Contains(needle));
    CHECK_THROWS_WITH(psft::token_logprobs_from_hidden(h, w, l, opts), Catch::Contains(needle));
  };
  fails(p.hidden, torch::randn({11, 4}), p.labels, o, "weight must be the LM head's [V, H]");
  fails(p.hidden, p.weight.to(torch::kDouble), p.labels, o, "weight is Double but hidden is Float");
  fails(p.hidden.to(torch::kLong), p.weight, p.labels, o, "hidden must be float64");
  fails(p.hidden.reshape({-1}), p.weight, p.labels, o, "hidden must have shape");
  fails(p.hidden, p.weight, p.labels.to(torch::kInt), o, "labels must be int64");
  CHECK_THROWS_WITH(psft::token_logprobs_from_hidden(p.hidden, p.weight, p.labels.reshape({-1}), o),
                    Catch::Contains("labels must have hidden's shape"));
  fails(p.hidden, p.weight, torch::full({2, 4}, 11, torch::kLong), o, "labels must be in [0, 11)");
  psft::HiddenOptions bad = o;
  bad.bias = torch::randn({10});
  fails(p.hidden, p.weight, p.labels, bad, "bias must have weight's rows, [11]");
  bad = o;
  bad.bias = torch::randn({11}, torch::kDouble);
  fails(p.hidden, p.weight, p.labels, bad, "bias is Double but weight is Float");
  bad = o;
  bad.chunk_tokens = -1;
  fails(p.hidden, p.weight, p.labels, bad, "chunk_tokens must be >= 0");
  bad = o;
  bad.chunk_bytes = 0;
  fails(p.hidden, p.weight, p.labels, bad, "chunk_bytes must be > 0");
  bad = o;
  bad.temperature = 0.0;
  fails(p.hidden, p.weight, p.labels, bad, "temperature");
  // A NaN in hidden reaches the logits: the chunk is named.
  const at::Tensor nan_hidden = p.hidden.detach().clone();
  nan_hidden.view({-1})[7] = std::numeric_limits<float>::quiet_NaN();
  at::Tensor labels = p.labels.clone();
  labels.fill_(3);
  CHECK_THROWS_WITH(
      psft::token_logprobs_from_hidden(nan_hidden, p.weight, labels, o),
      Catch::Contains("logits has a NaN or +inf entry") && Catch::Contains("hidden @ weight^T"));
  CHECK_THROWS_WITH(
      psft::policy_loss_from_hidden(p.hidden, p.weight, p.labels, p.old, at::Tensor(), {}, o),
      Catch::Contains("advantages is an undefined tensor"));
  CHECK_THROWS_WITH(
      psft::psft_loss_from_hidden(p.hidden, p.weight, p.labels, torch::zeros({3}), {}, o),
      Catch::Contains("old_logp must have labels' shape"));
}
