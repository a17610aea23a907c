#pragma once
/// \file
/// CUDA kernels of the clipped objective, on raw strided pointers. Torch-free:
/// psft_cuda.cu wraps them for tensors. The per-token math is an objective
/// rule of core/objectives/ (Note [Objective rules]), the same code the CPU
/// kernel runs (cpu/clipped_loss_kernel.hpp), so the two backends differ
/// only in rounding of exp() and in the order of the float sums.
///
/// Two kernels:
///   forward_units  one block per unit (row, chunk of kChunk columns): loss,
///                  token count, metric sums and flags of the unit, and
///                  coef = w dl/dlogp for every token; the blocks then
///                  combine the units into row sums and the batch's loss,
///                  metrics and scale themselves, in a fixed order (Note
///                  [Deterministic CUDA reduction]), on the device.
///   backward       grad = coef * scale * grad_output in logp's dtype.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "psft/core/clipped_objective.hpp"
#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/objective.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"

PSFT_NAMESPACE_BEGIN
namespace cuda {

// Note [Deterministic CUDA reduction]
// No float atomics. The work is cut into units (row, chunk of kChunk
// columns) whose boundaries depend only on the shape; each unit is reduced
// by one block in a fixed tree order. The units of a row, and then the rows
// of the batch, are combined by fixed-shape trees of fan-in kThreads
// (CombineLayout): every node's children are summed in index order by one
// block, with one fixed tree. Which block does that is decided at run time
// (the last child to arrive, counted with an integer atomic), but not what
// it computes, so the results are bit-identical from run to run and across
// GPUs of the same architecture, whatever the scheduling. A row that is one
// unit is its own row sum: no combining until the batch tree.

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
/// kGroup) into out[0..n), the rest `fill`; an absent input reads as `fill`.
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
    out[i] = i < n ? load_one<acc_t>(in, base + i * in.col_stride) : fill;
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

/// Reads N values of T from an address aligned to Pieces<T, N>::kBytes,
/// with __ldg of whole pieces: a plain load of a uint4 that is then copied
/// apart may be split by the compiler into narrower loads (even bytes), an
/// intrinsic's result may not. Only for data no thread writes during the
/// kernel.
template <class T, int N>
__device__ inline void load_aligned(const T* src, T (&values)[N]) {
  using P = Pieces<T, N>;
  unsigned char* bytes = reinterpret_cast<unsigned char*>(values);
#pragma unroll
  for (int k = 0; k < P::kCount; ++k) {
    const typename P::Piece piece = __ldg(reinterpret_cast<const typename P::Piece*>(src) + k);
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

/// Writes v[first, first + 4) to a 16-byte aligned dst as whole float4 /
/// double2 stores, built from the values (a memcpy-built uint4 lets the
/// compiler split a store into 4-byte pieces when the values sit in
/// scattered registers).
template <int N>
__device__ inline void store_quad(float* dst, const float (&v)[N], int first) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[first], v[first + 1], v[first + 2], v[first + 3]);
}
template <int N>
__device__ inline void store_quad(double* dst, const double (&v)[N], int first) {
  reinterpret_cast<double2*>(dst)[0] = make_double2(v[first], v[first + 1]);
  reinterpret_cast<double2*>(dst)[1] = make_double2(v[first + 2], v[first + 3]);
}

// ---------------------------------------------------------------------------
// Device math shared by the kernels.

/// Constants of float and double device code (no <limits> in device code
/// without --expt-relaxed-constexpr).
template <class T>
struct Limits;
template <>
struct Limits<float> {
  __device__ static float lowest() { return -3.402823466e+38f; }
  __device__ static float infinity() { return __builtin_huge_valf(); }
  __device__ static float log2e() { return 1.4426950408889634f; }
  __device__ static float ln2() { return 0.6931471805599453f; }
};
template <>
struct Limits<double> {
  __device__ static double lowest() { return -1.7976931348623157e+308; }
  __device__ static double infinity() { return __builtin_huge_val(); }
  __device__ static double log2e() { return 1.4426950408889634; }
  __device__ static double ln2() { return 0.6931471805599453; }
};

/// 2^x. float: one MUFU.EX2 on the device (ex2.approx.ftz: relative error
/// below 2^-22, exact 1 at 0, 0 at -inf, results below 2^-126 flushed to
/// 0); the host's exp2f under the emulator. double: exp2, accurate.
__device__ inline float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
__device__ inline double exp2_fast(double x) { return exp2(x); }

/// max and fused multiply-add, one instruction each (fmax drops a NaN).
__device__ inline float fmax_of(float a, float b) { return fmaxf(a, b); }
__device__ inline double fmax_of(double a, double b) { return fmax(a, b); }
__device__ inline float fmin_of(float a, float b) { return fminf(a, b); }
__device__ inline double fmin_of(double a, double b) { return fmin(a, b); }
__device__ inline float fma_of(float a, float b, float c) { return fmaf(a, b, c); }
__device__ inline double fma_of(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------------------
// The forward: per-token math, sums of a unit, and the combine.

/// Flags of bad unmasked values (bits of Partial::flags).
enum : unsigned int { kBadOld = 1u, kBadAdvantage = 2u, kBadMask = 4u, kBadLogp = 8u };

/// Sums of a unit, a row or the batch (cpu::UnitPartial's, plus the token
/// count, which the CPU kernel takes in a pass of its own, and the two
/// per-row values the batch needs: non-empty rows and the rows' loss
/// weighted by core::row_factor).
struct Partial {
  double loss;
  double tokens;
  core::MetricSums metrics;
  double sequences;  ///< rows with tokens (set from the row level up)
  double weighted;   ///< sum over rows of row_factor * row loss (likewise)
  unsigned int flags;

  __device__ void reset() {
    loss = 0;
    tokens = 0;
    metrics = core::MetricSums();
    sequences = 0;
    weighted = 0;
    flags = 0;
  }
  __device__ void merge(const Partial& o) {
    loss += o.loss;
    tokens += o.tokens;
    metrics.merge(o.metrics);
    sequences += o.sequences;
    weighted += o.weighted;
    flags |= o.flags;
  }
};

// Note [Unit sums in the accumulation type]
// A thread's 8 tokens, and then the block's 2048, are summed in acc_t
// (float for every input dtype but fp64) and widened to a double Partial
// once per unit; units, rows and the batch are then combined in double.
// The CPU kernel widens every token instead; the difference is float
// rounding over at most 2048 terms (relative 1e-6 or less), far inside the
// tests' tolerances, and it saves nine double-precision operations per
// token. The token count (the mask weights' sum) stays in double per token:
// the normaliser checks compare it with a relative slack of 1e-9. The sums
// are core::MetricSums::add's, in the same order of fields.

/// A unit's sums in the accumulation type (Note [Unit sums in the
/// accumulation type]). `bad` stays 0 unless an unmasked logp, old_logp or
/// advantage is NaN or +-inf (0 * x is NaN exactly then) or a weight is
/// negative; a NaN or infinite weight makes the weight sum non-finite. Only
/// then are the inputs read again, after the token math, to tell which
/// (bad_value_flags).
template <class acc_t>
struct UnitSums {
  double weight;  ///< in double: the normaliser checks compare it to 1e-9
  acc_t loss, clipped, clipped_dual, clipped_high, clipped_low, kl_k1, kl_k3, ratio;
  acc_t ratio_min, ratio_max, bad;

  __device__ void reset() {
    weight = 0;
    loss = clipped = clipped_dual = clipped_high = clipped_low = acc_t(0);
    kl_k1 = kl_k3 = ratio = acc_t(0);
    ratio_min = Limits<acc_t>::infinity();
    ratio_max = -Limits<acc_t>::infinity();
    bad = acc_t(0);
  }
  __device__ void merge(const UnitSums& o) {
    loss += o.loss;
    weight += o.weight;
    clipped += o.clipped;
    clipped_dual += o.clipped_dual;
    clipped_high += o.clipped_high;
    clipped_low += o.clipped_low;
    kl_k1 += o.kl_k1;
    kl_k3 += o.kl_k3;
    ratio += o.ratio;
    ratio_min = fmin_of(ratio_min, o.ratio_min);
    ratio_max = fmax_of(ratio_max, o.ratio_max);
    bad += o.bad;
  }
  /// Whether a value is bad (then bad_value_flags tells which).
  __device__ bool any_bad() const { return bad != acc_t(0) || !(weight - weight == 0.0); }
  /// The unit's Partial, without flags.
  __device__ Partial widen() const {
    Partial p;
    p.reset();
    p.loss = static_cast<double>(loss);
    p.tokens = weight;
    core::MetricSums& m = p.metrics;
    m.weight = weight;
    m.clipped = static_cast<double>(clipped);
    m.clipped_dual = static_cast<double>(clipped_dual);
    m.clipped_high = static_cast<double>(clipped_high);
    m.clipped_low = static_cast<double>(clipped_low);
    m.kl_k1 = static_cast<double>(kl_k1);
    m.kl_k3 = static_cast<double>(kl_k3);
    m.ratio = static_cast<double>(ratio);
    m.ratio_min = static_cast<double>(ratio_min);
    m.ratio_max = static_cast<double>(ratio_max);
    return p;
  }
};

/// A group of kGroup tokens of one input, as the per-token math reads it:
/// value<acc_t>(i) is token i. Values already in acc_t (RuntimeInputs'
/// whole groups):
template <class acc_t>
struct Values {
  acc_t v[kGroup];
  template <class T>
  __device__ T value(int i) const {
    return v[i];
  }
};

/// ... and the raw 16 or 32 bytes of a full group of a typed input, decoded
/// per token with one or two instructions (a plain __bfloat162float of an
/// unpacked upper half costs a permute and a shift).
template <class T>
struct RawGroup;
template <>
struct RawGroup<__nv_bfloat16> {
  unsigned int w[4];
  __device__ void load(const void* p) {
    const uint4 q = __ldg(static_cast<const uint4*>(p));
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  }
  __device__ void fill(unsigned int bits) {  // bits of one bf16, in both halves
    w[0] = w[1] = w[2] = w[3] = bits * 0x10001u;
  }
  static constexpr unsigned int kZero = 0, kOne = 0x3f80;
  template <class acc_t>
  __device__ acc_t value(int i) const {
    return static_cast<acc_t>(__uint_as_float(i % 2 ? w[i / 2] & 0xffff0000u : w[i / 2] << 16));
  }
};
template <>
struct RawGroup<__half> {
  unsigned int w[4];
  __device__ void load(const void* p) {
    const uint4 q = __ldg(static_cast<const uint4*>(p));
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  }
  __device__ void fill(unsigned int bits) { w[0] = w[1] = w[2] = w[3] = bits * 0x10001u; }
  static constexpr unsigned int kZero = 0, kOne = 0x3c00;
  template <class acc_t>
  __device__ acc_t value(int i) const {
    return static_cast<acc_t>(half_bits_to_float(
        static_cast<unsigned short>(i % 2 ? w[i / 2] >> 16 : w[i / 2] & 0xffffu)));
  }
};
template <>
struct RawGroup<float> {
  float f[kGroup];
  __device__ void load(const void* p) {
    const float4 lo = __ldg(static_cast<const float4*>(p));
    const float4 hi = __ldg(static_cast<const float4*>(p) + 1);
    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w;
    f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
  }
  __device__ void fill(unsigned int bits) {
    for (int i = 0; i < kGroup; ++i) f[i] = __uint_as_float(bits);
  }
  static constexpr unsigned int kZero = 0, kOne = 0x3f800000u;
  template <class acc_t>
  __device__ acc_t value(int i) const {
    return static_cast<acc_t>(f[i]);
  }
};
/// A bool mask: 8 bytes.
template <>
struct RawGroup<unsigned char> {
  unsigned int w[2];
  __device__ void load(const void* p) {
    const uint2 q = __ldg(static_cast<const uint2*>(p));
    w[0] = q.x, w[1] = q.y;
  }
  __device__ void fill(unsigned int bits) { w[0] = w[1] = bits * 0x01010101u; }
  static constexpr unsigned int kZero = 0, kOne = 1;
  template <class acc_t>
  __device__ acc_t value(int i) const {
    return (w[i / 4] >> (8 * (i % 4))) & 0xffu ? acc_t(1) : acc_t(0);
  }
};

// Note [Kernels without a dual clip]
// core's clipped rule applies the dual clip (A < 0, loss capped at -A c)
// and TRL's delta under parameter tests that nvcc keeps as code on every
// token; under forward_units' register bound (Note [Forward registers])
// they cost registers and instructions. PSFT (A = 1) and most RL losses use
// neither, so the clipped kernels are compiled twice: PlainClippedRule
// passes core a dual clip and a delta of constant 0, and the compiler drops
// that code; core::ClippedRule (either set, chosen on the host) runs core as
// it is.

/// core::ClippedRule without the dual clip and delta (Note [Kernels without
/// a dual clip]).
struct PlainClippedRule {
  template <class Lanes>
  __device__ static core::TokenTerms<Lanes> terms(
      const Lanes& o, const core::TokenInput<Lanes>& t,
      const core::ObjectiveParams<typename Lanes::Scalar>& p) {
    core::ObjectiveParams<typename Lanes::Scalar> params = p;
    params.dual_clip = typename Lanes::Scalar(0);
    params.delta = typename Lanes::Scalar(0);
    return core::ClippedRule::terms(o, t, params);
  }
};

/// Adds one token (mask weight `weight`; 0 or `active` false: masked) to
/// `sums` and returns its coef = w dl/dlogp. Branch-free: a masked token's
/// values are replaced by finite ones before any arithmetic, so a NaN under
/// the mask is never used (Note [Unit sums in the accumulation type]).
template <class Rule, class acc_t>
__device__ inline acc_t add_token(bool active, acc_t weight, acc_t logp, acc_t old_logp,
                                  acc_t advantage, const core::ObjectiveParams<acc_t>& clip,
                                  UnitSums<acc_t>& sums) {
  active = active && weight != acc_t(0);
  const acc_t w = active ? weight : acc_t(0);
  const acc_t lp = active ? logp : acc_t(0);
  const acc_t old = active ? old_logp : acc_t(0);
  const acc_t a = active ? advantage : acc_t(0);
  // A negative weight poisons `bad` too: one accumulator for every check.
  const acc_t checked = w < acc_t(0) ? Limits<acc_t>::infinity() : sums.bad;
  sums.bad = fma_of(lp, acc_t(0), fma_of(old, acc_t(0), fma_of(a, acc_t(0), checked)));
  const acc_t log_ratio = lp - old;
  const acc_t clamped = core::clamp_log_ratio(log_ratio, clip.log_ratio_clamp);
  const acc_t ratio = exp2_fast(clamped * Limits<acc_t>::log2e());
  const bool in_range = core::log_ratio_in_range(log_ratio, clip.log_ratio_clamp);
  // core::MetricSums::add, in acc_t; selects rather than branches. The sums
  // of the inputs first, so that fewer values are live across the rule
  // (Note [Forward registers]).
  sums.weight += static_cast<double>(w);
  sums.kl_k1 = fma_of(w, core::approx_kl_k1(clamped), sums.kl_k1);
  sums.kl_k3 = fma_of(w, core::approx_kl_k3(clamped, ratio), sums.kl_k3);
  sums.ratio = fma_of(w, ratio, sums.ratio);
  sums.ratio_min = fmin_of(sums.ratio_min, active ? ratio : Limits<acc_t>::infinity());
  sums.ratio_max = fmax_of(sums.ratio_max, active ? ratio : -Limits<acc_t>::infinity());
  // Note [Objective rules]
  const core::TokenObjective<acc_t> t =
      Rule::terms(core::ScalarLanes<acc_t>(),
                  core::token_input(lp, log_ratio, clamped, ratio, in_range, a), clip);
  sums.loss = fma_of(w, t.loss, sums.loss);
  sums.clipped += t.clipped ? w : acc_t(0);
  sums.clipped_dual += t.clipped_dual ? w : acc_t(0);
  sums.clipped_high += t.clipped_high ? w : acc_t(0);
  sums.clipped_low += t.clipped_low ? w : acc_t(0);
  return w * t.grad;
}

/// Adds tokens [kBegin, kEnd) of a full group to `sums` and sets their coef.
template <int kBegin, int kEnd, class Rule, class acc_t, class L, class A, class M>
__device__ inline void add_tokens(const L& logp, const L& old_logp, const A& advantages,
                                  const M& mask, const core::ObjectiveParams<acc_t>& clip,
                                  UnitSums<acc_t>& sums, acc_t (&coef)[kGroup]) {
#pragma unroll
  for (int i = kBegin; i < kEnd; ++i)
    coef[i] = add_token<Rule>(true, mask.template value<acc_t>(i), logp.template value<acc_t>(i),
                              old_logp.template value<acc_t>(i),
                              advantages.template value<acc_t>(i), clip, sums);
}

/// The first n <= kGroup tokens of a group that is not read in vectors (a
/// row's last, partial one; for TypedInputs also one whose coefficients are
/// not 16-byte aligned): one token at a time, in token order, so that the
/// sums round as add_tokens'. `value(input, i)` reads token i of input 0-3
/// (logp, old_logp, advantages, mask), or its fill when absent; dst (null:
/// none) gets the coefficients.
template <class Rule, class acc_t, class Value>
__device__ inline void add_elements(int n, const Value& value,
                                    const core::ObjectiveParams<acc_t>& clip, UnitSums<acc_t>& sums,
                                    acc_t* dst) {
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i >= n) break;
    const acc_t c =
        add_token<Rule>(true, value(3, i), value(0, i), value(1, i), value(2, i), clip, sums);
    if (dst) dst[i] = c;
  }
}

