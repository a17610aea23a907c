// psft's CUDA kernels (include/psft/cuda/*.cuh) executed on the CPU by
// support/cuda_emulator.hpp (Note [CUDA kernels emulated on the CPU]), so
// that their code runs, and is checked, on every CI machine. Torch-free: the
// kernels take raw strided pointers, and the expected values come from the
// independent double-precision references (reference/clipped_reference.hpp
// and the log-softmax below), computed from the inputs as stored.
//
// What this covers: each kernel's indexing (strides, offsets, chunk tails,
// 3-D logits, int64 offsets past 2^31 elements), its vectorised and scalar
// loads, the per-block tree reductions and the fixed-order combination of
// units, masking, the status flags, every output written (outputs are
// poisoned with NaN first), barrier discipline, and that blocks and the
// threads between two barriers may run in any order with bit-identical
// results. Under the sanitize phase the same runs are checked by ASan and
// UBSan. What it cannot cover: performance, warp-level behaviour, CUDA's own
// exp(), and the tensor glue of psft_cuda.cu; test_cuda.cpp covers those
// on a GPU.
//
// Tolerances: float64 1e-12, float32 accumulation 2e-5 (relative to
// max(1, |value|)); gradients stored as bfloat16 / float16 within their
// rounding (8e-3 / 1e-3 relative).

#include "support/cuda_emulator.hpp"  // first: defines the CUDA qualifiers

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "psft/core/options.hpp"
#include "psft/cuda/clipped_loss.cuh"
#include "psft/cuda/logits.cuh"
#include "reference/clipped_reference.hpp"
#include "reference/objectives_reference.hpp"
#include "support/reductions.hpp"
#include "support/reference_adapter.hpp"

namespace {

namespace kernels = psft::cuda;
using kernels::DeviceDtype;
using Order = cuda_emulator::Order;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

const char* dtype_name(DeviceDtype t) {
  switch (t) {
    case DeviceDtype::Float:
      return "float32";
    case DeviceDtype::Double:
      return "float64";
    case DeviceDtype::BFloat16:
      return "bfloat16";
    case DeviceDtype::Half:
      return "float16";
    case DeviceDtype::Bool:
      return "bool";
    default:
      return "absent";
  }
}

// ---------------------------------------------------------------------------
// Host memory laid out as a strided [rows, cols] view of one dtype.

/// 64-byte aligned bytes, left uninitialised (so that a huge, sparsely
/// touched buffer costs only the pages written).
struct Bytes {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> data;
  std::size_t size = 0;

  explicit Bytes(std::size_t n) : size(n) {
    const std::size_t rounded = (std::max<std::size_t>(n, 1) + 63) / 64 * 64;
    data.reset(static_cast<unsigned char*>(std::aligned_alloc(64, rounded)));
    if (!data) throw std::bad_alloc();
  }
  unsigned char* get() const { return data.get(); }
};

/// Writes v as element i of a buffer of type t (rounded to nearest).
void store(unsigned char* base, DeviceDtype t, std::int64_t i, double v) {
  switch (t) {
    case DeviceDtype::Float:
      reinterpret_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case DeviceDtype::Double:
      reinterpret_cast<double*>(base)[i] = v;
      break;
    case DeviceDtype::BFloat16:
      reinterpret_cast<__nv_bfloat16*>(base)[i] = __double2bfloat16(v);
      break;
    case DeviceDtype::Half:
      reinterpret_cast<__half*>(base)[i] = __double2half(v);
      break;
    case DeviceDtype::Bool:
      base[i] = v != 0 ? 1 : 0;
      break;
    default:
      break;
  }
}

double load(const unsigned char* base, DeviceDtype t, std::int64_t i) {
  switch (t) {
    case DeviceDtype::Float:
      return reinterpret_cast<const float*>(base)[i];
    case DeviceDtype::Double:
      return reinterpret_cast<const double*>(base)[i];
    case DeviceDtype::BFloat16:
      return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
    case DeviceDtype::Half:
      return __half2float(reinterpret_cast<const __half*>(base)[i]);
    case DeviceDtype::Bool:
      return base[i] ? 1.0 : 0.0;
    default:
      return 0.0;
  }
}

/// How a [rows, cols] input sits in memory.
enum class Layout {
  Contiguous,  ///< row-major, stride 1
  Padded,      ///< rows a multiple of 8 elements apart, longer than cols
  Offset,      ///< row-major, starting one element past an aligned address
  Transposed,  ///< column-major
  Broadcast,   ///< one row repeated (row stride 0)
};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous:
      return "contiguous";
    case Layout::Padded:
      return "padded";
    case Layout::Offset:
      return "offset";
    case Layout::Transposed:
      return "transposed";
    default:
      return "broadcast";
  }
}

struct View {
  DeviceDtype dtype = DeviceDtype::Absent;
  std::int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1, offset = 0;
  std::shared_ptr<Bytes> bytes;

  View() = default;
  View(DeviceDtype t, std::int64_t r, std::int64_t c, Layout layout) : dtype(t), rows(r), cols(c) {
    switch (layout) {
      case Layout::Contiguous:
        row_stride = c;
        break;
      case Layout::Padded:
        row_stride = (c + 7) / 8 * 8 + 8;
        break;
      case Layout::Offset:
        row_stride = c;
        offset = 1;
        break;
      case Layout::Transposed:
        row_stride = 1;
        col_stride = r;
        break;
      case Layout::Broadcast:
        row_stride = 0;
        break;
    }
    const std::int64_t span =
        r == 0 || c == 0 ? 0 : (r - 1) * row_stride + (c - 1) * col_stride + 1;
    bytes =
        std::make_shared<Bytes>(static_cast<std::size_t>(offset + span) * kernels::element_size(t));
  }
  bool present() const { return dtype != DeviceDtype::Absent; }
  unsigned char* base() const {
    return bytes->get() + static_cast<std::size_t>(offset) * kernels::element_size(dtype);
  }
  std::int64_t index(std::int64_t r, std::int64_t c) const {
    return r * row_stride + c * col_stride;
  }
  void set(std::int64_t r, std::int64_t c, double v) const { store(base(), dtype, index(r, c), v); }
  double get(std::int64_t r, std::int64_t c) const { return load(base(), dtype, index(r, c)); }
  /// As psft_cuda.cu describes a tensor to the kernels.
  kernels::DeviceInput input() const {
    kernels::DeviceInput in;
    if (!present()) return in;
    in.data = base();
    in.dtype = dtype;
    in.row_stride = row_stride;
    in.col_stride = col_stride;
    in.vectorised = kernels::can_vectorise(in.data, dtype, row_stride, col_stride, rows);
    return in;
  }
};

double rel_diff(double got, double want) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want) ? 0 : kInf;
  if (got == want) return 0;  // equal infinities
  return std::fabs(got - want) / std::max(1.0, std::fabs(want));
}

// ---------------------------------------------------------------------------
// The clipped objective: forward_units and backward, as psft_cuda.cu
// launches them.

struct ClippedCase {
  std::int64_t rows = 2, cols = 9;
  DeviceDtype logp = DeviceDtype::Float, old_logp = DeviceDtype::Float;
  DeviceDtype advantages = DeviceDtype::Absent, mask = DeviceDtype::Bool;
  Layout layout = Layout::Contiguous;
  Layout advantages_layout = Layout::Contiguous;
  psft::LossOptions options;
  double grad_output = 0.75;
  unsigned backward_blocks = 3;  ///< small, so that the grid-stride loop wraps
  bool unaligned_grad = false;   ///< gradient one element past an aligned address
  std::uint64_t seed = 1;
  /// The objective rule (Note [Objective rules]); KlPenalty reads old_logp
  /// as ref_logp, with kl_estimator.
  psft::core::RuleId rule = psft::core::RuleId::Clipped;
  psft::core::KlEstimatorId kl_estimator = psft::core::KlEstimatorId::K3;

  std::string name() const {
    return std::to_string(rows) + "x" + std::to_string(cols) + " logp " + dtype_name(logp) +
           " old " + dtype_name(old_logp) + " adv " + dtype_name(advantages) + " (" +
           layout_name(advantages_layout) + ") mask " + dtype_name(mask) + " " +
           layout_name(layout) + " " + test_support::name_of(options.reduction) +
           (options.clip.dual_clip ? " dual" : "") + (options.normaliser ? " normaliser" : "") +
           " rule " + std::to_string(static_cast<int>(rule)) + "/" +
           std::to_string(static_cast<int>(kl_estimator));
  }
};

