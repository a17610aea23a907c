#pragma once
/// \file
/// psft's distributed helpers on a torch.distributed (c10d) process group:
/// Gloo for CPU tensors, NCCL for CUDA tensors, or any other c10d backend.
/// Needs only c10d's ProcessGroup.hpp (shipped with LibTorch built with
/// distributed support), never a backend's own headers; consumers without
/// distributed LibTorch include the callback-based headers instead
/// (data_parallel.hpp, vocab_parallel.hpp, metrics.hpp).
///
///   c10::intrusive_ptr<c10d::ProcessGroup> dp_group = ...;  // e.g. from your launcher
///   opts.normaliser = psft::distributed::global_normaliser(masks, dp_group);

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/distributed/communicator.hpp"
#include "psft/distributed/data_parallel.hpp"
#include "psft/distributed/metrics.hpp"
#include "psft/distributed/vocab_parallel.hpp"

PSFT_NAMESPACE_BEGIN
namespace distributed {

/// The AllReduce of a c10d process group: ProcessGroup::allreduce with
/// ReduceOp SUM or MAX, waited for before it returns. The tensors psft
/// passes live on the device of its inputs, so the group's backend must
/// handle that device (Gloo: CPU; NCCL: CUDA). The group is kept alive by
/// the returned callback.
inline AllReduce c10d_all_reduce(c10::intrusive_ptr<c10d::ProcessGroup> group) {
  TORCH_CHECK(group, "psft::distributed::c10d_all_reduce: group is null");
  return [group](at::Tensor& tensor, ReduceOp op) {
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = op == ReduceOp::Sum ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX;
    group->allreduce(tensors, options)->wait();
  };
}

/// global_normaliser over a c10d data-parallel group (world_size = the
/// group's size). One all-reduce.
inline Normaliser global_normaliser(at::TensorList masks,
                                    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                    std::optional<at::Device> device = std::nullopt) {
  TORCH_CHECK(group, "psft::distributed::global_normaliser: group is null");
  return global_normaliser(masks, c10d_all_reduce(group), group->getSize(), device);
}

/// vocab_parallel_token_logprobs over a c10d tensor-parallel group. Two
/// all-reduces forward, none backward.
inline TokenLogprobs vocab_parallel_token_logprobs(
    const at::Tensor& logits, const at::Tensor& labels, const VocabShard& shard,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group, const LogitsOptions& opts = {}) {
  return vocab_parallel_token_logprobs(logits, labels, shard, c10d_all_reduce(group), opts);
}

/// vocab_parallel_psft_loss_from_logits over a c10d tensor-parallel group.
inline LogitsLossResult vocab_parallel_psft_loss_from_logits(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const VocabShard& shard, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
    const LossOptions& loss_opts = {}, const LogitsOptions& logits_opts = {}) {
  return vocab_parallel_psft_loss_from_logits(logits, labels, old_logp, shard,
                                              c10d_all_reduce(group), loss_opts, logits_opts);
}

/// vocab_parallel_policy_loss_from_logits over a c10d tensor-parallel group.
inline LogitsLossResult vocab_parallel_policy_loss_from_logits(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const VocabShard& shard,
    const c10::intrusive_ptr<c10d::ProcessGroup>& group, const LossOptions& loss_opts = {},
    const LogitsOptions& logits_opts = {}) {
  return vocab_parallel_policy_loss_from_logits(logits, labels, old_logp, advantages, shard,
                                                c10d_all_reduce(group), loss_opts, logits_opts);
}

/// reduce_metrics over a c10d data-parallel group. Two all-reduces.
inline LossMetrics reduce_metrics(const LossMetrics& local,
                                  const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  return reduce_metrics(local, c10d_all_reduce(group));
}

/// reduce_metrics of several micro-batches over a c10d data-parallel group.
/// Two all-reduces.
inline LossMetrics reduce_metrics(const std::vector<LossMetrics>& local,
                                  const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                  at::Device device = at::kCPU) {
  return reduce_metrics(local, c10d_all_reduce(group), device);
}

/// global_mean over a c10d group. One all-reduce.
inline at::Tensor global_mean(const at::Tensor& sum, const at::Tensor& count,
                              const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  return global_mean(sum, count, c10d_all_reduce(group));
}

}  // namespace distributed
PSFT_NAMESPACE_END
