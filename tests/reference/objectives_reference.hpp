#pragma once
// Independent double-precision references of the objectives after PSFT
// (CISPO, SAPO, the sequence-level ratio of GSPO) and of the KL penalty, for
// tests only. Each restates its peer's definition (verl 0.9.1 core_algos.py,
// TRL 1.16 GRPOTrainer._compute_loss) per token with plain doubles, and the
// gradient by torch autograd's rules for that expression; the aggregation is
// clipped_reference.hpp's. No psft header is included.

#include <cmath>
#include <cstddef>
#include <vector>

#include "reference/clipped_reference.hpp"

namespace reference {

enum class Variant { Clipped, CispoRelative, CispoCapped, Sapo };

struct VariantSettings {
  Variant variant = Variant::Clipped;
  double cispo_cap = 5.0;  ///< TRL's epsilon_high for cispo
  double tau_pos = 1.0, tau_neg = 1.05;
  bool sequence_level = false;  ///< GSPO: every token uses its sequence's mean log-ratio
};

/// One token of `v` from the log-ratio d it uses (token or sequence level),
/// its logp and advantage.
inline Token variant_token(double d, double logp, double advantage, const Settings& s,
                           const VariantSettings& v) {
  if (v.variant == Variant::Clipped) return evaluate_token_from_log_ratio(d, advantage, s);
  const double bound = s.log_ratio_clamp;
  const double dc = d < -bound ? -bound : (d > bound ? bound : d);
  const bool clamp_passes = d > -bound && d < bound;
  const double r = std::exp(dc);
  const double lo = 1.0 - s.eps_low, hi = 1.0 + s.eps_high;
  Token t;
  t.clamped_log_ratio = dc;
  t.ratio = r;
  t.high_clip = r > hi && advantage > 0;
  t.low_clip = r < lo && advantage < 0;
  switch (v.variant) {
    case Variant::CispoRelative: {  // verl: -clamp(r, lo, hi).detach() * A * logp
      const double w = r < lo ? lo : (r > hi ? hi : r);
      t.loss = -w * advantage * logp;
      t.grad = -w * advantage;
      t.ppo_clip = r != w;
      t.trusted = true;
      break;
    }
    case Variant::CispoCapped: {  // TRL: -clamp(r, max=eps_high).detach() * A * logp
      const double w = r > v.cispo_cap ? v.cispo_cap : r;
      t.loss = -w * advantage * logp;
      t.grad = -w * advantage;
      t.ppo_clip = r > v.cispo_cap && advantage > 0;
      t.trusted = true;
      break;
    }
    case Variant::Sapo: {  // -sigmoid(tau (r - 1)) * 4 / tau * A
      const double tau = advantage > 0 ? v.tau_pos : v.tau_neg;
      const double g = 1.0 / (1.0 + std::exp(-tau * (r - 1.0)));
      t.loss = -g * 4.0 / tau * advantage;
      // d/dr = -A (4 / tau) g (1 - g) tau; dr/dd = r where the clamp passes.
      t.grad = clamp_passes ? -advantage * 4.0 * g * (1.0 - g) * r : 0.0;
      t.ppo_clip = false;
      t.trusted = clamp_passes;
      break;
    }
    case Variant::Clipped:
      break;
  }
  return t;
}

/// The aggregated loss of `v` over a [rows, cols] batch.
inline Result variant_loss(std::size_t rows, std::size_t cols, const std::vector<double>& logp,
                           const std::vector<double>& old_logp,
                           const std::vector<double>& advantages, const std::vector<double>& mask,
                           const Settings& s, const VariantSettings& v) {
  std::vector<double> sequence_log_ratio(rows, 0.0);
  if (v.sequence_level) {  // verl gspo: sum(d * mask) / clamp(sum(mask), min=1)
    for (std::size_t i = 0; i < rows; ++i) {
      double sum = 0, weight = 0;
      for (std::size_t j = 0; j < cols; ++j) {
        const std::size_t k = i * cols + j;
        if (mask[k] == 0) continue;
        sum += (logp[k] - old_logp[k]) * mask[k];
        weight += mask[k];
      }
      sequence_log_ratio[i] = sum / (weight < 1 ? 1.0 : weight);
    }
  }
  return aggregate(rows, cols, mask, s, [&](std::size_t k) {
    const double d = v.sequence_level ? sequence_log_ratio[k / cols] : logp[k] - old_logp[k];
    return variant_token(d, logp[k], advantages[k], s, v);
  });
}

enum class KlKind { K1, Abs, K2, K3, K3Unclamped, K1Plus, AbsPlus, K3Plus };

/// verl's kl_penalty(logprob, ref_logprob, kind) and its autograd gradient
/// with respect to logprob (TRL's beta term for K3Unclamped).
inline Token kl_token(double logp, double ref_logp, KlKind kind) {
  const double x = logp - ref_logp;
  Token t;
  t.trusted = true;
  switch (kind) {
    case KlKind::K1:
    case KlKind::K1Plus:
      t.loss = x;
      t.grad = 1.0;
      break;
    case KlKind::Abs:
    case KlKind::AbsPlus:
      t.loss = std::fabs(x);
      t.grad = x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0);
      break;
    case KlKind::K2:
      t.loss = 0.5 * x * x;
      t.grad = x;
      break;
    case KlKind::K3:
    case KlKind::K3Plus: {
      const double kl_raw = ref_logp - logp;
      const double kl = kl_raw < -20 ? -20 : (kl_raw > 20 ? 20 : kl_raw);
      const double kld = std::exp(kl) - kl - 1.0;
      t.loss = kld < -10 ? -10 : (kld > 10 ? 10 : kld);
      const bool passes = kl_raw > -20 && kl_raw < 20 && kld > -10 && kld < 10;
      t.grad = passes ? -(std::exp(kl) - 1.0) : 0.0;
      break;
    }
    case KlKind::K3Unclamped: {
      const double e = std::exp(ref_logp - logp);
      t.loss = e - (ref_logp - logp) - 1.0;
      t.grad = 1.0 - e;
      break;
    }
  }
  if (kind == KlKind::K1Plus || kind == KlKind::AbsPlus || kind == KlKind::K3Plus) t.grad = x;
  const double dc = x < -20 ? -20 : (x > 20 ? 20 : x);
  t.clamped_log_ratio = dc;
  t.ratio = std::exp(dc);
  return t;
}

/// The aggregated KL penalty and the mean of the estimator.
struct KlResult {
  Result aggregated;
  double kl_mean = 0;
};

inline KlResult kl_loss(std::size_t rows, std::size_t cols, const std::vector<double>& logp,
                        const std::vector<double>& ref_logp, const std::vector<double>& mask,
                        const Settings& s, KlKind kind) {
  KlResult out;
  out.aggregated = aggregate(rows, cols, mask, s,
                             [&](std::size_t k) { return kl_token(logp[k], ref_logp[k], kind); });
  double sum = 0, weight = 0;
  for (std::size_t k = 0; k < rows * cols; ++k) {
    if (mask[k] == 0) continue;
    sum += mask[k] * kl_token(logp[k], ref_logp[k], kind).loss;
    weight += mask[k];
  }
  out.kl_mean = weight > 0 ? sum / weight : 0.0;
  return out;
}

}  // namespace reference
