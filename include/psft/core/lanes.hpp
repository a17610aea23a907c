#pragma once
/// \file
/// Scalar lane operations: what an objective rule (core/objective_rule.hpp)
/// calls besides the arithmetic operators, for one token at a time (CPU
/// scalar loops, CUDA threads, the Eigen API). The CPU packet path
/// (cpu/packet_lanes.hpp) and the composed ATen path
/// (composed/tensor_lanes.hpp) provide the same operations over a packet
/// of tokens and over whole tensors (Note [Objective rules]).

#include <cmath>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// Lane operations on one value of type T; masks are bool.
template <class T>
struct ScalarLanes {
  using Scalar = T;   ///< the parameters' type
  using Value = T;    ///< one token's value
  using Mask = bool;  ///< one token's condition

  ///@{
  /// The lane operations of Note [Objective rules]: splat a parameter,
  /// an all-false mask, select, min(a, b) = b < a ? b : a, max(a, b) =
  /// a < b ? b : a, abs, exp, and, or and not of masks.
  PSFT_HOST_DEVICE static Value splat(Scalar x) { return x; }
  PSFT_HOST_DEVICE static Mask none() { return false; }
  PSFT_HOST_DEVICE static Value select(Mask m, Value a, Value b) { return m ? a : b; }
  PSFT_HOST_DEVICE static Value min(Value a, Value b) { return b < a ? b : a; }
  PSFT_HOST_DEVICE static Value max(Value a, Value b) { return a < b ? b : a; }
  PSFT_HOST_DEVICE static Value abs(Value a) { return a < T(0) ? -a : a; }
  PSFT_HOST_DEVICE static Value exp(Value a) {
    using std::exp;
    return exp(a);
  }
  PSFT_HOST_DEVICE static Mask both(Mask a, Mask b) { return a && b; }
  PSFT_HOST_DEVICE static Mask either(Mask a, Mask b) { return a || b; }
  PSFT_HOST_DEVICE static Mask negate(Mask a) { return !a; }
  ///@}
};

}  // namespace core
PSFT_NAMESPACE_END
