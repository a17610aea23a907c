// From the last hidden state to the PSFT loss, forward + backward, with the
// LM head (logits = hidden @ weight^T) inside: psft's fused path
// (psft_loss_from_hidden: the logits a chunk of tokens at a time, gradients
// wrt hidden and weight computed in the forward pass) against the two things
// a LibTorch user writes otherwise. Same inputs, same thread count.
//
//   fused      psft::psft_loss_from_hidden(hidden, weight, labels, old_logp)
//   mm_logits  logits = at::mm(hidden, weight.t()), then
//              psft::psft_loss_from_logits (path (a): psft's kernel, but the
//              whole [N, V] logits and their gradient exist)
//   composed   the same from plain ops (path (b)): mm, log_softmax in
//              float32, gather, entropy as a no-grad metric (every path
//              returns it), r = exp(clamp(logp - old, -20, 20)), the clipped
//              loss max(-r, -clip(r, 0.8, 1.28)) (= -min(r, 1.28) for A = 1),
//              token mean, autograd backward
//   gemm3      the GEMM ceiling: the three matmuls every path must do,
//              logits = h W^T, dh = g W, dW = g^T h, into preallocated,
//              already touched outputs with a preallocated g (no allocation,
//              no page faults, no softmax)
//
//   psft_bench_hidden                                # the default sizes
//   psft_bench_hidden --benchmark_filter=/bf16/      # one dtype
//   PSFT_BENCH_THREADS=1 psft_bench_hidden           # threads (default 2)
//   PSFT_BENCH_LARGE=1 psft_bench_hidden             # also the large sizes
//   PSFT_BENCH_ITERATIONS=5 psft_bench_hidden        # timed steps (default 2)
//
// Benchmarks are named <path>/<dtype>/<N>/<H>/<V> (N tokens, H hidden size,
// V vocabulary). Registered by default: N = 4096, H = 1024, V = 32000 in
// fp32 and bf16, and the smoke size N = 512, H = 256, V = 4096 (ctest's
// run). PSFT_BENCH_LARGE=1 adds N = 16384 and V = 151936 (every pair with
// H = 1024): path (a) holds the [N, V] logits and their gradient at once,
// 2 N V e bytes, 20 GB at N = 16384, V = 151936 in fp32 (the composed path
// more), beyond the 24 GiB machine these defaults are sized for.
//
// Inputs: hidden ~ N(0, 1), weight ~ N(0, 4 / H) (logits with std 2), every
// token scored (labels uniform in [0, V), none ignored: the headline is the
// cost per scored token), and old_logp = the current logp - N(0, 0.1^2), so
// that the ratio sits near 1 and a few tokens pass the 1.28 clip. Each step
// starts with hidden.grad and weight.grad undefined (zero_grad set_to_none)
// and ends with both written; no bias.
//
// Each benchmark reports the wall time of one forward + backward (a few
// iterations: these steps take seconds) and two counters: peak_extra_MB, the
// peak resident memory of one step above what was resident before it
// (inputs already allocated; the returned gradients count), and
// beyond_grads_MB, the same less the gradients' own bytes ((N + V) H e). The
// peak is measured, not estimated: the kernel's high-water mark (VmHWM) is
// reset through /proc/self/clear_refs before the step and read after it
// (Linux; -1 where that file cannot be written). Before anything is timed,
// each path's loss is checked against path (a)'s on the same inputs; the
// binary aborts if they differ. A summary table pairs the paths at the end.
//
// bf16: LibTorch sends bf16 matmuls to oneDNN only on CPUs with AVX-512
// (BW, VL, DQ) or AVX-NE-CONVERT. Elsewhere (AVX2 only) at::mm runs a
// generic bf16 loop at 0.3 to 15 GFLOPS depending on the operands' layout
// (dh = g W is the slowest), against 40 to 50 for fp32 MKL on one core of
// the machine in docs/benchmarks.md, and one bf16 step at N = 4096,
// V = 32000 takes about a quarter of an hour. Every path pays it alike; run
// --benchmark_filter=fp32 there.

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_memory.hpp"
#include "psft/hidden.hpp"
#include "psft/logits.hpp"
#include "psft/version.hpp"

