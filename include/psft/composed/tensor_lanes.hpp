#pragma once
/// \file
/// Lane operations on whole tensors, for the composed backend: the
/// objective rules (Note [Objective rules]) run on [rows, cols] tensors of
/// every token at once, as they run on one token. Masks are bool tensors;
/// constants are 0-d tensors of the values' dtype and device, which
/// broadcast.

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace composed {

/// Lane operations on tensors of the accumulation dtype `options`.
struct TensorLanes {
  using Scalar = double;     ///< the parameters' type
  using Value = at::Tensor;  ///< the values of every token
  using Mask = at::Tensor;   ///< a bool tensor

  ///@{
  /// core::ScalarLanes' operations on whole tensors.

  at::TensorOptions options;  ///< dtype and device of the values

  Value splat(Scalar x) const { return at::full({}, x, options); }
  Mask none() const { return at::zeros({}, options.dtype(at::kBool)); }
  static Value select(const Mask& m, const Value& a, const Value& b) { return at::where(m, a, b); }
  // As core::ScalarLanes: min(a, b) = b < a ? b : a, max(a, b) = a < b ? b : a.
  static Value min(const Value& a, const Value& b) { return at::where(b < a, b, a); }
  static Value max(const Value& a, const Value& b) { return at::where(a < b, b, a); }
  static Value abs(const Value& a) { return a.abs(); }
  static Value exp(const Value& a) { return a.exp(); }
  static Mask both(const Mask& a, const Mask& b) { return at::logical_and(a, b); }
  static Mask either(const Mask& a, const Mask& b) { return at::logical_or(a, b); }
  static Mask negate(const Mask& a) { return at::logical_not(a); }
  ///@}
};

}  // namespace composed
PSFT_NAMESPACE_END
