// psft's CUDA translation unit: the definitions of the entry points declared
// in psft/cuda/entry.hpp. Compile it exactly once into a target, with nvcc
// and PSFT_WITH_CUDA_KERNELS defined for the whole target:
//
//   include(psftCuda)             # installed next to psftConfig.cmake
//   psft_enable_cuda(my_trainer)
//
// or, without CMake, #include "psft/cuda/psft_cuda.cu" in one of your own .cu
// files and define PSFT_WITH_CUDA_KERNELS for every file that includes psft.
// See docs/cuda.md.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "psft/core/config.hpp"
#include "psft/core/metrics.hpp"
#include "psft/core/options.hpp"
#include "psft/core/reduction.hpp"
#include "psft/cuda/clipped_loss.cuh"
#include "psft/cuda/entry.hpp"
#include "psft/cuda/logits.cuh"

#if !defined(__CUDACC__)
#error "psft_cuda.cu must be compiled by nvcc"
#endif

namespace psft_cuda_entry {
namespace {

namespace kernels = ::psft::cuda;

kernels::DeviceDtype device_dtype(const at::Tensor& t) {
  if (!t.defined()) return kernels::DeviceDtype::Absent;
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::DeviceDtype::Float;
    case at::kDouble:
      return kernels::DeviceDtype::Double;
    case at::kBFloat16:
      return kernels::DeviceDtype::BFloat16;
    case at::kHalf:
      return kernels::DeviceDtype::Half;
    case at::kBool:
      return kernels::DeviceDtype::Bool;
    default:
      TORCH_CHECK(false, "psft: unsupported dtype ", t.scalar_type(), " in the CUDA kernel");
  }
  return kernels::DeviceDtype::Absent;
}

/// Describes a [rows, cols] or [cols] tensor (or an undefined one).
kernels::DeviceInput device_input(const at::Tensor& t, std::int64_t rows, const char* name,
                                  const at::Tensor& logp) {
  kernels::DeviceInput in;
  if (!t.defined()) return in;
  TORCH_CHECK(t.device() == logp.device(), "psft: ", name, " is on ", t.device(),
              " but logp is on ", logp.device());
  in.data = t.data_ptr();
  in.dtype = device_dtype(t);
  in.row_stride = t.dim() == 2 ? t.stride(0) : 0;
  in.col_stride = t.dim() == 2 ? t.stride(1) : t.stride(0);
  in.vectorised = kernels::can_vectorise(in.data, in.dtype, in.row_stride, in.col_stride, rows);
  return in;
}

template <class acc_t>
void launch_forward(const at::Tensor& logp, const at::Tensor& old_logp,
                    const at::Tensor& advantages, const at::Tensor& mask, std::int64_t rows,
                    std::int64_t cols, const ClippedLossConfig& c, ClippedLossResult& out,
                    at::ScalarType acc) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::TensorOptions doubles = logp.options().dtype(at::kDouble);
  // Every row has at least one unit, an empty one when cols == 0.
  const std::int64_t chunks_per_row =
      std::max<std::int64_t>((cols + kernels::kChunk - 1) / kernels::kChunk, 1);
  const std::int64_t units = rows * chunks_per_row;
  TORCH_CHECK(units <= std::int64_t(0x7fffffff), "psft: too many tokens for the CUDA kernel (",
              rows, " x ", cols, ")");
  const kernels::CombineLayout layout = kernels::combine_layout(rows, chunks_per_row);

  // One workspace: the combine trees' node sums (raw bytes: Partial is a
  // device-side struct of doubles), then their arrival counters, which
  // start at zero (one memset; Note [Deterministic CUDA reduction]).
  const std::int64_t slot_bytes = layout.slots * std::int64_t(sizeof(kernels::Partial));
  const std::int64_t counter_bytes = layout.counters * std::int64_t(sizeof(unsigned int));
  at::Tensor workspace = at::empty({std::max<std::int64_t>(slot_bytes + counter_bytes, 1)},
                                   logp.options().dtype(at::kByte));
  auto* bytes = static_cast<unsigned char*>(workspace.data_ptr());
  if (counter_bytes > 0)
    C10_CUDA_CHECK(
        cudaMemsetAsync(bytes + slot_bytes, 0, static_cast<std::size_t>(counter_bytes), stream));

