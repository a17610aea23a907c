#pragma once
/// \file
/// The entry points of psft's CUDA translation unit (psft_cuda.cu), as seen
/// from host code compiled by any C++ compiler. No CUDA headers.
///
/// Note [CUDA entry points live outside the ABI namespace]
/// Every psft symbol lives in an inline namespace named after the compiler
/// that built it (Note [ABI namespace]): psft::v0_host under g++/clang,
/// psft::v0_cuda under nvcc. A g++-compiled dispatcher therefore cannot name
/// a function whose signature uses psft types from the nvcc-compiled
/// translation unit. These entry points sit in their own namespace and use
/// only ABI-neutral types (at::Tensor, scalars, and the POD structs below),
/// so both compilers see the same mangled names. They are defined once, in
/// psft_cuda.cu, which a consumer compiles into its target with
/// psft_enable_cuda() (cmake/psftCuda.cmake) together with the definition
/// PSFT_WITH_CUDA_KERNELS; the dispatchers call them only under that macro.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace psft_cuda_entry {

/// Interface version; bumped when a signature, or the meaning of a result,
/// below changes (2: ClippedLossResult::scale holds the row factors and the
/// global factor apart; token_logprobs' stats hold the raw maximum; 3: the
/// objective rule and its parameters in ClippedLossConfig, the batch's loss
/// sum in ClippedLossResult::status).
constexpr int kEntryVersion = 3;

/// Clip and reduction settings of one loss call (mirror of
/// psft::ClipOptions and psft::LossOptions, resolved).
struct ClippedLossConfig {
  double eps_low = 0.2;           ///< ClipOptions::eps_low
  double eps_high = 0.28;         ///< ClipOptions::eps_high
  double dual_clip = 0.0;         ///< <= 0: none
  double log_ratio_clamp = 20.0;  ///< ClipOptions::log_ratio_clamp
  double delta = 0.0;             ///< ClipOptions::delta; <= 0: none
  int rule = 0;                   ///< static_cast<int>(psft::core::RuleId)
  double cispo_cap = 5.0;         ///< ObjectiveOptions::cispo_cap
  double sapo_tau_pos = 1.0;      ///< ObjectiveOptions::sapo_tau_pos
  double sapo_tau_neg = 1.05;     ///< ObjectiveOptions::sapo_tau_neg
  int kl_estimator = 3;           ///< static_cast<int>(psft::core::KlEstimatorId)
  int reduction = 0;              ///< static_cast<int>(psft::Reduction)
  bool has_tokens = false;        ///< the normaliser supplies a token count
  double tokens = 0.0;            ///< normaliser.tokens when has_tokens
  bool has_sequences = false;     ///< the normaliser supplies a sequence count
  double sequences = 0.0;         ///< normaliser.sequences when has_sequences
  double norm_constant = 0.0;     ///< C of seq-mean-token-sum-norm (resolved)
  double world_size = 1.0;        ///< data-parallel size D
  bool check_finite = true;       ///< LossOptions::check_finite
  bool need_grad = true;          ///< also write the gradient coefficients
};

/// What the forward kernels produce, all on logp's device.
struct ClippedLossResult {
  at::Tensor loss;     ///< 0-d, float (double for fp64 logp)
  at::Tensor metrics;  ///< [10] float64, psft::core::MetricValues order
  at::Tensor coef;     ///< logp's shape, float/double: w dl/dlogp; undefined without need_grad
  /// float64, opaque to callers (clipped_loss_backward reads it): per-row
  /// reductions [rows + 1], the row factors then the global factor, else
  /// [1], the global factor (Note [Clipped-loss scale] in clipped_loss.cuh).
  at::Tensor scale;
  /// [6] float64: bad-value flags (1 old_logp, 2 advantages, 4 mask, 8
  /// logp), the normaliser's tokens / sequences too small (0/1), the batch's
  /// token and non-empty sequence counts, and its sum of w l. Read it only when a check needs
  /// it: reading it synchronises with the device.
  at::Tensor status;
};

/// Forward of the clipped objective on CUDA tensors viewed as [rows, cols]
/// (strides taken from the tensors; advantages and mask may be undefined).
ClippedLossResult clipped_loss_forward(const at::Tensor& logp, const at::Tensor& old_logp,
                                       const at::Tensor& advantages, const at::Tensor& mask,
                                       std::int64_t rows, std::int64_t cols,
                                       const ClippedLossConfig& config);

/// d loss / d logp = coef * scale * grad_output, in `dtype`, with the
/// forward's scale; grad_output (0-d) is read on the device, float or double.
at::Tensor clipped_loss_backward(const at::Tensor& coef, const at::Tensor& scale,
                                 const at::Tensor& grad_output, c10::ScalarType dtype);

/// token_logprobs forward on CUDA logits ([B, T, V] or [N, V], stride 1 along
/// V) and contiguous int64 labels (one per row): writes logp, entropy
/// (contiguous [rows], float32, float64 for float64 logits) and, when
/// defined, stats ([rows, 3]: the raw logits' max before 1 / temperature,
/// log S, A / S; Note [Logits stats] in logits.cuh). Returns [rows] uint8 row
/// flags (1 NaN/+inf logit, 2 all -inf, 4 label out of range); reading them
/// synchronises.
at::Tensor token_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                                  std::int64_t ignore_index, double temperature,
                                  const at::Tensor& logp, const at::Tensor& entropy,
                                  const at::Tensor& stats);

/// d(sum grad_logp * logp + grad_entropy * entropy) / d logits in the logits'
/// dtype, contiguous; grad_logp / grad_entropy contiguous in stats' dtype or
/// undefined (zero).
at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& labels,
                                   std::int64_t ignore_index, double temperature,
                                   const at::Tensor& stats, const at::Tensor& grad_logp,
                                   const at::Tensor& grad_entropy);

/// The interface version psft_cuda.cu was built with (kEntryVersion there).
int entry_version();

}  // namespace psft_cuda_entry
