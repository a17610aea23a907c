#pragma once
/// \file
/// The from-logits kernels' block functions compiled for AVX2 + FMA
/// (cpu::simd_avx2::Blocks) and AVX-512 (cpu::simd_avx512::Blocks) whatever
/// the consumer's flags, for the run-time dispatch of Note [Run-time ISA
/// dispatch] (cpu/capability.hpp). Empty where PSFT_ISA_DISPATCH is 0.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "psft/core/config.hpp"
#include "psft/core/online_softmax.hpp"
#include "psft/cpu/capability.hpp"
#include "psft/cpu/token_block.hpp"

#if PSFT_ISA_DISPATCH
#include <immintrin.h>

// GCC warns that vector arguments change the ABI where a function without
// the target passes them; these functions pass them only among themselves.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

/// _Pragma of the unquoted x.
#define PSFT_SIMD_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
/// Starts code compiled for the instruction sets isa ("avx2,fma").
#define PSFT_SIMD_TARGET_BEGIN(isa) \
  PSFT_SIMD_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
/// Ends PSFT_SIMD_TARGET_BEGIN's code.
#define PSFT_SIMD_TARGET_END PSFT_SIMD_PRAGMA(clang attribute pop)
#else
/// Starts code compiled for the instruction sets isa ("avx2,fma").
#define PSFT_SIMD_TARGET_BEGIN(isa) \
  PSFT_SIMD_PRAGMA(GCC push_options) PSFT_SIMD_PRAGMA(GCC target(isa))
/// Ends PSFT_SIMD_TARGET_BEGIN's code.
#define PSFT_SIMD_TARGET_END PSFT_SIMD_PRAGMA(GCC pop_options)
#endif

PSFT_NAMESPACE_BEGIN
namespace cpu {

PSFT_SIMD_TARGET_BEGIN("avx2,fma,f16c")
#define PSFT_SIMD_NS simd_avx2
#define PSFT_SIMD_BYTES 32
#define PSFT_SIMD_FMADD(a, b, c) ((vf)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define PSFT_SIMD_MIN(a, b) ((vf)_mm256_min_ps((__m256)(a), (__m256)(b)))
#define PSFT_SIMD_MAX(a, b) ((vf)_mm256_max_ps((__m256)(a), (__m256)(b)))
#define PSFT_SIMD_STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#define PSFT_SIMD_STREAM_INT(p, v) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)(v))
#define PSFT_SIMD_LOAD_HALF(p) \
  ((vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))
// Bytes (0 or 1) widened to float: GCC 12 turns the generic
// __builtin_convertvector of a byte vector into one conversion per lane.
#define PSFT_SIMD_LOAD_BYTES(p) \
  ((vf)_mm256_cvtepi32_ps(      \
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))))
#define PSFT_SIMD_STORE_HALF(p, v)                \
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), \
                   _mm256_cvtps_ph((__m256)(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#include "psft/cpu/simd_blocks.inc"
PSFT_SIMD_TARGET_END

PSFT_SIMD_TARGET_BEGIN("avx512f,avx2,fma,f16c")
#define PSFT_SIMD_NS simd_avx512
#define PSFT_SIMD_BYTES 64
#define PSFT_SIMD_FMADD(a, b, c) ((vf)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#define PSFT_SIMD_STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#define PSFT_SIMD_STREAM_INT(p, v) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)(v))
// The zero-masked forms: GCC 12 warns of the plain ones' undefined
// pass-through operand (-Wmaybe-uninitialized) where they are inlined.
#define PSFT_SIMD_MIN(a, b) ((vf)_mm512_maskz_min_ps(0xffff, (__m512)(a), (__m512)(b)))
#define PSFT_SIMD_MAX(a, b) ((vf)_mm512_maskz_max_ps(0xffff, (__m512)(a), (__m512)(b)))
#define PSFT_SIMD_LOAD_HALF(p) \
  ((vf)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))))
#define PSFT_SIMD_LOAD_BYTES(p)  \
  ((vf)_mm512_maskz_cvtepi32_ps( \
      0xffff,                    \
      _mm512_maskz_cvtepu8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))))
#define PSFT_SIMD_STORE_HALF(p, v)   \
  _mm256_storeu_si256(               \
      reinterpret_cast<__m256i*>(p), \
      _mm512_maskz_cvtps_ph(0xffff, (__m512)(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#include "psft/cpu/simd_blocks.inc"
PSFT_SIMD_TARGET_END

}  // namespace cpu
PSFT_NAMESPACE_END

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // PSFT_ISA_DISPATCH
