#pragma once
/// \file
/// CUDA kernels of the clipped objective, on raw strided pointers. Torch-free:
/// psft_cuda.cu wraps them for tensors. The per-token math is
/// core::clipped_objective_from_ratio and core::MetricSums, the same code the
/// CPU kernel runs (cpu/clipped_loss_kernel.hpp), so the two backends differ
/// only in rounding of exp() and in the order of the float sums.
///
/// Three kernels:
///   forward_units  one block per unit (row, chunk of kChunk columns): loss,
///                  token count, metric sums and flags of the unit into
///                  partials[unit]; coef = w dl/dlogp for every token.
///   finalize       one block: combines the units in a fixed order into row
///                  sums, counts, the reduction's scale, the loss and the
///                  metrics, all on the device (no host synchronisation).
///   backward       grad = coef * scale[row] * grad_output in logp's dtype.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"

PSFT_NAMESPACE_BEGIN
namespace cuda {

// Note [Deterministic CUDA reduction]
// No float atomics. The work is cut into units (row, chunk of kChunk
// columns) whose boundaries depend only on the shape; each unit is reduced
// by one block in a fixed tree order and written to its own slot; a single
// block then combines the slots in unit order, again with a fixed-shape
// tree. The results are therefore bit-identical from run to run and across
// GPUs of the same architecture, whatever the scheduling.

/// Columns per unit (a multiple of kGroup).
constexpr std::int64_t kChunk = 2048;
/// Threads of the forward and finalize blocks (a power of two).
constexpr int kThreads = 256;
/// Consecutive tokens one thread loads at once: 16 bytes of bf16/fp16, two
/// 16-byte loads of fp32, four of fp64, 8 bytes of bool.
constexpr int kGroup = 8;
static_assert(kChunk % kGroup == 0, "units must start at aligned groups");
static_assert(kChunk == kThreads * kGroup, "one group per thread per unit");

/// Element types the kernels read (the CPU kernel's set).
enum class DeviceDtype : int { Absent = 0, Float, Double, BFloat16, Half, Bool };

/// A read-only [rows, cols] view. `vectorised` is set by the host when the
/// columns are contiguous, every row starts 16-byte aligned relative to a
/// 16-byte aligned base and rows hold a multiple of kGroup elements apart,
/// so that every group starting at a multiple of kGroup may be loaded with
/// 16-byte (or 8-byte for bool) instructions.
struct DeviceInput {
  const void* data = nullptr;
  DeviceDtype dtype = DeviceDtype::Absent;
  std::int64_t row_stride = 0;
  std::int64_t col_stride = 0;
  bool vectorised = false;
};

/// Byte size of one element.
PSFT_HOST_DEVICE inline int element_size(DeviceDtype t) {
  switch (t) {
    case DeviceDtype::Double:
      return 8;
    case DeviceDtype::Float:
      return 4;
    case DeviceDtype::BFloat16:
    case DeviceDtype::Half:
      return 2;
    case DeviceDtype::Bool:
      return 1;
    default:
      return 0;
  }
}

/// Whether a view with these properties may use the vector loads.
inline bool can_vectorise(const void* data, DeviceDtype t, std::int64_t row_stride,
                          std::int64_t col_stride, std::int64_t rows) {
  if (!data || col_stride != 1) return false;
  const int bytes = element_size(t);
  const std::uintptr_t align = bytes * kGroup >= 16 ? 16 : std::uintptr_t(bytes) * kGroup;
  if (reinterpret_cast<std::uintptr_t>(data) % align != 0) return false;
  return rows <= 1 || row_stride % kGroup == 0;
}

__device__ inline float bf16_bits_to_float(unsigned short bits) {
  return __uint_as_float(static_cast<unsigned int>(bits) << 16);
}
__device__ inline float half_bits_to_float(unsigned short bits) {
  return __half2float(__ushort_as_half(bits));
}

/// One element at offset `i` (in elements) of `in`.
template <class acc_t>
__device__ inline acc_t load_one(const DeviceInput& in, std::int64_t i) {
  switch (in.dtype) {
    case DeviceDtype::Float:
      return static_cast<acc_t>(static_cast<const float*>(in.data)[i]);
    case DeviceDtype::Double:
      return static_cast<acc_t>(static_cast<const double*>(in.data)[i]);
    case DeviceDtype::BFloat16:
      return static_cast<acc_t>(bf16_bits_to_float(static_cast<const unsigned short*>(in.data)[i]));
    case DeviceDtype::Half:
      return static_cast<acc_t>(half_bits_to_float(static_cast<const unsigned short*>(in.data)[i]));
    case DeviceDtype::Bool:
      return static_cast<const unsigned char*>(in.data)[i] ? acc_t(1) : acc_t(0);
    default:
      return acc_t(0);
  }
}

/// Unpacks 4 16-bit values held in two 32-bit words.
template <class acc_t>
__device__ inline void unpack16(unsigned int word, bool bf16, acc_t* out) {
  const auto lo = static_cast<unsigned short>(word & 0xffffu);
  const auto hi = static_cast<unsigned short>(word >> 16);
  out[0] = static_cast<acc_t>(bf16 ? bf16_bits_to_float(lo) : half_bits_to_float(lo));
  out[1] = static_cast<acc_t>(bf16 ? bf16_bits_to_float(hi) : half_bits_to_float(hi));
}

/// Loads n <= kGroup tokens of row `row` from column `col` (a multiple of
/// kGroup) into out[0..n); an absent input reads as `fill`.
template <class acc_t>
__device__ inline void load_group(const DeviceInput& in, std::int64_t row, std::int64_t col, int n,
                                  acc_t fill, acc_t* out) {
  if (in.dtype == DeviceDtype::Absent) {
#pragma unroll
    for (int i = 0; i < kGroup; ++i) out[i] = fill;
    return;
  }
  const std::int64_t base = row * in.row_stride + col * in.col_stride;
  if (in.vectorised && n == kGroup) {
    switch (in.dtype) {
      case DeviceDtype::Float: {
        const float4* p =
            reinterpret_cast<const float4*>(static_cast<const float*>(in.data) + base);
        const float4 a = p[0], b = p[1];
        out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
        out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
        return;
      }
      case DeviceDtype::Double: {
        const double2* p =
            reinterpret_cast<const double2*>(static_cast<const double*>(in.data) + base);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const double2 v = p[k];
          out[2 * k] = static_cast<acc_t>(v.x);
          out[2 * k + 1] = static_cast<acc_t>(v.y);
        }
        return;
      }
      case DeviceDtype::BFloat16:
      case DeviceDtype::Half: {
        const uint4 v =
            *reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(in.data) + base);
        const bool bf16 = in.dtype == DeviceDtype::BFloat16;
        unpack16(v.x, bf16, out);
        unpack16(v.y, bf16, out + 2);
        unpack16(v.z, bf16, out + 4);
        unpack16(v.w, bf16, out + 6);
        return;
      }
      case DeviceDtype::Bool: {
        const uint2 v =
            *reinterpret_cast<const uint2*>(static_cast<const unsigned char*>(in.data) + base);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          out[k] = ((v.x >> (8 * k)) & 0xffu) ? acc_t(1) : acc_t(0);
          out[4 + k] = ((v.y >> (8 * k)) & 0xffu) ? acc_t(1) : acc_t(0);
        }
        return;
      }
      default:
        break;
    }
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i)
    if (i < n) out[i] = load_one<acc_t>(in, base + i * in.col_stride);
}