struct ClippedInputs {
  View logp, old_logp, advantages, mask;
};

/// Seeded inputs: log-ratios mostly near 0 with a few far past the clamp,
/// advantages of both signs, a fully masked row, NaN under the mask.
ClippedInputs make_inputs(const ClippedCase& c) {
  ClippedInputs in;
  in.logp = View(c.logp, c.rows, c.cols, c.layout);
  in.old_logp = View(c.old_logp, c.rows, c.cols, c.layout);
  if (c.advantages != DeviceDtype::Absent)
    in.advantages = View(c.advantages, c.rows, c.cols, c.advantages_layout);
  if (c.mask != DeviceDtype::Absent) in.mask = View(c.mask, c.rows, c.cols, c.layout);
  std::mt19937_64 rng(c.seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (std::int64_t r = 0; r < c.rows; ++r) {
    const bool row_masked = c.rows > 2 && r == 1;
    for (std::int64_t j = 0; j < c.cols; ++j) {
      const double logp = -6.0 * uniform(rng) - 0.01;
      double delta = 0.3 * normal(rng);
      if (uniform(rng) < 0.03) delta = (uniform(rng) < 0.5 ? -1 : 1) * (25.0 + 40.0 * uniform(rng));
      in.logp.set(r, j, logp);
      in.old_logp.set(r, j, logp - delta);
      if (in.advantages.present() && (c.advantages_layout != Layout::Broadcast || r == 0))
        in.advantages.set(r, j, uniform(rng) < 0.05 ? 0.0 : normal(rng));
      if (in.mask.present()) {
        double w = uniform(rng) < 0.8 ? 1.0 : 0.0;
        if (c.mask != DeviceDtype::Bool && w != 0) w = 0.25 + 1.75 * uniform(rng);
        if (row_masked) w = 0.0;
        in.mask.set(r, j, w);
        // A masked token's values are never read.
        if (w == 0) in.old_logp.set(r, j, kNaN);
      }
    }
  }
  return in;
}

struct ClippedOutputs {
  double loss = kNaN;
  double metrics[psft::core::kMetricCount];
  double status[kernels::kStatusCount];
  std::vector<double> coef, grad;  ///< row-major [rows, cols]
};

/// The reduction settings as the dispatcher resolves them.
kernels::ReductionParams reduction_params(const psft::LossOptions& o, std::int64_t cols) {
  kernels::ReductionParams p{};
  p.reduction = o.reduction;
  if (o.normaliser) {
    p.has_tokens = o.normaliser->tokens.has_value();
    p.tokens = o.normaliser->tokens.value_or(0.0);
    p.has_sequences = o.normaliser->sequences.has_value();
    p.sequences = o.normaliser->sequences.value_or(0.0);
    p.world_size = static_cast<double>(o.normaliser->world_size);
  } else {
    p.world_size = 1.0;
  }
  p.norm_constant = o.norm_constant.value_or(static_cast<double>(cols));
  return p;
}

/// How many units a row has, as psft_cuda.cu cuts it (an empty one for
/// cols == 0).
std::int64_t chunks_for(std::int64_t cols) {
  return std::max<std::int64_t>((cols + kernels::kChunk - 1) / kernels::kChunk, 1);
}

/// The forward's parameters for a case, as psft_cuda.cu fills them; the
/// combine's workspace and the outputs are the caller's.
template <class acc_t>
kernels::ForwardParams<acc_t> forward_params(const ClippedCase& c, const ClippedInputs& in) {
  kernels::ForwardParams<acc_t> a{};
  a.rows = c.rows;
  a.cols = c.cols;
  a.chunks_per_row = chunks_for(c.cols);
  a.inputs[0] = in.logp.input();
  a.inputs[1] = in.old_logp.input();
  a.inputs[2] = in.advantages.input();
  a.inputs[3] = in.mask.input();
  const psft::ClipOptions& clip = c.options.clip;
  a.clip = {static_cast<acc_t>(clip.eps_low), static_cast<acc_t>(clip.eps_high),
            static_cast<acc_t>(clip.dual_clip.value_or(0.0)),
            static_cast<acc_t>(clip.log_ratio_clamp), static_cast<acc_t>(clip.delta.value_or(0.0))};
  a.clip.cispo_cap = static_cast<acc_t>(c.options.objective.cispo_cap);
  a.clip.sapo_tau_pos = static_cast<acc_t>(c.options.objective.sapo_tau_pos);
  a.clip.sapo_tau_neg = static_cast<acc_t>(c.options.objective.sapo_tau_neg);
  a.clip.kl_estimator = static_cast<int>(c.kl_estimator);
  a.check_finite = c.options.check_finite;
  a.reduction = reduction_params(c.options, c.cols);
  a.layout = kernels::combine_layout(c.rows, a.chunks_per_row);
  return a;
}

/// Launches the forward_units instantiation psft_cuda.cu would
/// (kernels::with_forward_kernel), or RuntimeInputs when `runtime`.
template <class acc_t>
void launch_forward(const kernels::ForwardParams<acc_t>& a, unsigned blocks,
                    const cuda_emulator::Options& order, bool runtime = false,
                    psft::core::RuleId rule = psft::core::RuleId::Clipped) {
  kernels::with_forward_kernel(rule, a, runtime, [&](auto kernel) {
    cuda_emulator::launch(kernel, blocks, kernels::kThreads, order, a);
  });
}

template <class acc_t, class out_t>
ClippedOutputs run_clipped(const ClippedCase& c, const ClippedInputs& in,
                           const cuda_emulator::Options& order, bool runtime) {
  const std::int64_t rows = c.rows, cols = c.cols, n = rows * cols;
  std::vector<acc_t> coef(static_cast<std::size_t>(n), static_cast<acc_t>(kNaN));
  kernels::ForwardParams<acc_t> a = forward_params<acc_t>(c, in);
  // Workspace left poisoned (NaN bytes), as a fresh allocation may be; the
  // counters zero, as psft_cuda.cu's memset leaves them.
  std::vector<kernels::Partial> slots(
      static_cast<std::size_t>(std::max<std::int64_t>(a.layout.slots, 1)));
  std::memset(static_cast<void*>(slots.data()), 0xff, slots.size() * sizeof(kernels::Partial));
  std::vector<unsigned int> counters(
      static_cast<std::size_t>(std::max<std::int64_t>(a.layout.counters, 1)), 0u);
  const bool per_row = psft::core::uses_row_factor(c.options.reduction);
  std::vector<double> scale(per_row ? static_cast<std::size_t>(rows) + 1 : 1, kNaN);
  ClippedOutputs out;
  std::fill(std::begin(out.metrics), std::end(out.metrics), kNaN);
  std::fill(std::begin(out.status), std::end(out.status), kNaN);
  acc_t loss = static_cast<acc_t>(kNaN);
  a.coef = coef.data();
  a.slots = slots.data();
  a.counters = counters.data();
  a.loss = &loss;
  a.scale = scale.data();
  a.metrics = out.metrics;
  a.status = out.status;
  const std::int64_t units = rows * a.chunks_per_row;
  launch_forward(a, static_cast<unsigned>(std::max<std::int64_t>(units, 1)), order, runtime,
                 c.rule);
  out.loss = static_cast<double>(loss);

  const std::size_t skip = c.unaligned_grad ? 1 : 0;
  std::vector<out_t> storage(static_cast<std::size_t>(n) + skip);
  for (auto& g : storage) g = kernels::to_output<out_t>(static_cast<acc_t>(kNaN));
  out_t* grad = storage.data() + skip;
  const double grad_output = c.grad_output;
  kernels::BackwardParams b{};
  b.rows = rows;
  b.cols = cols;
  b.scale = scale.data();
  b.per_row = per_row;
  b.grad_output = &grad_output;
  b.grad_output_double = true;
  if (n > 0)
    cuda_emulator::launch(kernels::backward<out_t, acc_t>, c.backward_blocks, kernels::kThreads,
                          order, b, static_cast<const acc_t*>(coef.data()), grad);
  out.coef.assign(coef.begin(), coef.end());
  out.grad.assign(static_cast<std::size_t>(n), 0.0);
  for (std::size_t k = 0; k < out.grad.size(); ++k)
    out.grad[k] = kernels::logit_value<double>(grad[k]);
  return out;
}

/// Runs the two kernels with the gradient in logp's dtype (as the
/// dispatcher does) and float accumulation, or double for float64 logp;
/// `runtime` forces forward_units' RuntimeInputs path.
ClippedOutputs run_clipped(const ClippedCase& c, const ClippedInputs& in,
                           const cuda_emulator::Options& order = {}, bool runtime = false) {
  switch (c.logp) {
    case DeviceDtype::Double:
      return run_clipped<double, double>(c, in, order, runtime);
    case DeviceDtype::BFloat16:
      return run_clipped<float, __nv_bfloat16>(c, in, order, runtime);
    case DeviceDtype::Half:
      return run_clipped<float, __half>(c, in, order, runtime);
    default:
      return run_clipped<float, float>(c, in, order, runtime);
  }
}

/// The stored inputs as the reference's dense vectors.
reference::Result reference_for(const ClippedCase& c, const ClippedInputs& in) {
  const std::size_t n = static_cast<std::size_t>(c.rows * c.cols);
  std::vector<double> logp(n), old_logp(n), advantages(n, 1.0), mask(n, 1.0);
  for (std::int64_t r = 0; r < c.rows; ++r)
    for (std::int64_t j = 0; j < c.cols; ++j) {
      const std::size_t k = static_cast<std::size_t>(r * c.cols + j);
      logp[k] = in.logp.get(r, j);
      old_logp[k] = in.old_logp.get(r, j);
      if (in.advantages.present()) advantages[k] = in.advantages.get(r, j);
      if (in.mask.present()) mask[k] = in.mask.get(r, j);
    }
  reference::Settings s = test_support::settings_for(c.options);
  const auto rows = static_cast<std::size_t>(c.rows), cols = static_cast<std::size_t>(c.cols);
  reference::VariantSettings v;
  v.cispo_cap = c.options.objective.cispo_cap;
  v.tau_pos = c.options.objective.sapo_tau_pos;
  v.tau_neg = c.options.objective.sapo_tau_neg;
  switch (c.rule) {
    case psft::core::RuleId::Clipped:
      return reference::clipped_loss(rows, cols, logp, old_logp, advantages, mask, s);
    case psft::core::RuleId::CispoRelative:
      v.variant = reference::Variant::CispoRelative;
      break;
    case psft::core::RuleId::CispoCapped:
      v.variant = reference::Variant::CispoCapped;
      break;
    case psft::core::RuleId::Sapo:
      v.variant = reference::Variant::Sapo;
      break;
    case psft::core::RuleId::KlPenalty:
      return reference::kl_loss(rows, cols, logp, old_logp, mask, s,
                                static_cast<reference::KlKind>(c.kl_estimator))
          .aggregated;
  }
  return reference::variant_loss(rows, cols, logp, old_logp, advantages, mask, s, v);
}

double value_tolerance(DeviceDtype logp) { return logp == DeviceDtype::Double ? 1e-12 : 2e-5; }

double grad_tolerance(DeviceDtype logp) {
  switch (logp) {
    case DeviceDtype::Double:
      return 1e-12;
    case DeviceDtype::BFloat16:
      return 8e-3;
    case DeviceDtype::Half:
      return 1e-3;
    default:
      return 2e-5;
  }
}

/// Spacing of the output dtype's subnormals: float16 stores gradients
/// below 6e-5 with this absolute step.
double subnormal_step(DeviceDtype t) { return t == DeviceDtype::Half ? std::ldexp(1.0, -24) : 0.0; }

void check_against_reference(const ClippedCase& c, const ClippedInputs& in,
                             const ClippedOutputs& got) {
  INFO(c.name());
  const reference::Result want = reference_for(c, in);
  const double tol = value_tolerance(c.logp);
  CHECK(std::fabs(got.loss - want.loss) <= tol * std::max(1.0, want.loss_magnitude));
  const reference::Metrics& m = want.metrics;
  const double expected[psft::core::kMetricCount] = {
      m.clip_frac,    m.clip_frac_dual, m.clip_frac_high, m.clip_frac_low, m.approx_kl_k1,
      m.approx_kl_k3, m.ratio_mean,     m.ratio_min,      m.ratio_max,     m.token_count};
  for (int i = 0; i < psft::core::kMetricCount; ++i) {
    INFO("metric " << i << ": " << got.metrics[i] << " vs " << expected[i]);
    CHECK(rel_diff(got.metrics[i], expected[i]) <= tol);
  }
  CHECK(got.status[kernels::kStatusFlags] == 0);
  CHECK(got.status[kernels::kStatusTokensTooSmall] == 0);
  CHECK(got.status[kernels::kStatusSequencesTooSmall] == 0);
  CHECK(got.status[kernels::kStatusBatchTokens] == Approx(m.token_count).epsilon(1e-12));

  // Gradient: reference * grad_output, elementwise within the output
  // dtype's rounding plus the accumulation error relative to the largest.
  double largest = 0;
  for (double g : want.grad) largest = std::max(largest, std::fabs(g * c.grad_output));
  const double gtol = grad_tolerance(c.logp);
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t k = 0; k < want.grad.size(); ++k) {
    const double w = want.grad[k] * c.grad_output;
    const double allowed =
        gtol * std::fabs(w) + value_tolerance(c.logp) * largest + subnormal_step(c.logp);
    if (!(std::fabs(got.grad[k] - w) <= allowed) && bad++ == 0) first_bad = k;
  }
  INFO("gradient: " << bad << " elements off, first at " << first_bad << ": "
                    << (bad ? got.grad[first_bad] : 0.0) << " vs "
                    << (bad ? want.grad[first_bad] * c.grad_output : 0.0));
  CHECK(bad == 0);
}

