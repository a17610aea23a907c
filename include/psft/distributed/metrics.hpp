#pragma once
/// \file
/// Metrics over data-parallel ranks, reduced as global sum / count (never a
/// mean of the ranks' means, which weighs a rank with 3 tokens as much as
/// one with 3000).
///
///   auto r = psft::psft_loss(logp, old_logp, mask, opts);
///   psft::LossMetrics global = psft::distributed::reduce_metrics(r.metrics, all_reduce);

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/distributed/communicator.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN
namespace distributed {

/// The global mean sum / count over the ranks of a group, from this rank's
/// sum and count (0-d tensors, e.g. psft::EntropyMetrics::sum and count):
/// one all-reduce of two float64 numbers on the sum's device. 0 when the
/// global count is 0. Returns a 0-d float64 tensor.
inline at::Tensor global_mean(const at::Tensor& sum, const at::Tensor& count,
                              const AllReduce& all_reduce) {
  const char* api = "psft::distributed::global_mean";
  detail::check_all_reduce(api, all_reduce);
  TORCH_CHECK(sum.defined() && sum.numel() == 1, api, ": sum must hold one number, got ",
              sum.defined() ? sum.sizes() : at::IntArrayRef{});
  TORCH_CHECK(count.defined() && count.numel() == 1, api, ": count must hold one number, got ",
              count.defined() ? count.sizes() : at::IntArrayRef{});
  at::Tensor packed = at::stack({sum.detach().reshape({}).to(at::kDouble),
                                 count.detach().reshape({}).to(at::kDouble).to(sum.device())});
  all_reduce(packed, ReduceOp::Sum);
  const at::Tensor total = packed[1];
  return at::where(total > 0, packed[0] / at::where(total > 0, total, at::ones_like(total)),
                   at::zeros_like(total));
}

/// The trust-region metrics of the whole optimizer step from this rank's
/// micro-batches (psft::LossResult::metrics of each; an empty list for a
/// rank without data): the fractions, KL estimates and ratio mean become
/// global sum / token count, ratio_min and ratio_max the global extremes
/// over micro-batches with tokens, token_count the global count. Two
/// all-reduces (a sum of 8 and a max of 2 float64 numbers), whatever the
/// number of micro-batches. With no token anywhere the values are those of
/// an empty batch (fractions and KL 0, ratios 1). The results are 0-d
/// float64 tensors on `device`.
inline LossMetrics reduce_metrics(const std::vector<LossMetrics>& local,
                                  const AllReduce& all_reduce, at::Device device = at::kCPU) {
  const char* api = "psft::distributed::reduce_metrics";
  detail::check_all_reduce(api, all_reduce);
  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  const auto as_double = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined() && t.numel() == 1, api, ": metrics.", name,
                " must be a tensor holding one number");
    return t.detach().reshape({}).to(device, at::kDouble);
  };
  const at::Tensor zero = at::zeros({}, options);
  const at::Tensor lowest = at::full({}, -std::numeric_limits<double>::infinity(), options);
  at::Tensor packed_sums = at::zeros({8}, options);
  at::Tensor packed_max = at::stack({lowest, lowest});
  for (const LossMetrics& m : local) {
    const at::Tensor count = as_double(m.token_count, "token_count");
    const at::Tensor means[] = {as_double(m.clip_frac, "clip_frac"),
                                as_double(m.clip_frac_dual, "clip_frac_dual"),
                                as_double(m.clip_frac_high, "clip_frac_high"),
                                as_double(m.clip_frac_low, "clip_frac_low"),
                                as_double(m.approx_kl_k1, "approx_kl_k1"),
                                as_double(m.approx_kl_k3, "approx_kl_k3"),
                                as_double(m.ratio_mean, "ratio_mean")};
    const at::Tensor has_tokens = count > 0;
    std::vector<at::Tensor> sums{count};
    for (const at::Tensor& mean : means) sums.push_back(at::where(has_tokens, mean * count, zero));
    packed_sums = packed_sums + at::stack(sums);
    packed_max = at::maximum(
        packed_max,
        at::stack({at::where(has_tokens, -as_double(m.ratio_min, "ratio_min"), lowest),
                   at::where(has_tokens, as_double(m.ratio_max, "ratio_max"), lowest)}));
  }
  all_reduce(packed_sums, ReduceOp::Sum);
  all_reduce(packed_max, ReduceOp::Max);

  const at::Tensor total = packed_sums[0];
  const at::Tensor any = total > 0;
  const at::Tensor one = at::ones({}, options);
  const at::Tensor inverse = at::where(any, one / at::where(any, total, one), zero);
  LossMetrics global;
  global.token_count = total;
  global.clip_frac = packed_sums[1] * inverse;
  global.clip_frac_dual = packed_sums[2] * inverse;
  global.clip_frac_high = packed_sums[3] * inverse;
  global.clip_frac_low = packed_sums[4] * inverse;
  global.approx_kl_k1 = packed_sums[5] * inverse;
  global.approx_kl_k3 = packed_sums[6] * inverse;
  global.ratio_mean = at::where(any, packed_sums[7] * inverse, one);
  global.ratio_min = at::where(any, -packed_max[0], one);
  global.ratio_max = at::where(any, packed_max[1], one);
  return global;
}

/// reduce_metrics for a rank with one batch (psft::LossResult::metrics);
/// the results live on its token_count's device.
inline LossMetrics reduce_metrics(const LossMetrics& local, const AllReduce& all_reduce) {
  TORCH_CHECK(local.token_count.defined(),
              "psft::distributed::reduce_metrics: metrics.token_count is an undefined tensor");
  return reduce_metrics(std::vector<LossMetrics>{local}, all_reduce, local.token_count.device());
}

}  // namespace distributed
PSFT_NAMESPACE_END
