#pragma once
/// \file
/// The fused CPU backend of token_logprobs: validated tensors in, one kernel
/// pass over the logits, per-token results out; and its one-pass backward.
/// Callers (autograd/token_logprobs_function.hpp) have already checked
/// shapes, dtypes, devices and label range.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/cpu/gradient_buffers.hpp"
#include "psft/cpu/logits_kernel.hpp"
#include "psft/cpu/simd_blocks.hpp"

PSFT_NAMESPACE_BEGIN
namespace cpu {

/// The kernel's view of [B, T, V] or [N, V] logits whose last dimension has
/// stride 1 (the caller makes that one contiguous copy otherwise).
inline LogitsRows logits_rows(const at::Tensor& logits) {
  LogitsRows v;
  v.data = logits.data_ptr();
  v.vocab = logits.size(-1);
  if (logits.dim() == 3) {
    v.rows = logits.size(0) * logits.size(1);
    v.inner_size = logits.size(1);
    v.outer_stride = logits.stride(0);
    v.inner_stride = logits.stride(1);
  } else {
    v.rows = logits.size(0);
    v.inner_size = logits.size(0);
    v.outer_stride = 0;
    v.inner_stride = logits.stride(0);
  }
  if (v.inner_size == 0) v.inner_size = 1;  // no rows; keeps offset() free of 0 / 0
  return v;
}

/// f(blocks) with the float block functions of the instruction set in use
/// (Note [Run-time ISA dispatch]).
template <class F>
decltype(auto) with_float_blocks(F&& f) {
#if PSFT_ISA_DISPATCH
  switch (cpu_capability()) {
    case CpuCapability::Avx512:
      return f(simd_avx512::Blocks{});
    case CpuCapability::Avx2:
      return f(simd_avx2::Blocks{});
    default:
      break;
  }
#endif
  return f(kernel_detail::EigenBlocks{});
}

/// f(blocks) with the block functions for acc_t: the dispatched float ones,
/// Eigen's for double.
template <class acc_t, class F>
void with_blocks(F&& f) {
  if constexpr (std::is_same<acc_t, float>::value) {
    with_float_blocks(f);
  } else {
    f(kernel_detail::EigenBlocks{});
  }
}

/// Raises c10::Error (prefixed by api) for what the forward kernel reported,
/// when opts.check_inputs: a label outside [0, V), a NaN or +inf logit, an
/// all -inf row.
inline void check_forward_status(const char* api, const LogitsForwardStatus& status,
                                 std::int64_t vocab, const LogitsOptions& opts) {
  if (!opts.check_inputs) return;
  TORCH_CHECK(status.first_bad_label_row < 0, api, ": labels at token ", status.first_bad_label_row,
              " is outside [0, ", vocab, ") and not ignore_index (", opts.ignore_index, ")");
  TORCH_CHECK(status.first_nonfinite_row < 0, api, ": logits has a NaN or +inf entry at token ",
              status.first_nonfinite_row,
              " (flat index over the leading dimensions; rows whose label is ignore_index are "
              "not read)");
  TORCH_CHECK(status.first_all_neg_inf_row < 0, api, ": logits at token ",
              status.first_all_neg_inf_row,
              " is -inf over the whole vocabulary, so its softmax is undefined; give that "
              "token the label ignore_index (",
              opts.ignore_index, ")");
}

/// Forward: writes logp and entropy (contiguous, labels' numel, float32 or
/// float64 for float64 logits) and, when stats is defined, the [N, 3]
/// per-row statistics backward needs. labels is contiguous int64. Raises c10::Error (prefixed by
/// api) on NaN/+inf logits, an all -inf row or a label outside [0, V) at a scored position when
/// opts.check_inputs; without it such a label reads a clamped entry (Note
/// [Out-of-range labels]).
inline void token_logprobs_forward(const char* api, const at::Tensor& logits,
                                   const at::Tensor& labels, const LogitsOptions& opts,
                                   const at::Tensor& logp, const at::Tensor& entropy,
                                   const at::Tensor& stats) {
  const LogitsRows rows = logits_rows(logits);
  if (rows.rows == 0) return;
  const std::int64_t* label_data = labels.data_ptr<std::int64_t>();
  LogitsForwardStatus status;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "psft_token_logprobs_forward", [&] {
        using acc_t =
            typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        with_blocks<acc_t>([&](auto blocks) {
          status = token_logprobs_forward<scalar_t, acc_t, decltype(blocks)>(
              rows, label_data, opts.ignore_index, static_cast<acc_t>(1.0 / opts.temperature),
              logp.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(),
              stats.defined() ? stats.data_ptr<acc_t>() : nullptr);
        });
      });
  check_forward_status(api, status, rows.vocab, opts);
}