/// Input element types known at compile time: logp, old_logp and (when
/// present) advantages stored as T, the mask (when present) as M (unsigned
/// char for bool, or float), every present input `vectorised`. The
/// kernel's fast path: loads are issued before any is converted and the
/// code has no dtype switch. psft_cuda.cu picks it when the inputs fit.
template <class T, class M>
struct TypedInputs {};
/// Element types read from DeviceInput::dtype at run time (any mix).
struct RuntimeInputs {};

/// The forward_units instantiation for a call's inputs (psft_cuda.cu
/// launches it; the emulated tests run the same).
enum class ForwardPath { Runtime, BFloat16Bool, BFloat16Float, Float32Bool, Float32Float };

/// TypedInputs<T, M> when logp, old_logp and the advantages (when present)
/// have one dtype T (bf16 or fp32), the mask (when present) is bool or fp32,
/// every present input is vectorised and the accumulation type is float;
/// else Runtime.
inline ForwardPath forward_path(const DeviceInput (&in)[4], bool float_accumulation) {
  if (!float_accumulation) return ForwardPath::Runtime;
  const DeviceDtype t = in[0].dtype;
  if (t != DeviceDtype::BFloat16 && t != DeviceDtype::Float) return ForwardPath::Runtime;
  for (int k = 0; k < 4; ++k) {
    const DeviceInput& x = in[k];
    if (x.dtype == DeviceDtype::Absent && k >= 2) continue;
    if (!x.vectorised) return ForwardPath::Runtime;
    if (k < 3 && x.dtype != t) return ForwardPath::Runtime;
    if (k == 3 && x.dtype != DeviceDtype::Bool && x.dtype != DeviceDtype::Float)
      return ForwardPath::Runtime;
  }
  const bool bool_mask = in[3].dtype != DeviceDtype::Float;  // bool or absent
  if (t == DeviceDtype::BFloat16)
    return bool_mask ? ForwardPath::BFloat16Bool : ForwardPath::BFloat16Float;
  return bool_mask ? ForwardPath::Float32Bool : ForwardPath::Float32Float;
}

