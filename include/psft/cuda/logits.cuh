#pragma once
/// \file
/// CUDA kernels of token_logprobs: one block per token row computes the
/// row's maximum, sum-exp and sum p z in one pass (Note [Logits hot loop]),
/// merged across threads in a fixed tree order, and the label's
/// log-probability and entropy; the backward kernel writes d/dlogits in the
/// logits' dtype. Both read the logits 16 bytes at a time where they can
/// (Note [Logits loads]). Rows whose label is ignore_index are not read.
/// Torch-free; psft_cuda.cu wraps them (Note [Logits backends mirror core]).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "psft/core/config.hpp"
#include "psft/core/online_softmax.hpp"
#include "psft/cuda/clipped_loss.cuh"

PSFT_NAMESPACE_BEGIN
namespace cuda {

/// Threads per row of the logits kernels (a power of two).
constexpr int kLogitsThreads = 256;

/// Blocks per SM the logits kernels are compiled for: eight (32 registers,
/// every thread slot of an SM) in float; in double, as the compiler likes.
template <class acc_t>
constexpr int kLogitsBlocksPerSM = sizeof(acc_t) == 4 ? 8 : 1;

/// Row flags of the forward kernel's status output.
enum : unsigned char { kRowNonFinite = 1, kRowAllNegInf = 2, kRowBadLabel = 4 };

/// [rows, vocab] logits with stride 1 along the vocabulary (cpu::LogitsRows).
struct DeviceLogits {
  const void* data = nullptr;
  DeviceDtype dtype = DeviceDtype::Float;
  std::int64_t rows = 0, vocab = 0;
  std::int64_t inner_size = 1, outer_stride = 0, inner_stride = 0;
  __device__ std::int64_t offset(std::int64_t row) const {
    return (row / inner_size) * outer_stride + (row % inner_size) * inner_stride;
  }
};

template <class acc_t>
struct LogitsForwardParams {
  DeviceLogits logits;
  const std::int64_t* labels;
  std::int64_t ignore_index;
  acc_t inv_temperature;
  acc_t* logp;
  acc_t* entropy;
  acc_t* stats;           ///< [rows, 3] or null (Note [Logits stats])
  unsigned char* status;  ///< [rows], every entry written
};

// Note [Logits loads]
// The kernels are compiled for the logits' element type (float, double,
// __nv_bfloat16, __half). Thread t of a row's block owns the groups of
// kLogitsVector<in_t> consecutive entries (16 bytes) starting at column
// (t + k * kLogitsThreads) * kLogitsVector<in_t>. In a row that starts
// 16-byte aligned, the full groups are read with one 16-byte load each (and
// the gradient written with one 16-byte store) in a loop of their own; the
// row's last, partial group and every group of an unaligned row are read
// entry by entry, missing entries reading as -inf (probability 0). The
// thread a given entry belongs to, and every operation on it, depend only on
// the column, not on the row's alignment, so aligned and unaligned copies of
// the same logits give bit-identical results.

// Note [Logits hot loop]
// Per 16-byte group the forward takes the group's maximum, rescales the
// thread's sums once if the maximum grew, and adds the group's terms
// branch-free with one exp2 each, on logits pre-scaled by
// c = log2(e) / temperature:
//
//   y = z - m (exact where it matters: Sterbenz), t = c y, e = 2^t,
//   S += e,  A2 += e max(t, lowest)        (A = A2 ln 2 = sum e^y' y')
//
// The temperature never touches a logit (it is folded into c), the running
// maximum m starts at the lowest finite value instead of -inf (so no
// -inf - -inf), and max(t, lowest) keeps a -inf logit's 0 * -inf out of A.
// NaN and +inf are not tested per entry: they make S NaN (t = NaN, or
// inf - inf once m = +inf), which the row's result shows once
// (Exp2Softmax::invalid). On the device 2^t is ex2.approx.ftz (relative
// error below 2^-22, terms under 2^-126 flushed to 0 instead of the -80
// cutoff of Note [Softmax cutoff]: the same zero probability for -inf and a
// difference far below float resolution for the rest). Maxima near +-1e38
// can overflow the rescale and report the row as non-finite.

/// Entries per 16-byte group.
template <class in_t>
constexpr int kLogitsVector = static_cast<int>(16 / sizeof(in_t));

/// One logit as the accumulation type.
template <class acc_t>
__device__ inline acc_t logit_value(float z) {
  return static_cast<acc_t>(z);
}
template <class acc_t>
__device__ inline acc_t logit_value(double z) {
  return static_cast<acc_t>(z);
}
template <class acc_t>
__device__ inline acc_t logit_value(__nv_bfloat16 z) {
  return static_cast<acc_t>(__bfloat162float(z));
}
template <class acc_t>
__device__ inline acc_t logit_value(__half z) {
  return static_cast<acc_t>(__half2float(z));
}

/// Reads a full group of an aligned row with one 16-byte load (__ldg, so
/// that the compiler keeps it one load: see load_aligned).
template <class acc_t>
__device__ inline void load_full_group(const float* p, acc_t (&z)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  z[0] = v.x, z[1] = v.y, z[2] = v.z, z[3] = v.w;
}
template <class acc_t>
__device__ inline void load_full_group(const double* p, acc_t (&z)[2]) {
  const double2 v = __ldg(reinterpret_cast<const double2*>(p));
  z[0] = static_cast<acc_t>(v.x), z[1] = static_cast<acc_t>(v.y);
}
template <class acc_t>
__device__ inline void load_full_group(const __nv_bfloat16* p, acc_t (&z)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    z[2 * k] = static_cast<acc_t>(__uint_as_float(words[k] << 16));
    z[2 * k + 1] = static_cast<acc_t>(__uint_as_float(words[k] & 0xffff0000u));
  }
}
template <class acc_t>
__device__ inline void load_full_group(const __half* p, acc_t (&z)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    z[2 * k] =
        static_cast<acc_t>(half_bits_to_float(static_cast<unsigned short>(words[k] & 0xffffu)));
    z[2 * k + 1] =
        static_cast<acc_t>(half_bits_to_float(static_cast<unsigned short>(words[k] >> 16)));
  }
}

