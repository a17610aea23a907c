#pragma once
/// \file
/// Aggregation of per-token losses (verl's agg_loss definitions), as scale
/// factors: loss = sum_s row_factor_s * sum_t m l * global_factor. Torch-free.

#include <cstdint>
#include <sstream>
#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// Counts the reduction divides by, already resolved (global or local).
struct ReductionCounts {
  double tokens;         ///< N
  double sequences;      ///< S
  double norm_constant;  ///< C
  double world_size;     ///< D
};

/// True if the reduction weighs each sequence by 1 / n_s.
PSFT_HOST_DEVICE inline bool uses_row_factor(Reduction r) {
  return r == Reduction::SeqMeanTokenMean;
}

/// Per-sequence factor: 1 / n_s for SeqMeanTokenMean (0 for empty rows), else 1.
PSFT_HOST_DEVICE inline double row_factor(Reduction r, double row_tokens) {
  if (!uses_row_factor(r)) return 1.0;
  return row_tokens > 0.0 ? 1.0 / row_tokens : 0.0;
}

/// The factor that turns the row-weighted sum into the loss. A zero count
/// (nothing to average) gives 0, so an empty batch has loss 0 and zero
/// gradients instead of 0/0.
PSFT_HOST_DEVICE inline double global_factor(Reduction r, const ReductionCounts& c) {
  double denominator = 0.0;
  switch (r) {
    case Reduction::TokenMean:
      denominator = c.tokens;
      break;
    case Reduction::SeqMeanTokenSum:
    case Reduction::SeqMeanTokenMean:
      denominator = c.sequences;
      break;
    case Reduction::SeqMeanTokenSumNorm:
      denominator = c.sequences * c.norm_constant;
      break;
    case Reduction::TokenSum:
      denominator = 1.0;
      break;
    case Reduction::TokenSumNorm:
      denominator = c.norm_constant;
      break;
  }
  return denominator > 0.0 ? c.world_size / denominator : 0.0;
}

/// opts with LossOptions::count_empty_sequences resolved for a batch of
/// `rows` rows: when the reduction divides by S and no Normaliser supplies
/// it, S is every row of the batch, which the normaliser then carries; the
/// backends need not know the option. The one place the option acts.
inline LossOptions resolve_sequence_count(const LossOptions& opts, std::int64_t rows) {
  if (!opts.count_empty_sequences) return opts;
  const bool divides_by_sequences = opts.reduction == Reduction::SeqMeanTokenSum ||
                                    opts.reduction == Reduction::SeqMeanTokenMean ||
                                    opts.reduction == Reduction::SeqMeanTokenSumNorm;
  if (!divides_by_sequences || (opts.normaliser && opts.normaliser->sequences)) return opts;
  LossOptions out = opts;
  Normaliser n = opts.normaliser.value_or(Normaliser{});
  n.sequences = static_cast<double>(rows);
  out.normaliser = n;
  return out;
}

/// Aggregates per-row sums (row_loss = sum_t w l, row_tokens = sum_t w) into
/// the loss and writes each row's gradient scale (row factor x global
/// factor) to row_scale[0..rows). Counts come from the batch itself unless
/// opts.normaliser supplies the optimizer step's global ones. Returns an
/// error message: a global count smaller than the batch's
/// own count is a bug in the caller's bookkeeping. Host only.
struct RowReduction {
  std::string error;           ///< empty on success
  double loss = 0.0;           ///< the aggregated loss
  double global_factor = 0.0;  ///< the reduction's global scale of every row
};

/// Why opts.normaliser cannot be this batch's normaliser, or "": a global
/// count smaller than the batch's own token count (beyond rounding) or
/// non-empty sequence count is a bug in the caller's bookkeeping.
inline std::string normaliser_error(const LossOptions& opts, double batch_tokens,
                                    double batch_sequences) {
  std::ostringstream e;
  if (!opts.normaliser) return {};
  const Normaliser& n = *opts.normaliser;
  if (n.tokens && *n.tokens < batch_tokens * (1 - 1e-9)) {
    e << "normaliser.tokens (" << *n.tokens << ") is smaller than this batch's own token count ("
      << batch_tokens << "); it must count the whole optimizer step";
  } else if (n.sequences && *n.sequences < batch_sequences) {
    e << "normaliser.sequences (" << *n.sequences
      << ") is smaller than this batch's own non-empty sequence count (" << batch_sequences
      << "); it must count the whole optimizer step";
  }
  return e.str();
}

/// Writes each row's gradient scale (row factor x global factor) to
/// row_scale[0..rows) from the rows' token counts (sum_t w), before any loss
/// is known; the fused CPU kernel needs them to write the gradient in its
/// forward pass. Returns the error and the global factor of RowReduction.
inline RowReduction row_scales(const LossOptions& opts, std::int64_t rows, std::int64_t cols,
                               const double* row_tokens, double* row_scale) {
  RowReduction out;
  ReductionCounts counts{0.0, 0.0, opts.norm_constant ? *opts.norm_constant : double(cols),
                         opts.normaliser ? double(opts.normaliser->world_size) : 1.0};
  for (std::int64_t r = 0; r < rows; ++r) {
    counts.tokens += row_tokens[r];
    counts.sequences += row_tokens[r] > 0 ? 1.0 : 0.0;
  }
  out.error = normaliser_error(opts, counts.tokens, counts.sequences);
  if (!out.error.empty()) return out;
  if (opts.normaliser && opts.normaliser->tokens) counts.tokens = *opts.normaliser->tokens;
  if (opts.normaliser && opts.normaliser->sequences) counts.sequences = *opts.normaliser->sequences;
  out.global_factor = global_factor(opts.reduction, counts);
  for (std::int64_t r = 0; r < rows; ++r) {
    row_scale[r] = row_factor(opts.reduction, row_tokens[r]) * out.global_factor;
  }
  return out;
}

/// The aggregated loss sum_s row_factor_s * row_loss_s * global_factor.
inline double reduced_loss(Reduction reduction, std::int64_t rows, const double* row_loss,
                           const double* row_tokens, double global_factor) {
  double total = 0.0;
  for (std::int64_t r = 0; r < rows; ++r)
    total += row_factor(reduction, row_tokens[r]) * row_loss[r];
  return total * global_factor;
}

/// Aggregates per-row sums into RowReduction and writes each row's gradient
/// scale; see RowReduction for the contract.
inline RowReduction reduce_rows(const LossOptions& opts, std::int64_t rows, std::int64_t cols,
                                const double* row_loss, const double* row_tokens,
                                double* row_scale) {
  RowReduction out = row_scales(opts, rows, cols, row_tokens, row_scale);
  if (!out.error.empty()) return out;
  out.loss = reduced_loss(opts.reduction, rows, row_loss, row_tokens, out.global_factor);
  return out;
}

}  // namespace core
PSFT_NAMESPACE_END