namespace {

using psft_bench::cpu_model;
using psft_bench::peak_extra_bytes;

int bench_threads() {
  const char* env = std::getenv("PSFT_BENCH_THREADS");
  const int n = env ? std::atoi(env) : 2;
  return n > 0 ? n : 2;
}

int bench_iterations() {
  const char* env = std::getenv("PSFT_BENCH_ITERATIONS");
  const int n = env ? std::atoi(env) : 2;
  return n > 0 ? n : 2;
}

bool bench_large() {
  const char* env = std::getenv("PSFT_BENCH_LARGE");
  return env && std::string(env) == "1";
}

// ---------------------------------------------------------------------------
// Inputs and the paths.
// ---------------------------------------------------------------------------

enum class Path { Fused, MmLogits, Composed, Gemm3 };

const char* path_name(Path path) {
  switch (path) {
    case Path::Fused:
      return "fused";
    case Path::MmLogits:
      return "mm_logits";
    case Path::Composed:
      return "composed";
    case Path::Gemm3:
      return "gemm3";
  }
  return "?";
}

struct Shape {
  at::ScalarType dtype;
  const char* dtype_name;
  std::int64_t tokens, width, vocab;

  std::string key() const {
    return std::string(dtype_name) + "/" + std::to_string(tokens) + "/" + std::to_string(width) +
           "/" + std::to_string(vocab);
  }
};

struct Inputs {
  at::Tensor hidden;    // [N, H], requires grad
  at::Tensor weight;    // [V, H], requires grad
  at::Tensor labels;    // [N] int64, all scored
  at::Tensor old_logp;  // [N] float32
};

Inputs make_inputs(const Shape& s) {
  torch::manual_seed(0);
  Inputs in;
  in.hidden = at::randn({s.tokens, s.width}, at::kFloat).to(s.dtype).requires_grad_(true);
  in.weight = (at::randn({s.vocab, s.width}, at::kFloat) * (2.0 / std::sqrt(double(s.width))))
                  .to(s.dtype)
                  .requires_grad_(true);
  // Every token scored: the headline is the cost of a fully scored batch.
  in.labels = at::randint(0, s.vocab, {s.tokens}, at::kLong);
  torch::NoGradGuard no_grad;
  // The current policy's logp, a little off, so that the ratio sits near 1.
  const at::Tensor logp = psft::token_logprobs_from_hidden(in.hidden, in.weight, in.labels).logp;
  in.old_logp = (logp - at::randn({s.tokens}) * 0.1).to(at::kFloat).contiguous();
  return in;
}

/// psft: the LM head fused with the loss.
double fused_step(const Inputs& in) {
  const psft::LogitsLossResult r =
      psft::psft_loss_from_hidden(in.hidden, in.weight, in.labels, in.old_logp);
  r.loss.backward();
  benchmark::DoNotOptimize(r.entropy_mean.data_ptr());
  benchmark::DoNotOptimize(r.metrics.clip_frac_high.data_ptr());
  return r.loss.item<double>();
}

/// Path (a): the whole logits, then psft's fused logits loss.
double mm_logits_step(const Inputs& in) {
  const at::Tensor logits = at::mm(in.hidden, in.weight.t());
  const psft::LogitsLossResult r = psft::psft_loss_from_logits(logits, in.labels, in.old_logp);
  r.loss.backward();
  benchmark::DoNotOptimize(r.entropy_mean.data_ptr());
  benchmark::DoNotOptimize(r.metrics.clip_frac_high.data_ptr());
  return r.loss.item<double>();
}

/// Path (b): what a user writes with ATen ops (as bench_logits' composed
/// path, with the LM head's matmul in front).
double composed_step(const Inputs& in) {
  constexpr std::int64_t kIgnore = -100;
  const at::Tensor logits = at::mm(in.hidden, in.weight.t());
  const at::Tensor mask = in.labels != kIgnore;
  const at::Tensor log_probs = at::log_softmax(logits.to(at::kFloat), -1);
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

/// The GEMM ceiling's buffers: every output preallocated and touched once.
struct GemmBuffers {
  at::Tensor logits, grad_logits, grad_hidden, grad_weight;

  explicit GemmBuffers(const Inputs& in) {
    const at::TensorOptions o = in.hidden.options().requires_grad(false);
    const std::int64_t n = in.hidden.size(0), h = in.hidden.size(1), v = in.weight.size(0);
    logits = at::zeros({n, v}, o);
    grad_logits = (at::randn({n, v}) * 1e-3).to(o.dtype());
    grad_hidden = at::zeros({n, h}, o);
    grad_weight = at::zeros({v, h}, o);
  }
};

/// The three GEMMs of the LM head's forward + backward, nothing else.
void gemm3_step(const Inputs& in, GemmBuffers& b) {
  torch::NoGradGuard no_grad;
  const at::Tensor h = in.hidden.detach(), w = in.weight.detach();
  at::mm_out(b.logits, h, w.t());
  at::mm_out(b.grad_hidden, b.grad_logits, w);
  at::mm_out(b.grad_weight, b.grad_logits.t(), h);
  benchmark::DoNotOptimize(b.logits.data_ptr());
  benchmark::DoNotOptimize(b.grad_hidden.data_ptr());
  benchmark::DoNotOptimize(b.grad_weight.data_ptr());
}

/// Path (a)'s loss on each shape's inputs, computed once: what every path's
/// loss is checked against before it is timed.
std::map<std::string, double>& reference_losses() {
  static std::map<std::string, double> losses;
  return losses;
}

/// Aborts unless path's loss agrees with path (a)'s: timings of a path that
/// computes something else mean nothing.
void check_loss(Path path, const Shape& s, double loss, double reference) {
  // fp32: the same math, summed in another order. bf16: fused runs the
  // logits GEMM a chunk of rows at a time, whose bf16 logits may round
  // differently from the whole matrix's.
  const double rel = s.dtype == at::kFloat ? 1e-4 : 2e-3;
  if (std::abs(loss - reference) <= rel * std::abs(reference) + 1e-6) return;
  std::fprintf(stderr,
               "psft_bench_hidden: %s/%s: loss %.9g differs from mm_logits' %.9g (relative %.3g, "
               "tolerance %.0e); the paths do not compute the same thing, aborting\n",
               path_name(path), s.key().c_str(), loss, reference,
               std::abs(loss - reference) / std::abs(reference), rel);
  std::fflush(stderr);
  std::abort();
}

void bench_hidden_loss(benchmark::State& state, Path path, Shape s) {
  at::set_num_threads(bench_threads());
  Inputs in = make_inputs(s);
  const auto zero_grad = [&] {
    // as zero_grad(set_to_none)
    in.hidden.mutable_grad() = at::Tensor();
    in.weight.mutable_grad() = at::Tensor();
  };
  std::unique_ptr<GemmBuffers> buffers;
  if (path == Path::Gemm3) buffers = std::make_unique<GemmBuffers>(in);
  const auto step = [&]() -> double {
    switch (path) {
      case Path::Fused:
        zero_grad();
        return fused_step(in);
      case Path::MmLogits:
        zero_grad();
        return mm_logits_step(in);
      case Path::Composed:
        zero_grad();
        return composed_step(in);
      case Path::Gemm3:
        gemm3_step(in, *buffers);
        return 0.0;
    }
    return 0.0;
  };

  // One step before anything is measured: warm-up, and (but for gemm3) the
  // check against path (a)'s loss.
  const double loss = step();
  if (path != Path::Gemm3) {
    auto& refs = reference_losses();
    if (!refs.count(s.key())) {
      zero_grad();
      refs[s.key()] = path == Path::MmLogits ? loss : mm_logits_step(in);
    }
    check_loss(path, s, loss, refs[s.key()]);
    state.counters["loss"] = loss;
  }
  zero_grad();
  const double peak = peak_extra_bytes(step);

  for (auto _ : state) {
    benchmark::DoNotOptimize(step());
  }
  // The gradients wrt hidden and weight are what every path must return;
  // what a path allocates beyond them is its own overhead.
  const double grad_bytes =
      static_cast<double>((s.tokens + s.vocab) * s.width) * at::elementSize(s.dtype);
  state.counters["peak_extra_MB"] = peak < 0 ? -1.0 : peak / (1024.0 * 1024.0);
  state.counters["beyond_grads_MB"] = peak < 0 ? -1.0 : (peak - grad_bytes) / (1024.0 * 1024.0);
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(s.tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = at::get_num_threads();
}

// ---------------------------------------------------------------------------
// Summary table.
// ---------------------------------------------------------------------------

/// The console output plus, at the end, one row per shape with every path.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      // <path>/<dtype>/<N>/<H>/<V>[/iterations:k][/real_time]
      std::vector<std::string> parts;
      std::istringstream name(run.benchmark_name());
      for (std::string part; std::getline(name, part, '/');) parts.push_back(part);
      if (parts.size() < 5) continue;
      const std::string& path = parts[0];
      const std::string key = parts[1] + "/" + parts[2] + "/" + parts[3] + "/" + parts[4];
      const double ms = run.GetAdjustedRealTime() *
                        benchmark::GetTimeUnitMultiplier(benchmark::kMillisecond) /
                        benchmark::GetTimeUnitMultiplier(run.time_unit);
      const auto counter = [&](const char* counter_name) {
        const auto it = run.counters.find(counter_name);
        return it == run.counters.end() ? -1.0 : it->second.value;
      };
      Side& side = entries_[key][path];
      side.ms = ms;
      side.peak_mb = counter("peak_extra_MB");
      side.beyond_mb = counter("beyond_grads_MB");
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf(
        "\nSummary (%d threads, %s): one forward + backward of the PSFT loss from the last\n"
        "hidden state, gradients wrt hidden and weight. ms: wall time; peak: peak resident\n"
        "memory of one step above its inputs, MiB (the returned gradients included); beyond:\n"
        "the same less the gradients' (N + V) H e bytes; time ratio = fused / mm_logits, peak\n"
        "ratio = fused peak / mm_logits peak; gemm3: the three GEMMs alone, into preallocated\n"
        "outputs.\n"
        "%-20s %9s %13s %12s %10s %9s %11s %15s %10s %13s %17s\n",
        bench_threads(), cpu_model().c_str(), "dtype/N/H/V", "fused ms", "mm_logits ms",
        "composed ms", "time ratio", "gemm3 ms", "fused peak", "mm_logits peak", "peak ratio",
        "fused beyond", "mm_logits beyond");
    const auto cell = [](const std::map<std::string, Side>& e, const char* path) {
      const auto it = e.find(path);
      return it == e.end() ? Side{} : it->second;
    };
    // "n/a" where the figure is missing (path not run, peak not measurable).
    const auto fmt = [](bool known, double value, const char* format) {
      if (!known) return std::string("n/a");
      char buf[32];
      std::snprintf(buf, sizeof buf, format, value);
      return std::string(buf);
    };
    for (const auto& [key, e] : entries_) {
      const Side fused = cell(e, "fused"), mm = cell(e, "mm_logits");
      const Side composed = cell(e, "composed"), gemm = cell(e, "gemm3");
      const bool fused_peak = fused.peak_mb >= 0, mm_peak = mm.peak_mb >= 0;
      std::printf(
          "%-20s %9s %13s %12s %10s %9s %11s %15s %10s %13s %17s\n", key.c_str(),
          fmt(fused.ms >= 0, fused.ms, "%.1f").c_str(), fmt(mm.ms >= 0, mm.ms, "%.1f").c_str(),
          fmt(composed.ms >= 0, composed.ms, "%.1f").c_str(),
          fmt(fused.ms > 0 && mm.ms > 0, fused.ms / mm.ms, "%.3fx").c_str(),
          fmt(gemm.ms >= 0, gemm.ms, "%.1f").c_str(),
          fmt(fused_peak, fused.peak_mb, "%.0f").c_str(), fmt(mm_peak, mm.peak_mb, "%.0f").c_str(),
          fmt(fused.peak_mb > 0 && mm.peak_mb > 0, fused.peak_mb / mm.peak_mb, "%.4f").c_str(),
          fmt(fused_peak, fused.beyond_mb, "%.0f").c_str(),
          fmt(mm_peak, mm.beyond_mb, "%.0f").c_str());
    }
    std::fflush(stdout);
  }

 private:
  struct Side {
    double ms = -1, peak_mb = -1, beyond_mb = -1;
  };
  std::map<std::string, std::map<std::string, Side>> entries_;
};

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(bench_threads());
  benchmark::AddCustomContext("psft_bench_threads", std::to_string(bench_threads()));
  benchmark::AddCustomContext("psft_version", psft::version());
  benchmark::AddCustomContext("cpu_model", cpu_model());