/// Whether a pointer may be read or written 16 bytes at a time.
__device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

/// How N values of T move in whole vector loads or stores: 16-byte pieces
/// when their size is a multiple of 16 bytes, else 8-byte ones.
template <class T, int N>
struct Pieces {
  static_assert(sizeof(T) * N % 8 == 0, "whole 8-byte pieces only");
  static constexpr int kBytes = sizeof(T) * N % 16 == 0 ? 16 : 8;
  static constexpr int kCount = static_cast<int>(sizeof(T) * N / kBytes);
  using Piece = typename std::conditional<kBytes == 16, uint4, uint2>::type;
};

/// Reads N values of T from an address aligned to Pieces<T, N>::kBytes.
template <class T, int N>
__device__ inline void load_aligned(const T* src, T (&values)[N]) {
  using P = Pieces<T, N>;
  unsigned char* bytes = reinterpret_cast<unsigned char*>(values);
#pragma unroll
  for (int k = 0; k < P::kCount; ++k) {
    const typename P::Piece piece = reinterpret_cast<const typename P::Piece*>(src)[k];
    memcpy(bytes + P::kBytes * k, &piece, sizeof piece);
  }
}

/// Writes N values of T to an address aligned to Pieces<T, N>::kBytes.
template <class T, int N>
__device__ inline void store_aligned(T* dst, const T (&values)[N]) {
  using P = Pieces<T, N>;
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(values);
#pragma unroll
  for (int k = 0; k < P::kCount; ++k) {
    typename P::Piece piece;
    memcpy(&piece, bytes + P::kBytes * k, sizeof piece);
    reinterpret_cast<typename P::Piece*>(dst)[k] = piece;
  }
}

