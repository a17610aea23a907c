// psft's fused CUDA kernels on a GPU (built with PSFT_CUDA=ON), against a
// device-to-device copy of the same bytes (the physical ceiling) and against
// the composed backend (PyTorch eager ops, what runs without the kernels).
// Exits 0 with "skipped: no CUDA device" where there is no GPU.
//
//   psft_bench_cuda                                  # every case, then a summary
//   psft_bench_cuda --benchmark_filter=clipped/      # one group
//
// Benchmarks are named <op>/<pass>/<path>/<dtype>/<shape>:
//
//   clipped/fwd/kernel, clipped/bwd/kernel, clipped/fwd_bwd/kernel
//       psft_cuda_entry::clipped_loss_forward and clipped_loss_backward
//       called directly (token-mean, no NaN check), N = 2^20 tokens of bf16
//       or fp32 logp, old_logp, advantages and a bool mask, shaped [1048576]
//       or [64, 16384];
//   clipped/fwd_bwd/fused, clipped/fwd_bwd/composed
//       psft::policy_loss (Backend::FusedCuda or Backend::Composed,
//       check_finite = false) and the gradient of its loss, same inputs;
//   logits/fwd/kernel, logits/bwd/kernel
//       psft_cuda_entry::token_logprobs_forward and token_logprobs_backward
//       on [16384, 151936] bf16 logits (a tenth of the labels ignored);
//   logits/fwd/{fused,composed}, logits/fwd_bwd/{fused,composed}
//       psft::token_logprobs (check_inputs = false) without gradient, and
//       with the gradient of logp.sum() + entropy.sum() (entropy_grad);
//   copy/<n>
//       Tensor::copy_ of an n-byte device buffer (reads n, writes n bytes):
//       one per byte count above, and copy/1073741824, the machine's copy
//       bandwidth.
//
// Each call is timed on the GPU with two CUDA events on the current stream
// (host work the GPU waits for counts), after a write of twice the L2 cache
// has evicted the previous call's data: every case, copies included, reads
// its inputs from memory. Counters: MB moved and GB/s.
//
// Note [Bytes moved]
// Kernel cases count what the kernels read and write (e = element size):
//   clipped forward   reads logp, old_logp, advantages (e each), mask (1),
//                     writes the float32 gradient coefficients: N (3e + 5)
//   clipped backward  reads the coefficients, writes the gradient: N (4 + e)
//   logits forward    reads the logits once: N V e
//   logits backward   reads them again and writes the gradient: 2 N V e
// (per-row outputs and the reductions' partial sums, under 0.1%, are left
// out). The API cases count the least their result needs: clipped
// forward + backward N (4e + 1), logits forward N V e, forward + backward
// 3 N V e (psft's design reads the logits in each pass); from the hidden
// state, reading hidden and weight and writing their gradients,
// 2 (N + V) H e (a GEMM-bound case: its GB/s is no bandwidth figure).
//
// After the runs a summary pairs the paths per case: fused and composed ms,
// speedup, fused GB/s, and that as a fraction of the copy of the same bytes
// and of the 1 GiB copy, with the project's targets for the kernels (80% of
// copy for the clipped objective, 70% for the logits). It reads each
// benchmark's final run (with --benchmark_repetitions, the fastest one).
// benchmarks/compile_baseline.py --psft <this output> puts torch.compile and
// eager PyTorch beside the API rows.
//
// Every benchmark runs for at least kMinTimeSeconds of GPU time (0.05 s,
// thousands of calls of a kernel of a few microseconds, tens of a logits
// pass; a --benchmark_min_time flag does not override it), so that the
// whole run, inputs and parity checks included, should take under a minute
// (an estimate until it has run; scripts/gpu-check.sh gives it 75 s).

#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "psft/cuda/entry.hpp"
#include "psft/psft.hpp"

