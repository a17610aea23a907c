/// \file
/// Forward + backward of the PSFT loss: psft's fused CPU kernel against the
/// same math written by hand from LibTorch ops (verl's formula), psft's own
/// composed backend, and a memory-copy baseline of the same bytes.
///
///   bench_policy_loss [google-benchmark flags]
///   PSFT_BENCH_THREADS=2 bench_policy_loss --benchmark_filter=/1048576
///       --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
///
/// Benchmarks are named BM_<variant>_<dtype>/<tokens>/real_time, so
/// --benchmark_filter=/65536 picks the smallest size. PSFT_BENCH_THREADS
/// (default 2) sets at::set_num_threads for every variant. After the runs a
/// summary table gives the composed / fused ratio and each variant's
/// bandwidth as a fraction of the copy baseline's, from the fastest
/// repetition of each (the "min" aggregate, whose rate counters are the
/// minimum rates, not the rates of the fastest run).
///
/// Note [Bytes touched]
/// Every variant reports the same byte count, the minimum a fused
/// forward + backward must move per token: read logp and old_logp (e bytes
/// each, e = element size), read the bool mask (1 byte), write the gradient
/// (e bytes): bytes = N * (3e + 1), 13 N for fp32 and 7 N for bf16. GB/s is
/// then that count over the measured time, comparable across variants. The
/// copy baseline copies bytes / 2 bytes (a copy reads and writes each byte),
/// so it moves the same total.

#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <psft/psft.hpp>
#include <string>
#include <vector>

