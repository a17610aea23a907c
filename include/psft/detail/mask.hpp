#pragma once
/// \file
/// One rule for every `mask` argument of the public API (Note [Mask
/// argument]): bool, floating token weights, or an integer tensor of 0/1
/// (Hugging Face's int64 attention_mask).

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace detail {

// Note [Mask argument]
// A mask is bool (true: the token counts), floating (a token weight >= 0),
// or integer with values 0 and 1 only, which becomes bool. Any other integer
// value is refused rather than read as a weight: a mask of token ids or of
// 2s is a bug, not a weighting. The integer check reads the mask, which on an
// accelerator costs one host-device synchronisation; pass bool masks there.

/// The mask as the kernels read it: bool and floating masks unchanged
/// (detached), integer masks checked to be 0/1 and converted to bool.
/// Raises c10::Error naming `name` otherwise. `mask` must be defined.
inline at::Tensor mask_argument(const char* api, const char* name, const at::Tensor& mask) {
  const at::ScalarType t = mask.scalar_type();
  if (t == at::kBool || at::isFloatingType(t)) return mask.detach();
  TORCH_CHECK(at::isIntegralType(t, /*includeBool=*/false), api, ": ", name,
              " must be bool, floating (token weights) or integer 0/1, got ", t);
  const at::Tensor m = mask.detach();
  if (m.numel() > 0) {
    const bool zero_one = at::logical_or(m == 0, m == 1).all().item<bool>();
    TORCH_CHECK(zero_one, api, ": ", name,
                " is an integer tensor, so its values must be 0 or 1 (use a floating mask for "
                "token weights), got min ",
                m.min().item<std::int64_t>(), " and max ", m.max().item<std::int64_t>());
  }
  return m != 0;
}

}  // namespace detail
PSFT_NAMESPACE_END
