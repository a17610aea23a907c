#pragma once
/// \file
/// The fused CPU pass of ASFT (psft::asft_loss_from_logits) over a policy row
/// and the reference's row together. Forward: one pass over both rows gives
/// log p of the label, the policy's entropy and KL(pi_ref || pi_theta) over
/// the vocabulary (Note [Anchor KL from row statistics]). Backward: one more
/// pass over both rows writes d loss / d logits. Rows stream through
/// block-sized buffers that stay in L1 (Note [One pass over the logits]); no
/// vocabulary-sized temporary is allocated. Callers have checked shapes,
/// dtypes (logits and ref_logits share one), devices and labels.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/online_softmax.hpp"
#include "psft/cpu/gradient_buffers.hpp"
#include "psft/cpu/logits.hpp"
#include "psft/cpu/logits_kernel.hpp"
#include "psft/cpu/packet_warnings.hpp"

// Note [Packet warnings]
PSFT_PACKET_WARNINGS_PUSH

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// What the anchored forward kernel reports: the policy's rows as
/// token_logprobs_forward reports them, and the first scored row whose
/// reference row has a NaN or +inf entry or is -inf throughout (-1: none).
struct AnchorForwardStatus {
  LogitsForwardStatus policy;           ///< as token_logprobs_forward
  std::int64_t first_bad_ref_row = -1;  ///< a reference row without a softmax
};

namespace kernel_detail {

/// The reference block's softmax statistics and its G (Note [Anchor KL from
/// row statistics]), for n >= 1 entries zq and the policy's zp (both as the
/// kernel converted them). A NaN or +inf in zq makes the sum NaN.
template <class acc_t>
inline core::OnlineSoftmax<acc_t> block_anchor(const acc_t* zp, const acc_t* zq, std::int64_t n,
                                               acc_t& gap) {
  using Packet = typename Vec<acc_t>::Packet;
  constexpr int W = Vec<acc_t>::kWidth;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const std::int64_t full = n - n % W;
  // The tail, padded with -inf references (probability zero) and zero policy logits.
  alignas(64) acc_t tail_q[W];
  alignas(64) acc_t tail_p[W];
  for (int i = 0; i < W; ++i) {
    tail_q[i] = full + i < n ? zq[full + i] : -inf;
    tail_p[i] = full + i < n ? zp[full + i] : acc_t(0);
  }
  Packet vmax = ei::pset1<Packet>(-inf);
  for (std::int64_t i = 0; i < full; i += W) vmax = ei::pmax(vmax, ei::ploadu<Packet>(zq + i));
  if (full < n) vmax = ei::pmax(vmax, ei::ploadu<Packet>(tail_q));
  const acc_t m = ei::predux_max(vmax);
  gap = acc_t(0);
  if (m == -inf) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(zq[i] == -inf)) {
        return core::OnlineSoftmax<acc_t>::from_parts(m, std::numeric_limits<acc_t>::quiet_NaN(),
                                                      acc_t(0));
      }
    }
    return {};
  }
  const Packet pm = ei::pset1<Packet>(m);
  const Packet lo = ei::pset1<Packet>(core::softmax_cutoff<acc_t>());
  Packet sum = ei::pset1<Packet>(acc_t(0));
  Packet weighted = sum, g = sum, check = sum;
  const auto step = [&](const Packet& qp, const Packet& pp) {
    const Packet y = ei::psub(qp, pm);
    check = ei::padd(check, y);
    const Packet y_cut = ei::pmax(y, lo);
    const Packet kept = ei::pcmp_le(lo, y);
    const Packet e = ei::pand(exp_nonpositive<acc_t>(y_cut), kept);
    sum = ei::padd(sum, e);
    weighted = ei::pmadd(e, y_cut, weighted);
    // 0 * inf is NaN where q is cut off and zp is -inf: masked to an exact 0.
    g = ei::padd(g, ei::pand(ei::pmul(e, ei::psub(qp, pp)), kept));
  };
  for (std::int64_t i = 0; i < full; i += W) {
    step(ei::ploadu<Packet>(zq + i), ei::ploadu<Packet>(zp + i));
  }
  if (full < n) step(ei::ploadu<Packet>(tail_q), ei::ploadu<Packet>(tail_p));
  const acc_t c = ei::predux(check);
  if (c != c) {
    return core::OnlineSoftmax<acc_t>::from_parts(m, std::numeric_limits<acc_t>::quiet_NaN(),
                                                  acc_t(0));
  }
  gap = ei::predux(g);
  return core::OnlineSoftmax<acc_t>::from_parts(m, ei::predux(sum), ei::predux(weighted));
}

