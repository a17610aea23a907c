#pragma once
/// \file
/// Softmax statistics of one row of logits, accumulated online (one pass,
/// any order of blocks) and merged exactly: the one place the math of
/// token log-probabilities and entropy lives. The CPU kernel (vectorised),
/// the composed backend (ATen ops) and the CUDA kernels restate it; see
/// Note [Logits backends mirror core]. Torch-free, Eigen-free, host and
/// device.
///
/// For a row of logits z (already divided by the temperature), m = max z,
/// y_j = z_j - m and p = softmax(z):
///
///   S   = sum_j e^{y_j}            A = sum_j e^{y_j} y_j
///   lse = m + log S                log p_l = y_l - log S
///   H   = lse - sum_j p_j z_j = log S - A / S
///   d log p_l / d z_j = [j == l] - p_j
///   d H / d z_j       = -p_j (y_j - A / S)
///
/// Working relative to the running maximum keeps every exponent <= 0 (no
/// overflow) and gives H without the cancellation of lse - sum p z at large
/// logits (|z| ~ 1e4).

#include <cmath>
#include <cstdint>
#include <limits>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

// Note [Logits backends mirror core]
// cpu/logits_kernel.hpp computes OnlineSoftmax block by block with Eigen
// packets, composed/logits.hpp with ATen ops and the CUDA kernels per warp.
// They must agree with this file: same shift by the row maximum, same
// softmax cutoff, same formulas for log p, H and the gradient. A change here
// must be made there too; the tests run every backend against an
// independent double-precision reference, so a drift fails them.

// Note [Softmax cutoff]
// Terms with z_j - m below a cutoff (-80 for float, -700 for double) are
// treated as exactly zero probability. Their true weight, below e^-80 ~
// 1.8e-35 relative to the largest term, is far under float's resolution, and
// dropping them (a) gives -inf logits (masked vocabulary entries) an exact
// zero probability and an exact zero gradient instead of 0 * -inf = NaN, and
// (b) keeps exp() out of the subnormal range, where some CPUs slow down by
// two orders of magnitude.

/// Exponents below this count as probability zero (Note [Softmax cutoff]).
template <class T>
PSFT_HOST_DEVICE constexpr T softmax_cutoff() {
  return sizeof(T) >= sizeof(double) ? T(-700) : T(-80);
}

/// e^x for x <= 0, or 0 below the cutoff (Note [Softmax cutoff]).
template <class T>
PSFT_HOST_DEVICE inline T cutoff_exp(T x) {
  using std::exp;
  return x >= softmax_cutoff<T>() ? exp(x) : T(0);
}

/// Running softmax statistics of (part of) a row: max, S and A relative to
/// that max. A default-constructed value is the empty row. A NaN or +inf
/// logit poisons the state (sum becomes NaN, invalid() turns true) so that a
/// kernel can report it after the pass instead of checking every element.
template <class T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();  ///< m
  T sum = T(0);                                 ///< S = sum e^{z - m}
  T weighted = T(0);                            ///< A = sum e^{z - m} (z - m)

  /// The statistics of a block that was reduced elsewhere (for example with
  /// vector instructions): its max, and S and A relative to that max.
  PSFT_HOST_DEVICE static OnlineSoftmax from_parts(T block_max, T block_sum, T block_weighted) {
    OnlineSoftmax s;
    s.max = block_max;
    s.sum = block_sum;
    s.weighted = block_weighted;
    return s;
  }

  /// True for a row (part) with no probability mass yet: no element seen,
  /// or every element -inf.
  PSFT_HOST_DEVICE bool empty() const { return !(sum > T(0)); }
  /// True once a NaN or +inf logit was seen.
  PSFT_HOST_DEVICE bool invalid() const { return sum != sum; }

  /// Adds one logit.
  PSFT_HOST_DEVICE void add(T z) {
    const T inf = std::numeric_limits<T>::infinity();
    if (invalid()) return;
    if (z != z || z == inf) {
      sum = std::numeric_limits<T>::quiet_NaN();
      return;
    }
    if (z == -inf) return;
    if (empty()) {
      max = z;
      sum = T(1);
      weighted = T(0);
      return;
    }
    if (z <= max) {
      const T y = z - max;
      const T e = cutoff_exp(y);
      sum += e;
      weighted += e * y;  // y is finite here, so a cut-off term adds exactly 0
    } else {
      // New maximum: rescale what was accumulated relative to the old one.
      const T d = max - z;
      const T scale = cutoff_exp(d);
      weighted = scale * (weighted + d * sum);
      sum = scale * sum + T(1);
      max = z;
    }
  }

  /// Combines the statistics of another part of the same row. Exact up to
  /// rounding and independent of which part came first, up to rounding.
  PSFT_HOST_DEVICE void merge(const OnlineSoftmax& other) {
    if (invalid()) return;
    if (other.invalid()) {
      sum = other.sum;
      return;
    }
    if (other.empty()) return;
    if (empty()) {
      *this = other;
      return;
    }
    const T m = max > other.max ? max : other.max;
    const T d_this = max - m, d_other = other.max - m;  // one of them is 0
    const T s_this = cutoff_exp(d_this), s_other = cutoff_exp(d_other);
    weighted =
        s_this * (weighted + d_this * sum) + s_other * (other.weighted + d_other * other.sum);
    sum = s_this * sum + s_other * other.sum;
    max = m;
  }

  /// log S, the log-sum-exp relative to max.
  PSFT_HOST_DEVICE T log_sum() const {
    using std::log;
    return log(sum);
  }
  /// log sum_j e^{z_j}.
  PSFT_HOST_DEVICE T logsumexp() const { return max + log_sum(); }
  /// A / S = E_p[z] - m, the mean shifted logit under the softmax.
  PSFT_HOST_DEVICE T mean_shifted() const { return weighted / sum; }
  /// Entropy H = log S - A / S of the softmax, in nats.
  PSFT_HOST_DEVICE T entropy() const { return log_sum() - mean_shifted(); }
  /// log p of the entry whose logit is z: (z - m) - log S. -inf for z = -inf.
  PSFT_HOST_DEVICE T log_prob(T z) const { return (z - max) - log_sum(); }
};

