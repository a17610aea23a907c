#pragma once
/// \file
/// Fused CPU kernels from logits to token log-probabilities and entropy, on
/// raw pointers. Forward: one pass over each scored row gives log p of the
/// label, the entropy and the row's softmax statistics. Backward: one pass
/// over each scored row writes d loss / d logits in the logits' dtype. No
/// vocabulary-sized temporary is allocated: a row streams through a
/// block-sized buffer that stays in L1.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/core/online_softmax.hpp"
#include "psft/cpu/packet_warnings.hpp"

// Note [Packet warnings]
PSFT_PACKET_WARNINGS_PUSH

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// Vocabulary entries per block (Note [One pass over the logits]).
constexpr std::int64_t kVocabBlock = 2048;

// Note [One pass over the logits]
// A row of V logits (V up to ~152k: 300-600 KB) is cut into blocks of
// kVocabBlock entries. Each block is read from memory once, converted to the
// accumulation type in a buffer that stays in L1 (or read in place for
// float32 logits at temperature 1), reduced to its max with one sweep and to
// S and A (core::OnlineSoftmax) with a second sweep over L1, then merged into
// the row's statistics. Memory traffic is that of a single pass; the second
// sweep costs L1 bandwidth only. A per-element online rescale (no block max)
// would need a second exp per element, twice the arithmetic of this
// exp-bound loop. Blocks of 512 to 8192 entries and two passes over the
// whole row measured within noise of each other for float32, the whole-row
// variant 20-30% slower for bfloat16 (docs/logits.md).

/// A read-only [rows, vocab] view of logits of any dtype whose last
/// dimension has stride 1. Row r of a [B, T, V] tensor is (r / T, r % T);
/// a [N, V] tensor has inner_size N and outer_stride 0. All in elements.
struct LogitsRows {
  const void* data = nullptr;     ///< first logit
  std::int64_t rows = 0;          ///< number of rows (B * T or N)
  std::int64_t vocab = 0;         ///< V
  std::int64_t inner_size = 1;    ///< T ([B, T, V]) or N ([N, V])
  std::int64_t outer_stride = 0;  ///< stride of B (0 for [N, V])
  std::int64_t inner_stride = 0;  ///< stride of T (or N)

  /// Element offset of row r's first logit. int64 throughout: one tensor may
  /// hold more than 2^31 logits.
  std::int64_t offset(std::int64_t row) const {
    return (row / inner_size) * outer_stride + (row % inner_size) * inner_stride;
  }
};

/// What the forward kernel reports. Rows are flat token indices, -1 for
/// none. The kernel never stops early, so the reported row is the first bad
/// one whatever the thread count.
struct LogitsForwardStatus {
  std::int64_t first_nonfinite_row = -1;    ///< a NaN or +inf logit
  std::int64_t first_all_neg_inf_row = -1;  ///< every logit -inf
  /// A label outside [0, vocab) (not ignore_index), read clamped (Note
  /// [Out-of-range labels]).
  std::int64_t first_bad_label_row = -1;
};

