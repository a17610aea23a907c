#pragma once
/// \file
/// Options of the logits entry points (token_logprobs, psft_loss_from_logits,
/// policy_loss_from_logits) and their validation. Torch-free, like
/// core/options.hpp, whose LossOptions they complement.

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/core/validate.hpp"

PSFT_NAMESPACE_BEGIN

/// How logits and labels are read. The loss itself (clipping, reduction,
/// normaliser) is configured by LossOptions.
struct LogitsOptions {
  /// Label value of positions that are not scored (prompt, padding): they
  /// get log-probability 0, entropy 0, no gradient, and are masked out of
  /// the loss. -100 is the Hugging Face convention.
  std::int64_t ignore_index = -100;
  /// The logits are divided by it before the softmax (sampling temperature),
  /// so that the log-probabilities match those of the sampler. Finite, > 0.
  double temperature = 1.0;
  /// Let gradient flow through the entropy output, for an entropy bonus.
  /// Off by default: entropy is a metric, and backward does not pay for it.
  bool entropy_grad = false;
  /// Check that every label is in [0, V) or equal to ignore_index, and that
  /// scored rows of logits hold no NaN or +inf (and not only -inf). The fused
  /// CPU pass checks as it goes at no measurable cost; the composed backend
  /// on an accelerator pays one host-device synchronisation per call, so a
  /// tuned GPU loop may turn it off. Off, an out-of-range label reads (and
  /// backward writes) the nearest entry of its row on every backend, never
  /// memory outside the row, and NaN logits propagate to the outputs.
  bool check_inputs = true;
  /// Which implementation runs the logits pass. Auto: the fused kernel of
  /// the logits' device when the build has one (CPU always; CUDA with
  /// psft's CUDA translation unit), composed ATen ops otherwise. In psft_loss_from_logits
  /// and policy_loss_from_logits, Auto follows LossOptions::backend.
  Backend backend = Backend::Auto;
  /// Composed backend only: rows are processed in chunks whose float32
  /// [rows, V] temporaries take about this many bytes each (a handful are
  /// alive at once), so memory stays bounded whatever the batch size.
  std::int64_t composed_chunk_bytes = std::int64_t(64) << 20;
  /// psft_loss_from_logits and policy_loss_from_logits on the fused CPU
  /// backend, with token ratios: compute d loss / d logits in the forward
  /// pass while each row is in cache, so that the logits are read once, and
  /// hold it until backward (Note [Gradient in the forward pass]). The
  /// gradient then lives from the loss's forward to its backward instead of
  /// during backward only. Off: logp first, then the loss on it, and
  /// backward reads the logits again (the path of every other backend).
  bool gradient_in_forward = true;
};

namespace core {

/// Why `o` is invalid, or "" if it is valid.
inline std::string logits_options_error(const LogitsOptions& o) {
  std::ostringstream e;
  if (!(std::isfinite(o.temperature) && o.temperature > 0)) {
    e << "temperature must be finite and > 0, got " << o.temperature;
  } else if (o.composed_chunk_bytes <= 0) {
    e << "composed_chunk_bytes must be > 0, got " << o.composed_chunk_bytes;
  } else if (!is_valid(o.backend)) {
    e << "backend must be a psft::Backend enumerator (Auto, FusedCpu, FusedCuda or Composed), "
         "got the value "
      << static_cast<int>(o.backend);
  }
  return e.str();
}

}  // namespace core
PSFT_NAMESPACE_END
