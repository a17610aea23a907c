#pragma once
// Independent double-precision restatement of the SFT objectives that psft
// compares PSFT with: NLL (l = -log p) and DFT (l = -sg(p) log p, Dynamic
// Fine-Tuning), aggregated by verl's loss_agg_mode definitions. Plain loops
// over std::vector<double>; includes no psft header (Settings and
// Aggregation are the clipped reference's, whose eps fields it ignores).

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include "reference/clipped_reference.hpp"

namespace reference {

enum class SftKind { Nll, Dft };

struct SftResult {
  double loss = 0;
  std::vector<double> grad;  ///< d loss / d logp with p held constant (stop-gradient)
};

/// The aggregated SFT loss of a [rows, cols] batch (row-major; mask holds
/// token weights, 0 = ignored and never read). `frozen_logp`, when given,
/// supplies the p of DFT's stop-gradient weight sg(p) = exp(frozen_logp):
/// finite differences perturb logp while the weight stays fixed.
inline SftResult sft_loss(std::size_t rows, std::size_t cols, const std::vector<double>& logp,
                          const std::vector<double>& mask, SftKind kind, const Settings& s,
                          const std::vector<double>* frozen_logp = nullptr) {
  const std::size_t n = rows * cols;
  if (logp.size() != n || mask.size() != n)
    throw std::logic_error("reference::sft_loss: sizes do not match rows * cols");
  SftResult out;
  out.grad.assign(n, 0.0);
  std::vector<double> row_sum(rows, 0.0), row_weight(rows, 0.0);
  std::vector<double> token_grad(n, 0.0);
  double weight = 0;
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < cols; ++j) {
      const std::size_t k = i * cols + j;
      const double w = mask[k];
      if (w == 0) continue;
      const double p = std::exp(frozen_logp ? (*frozen_logp)[k] : logp[k]);
      const double coefficient = kind == SftKind::Nll ? 1.0 : p;  // l = -coefficient * logp
      row_sum[i] += -coefficient * logp[k] * w;
      token_grad[k] = -coefficient * w;
      row_weight[i] += w;
      weight += w;
    }
  }
  double sequences = 0;
  for (std::size_t i = 0; i < rows; ++i)
    sequences += s.count_empty_rows || row_weight[i] > 0 ? 1.0 : 0.0;
  if (s.global_sequences) sequences = *s.global_sequences;
  const double tokens = s.global_tokens ? *s.global_tokens : weight;
  const double constant = s.norm_constant ? *s.norm_constant : static_cast<double>(cols);
  for (std::size_t i = 0; i < rows; ++i) {
    double scale = 0;  // d loss / d row_sum[i]
    switch (s.aggregation) {
      case Aggregation::TokenMean:
        scale = tokens > 0 ? s.world_size / tokens : 0.0;
        break;
      case Aggregation::SeqMeanTokenSum:
        scale = sequences > 0 ? s.world_size / sequences : 0.0;
        break;
      case Aggregation::SeqMeanTokenMean:
        scale =
            sequences > 0 && row_weight[i] > 0 ? s.world_size / (sequences * row_weight[i]) : 0.0;
        break;
      case Aggregation::SeqMeanTokenSumNorm:
        scale = sequences > 0 && constant > 0 ? s.world_size / (sequences * constant) : 0.0;
        break;
      case Aggregation::TokenSum:
        scale = s.world_size;
        break;
      case Aggregation::TokenSumNorm:
        scale = constant > 0 ? s.world_size / constant : 0.0;
        break;
    }
    out.loss += row_sum[i] * scale;
    for (std::size_t j = 0; j < cols; ++j)
      out.grad[i * cols + j] = token_grad[i * cols + j] * scale;
  }
  return out;
}

}  // namespace reference