/// Calls go(inputs) with the input types of `path` (TypedInputs<T, M>, or
/// RuntimeInputs): the one mapping from ForwardPath to forward_units'
/// instantiations, for psft_cuda.cu and the emulated tests. The typed ones
/// are instantiated only when kTyped (float accumulation).
template <bool kTyped, class Go>
inline void with_forward_inputs(ForwardPath path, Go&& go) {
  if constexpr (kTyped) {
    switch (path) {
      case ForwardPath::BFloat16Bool:
        return go(TypedInputs<__nv_bfloat16, unsigned char>());
      case ForwardPath::BFloat16Float:
        return go(TypedInputs<__nv_bfloat16, float>());
      case ForwardPath::Float32Bool:
        return go(TypedInputs<float, unsigned char>());
      case ForwardPath::Float32Float:
        return go(TypedInputs<float, float>());
      case ForwardPath::Runtime:
        break;
    }
  }
  go(RuntimeInputs());
}

/// Reads a full group of a typed input raw (absent: all `fill`).
template <class T>
__device__ inline void load_raw(const DeviceInput& in, std::int64_t row, std::int64_t col,
                                unsigned int fill, RawGroup<T>& out) {
  if (in.data) {
    out.load(static_cast<const T*>(in.data) + row * in.row_stride + col);
  } else {
    out.fill(fill);
  }
}

