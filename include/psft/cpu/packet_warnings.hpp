#pragma once
/// \file
/// PSFT_PACKET_WARNINGS_PUSH / _POP around code that uses Eigen packet
/// types and functions (the CPU kernels' vector paths).
///
/// Note [Packet warnings]
/// Using Eigen's packet types (__m256 and the like) as template arguments
/// makes GCC warn that their attributes are ignored, which is harmless
/// (Eigen silences the same warning in its own headers). GCC 12 also reports
/// the deliberately undefined operands of AVX-512 intrinsics inside Eigen's
/// packet functions as uninitialised once they are inlined here (GCC bug
/// 105593, fixed in GCC 13). Both are silenced for psft's code only.

#if defined(__GNUC__) && !defined(__clang__)
#define PSFT_PACKET_WARNINGS_PUSH                                                           \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wignored-attributes\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                                 \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define PSFT_PACKET_WARNINGS_POP _Pragma("GCC diagnostic pop")
#else
#define PSFT_PACKET_WARNINGS_PUSH
#define PSFT_PACKET_WARNINGS_POP
#endif
