#pragma once
/// \file
/// Lane operations on Eigen packets, for the CPU kernel's vector path: the
/// objective rules (Note [Objective rules]) run on a packet of float tokens
/// as they run on one token. A mask is a packet whose lanes are all ones
/// (true) or zero (false), as Eigen's comparisons return.

#include <Eigen/Core>

#include "psft/core/config.hpp"
#include "psft/cpu/packet_warnings.hpp"

// Note [Packet warnings]
PSFT_PACKET_WARNINGS_PUSH

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// One packet of values.
template <class Packet>
struct PacketValue {
  Packet p;  ///< the lanes
};

/// One packet of conditions (all-ones or zero lanes).
template <class Packet>
struct PacketMask {
  Packet p;  ///< all-ones or zero lanes
};

namespace ei_lanes = Eigen::internal;

///@{
/// Arithmetic and comparisons lane by lane.

template <class P>
inline PacketValue<P> operator+(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::padd(a.p, b.p)};
}
template <class P>
inline PacketValue<P> operator-(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::psub(a.p, b.p)};
}
template <class P>
inline PacketValue<P> operator*(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::pmul(a.p, b.p)};
}
template <class P>
inline PacketValue<P> operator/(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::pdiv(a.p, b.p)};
}
template <class P>
inline PacketValue<P> operator-(PacketValue<P> a) {
  return {ei_lanes::pnegate(a.p)};
}
template <class P>
inline PacketMask<P> operator<(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::pcmp_lt(a.p, b.p)};
}
template <class P>
inline PacketMask<P> operator<=(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::pcmp_le(a.p, b.p)};
}
template <class P>
inline PacketMask<P> operator==(PacketValue<P> a, PacketValue<P> b) {
  return {ei_lanes::pcmp_eq(a.p, b.p)};
}
///@}

/// Lane operations on packets of type Packet (float lanes).
template <class Packet>
struct PacketLanes {
  using Scalar = float;               ///< the parameters' type
  using Value = PacketValue<Packet>;  ///< one packet of values
  using Mask = PacketMask<Packet>;    ///< one packet of conditions

  ///@{
  /// core::ScalarLanes' operations, lane by lane.

  static Value splat(Scalar x) { return {ei_lanes::pset1<Packet>(x)}; }
  static Mask none() { return {ei_lanes::pzero(Packet())}; }
  static Value select(Mask m, Value a, Value b) { return {ei_lanes::pselect(m.p, a.p, b.p)}; }
  // As core::ScalarLanes: min(a, b) = b < a ? b : a, max(a, b) = a < b ? b : a.
  static Value min(Value a, Value b) { return select(b < a, b, a); }
  static Value max(Value a, Value b) { return select(a < b, b, a); }
  static Value abs(Value a) { return {ei_lanes::pabs(a.p)}; }
  // flatten: Eigen's pexp is inlined here, inside this header's diagnostic
  // pragmas (GCC would otherwise emit it out of line and warn there).
#if defined(__GNUC__)
  __attribute__((flatten))
#endif
  static Value
  exp(Value a) {
    return {ei_lanes::pexp(a.p)};
  }
  static Value exp_bounded(Value a, Scalar /*bound*/) { return exp(a); }
  static Mask both(Mask a, Mask b) { return {ei_lanes::pand(a.p, b.p)}; }
  static Mask either(Mask a, Mask b) { return {ei_lanes::por(a.p, b.p)}; }
  static Mask negate(Mask a) { return {ei_lanes::pandnot(ei_lanes::ptrue(a.p), a.p)}; }
  ///@}

  ///@{
  /// What cpu::packet_block adds (Note [Packet path]): the lanes per
  /// packet, an unaligned load and store, and the sum, smallest and largest
  /// lane.
  static constexpr int kLanes = ei_lanes::unpacket_traits<Packet>::size;
  static Value load(const float* p) { return {ei_lanes::ploadu<Packet>(p)}; }
  static void store(float* p, Value v) { ei_lanes::pstoreu(p, v.p); }
  static float sum(Value v) { return ei_lanes::predux(v.p); }
  static float lowest(Value v) { return ei_lanes::predux_min(v.p); }
  static float highest(Value v) { return ei_lanes::predux_max(v.p); }
  ///@}
};

}  // namespace cpu
PSFT_NAMESPACE_END

PSFT_PACKET_WARNINGS_POP