/// Writes the n coefficients of a group to dst (null: none).
template <class acc_t>
__device__ inline void store_coef(acc_t* dst, int n, const acc_t (&coef)[kGroup]) {
  if (!dst) return;
  if (n == kGroup && aligned16(dst)) {
    store_quad(dst, coef, 0);
    store_quad(dst + 4, coef, 4);
  } else {
#pragma unroll
    for (int i = 0; i < kGroup; ++i)
      if (i < n) dst[i] = coef[i];
  }
}

/// One element of a typed input as acc_t.
template <class acc_t>
__device__ inline acc_t typed_value(float v) {
  return static_cast<acc_t>(v);
}
template <class acc_t>
__device__ inline acc_t typed_value(__nv_bfloat16 v) {
  return static_cast<acc_t>(__bfloat162float(v));
}
template <class acc_t>
__device__ inline acc_t typed_value(__half v) {
  return static_cast<acc_t>(__half2float(v));
}
template <class acc_t>
__device__ inline acc_t typed_value(unsigned char v) {
  return v ? acc_t(1) : acc_t(0);
}

/// Which inputs of a group hold a bad unmasked value (kBad* bits), read
/// again entry by entry: the cold path after UnitSums saw one.
template <class acc_t>
__device__ inline unsigned int bad_value_flags(const DeviceInput (&in)[4], std::int64_t row,
                                               std::int64_t col, int n) {
  unsigned int flags = 0;
  for (int i = 0; i < n; ++i) {
    const auto at = [&](const DeviceInput& x, acc_t fill) {
      return x.dtype == DeviceDtype::Absent
                 ? fill
                 : load_one<acc_t>(x, row * x.row_stride + (col + i) * x.col_stride);
    };
    const acc_t w = at(in[3], acc_t(1));
    if (w == acc_t(0)) continue;
    if (!isfinite(at(in[0], acc_t(0)))) flags |= kBadLogp;
    if (!isfinite(at(in[1], acc_t(0)))) flags |= kBadOld;
    if (!isfinite(at(in[2], acc_t(1)))) flags |= kBadAdvantage;
    if (!isfinite(w) || w < acc_t(0)) flags |= kBadMask;
  }
  return flags;
}