/// Merges a block's reference statistics and G into the row's (G rescales
/// like S, Note [Anchor KL from row statistics]).
template <class acc_t>
inline void merge_anchor(core::OnlineSoftmax<acc_t>& q, acc_t& gap,
                         const core::OnlineSoftmax<acc_t>& block, acc_t block_gap) {
  if (!q.invalid() && !block.invalid() && !block.empty()) {
    if (q.empty()) {
      gap = block_gap;
    } else {
      const acc_t m = q.max > block.max ? q.max : block.max;
      gap = core::cutoff_exp(q.max - m) * gap + core::cutoff_exp(block.max - m) * block_gap;
    }
  }
  q.merge(block);
}

/// out = cp p + cq q for a block of both rows, p = e^{zp - m_p - log S_p} and
/// q = e^{zq - m_q - log S_q} with the cutoff of Note [Softmax cutoff].
template <class acc_t>
inline void block_anchor_grad(const acc_t* zp, const acc_t* zq, std::int64_t n, acc_t m_p,
                              acc_t ls_p, acc_t m_q, acc_t ls_q, acc_t cp, acc_t cq, acc_t* out) {
  using Packet = typename Vec<acc_t>::Packet;
  constexpr int W = Vec<acc_t>::kWidth;
  const std::int64_t full = n - n % W;
  const Packet shift_p = ei::pset1<Packet>(m_p + ls_p);
  const Packet shift_q = ei::pset1<Packet>(m_q + ls_q);
  const Packet lo = ei::pset1<Packet>(core::softmax_cutoff<acc_t>());
  const Packet pcp = ei::pset1<Packet>(cp);
  const Packet pcq = ei::pset1<Packet>(cq);
  const auto prob = [&](const Packet& z, const Packet& shift) {
    const Packet t = ei::psub(z, shift);
    return ei::pand(exp_nonpositive<acc_t>(ei::pmax(t, lo)), ei::pcmp_le(lo, t));
  };
  const auto step = [&](const Packet& pp, const Packet& qp) {
    return ei::pmadd(pcp, prob(pp, shift_p), ei::pmul(pcq, prob(qp, shift_q)));
  };
  for (std::int64_t i = 0; i < full; i += W) {
    ei::pstoreu(out + i, step(ei::ploadu<Packet>(zp + i), ei::ploadu<Packet>(zq + i)));
  }
  if (full < n) {
    alignas(64) acc_t tail_p[W];
    alignas(64) acc_t tail_q[W];
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    for (int i = 0; i < W; ++i) {
      tail_p[i] = full + i < n ? zp[full + i] : -inf;
      tail_q[i] = full + i < n ? zq[full + i] : -inf;
    }
    ei::pstoreu(tail_p, step(ei::ploadu<Packet>(tail_p), ei::ploadu<Packet>(tail_q)));
    for (std::int64_t i = full; i < n; ++i) out[i] = tail_p[i - full];
  }
}

}  // namespace kernel_detail