/// Writes values[0..n) to dst: with vector stores when the group is full and
/// dst is 16-byte aligned, else one element at a time.
template <class T, int N>
__device__ inline void store_group(T* dst, int n, bool aligned, const T (&values)[N]) {
  if (aligned && n == N) {
    store_aligned(dst, values);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) dst[k] = values[k];
  }
}

/// Flags of bad unmasked values (bits of Partial::flags).
enum : unsigned int { kBadOld = 1u, kBadAdvantage = 2u, kBadMask = 4u, kBadLogp = 8u };

/// Partial results of one unit (mirror of cpu::UnitPartial).
struct Partial {
  double loss;
  double tokens;
  core::MetricSums metrics;
  unsigned int flags;

  __device__ void reset() {
    loss = 0;
    tokens = 0;
    metrics = core::MetricSums();
    flags = 0;
  }
  __device__ void merge(const Partial& o) {
    loss += o.loss;
    tokens += o.tokens;
    metrics.merge(o.metrics);
    flags |= o.flags;
  }
};

/// Everything the forward kernel reads, by value as a kernel argument.
template <class acc_t>
struct ForwardParams {
  std::int64_t rows, cols, chunks_per_row;
  DeviceInput logp, old_logp, advantages, mask;
  core::ClipParams<acc_t> clip;
  bool check_finite;
  acc_t* coef;        ///< [rows, cols] contiguous, or null
  Partial* partials;  ///< [rows * chunks_per_row]
};

/// Fixed-order tree reduction of one Partial per thread over a block of
/// kThreads; the result is in shared[0]. Ends with a barrier.
__device__ inline void block_reduce(Partial* shared, const Partial& mine) {
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) shared[threadIdx.x].merge(shared[threadIdx.x + half]);
    __syncthreads();
  }
}

/// Shared storage for kThreads Partials; raw bytes because __shared__
/// variables cannot have constructors.
struct alignas(Partial) PartialStorage {
  unsigned char bytes[sizeof(Partial) * kThreads];
  __device__ Partial* get() { return reinterpret_cast<Partial*>(bytes); }
};

template <class acc_t>
__global__ void __launch_bounds__(kThreads) forward_units(const ForwardParams<acc_t> a) {
  __shared__ PartialStorage storage;
  const std::int64_t unit = blockIdx.x;
  const std::int64_t row = unit / a.chunks_per_row;
  const std::int64_t chunk_begin = (unit % a.chunks_per_row) * kChunk;
  const std::int64_t chunk_end = a.cols < chunk_begin + kChunk ? a.cols : chunk_begin + kChunk;
  const std::int64_t col = chunk_begin + static_cast<std::int64_t>(threadIdx.x) * kGroup;

  Partial part;
  part.reset();
  if (col < chunk_end) {
    const int n = static_cast<int>(chunk_end - col < kGroup ? chunk_end - col : kGroup);
    acc_t logp[kGroup], old[kGroup], adv[kGroup], w[kGroup];
    load_group<acc_t>(a.logp, row, col, n, acc_t(0), logp);
    load_group<acc_t>(a.old_logp, row, col, n, acc_t(0), old);
    load_group<acc_t>(a.advantages, row, col, n, acc_t(1), adv);
    load_group<acc_t>(a.mask, row, col, n, acc_t(1), w);
    acc_t coef_out[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      coef_out[i] = acc_t(0);
      if (i >= n || w[i] == acc_t(0)) continue;
      if (a.check_finite) {
        if (!isfinite(logp[i])) part.flags |= kBadLogp;
        if (!isfinite(old[i])) part.flags |= kBadOld;
        if (!isfinite(adv[i])) part.flags |= kBadAdvantage;
        if (!isfinite(w[i]) || w[i] < acc_t(0)) part.flags |= kBadMask;
      }
      const acc_t log_ratio = logp[i] - old[i];
      const bool in_range = core::log_ratio_in_range(log_ratio, a.clip.log_ratio_clamp);
      const acc_t clamped = core::clamp_log_ratio(log_ratio, a.clip.log_ratio_clamp);
      const acc_t ratio = exp(clamped);
      const core::TokenObjective<acc_t> t =
          core::clipped_objective_from_ratio(ratio, in_range, adv[i], a.clip);
      part.loss += static_cast<double>(w[i] * t.loss);
      part.tokens += static_cast<double>(w[i]);
      part.metrics.add(t, clamped, ratio, w[i]);
      coef_out[i] = w[i] * t.grad;
    }
    if (a.coef) {
      acc_t* dst = a.coef + row * a.cols + col;
      store_group(dst, n, aligned16(dst), coef_out);
    }
  }
  Partial* shared = storage.get();
  block_reduce(shared, part);
  if (threadIdx.x == 0) a.partials[unit] = shared[0];
}