  std::vector<std::tuple<std::int64_t, std::int64_t, std::int64_t>> sizes = {
      {512, 256, 4096},      // smoke (ctest)
      {4096, 1024, 32000}};  // headline
  if (bench_large()) {
    // Path (a) needs 2 N V e bytes for the logits and their gradient (20 GB
    // at 16384 x 151936 fp32): opt-in, see the header.
    sizes.insert(sizes.end(), {{16384, 1024, 32000}, {4096, 1024, 151936}, {16384, 1024, 151936}});
  }
  const std::pair<at::ScalarType, const char*> dtypes[] = {{at::kFloat, "fp32"},
                                                           {at::kBFloat16, "bf16"}};
  for (const auto& [tokens, width, vocab] : sizes) {
    for (const auto& [dtype, dtype_name] : dtypes) {
      const Shape shape{dtype, dtype_name, tokens, width, vocab};
      // mm_logits first: its warm-up step is the reference the others check.
      for (const Path path : {Path::MmLogits, Path::Fused, Path::Composed, Path::Gemm3}) {
        const std::string name = std::string(path_name(path)) + "/" + shape.key();
        benchmark::RegisterBenchmark(name.c_str(), bench_hidden_loss, path, shape)
            ->Unit(benchmark::kMillisecond)
            ->Iterations(bench_iterations())
            ->UseRealTime();
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