/// A thread's group of tokens: loads, per-token math, coefficients.
/// TypedInputs: a full group with an aligned (or no) coefficient row is the
/// fast path, straight-line code: four (or fewer) vector loads issued first,
/// then four tokens, their coefficients as one 16-byte store, and the other
/// four (scripts/check-sass.sh measures this path). A partial group is read
/// entry by entry.
template <class Rule, class acc_t, class T, class M>
__device__ inline void unit_group(TypedInputs<T, M>, const DeviceInput (&in)[4], std::int64_t row,
                                  std::int64_t col, int n, const core::ObjectiveParams<acc_t>& clip,
                                  acc_t* dst, UnitSums<acc_t>& sums) {
  if (n == kGroup && (!dst || aligned16(dst))) {
    RawGroup<T> logp, old_logp, advantages;
    RawGroup<M> mask;
    load_raw(in[0], row, col, RawGroup<T>::kZero, logp);
    load_raw(in[1], row, col, RawGroup<T>::kZero, old_logp);
    load_raw(in[2], row, col, RawGroup<T>::kOne, advantages);
    load_raw(in[3], row, col, RawGroup<M>::kOne, mask);
    acc_t coef[kGroup];
    add_tokens<0, 4, Rule>(logp, old_logp, advantages, mask, clip, sums, coef);
    if (dst) store_quad(dst, coef, 0);
    add_tokens<4, kGroup, Rule>(logp, old_logp, advantages, mask, clip, sums, coef);
    if (dst) store_quad(dst + 4, coef, 4);
    return;
  }
  const auto value = [&](int k, int i) {
    const DeviceInput& x = in[k];
    if (!x.data) return k < 2 ? acc_t(0) : acc_t(1);
    const std::int64_t at = row * x.row_stride + col + i;
    return k == 3 ? typed_value<acc_t>(static_cast<const M*>(x.data)[at])
                  : typed_value<acc_t>(static_cast<const T*>(x.data)[at]);
  };
  add_elements<Rule>(n, value, clip, sums, dst);
}
/// RuntimeInputs: whole groups through load_group (vector loads where the
/// view allows), partial ones entry by entry.
template <class Rule, class acc_t>
__device__ inline void unit_group(RuntimeInputs, const DeviceInput (&in)[4], std::int64_t row,
                                  std::int64_t col, int n, const core::ObjectiveParams<acc_t>& clip,
                                  acc_t* dst, UnitSums<acc_t>& sums) {
  if (n == kGroup) {
    Values<acc_t> v[4];
    load_group<acc_t>(in[0], row, col, n, acc_t(0), v[0].v);
    load_group<acc_t>(in[1], row, col, n, acc_t(0), v[1].v);
    load_group<acc_t>(in[2], row, col, n, acc_t(1), v[2].v);
    load_group<acc_t>(in[3], row, col, n, acc_t(1), v[3].v);
    acc_t coef[kGroup];
    add_tokens<0, kGroup, Rule>(v[0], v[1], v[2], v[3], clip, sums, coef);
    store_coef(dst, n, coef);
    return;
  }
  const auto value = [&](int k, int i) {
    const DeviceInput& x = in[k];
    if (x.dtype == DeviceDtype::Absent) return k < 2 ? acc_t(0) : acc_t(1);
    return load_one<acc_t>(x, row * x.row_stride + (col + i) * x.col_stride);
  };
  add_elements<Rule>(n, value, clip, sums, dst);
}

/// Fan-in of every node of the combine trees (one child per thread).
constexpr std::int64_t kFanIn = kThreads;
/// Levels of a combine tree, leaves included: enough for 2^40 leaves.
constexpr int kMaxLevels = 6;

/// The shape of one combine tree: nodes[0] leaves, each level the one below
/// in groups of kFanIn, nodes[levels - 1] == 1 (or 0 for no leaves).
struct TreeShape {
  int levels;
  std::int64_t nodes[kMaxLevels];
  std::int64_t slot[kMaxLevels];     ///< offset of level l's node sums (l < levels - 1)
  std::int64_t counter[kMaxLevels];  ///< offset of level l's arrival counters (l >= 1)
};

/// Where the combine keeps its node sums and arrival counters (Note
/// [Deterministic CUDA reduction]): one tree per row over its units, the
/// same shape for every row, and one tree over the rows.
struct CombineLayout {
  TreeShape row_tree;     ///< per row; its level l has rows * nodes[l] nodes
  TreeShape batch_tree;   ///< over the rows
  std::int64_t slots;     ///< Partials in all
  std::int64_t counters;  ///< unsigned ints in all, zero before the launch
};

/// Lays out one tree of `count` copies over `leaves` leaves each, after the
/// slots and counters already taken.
PSFT_HOST_DEVICE inline TreeShape tree_shape(std::int64_t leaves, std::int64_t count,
                                             std::int64_t& slots, std::int64_t& counters) {
  TreeShape t{};
  t.levels = 1;
  t.nodes[0] = leaves;
  while (t.nodes[t.levels - 1] > 1 && t.levels < kMaxLevels) {
    t.nodes[t.levels] = (t.nodes[t.levels - 1] + kFanIn - 1) / kFanIn;
    ++t.levels;
  }
  for (int l = 0; l < t.levels; ++l) {
    if (l + 1 < t.levels) {
      t.slot[l] = slots;
      slots += count * t.nodes[l];
    }
    if (l >= 1) {
      t.counter[l] = counters;
      counters += count * t.nodes[l];
    }
  }
  return t;
}