/// Forward over every row pair: logp[r] = log p(labels[r]), entropy[r] = H(p)
/// and kl[r] = KL(q || p), p and q the softmaxes of logits and ref (one
/// scalar_t) at the same temperature; when stats is not null,
/// stats[4r..4r+3] = {m_p, log S_p, m_q, log S_q} for backward. Rows whose
/// label is ignore_index are not read (outputs and stats 0). Bad rows and
/// labels are reported as token_logprobs_forward reports them. Results do not
/// depend on the thread count.
template <class scalar_t, class acc_t>
AnchorForwardStatus anchor_kl_forward(const LogitsRows& logits, const LogitsRows& ref,
                                      const std::int64_t* labels, std::int64_t ignore_index,
                                      acc_t inv_temperature, acc_t* logp, acc_t* entropy, acc_t* kl,
                                      acc_t* stats) {
  const bool scaled = inv_temperature != acc_t(1);
  const std::int64_t vocab = logits.vocab;
  const auto* base = static_cast<const scalar_t*>(logits.data);
  const auto* ref_base = static_cast<const scalar_t*>(ref.data);
  constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();
  std::atomic<std::int64_t> first_nonfinite{kNone}, first_all_neg_inf{kNone},
      first_bad_label{kNone}, first_bad_ref{kNone};

  at::parallel_for(
      0, logits.rows, kernel_detail::row_grain(2 * vocab),
      [&](std::int64_t begin, std::int64_t end) {
        alignas(64) acc_t buf_p[kVocabBlock];
        alignas(64) acc_t buf_q[kVocabBlock];
        for (std::int64_t r = begin; r < end; ++r) {
          if (labels[r] == ignore_index) {
            logp[r] = entropy[r] = kl[r] = acc_t(0);
            if (stats) std::fill(stats + 4 * r, stats + 4 * r + 4, acc_t(0));
            continue;
          }
          const scalar_t* x = base + logits.offset(r);
          const scalar_t* xq = ref_base + ref.offset(r);
          core::OnlineSoftmax<acc_t> p, q;
          acc_t gap = acc_t(0);
          for (std::int64_t col = 0; col < vocab; col += kVocabBlock) {
            const std::int64_t n = std::min(kVocabBlock, vocab - col);
            const acc_t* zp = kernel_detail::load_block(x + col, n, inv_temperature, scaled, buf_p);
            const acc_t* zq =
                kernel_detail::load_block(xq + col, n, inv_temperature, scaled, buf_q);
            p.merge(kernel_detail::block_softmax(zp, n));
            acc_t block_gap;
            const core::OnlineSoftmax<acc_t> qb = kernel_detail::block_anchor(zp, zq, n, block_gap);
            kernel_detail::merge_anchor(q, gap, qb, block_gap);
          }
          if (p.invalid()) kernel_detail::atomic_min(first_nonfinite, r);
          if (p.empty()) kernel_detail::atomic_min(first_all_neg_inf, r);
          if (q.invalid() || q.empty()) kernel_detail::atomic_min(first_bad_ref, r);
          const std::int64_t label = core::clamped_label(labels[r], vocab);
          if (label != labels[r]) kernel_detail::atomic_min(first_bad_label, r);
          logp[r] = p.log_prob(kernel_detail::label_logit(x, label, inv_temperature, scaled));
          entropy[r] = p.entropy();
          kl[r] = core::anchor_kl(p, q, gap);
          if (stats) {
            stats[4 * r] = p.max;
            stats[4 * r + 1] = p.log_sum();
            stats[4 * r + 2] = q.max;
            stats[4 * r + 3] = q.log_sum();
          }
        }
      });

  AnchorForwardStatus status;
  const auto row = [&](const std::atomic<std::int64_t>& a) {
    return a.load() != kNone ? a.load() : std::int64_t(-1);
  };
  status.policy.first_nonfinite_row = row(first_nonfinite);
  status.policy.first_all_neg_inf_row = row(first_all_neg_inf);
  status.policy.first_bad_label_row = row(first_bad_label);
  status.first_bad_ref_row = row(first_bad_ref);
  return status;
}

/// Backward over every row pair: grad[r, :] = d(g_r log p_r + k_r KL_r) /
/// d logits with g = grad_logp and k = grad_kl (either may be null: zero), in
/// scalar_t to a contiguous [rows, vocab] buffer. Rows whose label is
/// ignore_index, or whose g and k are both zero, become zero rows without
/// reading the logits. stats comes from anchor_kl_forward.
template <class scalar_t, class acc_t>
void anchor_kl_backward(const LogitsRows& logits, const LogitsRows& ref, const std::int64_t* labels,
                        std::int64_t ignore_index, acc_t inv_temperature, const acc_t* stats,
                        const acc_t* grad_logp, const acc_t* grad_kl, scalar_t* grad) {
  const bool scaled = inv_temperature != acc_t(1);
  const std::int64_t vocab = logits.vocab;
  const auto* base = static_cast<const scalar_t*>(logits.data);
  const auto* ref_base = static_cast<const scalar_t*>(ref.data);

  at::parallel_for(
      0, logits.rows, kernel_detail::row_grain(2 * vocab),
      [&](std::int64_t begin, std::int64_t end) {
        alignas(64) acc_t buf_p[kVocabBlock];
        alignas(64) acc_t buf_q[kVocabBlock];
        alignas(64) acc_t out_buf[kVocabBlock];
        for (std::int64_t r = begin; r < end; ++r) {
          scalar_t* out = grad + r * vocab;
          const acc_t g = grad_logp ? grad_logp[r] : acc_t(0);
          const acc_t k = grad_kl ? grad_kl[r] : acc_t(0);
          if (labels[r] == ignore_index || (g == acc_t(0) && k == acc_t(0))) {
            std::memset(static_cast<void*>(out), 0,
                        static_cast<std::size_t>(vocab) * sizeof(scalar_t));
            continue;
          }
          const scalar_t* x = base + logits.offset(r);
          const scalar_t* xq = ref_base + ref.offset(r);
          const acc_t* s = stats + 4 * r;
          const acc_t cp = (k - g) * inv_temperature, cq = -k * inv_temperature;
          for (std::int64_t col = 0; col < vocab; col += kVocabBlock) {
            const std::int64_t n = std::min(kVocabBlock, vocab - col);
            const acc_t* zp = kernel_detail::load_block(x + col, n, inv_temperature, scaled, buf_p);
            const acc_t* zq =
                kernel_detail::load_block(xq + col, n, inv_temperature, scaled, buf_q);
            if constexpr (std::is_same<scalar_t, acc_t>::value) {
              kernel_detail::block_anchor_grad(zp, zq, n, s[0], s[1], s[2], s[3], cp, cq,
                                               out + col);
            } else {
              kernel_detail::block_anchor_grad(zp, zq, n, s[0], s[1], s[2], s[3], cp, cq, out_buf);
              kernel_detail::store_block(out_buf, n, out + col);
            }
          }
          // The label's entry also gets the one-hot term (clamped as forward read it).
          const std::int64_t label = core::clamped_label(labels[r], vocab);
          const acc_t zp_label = kernel_detail::label_logit(x, label, inv_temperature, scaled);
          const acc_t zq_label = kernel_detail::label_logit(xq, label, inv_temperature, scaled);
          out[label] = static_cast<scalar_t>(
              inv_temperature * core::anchor_logprob_grad(core::cutoff_exp(zp_label - s[0] - s[1]),
                                                          core::cutoff_exp(zq_label - s[2] - s[3]),
                                                          true, g, k));
        }
      });
}