/// Reads the n <= kLogitsVector entries of the group at p one by one; the
/// others read as -inf.
template <class in_t, class acc_t>
__device__ inline void load_partial_group(const in_t* p, int n, acc_t (&z)[kLogitsVector<in_t>]) {
#pragma unroll
  for (int k = 0; k < kLogitsVector<in_t>; ++k)
    z[k] = k < n ? logit_value<acc_t>(p[k]) : -Limits<acc_t>::infinity();
}

/// Running softmax statistics of part of a row in raw logits (Note [Logits
/// hot loop]): m = max z, s = sum 2^{c (z - m)}, a2 = sum 2^{c (z - m)} c (z - m)
/// with c = log2(e) / temperature. Empty: m = lowest, s = 0.
template <class acc_t>
struct Exp2Softmax {
  acc_t m, s, a2;

  __device__ void reset() {
    m = Limits<acc_t>::lowest();
    s = acc_t(0);
    a2 = acc_t(0);
  }

  /// Adds one group of kVector logits (missing entries -inf).
  template <int kVector>
  __device__ void add_group(const acc_t (&z)[kVector], acc_t c) {
    acc_t group_max = z[0];
#pragma unroll
    for (int k = 1; k < kVector; ++k) group_max = fmax(group_max, z[k]);
    const acc_t m_new = fmax(m, group_max);
    // Rescale what was summed relative to the old maximum (a no-op, scale 1,
    // when it did not grow).
    const acc_t d = fmax((m - m_new) * c, Limits<acc_t>::lowest());
    const acc_t scale = exp2_fast(d);
    a2 = scale * fma(d, s, a2);
    s = scale * s;
    m = m_new;
#pragma unroll
    for (int k = 0; k < kVector; ++k) {
      const acc_t t = (z[k] - m) * c;
      const acc_t e = exp2_fast(t);
      s += e;
      a2 = fma(e, fmax(t, Limits<acc_t>::lowest()), a2);
    }
  }

  /// Combines another part of the same row (the same c).
  __device__ void merge(const Exp2Softmax& o, acc_t c) {
    const acc_t m_new = fmax(m, o.m);
    const acc_t d_this = fmax((m - m_new) * c, Limits<acc_t>::lowest());
    const acc_t d_other = fmax((o.m - m_new) * c, Limits<acc_t>::lowest());
    const acc_t s_this = exp2_fast(d_this), s_other = exp2_fast(d_other);
    a2 = s_this * fma(d_this, s, a2) + s_other * fma(d_other, o.s, o.a2);
    s = s_this * s + s_other * o.s;
    m = m_new;
  }

