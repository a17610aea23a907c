#pragma once
// The list of reductions that tests loop over, and their names for INFO and
// SECTION labels. Torch-free, so test_core can use it too.

#include "psft/core/options.hpp"
#include "psft/core/validate.hpp"

namespace test_support {

/// Every psft::Reduction.
inline constexpr psft::Reduction kReductions[] = {
    psft::Reduction::TokenMean,        psft::Reduction::SeqMeanTokenSum,
    psft::Reduction::SeqMeanTokenMean, psft::Reduction::SeqMeanTokenSumNorm,
    psft::Reduction::TokenSum,         psft::Reduction::TokenSumNorm};

/// The reduction's name as psft's error messages spell it.
inline const char* name_of(psft::Reduction r) { return psft::core::reduction_name(r); }

}  // namespace test_support