bool bit_identical(const ClippedOutputs& a, const ClippedOutputs& b) {
  const auto same = [](double x, double y) {
    return std::memcmp(&x, &y, sizeof x) == 0 || (std::isnan(x) && std::isnan(y));
  };
  if (!same(a.loss, b.loss)) return false;
  for (int i = 0; i < psft::core::kMetricCount; ++i)
    if (!same(a.metrics[i], b.metrics[i])) return false;
  for (int i = 0; i < kernels::kStatusCount; ++i)
    if (!same(a.status[i], b.status[i])) return false;
  if (a.coef.size() != b.coef.size() || a.grad.size() != b.grad.size()) return false;
  for (std::size_t k = 0; k < a.coef.size(); ++k)
    if (!same(a.coef[k], b.coef[k]) || !same(a.grad[k], b.grad[k])) return false;
  return true;
}

psft::LossOptions options_for(psft::Reduction r) {
  psft::LossOptions o;
  o.reduction = r;
  return o;
}

// ---------------------------------------------------------------------------
// token_logprobs: logits_forward and logits_backward.

struct LogitsCase {
  std::int64_t batch = 3, time = 4, vocab = 33;  ///< rows = batch * time
  DeviceDtype dtype = DeviceDtype::Float;
  bool three_d = false;  ///< [B, T, V] inside a padded [B, T + 1, V + 3] buffer
  double temperature = 1.0;
  std::int64_t ignore_index = -100;
  bool grad_logp = true, grad_entropy = true;
  std::int64_t shift = 0;  ///< elements between an aligned address and the data
  std::uint64_t seed = 7;

  std::int64_t rows() const { return batch * time; }
  std::string name() const {
    return std::to_string(batch) + "x" + std::to_string(time) + "x" + std::to_string(vocab) + " " +
           dtype_name(dtype) + (three_d ? " 3-D strided" : " 2-D") +
           " T=" + std::to_string(temperature) + (grad_logp ? " dlogp" : "") +
           (grad_entropy ? " dentropy" : "");
  }
};

struct LogitsData {
  std::shared_ptr<Bytes> bytes;
  kernels::DeviceLogits view;
  std::vector<std::int64_t> labels;
  double get(std::int64_t row, std::int64_t j) const {
    return load(static_cast<const unsigned char*>(view.data), view.dtype, offset(row) + j);
  }
  void set(std::int64_t row, std::int64_t j, double v) const {
    store(static_cast<unsigned char*>(const_cast<void*>(view.data)), view.dtype, offset(row) + j,
          v);
  }
  std::int64_t offset(std::int64_t row) const {
    return (row / view.inner_size) * view.outer_stride +
           (row % view.inner_size) * view.inner_stride;
  }
};

