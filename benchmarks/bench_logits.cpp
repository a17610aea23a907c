// From logits to the PSFT loss, forward + backward: psft's fused path
// (psft_loss_from_logits: one pass over the logits each way, gradient written
// in the logits' dtype) against what a LibTorch user writes with composed
// ops (log_softmax in float32, gather, softmax entropy as a metric, the
// clipped loss, autograd backward). Same inputs, same thread count.
//
//   psft_bench_logits                              # every size
//   psft_bench_logits --benchmark_filter=/32000    # the smaller vocabulary
//   PSFT_BENCH_THREADS=4 psft_bench_logits         # threads (default 2)
//
// A second psft path, two_pass, turns LogitsOptions::gradient_in_forward
// off: logp first, the loss on it, and backward reads the logits again (the
// fused path writes the gradient in its forward pass, Note [Gradient in the
// forward pass]), so one run shows what that saves.
//
// A last path, copy, is Tensor::copy_ of the logits into a buffer of their
// size allocated once: the logits read once and a gradient's bytes written
// once, all a fused forward + backward must move, so the physical ceiling.
// The summary gives the fused path's time over the copy's.
//
// Benchmarks are named <path>/<dtype>/<tokens>/<vocab>. Each reports the
// time of one forward + backward and, as the counter peak_extra_MB, the peak
// resident memory of one call above what was resident before it (inputs
// already allocated; the gradient counts), and as beyond_grad_MB the same
// less the gradient's own size. The peak is measured, not estimated: the
// kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs
// before the call and read after it (Linux; -1 where that file cannot be
// written). A summary table pairs the two paths at the end.

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bench_memory.hpp"
#include "psft/logits.hpp"
#include "psft/version.hpp"

