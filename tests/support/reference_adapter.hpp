#pragma once
// Translates psft's options into the independent reference's settings, for
// the tests that compare the two. This adapter knows both sides; the
// reference itself (tests/reference/) still includes nothing from psft.

#include <stdexcept>

#include "psft/core/options.hpp"
#include "reference/clipped_reference.hpp"

namespace test_support {

inline reference::Aggregation aggregation_of(psft::Reduction r) {
  switch (r) {
    case psft::Reduction::TokenMean:
      return reference::Aggregation::TokenMean;
    case psft::Reduction::SeqMeanTokenSum:
      return reference::Aggregation::SeqMeanTokenSum;
    case psft::Reduction::SeqMeanTokenMean:
      return reference::Aggregation::SeqMeanTokenMean;
    case psft::Reduction::SeqMeanTokenSumNorm:
      return reference::Aggregation::SeqMeanTokenSumNorm;
    case psft::Reduction::TokenSum:
      return reference::Aggregation::TokenSum;
    case psft::Reduction::TokenSumNorm:
      return reference::Aggregation::TokenSumNorm;
  }
  throw std::logic_error("unknown reduction");
}

/// The reference's settings for psft options.
inline reference::Settings settings_for(const psft::LossOptions& o) {
  reference::Settings s;
  s.eps_low = o.clip.eps_low;
  s.eps_high = o.clip.eps_high;
  s.dual_clip = o.clip.dual_clip;
  s.log_ratio_clamp = o.clip.log_ratio_clamp;
  s.delta = o.clip.delta;
  s.count_empty_rows = o.count_empty_sequences;
  s.aggregation = aggregation_of(o.reduction);
  s.norm_constant = o.norm_constant;
  if (o.normaliser) {
    s.global_tokens = o.normaliser->tokens;
    s.global_sequences = o.normaliser->sequences;
    s.world_size = static_cast<double>(o.normaliser->world_size);
  }
  return s;
}

}  // namespace test_support