namespace kernel_detail {

namespace ei = Eigen::internal;

/// Packet type of acc_t where the build vectorises it (SSE2 at least on
/// x86-64, AVX2/AVX-512 when the consumer compiles with them).
template <class acc_t>
struct Vec {
  static constexpr bool kVectorised =
      ei::packet_traits<acc_t>::Vectorizable && ei::packet_traits<acc_t>::HasExp;
  using Packet =
      typename std::conditional<kVectorised, typename ei::packet_traits<acc_t>::type, acc_t>::type;
  static constexpr int kWidth = kVectorised ? ei::unpacket_traits<Packet>::size : 1;
};

// Note [Exp on the softmax range]
// Every exponent the kernels take is in [cutoff, 0] (shifted logits, Note
// [Softmax cutoff]), so for float the range reduction needs no overflow or
// subnormal handling: n = round(x / ln 2) comes from the 1.5 * 2^23 rounding
// trick and 2^n is added to the exponent bits. With Cephes' degree-5
// polynomial (the one Eigen's pexp uses) this is as accurate as pexp
// (about 1 ulp) without its floor emulation, which on an SSE2-only build is
// most of the cost. Double keeps Eigen's pexp.

/// e^x for float packets with x in [-80, 0] (Note [Exp on the softmax range]).
template <class Packet>
inline Packet exp_softmax_range(const Packet& x) {
  using IntPacket = typename ei::unpacket_traits<Packet>::integer_packet;
  const Packet magic = ei::pset1<Packet>(12582912.0f);  // 1.5 * 2^23
  const Packet kf = ei::pmadd(x, ei::pset1<Packet>(1.44269504088896341f), magic);
  const Packet n = ei::psub(kf, magic);  // round(x / ln 2)
  Packet r = ei::pmadd(n, ei::pset1<Packet>(-0.693359375f), x);
  r = ei::pmadd(n, ei::pset1<Packet>(2.12194440e-4f), r);  // x - n ln 2, in two parts
  const Packet r2 = ei::pmul(r, r);
  Packet y = ei::pmadd(ei::pset1<Packet>(1.9875691500e-4f), r, ei::pset1<Packet>(1.3981999507e-3f));
  y = ei::pmadd(y, r, ei::pset1<Packet>(8.3334519073e-3f));
  y = ei::pmadd(y, r, ei::pset1<Packet>(4.1665795894e-2f));
  y = ei::pmadd(y, r, ei::pset1<Packet>(1.6666665459e-1f));
  y = ei::pmadd(y, r, ei::pset1<Packet>(5.0000001201e-1f));
  y = ei::pmadd(y, r2, ei::padd(r, ei::pset1<Packet>(1.0f)));
  // n sits in the low mantissa bits of kf; shifted into the exponent field
  // the magic's own bits fall off the top.
  const IntPacket two_n = ei::plogical_shift_left<23>(ei::preinterpret<IntPacket>(kf));
  return ei::preinterpret<Packet>(ei::padd(ei::preinterpret<IntPacket>(y), two_n));
}

/// e^x for x in [cutoff, 0], any packet type.
template <class acc_t, class Packet>
inline Packet exp_nonpositive(const Packet& x) {
  if constexpr (std::is_same<acc_t, float>::value && Vec<float>::kVectorised) {
    return exp_softmax_range(x);
  } else {
    return ei::pexp(x);
  }
}

/// bfloat16 pairs can be converted with 32-bit integer packets (below).
constexpr bool kBFloat16Pairs =
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && Vec<float>::kVectorised;
#else
    false;
#endif

// Note [bfloat16 pairs]
// A 32-bit word of bfloat16 logits holds entries 2i (low half) and 2i + 1
// (high half); `word << 16` and `word & 0xffff0000` are their float bits.
// Block sums do not depend on where an entry sits in the buffer, so a block
// is converted with integer packets into [even entries | odd entries] and
// the gradient is packed back the same way, rounding to nearest even like
// c10::BFloat16. No shuffles, and it vectorises on every Eigen target.

/// The block's logits as acc_t: in place when no conversion is needed,
/// otherwise converted (times `scale` when `scaled`) into buf, possibly in
/// the order of Note [bfloat16 pairs]; store_block undoes that order.
template <class acc_t, class scalar_t>
inline const acc_t* load_block(const scalar_t* x, std::int64_t n, acc_t scale, bool scaled,
                               acc_t* buf) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if (!scaled) return x;
  }
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value &&
                kBFloat16Pairs) {
    // Vec<acc_t>, not Vec<float>: dependent names, so that a build without
    // float packets never looks at this branch.
    using Packet = typename Vec<acc_t>::Packet;
    using IntPacket = typename ei::unpacket_traits<Packet>::integer_packet;
    constexpr int W = Vec<acc_t>::kWidth;
    const std::int64_t pairs = n / 2;
    const std::int64_t full = pairs - pairs % W;
    const auto* words = reinterpret_cast<const int*>(x);
    const IntPacket high = ei::pset1<IntPacket>(static_cast<int>(0xffff0000u));
    const Packet s = ei::pset1<Packet>(scale);
    for (std::int64_t i = 0; i < full; i += W) {
      const IntPacket w = ei::ploadu<IntPacket>(words + i);
      Packet even = ei::preinterpret<Packet>(ei::plogical_shift_left<16>(w));
      Packet odd = ei::preinterpret<Packet>(ei::pand(w, high));
      if (scaled) {
        even = ei::pmul(even, s);
        odd = ei::pmul(odd, s);
      }
      ei::pstoreu(buf + i, even);
      ei::pstoreu(buf + pairs + i, odd);
    }
    for (std::int64_t i = full; i < pairs; ++i) {
      buf[i] = static_cast<float>(x[2 * i]) * (scaled ? scale : 1.0f);
      buf[pairs + i] = static_cast<float>(x[2 * i + 1]) * (scaled ? scale : 1.0f);
    }
    if (n % 2) buf[n - 1] = static_cast<float>(x[n - 1]) * (scaled ? scale : 1.0f);
    return buf;
  } else if constexpr (std::is_same<scalar_t, acc_t>::value) {
    Eigen::Map<Eigen::Array<acc_t, Eigen::Dynamic, 1>>(buf, n) =
        Eigen::Map<const Eigen::Array<acc_t, Eigen::Dynamic, 1>>(x, n) * scale;
    return buf;
  } else {
    for (std::int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
    if (scaled) {
      for (std::int64_t i = 0; i < n; ++i) buf[i] *= scale;
    }
    return buf;
  }
}

