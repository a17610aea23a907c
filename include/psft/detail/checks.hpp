#pragma once
/// \file
/// Validation of the clipped objective's arguments: every bad input gets a
/// c10::Error that names the argument, what was expected and what came.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/core/validate.hpp"
#include "psft/detail/clipped_loss_types.hpp"
#include "psft/detail/mask.hpp"

PSFT_NAMESPACE_BEGIN
namespace detail {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const char* api, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), api, ": ", name, " is an undefined tensor");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), api, ": ", name,
              " must be float64, float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const char* api, const char* name, const at::Tensor& t,
                              const at::Tensor& logp) {
  TORCH_CHECK(t.device() == logp.device(), api, ": ", name, " is on ", t.device(),
              " but logp is on ", logp.device());
}

/// Checks every argument of policy_loss and returns the normalised inputs.
/// advantages and mask may be undefined.
inline ClippedLossInputs check_clipped_loss_inputs(const char* api, const at::Tensor& logp,
                                                   const at::Tensor& old_logp,
                                                   const at::Tensor& advantages,
                                                   const at::Tensor& mask, const LossOptions& opts,
                                                   const char* old_name = "old_logp") {
  check_float_tensor(api, "logp", logp);
  TORCH_CHECK(logp.dim() == 1 || logp.dim() == 2, api, ": logp must have shape [B, T] or [N], got ",
              logp.sizes());
  check_float_tensor(api, old_name, old_logp);
  check_same_device(api, old_name, old_logp, logp);
  TORCH_CHECK(old_logp.sizes() == logp.sizes(), api, ": ", old_name, " must have logp's shape ",
              logp.sizes(), ", got ", old_logp.sizes());

  ClippedLossInputs in;
  in.api = api;
  in.old_name = old_name;
  in.rule = core::rule_for(opts.objective.kind);
  in.logp = logp;
  in.old_logp = old_logp.detach();
  in.rows = logp.dim() == 2 ? logp.size(0) : 1;
  in.cols = logp.dim() == 2 ? logp.size(1) : logp.size(0);

  if (advantages.defined()) {
    check_float_tensor(api, "advantages", advantages);
    check_same_device(api, "advantages", advantages, logp);
    at::Tensor a = advantages.detach();
    // One advantage per sequence ([B] or [B, 1]) or per token ([B, T]); a
    // [B] tensor is a per-sequence column, not numpy's trailing broadcast.
    if (a.dim() == 1 && logp.dim() == 2 && a.size(0) == logp.size(0)) a = a.unsqueeze(1);
    const bool per_sequence =
        a.dim() == 2 && logp.dim() == 2 && a.size(0) == logp.size(0) && a.size(1) == 1;
    TORCH_CHECK(a.dim() == 0 || per_sequence || a.sizes() == logp.sizes(), api,
                ": advantages must have logp's shape ", logp.sizes(),
                ", one value per sequence ([B] or [B, 1]) or be 0-d, got ", advantages.sizes());
    in.advantages = a.expand(logp.sizes());
  }
  if (mask.defined()) {
    check_same_device(api, "mask", mask, logp);
    TORCH_CHECK(mask.sizes() == logp.sizes(), api, ": mask must have logp's shape ", logp.sizes(),
                ", got ", mask.sizes());
    in.mask = mask_argument(api, "mask", mask);
  }
  const std::string options_error = core::loss_options_error(opts, static_cast<int>(logp.dim()));
  TORCH_CHECK(options_error.empty(), api, ": ", options_error);
  return in;
}

}  // namespace detail
PSFT_NAMESPACE_END
