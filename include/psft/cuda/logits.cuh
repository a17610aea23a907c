#pragma once
/// \file
/// CUDA kernels of token_logprobs: one block per token row computes the
/// online max, sum-exp and sum p z of the row (core::OnlineSoftmax, merged
/// across threads in a fixed tree order) and the label's log-probability and
/// entropy; the backward kernel writes d/dlogits in the logits' dtype with
/// core::token_logprob_grad. Both read the logits 16 bytes at a time where
/// they can (Note [Logits loads]). Rows whose label is ignore_index are not
/// read.
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
  acc_t* stats;           ///< [rows, 3] or null
  unsigned char* status;  ///< [rows]
};

// Note [Logits loads]
// The kernels are compiled for the logits' element type (float, double,
// __nv_bfloat16, __half). Thread t of a row's block owns the groups of
// kLogitsVector<in_t> consecutive entries (16 bytes) starting at column
// (t + k * kLogitsThreads) * kLogitsVector<in_t>. A full group of a row that
// starts 16-byte aligned is read with one 16-byte load (and the gradient
// written with one 16-byte store); other groups element by element. The
// thread a given entry belongs to, and so the order of every sum, depends
// only on the column, not on the row's alignment.

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

/// Reads the group at `col` of a row (Note [Logits loads]) into z[0..n),
/// scaled by 1 / temperature as every backend does it; returns n.
template <class in_t, class acc_t>
__device__ inline int load_logits(const in_t* row, std::int64_t col, std::int64_t vocab,
                                  bool aligned, acc_t inv_temperature,
                                  acc_t (&z)[kLogitsVector<in_t>]) {
  constexpr int kVector = kLogitsVector<in_t>;
  const int n = static_cast<int>(vocab - col < kVector ? vocab - col : kVector);
  if (aligned && n == kVector) {
    const uint4 bits = *reinterpret_cast<const uint4*>(row + col);
    in_t values[kVector];
    memcpy(static_cast<void*>(values), &bits, sizeof bits);
#pragma unroll
    for (int k = 0; k < kVector; ++k) z[k] = logit_value<acc_t>(values[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVector; ++k)
      if (k < n) z[k] = logit_value<acc_t>(row[col + k]);
  }
  if (inv_temperature != acc_t(1)) {
#pragma unroll
    for (int k = 0; k < kVector; ++k)
      if (k < n) z[k] *= inv_temperature;
  }
  return n;
}

template <class acc_t>
struct alignas(core::OnlineSoftmax<acc_t>) SoftmaxStorage {
  unsigned char bytes[sizeof(core::OnlineSoftmax<acc_t>) * kLogitsThreads];
  __device__ core::OnlineSoftmax<acc_t>* get() {
    return reinterpret_cast<core::OnlineSoftmax<acc_t>*>(bytes);
  }
};

/// Forward: in_t is the logits' element type (DeviceLogits::dtype).
template <class in_t, class acc_t>
__global__ void __launch_bounds__(kLogitsThreads)
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
  const bool aligned = aligned16(row);
  core::OnlineSoftmax<acc_t> mine;
  for (std::int64_t col = std::int64_t(threadIdx.x) * kVector; col < l.vocab;
       col += std::int64_t(kLogitsThreads) * kVector) {
    acc_t z[kVector];
    const int n = load_logits(row, col, l.vocab, aligned, p.inv_temperature, z);
#pragma unroll
    for (int k = 0; k < kVector; ++k)
      if (k < n) mine.add(z[k]);
  }
  core::OnlineSoftmax<acc_t>* shared = storage.get();
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kLogitsThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) shared[threadIdx.x].merge(shared[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const core::OnlineSoftmax<acc_t> all = shared[0];
    unsigned char flags = 0;
    if (all.invalid()) {
      flags |= kRowNonFinite;
    } else if (all.empty()) {
      flags |= kRowAllNegInf;
    }
    // Note [Out-of-range labels]: read the nearest entry, report the row.
    const std::int64_t read = core::clamped_label(label, l.vocab);
    if (read != label) flags |= kRowBadLabel;
    acc_t z = logit_value<acc_t>(row[read]);
    if (p.inv_temperature != acc_t(1)) z *= p.inv_temperature;
    p.logp[r] = all.log_prob(z);
    p.entropy[r] = all.entropy();
    if (p.stats) {
      p.stats[3 * r] = all.max;
      p.stats[3 * r + 1] = all.log_sum();
      p.stats[3 * r + 2] = all.mean_shifted();
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
  const acc_t* stats;
  const acc_t* grad_logp;     ///< or null
  const acc_t* grad_entropy;  ///< or null
  out_t* grad;                ///< [rows, vocab] contiguous
};

/// Backward: out_t is the logits' element type, which the gradient keeps.
template <class out_t, class acc_t>
__global__ void __launch_bounds__(kLogitsThreads)
    logits_backward(const LogitsBackwardParams<out_t, acc_t> p) {
  constexpr int kVector = kLogitsVector<out_t>;
  const std::int64_t r = blockIdx.x;
  const DeviceLogits& l = p.logits;
  out_t* out = p.grad + r * l.vocab;
  const std::int64_t label = p.labels[r];
  // The one-hot term goes where forward read the label (Note [Out-of-range labels]).
  const std::int64_t onehot_col = core::clamped_label(label, l.vocab);
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
  const bool aligned = aligned16(row) && aligned16(out);
  const acc_t m = p.stats[3 * r], log_sum = p.stats[3 * r + 1], mean = p.stats[3 * r + 2];
  for (std::int64_t col = first; col < l.vocab; col += step) {
    acc_t z[kVector];
    const int n = load_logits(row, col, l.vocab, aligned, p.inv_temperature, z);
    out_t values[kVector];
#pragma unroll
    for (int k = 0; k < kVector; ++k) {
      if (k < n)
        values[k] = to_output<out_t>(
            p.inv_temperature *
            core::token_logprob_grad(z[k] - m, col + k == onehot_col, log_sum, mean, g, h));
    }
    store_group(out + col, n, aligned, values);
  }
}

}  // namespace cuda
PSFT_NAMESPACE_END