/// Writes a block of n gradient entries, computed in the order load_block
/// produced, to out in scalar_t.
template <class acc_t, class scalar_t>
inline void store_block(const acc_t* values, std::int64_t n, scalar_t* out) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value &&
                kBFloat16Pairs) {
    // Vec<acc_t>, not Vec<float>: dependent names, so that a build without
    // float packets never looks at this branch.
    using Packet = typename Vec<acc_t>::Packet;
    using IntPacket = typename ei::unpacket_traits<Packet>::integer_packet;
    constexpr int W = Vec<acc_t>::kWidth;
    const std::int64_t pairs = n / 2;
    const std::int64_t full = pairs - pairs % W;
    auto* words = reinterpret_cast<int*>(out);
    const IntPacket high = ei::pset1<IntPacket>(static_cast<int>(0xffff0000u));
    const IntPacket one = ei::pset1<IntPacket>(1);
    const IntPacket bias = ei::pset1<IntPacket>(0x7fff);
    const IntPacket nan = ei::pset1<IntPacket>(0x7fc00000);
    // Round to nearest even, as c10::BFloat16(float); NaN stays a quiet NaN.
    const auto round = [&](const Packet& v) {
      const IntPacket bits = ei::preinterpret<IntPacket>(v);
      const IntPacket odd_lsb = ei::pand(ei::plogical_shift_right<16>(bits), one);
      const IntPacket rounded = ei::padd(bits, ei::padd(bias, odd_lsb));
      const IntPacket is_number = ei::preinterpret<IntPacket>(ei::pcmp_eq(v, v));
      return ei::por(ei::pand(rounded, is_number), ei::pandnot(nan, is_number));
    };
    for (std::int64_t i = 0; i < full; i += W) {
      const IntPacket even = round(ei::ploadu<Packet>(values + i));
      const IntPacket odd = round(ei::ploadu<Packet>(values + pairs + i));
      ei::pstoreu(words + i, ei::por(ei::plogical_shift_right<16>(even), ei::pand(odd, high)));
    }
    for (std::int64_t i = full; i < pairs; ++i) {
      out[2 * i] = static_cast<c10::BFloat16>(values[i]);
      out[2 * i + 1] = static_cast<c10::BFloat16>(values[pairs + i]);
    }
    if (n % 2) out[n - 1] = static_cast<c10::BFloat16>(values[n - 1]);
  } else {
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(values[i]);
  }
}