namespace {

using psft_bench::peak_extra_bytes;

constexpr std::int64_t kIgnore = -100;

int bench_threads() {
  const char* env = std::getenv("PSFT_BENCH_THREADS");
  const int n = env ? std::atoi(env) : 2;
  return n > 0 ? n : 2;
}

// ---------------------------------------------------------------------------
// The two paths.
// ---------------------------------------------------------------------------

struct Inputs {
  at::Tensor logits, labels, old_logp;
};

Inputs make_inputs(at::ScalarType dtype, std::int64_t tokens, std::int64_t vocab) {
  torch::manual_seed(0);
  Inputs in;
  in.logits = (at::randn({tokens, vocab}, at::kFloat) * 2).to(dtype).requires_grad_(true);
  in.labels = at::randint(0, vocab, {tokens}, at::kLong);
  // A tenth of the tokens are prompt or padding.
  in.labels.masked_fill_(at::rand({tokens}) < 0.1, kIgnore);
  torch::NoGradGuard no_grad;
  // Old log-probs a little off, so that some tokens clip.
  in.old_logp = psft::token_logprobs(in.logits, in.labels).logp + (at::rand({tokens}) * 0.6 - 0.3);
  return in;
}

/// psft: the gradient computed in the forward pass (in_forward), or one
/// pass forward and one backward.
double fused_step(const Inputs& in, bool in_forward = true) {
  psft::LogitsOptions opts;
  opts.gradient_in_forward = in_forward;
  const psft::LogitsLossResult r =
      psft::psft_loss_from_logits(in.logits, in.labels, in.old_logp, {}, opts);
  r.loss.backward();
  benchmark::DoNotOptimize(r.entropy_mean.data_ptr());
  benchmark::DoNotOptimize(r.metrics.clip_frac_high.data_ptr());
  return r.loss.item<double>();
}

/// What a user writes with ATen ops: float32 log_softmax, gather, entropy
/// as a metric (no grad), PSFT's clipped loss with a token mean, backward.
double composed_step(const Inputs& in) {
  const at::Tensor mask = in.labels != kIgnore;
  const at::Tensor log_probs = at::log_softmax(in.logits.to(at::kFloat), -1);
  const at::Tensor logp = log_probs.gather(-1, in.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const at::Tensor count = mask.sum().to(at::kFloat);
  const at::Tensor ratio = (logp - in.old_logp).clamp(-20, 20).exp();
  const at::Tensor token_loss = at::max(-ratio, -ratio.clamp(0.8, 1.28));
  const at::Tensor loss =
      at::where(mask, token_loss, at::zeros({}, token_loss.options())).sum() / count.clamp_min(1);
  {
    torch::NoGradGuard no_grad;
    const at::Tensor entropy = -(log_probs.exp() * log_probs).sum(-1);
    const at::Tensor entropy_mean =
        at::where(mask, entropy, at::zeros({}, entropy.options())).sum() / count.clamp_min(1);
    const at::Tensor clip_frac_high = ((ratio > 1.28).logical_and(mask)).sum() / count.clamp_min(1);
    benchmark::DoNotOptimize(entropy_mean.data_ptr());
    benchmark::DoNotOptimize(clip_frac_high.data_ptr());
  }
  loss.backward();
  return loss.item<double>();
}

/// The ceiling: the logits read once, a gradient-sized buffer written once.
void bench_copy(benchmark::State& state, at::ScalarType dtype, std::int64_t tokens,
                std::int64_t vocab) {
  at::set_num_threads(bench_threads());
  const Inputs in = make_inputs(dtype, tokens, vocab);
  const at::Tensor src = in.logits.detach();
  at::Tensor dst = at::empty_like(src);
  dst.copy_(src);  // first touch outside the timing
  for (auto _ : state) {
    dst.copy_(src);
    benchmark::DoNotOptimize(dst.data_ptr());
  }
  state.counters["threads"] = at::get_num_threads();
}

/// The paths timed against the copy.
enum class Path { Fused, TwoPass, Composed };

void bench_logits_loss(benchmark::State& state, Path path, at::ScalarType dtype,
                       std::int64_t tokens, std::int64_t vocab) {
  at::set_num_threads(bench_threads());
  Inputs in = make_inputs(dtype, tokens, vocab);
  const bool fused = path != Path::Composed;
  const auto step = [&] {
    in.logits.mutable_grad() = at::Tensor();  // as zero_grad(set_to_none)
    return fused ? fused_step(in, path == Path::Fused) : composed_step(in);
  };
  // The two paths must agree before their times mean anything.
  const double loss = step();
  const double reference = fused ? composed_step(in) : fused_step(in);
  if (!(std::abs(loss - reference) <= 1e-4 * std::abs(reference) + 1e-6)) {
    state.SkipWithError("fused and composed losses differ");
    return;
  }
  in.logits.mutable_grad() = at::Tensor();
  const double peak = peak_extra_bytes(step);

  for (auto _ : state) {
    benchmark::DoNotOptimize(step());
  }
  // The gradient itself (tokens x V in the logits' dtype) is what both paths
  // must produce; what a path allocates beyond it is its own overhead.
  const double grad_bytes = static_cast<double>(tokens * vocab) * at::elementSize(dtype);
  state.counters["peak_extra_MB"] = peak < 0 ? -1.0 : peak / (1024.0 * 1024.0);
  state.counters["beyond_grad_MB"] = peak < 0 ? -1.0 : (peak - grad_bytes) / (1024.0 * 1024.0);
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = at::get_num_threads();
}

// ---------------------------------------------------------------------------
// Summary table.
// ---------------------------------------------------------------------------

/// The console output plus, at the end, one row per case with both paths.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      // psft_loss_from_logits/<path>/<dtype>/<tokens>/<vocab>[/real_time]
      std::vector<std::string> parts;
      std::istringstream name(run.benchmark_name());
      for (std::string part; std::getline(name, part, '/');) parts.push_back(part);
      if (parts.size() < 5) continue;
      const std::string& path = parts[1];
      const std::string key = parts[2] + "/" + parts[3] + "/" + parts[4];
      Entry& e = entries_[key];
      const double ms = run.GetAdjustedRealTime() *
                        benchmark::GetTimeUnitMultiplier(benchmark::kMillisecond) /
                        benchmark::GetTimeUnitMultiplier(run.time_unit);
      const auto counter = [&](const char* counter_name) {
        const auto it = run.counters.find(counter_name);
        return it == run.counters.end() ? -1.0 : it->second.value;
      };
      if (path == "copy") {
        e.copy_ms = ms;
        continue;
      }
      Side& side = path == "fused" ? e.fused : path == "two_pass" ? e.two_pass : e.composed;
      side.ms = ms;
      side.peak_mb = counter("peak_extra_MB");
      side.beyond_grad_mb = counter("beyond_grad_MB");
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf(
        "\nSummary (%d threads): one forward + backward of the PSFT loss from logits. Peak: peak\n"
        "resident memory of one call above its inputs, MiB; beyond grad: the same less the\n"
        "gradient that both paths return. two-pass ms: psft with gradient_in_forward off.\n"
        "copy ms: the logits copied once (the ceiling); of copy: fused ms over copy ms.\n"
        "%-18s %9s %12s %12s %8s %8s %8s %11s %14s %10s %12s %15s\n",
        bench_threads(), "dtype/tokens/vocab", "fused ms", "two-pass ms", "composed ms", "speedup",
        "copy ms", "of copy", "fused peak", "composed peak", "peak ratio", "fused beyond",
        "composed beyond");
    for (const auto& [key, e] : entries_) {
      if (e.fused.ms < 0) continue;  // other columns: -1 where not run
      const bool peaks = e.fused.peak_mb > 0 && e.composed.peak_mb > 0;
      const std::string ratio =
          peaks ? std::to_string(e.fused.peak_mb / e.composed.peak_mb).substr(0, 5) : "n/a";
      // "-" where a path did not run (a --benchmark_filter left it out).
      const auto field = [](double value, const char* format) {
        if (value < 0) return std::string("-");
        char text[32];
        std::snprintf(text, sizeof(text), format, value);
        return std::string(text);
      };
      std::printf("%-18s %9.1f %12s %12s %8s %8s %8s %11.0f %14s %10s %12.0f %15s\n", key.c_str(),
                  e.fused.ms, field(e.two_pass.ms, "%.1f").c_str(),
                  field(e.composed.ms, "%.1f").c_str(),
                  field(e.composed.ms < 0 ? -1 : e.composed.ms / e.fused.ms, "%.2fx").c_str(),
                  field(e.copy_ms, "%.1f").c_str(),
                  field(e.copy_ms < 0 ? -1 : e.fused.ms / e.copy_ms, "%.2fx").c_str(),
                  e.fused.peak_mb, field(e.composed.peak_mb, "%.0f").c_str(), ratio.c_str(),
                  e.fused.beyond_grad_mb, field(e.composed.beyond_grad_mb, "%.0f").c_str());
    }
    std::fflush(stdout);
  }