/// The layout for `rows` rows of `chunks_per_row` units each.
PSFT_HOST_DEVICE inline CombineLayout combine_layout(std::int64_t rows,
                                                     std::int64_t chunks_per_row) {
  CombineLayout c{};
  c.row_tree = tree_shape(chunks_per_row, rows, c.slots, c.counters);
  c.batch_tree = tree_shape(rows, 1, c.slots, c.counters);
  return c;
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

/// Indices into the forward kernel's status output (doubles).
enum StatusIndex : int {
  kStatusFlags = 0,          ///< Partial flags, as a number
  kStatusTokensTooSmall,     ///< 1 when normaliser.tokens < batch tokens
  kStatusSequencesTooSmall,  ///< 1 when normaliser.sequences < batch sequences
  kStatusBatchTokens,
  kStatusBatchSequences,
  kStatusBatchLoss,  ///< sum of w l over the batch (the mean per-token loss's numerator)
  kStatusCount
};

/// Everything the forward kernel reads and writes, by value as a kernel
/// argument.
template <class acc_t>
struct ForwardParams {
  std::int64_t rows, cols, chunks_per_row;
  DeviceInput inputs[4];  ///< logp, old_logp, advantages, mask
  core::ObjectiveParams<acc_t> clip;
  bool check_finite;
  ReductionParams reduction;
  acc_t* coef;             ///< [rows, cols] contiguous, or null
  CombineLayout layout;    ///< combine_layout(rows, chunks_per_row)
  Partial* slots;          ///< [layout.slots]
  unsigned int* counters;  ///< [layout.counters], zero
  acc_t* loss;             ///< 0-d
  /// Note [Clipped-loss scale]: per-row reductions [rows + 1] (row factors,
  /// then the global factor), else [1] (the global factor).
  double* scale;
  double* metrics;  ///< [core::kMetricCount]
  double* status;   ///< [kStatusCount]
};

// Note [Clipped-loss scale]
// d loss / d logp = coef * scale * grad_output, with scale the product of
// the reduction's row factor (core::row_factor, 1 / n_s for per-row
// reductions) and its global factor. The row factors are known when a row's
// sums are, the global factor only when the batch's are, so forward_units
// stores them apart: scale[r] for r < rows (per-row reductions only), and
// the global factor last; backward multiplies. No block has to write a value
// per row after the batch is summed.

/// Fixed-order tree reduction of one value per thread over a block of
/// kThreads; the result is in shared[0]. Ends with a barrier.
template <class V>
__device__ inline void block_reduce(V* shared, const V& mine) {
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) shared[threadIdx.x].merge(shared[threadIdx.x + half]);
    __syncthreads();
  }
}

/// Shared storage for kThreads Partials, or kThreads UnitSums; raw bytes
/// because __shared__ variables cannot have constructors.
struct alignas(Partial) PartialStorage {
  static constexpr std::size_t kBytes = sizeof(Partial) > sizeof(UnitSums<double>)
                                            ? sizeof(Partial)
                                            : sizeof(UnitSums<double>);
  unsigned char bytes[kBytes * kThreads];
  template <class V>
  __device__ V* get() {
    static_assert(sizeof(V) <= kBytes && alignof(V) <= alignof(Partial), "fits");
    return reinterpret_cast<V*>(bytes);
  }
};

/// Reads a Partial another block wrote, from L2 (not this SM's L1).
__device__ inline Partial load_partial(const Partial* p) {
  Partial v;
  const double* from = reinterpret_cast<const double*>(p);
  double* to = reinterpret_cast<double*>(&v);
  constexpr int kWords = static_cast<int>(offsetof(Partial, flags) / sizeof(double));
#pragma unroll
  for (int k = 0; k < kWords; ++k) to[k] = __ldcg(from + k);
  v.flags = __ldcg(&p->flags);
  return v;
}

/// Climbs a combine tree from node `index` of level 0 of tree copy `tree`,
/// whose sums are in shared[0]: stores them, counts the arrival at the
/// parent, and, in the block that arrives last, sums the parent's children
/// in order into shared[0] and goes on up. Returns true, with the root's
/// sums in shared[0], in the one block that reaches the root; false in
/// every other block (uniformly across the block). The sums stay in shared
/// memory, not in thread 0's registers, which the token loop needs.
__device__ inline bool climb(const TreeShape& t, std::int64_t tree, std::int64_t index,
                             Partial* slots, unsigned int* counters, Partial* shared) {
  __shared__ unsigned int arrived_last;
  for (int level = 0; level + 1 < t.levels; ++level) {
    const std::int64_t parent = index / kFanIn;
    const std::int64_t first = parent * kFanIn;
    const std::int64_t rest = t.nodes[level] - first;
    const int children = static_cast<int>(rest < kFanIn ? rest : kFanIn);
    Partial* level_slots = slots + t.slot[level] + tree * t.nodes[level];
    if (threadIdx.x == 0) {
      level_slots[index] = shared[0];
      __threadfence();  // the sums are visible before the arrival is counted
      unsigned int* counter = counters + t.counter[level + 1] + tree * t.nodes[level + 1] + parent;
      arrived_last = atomicAdd(counter, 1u) + 1 == static_cast<unsigned int>(children) ? 1u : 0u;
    }
    __syncthreads();
    if (!arrived_last) return false;
    __threadfence();
    Partial child;
    child.reset();
    if (static_cast<int>(threadIdx.x) < children)
      child = load_partial(level_slots + first + threadIdx.x);
    block_reduce(shared, child);  // ends with a barrier: shared[0] and arrived_last are free
    index = parent;
  }
  return true;
}