/// Logits laid out as psft_cuda.cu's device_logits describes a tensor.
LogitsData make_logits_layout(const LogitsCase& c) {
  LogitsData d;
  kernels::DeviceLogits& v = d.view;
  v.dtype = c.dtype;
  v.vocab = c.vocab;
  v.rows = c.rows();
  std::int64_t elements = 0;
  if (c.three_d) {
    v.inner_size = c.time;
    v.inner_stride = c.vocab + 3;
    v.outer_stride = (c.time + 1) * v.inner_stride;
    elements = c.batch * v.outer_stride;
  } else {
    v.inner_size = std::max<std::int64_t>(v.rows, 1);
    v.inner_stride = c.vocab;
    elements = v.rows * c.vocab;
  }
  const std::size_t size = kernels::element_size(c.dtype);
  d.bytes = std::make_shared<Bytes>(static_cast<std::size_t>(elements + c.shift) * size);
  v.data = d.bytes->get() + static_cast<std::size_t>(c.shift) * size;
  d.labels.assign(static_cast<std::size_t>(v.rows), 0);
  return d;
}

/// Seeded logits with a few huge (+-1e4 / T) and -inf entries, labels with
/// every third-or-so row ignored.
LogitsData make_logits(const LogitsCase& c) {
  LogitsData d = make_logits_layout(c);
  std::mt19937_64 rng(c.seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (std::int64_t r = 0; r < c.rows(); ++r) {
    const std::int64_t label = static_cast<std::int64_t>(uniform(rng) * c.vocab) % c.vocab;
    d.labels[static_cast<std::size_t>(r)] = r % 3 == 2 ? c.ignore_index : label;
    for (std::int64_t j = 0; j < c.vocab; ++j) {
      double z = normal(rng);
      const double u = uniform(rng);
      if (c.vocab > 1 && j != label && u < 0.02) z = -kInf;
      if (c.dtype != DeviceDtype::Half && u > 0.995) z = (u > 0.9975 ? 1e4 : -1e4) * c.temperature;
      d.set(r, j, z);
    }
  }
  return d;
}

struct LogitsOutputs {
  std::vector<double> logp, entropy, grad;  ///< grad row-major [rows, vocab]
  std::vector<unsigned char> status;
};

template <class in_t, class acc_t>
LogitsOutputs run_logits(const LogitsCase& c, const LogitsData& d,
                         const std::vector<double>& grad_logp,
                         const std::vector<double>& grad_entropy,
                         const cuda_emulator::Options& order) {
  const std::size_t rows = static_cast<std::size_t>(c.rows());
  std::vector<acc_t> logp(rows, static_cast<acc_t>(kNaN)), entropy(rows, static_cast<acc_t>(kNaN)),
      stats(3 * rows, static_cast<acc_t>(kNaN));
  LogitsOutputs out;
  out.status.assign(rows, 0xff);
  kernels::LogitsForwardParams<acc_t> p{};
  p.logits = d.view;
  p.labels = d.labels.data();
  p.ignore_index = c.ignore_index;
  p.inv_temperature = static_cast<acc_t>(1.0 / c.temperature);
  p.logp = logp.data();
  p.entropy = entropy.data();
  p.stats = stats.data();
  p.status = out.status.data();
  if (rows > 0)
    cuda_emulator::launch(kernels::logits_forward<in_t, acc_t>, static_cast<unsigned>(rows),
                          kernels::kLogitsThreads, order, p);
  out.logp.assign(logp.begin(), logp.end());
  out.entropy.assign(entropy.begin(), entropy.end());

  const std::vector<acc_t> gl(grad_logp.begin(), grad_logp.end());
  const std::vector<acc_t> ge(grad_entropy.begin(), grad_entropy.end());
  const std::size_t n = rows * static_cast<std::size_t>(c.vocab);
  using out_t = in_t;  // the gradient keeps the logits' dtype
  std::vector<out_t> grad(n);
  for (auto& g : grad) g = kernels::to_output<out_t>(static_cast<acc_t>(kNaN));
  kernels::LogitsBackwardParams<out_t, acc_t> b{};
  b.logits = d.view;
  b.labels = d.labels.data();
  b.ignore_index = c.ignore_index;
  b.inv_temperature = p.inv_temperature;
  b.stats = stats.data();
  b.grad_logp = c.grad_logp ? gl.data() : nullptr;
  b.grad_entropy = c.grad_entropy ? ge.data() : nullptr;
  b.grad = grad.data();
  if (rows > 0)
    cuda_emulator::launch(kernels::logits_backward<out_t, acc_t>, static_cast<unsigned>(rows),
                          kernels::kLogitsThreads, order, b);
  out.grad.resize(n);
  for (std::size_t k = 0; k < n; ++k) out.grad[k] = kernels::logit_value<double>(grad[k]);
  return out;
}

LogitsOutputs run_logits(const LogitsCase& c, const LogitsData& d,
                         const std::vector<double>& grad_logp,
                         const std::vector<double>& grad_entropy,
                         const cuda_emulator::Options& order = {}) {
  switch (c.dtype) {
    case DeviceDtype::Double:
      return run_logits<double, double>(c, d, grad_logp, grad_entropy, order);
    case DeviceDtype::BFloat16:
      return run_logits<__nv_bfloat16, float>(c, d, grad_logp, grad_entropy, order);
    case DeviceDtype::Half:
      return run_logits<__half, float>(c, d, grad_logp, grad_entropy, order);
    default:
      return run_logits<float, float>(c, d, grad_logp, grad_entropy, order);
  }
}

/// Double-precision log-softmax of one row of the stored logits: the
/// label's log-probability, the entropy and d(g logp + h H)/dz.
struct RowReference {
  double logp = 0, entropy = 0;
  std::vector<double> grad;
};

RowReference reference_row(const LogitsData& d, std::int64_t row, std::int64_t label,
                           double temperature, double g, double h) {
  const std::int64_t v = d.view.vocab;
  std::vector<double> z(static_cast<std::size_t>(v));
  double m = -kInf;
  for (std::int64_t j = 0; j < v; ++j) {
    z[static_cast<std::size_t>(j)] = d.get(row, j) / temperature;
    m = std::max(m, z[static_cast<std::size_t>(j)]);
  }
  double s = 0;
  for (double x : z) s += std::exp(x - m);
  const double log_z = m + std::log(s);
  RowReference out;
  out.logp = z[static_cast<std::size_t>(label)] - log_z;
  for (double x : z)
    if (x != -kInf) out.entropy -= std::exp(x - log_z) * (x - log_z);
  out.grad.resize(z.size());
  for (std::int64_t j = 0; j < v; ++j) {
    const double x = z[static_cast<std::size_t>(j)];
    const double p = x == -kInf ? 0.0 : std::exp(x - log_z);
    const double entropy_term = p == 0 ? 0.0 : -p * ((x - log_z) + out.entropy);
    out.grad[static_cast<std::size_t>(j)] =
        (g * ((j == label ? 1.0 : 0.0) - p) + h * entropy_term) / temperature;
  }
  return out;
}

std::vector<double> random_weights(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> w(n);
  for (double& x : w) x = normal(rng);
  return w;
}

/// Checks rows `rows` of a run against the double reference.
void check_logits_rows(const LogitsCase& c, const LogitsData& d, const LogitsOutputs& got,
                       const std::vector<double>& gl, const std::vector<double>& ge,
                       const std::vector<std::int64_t>& rows) {
  INFO(c.name());
  const double tol = value_tolerance(c.dtype);
  const double gtol = grad_tolerance(c.dtype);
  const std::size_t v = static_cast<std::size_t>(c.vocab);
  for (std::int64_t r : rows) {
    INFO("row " << r);
    const std::size_t i = static_cast<std::size_t>(r);
    const std::int64_t label = d.labels[i];
    CHECK(got.status[i] == 0);
    const std::size_t first = i * v;
    if (label == c.ignore_index) {
      CHECK(got.logp[i] == 0);
      CHECK(got.entropy[i] == 0);
      for (std::size_t j = 0; j < v; ++j) CHECK(got.grad[first + j] == 0);
      continue;
    }
    const double g = c.grad_logp ? gl[i] : 0.0, h = c.grad_entropy ? ge[i] : 0.0;
    const RowReference want = reference_row(d, r, label, c.temperature, g, h);
    CHECK(rel_diff(got.logp[i], want.logp) <= tol);
    CHECK(rel_diff(got.entropy[i], want.entropy) <= tol);
    double largest = 0;
    for (double x : want.grad) largest = std::max(largest, std::fabs(x));
    std::size_t bad = 0, first_bad = 0;
    for (std::size_t j = 0; j < v; ++j) {
      const double allowed =
          gtol * std::fabs(want.grad[j]) + tol * std::max(1.0, largest) + subnormal_step(c.dtype);
      if (!(std::fabs(got.grad[first + j] - want.grad[j]) <= allowed) && bad++ == 0) first_bad = j;
    }
    INFO("gradient: " << bad << " entries off, first " << first_bad << ": "
                      << (bad ? got.grad[first + first_bad] : 0.0) << " vs "
                      << (bad ? want.grad[first_bad] : 0.0));
    CHECK(bad == 0);
  }
}

std::vector<std::int64_t> all_rows(std::int64_t n) {
  std::vector<std::int64_t> r(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) r[static_cast<std::size_t>(i)] = i;
  return r;
}

// ---------------------------------------------------------------------------
// Kernels that break the rules, to show that the emulator's checks fire.

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 5) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