/// Softmax statistics of one block of n >= 1 logits (core::OnlineSoftmax,
/// vectorised): the max in one sweep, then S and A with the cutoff of Note
/// [Softmax cutoff]. The shifted logits are summed alongside: that sum is NaN
/// exactly when the block holds a NaN or +inf, whatever the vector max does
/// with NaN, so the check costs one add per packet. When e_out is not null,
/// e_out[i] = e^(z_i - m) (0 below the cutoff) for the block's max m.
template <class acc_t>
inline core::OnlineSoftmax<acc_t> block_softmax(const acc_t* z, std::int64_t n,
                                                acc_t* e_out = nullptr) {
  using Packet = typename Vec<acc_t>::Packet;
  constexpr int W = Vec<acc_t>::kWidth;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const std::int64_t full = n - n % W;
  // The tail, padded with -inf (probability zero, max unchanged).
  alignas(64) acc_t tail[W];
  for (int i = 0; i < W; ++i) tail[i] = full + i < n ? z[full + i] : -inf;

  Packet vmax = ei::pset1<Packet>(-inf);
  for (std::int64_t i = 0; i < full; i += W) vmax = ei::pmax(vmax, ei::ploadu<Packet>(z + i));
  if (full < n) vmax = ei::pmax(vmax, ei::ploadu<Packet>(tail));
  const acc_t m = ei::predux_max(vmax);
  if (m == -inf) {
    if (e_out) std::fill(e_out, e_out + n, acc_t(0));
    // Every logit is -inf, or a NaN hid behind the max: rare, tell them apart.
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(z[i] == -inf)) {
        return core::OnlineSoftmax<acc_t>::from_parts(m, std::numeric_limits<acc_t>::quiet_NaN(),
                                                      acc_t(0));
      }
    }
    return {};
  }
  const Packet pm = ei::pset1<Packet>(m);
  const Packet lo = ei::pset1<Packet>(core::softmax_cutoff<acc_t>());
  Packet sum = ei::pset1<Packet>(acc_t(0));
  Packet weighted = sum, check = sum;
  const auto step = [&](const Packet& zp) {
    const Packet y = ei::psub(zp, pm);
    check = ei::padd(check, y);
    const Packet y_cut = ei::pmax(y, lo);
    const Packet e = ei::pand(exp_nonpositive<acc_t>(y_cut), ei::pcmp_le(lo, y));
    sum = ei::padd(sum, e);
    weighted = ei::pmadd(e, y_cut, weighted);
    return e;
  };
  for (std::int64_t i = 0; i < full; i += W) {
    const Packet e = step(ei::ploadu<Packet>(z + i));
    if (e_out) ei::pstoreu(e_out + i, e);
  }
  if (full < n) {
    ei::pstoreu(tail, step(ei::ploadu<Packet>(tail)));
    if (e_out) std::copy(tail, tail + (n - full), e_out + full);
  }
  const acc_t c = ei::predux(check);
  if (c != c) {
    return core::OnlineSoftmax<acc_t>::from_parts(m, std::numeric_limits<acc_t>::quiet_NaN(),
                                                  acc_t(0));
  }
  return core::OnlineSoftmax<acc_t>::from_parts(m, ei::predux(sum), ei::predux(weighted));
}

/// out[i] = p_i (c0 + c1 y_i) for a block of logits z, with y = z - m and
/// p = e^{y - log S} (cutoff of Note [Softmax cutoff]): the gradient of
/// core::token_logprob_grad times 1 / temperature for every entry but the
/// label, with c0 = -(g - h A/S) / temperature and c1 = -h / temperature.
template <class acc_t>
inline void block_grad(const acc_t* z, std::int64_t n, acc_t m, acc_t log_sum, acc_t c0, acc_t c1,
                       acc_t* out) {
  using Packet = typename Vec<acc_t>::Packet;
  constexpr int W = Vec<acc_t>::kWidth;
  const std::int64_t full = n - n % W;
  const Packet pm = ei::pset1<Packet>(m);
  const Packet pls = ei::pset1<Packet>(log_sum);
  const Packet lo = ei::pset1<Packet>(core::softmax_cutoff<acc_t>());
  const Packet p0 = ei::pset1<Packet>(c0);
  const Packet p1 = ei::pset1<Packet>(c1);
  const auto step = [&](const Packet& zp) {
    const Packet y = ei::psub(zp, pm);
    const Packet t = ei::psub(y, pls);
    const Packet p = ei::pand(exp_nonpositive<acc_t>(ei::pmax(t, lo)), ei::pcmp_le(lo, t));
    // y >= t >= cutoff wherever p != 0; elsewhere any finite y will do.
    return ei::pmul(p, ei::pmadd(p1, ei::pmax(y, lo), p0));
  };
  for (std::int64_t i = 0; i < full; i += W) ei::pstoreu(out + i, step(ei::ploadu<Packet>(z + i)));
  if (full < n) {
    alignas(64) acc_t tail[W];
    for (int i = 0; i < W; ++i) tail[i] = full + i < n ? z[full + i] : acc_t(0);
    ei::pstoreu(tail, step(ei::ploadu<Packet>(tail)));
    for (std::int64_t i = full; i < n; ++i) out[i] = tail[i - full];
  }
}

/// out[i] = e[i] k for a block of n entries.
template <class acc_t>
inline void block_scale(const acc_t* e, std::int64_t n, acc_t k, acc_t* out) {
  Eigen::Map<Eigen::Array<acc_t, Eigen::Dynamic, 1>>(out, n) =
      Eigen::Map<const Eigen::Array<acc_t, Eigen::Dynamic, 1>>(e, n) * k;
}

/// Lowers `target` to `value` if smaller (first bad row).
inline void atomic_min(std::atomic<std::int64_t>& target, std::int64_t value) {
  std::int64_t seen = target.load();
  while (value < seen && !target.compare_exchange_weak(seen, value)) {
  }
}

