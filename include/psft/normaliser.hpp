#pragma once
/// \file
/// Counting the normaliser of an optimizer step that is split into
/// micro-batches (gradient accumulation) or over data-parallel ranks.
///
///   psft::Normaliser step;                        // before the step
///   for (auto& mb : micro_batches) step += psft::count_normaliser(mb.mask);
///   // (data parallel: all-reduce step.tokens and step.sequences, set world_size)
///   opts.normaliser = step;
///   for (auto& mb : micro_batches) psft::psft_loss(..., mb.mask, opts).loss.backward();

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/detail/mask.hpp"

PSFT_NAMESPACE_BEGIN

/// The token count (sum of mask weights) and the count of non-empty
/// sequences of one micro-batch's mask ([B, T] or [N]; bool, float weights
/// or integer 0/1, Note [Mask argument]).
/// Reads the counts to the host: call it once per micro-batch when the
/// step starts, not inside the loss.
inline Normaliser count_normaliser(const at::Tensor& mask) {
  TORCH_CHECK(mask.defined(), "psft::count_normaliser: mask is an undefined tensor");
  TORCH_CHECK(mask.dim() == 1 || mask.dim() == 2,
              "psft::count_normaliser: mask must have shape [B, T] or [N], got ", mask.sizes());
  const at::Tensor w =
      detail::mask_argument("psft::count_normaliser", "mask", mask).to(at::kDouble);
  TORCH_CHECK(at::logical_and(w.isfinite(), w >= 0).all().item<bool>(),
              "psft::count_normaliser: mask has a negative, NaN or Inf weight");
  const at::Tensor rows = mask.dim() == 2 ? w.sum(1) : w.sum().reshape({1});
  Normaliser n;
  n.tokens = rows.sum().item<double>();
  n.sequences = (rows > 0).sum().item<double>();
  return n;
}

/// count_normaliser counting sequences the way a loss with `opts` does:
/// every row, empty ones included, when opts.count_empty_sequences (TRL's
/// grpo, verl's global_batch_size), else the non-empty rows.
inline Normaliser count_normaliser(const at::Tensor& mask, const LossOptions& opts) {
  Normaliser n = count_normaliser(mask);
  if (opts.count_empty_sequences)
    n.sequences = static_cast<double>(mask.dim() == 2 ? mask.size(0) : 1);
  return n;
}

PSFT_NAMESPACE_END