  /// A NaN or +inf logit was seen.
  __device__ bool invalid() const { return !(s == s) || m == Limits<acc_t>::infinity(); }
  /// No probability mass: every logit -inf (or none).
  __device__ bool empty() const { return !(s > acc_t(0)); }
};

template <class acc_t>
struct alignas(Exp2Softmax<acc_t>) SoftmaxStorage {
  unsigned char bytes[sizeof(Exp2Softmax<acc_t>) * kLogitsThreads];
  __device__ Exp2Softmax<acc_t>* get() { return reinterpret_cast<Exp2Softmax<acc_t>*>(bytes); }
};

// Note [Logits stats]
// The forward leaves backward three numbers per row: the maximum of the raw
// logits m (before 1 / temperature, so that backward's z - m is exact near
// the maximum), log S and A / S (S, A relative to m / temperature, as in
// core::OnlineSoftmax). These are the CUDA kernels' own; no other backend
// reads them.

/// Forward: in_t is the logits' element type (DeviceLogits::dtype).
template <class in_t, class acc_t>
__global__ void __launch_bounds__(kLogitsThreads, kLogitsBlocksPerSM<acc_t>)
    logits_forward(const LogitsForwardParams<acc_t> p) {
  constexpr int kVector = kLogitsVector<in_t>;
  __shared__ SoftmaxStorage<acc_t> storage;
  const std::int64_t r = blockIdx.x;
  const std::int64_t label = p.labels[r];
  if (label == p.ignore_index) {
    if (threadIdx.x == 0) {
      p.logp[r] = p.entropy[r] = acc_t(0);
      if (p.stats) p.stats[3 * r] = p.stats[3 * r + 1] = p.stats[3 * r + 2] = acc_t(0);
      p.status[r] = 0;
    }
    return;
  }
  const DeviceLogits& l = p.logits;
  const in_t* row = static_cast<const in_t*>(l.data) + l.offset(r);
  const acc_t c = p.inv_temperature * Limits<acc_t>::log2e();
  const std::int64_t step = std::int64_t(kLogitsThreads) * kVector;
  std::int64_t col = std::int64_t(threadIdx.x) * kVector;
  Exp2Softmax<acc_t> mine;
  mine.reset();
  acc_t z[kVector];
  if (aligned16(row)) {
    // The hot loop (Note [Logits hot loop]): full groups, 16-byte loads.
#pragma unroll 2
    for (; col + kVector <= l.vocab; col += step) {
      load_full_group(row + col, z);
      mine.add_group(z, c);
    }
  }
  for (; col < l.vocab; col += step) {
    load_partial_group(row + col,
                       static_cast<int>(l.vocab - col < kVector ? l.vocab - col : kVector), z);
    mine.add_group(z, c);
  }
  Exp2Softmax<acc_t>* shared = storage.get();
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kLogitsThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half)
      shared[threadIdx.x].merge(shared[threadIdx.x + half], c);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Exp2Softmax<acc_t> all = shared[0];
    unsigned char flags = 0;
    if (all.invalid()) {
      flags |= kRowNonFinite;
    } else if (all.empty()) {
      flags |= kRowAllNegInf;
    }
    // Note [Out-of-range labels]: read the nearest entry, report the row.
    const std::int64_t read = core::clamped_label(label, l.vocab);
    if (read != label) flags |= kRowBadLabel;
    using std::log;
    const acc_t log_sum = log(all.s);
    const acc_t mean_shifted = all.a2 * Limits<acc_t>::ln2() / all.s;  // A / S
    // (z_l - m) / T - log S, as core::OnlineSoftmax::log_prob.
    p.logp[r] = (logit_value<acc_t>(row[read]) - all.m) * p.inv_temperature - log_sum;
    p.entropy[r] = log_sum - mean_shifted;
    if (p.stats) {
      p.stats[3 * r] = all.m;
      p.stats[3 * r + 1] = log_sum;
      p.stats[3 * r + 2] = mean_shifted;
    }
    p.status[r] = flags;
  }
}

template <class out_t, class acc_t>
struct LogitsBackwardParams {
  DeviceLogits logits;
  const std::int64_t* labels;
  std::int64_t ignore_index;
  acc_t inv_temperature;
  const acc_t* stats;         ///< the forward's (Note [Logits stats])
  const acc_t* grad_logp;     ///< or null
  const acc_t* grad_entropy;  ///< or null
  out_t* grad;                ///< [rows, vocab] contiguous
};