/// Rows per parallel task: enough logits to amortise scheduling.
inline std::int64_t row_grain(std::int64_t vocab) {
  return std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(vocab, 1));
}

/// The label's logit as its block saw it (same conversion and scaling), so
/// that log p is consistent with the row's statistics to the last bit.
/// label is already clamped into the row (core::clamped_label).
template <class acc_t, class scalar_t>
inline acc_t label_logit(const scalar_t* x, std::int64_t label, acc_t scale, bool scaled) {
  const acc_t z = static_cast<acc_t>(x[label]);
  return scaled ? z * scale : z;
}

/// The block functions of the row loops below on Eigen's packets (the
/// consumer's instruction set); cpu/simd_blocks.hpp has the same for AVX2
/// and AVX-512 (Note [Run-time ISA dispatch]).
struct EigenBlocks {
  /// block_softmax
  template <class acc_t>
  static core::OnlineSoftmax<acc_t> softmax(const acc_t* z, std::int64_t n,
                                            acc_t* e_out = nullptr) {
    return block_softmax(z, n, e_out);
  }
  /// block_scale (Eigen's packets have no non-temporal store: `stream` is
  /// ignored, as in store)
  template <class acc_t>
  static void scale(const acc_t* e, std::int64_t n, acc_t k, acc_t* out, bool /*stream*/ = false) {
    block_scale(e, n, k, out);
  }
  static void stream_fence() {}
  /// block_grad
  template <class acc_t>
  static void grad(const acc_t* z, std::int64_t n, acc_t m, acc_t log_sum, acc_t c0, acc_t c1,
                   acc_t* out) {
    block_grad(z, n, m, log_sum, c0, c1, out);
  }
  /// load_block
  template <class acc_t, class scalar_t>
  static const acc_t* load(const scalar_t* x, std::int64_t n, acc_t scale, bool scaled,
                           acc_t* buf) {
    return load_block(x, n, scale, scaled, buf);
  }
  /// store_block
  template <class acc_t, class scalar_t>
  static void store(const acc_t* values, std::int64_t n, scalar_t* out, bool /*stream*/ = false) {
    store_block(values, n, out);
  }
};

}  // namespace kernel_detail

namespace kernel_detail {

/// A row's exponentials as row_softmax leaves them for a gradient that
/// reuses them (Note [Gradient in the forward pass]): e[i] = e^(z_i - m_b)
/// (0 below the cutoff), in load_block's order within each block, where m_b
/// = block_max[b] is the max of the block b that holds entry i.
template <class acc_t>
struct RowExp {
  acc_t* e = nullptr;          ///< [vocab]
  acc_t* block_max = nullptr;  ///< [ceil(vocab / kVocabBlock)]
};

/// The softmax statistics of one row of logits x (Note [One pass over the
/// logits]); buf holds kVocabBlock entries. Fills ex when it is not null.
template <class scalar_t, class acc_t, class Blocks>
inline core::OnlineSoftmax<acc_t> row_softmax(const scalar_t* x, std::int64_t vocab,
                                              acc_t inv_temperature, bool scaled, acc_t* buf,
                                              const RowExp<acc_t>* ex = nullptr) {
  core::OnlineSoftmax<acc_t> row;
  for (std::int64_t col = 0; col < vocab; col += kVocabBlock) {
    const std::int64_t n = std::min(kVocabBlock, vocab - col);
    const core::OnlineSoftmax<acc_t> block = Blocks::softmax(
        Blocks::load(x + col, n, inv_temperature, scaled, buf), n, ex ? ex->e + col : nullptr);
    if (ex) ex->block_max[col / kVocabBlock] = block.max;
    row.merge(block);
  }
  return row;
}

/// Row statistics as backward reads them: {m, log S, A / S}.
template <class acc_t>
struct RowStats {
  acc_t max = 0, log_sum = 0, mean_shifted = 0;  ///< zero for a row that is not scored
};

/// out[label] = the row's gradient at its label, which also gets the
/// one-hot term (the label clamped as forward read it).
template <class scalar_t, class acc_t>
inline void label_gradient(const scalar_t* x, std::int64_t label, acc_t inv_temperature,
                           bool scaled, const RowStats<acc_t>& s, acc_t g, acc_t h, scalar_t* out) {
  const acc_t y_label = label_logit(x, label, inv_temperature, scaled) - s.max;
  out[label] = static_cast<scalar_t>(
      inv_temperature * core::token_logprob_grad(y_label, true, s.log_sum, s.mean_shifted, g, h));
}

/// out[0, vocab) = d(g log p + h H) / d x for one row x of logits with
/// statistics s and (clamped) label; a zero row, without reading x, when g
/// and h are both zero. buf and out_buf hold kVocabBlock entries each.
template <class scalar_t, class acc_t, class Blocks>
inline void row_gradient(const scalar_t* x, std::int64_t vocab, std::int64_t label,
                         acc_t inv_temperature, bool scaled, const RowStats<acc_t>& s, acc_t g,
                         acc_t h, scalar_t* out, acc_t* buf, acc_t* out_buf) {
  if (g == acc_t(0) && h == acc_t(0)) {
    std::memset(static_cast<void*>(out), 0, static_cast<std::size_t>(vocab) * sizeof(scalar_t));
    return;
  }
  const acc_t c0 = -(g - h * s.mean_shifted) * inv_temperature;
  const acc_t c1 = -h * inv_temperature;
  for (std::int64_t col = 0; col < vocab; col += kVocabBlock) {
    const std::int64_t n = std::min(kVocabBlock, vocab - col);
    const acc_t* z = Blocks::load(x + col, n, inv_temperature, scaled, buf);
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      Blocks::grad(z, n, s.max, s.log_sum, c0, c1, out + col);
    } else {
      Blocks::grad(z, n, s.max, s.log_sum, c0, c1, out_buf);
      Blocks::store(out_buf, n, out + col);
    }
  }
  label_gradient(x, label, inv_temperature, scaled, s, g, h, out);
}