/// Resolved counts of the reduction (core::reduce_rows's inputs).
struct ReductionParams {
  Reduction reduction;
  bool has_tokens;  ///< normaliser supplies the token count
  double tokens;
  bool has_sequences;  ///< normaliser supplies the sequence count
  double sequences;
  double norm_constant;
  double world_size;
};

/// Indices into the finalize kernel's status output (doubles).
enum StatusIndex : int {
  kStatusFlags = 0,          ///< Partial flags, as a number
  kStatusTokensTooSmall,     ///< 1 when normaliser.tokens < batch tokens
  kStatusSequencesTooSmall,  ///< 1 when normaliser.sequences < batch sequences
  kStatusBatchTokens,
  kStatusBatchSequences,
  kStatusCount
};

// Note [Row sums in finalize]
// finalize first sums each row's units. One thread per row does it serially,
// which is fine for many rows of few units; for few long rows (a 1-D batch
// of 2^20 tokens is one row of 512 units) it would leave 255 threads idle
// while one walks the units, so there the whole block sums each row in a
// fixed tree, one row after another. Which way is used depends only on the
// shape (units per row > kBlockPerRow x rows, an estimate of where the
// block's per-row cost of a tree and two barriers wins), so results stay
// reproducible.

/// See Note [Row sums in finalize].
constexpr std::int64_t kBlockPerRow = 8;

template <class acc_t>
struct FinalizeParams {
  std::int64_t rows, chunks_per_row;
  const Partial* partials;
  ReductionParams reduction;
  double* row_loss;    ///< [rows] workspace
  double* row_tokens;  ///< [rows] workspace
  acc_t* loss;         ///< 0-d
  double* scale;       ///< [rows] when the reduction is per row, else [1]
  double* metrics;     ///< [core::kMetricCount]
  double* status;      ///< [kStatusCount]
};

