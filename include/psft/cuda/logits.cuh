#pragma once
/// \file
/// CUDA kernels of token_logprobs: one block per token row computes the
/// online max, sum-exp and sum p z of the row (core::OnlineSoftmax, merged
/// across threads in a fixed tree order) and the label's log-probability and
/// entropy; the backward kernel writes d/dlogits in the logits' dtype with
/// core::token_logprob_grad. Rows whose label is ignore_index are not read.
/// Torch-free; psft_cuda.cu wraps them (Note [Logits backends mirror core]).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

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

/// Logit j of a row, scaled by 1 / temperature as every backend does it.
template <class acc_t>
__device__ inline acc_t scaled_logit(const DeviceLogits& l, std::int64_t base, std::int64_t j,
                                     acc_t inv_temperature) {
  const acc_t z = load_one<acc_t>(DeviceInput{l.data, l.dtype, 0, 1, false}, base + j);
  return inv_temperature != acc_t(1) ? z * inv_temperature : z;
}

template <class acc_t>
struct alignas(core::OnlineSoftmax<acc_t>) SoftmaxStorage {
  unsigned char bytes[sizeof(core::OnlineSoftmax<acc_t>) * kLogitsThreads];
  __device__ core::OnlineSoftmax<acc_t>* get() {
    return reinterpret_cast<core::OnlineSoftmax<acc_t>*>(bytes);
  }
};

template <class acc_t>
__global__ void __launch_bounds__(kLogitsThreads)
    logits_forward(const LogitsForwardParams<acc_t> p) {
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
  const std::int64_t base = l.offset(r);
  core::OnlineSoftmax<acc_t> mine;
  for (std::int64_t j = threadIdx.x; j < l.vocab; j += kLogitsThreads)
    mine.add(scaled_logit(l, base, j, p.inv_temperature));
  core::OnlineSoftmax<acc_t>* shared = storage.get();
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kLogitsThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) shared[threadIdx.x].merge(shared[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const core::OnlineSoftmax<acc_t> row = shared[0];
    unsigned char flags = 0;
    if (row.invalid()) {
      flags |= kRowNonFinite;
    } else if (row.empty()) {
      flags |= kRowAllNegInf;
    }
    const bool label_ok = label >= 0 && label < l.vocab;
    if (!label_ok) flags |= kRowBadLabel;
    // An out-of-range label (check_inputs off) reads a clamped entry.
    const std::int64_t read = label_ok ? label : (label < 0 ? 0 : l.vocab - 1);
    p.logp[r] = row.log_prob(scaled_logit(l, base, read, p.inv_temperature));
    p.entropy[r] = row.entropy();
    if (p.stats) {
      p.stats[3 * r] = row.max;
      p.stats[3 * r + 1] = row.log_sum();
      p.stats[3 * r + 2] = row.mean_shifted();
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

template <class out_t, class acc_t>
__global__ void __launch_bounds__(kLogitsThreads)
    logits_backward(const LogitsBackwardParams<out_t, acc_t> p) {
  const std::int64_t r = blockIdx.x;
  const DeviceLogits& l = p.logits;
  out_t* out = p.grad + r * l.vocab;
  const std::int64_t label = p.labels[r];
  const acc_t g = p.grad_logp ? p.grad_logp[r] : acc_t(0);
  const acc_t h = p.grad_entropy ? p.grad_entropy[r] : acc_t(0);
  if (label == p.ignore_index || (g == acc_t(0) && h == acc_t(0))) {
    for (std::int64_t j = threadIdx.x; j < l.vocab; j += kLogitsThreads)
      out[j] = to_output<out_t>(acc_t(0));
    return;
  }
  const std::int64_t base = l.offset(r);
  const acc_t m = p.stats[3 * r], log_sum = p.stats[3 * r + 1], mean = p.stats[3 * r + 2];
  for (std::int64_t j = threadIdx.x; j < l.vocab; j += kLogitsThreads) {
    const acc_t y = scaled_logit(l, base, j, p.inv_temperature) - m;
    out[j] = to_output<out_t>(p.inv_temperature *
                              core::token_logprob_grad(y, j == label, log_sum, mean, g, h));
  }
}

}  // namespace cuda
PSFT_NAMESPACE_END
