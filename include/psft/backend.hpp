#pragma once
/// \file
/// Which implementation computes psft's losses for a given tensor.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN

/// True when this translation unit was built with psft's CUDA kernels.
constexpr bool has_cuda_kernels() {
#if defined(PSFT_WITH_CUDA_KERNELS)
  return true;
#else
  return false;
#endif
}

/// The backend that runs for tensors like `t` when `requested` is asked for:
/// Auto picks the fused kernel of the tensor's device if one is compiled in,
/// else Composed. Asking for a fused backend that cannot run is an error.
inline Backend backend_for(const at::Tensor& t, Backend requested = Backend::Auto) {
  const bool cpu = t.device().is_cpu();
  const bool cuda = t.device().is_cuda();
  switch (requested) {
    case Backend::Auto:
      if (cpu) return Backend::FusedCpu;
      if (cuda && has_cuda_kernels()) return Backend::FusedCuda;
      return Backend::Composed;
    case Backend::FusedCpu:
      TORCH_CHECK(cpu, "psft: Backend::FusedCpu needs CPU tensors, got ", t.device());
      return requested;
    case Backend::FusedCuda:
      TORCH_CHECK(cuda, "psft: Backend::FusedCuda needs CUDA tensors, got ", t.device());
      TORCH_CHECK(has_cuda_kernels(),
                  "psft: Backend::FusedCuda was requested but this build has no psft CUDA "
                  "kernels; use Backend::Auto or Backend::Composed");
      return requested;
    case Backend::Composed:
      return requested;
  }
  return Backend::Composed;
}

/// Human-readable backend name, for logs.
inline const char* backend_name(Backend b) {
  switch (b) {
    case Backend::Auto:
      return "auto";
    case Backend::FusedCpu:
      return "fused-cpu";
    case Backend::FusedCuda:
      return "fused-cuda";
    case Backend::Composed:
      return "composed";
  }
  return "?";
}

PSFT_NAMESPACE_END