namespace {

constexpr std::int64_t kColumns = 1024;  // tensors are [N / 1024, 1024]
constexpr double kEpsLow = 0.2, kEpsHigh = 0.28, kLogRatioClamp = 20.0;

std::int64_t bytes_touched(std::int64_t tokens, torch::Dtype dtype) {
  const std::int64_t e = static_cast<std::int64_t>(c10::elementSize(dtype));
  return tokens * (3 * e + 1);  // Note [Bytes touched]
}

/// Seeded inputs: logp in (-5, 0), old_logp = logp + N(0, 0.2) noise (so
/// about 10% of tokens exceed the 1 + eps_high clip), mask ~90% true.
struct Inputs {
  torch::Tensor logp, old_logp, mask;
};

Inputs make_inputs(std::int64_t tokens, torch::Dtype dtype) {
  torch::manual_seed(0);
  const std::int64_t rows = tokens / kColumns;
  const torch::Tensor logp = -5.0 * torch::rand({rows, kColumns});
  const torch::Tensor old_logp = (logp + 0.2 * torch::randn({rows, kColumns})).clamp_max(0.0);
  Inputs in;
  in.logp = logp.to(dtype).requires_grad_(true);
  in.old_logp = old_logp.to(dtype);
  in.mask = torch::rand({rows, kColumns}) > 0.1;
  return in;
}

void set_counters(benchmark::State& state, std::int64_t tokens, torch::Dtype dtype) {
  state.SetBytesProcessed(state.iterations() * bytes_touched(tokens, dtype));
  state.SetItemsProcessed(state.iterations() * tokens);
}

/// psft::psft_loss with the given backend; the gradient comes from
/// autograd::grad so nothing accumulates into logp.grad() between iterations.
void bm_psft(benchmark::State& state, torch::Dtype dtype, psft::Backend backend) {
  const std::int64_t tokens = state.range(0);
  const Inputs in = make_inputs(tokens, dtype);
  psft::LossOptions opts;
  opts.backend = backend;
  for (auto _ : state) {
    psft::LossResult result = psft::psft_loss(in.logp, in.old_logp, in.mask, opts);
    torch::Tensor grad = torch::autograd::grad({result.loss}, {in.logp})[0];
    benchmark::DoNotOptimize(grad.data_ptr());
    benchmark::DoNotOptimize(result.metrics.clip_frac.data_ptr());
  }
  set_counters(state, tokens, dtype);
}

/// The PPO-clip loss as a user writes it from LibTorch ops (verl's
/// compute_policy_loss with A = 1, token-mean), plus the two metrics a
/// trainer logs: clip fraction and ratio max.
void bm_torch_composed(benchmark::State& state, torch::Dtype dtype) {
  const std::int64_t tokens = state.range(0);
  const Inputs in = make_inputs(tokens, dtype);
  const double advantage = 1.0;
  for (auto _ : state) {
    const torch::Tensor log_ratio =
        torch::clamp(in.logp - in.old_logp, -kLogRatioClamp, kLogRatioClamp);
    const torch::Tensor ratio = torch::exp(log_ratio);
    const torch::Tensor pg1 = -advantage * ratio;
    const torch::Tensor pg2 = -advantage * torch::clamp(ratio, 1.0 - kEpsLow, 1.0 + kEpsHigh);
    const torch::Tensor loss_mat = torch::max(pg1, pg2);
    const torch::Tensor loss = (loss_mat * in.mask).sum() / in.mask.sum();
    torch::Tensor clip_frac, ratio_max;
    {
      torch::NoGradGuard no_grad;
      clip_frac = ((pg2 > pg1) * in.mask).sum() / in.mask.sum();
      ratio_max = ratio.masked_fill(in.mask.logical_not(), 0.0).max();
    }
    torch::Tensor grad = torch::autograd::grad({loss}, {in.logp})[0];
    benchmark::DoNotOptimize(grad.data_ptr());
    benchmark::DoNotOptimize(clip_frac.data_ptr());
    benchmark::DoNotOptimize(ratio_max.data_ptr());
  }
  set_counters(state, tokens, dtype);
}

/// Tensor::copy_ of bytes_touched / 2 bytes: the bandwidth bound.
void bm_copy(benchmark::State& state, torch::Dtype dtype) {
  const std::int64_t tokens = state.range(0);
  const std::int64_t half = bytes_touched(tokens, dtype) / 2;
  const torch::Tensor src = torch::randint(0, 255, {half}, torch::kUInt8);
  torch::Tensor dst = torch::empty({half}, torch::kUInt8);
  for (auto _ : state) {
    dst.copy_(src);
    benchmark::DoNotOptimize(dst.data_ptr());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, dtype);
}

// Registry of benchmark families, so the summary knows what each run was.
struct Family {
  std::string variant;  // "fused", "composed", "psft_composed", "copy"
  std::string dtype;    // "fp32", "bf16"
};
std::map<std::string, Family>& families() {
  static std::map<std::string, Family> map;
  return map;
}

template <class Fn>
void register_family(const std::string& name, const std::string& variant,
                     const std::string& dtype_name, Fn fn) {
  families()[name] = {variant, dtype_name};
  benchmark::RegisterBenchmark(name.c_str(), fn)
      ->RangeMultiplier(4)
      ->Range(1 << 16, 1 << 22)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()  // the work runs on the ATen thread pool
      ->ComputeStatistics("min", [](const std::vector<double>& v) {
        return *std::min_element(v.begin(), v.end());
      });
}

void register_all() {
  const std::pair<torch::Dtype, std::string> dtypes[] = {{torch::kFloat32, "fp32"},
                                                         {torch::kBFloat16, "bf16"}};
  for (const auto& [dtype, name] : dtypes) {
    register_family("BM_PsftFused_" + name, "fused", name, [dtype = dtype](benchmark::State& s) {
      bm_psft(s, dtype, psft::Backend::FusedCpu);
    });
    register_family("BM_TorchComposed_" + name, "composed", name,
                    [dtype = dtype](benchmark::State& s) { bm_torch_composed(s, dtype); });
    register_family(
        "BM_PsftComposed_" + name, "psft_composed", name,
        [dtype = dtype](benchmark::State& s) { bm_psft(s, dtype, psft::Backend::Composed); });
    register_family("BM_Copy_" + name, "copy", name,
                    [dtype = dtype](benchmark::State& s) { bm_copy(s, dtype); });
  }
}

/// The console output plus a summary table. Per benchmark it keeps the
/// fastest repetition (the "min" aggregate; on a shared machine noise only
/// ever adds time), else the fastest run.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  using benchmark::ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& reports) override {
    for (const Run& run : reports) {
      if (run.error_occurred) continue;
      const std::string key = run.run_name.function_name + "/" + run.run_name.args;
      const double ms = run.GetAdjustedRealTime() * to_ms(run.time_unit);
      if (run.run_type == Run::RT_Aggregate) {
        if (run.aggregate_name == "min") best_[key] = ms;
      } else {
        samples_[key].push_back(ms);
      }
    }
    ConsoleReporter::ReportRuns(reports);
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::FILE* out = stdout;
    std::fprintf(out,
                 "\nSummary (fastest repetition, real time per forward + backward; GB/s over "
                 "the bytes of Note [Bytes touched]):\n");
    std::fprintf(out, "%9s %5s %9s %11s %9s %8s %10s %9s %9s\n", "N", "dtype", "fused ms",
                 "composed ms", "psft-comp", "speedup", "fused GB/s", "copy GB/s", "of copy");
    for (const char* dtype : {"fp32", "bf16"}) {
      for (std::int64_t n = 1 << 16; n <= (1 << 22); n *= 4) {
        const double fused = time_of("fused", dtype, n);
        const double composed = time_of("composed", dtype, n);
        const double psft_composed = time_of("psft_composed", dtype, n);
        const double copy = time_of("copy", dtype, n);
        if (fused <= 0 && composed <= 0 && copy <= 0) continue;
        const double bytes = static_cast<double>(
            bytes_touched(n, dtype[0] == 'f' ? torch::kFloat32 : torch::kBFloat16));
        const auto gbps = [&](double ms) { return ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0; };
        const auto ratio = [](double a, double b) { return a > 0 && b > 0 ? a / b : 0.0; };
        std::fprintf(out, "%9lld %5s %9.3f %11.3f %9.3f %7.2fx %10.2f %9.2f %9.2f\n",
                     static_cast<long long>(n), dtype, fused, composed, psft_composed,
                     ratio(composed, fused), gbps(fused), gbps(copy), ratio(copy, fused));
      }
    }
    std::fprintf(out,
                 "(0 = not run; speedup = composed / fused; of copy = copy time / fused "
                 "time)\n");
    std::fflush(out);
  }

 private:
  static double to_ms(benchmark::TimeUnit unit) {
    switch (unit) {
      case benchmark::kNanosecond:
        return 1e-6;
      case benchmark::kMicrosecond:
        return 1e-3;
      case benchmark::kMillisecond:
        return 1.0;
      case benchmark::kSecond:
        return 1e3;
    }
    return 1.0;
  }

  double time_of(const std::string& variant, const std::string& dtype, std::int64_t n) const {
    for (const auto& [name, family] : families()) {
      if (family.variant != variant || family.dtype != dtype) continue;
      const std::string key = name + "/" + std::to_string(n);
      if (auto it = best_.find(key); it != best_.end()) return it->second;
      if (auto it = samples_.find(key); it != samples_.end()) {
        return *std::min_element(it->second.begin(), it->second.end());
      }
    }
    return 0.0;
  }

  std::map<std::string, double> best_;
  std::map<std::string, std::vector<double>> samples_;
};

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("PSFT_BENCH_THREADS");
  const int threads = env && std::atoi(env) > 0 ? std::atoi(env) : 2;
  at::set_num_threads(threads);
  benchmark::AddCustomContext("psft_threads", std::to_string(at::get_num_threads()));
  // Note [OpenMP in the consumer's translation unit]
  // With an OpenMP build of LibTorch, at::parallel_for is a header template
  // whose `omp parallel` exists only where the including translation unit is
  // compiled with OpenMP. Without it psft's fused kernel runs on one thread
  // while ATen's own ops use all of them, which would skew the comparison.
#if defined(INTRA_OP_PARALLEL)
  benchmark::AddCustomContext("psft_kernel_parallel", "yes");
#else
  benchmark::AddCustomContext("psft_kernel_parallel",
                              "NO: compiled without OpenMP, the fused kernel runs on 1 thread");
  std::fprintf(stderr,
               "warning: this benchmark was compiled without OpenMP; psft's fused "
               "kernel runs on one thread (Note [OpenMP in the consumer's translation "
               "unit])\n");
#endif
  benchmark::AddCustomContext("libtorch", TORCH_VERSION);

  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  SummaryReporter reporter(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Color
                                                 : benchmark::ConsoleReporter::OO_None);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