/// Forward on tensors: logits and ref [B, T, V] or [N, V] of one dtype with
/// a last dimension of stride 1; labels contiguous int64; logp, entropy and kl
/// contiguous in the accumulation dtype; stats [N, 4] or undefined. Raises
/// c10::Error (prefixed by api) as token_logprobs_forward does, and for a
/// reference row with a NaN or +inf entry or -inf throughout, when
/// opts.check_inputs.
inline void anchor_kl_forward(const char* api, const at::Tensor& logits, const at::Tensor& ref,
                              const at::Tensor& labels, const LogitsOptions& opts,
                              const at::Tensor& logp, const at::Tensor& entropy,
                              const at::Tensor& kl, const at::Tensor& stats) {
  const LogitsRows rows = logits_rows(logits);
  if (rows.rows == 0) return;
  const LogitsRows ref_rows = logits_rows(ref);
  const std::int64_t* label_data = labels.data_ptr<std::int64_t>();
  AnchorForwardStatus status;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "psft_anchor_kl_forward", [&] {
        using acc_t =
            typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        status = anchor_kl_forward<scalar_t, acc_t>(
            rows, ref_rows, label_data, opts.ignore_index,
            static_cast<acc_t>(1.0 / opts.temperature), logp.data_ptr<acc_t>(),
            entropy.data_ptr<acc_t>(), kl.data_ptr<acc_t>(),
            stats.defined() ? stats.data_ptr<acc_t>() : nullptr);
      });
  check_forward_status(api, status.policy, rows.vocab, opts);
  TORCH_CHECK(!opts.check_inputs || status.first_bad_ref_row < 0, api, ": ref_logits at token ",
              status.first_bad_ref_row,
              " has a NaN or +inf entry or is -inf over the whole vocabulary (flat index over "
              "the leading dimensions; rows whose label is ignore_index are not read)");
}

/// Backward on tensors: d(sum grad_logp logp + grad_kl kl) / d logits, in
/// logits' dtype and shape (contiguous). grad_logp and grad_kl are contiguous
/// in the accumulation dtype, or undefined (zero).
inline at::Tensor anchor_kl_backward(const at::Tensor& logits, const at::Tensor& ref,
                                     const at::Tensor& labels, const at::Tensor& stats,
                                     const at::Tensor& grad_logp, const at::Tensor& grad_kl,
                                     const LogitsOptions& opts) {
  at::Tensor grad = empty_gradient(logits.sizes(), logits.options());  // Note [Gradient buffers]
  const LogitsRows rows = logits_rows(logits);
  if (rows.rows == 0 || rows.vocab == 0) return grad;
  const LogitsRows ref_rows = logits_rows(ref);
  const std::int64_t* label_data = labels.data_ptr<std::int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "psft_anchor_kl_backward", [&] {
        using acc_t =
            typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        anchor_kl_backward<scalar_t, acc_t>(
            rows, ref_rows, label_data, opts.ignore_index,
            static_cast<acc_t>(1.0 / opts.temperature), stats.data_ptr<acc_t>(),
            grad_logp.defined() ? grad_logp.data_ptr<acc_t>() : nullptr,
            grad_kl.defined() ? grad_kl.data_ptr<acc_t>() : nullptr, grad.data_ptr<scalar_t>());
      });
  return grad;
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