/// The gradient of one row with h = 0 from the exponentials its forward
/// kept: out = d(g log p) / d x, p_i = e_i e^(m_b - m - log S) (Note
/// [Gradient in the forward pass]), the label's entry as in row_gradient.
template <class scalar_t, class acc_t, class Blocks>
inline void row_gradient_from_exp(const RowExp<acc_t>& ex, const scalar_t* x, std::int64_t vocab,
                                  std::int64_t label, acc_t inv_temperature, bool scaled,
                                  const RowStats<acc_t>& s, acc_t g, scalar_t* out,
                                  acc_t* out_buf) {
  const acc_t c0 = -g * inv_temperature;
  for (std::int64_t col = 0; col < vocab; col += kVocabBlock) {
    const std::int64_t n = std::min(kVocabBlock, vocab - col);
    const acc_t k = c0 * std::exp(ex.block_max[col / kVocabBlock] - s.max - s.log_sum);
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      Blocks::scale(ex.e + col, n, k, out + col, /*stream=*/true);
    } else {
      Blocks::scale(ex.e + col, n, k, out_buf);
      Blocks::store(out_buf, n, out + col, /*stream=*/true);
    }
  }
  Blocks::stream_fence();
  label_gradient(x, label, inv_temperature, scaled, s, g, acc_t(0), out);
}

