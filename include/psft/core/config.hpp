#pragma once
/// \file
/// Build-wide macros shared by every layer: host/device qualifiers and the
/// ABI namespace. Torch-free and Eigen-free.

/// Library version, major part (also in CMakeLists.txt and psftConfigVersion.cmake).
#define PSFT_VERSION_MAJOR 0
/// Library version, minor part.
#define PSFT_VERSION_MINOR 1
/// Library version, patch part.
#define PSFT_VERSION_PATCH 0

#if defined(__CUDACC__) || defined(__HIPCC__)
/// Marks functions callable from host and device code (empty outside nvcc/hipcc).
#define PSFT_HOST_DEVICE __host__ __device__
#else
/// Marks functions callable from host and device code (empty outside nvcc/hipcc).
#define PSFT_HOST_DEVICE
#endif

// Note [ABI namespace]
// psft is header-only, so the same inline function can be compiled by g++ in
// one translation unit and by nvcc in another. Their bodies may differ (nvcc
// sees PSFT_HOST_DEVICE), which would break the one-definition rule at link
// time. Every psft symbol therefore lives in an inline namespace whose name
// says which compiler built it; users still write psft::name.
#if defined(__CUDACC__)
/// The inline ABI namespace (Note [ABI namespace]).
#define PSFT_ABI_NAMESPACE v0_cuda
#else
/// The inline ABI namespace (Note [ABI namespace]).
#define PSFT_ABI_NAMESPACE v0_host
#endif

/// Opens namespace psft and its inline ABI namespace.
#define PSFT_NAMESPACE_BEGIN \
  namespace psft {           \
  inline namespace PSFT_ABI_NAMESPACE {
/// Closes what PSFT_NAMESPACE_BEGIN opened.
#define PSFT_NAMESPACE_END \
  }                        \
  }