template <class acc_t>
__global__ void __launch_bounds__(kThreads) finalize(const FinalizeParams<acc_t> f) {
  __shared__ PartialStorage storage;
  __shared__ double global_factor;
  Partial* shared = storage.get();
  Partial mine;
  mine.reset();
  double sequences = 0;  // rows with tokens, kept in `loss` of a second pass
  // Row r's sums belong to thread r % kThreads, whichever way they are formed.
  const auto keep_row = [&](std::int64_t r, const Partial& row) {
    f.row_loss[r] = row.loss;
    f.row_tokens[r] = row.tokens;
    sequences += row.tokens > 0 ? 1.0 : 0.0;
    mine.merge(row);
  };
  if (f.chunks_per_row > kBlockPerRow * f.rows) {
    // Few long rows (Note [Row sums in finalize]): the block sums each row.
    for (std::int64_t r = 0; r < f.rows; ++r) {
      Partial part;
      part.reset();
      for (std::int64_t c = threadIdx.x; c < f.chunks_per_row; c += kThreads)
        part.merge(f.partials[r * f.chunks_per_row + c]);
      block_reduce(shared, part);
      const Partial row = shared[0];
      __syncthreads();  // everyone has read shared[0] before the next row
      if (static_cast<std::int64_t>(threadIdx.x) == r % kThreads) keep_row(r, row);
    }
  } else {
    for (std::int64_t r = threadIdx.x; r < f.rows; r += kThreads) {
      Partial row;
      row.reset();
      for (std::int64_t c = 0; c < f.chunks_per_row; ++c)
        row.merge(f.partials[r * f.chunks_per_row + c]);
      keep_row(r, row);
    }
  }
  block_reduce(shared, mine);
  const Partial total = shared[0];
  __syncthreads();
  Partial count;
  count.reset();
  count.loss = sequences;
  block_reduce(shared, count);
  const double batch_sequences = shared[0].loss;
  __syncthreads();

  const ReductionParams& p = f.reduction;
  if (threadIdx.x == 0) {
    core::ReductionCounts counts{total.tokens, batch_sequences, p.norm_constant, p.world_size};
    const bool tokens_too_small = p.has_tokens && p.tokens < total.tokens * (1 - 1e-9);
    const bool sequences_too_small = p.has_sequences && p.sequences < batch_sequences;
    if (p.has_tokens) counts.tokens = p.tokens;
    if (p.has_sequences) counts.sequences = p.sequences;
    global_factor = core::global_factor(p.reduction, counts);
    f.status[kStatusFlags] = static_cast<double>(total.flags);
    f.status[kStatusTokensTooSmall] = tokens_too_small ? 1.0 : 0.0;
    f.status[kStatusSequencesTooSmall] = sequences_too_small ? 1.0 : 0.0;
    f.status[kStatusBatchTokens] = total.tokens;
    f.status[kStatusBatchSequences] = batch_sequences;
    const core::MetricValues m = total.metrics.finalize();
    const double values[core::kMetricCount] = {
        m.clip_frac,    m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low, m.approx_kl_k1,
        m.approx_kl_k3, m.ratio_mean,     m.ratio_min,      m.ratio_max,     m.token_count};
    for (int i = 0; i < core::kMetricCount; ++i) f.metrics[i] = values[i];
  }
  __syncthreads();
  const double g = global_factor;
  const bool per_row = core::uses_row_factor(p.reduction);
  Partial weighted;
  weighted.reset();
  for (std::int64_t r = threadIdx.x; r < f.rows; r += kThreads) {
    const double factor = core::row_factor(p.reduction, f.row_tokens[r]);
    if (per_row) f.scale[r] = factor * g;
    weighted.loss += factor * f.row_loss[r];
  }
  block_reduce(shared, weighted);
  if (threadIdx.x == 0) {
    *f.loss = static_cast<acc_t>(shared[0].loss * g);
    if (!per_row) f.scale[0] = g;
  }
}

/// Stores an accumulator value as the gradient's element type.
template <class out_t>
__device__ inline out_t to_output(float v);
template <>
__device__ inline float to_output<float>(float v) {
  return v;
}
template <>
__device__ inline __nv_bfloat16 to_output<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ inline __half to_output<__half>(float v) {
  return __float2half_rn(v);
}
template <class out_t>
__device__ inline out_t to_output(double v) {
  return static_cast<out_t>(v);
}

/// Elements per thread of the backward kernel.
constexpr int kBackwardVector = 4;

/// grad[i] = coef[i] * (scale[row or 0] * grad_output), as the CPU kernel:
/// the factor is formed in double and rounded once to acc_t. Each thread
/// takes kBackwardVector consecutive elements, read and written with vector
/// loads and stores (coef and grad are fresh, aligned allocations; the
/// kernel checks) except at the end of the tensor.
template <class out_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    backward(std::int64_t rows, std::int64_t cols, const acc_t* __restrict__ coef,
             const double* __restrict__ scale, bool scale_per_row,
             const double* __restrict__ grad_output, out_t* __restrict__ grad) {
  const std::int64_t n = rows * cols;
  const double go = *grad_output;
  const bool aligned = aligned16(coef) && aligned16(grad);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x * kBackwardVector;
  for (std::int64_t base =
           (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kBackwardVector;
       base < n; base += stride) {
    if (aligned && base + kBackwardVector <= n) {
      acc_t c[kBackwardVector];
      load_aligned(coef + base, c);
      out_t g[kBackwardVector];
      std::int64_t row = scale_per_row ? base / cols : 0;
      std::int64_t col = base - row * cols;
#pragma unroll
      for (int k = 0; k < kBackwardVector; ++k) {
        const double s = scale[row] * go;
        g[k] = to_output<out_t>(static_cast<acc_t>(c[k] * static_cast<acc_t>(s)));
        if (scale_per_row && ++col == cols) {
          col = 0;
          ++row;
        }
      }
      store_aligned(grad + base, g);
      continue;
    }
    for (int k = 0; k < kBackwardVector; ++k) {
      const std::int64_t i = base + k;
      if (i >= n) break;
      const double s = scale[scale_per_row ? i / cols : 0] * go;
      grad[i] = to_output<out_t>(static_cast<acc_t>(coef[i] * static_cast<acc_t>(s)));
    }
  }
}

}  // namespace cuda
PSFT_NAMESPACE_END
