#pragma once
/// \file
/// Build-wide macros shared by every layer: host/device qualifiers and the
/// ABI namespace. Torch-free and Eigen-free.

/// Library version (also in CMakeLists.txt and psftConfigVersion.cmake).
#define PSFT_VERSION_MAJOR 0
#define PSFT_VERSION_MINOR 1
#define PSFT_VERSION_PATCH 0

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSFT_HOST_DEVICE __host__ __device__
#else
#define PSFT_HOST_DEVICE
#endif

// Note [ABI namespace]
// psft is header-only, so the same inline function can be compiled by g++ in
// one translation unit and by nvcc in another. Their bodies may differ (nvcc
// sees PSFT_HOST_DEVICE), which would break the one-definition rule at link
// time. Every psft symbol therefore lives in an inline namespace whose name
// says which compiler built it; users still write psft::name.
#if defined(__CUDACC__)
#define PSFT_ABI_NAMESPACE v0_cuda
#else
#define PSFT_ABI_NAMESPACE v0_host
#endif

#define PSFT_NAMESPACE_BEGIN \
  namespace psft {           \
  inline namespace PSFT_ABI_NAMESPACE {
#define PSFT_NAMESPACE_END \
  }                        \
  }