/// The per-row constants of core::token_logprob_grad, arranged so that an
/// entry costs two fused multiply-adds, an exp2 and a select:
///   p = 2^{c y - log2(e) log S},  y = z - m (raw),
///   grad = p > 0 ? p (k1 y + k0) + onehot : onehot,
///   k1 = -g_H / T^2,  k0 = -(g_logp - g_H A/S) / T,  onehot = g_logp / T
/// which is (onehot - p (g_logp + g_H (y / T - A / S))) / T.
template <class acc_t>
struct GradRow {
  acc_t m, c, bias, k1, k0;

  template <class out_t>
  __device__ out_t entry(acc_t z, acc_t onehot) const {
    const acc_t y = z - m;
    const acc_t prob = exp2_fast(fma(y, c, bias));
    // prob == 0 also keeps -inf logits at an exact zero (core::token_logprob_grad).
    return to_output<out_t>(prob > acc_t(0) ? fma(prob, fma(y, k1, k0), onehot) : onehot);
  }
};

/// Backward: out_t is the logits' element type, which the gradient keeps.
template <class out_t, class acc_t>
__global__ void __launch_bounds__(kLogitsThreads, kLogitsBlocksPerSM<acc_t>)
    logits_backward(const LogitsBackwardParams<out_t, acc_t> p) {
  constexpr int kVector = kLogitsVector<out_t>;
  const std::int64_t r = blockIdx.x;
  const DeviceLogits& l = p.logits;
  out_t* out = p.grad + r * l.vocab;
  const std::int64_t label = p.labels[r];
  const acc_t g = p.grad_logp ? p.grad_logp[r] : acc_t(0);
  const acc_t h = p.grad_entropy ? p.grad_entropy[r] : acc_t(0);
  const std::int64_t first = std::int64_t(threadIdx.x) * kVector;
  const std::int64_t step = std::int64_t(kLogitsThreads) * kVector;
  if (label == p.ignore_index || (g == acc_t(0) && h == acc_t(0))) {
    const bool aligned = aligned16(out);
    out_t zeros[kVector];
    for (int k = 0; k < kVector; ++k) zeros[k] = to_output<out_t>(acc_t(0));
    for (std::int64_t col = first; col < l.vocab; col += step) {
      const int n = static_cast<int>(l.vocab - col < kVector ? l.vocab - col : kVector);
      store_group(out + col, n, aligned, zeros);
    }
    return;
  }
  const out_t* row = static_cast<const out_t*>(l.data) + l.offset(r);
  const acc_t inv_t = p.inv_temperature;
  const acc_t mean = p.stats[3 * r + 2];
  GradRow<acc_t> w;
  w.m = p.stats[3 * r];
  w.c = inv_t * Limits<acc_t>::log2e();
  w.bias = -p.stats[3 * r + 1] * Limits<acc_t>::log2e();
  w.k1 = -h * inv_t * inv_t;
  w.k0 = -(g - h * mean) * inv_t;
  std::int64_t col = first;
  acc_t z[kVector];
  out_t values[kVector];
  if (aligned16(row) && aligned16(out)) {
    // The hot loop: full groups, one 16-byte load and store each.
#pragma unroll 2
    for (; col + kVector <= l.vocab; col += step) {
      load_full_group(row + col, z);
#pragma unroll
      for (int k = 0; k < kVector; ++k) values[k] = w.template entry<out_t>(z[k], acc_t(0));
      store_aligned(out + col, values);
    }
  }
  for (; col < l.vocab; col += step) {
    const int n = static_cast<int>(l.vocab - col < kVector ? l.vocab - col : kVector);
    load_partial_group(row + col, n, z);
#pragma unroll
    for (int k = 0; k < kVector; ++k) values[k] = w.template entry<out_t>(z[k], acc_t(0));
    store_group(out + col, n, false, values);
  }
  // The one-hot term goes where forward read the label (Note [Out-of-range
  // labels]); the thread that wrote that entry above rewrites it.
  const std::int64_t onehot_col = core::clamped_label(label, l.vocab);
  if ((onehot_col / kVector) % kLogitsThreads == threadIdx.x)
    out[onehot_col] = w.template entry<out_t>(logit_value<acc_t>(row[onehot_col]), g * inv_t);
}

}  // namespace cuda
PSFT_NAMESPACE_END
