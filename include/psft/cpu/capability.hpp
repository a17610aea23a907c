#pragma once
/// \file
/// Which vector instructions the CPU kernels use, chosen at run time (Note
/// [Run-time ISA dispatch]): the baseline the consumer compiled for, AVX2
/// with FMA and F16C, or AVX-512. cpu_capability() is the choice; the environment
/// variable PSFT_CPU_CAPABILITY (default, avx2, avx512; read once) or
/// set_cpu_capability() lowers it.

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "psft/core/config.hpp"

// Note [Run-time ISA dispatch]
// psft's kernels are headers, compiled with the consumer's flags, and a
// consumer's ordinary Release build targets the x86-64 baseline (SSE2),
// where Eigen's packets are 4 floats wide. So that such a build runs what
// a -march=native build runs, the from-logits kernels' block functions
// (cpu/simd_blocks.hpp: the max, exp and sum sweeps of a vocabulary block,
// its gradient, and the bf16 and fp16 conversions (F16C); and the clipped
// objective's token blocks, cpu/token_block.hpp's packet_block on these
// vectors, with its input conversions and gradient store) are compiled twice
// more, for AVX2 + FMA + F16C and for AVX-512, with GCC's or Clang's target pragmas and GCC
// vector extensions (which need no -m flag), and a call picks one at run
// time from what the CPU reports (CPUID and XGETBV), as ATen picks
// its CPU_CAPABILITY kernels. The row loops, the statistics' merge and
// every per-token formula are shared. Each path gives results within the
// kernels' stated tolerances of the double reference, and each is bitwise
// independent of the thread count; two paths differ in the last bits (FMA
// and the order of a block's sums). Float64 logits keep the baseline path.
// Other compilers and architectures, and the notebooks' interpreter, have
// the baseline path only.

/// 1 where the kernels can run AVX2 or AVX-512 code whatever the build's
/// flags (GCC or Clang on x86-64, not the notebooks' interpreter), else 0.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(__CLING__)
#define PSFT_ISA_DISPATCH 1
#else
#define PSFT_ISA_DISPATCH 0
#endif

#if PSFT_ISA_DISPATCH
#include <cpuid.h>
#endif

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// The vector instruction sets the CPU kernels can run.
enum class CpuCapability {
  Default = 0,  ///< what the consumer compiled for (SSE2 on plain x86-64)
  Avx2 = 1,     ///< AVX2 with FMA and F16C
  Avx512 = 2,   ///< AVX-512 (F)
};

/// The name PSFT_CPU_CAPABILITY takes for c: "default", "avx2", "avx512".
inline const char* capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::Avx2:
      return "avx2";
    case CpuCapability::Avx512:
      return "avx512";
    default:
      return "default";
  }
}

/// The best capability this CPU and build support: the CPU's feature bits
/// (CPUID) and whether the operating system saves the wider registers
/// (XGETBV), read directly, so that nothing needs the compiler runtime's
/// CPU model (absent in a C++ interpreter).
inline CpuCapability detected_cpu_capability() {
#if PSFT_ISA_DISPATCH
  static const CpuCapability detected = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return CpuCapability::Default;
    const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u,
               f16c = (c >> 29) & 1u;
    if (!osxsave || !avx) return CpuCapability::Default;
    unsigned xcr0 = 0, xcr0_high = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
    const bool ymm_saved = (xcr0 & 0x6u) == 0x6u;    // SSE and AVX state
    const bool zmm_saved = (xcr0 & 0xe6u) == 0xe6u;  // and the AVX-512 state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return CpuCapability::Default;
    const bool avx2 = (b >> 5) & 1u, avx512f = (b >> 16) & 1u;
    if (avx512f && avx2 && fma && f16c && zmm_saved) return CpuCapability::Avx512;
    if (avx2 && fma && f16c && ymm_saved) return CpuCapability::Avx2;
    return CpuCapability::Default;
  }();
  return detected;
#else
  return CpuCapability::Default;
#endif
}

namespace capability_detail {

/// The capability in use; starts at PSFT_CPU_CAPABILITY's, capped by the CPU's.
inline CpuCapability& current() {
  static CpuCapability c = [] {
    const CpuCapability best = detected_cpu_capability();
    const char* env = std::getenv("PSFT_CPU_CAPABILITY");
    if (!env || !*env) return best;
    CpuCapability asked = best;
    if (std::strcmp(env, "default") == 0) {
      asked = CpuCapability::Default;
    } else if (std::strcmp(env, "avx2") == 0) {
      asked = CpuCapability::Avx2;
    } else if (std::strcmp(env, "avx512") != 0) {
      TORCH_WARN("psft: PSFT_CPU_CAPABILITY=", env, " is not one of default, avx2, avx512; using ",
                 capability_name(best));
    }
    return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
  }();
  return c;
}

}  // namespace capability_detail

/// The vector instruction set the CPU kernels use now.
inline CpuCapability cpu_capability() { return capability_detail::current(); }

/// Makes the CPU kernels use c from now on (benchmarks and tests compare
/// the paths). Not thread-safe against kernels running at the same time.
/// \throws c10::Error when this CPU or build cannot run c.
inline void set_cpu_capability(CpuCapability c) {
  TORCH_CHECK(static_cast<int>(c) >= 0 &&
                  static_cast<int>(c) <= static_cast<int>(detected_cpu_capability()),
              "psft::cpu::set_cpu_capability: this CPU and build support up to ",
              capability_name(detected_cpu_capability()), ", not ", static_cast<int>(c));
  capability_detail::current() = c;
}

}  // namespace cpu
PSFT_NAMESPACE_END