/// Reads its neighbour's shared slot without a barrier in between.
__global__ void racy_kernel(int* out) {
  __shared__ int slots[32];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(blockIdx.x);
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

/// The same with the barrier.
__global__ void synchronised_kernel(int* out) {
  __shared__ int slots[32];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

std::vector<int> run_int_kernel(void (*kernel)(int*), Order order) {
  std::vector<int> out(3 * 32, -1);
  cuda_emulator::Options o;
  o.order = order;
  o.seed = 42;
  cuda_emulator::launch(kernel, 3, 32, o, out.data());
  return out;
}

const Order kOrders[] = {Order::Forward, Order::Reverse, Order::Shuffled};

}  // namespace

TEST_CASE("emulator: barrier misuse is an error and races show up as order dependence",
          "[emulated]") {
  std::vector<int> out(64, 0);
  CHECK_THROWS_AS(cuda_emulator::launch(early_exit_kernel, 1, 64, {}, out.data()),
                  cuda_emulator::Error);
  CHECK_THROWS_AS(cuda_emulator::launch(divergent_barrier_kernel, 1, 64, {}, out.data()),
                  cuda_emulator::Error);
  // With the barrier every order gives the same answer; without it, not.
  const std::vector<int> synced = run_int_kernel(synchronised_kernel, Order::Forward);
  CHECK(synced[0] == 1);
  CHECK(synced[32 + 31] == 1000);
  for (Order o : kOrders) CHECK(run_int_kernel(synchronised_kernel, o) == synced);
  CHECK(run_int_kernel(racy_kernel, Order::Forward) != run_int_kernel(racy_kernel, Order::Reverse));
}

TEST_CASE(
    "cuda clipped kernels (emulated): every dtype, layout and reduction against the "
    "double reference",
    "[emulated][clipped]") {
  std::vector<ClippedCase> cases;
  const DeviceDtype floats[] = {DeviceDtype::Float, DeviceDtype::Double, DeviceDtype::BFloat16,
                                DeviceDtype::Half};
  const Layout layouts[] = {Layout::Contiguous, Layout::Padded, Layout::Offset, Layout::Transposed};
  std::uint64_t seed = 100;
  // Every reduction x every logp dtype, cycling through layouts, masks and
  // advantages; 3 x 4099 makes three units per row, the last with a tail.
  int k = 0;
  for (psft::Reduction r : test_support::kReductions) {
    for (DeviceDtype t : floats) {
      ClippedCase c;
      c.rows = k % 2 ? 3 : 5;
      c.cols = k % 3 == 0 ? 4099 : (k % 3 == 1 ? 37 : 2048);
      c.logp = t;
      c.old_logp = floats[(k + 1) % 4];
      c.advantages = k % 4 == 0 ? DeviceDtype::Absent : floats[(k + 2) % 4];
      c.mask =
          k % 3 == 0 ? DeviceDtype::Bool : (k % 3 == 1 ? DeviceDtype::Float : DeviceDtype::Absent);
      c.layout = layouts[k % 4];
      c.advantages_layout = k % 5 == 0 ? Layout::Broadcast : c.layout;
      c.options = options_for(r);
      if (k % 2 == 1) c.options.clip.dual_clip = 3.0;
      c.seed = ++seed;
      cases.push_back(c);
      ++k;
    }
  }
  // Global counts from a normaliser, world size and norm constant.
  {
    ClippedCase c;
    c.rows = 4;
    c.cols = 300;
    c.advantages = DeviceDtype::Float;
    c.options = options_for(psft::Reduction::SeqMeanTokenSum);
    c.options.normaliser = psft::Normaliser{5000.0, 17.0, 4};
    c.seed = ++seed;
    cases.push_back(c);
    c.options = options_for(psft::Reduction::TokenMean);
    c.options.normaliser = psft::Normaliser{5000.0, 17.0, 4};
    cases.push_back(c);
    c.options = options_for(psft::Reduction::SeqMeanTokenSumNorm);
    c.options.norm_constant = 123.0;
    cases.push_back(c);
  }
  // More rows than a combine node has children: two levels of the batch
  // tree (Note [Deterministic CUDA reduction]).
  {
    ClippedCase c;
    c.rows = 300;
    c.cols = 3;
    c.options = options_for(psft::Reduction::SeqMeanTokenMean);
    c.advantages = DeviceDtype::Float;
    c.seed = ++seed;
    REQUIRE(kernels::combine_layout(c.rows, 1).batch_tree.levels == 3);
    cases.push_back(c);
  }
  // Per-row scales over a grid-stride loop that crosses many short rows per
  // step (7400 elements, 3 x 256 x 4 per step): backward's row tracking.
  {
    ClippedCase c;
    c.rows = 200;
    c.cols = 37;
    c.options = options_for(psft::Reduction::SeqMeanTokenMean);
    c.advantages = DeviceDtype::Float;
    c.seed = ++seed;
    cases.push_back(c);
  }
  // Rows of many units, combined by their row trees: one row of 10 units,
  // two of 18, and one of 300 (two levels of its row tree).
  for (int k = 0; k < 3; ++k) {
    ClippedCase c;
    c.rows = k == 1 ? 2 : 1;
    c.cols = k == 0 ? 9 * kernels::kChunk + 5
                    : (k == 1 ? 17 * kernels::kChunk + 1 : 299 * kernels::kChunk + 7);
    c.advantages = DeviceDtype::Float;
    c.options =
        options_for(k == 2 ? psft::Reduction::TokenMean : psft::Reduction::SeqMeanTokenMean);
    c.seed = ++seed;
    cases.push_back(c);
  }
  // One row, as a 1-D tensor is described.
  {
    ClippedCase c;
    c.rows = 1;
    c.cols = 4100;
    c.logp = c.old_logp = DeviceDtype::BFloat16;
    c.mask = DeviceDtype::Float;
    c.seed = ++seed;
    cases.push_back(c);
  }
  // The typed fast paths (kernels::forward_path): bf16 or fp32 logp,
  // old_logp and advantages (or none), bool, fp32 or no mask, with and
  // without a dual clip, rows with a partial last group and padded rows.
  {
    int j = 0;
    for (DeviceDtype t : {DeviceDtype::BFloat16, DeviceDtype::Float}) {
      for (DeviceDtype m : {DeviceDtype::Bool, DeviceDtype::Float, DeviceDtype::Absent}) {
        for (bool adv : {true, false}) {
          ClippedCase c;
          c.rows = 3;
          c.cols = j % 3 == 0 ? 4099 : (j % 3 == 1 ? 2048 : 37);
          c.logp = c.old_logp = t;
          c.advantages = adv ? t : DeviceDtype::Absent;
          c.mask = m;
          c.layout = j % 2 ? Layout::Padded : Layout::Contiguous;
          c.options = options_for(test_support::kReductions[static_cast<std::size_t>(j) % 4]);
          if (j % 4 == 1) c.options.clip.dual_clip = 3.0;
          if (j % 3 == 2) c.options.clip.delta = 1.5;  // TRL's two-sided clip
          c.seed = ++seed;
          cases.push_back(c);
          ++j;
        }
      }
    }
  }
  int typed = 0;
  for (const ClippedCase& c : cases) {
    const ClippedInputs in = make_inputs(c);
    const ClippedOutputs got = run_clipped(c, in);
    check_against_reference(c, in, got);
    // A typed path computes exactly what the runtime-dtype path does.
    const kernels::DeviceInput inputs[4] = {in.logp.input(), in.old_logp.input(),
                                            in.advantages.input(), in.mask.input()};
    if (kernels::forward_path(inputs, c.logp != DeviceDtype::Double) !=
        kernels::ForwardPath::Runtime) {
      ++typed;
      INFO(c.name());
      CHECK(bit_identical(run_clipped(c, in, {}, true), got));
    }
  }
  CHECK(typed >= 8);
}

TEST_CASE("cuda clipped kernels (emulated): every objective rule against its double reference",
          "[emulated][clipped][objectives]") {
  // Each rule on a float and a double case, with and without advantages;
  // the KL penalty with each estimator (its metrics are of logp vs ref_logp).
  std::vector<ClippedCase> cases;
  std::uint64_t seed = 700;
  const psft::core::RuleId rules[] = {psft::core::RuleId::CispoRelative,
                                      psft::core::RuleId::CispoCapped, psft::core::RuleId::Sapo};
  for (psft::core::RuleId rule : rules) {
    for (DeviceDtype t : {DeviceDtype::Float, DeviceDtype::Double, DeviceDtype::BFloat16}) {
      ClippedCase c;
      c.rows = 3;
      c.cols = 301;
      c.logp = c.old_logp = t;
      c.advantages = DeviceDtype::Float;
      c.mask = DeviceDtype::Float;
      c.options = options_for(psft::Reduction::SeqMeanTokenMean);
      c.options.objective.cispo_cap = 1.5;
      c.rule = rule;
      c.seed = ++seed;
      cases.push_back(c);
    }
  }
  for (int e = 0; e <= 7; ++e) {
    ClippedCase c;
    c.rows = 3;
    c.cols = 130;
    c.logp = c.old_logp = e % 2 ? DeviceDtype::Double : DeviceDtype::Float;
    c.options = options_for(psft::Reduction::TokenMean);
    c.rule = psft::core::RuleId::KlPenalty;
    c.kl_estimator = static_cast<psft::core::KlEstimatorId>(e);
    c.seed = ++seed;
    cases.push_back(c);
  }
  for (const ClippedCase& c : cases) {
    const ClippedInputs in = make_inputs(c);
    const ClippedOutputs got = run_clipped(c, in);
    if (c.rule == psft::core::RuleId::KlPenalty) {  // loss and gradient; no clip metrics
      INFO(c.name());
      const reference::Result want = reference_for(c, in);
      CHECK(std::fabs(got.loss - want.loss) <=
            value_tolerance(c.logp) * std::max(1.0, want.loss_magnitude));
      // As check_against_reference: the output dtype's rounding plus the
      // accumulation error relative to the largest (1 - e^-x cancels near 0).
      double largest = 0;
      for (double g : want.grad) largest = std::max(largest, std::fabs(g * c.grad_output));
      std::size_t bad = 0;
      for (std::size_t k = 0; k < want.grad.size(); ++k) {
        const double w = want.grad[k] * c.grad_output;
        bad += !(std::fabs(got.grad[k] - w) <=
                 grad_tolerance(c.logp) * std::fabs(w) + value_tolerance(c.logp) * largest);
      }
      CHECK(bad == 0);
    } else {
      check_against_reference(c, in, got);
    }
  }
}

TEST_CASE("cuda clipped kernels (emulated): results do not depend on block or thread order",
          "[emulated][clipped]") {
  ClippedCase c;
  c.advantages = DeviceDtype::Float;
  c.options = options_for(psft::Reduction::SeqMeanTokenMean);
  c.options.clip.dual_clip = 3.0;
  for (int k = 0; k < 3; ++k) {
    // Three rows of three units; two long rows; 300 rows of one unit, whose
    // row sums the batch tree combines in two levels.
    const DeviceDtype t = k == 1 ? DeviceDtype::BFloat16 : DeviceDtype::Float;
    c.rows = k == 0 ? 3 : (k == 1 ? 2 : 300);
    c.cols = k == 0 ? 4500 : (k == 1 ? 17 * kernels::kChunk + 100 : 40);
    c.logp = c.old_logp = t;
    c.advantages = k == 2 ? t : DeviceDtype::Float;
    const ClippedInputs in = make_inputs(c);
    const ClippedOutputs first = run_clipped(c, in);
    for (Order o : kOrders) {
      cuda_emulator::Options opts;
      opts.order = o;
      opts.seed = 3;
      CHECK(bit_identical(run_clipped(c, in, opts), first));
    }
    // The backward's element-by-element path (an unaligned gradient) writes
    // the same bits as its vector path.
    ClippedCase unaligned = c;
    unaligned.unaligned_grad = true;
    CHECK(bit_identical(run_clipped(unaligned, in), first));
  }
}

TEST_CASE("cuda clipped kernels (emulated): empty, fully masked and extreme batches",
          "[emulated][clipped]") {
  SECTION("no rows and no columns") {
    for (std::int64_t rows : {0, 2}) {
      ClippedCase c;
      c.rows = rows;
      c.cols = rows == 0 ? 5 : 0;
      const ClippedInputs in = make_inputs(c);
      const ClippedOutputs got = run_clipped(c, in);
      CHECK(got.loss == 0);
      CHECK(got.metrics[9] == 0);  // token_count
      CHECK(got.status[kernels::kStatusBatchTokens] == 0);
      check_against_reference(c, in, got);
    }
  }
  SECTION("every token masked: zero loss and gradient, no NaN") {
    for (psft::Reduction r : test_support::kReductions) {
      ClippedCase c;
      c.rows = 3;
      c.cols = 2050;
      c.options = options_for(r);
      ClippedInputs in = make_inputs(c);
      for (std::int64_t i = 0; i < c.rows; ++i)
        for (std::int64_t j = 0; j < c.cols; ++j) {
          in.mask.set(i, j, 0);
          in.old_logp.set(i, j, kNaN);
        }
      const ClippedOutputs got = run_clipped(c, in);
      CHECK(got.loss == 0);
      for (double g : got.grad) CHECK(g == 0);
      check_against_reference(c, in, got);
    }
  }
  SECTION("log-ratios of +-1e4 are clamped, not overflowed") {
    ClippedCase c;
    c.rows = 2;
    c.cols = 16;
    c.advantages = DeviceDtype::Float;
    c.options.clip.dual_clip = 3.0;
    for (DeviceDtype t : {DeviceDtype::Float, DeviceDtype::Half, DeviceDtype::Double}) {
      c.logp = c.old_logp = t;
      ClippedInputs in = make_inputs(c);
      for (std::int64_t j = 0; j < c.cols; ++j) {
        in.logp.set(0, j, -1.0);
        in.old_logp.set(0, j, j % 2 ? -1e4 : 1e4 - 1.0);
        in.mask.set(0, j, 1);
      }
      const ClippedOutputs got = run_clipped(c, in);
      CHECK(std::isfinite(got.loss));
      check_against_reference(c, in, got);
    }
  }
}

TEST_CASE("cuda clipped kernels (emulated): bad values and small normalisers are flagged",
          "[emulated][clipped]") {
  ClippedCase c;
  c.rows = 2;
  c.cols = 20;
  c.advantages = DeviceDtype::Float;
  c.mask = DeviceDtype::Float;
  // Row 0 fully unmasked, with finite values where make_inputs put NaN.
  const auto unmask_row0 = [&](ClippedInputs& x) {
    for (std::int64_t j = 0; j < c.cols; ++j) {
      x.mask.set(0, j, 1.0);
      x.old_logp.set(0, j, x.logp.get(0, j) - 0.1);
    }
  };
  ClippedInputs in = make_inputs(c);
  unmask_row0(in);
  // Bad values under a zero weight are never read.
  in.mask.set(1, 3, 0.0);
  in.old_logp.set(1, 3, kNaN);
  in.advantages.set(1, 3, kInf);
  in.logp.set(1, 3, kNaN);
  CHECK(run_clipped(c, in).status[kernels::kStatusFlags] == 0);

  ClippedInputs bad = make_inputs(c);
  unmask_row0(bad);
  bad.old_logp.set(0, 2, kNaN);
  CHECK(run_clipped(c, bad).status[kernels::kStatusFlags] == kernels::kBadOld);
  bad.advantages.set(0, 5, -kInf);
  CHECK(run_clipped(c, bad).status[kernels::kStatusFlags] ==
        (kernels::kBadOld | kernels::kBadAdvantage));
  bad.mask.set(0, 7, -0.5);
  CHECK(run_clipped(c, bad).status[kernels::kStatusFlags] ==
        (kernels::kBadOld | kernels::kBadAdvantage | kernels::kBadMask));
  bad.logp.set(0, 1, kNaN);
  CHECK(run_clipped(c, bad).status[kernels::kStatusFlags] ==
        (kernels::kBadOld | kernels::kBadAdvantage | kernels::kBadMask | kernels::kBadLogp));
  c.options.check_finite = false;
  CHECK(run_clipped(c, bad).status[kernels::kStatusFlags] == 0);

  ClippedCase n = c;
  n.options.check_finite = true;
  n.options.reduction = psft::Reduction::SeqMeanTokenSum;
  n.options.normaliser = psft::Normaliser{1.0, 1.0, 1};
  const ClippedOutputs small = run_clipped(n, in);
  CHECK(small.status[kernels::kStatusTokensTooSmall] == 1);
  CHECK(small.status[kernels::kStatusSequencesTooSmall] == 1);
  CHECK(small.status[kernels::kStatusBatchSequences] == 2);
}

TEST_CASE("cuda kernels: the vectorised loads are used exactly when they are safe", "[emulated]") {
  alignas(64) static unsigned char buffer[256];
  const DeviceDtype t = DeviceDtype::Float;
  CHECK(kernels::can_vectorise(buffer, t, 16, 1, 4));
  CHECK(kernels::can_vectorise(buffer, t, 13, 1, 1));  // one row: stride irrelevant
  CHECK_FALSE(kernels::can_vectorise(buffer, t, 13, 1, 2));
  CHECK_FALSE(kernels::can_vectorise(buffer + 4, t, 16, 1, 2));
  CHECK_FALSE(kernels::can_vectorise(buffer, t, 1, 4, 4));  // columns strided
  CHECK_FALSE(kernels::can_vectorise(nullptr, t, 16, 1, 4));
  CHECK(kernels::can_vectorise(buffer + 8, DeviceDtype::Bool, 8, 1, 3));  // 8-byte loads
  CHECK_FALSE(kernels::can_vectorise(buffer + 4, DeviceDtype::Bool, 8, 1, 3));
  CHECK_FALSE(kernels::can_vectorise(buffer + 8, DeviceDtype::Double, 8, 1, 3));
  CHECK(kernels::can_vectorise(buffer + 16, DeviceDtype::BFloat16, 24, 1, 3));
  // The test layouts hit both paths.
  CHECK(View(t, 3, 37, Layout::Padded).input().vectorised);
  CHECK_FALSE(View(t, 3, 37, Layout::Contiguous).input().vectorised);
  CHECK(View(t, 3, 40, Layout::Contiguous).input().vectorised);
  CHECK_FALSE(View(t, 3, 40, Layout::Offset).input().vectorised);
  CHECK(View(t, 3, 40, Layout::Broadcast).input().vectorised);
}

TEST_CASE(
    "cuda logits kernels (emulated): log-probabilities, entropy and gradient against the "
    "double reference",
    "[emulated][logits]") {
  std::vector<LogitsCase> cases;
  const DeviceDtype dtypes[] = {DeviceDtype::Float, DeviceDtype::BFloat16, DeviceDtype::Half,
                                DeviceDtype::Double};
  int k = 0;
  for (std::int64_t v : {1, 7, 33, 1000, 4099}) {
    for (DeviceDtype t : dtypes) {
      LogitsCase c;
      c.vocab = v;
      c.dtype = t;
      c.three_d = k % 2 == 1;
      c.temperature = k % 3 == 1 ? 0.7 : 1.0;
      c.grad_logp = k % 5 != 3;
      c.grad_entropy = k % 4 != 2;
      c.seed = 50 + static_cast<std::uint64_t>(k);
      if (v >= 1000) c.time = 2;
      cases.push_back(c);
      ++k;
    }
  }
  for (const LogitsCase& c : cases) {
    const LogitsData d = make_logits(c);
    const std::size_t rows = static_cast<std::size_t>(c.rows());
    const std::vector<double> gl = random_weights(rows, c.seed + 1);
    const std::vector<double> ge = random_weights(rows, c.seed + 2);
    const LogitsOutputs got = run_logits(c, d, gl, ge);
    check_logits_rows(c, d, got, gl, ge, all_rows(c.rows()));
  }
}

TEST_CASE("cuda logits kernels (emulated): 16-byte and element loads give identical results",
          "[emulated][logits]") {
  // V = 4096: every row starts 16-byte aligned, so full groups take the
  // vector path; shifted by one element no row does. Same values, same bits.
  for (DeviceDtype t :
       {DeviceDtype::Float, DeviceDtype::BFloat16, DeviceDtype::Half, DeviceDtype::Double}) {
    LogitsCase c;
    c.dtype = t;
    c.vocab = 4096;
    c.time = 2;
    c.temperature = 0.9;
    LogitsCase shifted = c;
    shifted.shift = 1;
    const LogitsData aligned_data = make_logits(c);
    const LogitsData shifted_data = make_logits(shifted);
    const std::size_t rows = static_cast<std::size_t>(c.rows());
    const std::vector<double> gl = random_weights(rows, 5), ge = random_weights(rows, 6);
    const LogitsOutputs a = run_logits(c, aligned_data, gl, ge);
    const LogitsOutputs b = run_logits(shifted, shifted_data, gl, ge);
    INFO(c.name());
    CHECK(std::memcmp(a.logp.data(), b.logp.data(), rows * sizeof(double)) == 0);
    CHECK(std::memcmp(a.entropy.data(), b.entropy.data(), rows * sizeof(double)) == 0);
    CHECK(std::memcmp(a.grad.data(), b.grad.data(), a.grad.size() * sizeof(double)) == 0);
    check_logits_rows(c, aligned_data, a, gl, ge, all_rows(c.rows()));
  }
}

TEST_CASE("cuda logits kernels (emulated): order independence and row flags",
          "[emulated][logits]") {
  LogitsCase c;
  c.vocab = 3000;
  c.time = 2;
  c.three_d = true;
  const LogitsData d = make_logits(c);
  const std::size_t rows = static_cast<std::size_t>(c.rows());
  const std::vector<double> gl = random_weights(rows, 1), ge = random_weights(rows, 2);
  const LogitsOutputs first = run_logits(c, d, gl, ge);
  for (Order o : kOrders) {
    cuda_emulator::Options opts;
    opts.order = o;
    opts.seed = 9;
    const LogitsOutputs again = run_logits(c, d, gl, ge, opts);
    CHECK(std::memcmp(again.logp.data(), first.logp.data(), rows * sizeof(double)) == 0);
    CHECK(std::memcmp(again.entropy.data(), first.entropy.data(), rows * sizeof(double)) == 0);
    CHECK(std::memcmp(again.grad.data(), first.grad.data(), first.grad.size() * sizeof(double)) ==
          0);
  }

  // Row 0: a NaN; row 1: +inf; row 3: every logit -inf; row 4: label past V
  // (read clamped, not out of bounds); row 5: label -1; row 2 is ignored.
  LogitsCase f;
  f.batch = 2;
  f.time = 3;
  f.vocab = 9;
  LogitsData bad = make_logits(f);
  bad.labels = {1, 1, f.ignore_index, 0, 9, -1};
  bad.set(0, 4, kNaN);
  bad.set(1, 2, kInf);
  for (std::int64_t j = 0; j < f.vocab; ++j) bad.set(3, j, -kInf);
  const std::size_t frows = static_cast<std::size_t>(f.rows());
  const LogitsOutputs got = run_logits(f, bad, random_weights(frows, 3), random_weights(frows, 4));
  CHECK(got.status[0] == kernels::kRowNonFinite);
  CHECK(got.status[1] == kernels::kRowNonFinite);
  CHECK(got.status[2] == 0);
  CHECK((got.status[3] & kernels::kRowAllNegInf) != 0);
  CHECK(got.status[4] == kernels::kRowBadLabel);
  CHECK(got.status[5] == kernels::kRowBadLabel);
  CHECK(got.logp[2] == 0);

  // Zero upstream gradients write zeros without reading the row.
  LogitsCase z = c;
  z.grad_logp = z.grad_entropy = false;
  const LogitsOutputs zero = run_logits(z, d, gl, ge);
  for (double g : zero.grad) CHECK(g == 0);
}

TEST_CASE("cuda logits kernels (emulated): offsets past 2^31 elements", "[emulated][large]") {
  // 16400 x 131075 bfloat16 logits: 2.15e9 elements, so rows 16383 and up
  // start past element 2^31 (row 16383 straddles it). Only the rows around
  // it are written and run; the rest of the buffers is never touched.
  LogitsCase c;
  c.batch = 16400;
  c.time = 1;
  c.vocab = 131075;
  c.dtype = DeviceDtype::BFloat16;
  LogitsData d = make_logits_layout(c);
  const std::vector<std::int64_t> rows = {16382, 16383, 16384, 16399};
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (std::int64_t r : rows) {
    d.labels[static_cast<std::size_t>(r)] = (r * 7919) % c.vocab;
    for (std::int64_t j = 0; j < c.vocab; ++j) d.set(r, j, normal(rng));
  }
  REQUIRE(rows[1] * c.vocab < (std::int64_t(1) << 31));
  REQUIRE((rows[1] + 1) * c.vocab > (std::int64_t(1) << 31));

  cuda_emulator::Options only;
  for (std::int64_t r : rows) only.blocks.push_back(static_cast<unsigned>(r));
  const std::size_t n = static_cast<std::size_t>(c.rows());
  std::vector<float> logp(n), entropy(n), stats(3 * n), gl(n, 0.5f), ge(n, -0.25f);
  std::vector<unsigned char> status(n, 0xff);
  kernels::LogitsForwardParams<float> p{};
  p.logits = d.view;
  p.labels = d.labels.data();
  p.ignore_index = c.ignore_index;
  p.inv_temperature = 1.0f;
  p.logp = logp.data();
  p.entropy = entropy.data();
  p.stats = stats.data();
  p.status = status.data();
  cuda_emulator::launch(kernels::logits_forward<__nv_bfloat16, float>, static_cast<unsigned>(n),
                        kernels::kLogitsThreads, only, p);

  const std::size_t elements = n * static_cast<std::size_t>(c.vocab);
  std::unique_ptr<__nv_bfloat16[]> grad(new __nv_bfloat16[elements]);  // untouched pages
  kernels::LogitsBackwardParams<__nv_bfloat16, float> b{};
  b.logits = d.view;
  b.labels = d.labels.data();
  b.ignore_index = c.ignore_index;
  b.inv_temperature = 1.0f;
  b.stats = stats.data();
  b.grad_logp = gl.data();
  b.grad_entropy = ge.data();
  b.grad = grad.get();
  cuda_emulator::launch(kernels::logits_backward<__nv_bfloat16, float>, static_cast<unsigned>(n),
                        kernels::kLogitsThreads, only, b);

  for (std::int64_t r : rows) {
    INFO("row " << r);
    const std::size_t i = static_cast<std::size_t>(r);
    const RowReference want = reference_row(d, r, d.labels[i], 1.0, 0.5, -0.25);
    CHECK(status[i] == 0);
    CHECK(rel_diff(logp[i], want.logp) <= 2e-5);
    CHECK(rel_diff(entropy[i], want.entropy) <= 2e-5);
    std::size_t bad = 0;
    for (std::int64_t j = 0; j < c.vocab; ++j) {
      const double g = __bfloat162float(
          grad[i * static_cast<std::size_t>(c.vocab) + static_cast<std::size_t>(j)]);
      const double w = want.grad[static_cast<std::size_t>(j)];
      if (!(std::fabs(g - w) <= 8e-3 * std::fabs(w) + 1e-7)) ++bad;
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("cuda clipped kernels (emulated): offsets past 2^31 elements", "[emulated][large]") {
  // 524163 x 4097 bfloat16 tokens: 2.15e9 elements; the three rows around
  // element 2^31 are written and their units run (3 per row). The other
  // rows are set up as if their blocks had run on empty rows: their sums in
  // the batch tree zero and counted as arrived, so the blocks of the three
  // rows combine the batch (three levels of the batch tree). TokenMean over
  // those rows is then exactly the reference's loss over them.
  ClippedCase c;
  c.rows = 524163;
  c.cols = 4097;
  c.logp = c.old_logp = DeviceDtype::BFloat16;
  c.mask = DeviceDtype::Absent;
  const std::int64_t n = c.rows * c.cols;
  REQUIRE(n > (std::int64_t(1) << 31));
  const std::int64_t middle = (std::int64_t(1) << 31) / c.cols;  // straddles 2^31
  const std::vector<std::int64_t> rows = {middle - 1, middle, middle + 1};

  ClippedInputs in;
  in.logp = View(c.logp, c.rows, c.cols, Layout::Contiguous);
  in.old_logp = View(c.old_logp, c.rows, c.cols, Layout::Contiguous);
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal(0.0, 0.3);
  ClippedCase small = c;  // the same rows, alone, for the reference
  small.rows = 3;
  ClippedInputs few;
  few.logp = View(c.logp, 3, c.cols, Layout::Contiguous);
  few.old_logp = View(c.old_logp, 3, c.cols, Layout::Contiguous);
  for (std::size_t k = 0; k < rows.size(); ++k)
    for (std::int64_t j = 0; j < c.cols; ++j) {
      const double logp = -1.0 - 0.001 * static_cast<double>(j % 97);
      const double old_logp = logp - normal(rng);
      in.logp.set(rows[k], j, logp);
      in.old_logp.set(rows[k], j, old_logp);
      few.logp.set(static_cast<std::int64_t>(k), j, logp);
      few.old_logp.set(static_cast<std::int64_t>(k), j, old_logp);
    }

  kernels::ForwardParams<float> a = forward_params<float>(c, in);
  REQUIRE(a.inputs[0].vectorised == false);  // 4097 columns: element loads
  const kernels::TreeShape& batch = a.layout.batch_tree;
  REQUIRE(batch.levels == 4);  // 524163 rows -> 2048 -> 8 -> 1
  // Uninitialised (untouched pages) but for what is set below.
  Bytes slot_bytes(static_cast<std::size_t>(a.layout.slots) * sizeof(kernels::Partial));
  auto* slots = reinterpret_cast<kernels::Partial*>(slot_bytes.get());
  std::vector<unsigned int> counters(static_cast<std::size_t>(a.layout.counters), 0u);
  // Node j of level l holds leaves [j F^l, (j + 1) F^l): done unless one of
  // the rows runs in it; a done child is empty sums, counted as arrived.
  const auto holds_run_row = [&](int level, std::int64_t node) {
    std::int64_t span = 1;
    for (int l = 0; l < level; ++l) span *= kernels::kFanIn;
    for (std::int64_t r : rows)
      if (r / span == node) return true;
    return false;
  };
  kernels::Partial empty;
  empty.reset();
  for (int level = 0; level + 1 < batch.levels; ++level)
    for (std::int64_t node = 0; node < batch.nodes[level]; ++node) {
      if (holds_run_row(level, node)) continue;
      slots[batch.slot[level] + node] = empty;
      ++counters[static_cast<std::size_t>(batch.counter[level + 1] + node / kernels::kFanIn)];
    }

  std::unique_ptr<float[]> coef(new float[static_cast<std::size_t>(n)]);
  std::vector<double> scale(1), metrics(10), status(kernels::kStatusCount);
  float loss = 0;
  a.coef = coef.get();
  a.slots = slots;
  a.counters = counters.data();
  a.loss = &loss;
  a.scale = scale.data();
  a.metrics = metrics.data();
  a.status = status.data();
  cuda_emulator::Options only;
  for (std::int64_t r : rows)
    for (std::int64_t u = 0; u < a.chunks_per_row; ++u)
      only.blocks.push_back(static_cast<unsigned>(r * a.chunks_per_row + u));
  launch_forward(a, static_cast<unsigned>(c.rows * a.chunks_per_row), only);

  // One backward block per 1024 elements: the blocks covering the rows.
  const std::int64_t per_block = std::int64_t(kernels::kThreads) * kernels::kBackwardVector;
  const std::int64_t blocks = (n + per_block - 1) / per_block;
  cuda_emulator::Options around;
  for (std::int64_t blk = rows.front() * c.cols / per_block;
       blk <= (rows.back() * c.cols + c.cols - 1) / per_block; ++blk)
    around.blocks.push_back(static_cast<unsigned>(blk));
  std::unique_ptr<__nv_bfloat16[]> grad(new __nv_bfloat16[static_cast<std::size_t>(n)]);
  const double grad_output = c.grad_output;
  kernels::BackwardParams b{};
  b.rows = c.rows;
  b.cols = c.cols;
  b.scale = scale.data();
  b.per_row = false;
  b.grad_output = &grad_output;
  b.grad_output_double = true;
  cuda_emulator::launch(kernels::backward<__nv_bfloat16, float>, static_cast<unsigned>(blocks),
                        kernels::kThreads, around, b, static_cast<const float*>(coef.get()),
                        grad.get());

  ClippedOutputs got;
  got.loss = loss;
  std::copy(metrics.begin(), metrics.end(), got.metrics);
  std::copy(status.begin(), status.end(), got.status);
  for (std::int64_t r : rows)
    for (std::int64_t j = 0; j < c.cols; ++j)
      got.grad.push_back(__bfloat162float(grad[static_cast<std::size_t>(r * c.cols + j)]));
  check_against_reference(small, few, got);
}