/// d/dz_j of (grad_logp * log p_l + grad_entropy * H) for one entry of a row,
/// given its shifted logit y = z_j - m, whether j is the label l, and the
/// row's log S and A / S (OnlineSoftmax::log_sum and mean_shifted). The
/// caller multiplies by 1 / temperature (dz/dlogit).
template <class T>
PSFT_HOST_DEVICE inline T token_logprob_grad(T y, bool is_label, T log_sum, T mean_shifted,
                                             T grad_logp, T grad_entropy) {
  const T p = cutoff_exp(y - log_sum);
  const T onehot = is_label ? grad_logp : T(0);
  if (!(p > T(0))) return onehot;  // also keeps -inf logits at an exact zero
  return onehot - p * (grad_logp + grad_entropy * (y - mean_shifted));
}

// Note [Anchor KL from row statistics]
// KL(q || p) of the softmaxes of two rows zq (the reference) and zp (the
// policy), p = softmax(zp), q = softmax(zq), is
//   sum_v q_v (log q_v - log p_v) = E_q[zq - zp] - logsumexp(zq) + logsumexp(zp),
// so one pass over both rows needs the two rows' OnlineSoftmax statistics and
// G = sum_v e^{zq_v - m_q} (zq_v - zp_v) relative to q's max, with q's cutoff
// (Note [Softmax cutoff]): a reference entry of probability zero adds exactly
// 0, even where zp_v is -inf. G of blocks merges like S. A policy entry of -inf
// where q has mass makes G and the KL +inf, as the true KL is.

/// KL(q || p) from the statistics of p's row, q's row and q's G (Note [Anchor
/// KL from row statistics]).
template <class T>
PSFT_HOST_DEVICE inline T anchor_kl(const OnlineSoftmax<T>& p, const OnlineSoftmax<T>& q, T gap) {
  return gap / q.sum - q.logsumexp() + p.logsumexp();
}

/// d KL(q || p) / dzp_v = p_v - q_v and d log p_l / dzp_v = [v = l] - p_v, so
/// d(grad_logp log p_l + grad_kl KL) / dzp_v for p_v, q_v and whether v is the
/// label l. The caller multiplies by 1 / temperature.
template <class T>
PSFT_HOST_DEVICE inline T anchor_logprob_grad(T p, T q, bool is_label, T grad_logp, T grad_kl) {
  return (grad_kl - grad_logp) * p - grad_kl * q + (is_label ? grad_logp : T(0));
}

// Note [Out-of-range labels]
// With LogitsOptions::check_inputs off, nothing stops a label outside
// [0, V). Every backend then reads (and in backward writes the one-hot term
// of) the nearest entry of the row, never memory outside it, and reports the
// row, so that no option can make psft access memory out of bounds.

/// The column a scored row's label reads: the label itself when it is in
/// [0, vocab), else the nearest end of the row (Note [Out-of-range labels]).
/// vocab >= 1.
PSFT_HOST_DEVICE inline std::int64_t clamped_label(std::int64_t label, std::int64_t vocab) {
  return label < 0 ? 0 : (label >= vocab ? vocab - 1 : label);
}

}  // namespace core
PSFT_NAMESPACE_END