/// The forward loop over every row (token_logprobs_forward's contract),
/// then after_row(r, x, label, stats, buf, ex) on the thread that reduced
/// row r, while the row is still in its cache; x is null for a row that is
/// not scored (label = ignore_index), label the clamped label otherwise; ex
/// is the row's exponentials when keep_exp, null otherwise.
template <class scalar_t, class acc_t, class Blocks, class AfterRow>
LogitsForwardStatus forward_rows(const LogitsRows& logits, const std::int64_t* labels,
                                 std::int64_t ignore_index, acc_t inv_temperature, acc_t* logp,
                                 acc_t* entropy, acc_t* stats, bool keep_exp,
                                 const AfterRow& after_row) {
  const bool scaled = inv_temperature != acc_t(1);
  const std::int64_t vocab = logits.vocab;
  const auto* base = static_cast<const scalar_t*>(logits.data);
  constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();
  std::atomic<std::int64_t> first_nonfinite{kNone}, first_all_neg_inf{kNone},
      first_bad_label{kNone};

  at::parallel_for(0, logits.rows, row_grain(vocab), [&](std::int64_t begin, std::int64_t end) {
    alignas(64) acc_t buf[kVocabBlock];
    // One row's exponentials and block maxima, reused by every row of the task.
    const std::int64_t blocks = (vocab + kVocabBlock - 1) / kVocabBlock;
    std::vector<acc_t> kept(keep_exp ? static_cast<std::size_t>(vocab + blocks) : 0);
    const RowExp<acc_t> ex{kept.data(), kept.data() + vocab};
    const RowExp<acc_t>* row_exp = keep_exp ? &ex : nullptr;
    for (std::int64_t r = begin; r < end; ++r) {
      RowStats<acc_t> s;
      if (labels[r] == ignore_index) {
        logp[r] = entropy[r] = acc_t(0);
        if (stats) stats[3 * r] = stats[3 * r + 1] = stats[3 * r + 2] = acc_t(0);
        after_row(r, static_cast<const scalar_t*>(nullptr), std::int64_t(0), s, buf, row_exp);
        continue;
      }
      const scalar_t* x = base + logits.offset(r);
      const core::OnlineSoftmax<acc_t> row =
          row_softmax<scalar_t, acc_t, Blocks>(x, vocab, inv_temperature, scaled, buf, row_exp);
      if (row.invalid()) atomic_min(first_nonfinite, r);
      if (row.empty()) atomic_min(first_all_neg_inf, r);
      const std::int64_t label = core::clamped_label(labels[r], vocab);
      if (label != labels[r]) atomic_min(first_bad_label, r);
      logp[r] = row.log_prob(label_logit(x, label, inv_temperature, scaled));
      entropy[r] = row.entropy();
      s.max = row.max;
      s.log_sum = row.log_sum();
      s.mean_shifted = row.mean_shifted();
      if (stats) {
        stats[3 * r] = s.max;
        stats[3 * r + 1] = s.log_sum;
        stats[3 * r + 2] = s.mean_shifted;
      }
      after_row(r, x, label, s, buf, row_exp);
    }
  });

  LogitsForwardStatus status;
  if (first_nonfinite.load() != kNone) status.first_nonfinite_row = first_nonfinite.load();
  if (first_all_neg_inf.load() != kNone) status.first_all_neg_inf_row = first_all_neg_inf.load();
  if (first_bad_label.load() != kNone) status.first_bad_label_row = first_bad_label.load();
  return status;
}

}  // namespace kernel_detail

/// Forward over every row: logp[r] = log p(labels[r]), entropy[r] = H, and
/// (when stats is not null) stats[3r..3r+2] = {m, log S, A / S} for backward.
/// Rows whose label is ignore_index are not read: logp = entropy = 0 and
/// stats = 0. A label outside [0, vocab) reads the nearest entry and is
/// reported (Note [Out-of-range labels]); no access leaves the row. Outputs
/// are contiguous [rows] (stats [rows, 3]). A row with a NaN or +inf logit
/// gets NaN outputs and is reported. Results do not depend on the thread
/// count: each row is reduced by one thread in a fixed order. Blocks: the
/// block functions (kernel_detail::EigenBlocks or an instruction set's).
template <class scalar_t, class acc_t, class Blocks = kernel_detail::EigenBlocks>
LogitsForwardStatus token_logprobs_forward(const LogitsRows& logits, const std::int64_t* labels,
                                           std::int64_t ignore_index, acc_t inv_temperature,
                                           acc_t* logp, acc_t* entropy, acc_t* stats) {
  return kernel_detail::forward_rows<scalar_t, acc_t, Blocks>(
      logits, labels, ignore_index, inv_temperature, logp, entropy, stats, /*keep_exp=*/false,
      [](std::int64_t, const scalar_t*, std::int64_t, const kernel_detail::RowStats<acc_t>&, acc_t*,
         const kernel_detail::RowExp<acc_t>*) {});
}

// Note [Gradient in the forward pass]
// A loss whose per-token gradient is known as soon as the token's logp is
// (the clipped objective with token ratios, an entropy bonus) gets its
// dlogits from token_logprobs_forward_backward: each row is reduced, its
// gradient coefficients are taken from row_grad, and the row's gradient is
// written at once by the same thread, while the row (128 KB at V = 32000 in
// float32) is still in that core's L2 cache. The logits are read from
// memory once instead of twice (once forward, once backward). logp, the
// entropy and the statistics are those of token_logprobs_forward, bit for
// bit. Where h = 0 (no entropy term: PSFT's default) the gradient reuses
// the exponentials of the forward's sweep instead of computing e^x again:
// the sweep stores e_i = e^(z_i - m_b) relative to its block's max m_b
// (kVocabBlock entries), and p_i = e_i e^(m_b - m - log S), one multiply
// per entry and one exp per block. That saves an exp and, for bfloat16 and
// float16, a widening per entry, and costs a row of floats per thread,
// written and read in L2. The product rounds twice where
// token_logprobs_backward's p = e^(z - m - log S) rounds once, so the two
// gradients agree to a few float rounding errors, not bit for bit; an
// entry the backward's cutoff zeroes is at most e^cutoff here. Rows with
// h != 0 take row_gradient, token_logprobs_backward's own row function.
// The reused rows' gradient goes out with non-temporal stores where the
// block functions have them (Blocks::scale's and Blocks::store's
// `stream`; a fence per row): nothing reads it before backward, and a
// plain store would first read each of its cache lines from memory.