  const bool per_row = psft::core::uses_row_factor(static_cast<psft::Reduction>(c.reduction));
  if (c.need_grad) out.coef = at::empty(logp.sizes(), logp.options().dtype(acc));
  out.loss = at::empty({}, logp.options().dtype(acc));
  out.scale = at::empty({per_row ? rows + 1 : 1}, doubles);  // Note [Clipped-loss scale]
  out.metrics = at::empty({psft::core::kMetricCount}, doubles);
  out.status = at::empty({kernels::kStatusCount}, doubles);

  kernels::ForwardParams<acc_t> a;
  a.rows = rows;
  a.cols = cols;
  a.chunks_per_row = chunks_per_row;
  a.inputs[0] = device_input(logp, rows, "logp", logp);
  a.inputs[1] = device_input(old_logp, rows, "old_logp", logp);
  a.inputs[2] = device_input(advantages, rows, "advantages", logp);
  a.inputs[3] = device_input(mask, rows, "mask", logp);
  a.clip = {static_cast<acc_t>(c.eps_low), static_cast<acc_t>(c.eps_high),
            static_cast<acc_t>(c.dual_clip > 0 ? c.dual_clip : 0.0),
            static_cast<acc_t>(c.log_ratio_clamp), static_cast<acc_t>(c.delta)};
  a.clip.cispo_cap = static_cast<acc_t>(c.cispo_cap);
  a.clip.sapo_tau_pos = static_cast<acc_t>(c.sapo_tau_pos);
  a.clip.sapo_tau_neg = static_cast<acc_t>(c.sapo_tau_neg);
  a.clip.kl_estimator = c.kl_estimator;
  a.check_finite = c.check_finite;
  a.reduction = {static_cast<psft::Reduction>(c.reduction),
                 c.has_tokens,
                 c.tokens,
                 c.has_sequences,
                 c.sequences,
                 c.norm_constant,
                 c.world_size};
  a.coef = c.need_grad ? out.coef.data_ptr<acc_t>() : nullptr;
  a.layout = layout;
  a.slots = reinterpret_cast<kernels::Partial*>(bytes);
  a.counters = reinterpret_cast<unsigned int*>(bytes + slot_bytes);
  a.loss = out.loss.data_ptr<acc_t>();
  a.scale = out.scale.data_ptr<double>();
  a.metrics = out.metrics.data_ptr<double>();
  a.status = out.status.data_ptr<double>();
  const auto blocks = static_cast<unsigned>(std::max<std::int64_t>(units, 1));
  kernels::with_forward_kernel(
      static_cast<psft::core::RuleId>(c.rule), a, /*runtime=*/false,
      [&](auto kernel) { kernel<<<blocks, kernels::kThreads, 0, stream>>>(a); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class out_t, class acc_t>
void launch_backward(const at::Tensor& coef, const at::Tensor& scale, const at::Tensor& grad_output,
                     at::Tensor& grad, std::int64_t rows, std::int64_t cols) {
  const std::int64_t n = rows * cols;
  const std::int64_t per_block = std::int64_t(kernels::kThreads) * kernels::kBackwardVector;
  const std::int64_t max_blocks =
      std::int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const std::int64_t blocks = std::min((n + per_block - 1) / per_block, max_blocks);
  kernels::BackwardParams b;
  b.rows = rows;
  b.cols = cols;
  b.scale = scale.data_ptr<double>();
  b.per_row = scale.numel() > 1;
  b.grad_output = grad_output.data_ptr();
  b.grad_output_double = grad_output.scalar_type() == at::kDouble;
  kernels::backward<out_t, acc_t>
      <<<static_cast<unsigned>(blocks), kernels::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          b, coef.data_ptr<acc_t>(), reinterpret_cast<out_t*>(grad.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

kernels::DeviceLogits device_logits(const at::Tensor& logits) {
  kernels::DeviceLogits v;
  v.data = logits.data_ptr();
  v.dtype = device_dtype(logits);
  v.vocab = logits.size(-1);
  if (logits.dim() == 3) {
    v.rows = logits.size(0) * logits.size(1);
    v.inner_size = logits.size(1);
    v.outer_stride = logits.stride(0);
    v.inner_stride = logits.stride(1);
  } else {
    v.rows = logits.size(0);
    v.inner_size = logits.size(0);
    v.inner_stride = logits.stride(0);
  }
  if (v.inner_size == 0) v.inner_size = 1;
  TORCH_CHECK(v.vocab >= 1, "psft: internal error: the CUDA logits kernels need a vocabulary");
  TORCH_CHECK(v.vocab <= 1 || logits.stride(-1) == 1,
              "psft: internal error: the CUDA logits kernel needs stride 1 along the vocabulary");
  TORCH_CHECK(v.rows <= std::int64_t(0x7fffffff), "psft: too many tokens for the CUDA kernel");
  return v;
}

template <class out_t, class acc_t>
void launch_logits_backward(const kernels::DeviceLogits& l, const at::Tensor& labels,
                            std::int64_t ignore_index, double temperature, const at::Tensor& stats,
                            const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                            at::Tensor& grad) {
  kernels::LogitsBackwardParams<out_t, acc_t> p;
  p.logits = l;
  p.labels = labels.data_ptr<std::int64_t>();
  p.ignore_index = ignore_index;
  p.inv_temperature = static_cast<acc_t>(1.0 / temperature);
  p.stats = stats.data_ptr<acc_t>();
  p.grad_logp = grad_logp.defined() ? grad_logp.data_ptr<acc_t>() : nullptr;
  p.grad_entropy = grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr;
  p.grad = reinterpret_cast<out_t*>(grad.data_ptr());
  kernels::logits_backward<out_t, acc_t><<<static_cast<unsigned>(l.rows), kernels::kLogitsThreads,
                                           0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor token_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                                  std::int64_t ignore_index, double temperature,
                                  const at::Tensor& logp, const at::Tensor& entropy,
                                  const at::Tensor& stats) {
  TORCH_CHECK(logits.is_cuda(), "psft: the CUDA logits kernel needs CUDA logits, got ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const kernels::DeviceLogits l = device_logits(logits);
  // The kernel writes every row's flags.
  at::Tensor status = at::empty({l.rows}, logits.options().dtype(at::kByte));
  if (l.rows == 0) return status;
  TORCH_CHECK(labels.is_contiguous() && labels.numel() == l.rows && logp.is_contiguous() &&
                  entropy.is_contiguous(),
              "psft: internal error: bad outputs for the CUDA logits kernel");
  const auto launch = [&](auto element, auto zero) {
    using in_t = decltype(element);
    using acc_t = decltype(zero);
    kernels::LogitsForwardParams<acc_t> p;
    p.logits = l;
    p.labels = labels.data_ptr<std::int64_t>();
    p.ignore_index = ignore_index;
    p.inv_temperature = static_cast<acc_t>(1.0 / temperature);
    p.logp = logp.data_ptr<acc_t>();
    p.entropy = entropy.data_ptr<acc_t>();
    p.stats = stats.defined() ? stats.data_ptr<acc_t>() : nullptr;
    p.status = status.data_ptr<std::uint8_t>();
    kernels::logits_forward<in_t, acc_t><<<static_cast<unsigned>(l.rows), kernels::kLogitsThreads,
                                           0, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch(0.0f, 0.0f);
      break;
    case at::kBFloat16:
      launch(__nv_bfloat16(), 0.0f);
      break;
    case at::kHalf:
      launch(__half(), 0.0f);
      break;
    case at::kDouble:
      launch(0.0, 0.0);
      break;
    default:
      TORCH_CHECK(false, "psft: unsupported logits dtype ", logits.scalar_type(),
                  " in the CUDA kernel");
  }
  return status;
}

at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                                   std::int64_t ignore_index, double temperature,
                                   const at::Tensor& stats, const at::Tensor& grad_logp,
                                   const at::Tensor& grad_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const kernels::DeviceLogits l = device_logits(logits);
  if (l.rows == 0 || l.vocab == 0) return grad;
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch_logits_backward<float, float>(l, labels, ignore_index, temperature, stats, grad_logp,
                                           grad_entropy, grad);
      break;
    case at::kBFloat16:
      launch_logits_backward<__nv_bfloat16, float>(l, labels, ignore_index, temperature, stats,
                                                   grad_logp, grad_entropy, grad);
      break;
    case at::kHalf:
      launch_logits_backward<__half, float>(l, labels, ignore_index, temperature, stats, grad_logp,
                                            grad_entropy, grad);
      break;
    case at::kDouble:
      launch_logits_backward<double, double>(l, labels, ignore_index, temperature, stats, grad_logp,
                                             grad_entropy, grad);
      break;
    default:
      TORCH_CHECK(false, "psft: unsupported logits dtype ", logits.scalar_type(),
                  " in the CUDA kernel");
  }
  return grad;
}

ClippedLossResult clipped_loss_forward(const at::Tensor& logp, const at::Tensor& old_logp,
                                       const at::Tensor& advantages, const at::Tensor& mask,
                                       std::int64_t rows, std::int64_t cols,
                                       const ClippedLossConfig& config) {
  TORCH_CHECK(logp.is_cuda(), "psft: the CUDA kernel needs CUDA tensors, got logp on ",
              logp.device());
  TORCH_CHECK(logp.dim() <= 2 && logp.numel() == rows * cols,
              "psft: internal error: logp does not match rows x cols");
  const c10::cuda::CUDAGuard guard(logp.device());
  const at::ScalarType acc = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  ClippedLossResult out;
  if (acc == at::kDouble) {
    launch_forward<double>(logp, old_logp, advantages, mask, rows, cols, config, out, acc);
  } else {
    launch_forward<float>(logp, old_logp, advantages, mask, rows, cols, config, out, acc);
  }
  return out;
}

at::Tensor clipped_loss_backward(const at::Tensor& coef, const at::Tensor& scale,
                                 const at::Tensor& grad_output, c10::ScalarType dtype) {
  TORCH_CHECK(coef.is_cuda() && coef.is_contiguous(),
              "psft: internal error: the CUDA backward needs contiguous CUDA coefficients");
  const c10::cuda::CUDAGuard guard(coef.device());
  at::Tensor grad = at::empty(coef.sizes(), coef.options().dtype(dtype));
  const std::int64_t cols = coef.dim() == 2 ? coef.size(1) : coef.numel();
  const std::int64_t rows = cols == 0 ? 0 : coef.numel() / cols;
  if (coef.numel() == 0) return grad;
  // Read on the device: no synchronisation, and, for the float or double
  // 0-d gradient autograd passes, no conversion either.
  const bool go_ready =
      grad_output.device() == coef.device() && grad_output.numel() == 1 &&
      (grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble);
  const at::Tensor go = go_ready ? grad_output : grad_output.to(coef.device(), at::kDouble);
  TORCH_CHECK(scale.device() == coef.device() && scale.scalar_type() == at::kDouble &&
                  scale.is_contiguous(),
              "psft: internal error: the CUDA backward needs the forward's scale");
  const at::Tensor& s = scale;
  const bool acc_double = coef.scalar_type() == at::kDouble;
  switch (dtype) {
    case at::kFloat:
      TORCH_CHECK(!acc_double, "psft: internal error: fp32 gradient from fp64 coefficients");
      launch_backward<float, float>(coef, s, go, grad, rows, cols);
      break;
    case at::kBFloat16:
      launch_backward<__nv_bfloat16, float>(coef, s, go, grad, rows, cols);
      break;
    case at::kHalf:
      launch_backward<__half, float>(coef, s, go, grad, rows, cols);
      break;
    case at::kDouble:
      launch_backward<double, double>(coef, s, go, grad, rows, cols);
      break;
    default:
      TORCH_CHECK(false, "psft: unsupported gradient dtype ", dtype, " in the CUDA kernel");
  }
  return grad;
}

int entry_version() { return kEntryVersion; }

}  // namespace psft_cuda_entry