/// Forward with the gradient (Note [Gradient in the forward pass]): as
/// token_logprobs_forward with stats defined, and returns d(sum g logp + h
/// entropy) / d logits in logits' dtype and shape (contiguous), with {g_r,
/// h_r} = row_grad(r, logp_r, entropy_r) for each scored row; row_grad runs
/// in RowGrad::acc_type, which must be the logits' accumulation type.
template <class RowGrad>
at::Tensor token_logprobs_forward_backward(const char* api, const at::Tensor& logits,
                                           const at::Tensor& labels, const LogitsOptions& opts,
                                           const at::Tensor& logp, const at::Tensor& entropy,
                                           const at::Tensor& stats, const RowGrad& row_grad) {
  at::Tensor grad = empty_gradient(logits.sizes(), logits.options());  // Note [Gradient buffers]
  const LogitsRows rows = logits_rows(logits);
  if (rows.rows == 0) return grad;
  const std::int64_t* label_data = labels.data_ptr<std::int64_t>();
  LogitsForwardStatus status;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "psft_token_logprobs_forward_backward", [&] {
        using acc_t =
            typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        TORCH_INTERNAL_ASSERT((std::is_same<acc_t, typename RowGrad::acc_type>::value));
        if constexpr (std::is_same<acc_t, typename RowGrad::acc_type>::value) {
          with_blocks<acc_t>([&](auto blocks) {
            status = token_logprobs_forward_backward<scalar_t, acc_t, decltype(blocks)>(
                rows, label_data, opts.ignore_index, static_cast<acc_t>(1.0 / opts.temperature),
                logp.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
                row_grad, grad.data_ptr<scalar_t>());
          });
        }
      });
  check_forward_status(api, status, rows.vocab, opts);
  return grad;
}

/// Backward: d(sum grad_logp * logp + grad_entropy * entropy) / d logits, in
/// logits' dtype and shape (contiguous). grad_logp and grad_entropy are
/// contiguous in the accumulation dtype, or undefined (zero).
inline at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& stats, const at::Tensor& grad_logp,
                                          const at::Tensor& grad_entropy,
                                          const LogitsOptions& opts) {
  at::Tensor grad = empty_gradient(logits.sizes(), logits.options());  // Note [Gradient buffers]
  const LogitsRows rows = logits_rows(logits);
  if (rows.rows == 0 || rows.vocab == 0) return grad;
  const std::int64_t* label_data = labels.data_ptr<std::int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "psft_token_logprobs_backward", [&] {
        using acc_t =
            typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        with_blocks<acc_t>([&](auto blocks) {
          token_logprobs_backward<scalar_t, acc_t, decltype(blocks)>(
              rows, label_data, opts.ignore_index, static_cast<acc_t>(1.0 / opts.temperature),
              stats.data_ptr<acc_t>(), grad_logp.defined() ? grad_logp.data_ptr<acc_t>() : nullptr,
              grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr,
              grad.data_ptr<scalar_t>());
        });
      });
  return grad;
}

}  // namespace cpu
PSFT_NAMESPACE_END
