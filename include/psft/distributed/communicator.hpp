#pragma once
/// \file
/// The one thing psft's distributed helpers need from a communication
/// library: an in-place all-reduce. It is injected as a callback, so the
/// helpers work with c10d (psft/distributed/c10d.hpp), with a framework's own
/// collectives, or with an in-process fake in tests, and this header needs no
/// distributed LibTorch.
///
///   psft::distributed::AllReduce all_reduce = [&](at::Tensor& t, psft::distributed::ReduceOp op) {
///     my_framework_all_reduce(t, op == psft::distributed::ReduceOp::Sum ? SUM : MAX);
///   };

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <functional>

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN
namespace distributed {

/// Element-wise reduction of an all-reduce.
enum class ReduceOp {
  /// Element-wise sum over the ranks.
  Sum,
  /// Element-wise maximum over the ranks.
  Max,
};

/// All-reduces `tensor` in place over the ranks of a group and returns when
/// the result is in `tensor` on this rank (a blocking collective: every rank
/// of the group calls it, in the same order, with a tensor of the same size
/// and dtype). psft passes contiguous float32 or float64 tensors on the
/// device of the inputs it was given; the result must be the same on every
/// rank.
using AllReduce = std::function<void(at::Tensor& tensor, ReduceOp op)>;

namespace detail {

/// Checks that an all-reduce callback is set.
inline void check_all_reduce(const char* api, const AllReduce& all_reduce) {
  TORCH_CHECK(static_cast<bool>(all_reduce), api, ": all_reduce is an empty callback");
}

}  // namespace detail
}  // namespace distributed
PSFT_NAMESPACE_END