/// The batch's results from its sums (thread 0 of the block that summed
/// them; Note [Clipped-loss scale]).
template <class acc_t>
__device__ inline void finish_batch(const ForwardParams<acc_t>& a, const Partial& total) {
  const ReductionParams& p = a.reduction;
  core::ReductionCounts counts{total.tokens, total.sequences, p.norm_constant, p.world_size};
  const bool tokens_too_small = p.has_tokens && p.tokens < total.tokens * (1 - 1e-9);
  const bool sequences_too_small = p.has_sequences && p.sequences < total.sequences;
  if (p.has_tokens) counts.tokens = p.tokens;
  if (p.has_sequences) counts.sequences = p.sequences;
  const double g = core::global_factor(p.reduction, counts);
  a.status[kStatusFlags] = static_cast<double>(total.flags);
  a.status[kStatusTokensTooSmall] = tokens_too_small ? 1.0 : 0.0;
  a.status[kStatusSequencesTooSmall] = sequences_too_small ? 1.0 : 0.0;
  a.status[kStatusBatchTokens] = total.tokens;
  a.status[kStatusBatchSequences] = total.sequences;
  a.status[kStatusBatchLoss] = total.loss;
  const core::MetricValues m = total.metrics.finalize();
  const double values[core::kMetricCount] = {
      m.clip_frac,    m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low, m.approx_kl_k1,
      m.approx_kl_k3, m.ratio_mean,     m.ratio_min,      m.ratio_max,     m.token_count};
  for (int i = 0; i < core::kMetricCount; ++i) a.metrics[i] = values[i];
  *a.loss = static_cast<acc_t>(total.weighted * g);
  a.scale[core::uses_row_factor(p.reduction) ? a.rows : 0] = g;
}

/// Blocks per SM the forward is compiled for (Note [Forward registers]).
template <class acc_t, class Inputs, class Rule>
constexpr int kForwardBlocksPerSM = sizeof(acc_t) != 4 ? 1
                                    : std::is_same<Inputs, RuntimeInputs>::value
                                        ? (std::is_same<Rule, PlainClippedRule>::value ||
                                                   std::is_same<Rule, core::ClippedRule>::value
                                               ? 2
                                               : 3)
                                        : (std::is_same<Rule, PlainClippedRule>::value ? 4 : 3);

// Note [Forward registers]
// forward_units keeps a group of four inputs and the unit's sums in
// registers. Unbounded, nvcc takes 74 to 120 of them (float), which fits two
// or three 256-thread blocks per SM: 512 units of a 2^20-token batch would
// be 1.29 waves or more on an H100's 132 SMs. The typed fast paths of the
// plain clipped rule (PSFT's, and most RL losses': no dual clip, no delta)
// are compiled for four blocks (__launch_bounds__(kThreads, 4): 64
// registers, 1024 threads per SM, 528 units per wave) without spills; what
// keeps them there: the unit's sums in float (Note [Unit sums in the
// accumulation type]), one accumulator for every bad-value check and the
// cold path that tells which input was bad run after the token math, the
// combine's sums in shared memory rather than registers, and no dual-clip or
// delta code where there is none (Note [Kernels without a dual clip]). The
// general clipped rule and the other rules on typed inputs get three blocks
// (80 registers). RuntimeInputs (mixed dtypes, strided views) decodes every
// input to float before the math: three blocks for CISPO, SAPO and the KL
// penalty, two (128 registers) for the clipped rules, which take about 110
// there written once for every backend. fp64: one. scripts/check-sass.sh
// fails on any spill or stack frame, and on a typed plain-rule float path
// below four blocks.

/// Forward: one block per unit; Inputs is TypedInputs<T, M> or
/// RuntimeInputs, Rule the objective rule (Note [Objective rules]; for the
/// clipped objective PlainClippedRule unless clip.dual_clip > 0, Note
/// [Kernels without a dual clip]). Launch with max(rows * chunks_per_row, 1)
/// blocks.
template <class acc_t, class Inputs, class Rule>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM<acc_t, Inputs, Rule>)
    forward_units(const ForwardParams<acc_t> a) {
  __shared__ PartialStorage storage;
  if (a.rows == 0) {  // one block, nothing to sum
    if (threadIdx.x == 0) {
      Partial none;
      none.reset();
      finish_batch(a, none);
    }
    return;
  }
  const std::int64_t unit = blockIdx.x;
  const std::int64_t row = unit / a.chunks_per_row;
  const std::int64_t chunk = unit - row * a.chunks_per_row;
  const std::int64_t chunk_begin = chunk * kChunk;
  const std::int64_t chunk_end = a.cols < chunk_begin + kChunk ? a.cols : chunk_begin + kChunk;
  const std::int64_t col = chunk_begin + static_cast<std::int64_t>(threadIdx.x) * kGroup;

  UnitSums<acc_t> sums;
  sums.reset();
  if (col < chunk_end) {
    const int n = static_cast<int>(chunk_end - col < kGroup ? chunk_end - col : kGroup);
    unit_group<Rule>(Inputs(), a.inputs, row, col, n, a.clip,
                     a.coef ? a.coef + row * a.cols + col : nullptr, sums);
  }
  const bool bad = a.check_finite && sums.any_bad();
  UnitSums<acc_t>* unit_shared = storage.get<UnitSums<acc_t>>();
  block_reduce(unit_shared, sums);
  Partial* shared = storage.get<Partial>();
  if (threadIdx.x == 0) {
    const Partial unit_sums = unit_shared[0].widen();
    shared[0] = unit_sums;  // the same bytes: read all of them first
  }
  __syncthreads();
  // The cold path, once the token math's registers are free: which input
  // holds the bad value (Note [Unit sums in the accumulation type]).
  if (bad) {
    const int n = static_cast<int>(chunk_end - col < kGroup ? chunk_end - col : kGroup);
    atomicOr(&shared[0].flags, bad_value_flags<acc_t>(a.inputs, row, col, n));
  }
  __syncthreads();

  if (!climb(a.layout.row_tree, row, chunk, a.slots, a.counters, shared)) return;
  if (threadIdx.x == 0) {  // shared[0]: the row's sums
    Partial& v = shared[0];
    const double factor = core::row_factor(a.reduction.reduction, v.tokens);
    v.sequences = v.tokens > 0 ? 1.0 : 0.0;
    v.weighted = factor * v.loss;
    if (core::uses_row_factor(a.reduction.reduction)) a.scale[row] = factor;
  }
  __syncthreads();
  if (!climb(a.layout.batch_tree, 0, row, a.slots, a.counters, shared)) return;
  if (threadIdx.x == 0) finish_batch(a, shared[0]);
}