/// token_logprobs_forward, and for every row grad[r, :] = d(g_r log p_r +
/// h_r H_r) / d logits with {g_r, h_r} = row_grad(r, logp[r], entropy[r])
/// (Note [Gradient in the forward pass]); row_grad is not called for rows
/// that are not scored, whose gradient is zero. grad is contiguous
/// [rows, vocab] in scalar_t; stats as in token_logprobs_forward.
template <class scalar_t, class acc_t, class Blocks, class RowGrad>
LogitsForwardStatus token_logprobs_forward_backward(const LogitsRows& logits,
                                                    const std::int64_t* labels,
                                                    std::int64_t ignore_index,
                                                    acc_t inv_temperature, acc_t* logp,
                                                    acc_t* entropy, acc_t* stats,
                                                    const RowGrad& row_grad, scalar_t* grad) {
  const bool scaled = inv_temperature != acc_t(1);
  const std::int64_t vocab = logits.vocab;
  return kernel_detail::forward_rows<scalar_t, acc_t, Blocks>(
      logits, labels, ignore_index, inv_temperature, logp, entropy, stats,
      /*keep_exp=*/true,
      [&](std::int64_t r, const scalar_t* x, std::int64_t label,
          const kernel_detail::RowStats<acc_t>& s, acc_t* buf,
          const kernel_detail::RowExp<acc_t>* ex) {
        scalar_t* out = grad + r * vocab;
        if (!x) {
          std::memset(static_cast<void*>(out), 0,
                      static_cast<std::size_t>(vocab) * sizeof(scalar_t));
          return;
        }
        alignas(64) acc_t out_buf[kVocabBlock];
        const auto gh = row_grad(r, logp[r], entropy[r]);
        if (gh.second == acc_t(0) && gh.first != acc_t(0) && std::isfinite(s.max) &&
            std::isfinite(s.log_sum)) {
          kernel_detail::row_gradient_from_exp<scalar_t, acc_t, Blocks>(
              *ex, x, vocab, label, inv_temperature, scaled, s, gh.first, out, out_buf);
          return;
        }
        kernel_detail::row_gradient<scalar_t, acc_t, Blocks>(
            x, vocab, label, inv_temperature, scaled, s, gh.first, gh.second, out, buf, out_buf);
      });
}

/// Backward over every row: grad[r, :] = d(g_r log p_r + h_r H_r) / d logits
/// with g = grad_logp and h = grad_entropy (either may be null: zero),
/// written in scalar_t to a contiguous [rows, vocab] buffer. Rows whose
/// label is ignore_index, or whose g and h are both zero, become zero rows
/// without reading the logits. stats comes from token_logprobs_forward;
/// Blocks as there.
template <class scalar_t, class acc_t, class Blocks = kernel_detail::EigenBlocks>
void token_logprobs_backward(const LogitsRows& logits, const std::int64_t* labels,
                             std::int64_t ignore_index, acc_t inv_temperature, const acc_t* stats,
                             const acc_t* grad_logp, const acc_t* grad_entropy, scalar_t* grad) {
  const bool scaled = inv_temperature != acc_t(1);
  const std::int64_t vocab = logits.vocab;
  const auto* base = static_cast<const scalar_t*>(logits.data);

  at::parallel_for(
      0, logits.rows, kernel_detail::row_grain(vocab), [&](std::int64_t begin, std::int64_t end) {
        alignas(64) acc_t buf[kVocabBlock];
        alignas(64) acc_t out_buf[kVocabBlock];
        for (std::int64_t r = begin; r < end; ++r) {
          scalar_t* out = grad + r * vocab;
          const bool scored = labels[r] != ignore_index;
          const acc_t g = scored && grad_logp ? grad_logp[r] : acc_t(0);
          const acc_t h = scored && grad_entropy ? grad_entropy[r] : acc_t(0);
          const kernel_detail::RowStats<acc_t> s{stats[3 * r], stats[3 * r + 1], stats[3 * r + 2]};
          kernel_detail::row_gradient<scalar_t, acc_t, Blocks>(
              base + logits.offset(r), vocab, core::clamped_label(labels[r], vocab),
              inv_temperature, scaled, s, g, h, out, buf, out_buf);
        }
      });
}

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