namespace {

constexpr std::int64_t kTokens = std::int64_t(1) << 20;  // clipped objective
constexpr std::int64_t kLogitsTokens = 16384;
constexpr std::int64_t kVocab = 151936;
constexpr std::int64_t kHidden = 4096;  // the from-hidden case's H
constexpr std::int64_t kIgnoreIndex = -100;
constexpr std::int64_t kLargeCopyBytes = std::int64_t(1) << 30;
constexpr double kClippedTarget = 0.8;  // fraction of copy bandwidth
constexpr double kLogitsTarget = 0.7;
constexpr double kMinTimeSeconds = 0.05;  // GPU time per benchmark

const char* dtype_name(at::ScalarType dtype) { return dtype == at::kBFloat16 ? "bf16" : "fp32"; }

// ---------------------------------------------------------------------------
// Timing.
// ---------------------------------------------------------------------------

/// CUDA tensors that outlive one benchmark (the logits, the L2 flush
/// buffer). main() frees them before it returns: static destructors may run
/// after the CUDA runtime has shut down.
std::map<std::string, at::Tensor>& shared_tensors() {
  static std::map<std::string, at::Tensor> tensors;
  return tensors;
}

at::Tensor shared_tensor(const std::string& name, const std::function<at::Tensor()>& make) {
  auto it = shared_tensors().find(name);
  if (it == shared_tensors().end()) it = shared_tensors().emplace(name, make()).first;
  return it->second;
}

/// Evicts the L2 cache by writing a buffer twice its size.
void flush_l2() {
  at::Tensor buffer = shared_tensor("l2_flush", [] {
    int device = 0, l2_bytes = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    return at::empty({2 * std::max<std::int64_t>(l2_bytes, 1 << 20)},
                     at::TensorOptions().device(at::kCUDA).dtype(at::kByte));
  });
  buffer.zero_();
}

/// GPU time between two events recorded on the current stream.
class EventTimer {
 public:
  EventTimer() {
    C10_CUDA_CHECK(cudaEventCreate(&start_));
    C10_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start() { C10_CUDA_CHECK(cudaEventRecord(start_, stream())); }

  /// Seconds since start(); waits for the GPU to get there.
  double stop() {
    C10_CUDA_CHECK(cudaEventRecord(stop_, stream()));
    C10_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

 private:
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

/// What the summary needs from a benchmark: its final run's mean time per
/// call (the fastest over repetitions) and the bytes it moves.
struct Measured {
  std::int64_t iterations = 0;
  double ms = -1;
  std::int64_t bytes = 0;
};

std::map<std::string, Measured>& measured() {
  static std::map<std::string, Measured> results;
  return results;
}

/// Google Benchmark calls a benchmark several times with growing iteration
/// counts; the final run has the most, and repetitions repeat that count.
void record(const std::string& name, std::int64_t iterations, double ms, std::int64_t bytes) {
  Measured& m = measured()[name];
  if (iterations > m.iterations) {
    m = {iterations, ms, bytes};
  } else if (iterations == m.iterations) {
    m.ms = std::min(m.ms, ms);
  }
}

/// The benchmark loop: one warm-up call, then each call timed with CUDA
/// events after an L2 flush. A failing call skips the benchmark with its
/// message.
void run_timed(benchmark::State& state, const std::string& name, std::int64_t bytes,
               const std::function<void()>& step) {
  try {
    step();
    C10_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  EventTimer timer;
  double seconds = 0;
  for (auto _ : state) {
    flush_l2();
    timer.start();
    step();
    const double s = timer.stop();
    state.SetIterationTime(s);
    seconds += s;
  }
  const double per_call = seconds / static_cast<double>(state.iterations());
  state.counters["MB"] = static_cast<double>(bytes) / 1e6;
  state.counters["GB/s"] = static_cast<double>(bytes) / per_call / 1e9;
  record(name, static_cast<std::int64_t>(state.iterations()), per_call * 1e3, bytes);
}

// ---------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------

at::TensorOptions on_gpu(at::ScalarType dtype) {
  return at::TensorOptions().device(at::kCUDA).dtype(dtype);
}

/// Seeded inputs of the clipped objective: logp uniform in (-5, 0),
/// old_logp = logp + N(0, 0.2) (about a tenth of the ratios clip),
/// advantages N(0, 1) per token, mask about 90% true.
struct ClippedInputs {
  at::Tensor logp, old_logp, advantages, mask;
  std::int64_t rows = 1, cols = 0;
};

ClippedInputs clipped_inputs(at::ScalarType dtype, const std::vector<std::int64_t>& shape) {
  torch::manual_seed(0);
  const at::Tensor logp = at::rand(shape, on_gpu(at::kFloat)) * -5.0;
  ClippedInputs in;
  in.old_logp = (logp + at::randn(shape, on_gpu(at::kFloat)) * 0.2).clamp_max(0.0).to(dtype);
  in.logp = logp.to(dtype);
  in.advantages = at::randn(shape, on_gpu(at::kFloat)).to(dtype);
  in.mask = at::rand(shape, on_gpu(at::kFloat)) > 0.1;
  in.rows = shape.size() == 2 ? shape[0] : 1;
  in.cols = shape.back();
  return in;
}

/// [16384, 151936] bf16 logits (N(0, 2)) and labels, a tenth of them
/// ignore_index; created once (5 GB).
at::Tensor logits() {
  return shared_tensor("logits", [] {
    torch::manual_seed(0);
    return at::randn({kLogitsTokens, kVocab}, on_gpu(at::kBFloat16)).mul_(2);
  });
}

at::Tensor labels() {
  return shared_tensor("labels", [] {
    torch::manual_seed(1);
    at::Tensor l = at::randint(0, kVocab, {kLogitsTokens}, on_gpu(at::kLong));
    return l.masked_fill_(at::rand({kLogitsTokens}, on_gpu(at::kFloat)) < 0.1, kIgnoreIndex);
  });
}

// ---------------------------------------------------------------------------
// Cases.
// ---------------------------------------------------------------------------

void bench_copy(benchmark::State& state, const std::string& name, std::int64_t buffer_bytes) {
  const at::Tensor src = at::ones({buffer_bytes}, on_gpu(at::kByte));
  at::Tensor dst = at::empty_like(src);
  run_timed(state, name, 2 * buffer_bytes, [&] { dst.copy_(src); });
}

psft_cuda_entry::ClippedLossConfig kernel_config() {
  psft_cuda_entry::ClippedLossConfig config;  // token-mean, the batch's own counts
  config.check_finite = false;
  config.need_grad = true;
  return config;
}

enum class KernelPass { Forward, Backward, ForwardBackward };

void bench_clipped_kernel(benchmark::State& state, const std::string& name, KernelPass pass,
                          at::ScalarType dtype, std::vector<std::int64_t> shape,
                          std::int64_t bytes) {
  const ClippedInputs in = clipped_inputs(dtype, shape);
  const psft_cuda_entry::ClippedLossConfig config = kernel_config();
  const auto forward = [&] {
    return psft_cuda_entry::clipped_loss_forward(in.logp, in.old_logp, in.advantages, in.mask,
                                                 in.rows, in.cols, config);
  };
  const at::Tensor grad_output = at::ones({}, on_gpu(at::kDouble));
  switch (pass) {
    case KernelPass::Forward:
      run_timed(state, name, bytes, [&] { forward(); });
      break;
    case KernelPass::Backward: {
      const psft_cuda_entry::ClippedLossResult r = forward();
      run_timed(state, name, bytes, [&] {
        psft_cuda_entry::clipped_loss_backward(r.coef, r.scale, grad_output, dtype);
      });
      break;
    }
    case KernelPass::ForwardBackward:
      run_timed(state, name, bytes, [&] {
        const psft_cuda_entry::ClippedLossResult r = forward();
        psft_cuda_entry::clipped_loss_backward(r.coef, r.scale, grad_output, dtype);
      });
      break;
  }
}

psft::LossOptions loss_options(psft::Backend backend) {
  psft::LossOptions opts;
  opts.backend = backend;
  opts.check_finite = false;  // no host synchronisation in either path
  return opts;
}

void bench_clipped_api(benchmark::State& state, const std::string& name, psft::Backend backend,
                       at::ScalarType dtype, std::vector<std::int64_t> shape, std::int64_t bytes) {
  const ClippedInputs in = clipped_inputs(dtype, shape);
  {
    // The two paths must agree before their times mean anything.
    at::NoGradGuard no_grad;
    const auto loss_with = [&](psft::Backend b) {
      return psft::policy_loss(in.logp, in.old_logp, in.advantages, in.mask, loss_options(b))
          .loss.item<double>();
    };
    const double fused = loss_with(psft::Backend::FusedCuda);
    const double composed = loss_with(psft::Backend::Composed);
    if (!(std::abs(fused - composed) <= 1e-4 * std::abs(composed) + 1e-6)) {
      state.SkipWithError("fused and composed losses differ");
      return;
    }
  }
  const psft::LossOptions opts = loss_options(backend);
  const at::Tensor x = in.logp.detach().requires_grad_();
  run_timed(state, name, bytes, [&] {
    const psft::LossResult r = psft::policy_loss(x, in.old_logp, in.advantages, in.mask, opts);
    torch::autograd::grad({r.loss}, {x});
  });
}

void bench_logits_kernel(benchmark::State& state, const std::string& name, KernelPass pass,
                         std::int64_t bytes) {
  const at::Tensor z = logits();
  const at::Tensor y = labels();
  const at::Tensor logp = at::empty({kLogitsTokens}, on_gpu(at::kFloat));
  const at::Tensor entropy = at::empty_like(logp);
  const at::Tensor stats = at::empty({kLogitsTokens, 3}, on_gpu(at::kFloat));
  const auto forward = [&] {
    psft_cuda_entry::token_logprobs_forward(z, y, kIgnoreIndex, 1.0, logp, entropy, stats);
  };
  if (pass == KernelPass::Forward) {
    run_timed(state, name, bytes, forward);
    return;
  }
  forward();
  const at::Tensor grad_logp = at::ones({kLogitsTokens}, on_gpu(at::kFloat));
  run_timed(state, name, bytes, [&] {
    psft_cuda_entry::token_logprobs_backward(z, y, kIgnoreIndex, 1.0, stats, grad_logp,
                                             at::Tensor());
  });
}

psft::LogitsOptions logits_options(psft::Backend backend, bool entropy_grad) {
  psft::LogitsOptions opts;
  opts.backend = backend;
  opts.check_inputs = false;  // no host synchronisation in either path
  opts.entropy_grad = entropy_grad;
  return opts;
}

void bench_logits_api(benchmark::State& state, const std::string& name, psft::Backend backend,
                      bool with_backward, std::int64_t bytes) {
  const at::Tensor z = logits();
  const at::Tensor y = labels();
  if (backend == psft::Backend::FusedCuda) {
    at::NoGradGuard no_grad;
    const psft::TokenLogprobs fused =
        psft::token_logprobs(z, y, logits_options(psft::Backend::FusedCuda, false));
    const psft::TokenLogprobs composed =
        psft::token_logprobs(z, y, logits_options(psft::Backend::Composed, false));
    const double diff = std::max((fused.logp - composed.logp).abs().max().item<double>(),
                                 (fused.entropy - composed.entropy).abs().max().item<double>());
    if (!(diff <= 1e-3)) {
      state.SkipWithError("fused and composed token_logprobs differ");
      return;
    }
  }
  if (!with_backward) {
    const psft::LogitsOptions opts = logits_options(backend, false);
    run_timed(state, name, bytes, [&] {
      at::NoGradGuard no_grad;
      psft::token_logprobs(z, y, opts);
    });
    return;
  }
  // An entropy term in the loss, so that backward handles both outputs.
  const psft::LogitsOptions opts = logits_options(backend, true);
  const at::Tensor x = z.detach().requires_grad_();
  run_timed(state, name, bytes, [&] {
    const psft::TokenLogprobs t = psft::token_logprobs(x, y, opts);
    torch::autograd::grad({t.logp.sum() + t.entropy.sum()}, {x});
  });
}

/// The LM head fused with the PSFT loss (psft_loss_from_hidden) against
/// at::mm + psft_loss_from_logits (the "composed" column here: the
/// unfused path a user writes with psft), forward + backward with the
/// gradients of hidden and weight, bf16, [16384, 4096] hidden and a
/// [151936, 4096] head. Bytes (Note [Bytes moved]): hidden and weight read,
/// their gradients written.
void bench_hidden_api(benchmark::State& state, const std::string& name, bool fused,
                      std::int64_t bytes) {
  const at::Tensor hidden = shared_tensor("hidden", [] {
    torch::manual_seed(2);
    return at::randn({kLogitsTokens, kHidden}, on_gpu(at::kBFloat16));
  });
  const at::Tensor weight = shared_tensor("head", [] {
    torch::manual_seed(3);
    return at::randn({kVocab, kHidden}, on_gpu(at::kBFloat16)).mul_(0.02);
  });
  const at::Tensor y = labels();
  const at::Tensor h = hidden.detach().requires_grad_();
  const at::Tensor w = weight.detach().requires_grad_();
  at::Tensor old;
  {
    at::NoGradGuard no_grad;
    old = psft::token_logprobs_from_hidden(hidden, weight, y).logp - 0.05;
  }
  run_timed(state, name, bytes, [&] {
    const at::Tensor loss = fused ? psft::psft_loss_from_hidden(h, w, y, old).loss
                                  : psft::psft_loss_from_logits(at::mm(h, w.t()), y, old).loss;
    torch::autograd::grad({loss}, {h, w});
  });
}

// ---------------------------------------------------------------------------
// Registration and summary.
// ---------------------------------------------------------------------------

/// One line of the summary: a fused benchmark, its composed counterpart
/// (if any), the copy of the same bytes and the target fraction (0: none).
struct SummaryRow {
  std::string label;  // <op>/<pass>/<dtype>/<shape>
  std::string level;  // "kernel" or "api"
  std::string fused, composed, copy;
  double target = 0;
};

std::vector<SummaryRow>& summary_rows() {
  static std::vector<SummaryRow> rows;
  return rows;
}

void add(const std::string& name, std::function<void(benchmark::State&)> fn) {
  benchmark::RegisterBenchmark(name.c_str(), std::move(fn))
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(kMinTimeSeconds);
}

std::string large_copy_name() { return "copy/" + std::to_string(kLargeCopyBytes); }

/// The copy benchmark that moves `bytes` (reads and writes bytes / 2),
/// registered on first use.
std::string copy_moving(std::int64_t bytes) {
  static std::set<std::string> registered;
  const std::int64_t buffer = bytes / 2;
  const std::string name = "copy/" + std::to_string(buffer);
  if (registered.insert(name).second) {
    add(name, [name, buffer](benchmark::State& s) { bench_copy(s, name, buffer); });
  }
  return name;
}

void register_clipped() {
  const std::vector<std::vector<std::int64_t>> shapes = {{kTokens}, {64, kTokens / 64}};
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    const std::int64_t e = static_cast<std::int64_t>(at::elementSize(dtype));
    for (const std::vector<std::int64_t>& shape : shapes) {
      const std::string shape_name =
          shape.size() == 1 ? std::to_string(shape[0])
                            : std::to_string(shape[0]) + "x" + std::to_string(shape[1]);
      const std::string suffix = std::string("/") + dtype_name(dtype) + "/" + shape_name;
      // Note [Bytes moved]
      const std::pair<KernelPass, std::int64_t> passes[] = {
          {KernelPass::Forward, kTokens * (3 * e + 5)},
          {KernelPass::Backward, kTokens * (4 + e)},
          {KernelPass::ForwardBackward, kTokens * (4 * e + 9)}};
      for (const auto& [pass, bytes] : passes) {
        const std::string op = pass == KernelPass::Forward    ? "clipped/fwd"
                               : pass == KernelPass::Backward ? "clipped/bwd"
                                                              : "clipped/fwd_bwd";
        const std::string name = op + "/kernel" + suffix;
        add(name, [name, pass = pass, dtype, shape, bytes = bytes](benchmark::State& s) {
          bench_clipped_kernel(s, name, pass, dtype, shape, bytes);
        });
        summary_rows().push_back(
            {op + suffix, "kernel", name, "", copy_moving(bytes), kClippedTarget});
      }
      const std::int64_t api_bytes = kTokens * (4 * e + 1);
      SummaryRow row{"clipped/fwd_bwd" + suffix, "api", "", "", copy_moving(api_bytes), 0};
      for (const psft::Backend backend : {psft::Backend::FusedCuda, psft::Backend::Composed}) {
        const bool fused = backend == psft::Backend::FusedCuda;
        const std::string name =
            std::string("clipped/fwd_bwd/") + (fused ? "fused" : "composed") + suffix;
        add(name, [name, backend, dtype, shape, api_bytes](benchmark::State& s) {
          bench_clipped_api(s, name, backend, dtype, shape, api_bytes);
        });
        (fused ? row.fused : row.composed) = name;
      }
      summary_rows().push_back(row);
    }
  }
}

void register_logits() {
  const std::string suffix =
      "/bf16/" + std::to_string(kLogitsTokens) + "x" + std::to_string(kVocab);
  const std::int64_t pass_bytes = kLogitsTokens * kVocab * 2;  // Note [Bytes moved]
  const std::pair<KernelPass, std::int64_t> passes[] = {{KernelPass::Forward, pass_bytes},
                                                        {KernelPass::Backward, 2 * pass_bytes}};
  for (const auto& [pass, bytes] : passes) {
    const std::string op = pass == KernelPass::Forward ? "logits/fwd" : "logits/bwd";
    const std::string name = op + "/kernel" + suffix;
    add(name, [name, pass = pass, bytes = bytes](benchmark::State& s) {
      bench_logits_kernel(s, name, pass, bytes);
    });
    summary_rows().push_back({op + suffix, "kernel", name, "", copy_moving(bytes), kLogitsTarget});
  }
  for (const bool with_backward : {false, true}) {
    const std::string op = with_backward ? "logits/fwd_bwd" : "logits/fwd";
    const std::int64_t bytes = with_backward ? 3 * pass_bytes : pass_bytes;
    SummaryRow row{op + suffix, "api", "", "", copy_moving(bytes), 0};
    for (const psft::Backend backend : {psft::Backend::FusedCuda, psft::Backend::Composed}) {
      const bool fused = backend == psft::Backend::FusedCuda;
      const std::string name = op + (fused ? "/fused" : "/composed") + suffix;
      add(name, [name, backend, with_backward, bytes](benchmark::State& s) {
        bench_logits_api(s, name, backend, with_backward, bytes);
      });
      (fused ? row.fused : row.composed) = name;
    }
    summary_rows().push_back(row);
  }
}

void register_hidden() {
  const std::string suffix = "/bf16/" + std::to_string(kLogitsTokens) + "x" +
                             std::to_string(kHidden) + "x" + std::to_string(kVocab);
  const std::int64_t bytes = 2 * 2 * (kLogitsTokens + kVocab) * kHidden;  // Note [Bytes moved]
  SummaryRow row{"hidden/fwd_bwd" + suffix, "api", "", "", copy_moving(bytes), 0};
  for (const bool fused : {true, false}) {
    const std::string name =
        std::string("hidden/fwd_bwd/") + (fused ? "fused" : "mm_logits") + suffix;
    add(name,
        [name, fused, bytes](benchmark::State& s) { bench_hidden_api(s, name, fused, bytes); });
    (fused ? row.fused : row.composed) = name;
  }
  summary_rows().push_back(row);
}

void register_all() {
  copy_moving(2 * kLargeCopyBytes);  // large_copy_name()
  register_clipped();
  register_logits();
  register_hidden();
}

/// Mean ms per call of a benchmark that ran, else -1.
double ms_of(const std::string& name) {
  const auto it = measured().find(name);
  return it == measured().end() ? -1.0 : it->second.ms;
}

double gbps_of(const std::string& name) {
  const auto it = measured().find(name);
  if (it == measured().end() || it->second.ms <= 0) return -1.0;
  return static_cast<double>(it->second.bytes) / (it->second.ms * 1e-3) / 1e9;
}

/// "%.*f" of a value, or "-" when it is missing (negative).
std::string number(double value, int decimals) {
  if (value < 0) return "-";
  char text[32];
  std::snprintf(text, sizeof text, "%.*f", decimals, value);
  return text;
}

std::string percent(double fraction) {
  return fraction < 0 ? "-" : number(100.0 * fraction, 0) + "%";
}

void print_summary(const std::string& device) {
  const double large_gbps = gbps_of(large_copy_name());
  std::printf(
      "\nSummary (%s): GPU time per call (CUDA events, L2 flushed before each call), the\n"
      "fastest repetition. GB/s: the bytes of Note [Bytes moved] in bench_cuda.cpp over the\n"
      "time. of copy: fused GB/s / GB/s of a device-to-device copy moving the same bytes;\n"
      "of 1GiB: the same against the 1 GiB copy (%s GB/s). speedup = composed / fused.\n",
      device.c_str(), number(large_gbps, 0).c_str());
  std::printf("%-34s %-6s %9s %10s %12s %8s %10s %9s %7s %7s %6s %4s\n", "case", "level", "MB",
              "fused_ms", "composed_ms", "speedup", "fused_GB/s", "copy_GB/s", "of_copy", "of_1GiB",
              "target", "met");
  for (const SummaryRow& row : summary_rows()) {
    const double fused_ms = ms_of(row.fused);
    const double composed_ms = row.composed.empty() ? -1.0 : ms_of(row.composed);
    const double fused_gbps = gbps_of(row.fused);
    const double copy_gbps = gbps_of(row.copy);
    const auto ratio = [](double a, double b) { return a > 0 && b > 0 ? a / b : -1.0; };
    const double of_copy = ratio(fused_gbps, copy_gbps);
    const auto bytes = measured().count(row.fused) ? measured()[row.fused].bytes : 0;
    const std::string met =
        row.target <= 0 || of_copy < 0 ? "-" : (of_copy >= row.target ? "yes" : "NO");
    std::printf(
        "%-34s %-6s %9s %10s %12s %8s %10s %9s %7s %7s %6s %4s\n", row.label.c_str(),
        row.level.c_str(), number(static_cast<double>(bytes) / 1e6, 1).c_str(),
        number(fused_ms, 4).c_str(), number(composed_ms, 4).c_str(),
        (composed_ms > 0 && fused_ms > 0 ? number(composed_ms / fused_ms, 2) + "x" : "-").c_str(),
        number(fused_gbps, 0).c_str(), number(copy_gbps, 0).c_str(), percent(of_copy).c_str(),
        percent(ratio(fused_gbps, large_gbps)).c_str(),
        row.target > 0 ? percent(row.target).c_str() : "-", met.c_str());
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("psft_bench_cuda: skipped: no CUDA device\n");
    return 0;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp properties{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  benchmark::AddCustomContext("device", properties.name);
  benchmark::AddCustomContext("libtorch", TORCH_VERSION);
  benchmark::AddCustomContext("psft_version", psft::version());

  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  print_summary(properties.name);
  benchmark::Shutdown();
  shared_tensors().clear();
  return 0;
}
