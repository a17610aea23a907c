#pragma once
/// \file
/// Data parallel: the global normaliser of an optimizer step, counted over
/// every micro-batch on every rank with one all-reduce. With it, the loss
/// of each micro-batch is its share of the global objective, and DDP's
/// gradient average is the full-batch gradient for every Reduction (see
/// docs/distributed.md, "Why the gradients match").
///
///   // once per optimizer step, before its first forward pass
///   psft::LossOptions opts;
///   opts.normaliser = psft::distributed::global_normaliser(masks, all_reduce, world_size);
///   for (std::size_t i = 0; i < masks.size(); ++i)
///     psft::psft_loss(logp(i), old_logp[i], masks[i], opts).loss.backward();
///   // DDP (or an all-reduce of the gradients divided by world_size) averages them

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"
#include "psft/distributed/communicator.hpp"

PSFT_NAMESPACE_BEGIN
namespace distributed {

namespace detail {

/// The one all-reduce of a step's counts: counts = [tokens, sequences] of
/// this rank (float64), summed over the ranks into the global Normaliser.
inline Normaliser sum_over_ranks(at::Tensor& counts, const AllReduce& all_reduce,
                                 std::int64_t world_size) {
  all_reduce(counts, ReduceOp::Sum);
  const at::Tensor host = counts.cpu();
  Normaliser global;
  global.tokens = host[0].item<double>();
  global.sequences = host[1].item<double>();
  global.world_size = world_size;
  return global;
}

}  // namespace detail

/// Adds the counts of `local` (this rank's part of an optimizer step) over
/// the ranks with one all-reduce of two float64 numbers on `device`, and
/// returns the step's Normaliser with world_size set. Every rank must call
/// it, a rank without data with an empty `local`.
///
/// \param local      this rank's token and non-empty sequence counts
///                   (unset counts count as 0)
/// \param all_reduce in-place all-reduce over the data-parallel group
/// \param world_size number of data-parallel ranks whose gradients DDP
///                   averages (the group's size)
/// \param device     device of the all-reduced tensor (CUDA for NCCL)
inline Normaliser global_normaliser(const Normaliser& local, const AllReduce& all_reduce,
                                    std::int64_t world_size, at::Device device = at::kCPU) {
  const char* api = "psft::distributed::global_normaliser";
  detail::check_all_reduce(api, all_reduce);
  TORCH_CHECK(world_size >= 1, api, ": world_size must be >= 1, got ", world_size);
  at::Tensor counts = at::tensor({local.tokens.value_or(0.0), local.sequences.value_or(0.0)},
                                 at::TensorOptions().dtype(at::kDouble))
                          .to(device);
  return detail::sum_over_ranks(counts, all_reduce, world_size);
}

/// The global normaliser of an optimizer step from this rank's micro-batch
/// masks ([B, T] or [N] each, bool or float weights; labels !=
/// ignore_index will do): N = sum of mask weights and S = count of
/// sequences with positive weight, summed over the micro-batches on the
/// masks' device, then over the ranks with ONE all-reduce; one
/// host-device synchronisation in all. Every rank must call it, a rank
/// without data with an empty list (then `device` says where the counts
/// live; otherwise the first mask's device is used).
///
/// The counts equal those of psft::count_normaliser over the whole step, so
/// the same mask convention applies: a [N] mask is one sequence.
inline Normaliser global_normaliser(at::TensorList masks, const AllReduce& all_reduce,
                                    std::int64_t world_size,
                                    std::optional<at::Device> device = std::nullopt) {
  const char* api = "psft::distributed::global_normaliser";
  detail::check_all_reduce(api, all_reduce);
  TORCH_CHECK(world_size >= 1, api, ": world_size must be >= 1, got ", world_size);
  const at::Device where = device          ? *device
                           : masks.empty() ? at::Device(at::kCPU)
                                           : masks[0].device();
  at::Tensor counts = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(where));
  for (std::size_t i = 0; i < masks.size(); ++i) {
    const at::Tensor& mask = masks[i];
    TORCH_CHECK(mask.defined(), api, ": masks[", i, "] is an undefined tensor");
    TORCH_CHECK(mask.dim() == 1 || mask.dim() == 2, api, ": masks[", i,
                "] must have shape [B, T] or [N], got ", mask.sizes());
    TORCH_CHECK(mask.device() == where, api, ": masks[", i, "] is on ", mask.device(),
                " but the counts are on ", where);
    const at::Tensor w = mask.detach().to(at::kDouble);
    const at::Tensor rows = mask.dim() == 2 ? w.sum(1) : w.sum().reshape({1});
    counts[0] += rows.sum();
    counts[1] += (rows > 0).sum();
  }
  return detail::sum_over_ranks(counts, all_reduce, world_size);
}

}  // namespace distributed
PSFT_NAMESPACE_END