/// Calls go(kernel) with the forward_units instantiation for `rule` and the
/// inputs of `a` (RuntimeInputs when `runtime`): the clipped objective with
/// or without the dual clip and delta (Note [Kernels without a dual clip]) on every
/// input path (forward_path); the other rules on RuntimeInputs only, which
/// keeps the build's kernel count down. The one mapping from a call to its
/// kernel, for psft_cuda.cu and the emulated tests.
template <class acc_t, class Go>
inline void with_forward_kernel(core::RuleId rule, const ForwardParams<acc_t>& a, bool runtime,
                                Go&& go) {
  constexpr bool kFloat = std::is_same<acc_t, float>::value;
  if (rule == core::RuleId::Clipped) {
    const ForwardPath path = runtime ? ForwardPath::Runtime : forward_path(a.inputs, kFloat);
    const bool general = a.clip.dual_clip > acc_t(0) || a.clip.delta > acc_t(0);
    with_forward_inputs<kFloat>(path, [&](auto inputs) {
      using Inputs = decltype(inputs);
      if (general) {
        go(&forward_units<acc_t, Inputs, core::ClippedRule>);
      } else {
        go(&forward_units<acc_t, Inputs, PlainClippedRule>);
      }
    });
    return;
  }
  core::visit_rule(rule, [&](auto rule_struct) {
    go(&forward_units<acc_t, RuntimeInputs, decltype(rule_struct)>);
  });
}

// ---------------------------------------------------------------------------
// The backward.

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

/// What backward reads besides the coefficients.
struct BackwardParams {
  std::int64_t rows, cols;
  const double* scale;      ///< Note [Clipped-loss scale]
  bool per_row;             ///< scale holds row factors
  const void* grad_output;  ///< 0-d, float or double, on the device
  bool grad_output_double;
};

/// grad[i] = coef[i] * (scale * grad_output), as the CPU kernel: the factor
/// is formed in double and rounded once to acc_t. Each thread takes
/// kBackwardVector consecutive elements per step of a grid-stride loop, read
/// and written with one vector load and store (coef and grad are fresh,
/// aligned allocations; the kernel checks), and the last, partial vector
/// element by element. Per-row reductions follow the row by adding the grid
/// stride's quotient and remainder: one 64-bit division per thread, not per
/// vector.
template <class out_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    backward(const BackwardParams b, const acc_t* __restrict__ coef, out_t* __restrict__ grad) {
  const std::int64_t n = b.rows * b.cols;
  const double go = b.grad_output_double
                        ? *static_cast<const double*>(b.grad_output)
                        : static_cast<double>(*static_cast<const float*>(b.grad_output));
  const double global = b.scale[b.per_row ? b.rows : 0] * go;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x * kBackwardVector;
  std::int64_t base =
      (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kBackwardVector;
  // Full vectors: [0, vector_end); the rest, fewer than kBackwardVector
  // elements or everything when unaligned, element by element.
  const std::int64_t vector_end =
      aligned16(coef) && aligned16(grad) ? n / kBackwardVector * kBackwardVector : 0;
  acc_t c[kBackwardVector];
  out_t g[kBackwardVector];
  if (!b.per_row) {
    const acc_t s = static_cast<acc_t>(global);
    for (; base < vector_end; base += stride) {
      load_aligned(coef + base, c);
#pragma unroll
      for (int k = 0; k < kBackwardVector; ++k)
        g[k] = to_output<out_t>(static_cast<acc_t>(c[k] * s));
      store_aligned(grad + base, g);
    }
    for (; base < n; base += stride)
      for (std::int64_t i = base; i < n && i < base + kBackwardVector; ++i)
        grad[i] = to_output<out_t>(static_cast<acc_t>(coef[i] * s));
    return;
  }
  if (base >= n) return;
  std::int64_t row = base / b.cols, col = base - row * b.cols;
  const std::int64_t row_step = stride / b.cols, col_step = stride - row_step * b.cols;
  const auto advance = [&] {
    base += stride;
    row += row_step;
    col += col_step;
    if (col >= b.cols) {
      col -= b.cols;
      ++row;
    }
  };
  // The scale of element base + k: row r = row + (col + k >= cols) + ...,
  // at most kBackwardVector rows (cols may be smaller than a vector).
  const auto scale_of = [&](std::int64_t r) { return static_cast<acc_t>(b.scale[r] * global); };
  for (; base < vector_end; advance()) {
    load_aligned(coef + base, c);
    std::int64_t r = row, j = col;
#pragma unroll
    for (int k = 0; k < kBackwardVector; ++k) {
      g[k] = to_output<out_t>(static_cast<acc_t>(c[k] * scale_of(r)));
      if (++j == b.cols) {
        j = 0;
        ++r;
      }
    }
    store_aligned(grad + base, g);
  }
  for (; base < n; advance()) {
    std::int64_t r = row, j = col;
    for (std::int64_t i = base; i < n && i < base + kBackwardVector; ++i) {
      grad[i] = to_output<out_t>(static_cast<acc_t>(coef[i] * scale_of(r)));
      if (++j == b.cols) {
        j = 0;
        ++r;
      }
    }
  }
}

}  // namespace cuda
PSFT_NAMESPACE_END