 private:
  struct Side {
    double ms = -1, peak_mb = -1, beyond_grad_mb = -1;
  };
  struct Entry {
    Side fused, two_pass, composed;
    double copy_ms = -1;
  };
  std::map<std::string, Entry> entries_;
};

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(bench_threads());
  benchmark::AddCustomContext("psft_bench_threads", std::to_string(bench_threads()));
  benchmark::AddCustomContext("psft_version", psft::version());
  const std::int64_t tokens = 4096;
  for (const std::int64_t vocab : {std::int64_t(32000), std::int64_t(151936)}) {
    for (const auto& [dtype, dtype_name] :
         {std::pair<at::ScalarType, const char*>{at::kFloat, "fp32"}, {at::kBFloat16, "bf16"}}) {
      for (const auto& [path, path_name] : {std::pair<Path, const char*>{Path::Fused, "fused/"},
                                            {Path::TwoPass, "two_pass/"},
                                            {Path::Composed, "composed/"}}) {
        const std::string name = std::string("psft_loss_from_logits/") + path_name + dtype_name +
                                 "/" + std::to_string(tokens) + "/" + std::to_string(vocab);
        benchmark::RegisterBenchmark(name.c_str(), bench_logits_loss, path, dtype, tokens, vocab)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
      const std::string copy_name = std::string("psft_loss_from_logits/copy/") + dtype_name + "/" +
                                    std::to_string(tokens) + "/" + std::to_string(vocab);
      benchmark::RegisterBenchmark(copy_name.c_str(), bench_copy, dtype, tokens, vocab)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
