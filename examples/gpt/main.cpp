/// \file
/// psft_gpt: PSFT vs SFT on a small GPT, end to end.
///
///   psft_gpt [demo] [--out DIR] [--quick] [--base FILE] [--cache-dir DIR] [options]
///   psft_gpt [demo] --seeds N [--only a,b] [options]
///   psft_gpt pretrain --out FILE [--quick]
///
/// demo pretrains (or loads from the cache) a base model on a mixture of
/// four character skills, fine-tunes it on one skill (addition) from a small
/// fixed set of demonstrations with SFT, PSFT and their variants, evaluates
/// in-domain and out-of-domain accuracy, token entropy, KL from the base and
/// the trust region's clip fraction (and what psft::TrustRegionMonitor says
/// of it), then runs a short GRPO-style RL stage (or GSPO, CISPO) from the
/// SFT and PSFT checkpoints. It writes DIR/metrics.csv (one row per
/// optimizer step), DIR/summary.json, and prints a comparison table;
/// examples/gpt/plot.py draws DIR/metrics.csv. With --seeds N it repeats
/// all that for N seeds (base model, demonstration order, RL prompts and
/// sampler) into DIR/seed-K/ and writes the mean and spread of every figure,
/// and of the paired differences between runs, to DIR/summary.json and
/// DIR/seeds.md. The losses and log-probabilities take the last hidden state
/// with the LM head fused in (psft's *_from_hidden); --unfused computes the
/// logits first and uses the *_from_logits functions, for comparison. See
/// docs/demo.md.

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <psft/psft.hpp>

#include "data.hpp"
#include "model.hpp"
#include "train.hpp"

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

/// Everything the demo can be told.
struct Settings {
  std::string command = "demo";
  std::string command_line;  ///< as given, for the --seeds table
  fs::path out = "demo-out";
  fs::path cache_dir;
  fs::path base;  // a checkpoint of `psft_gpt pretrain` to start from
  bool quick = false;
  bool no_cache = false;
  int threads = 1;
  /// Seed K adds K to the pretraining, fine-tuning-order, RL and RL-evaluation
  /// seeds (K = 0: the defaults); --seeds N runs seeds `seed` .. seed + N - 1.
  std::uint64_t seed = 0;
  std::int64_t seeds = 0;  ///< 0: one run in DIR; N >= 1: N seeds in DIR/seed-K
  bool same_base = false;  ///< every seed starts from seed 0's base model
  std::string rl_objective = "clipped";
  /// The LM head as its own layer: losses and log-probabilities from the
  /// logits (psft's *_from_logits) instead of fused (*_from_hidden).
  bool unfused = false;
  std::uint64_t rl_eval_seed = 4242;  ///< sampler seed of the held-out RL reward
  gpt::PretrainConfig pretrain;
  gpt::FinetuneConfig finetune;
  gpt::RlConfig rl;
  std::int64_t rl_eval_samples = 4;  ///< sampled responses per held-out prompt for RL's reward
  std::int64_t demonstrations = 512;
  std::int64_t eval_per_skill = 200;
  double lr_sft = 3e-4;
  double lr_psft = 1.5e-5;  // the recipe's ratio, 2e-5 : 1e-6
  std::int64_t sft_warmup = 64;
  double ema_decay = 0.999;
  std::vector<std::string> rl_from = {"sft", "sft_lr_psft", "psft", "psft_lr_sft", "psft_ema"};
  std::vector<std::string> only;  // empty: all runs
};

/// A one-line live progress bar on stderr when it is a terminal; otherwise
/// (ctest, pipes) one line per evaluation, so logs stay readable.
class Progress {
 public:
  explicit Progress(std::int64_t total) : total_(total), tty_(isatty(STDERR_FILENO) != 0) {}
  void advance(std::int64_t steps = 1) { done_ += steps; }
  void show(const std::string& text, bool milestone) {
    const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / total_) : 1.0;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    if (tty_) {
      const auto now = Clock::now();
      if (!milestone && now - last_ < std::chrono::milliseconds(100)) return;
      last_ = now;
      const int width = 24, filled = static_cast<int>(frac * width);
      std::fprintf(stderr, "\r\033[K[%s%s] %3.0f%% %5.0fs %s", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), 100 * frac, elapsed, text.c_str());
      if (milestone) std::fputc('\n', stderr);
    } else if (milestone) {
      std::fprintf(stderr, "%3.0f%% %5.0fs %s\n", 100 * frac, elapsed, text.c_str());
    }
    std::fflush(stderr);
  }
  void finish() {
    if (tty_) std::fputc('\n', stderr);
  }

 private:
  std::int64_t total_, done_ = 0;
  bool tty_;
  Clock::time_point start_ = Clock::now(), last_ = Clock::now() - std::chrono::seconds(1);
};

std::string fmt(double v, int precision = 4) {
  if (std::isnan(v)) return "";
  std::ostringstream s;
  s << std::setprecision(precision) << v;
  return s.str();
}

/// metrics.csv: one row per optimizer step; evaluation columns are empty
/// between evaluations.
class CsvLog {
 public:
  explicit CsvLog(const fs::path& path) : out_(path) {
    TORCH_CHECK(out_, "psft_gpt: cannot write ", path.string());
    out_ << "run,stage,step,epoch,loss,entropy,clip_frac_high,ratio_max,approx_kl,lr,reward,"
            "in_domain_acc,ood_acc,eval_entropy,kl_from_base";
    for (int s = 0; s < gpt::kSkillCount; ++s) {
      out_ << ",acc_" << gpt::skill_name(static_cast<gpt::Skill>(s));
    }
    out_ << "\n";
  }
  void write(const gpt::StepLog& s) {
    out_ << s.run << "," << s.stage << "," << s.step << "," << fmt(s.epoch) << "," << fmt(s.loss, 6)
         << "," << fmt(s.entropy, 6) << "," << fmt(s.clip_frac_high, 6) << ","
         << fmt(s.ratio_max, 6) << "," << fmt(s.approx_kl, 6) << "," << fmt(s.lr) << ","
         << fmt(s.reward);
    if (s.evaluated) {
      out_ << "," << fmt(s.eval.in_domain) << "," << fmt(s.eval.out_of_domain) << ","
           << fmt(s.eval.entropy, 6) << "," << fmt(s.eval.kl_from_base, 6);
      for (double a : s.eval.skill) out_ << "," << fmt(a);
    } else {
      out_ << ",,,,";
      for (int i = 0; i < gpt::kSkillCount; ++i) out_ << ",";
    }
    out_ << "\n";
  }

 private:
  std::ofstream out_;
};

const char* state_name(psft::TrustRegionState s) {
  switch (s) {
    case psft::TrustRegionState::Healthy:
      return "healthy";
    case psft::TrustRegionState::NeverBinds:
      return "never_binds";
    case psft::TrustRegionState::BindsOnMost:
      return "binds_on_most";
  }
  return "?";
}

/// What a psft::TrustRegionMonitor said over one run: every change of its
/// state (step, state), and the message of the first report.
struct TrustRegionReport {
  bool recorded = false;
  std::int64_t patience = 0;  ///< in recorded steps (global batches, RL batches)
  std::vector<std::pair<std::int64_t, psft::TrustRegionState>> changes;
  std::string first_message;

  psft::TrustRegionState state() const {
    return changes.empty() ? psft::TrustRegionState::Healthy : changes.back().second;
  }
  /// "healthy", "never_binds@128", "never_binds@128>healthy@400", ...
  std::string label() const {
    if (!recorded) return "-";
    if (changes.empty()) return "healthy";
    std::string l;
    for (const auto& [step, state] : changes) {
      l += (l.empty() ? "" : ">") + std::string(state_name(state)) + "@" + std::to_string(step);
    }
    return l;
  }
};

/// Follows a monitor through a run: call after every step it may have
/// recorded.
struct TrustRegionWatch {
  psft::TrustRegionMonitor monitor;
  TrustRegionReport report;
  TrustRegionWatch(std::int64_t patience, double eps_high)
      : monitor(patience, eps_high, /*most_fraction=*/0.5, /*warn=*/false) {
    report.recorded = true;
    report.patience = patience;
  }
  void update(std::int64_t step) {
    if (monitor.state() == report.state()) return;
    report.changes.emplace_back(step, monitor.state());
    if (report.first_message.empty()) report.first_message = monitor.message();
  }
};

/// Patience of the demo's monitors: an eighth of the steps they record (16
/// of the 128 global batches of a fine-tuning run, 5 of the 40 RL batches).
std::int64_t monitor_patience(std::int64_t recorded_steps) {
  return std::max<std::int64_t>(1, recorded_steps / 8);
}

/// What the table and summary.json report for one fine-tuning run.
struct RunSummary {
  gpt::RunSpec spec;
  gpt::Evaluator::Result final_eval;
  std::vector<std::pair<std::int64_t, gpt::Evaluator::Result>> evals;  // (step, result)
  double mean_clip_frac = 0;
  double seconds = 0;
  bool has_rl = false;
  // RL: sampled reward on the held-out task prompts before / after RL, mean
  // training reward of the first / last tenth of RL steps, greedy accuracy
  // after RL, mean clip fraction of the RL updates.
  double rl_initial_reward = NAN, rl_final_reward = NAN, rl_final_accuracy = NAN;
  double rl_first_steps_reward = NAN, rl_last_steps_reward = NAN, rl_mean_clip_frac = NAN;
  TrustRegionReport trust_region, rl_trust_region;
};

/// One seed's demo: the base model's evaluation and every run's summary.
struct SeedResult {
  std::uint64_t seed = 0;
  gpt::Evaluator::Result base;
  std::vector<RunSummary> runs;
  double matched = NAN;  ///< matched in-domain accuracy
  double seconds = 0;
};

fs::path default_cache_dir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return fs::path(x) / "psft";
  if (const char* h = std::getenv("HOME"); h && *h) return fs::path(h) / ".cache" / "psft";
  return fs::temp_directory_path() / "psft";
}

std::string hex_hash(const std::string& s) {
  std::ostringstream o;
  o << std::hex << std::hash<std::string>{}(s);
  return o.str();
}

gpt::Gpt run_pretraining(const Settings& st, Progress* progress) {
  return gpt::pretrain(st.pretrain, [&](std::int64_t step, double loss) {
    if (progress) {
      progress->advance();
      const bool milestone = (step + 1) % std::max<std::int64_t>(1, st.pretrain.steps / 4) == 0;
      progress->show("pretrain step " + std::to_string(step + 1) + "/" +
                         std::to_string(st.pretrain.steps) + " loss " + fmt(loss, 3),
                     milestone);
    }
  });
}

/// The base model: from `path` if it exists, else pretrained and saved there.
gpt::Gpt load_or_pretrain(const Settings& st, const fs::path& path, Progress& progress,
                          bool* loaded) {
  gpt::Gpt model(st.pretrain.model);
  *loaded = false;
  TORCH_CHECK(st.base.empty() || fs::exists(path), "psft_gpt: --base ", path.string(),
              " does not exist");
  if ((!st.no_cache || !st.base.empty()) && fs::exists(path)) {
    try {
      const std::int64_t expected = model->parameter_count();
      torch::load(model, path.string());
      TORCH_CHECK(model->parameter_count() == expected, "psft_gpt: ", path.string(), " holds ",
                  model->parameter_count(), " parameters, the configured model has ", expected);
      *loaded = true;
      progress.advance(st.pretrain.steps);
      progress.show("base model loaded (" + path.filename().string() + ")", true);
      return model;
    } catch (const c10::Error&) {
      if (!st.base.empty()) throw;  // never overwrite a checkpoint the user named
      std::fprintf(stderr, "psft_gpt: cannot read %s, pretraining again\n", path.c_str());
    }
  }
  model = run_pretraining(st, &progress);
  fs::create_directories(path.parent_path());
  const fs::path tmp = path.string() + ".tmp";
  torch::save(model, tmp.string());
  fs::rename(tmp, path);
  return model;
}

std::vector<gpt::RunSpec> run_specs(const Settings& st) {
  using gpt::Objective;
  const double eps = st.finetune.clip.eps_high;
  // The old policy as an exponential moving average of the weights (horizon
  // ~1 / (1 - decay) steps) instead of the model at the global batch's start.
  psft::OldPolicyOptions ema;
  ema.strategy = psft::OldPolicyStrategy::Ema;
  ema.ema_decay = st.ema_decay;
  std::vector<gpt::RunSpec> all = {
      {"sft", Objective::Sft, st.lr_sft, 0, eps, std::nullopt},
      {"sft_lr_psft", Objective::Sft, st.lr_psft, 0, eps, std::nullopt},
      {"psft", Objective::Psft, st.lr_psft, 0, eps, std::nullopt},
      {"psft_lr_sft", Objective::Psft, st.lr_sft, 0, eps, std::nullopt},
      {"psft_warmup", Objective::Psft, st.lr_sft, st.sft_warmup, eps, std::nullopt},
      {"psft_eps005", Objective::Psft, st.lr_sft, 0, 0.05, std::nullopt},
      {"psft_ema", Objective::Psft, st.lr_sft, 0, eps, ema},
      {"dft", Objective::Dft, st.lr_sft, 0, eps, std::nullopt},
  };

  if (st.only.empty()) return all;
  std::vector<gpt::RunSpec> some;
  for (const auto& r : all) {
    if (std::find(st.only.begin(), st.only.end(), r.name) != st.only.end()) some.push_back(r);
  }
  return some;
}

const char* objective_name(gpt::Objective o) {
  switch (o) {
    case gpt::Objective::Sft:
      return "SFT (NLL)";
    case gpt::Objective::Dft:
      return "DFT";
    case gpt::Objective::Psft:
      return "PSFT";
  }
  return "?";
}

std::string old_policy_name(const psft::OldPolicyOptions& o) {
  switch (o.strategy) {
    case psft::OldPolicyStrategy::Recompute:
      return "recompute";
    case psft::OldPolicyStrategy::Snapshot:
      return "snapshot " + std::to_string(o.snapshot_interval);
    case psft::OldPolicyStrategy::Ema:
      return "ema " + fmt(o.ema_decay);
  }
  return "?";
}

std::string json_number(double v) { return std::isfinite(v) ? fmt(v, 6) : "null"; }

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

std::string trust_region_json(const TrustRegionReport& r) {
  if (!r.recorded) return "null";
  std::ostringstream o;
  o << "{\"state\": \"" << state_name(r.state()) << "\", \"first_report_step\": ";
  if (r.changes.empty()) {
    o << "null, \"first_report_state\": null";
  } else {
    o << r.changes.front().first << ", \"first_report_state\": \""
      << state_name(r.changes.front().second) << "\"";
  }
  o << ", \"patience\": " << r.patience << ", \"changes\": [";
  for (std::size_t i = 0; i < r.changes.size(); ++i) {
    o << (i ? ", " : "") << "[" << r.changes[i].first << ", \"" << state_name(r.changes[i].second)
      << "\"]";
  }
  o << "]}";
  return o.str();
}

/// The first evaluation of `r` at or above `target` in-domain accuracy.
const gpt::Evaluator::Result* at_matched(const RunSummary& r, double target,
                                         std::int64_t* step = nullptr) {
  for (const auto& [s, e] : r.evals) {
    if (e.in_domain >= target) {
      if (step) *step = s;
      return &e;
    }
  }
  return nullptr;
}

/// The seeds that seed K of the demo uses (Settings::seed).
Settings seeded(const Settings& st, std::uint64_t k) {
  Settings s = st;
  s.seed = k;
  if (!st.same_base) s.pretrain.seed += k;
  s.finetune.seed += k;
  s.rl.seed += k;
  s.rl_eval_seed += k;
  return s;
}

std::string rl_objective_json(const Settings& st) {
  const psft::LossOptions& l = st.rl.loss;
  std::ostringstream o;
  o << "{\"name\": \"" << st.rl_objective << "\", \"ratio_level\": \""
    << (l.objective.ratio_level == psft::RatioLevel::Sequence ? "sequence" : "token")
    << "\", \"eps_low\": " << json_number(l.clip.eps_low)
    << ", \"eps_high\": " << json_number(l.clip.eps_high);
  if (l.objective.kind == psft::Objective::CispoCapped) {
    o << ", \"cispo_cap\": " << json_number(l.objective.cispo_cap);
  }
  o << "}";
  return o.str();
}

void write_summary(const fs::path& path, const Settings& st, const SeedResult& result,
                   double total_seconds) {
  const gpt::Evaluator::Result& base = result.base;
  const std::vector<RunSummary>& runs = result.runs;
  const double matched_target = result.matched;
  std::ofstream o(path);
  TORCH_CHECK(o, "psft_gpt: cannot write ", path.string());
  o << "{\n  \"psft_version\": \"" << psft::version() << "\",\n";
  o << "  \"quick\": " << (st.quick ? "true" : "false") << ",\n";
  o << "  \"seed\": " << st.seed << ",\n";
  o << "  \"seeds_used\": {\"pretrain\": " << st.pretrain.seed
    << ", \"finetune_order\": " << st.finetune.seed << ", \"rl\": " << st.rl.seed
    << ", \"rl_eval\": " << st.rl_eval_seed
    << ", \"base_file\": " << (st.base.empty() ? "null" : json_string(st.base.string())) << "},\n";
  o << "  \"task\": \"add\",\n  \"demonstrations\": " << st.demonstrations << ",\n";
  o << "  \"epochs\": " << st.finetune.epochs << ",\n";
  o << "  \"global_batch\": " << st.finetune.global_batch << ",\n";
  o << "  \"mini_batches\": " << st.finetune.mini_batches << ",\n";
  o << "  \"rl_objective\": " << rl_objective_json(st) << ",\n";
  o << "  \"lm_head\": \"" << (st.unfused ? "unfused" : "fused") << "\",\n";
  o << "  \"seconds\": " << json_number(total_seconds) << ",\n";
  o << "  \"matched_in_domain_accuracy\": " << json_number(matched_target) << ",\n";
  o << "  \"base\": {\"in_domain_accuracy\": " << json_number(base.in_domain)
    << ", \"out_of_domain_accuracy\": " << json_number(base.out_of_domain)
    << ", \"final_entropy\": " << json_number(base.entropy) << "},\n";
  o << "  \"runs\": {\n";
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const RunSummary& r = runs[i];
    o << "    \"" << r.spec.name << "\": {\"objective\": \"" << objective_name(r.spec.objective)
      << "\", \"lr\": " << json_number(r.spec.lr)
      << ", \"sft_warmup_steps\": " << r.spec.sft_warmup_steps
      << ", \"eps_high\": " << json_number(r.spec.eps_high) << ", \"old_policy\": \""
      << old_policy_name(r.spec.old_policy.value_or(st.finetune.old_policy)) << "\""
      << ", \"in_domain_accuracy\": " << json_number(r.final_eval.in_domain)
      << ", \"out_of_domain_accuracy\": " << json_number(r.final_eval.out_of_domain)
      << ", \"final_entropy\": " << json_number(r.final_eval.entropy)
      << ", \"kl_from_base\": " << json_number(r.final_eval.kl_from_base)
      << ", \"mean_clip_frac_high\": " << json_number(r.mean_clip_frac)
      << ", \"trust_region\": " << trust_region_json(r.trust_region)
      << ", \"rl_initial_reward\": " << json_number(r.rl_initial_reward)
      << ", \"rl_final_reward\": " << json_number(r.rl_final_reward)
      << ", \"rl_final_in_domain_accuracy\": " << json_number(r.rl_final_accuracy)
      << ", \"rl_first_steps_reward\": " << json_number(r.rl_first_steps_reward)
      << ", \"rl_last_steps_reward\": " << json_number(r.rl_last_steps_reward)
      << ", \"rl_mean_clip_frac\": " << json_number(r.rl_mean_clip_frac)
      << ", \"rl_trust_region\": " << trust_region_json(r.rl_trust_region)
      << ", \"seconds\": " << json_number(r.seconds);
    // At matched in-domain accuracy: the first evaluation that reached it.
    std::int64_t step = 0;
    if (const gpt::Evaluator::Result* e = at_matched(r, matched_target, &step)) {
      o << ", \"at_matched_accuracy\": {\"step\": " << step
        << ", \"in_domain_accuracy\": " << json_number(e->in_domain)
        << ", \"out_of_domain_accuracy\": " << json_number(e->out_of_domain)
        << ", \"entropy\": " << json_number(e->entropy)
        << ", \"kl_from_base\": " << json_number(e->kl_from_base) << "}";
    }
    o << "}" << (i + 1 < runs.size() ? "," : "") << "\n";
  }
  o << "  }\n}\n";
}

/// The table's short form of a monitor's report: "ok", "never@128",
/// "never@128>ok@400".
std::string short_label(const TrustRegionReport& r) {
  if (!r.recorded) return "-";
  if (r.changes.empty()) return "ok";
  std::string l;
  for (const auto& [step, state] : r.changes) {
    const char* name = state == psft::TrustRegionState::NeverBinds    ? "never"
                       : state == psft::TrustRegionState::BindsOnMost ? "most"
                                                                      : "ok";
    l += (l.empty() ? "" : ">") + std::string(name) + "@" + std::to_string(step);
  }
  return l;
}

void print_table(const SeedResult& result) {
  const gpt::Evaluator::Result& base = result.base;
  const double matched_target = result.matched;
  std::printf("\n%-12s %-9s %8s %6s %6s %7s %7s %6s %-10s | %6s %6s %5s | %6s %6s %6s %6s %s\n",
              "run", "loss", "lr", "in", "ood", "entropy", "KL", "clip", "TR", "@step", "ood",
              "ent", "RL0", "RL", "RLin", "RLclip", "RL-TR");
  std::printf("%-12s %-9s %8s %6.3f %6.3f %7.3f %7s %6s %-10s |\n", "base", "-", "-",
              base.in_domain, base.out_of_domain, base.entropy, "0", "-", "-");
  for (const RunSummary& r : result.runs) {
    std::string name = objective_name(r.spec.objective);
    if (r.spec.sft_warmup_steps > 0) name = "SFT>PSFT";
    std::printf("%-12s %-9s %8.2g %6.3f %6.3f %7.3f %7.4f %6.3f %-10s |", r.spec.name.c_str(),
                name.substr(0, 9).c_str(), r.spec.lr, r.final_eval.in_domain,
                r.final_eval.out_of_domain, r.final_eval.entropy, r.final_eval.kl_from_base,
                r.mean_clip_frac, short_label(r.trust_region).c_str());
    std::int64_t step = 0;
    if (const gpt::Evaluator::Result* e = at_matched(r, matched_target, &step)) {
      std::printf(" %6lld %6.3f %5.3f |", static_cast<long long>(step), e->out_of_domain,
                  e->entropy);
    } else {
      std::printf(" %6s %6s %5s |", "-", "-", "-");
    }
    if (r.has_rl) {
      std::printf(" %6.3f %6.3f %6.3f %6.3f %s\n", r.rl_initial_reward, r.rl_final_reward,
                  r.rl_final_accuracy, r.rl_mean_clip_frac, short_label(r.rl_trust_region).c_str());
    } else {
      std::printf(" %6s %6s %6s %6s %s\n", "-", "-", "-", "-", "-");
    }
  }
  std::printf(
      "\nin/ood: greedy exact-match accuracy on held-out prompts of the task / of the other\n"
      "skills; entropy: token entropy on held-out task responses; KL: KL(model || base) per\n"
      "response token; clip: mean fraction of tokens with r > 1 + eps_high (for SFT/DFT, what\n"
      "PSFT would have clipped); TR / RL-TR: what psft::TrustRegionMonitor said of fine-tuning\n"
      "/ RL (ok: healthy; never: the trust region never bound; most: it bound on most tokens;\n"
      "@ the optimizer step / RL step it said so); @step/ood/ent: first evaluation with\n"
      "in-domain accuracy >= %.3f (matched accuracy); RL0/RL: sampled reward on the\n"
      "held-out task prompts before / after RL; RLin: greedy in-domain accuracy after RL;\n"
      "RLclip: mean fraction of tokens clipped in the RL updates.\n",
      matched_target);
}

/// Prints, once per process, what a monitor's state means.
void print_message_once(const TrustRegionReport& r) {
  static std::vector<std::string> printed;
  if (r.first_message.empty()) return;
  if (std::find(printed.begin(), printed.end(), r.first_message) != printed.end()) return;
  printed.push_back(r.first_message);
  std::printf("  %s\n", r.first_message.c_str());
}

/// Optimizer steps, pretraining included, of one seed (for the progress bar).
std::int64_t seed_work(const Settings& st) {
  std::int64_t rl_runs = 0;
  const std::vector<gpt::RunSpec> specs = run_specs(st);
  for (const auto& s : specs) {
    rl_runs += std::find(st.rl_from.begin(), st.rl_from.end(), s.name) != st.rl_from.end();
  }
  return st.pretrain.steps +
         st.finetune.steps(st.demonstrations) * static_cast<std::int64_t>(specs.size()) +
         st.rl.steps * rl_runs;
}

/// One seed of the demo (`st` already seeded), its metrics.csv written to `out`.
SeedResult run_seed(const Settings& st, const fs::path& out, Progress& progress) {
  const auto t0 = Clock::now();
  fs::create_directories(out);
  const fs::path cache_dir = st.cache_dir.empty() ? default_cache_dir() : st.cache_dir;
  const fs::path base_path =
      st.base.empty() ? cache_dir / ("gpt-base-" + hex_hash(st.pretrain.key()) + ".pt") : st.base;

  const gpt::Dataset demos = gpt::make_dataset(gpt::Skill::Add, st.demonstrations, /*seed=*/2024);
  const std::vector<gpt::RunSpec> specs = run_specs(st);
  const std::int64_t ft_steps = st.finetune.steps(st.demonstrations);

  bool loaded = false;
  gpt::Gpt base = load_or_pretrain(st, base_path, progress, &loaded);
  std::printf("base model: %lld parameters, %s %s\n",
              static_cast<long long>(base->parameter_count()),
              loaded ? "loaded from" : "pretrained and saved to", base_path.c_str());

  const gpt::Evaluator evaluator(base, gpt::Skill::Add, st.eval_per_skill, demos.examples,
                                 st.unfused);
  SeedResult result;
  result.seed = st.seed;
  result.base = evaluator(base);
  const gpt::Evaluator::Result& base_eval = result.base;
  std::printf("base: task (add) %.3f, other skills %.3f (reverse %.3f, sort %.3f, next %.3f)\n",
              base_eval.in_domain, base_eval.out_of_domain, base_eval.skill[1], base_eval.skill[2],
              base_eval.skill[3]);
  std::printf(
      "fine-tuning: %lld demonstrations, %lld epochs, global batch %lld in %lld "
      "mini-batches (%lld passes), %lld optimizer steps per run\n",
      static_cast<long long>(st.demonstrations), static_cast<long long>(st.finetune.epochs),
      static_cast<long long>(st.finetune.global_batch),
      static_cast<long long>(st.finetune.mini_batches),
      static_cast<long long>(st.finetune.ppo_epochs), static_cast<long long>(ft_steps));
  // The monitors record one step per global batch (fine-tuning) and per
  // sampled batch (RL).
  const std::int64_t ft_patience =
      monitor_patience(st.finetune.epochs *
                       (st.demonstrations / std::max<std::int64_t>(1, st.finetune.global_batch)));
  const std::int64_t rl_patience = monitor_patience(st.rl.steps);
  std::printf(
      "trust-region monitor: patience %lld global batches (fine-tuning), %lld sampled batches "
      "(RL)\n",
      static_cast<long long>(ft_patience), static_cast<long long>(rl_patience));
  std::fflush(stdout);

  CsvLog csv(out / "metrics.csv");
  std::vector<RunSummary>& runs = result.runs;
  for (const gpt::RunSpec& spec : specs) {
    const auto r0 = Clock::now();
    RunSummary summary;
    summary.spec = spec;
    double clip_sum = 0;
    std::int64_t clip_count = 0;
    {  // The curves start at the base model.
      gpt::StepLog start;
      start.run = spec.name;
      start.stage = "finetune";
      start.loss = start.entropy = start.clip_frac_high = start.ratio_max = start.approx_kl = NAN;
      start.lr = 0;
      start.eval = base_eval;
      start.evaluated = true;
      csv.write(start);
      summary.evals.emplace_back(0, base_eval);
    }
    TrustRegionWatch ft_watch(ft_patience, spec.eps_high);
    gpt::Gpt tuned = gpt::finetune(
        base, demos, spec, st.finetune, evaluator,
        [&](const gpt::StepLog& s) {
          ft_watch.update(s.step);
          csv.write(s);
          clip_sum += s.clip_frac_high;
          ++clip_count;
          progress.advance();
          std::string text = spec.name + " step " + std::to_string(s.step) + " H " +
                             fmt(s.entropy, 3) + " clip " + fmt(s.clip_frac_high, 2);
          if (s.evaluated) {
            summary.evals.emplace_back(s.step, s.eval);
            summary.final_eval = s.eval;
            text += " | in " + fmt(s.eval.in_domain, 3) + " ood " + fmt(s.eval.out_of_domain, 3) +
                    " KL " + fmt(s.eval.kl_from_base, 3);
          }
          progress.show(text, s.evaluated && s.step == ft_steps);
        },
        &ft_watch.monitor);
    summary.trust_region = ft_watch.report;
    summary.mean_clip_frac = clip_count ? clip_sum / clip_count : 0.0;
    if (std::find(st.rl_from.begin(), st.rl_from.end(), spec.name) != st.rl_from.end()) {
      std::vector<double> rewards;
      double rl_clip = 0;
      TrustRegionWatch rl_watch(rl_patience, st.rl.loss.clip.eps_high);
      gpt::Gpt after = gpt::reinforce(
          tuned, gpt::Skill::Add, spec.name, st.rl,
          [&](const gpt::StepLog& s) {
            rl_watch.update(s.step);
            csv.write(s);
            rewards.push_back(s.reward);
            rl_clip += s.clip_frac_high;
            progress.advance();
            progress.show(spec.name + " RL step " + std::to_string(s.step) + " reward " +
                              fmt(s.reward, 3) + " H " + fmt(s.entropy, 3) + " clip " +
                              fmt(s.clip_frac_high, 3),
                          s.step == st.rl.steps);
          },
          &rl_watch.monitor);
      summary.rl_trust_region = rl_watch.report;
      const std::size_t tenth = std::max<std::size_t>(1, rewards.size() / 10);
      auto mean = [](auto b, auto e) {
        return std::accumulate(b, e, 0.0) / static_cast<double>(std::distance(b, e));
      };
      summary.has_rl = true;
      summary.rl_first_steps_reward = mean(rewards.begin(), rewards.begin() + tenth);
      summary.rl_last_steps_reward = mean(rewards.end() - tenth, rewards.end());
      summary.rl_mean_clip_frac = rl_clip / static_cast<double>(rewards.size());
      // The same held-out prompts and sampler seed before and after RL.
      const gpt::Dataset& held_out = evaluator.per_skill[static_cast<std::size_t>(gpt::Skill::Add)];
      summary.rl_initial_reward = gpt::sampled_reward(tuned, held_out, st.rl_eval_samples,
                                                      st.rl.temperature, st.rl_eval_seed);
      summary.rl_final_reward = gpt::sampled_reward(after, held_out, st.rl_eval_samples,
                                                    st.rl.temperature, st.rl_eval_seed);
      summary.rl_final_accuracy = gpt::accuracy(after, evaluator.per_skill[0]);
    }
    summary.seconds = std::chrono::duration<double>(Clock::now() - r0).count();
    // What the monitors said, once per run; each state's explanation once.
    const TrustRegionReport& tr = summary.trust_region;
    std::printf("%s: trust region %s", spec.name.c_str(), tr.label().c_str());
    if (summary.has_rl) std::printf("; RL: %s", summary.rl_trust_region.label().c_str());
    std::printf(" (%.0f s)\n", summary.seconds);
    print_message_once(tr);
    print_message_once(summary.rl_trust_region);
    std::fflush(stdout);
    runs.push_back(std::move(summary));
  }

  // Matched in-domain accuracy: the highest level every run reached.
  double matched = 1.0;
  for (const RunSummary& r : runs) {
    double best = 0;
    for (const auto& e : r.evals) best = std::max(best, e.second.in_domain);
    matched = std::min(matched, best);
  }
  result.matched = matched;
  result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return result;
}

// ------------------------------------------------------------ several seeds

/// Mean, sample standard deviation, min and max of one figure over seeds
/// (NaN where a seed has no value).
struct Stats {
  std::vector<double> values;
  double mean = NAN, std = NAN, min = NAN, max = NAN;
  std::int64_t positive = 0, negative = 0;  ///< for differences: seeds with a sign

  explicit Stats(std::vector<double> v) : values(std::move(v)) {
    if (values.empty()) return;
    for (double x : values) {
      if (!std::isfinite(x)) return;
    }
    const double n = static_cast<double>(values.size());
    mean = std::accumulate(values.begin(), values.end(), 0.0) / n;
    double sq = 0;
    for (double x : values) sq += (x - mean) * (x - mean);
    std = values.size() > 1 ? std::sqrt(sq / (n - 1)) : 0.0;
    min = *std::min_element(values.begin(), values.end());
    max = *std::max_element(values.begin(), values.end());
    for (double x : values) {
      positive += x > 0;
      negative += x < 0;
    }
  }

  std::string json(bool signs = false) const {
    std::ostringstream o;
    o << "{\"mean\": " << json_number(mean) << ", \"std\": " << json_number(std)
      << ", \"min\": " << json_number(min) << ", \"max\": " << json_number(max);
    if (signs) o << ", \"positive\": " << positive << ", \"negative\": " << negative;
    o << ", \"values\": [";
    for (std::size_t i = 0; i < values.size(); ++i) {
      o << (i ? ", " : "") << json_number(values[i]);
    }
    o << "]}";
    return o.str();
  }

  /// "0.598 [0.560, 0.625]" (with signs for differences), "–" without values.
  std::string cell(bool signed_values = false) const {
    if (!std::isfinite(mean)) return "–";
    auto f = [&](double x) {
      // Rounded as the single-seed table rounds (printf), without "-0.000".
      char b[32];
      std::snprintf(b, sizeof b, signed_values ? "%+.3f" : "%.3f", x);
      const std::string text = b;
      return text == "-0.000" ? std::string(signed_values ? "+0.000" : "0.000") : text;
    };
    if (values.size() == 1) return f(mean);
    return f(mean) + " [" + f(min) + ", " + f(max) + "]";
  }
};

/// A learning rate as the docs write it: 3e-4, 1.5e-5.
std::string lr_text(double lr) {
  if (!(lr > 0)) return fmt(lr);
  const int e = static_cast<int>(std::floor(std::log10(lr) + 1e-9));
  return fmt(lr / std::pow(10.0, e), 3) + "e" + std::to_string(e);
}

/// A figure of one run.
struct RunMetric {
  const char* key;
  std::function<double(const SeedResult&, const RunSummary&)> get;
};

const std::vector<RunMetric>& run_metrics() {
  static const std::vector<RunMetric> metrics = {
      {"in_domain_accuracy",
       [](const SeedResult&, const RunSummary& r) { return r.final_eval.in_domain; }},
      {"out_of_domain_accuracy",
       [](const SeedResult&, const RunSummary& r) { return r.final_eval.out_of_domain; }},
      {"final_entropy",
       [](const SeedResult&, const RunSummary& r) { return r.final_eval.entropy; }},
      {"kl_from_base",
       [](const SeedResult&, const RunSummary& r) { return r.final_eval.kl_from_base; }},
      {"mean_clip_frac_high",
       [](const SeedResult&, const RunSummary& r) { return r.mean_clip_frac; }},
      {"matched_out_of_domain_accuracy",
       [](const SeedResult& s, const RunSummary& r) {
         const gpt::Evaluator::Result* e = at_matched(r, s.matched);
         return e ? e->out_of_domain : NAN;
       }},
      {"matched_entropy",
       [](const SeedResult& s, const RunSummary& r) {
         const gpt::Evaluator::Result* e = at_matched(r, s.matched);
         return e ? e->entropy : NAN;
       }},
      {"rl_initial_reward",
       [](const SeedResult&, const RunSummary& r) { return r.rl_initial_reward; }},
      {"rl_final_reward", [](const SeedResult&, const RunSummary& r) { return r.rl_final_reward; }},
      {"rl_gain", [](const SeedResult&,
                     const RunSummary& r) { return r.rl_final_reward - r.rl_initial_reward; }},
      {"rl_final_in_domain_accuracy",
       [](const SeedResult&, const RunSummary& r) { return r.rl_final_accuracy; }},
      {"rl_mean_clip_frac",
       [](const SeedResult&, const RunSummary& r) { return r.rl_mean_clip_frac; }},
  };
  return metrics;
}

const RunSummary* find_run(const SeedResult& s, const std::string& name) {
  for (const RunSummary& r : s.runs) {
    if (r.spec.name == name) return &r;
  }
  return nullptr;
}

/// A figure of `run` over the seeds that have it.
Stats run_stats(const std::vector<SeedResult>& seeds, const std::string& run, const RunMetric& m) {
  std::vector<double> v;
  for (const SeedResult& s : seeds) {
    if (const RunSummary* r = find_run(s, run)) v.push_back(m.get(s, *r));
  }
  return Stats(v);
}

/// Per seed `a` minus `b`, over the seeds that have both.
Stats difference_stats(const std::vector<SeedResult>& seeds, const std::string& a,
                       const std::string& b, const RunMetric& m) {
  std::vector<double> v;
  for (const SeedResult& s : seeds) {
    const RunSummary* ra = find_run(s, a);
    const RunSummary* rb = find_run(s, b);
    if (ra && rb) v.push_back(m.get(s, *ra) - m.get(s, *rb));
  }
  return Stats(v);
}

/// The paired comparisons the demo's conclusions rest on.
struct Comparison {
  const char* a;
  const char* b;
  const char* what;
};
const std::vector<Comparison>& comparisons() {
  static const std::vector<Comparison> list = {
      {"psft", "sft_lr_psft", "the trust region at lr 1.5e-5"},
      {"psft_lr_sft", "sft", "the trust region at lr 3e-4"},
      {"psft", "sft", "the recipe's PSFT vs SFT (lr and trust region together)"},
      {"sft_lr_psft", "sft", "the learning rate alone"},
      {"psft_eps005", "sft", "a tighter trust region (eps_high 0.05)"},
      {"psft_ema", "sft", "an EMA old policy"},
  };
  return list;
}

/// "never_binds x3", "healthy x2, never_binds x1": the final states over seeds.
std::string state_counts(const std::vector<SeedResult>& seeds, const std::string& run, bool rl) {
  std::map<std::string, int> counts;
  std::vector<std::string> order;
  for (const SeedResult& s : seeds) {
    const RunSummary* r = find_run(s, run);
    if (!r) continue;
    const TrustRegionReport& t = rl ? r->rl_trust_region : r->trust_region;
    if (!t.recorded) continue;
    const std::string name = state_name(t.state());
    if (counts[name]++ == 0) order.push_back(name);
  }
  std::string out;
  for (const std::string& n : order) {
    out += (out.empty() ? "" : ", ") + n + " x" + std::to_string(counts[n]);
  }
  return out.empty() ? "–" : out;
}

std::vector<std::string> run_names(const std::vector<SeedResult>& seeds) {
  std::vector<std::string> names;
  for (const SeedResult& s : seeds) {
    for (const RunSummary& r : s.runs) {
      if (std::find(names.begin(), names.end(), r.spec.name) == names.end()) {
        names.push_back(r.spec.name);
      }
    }
  }
  return names;
}

void write_seeds_summary(const fs::path& path, const Settings& st,
                         const std::vector<SeedResult>& seeds, double total_seconds) {
  std::ofstream o(path);
  TORCH_CHECK(o, "psft_gpt: cannot write ", path.string());
  o << "{\n  \"psft_version\": \"" << psft::version() << "\",\n";
  o << "  \"quick\": " << (st.quick ? "true" : "false") << ",\n";
  o << "  \"command\": " << json_string(st.command_line) << ",\n";
  o << "  \"seeds\": [";
  for (std::size_t i = 0; i < seeds.size(); ++i) o << (i ? ", " : "") << seeds[i].seed;
  o << "],\n";
  o << "  \"seed_varies\": "
    << json_string(st.base.empty() && !st.same_base ? "base model (pretraining init and data), "
                                                      "fine-tuning order, RL prompts and sampler, "
                                                      "held-out RL sampler"
                                                    : "fine-tuning order, RL prompts and sampler, "
                                                      "held-out RL sampler (one base model)")
    << ",\n";
  o << "  \"same_base\": " << (st.same_base || !st.base.empty() ? "true" : "false") << ",\n";
  o << "  \"rl_objective\": " << rl_objective_json(st) << ",\n";
  o << "  \"lm_head\": \"" << (st.unfused ? "unfused" : "fused") << "\",\n";
  o << "  \"threads\": " << torch::get_num_threads() << ",\n";
  o << "  \"seconds\": " << json_number(total_seconds) << ",\n";
  {
    std::vector<double> in, ood, ent, matched;
    for (const SeedResult& s : seeds) {
      in.push_back(s.base.in_domain);
      ood.push_back(s.base.out_of_domain);
      ent.push_back(s.base.entropy);
      matched.push_back(s.matched);
    }
    o << "  \"matched_in_domain_accuracy\": " << Stats(matched).json() << ",\n";
    o << "  \"base\": {\"in_domain_accuracy\": " << Stats(in).json()
      << ", \"out_of_domain_accuracy\": " << Stats(ood).json()
      << ", \"final_entropy\": " << Stats(ent).json() << "},\n";
  }
  o << "  \"runs\": {\n";
  const std::vector<std::string> names = run_names(seeds);
  for (std::size_t i = 0; i < names.size(); ++i) {
    const RunSummary* first = nullptr;
    for (const SeedResult& s : seeds) {
      if ((first = find_run(s, names[i]))) break;
    }
    o << "    \"" << names[i] << "\": {\"objective\": \"" << objective_name(first->spec.objective)
      << "\", \"lr\": " << json_number(first->spec.lr)
      << ", \"eps_high\": " << json_number(first->spec.eps_high);
    for (const RunMetric& m : run_metrics()) {
      o << ",\n      \"" << m.key << "\": " << run_stats(seeds, names[i], m).json();
    }
    for (int rl = 0; rl < 2; ++rl) {
      o << ",\n      \"" << (rl ? "rl_trust_region" : "trust_region") << "\": [";
      bool any = false;
      for (const SeedResult& s : seeds) {
        if (const RunSummary* r = find_run(s, names[i])) {
          o << (any ? ", " : "") << trust_region_json(rl ? r->rl_trust_region : r->trust_region);
          any = true;
        }
      }
      o << "]";
    }
    o << "}" << (i + 1 < names.size() ? "," : "") << "\n";
  }
  o << "  },\n  \"comparisons\": {\n";
  bool first_comparison = true;
  for (const Comparison& c : comparisons()) {
    if (std::find(names.begin(), names.end(), c.a) == names.end() ||
        std::find(names.begin(), names.end(), c.b) == names.end()) {
      continue;
    }
    o << (first_comparison ? "" : ",\n") << "    \"" << c.a << " - " << c.b
      << "\": {\"what\": " << json_string(c.what);
    for (const RunMetric& m : run_metrics()) {
      o << ",\n      \"" << m.key << "\": " << difference_stats(seeds, c.a, c.b, m).json(true);
    }
    o << "}";
    first_comparison = false;
  }
  o << "\n  }\n}\n";
}

/// The markdown tables of a --seeds run: every run's figures and the paired
/// differences, as mean [min, max] over the seeds.
std::string seeds_markdown(const Settings& st, const std::vector<SeedResult>& seeds,
                           double total_seconds) {
  std::ostringstream o;
  auto metric = [](const char* key) -> const RunMetric& {
    for (const RunMetric& m : run_metrics()) {
      if (std::string(m.key) == key) return m;
    }
    throw std::logic_error(std::string("psft_gpt: no metric ") + key);
  };
  o << "`" << st.command_line << "`: " << seeds.size() << " seeds (";
  for (std::size_t i = 0; i < seeds.size(); ++i) o << (i ? ", " : "") << seeds[i].seed;
  o << "), " << torch::get_num_threads() << " thread(s), " << std::lround(total_seconds)
    << " s. Each cell: mean [min, max] over the seeds.\n\n";
  std::vector<double> in, ood, ent, matched;
  for (const SeedResult& s : seeds) {
    in.push_back(s.base.in_domain);
    ood.push_back(s.base.out_of_domain);
    ent.push_back(s.base.entropy);
    matched.push_back(s.matched);
  }
  o << "| run | lr | in-domain | out-of-domain | entropy | KL from base | clip frac | @ matched "
       "acc: "
       "OOD | @ matched acc: entropy | RL reward before | RL reward after | RL gain | greedy acc "
       "after RL | trust region (fine-tuning / RL) |\n";
  o << "|-----|----|----------:|--------------:|--------:|-------------:|----------:|-----:|-----:|"
       "-----:|-----:|-----:|-----:|-----|\n";
  o << "| base | – | " << Stats(in).cell() << " | " << Stats(ood).cell() << " | "
    << Stats(ent).cell() << " | 0 | – | – | – | – | – | – | – | – |\n";
  for (const std::string& name : run_names(seeds)) {
    const RunSummary* first = nullptr;
    for (const SeedResult& s : seeds) {
      if ((first = find_run(s, name))) break;
    }
    o << "| " << name << " | " << lr_text(first->spec.lr);
    for (const char* key :
         {"in_domain_accuracy", "out_of_domain_accuracy", "final_entropy", "kl_from_base",
          "mean_clip_frac_high", "matched_out_of_domain_accuracy", "matched_entropy",
          "rl_initial_reward", "rl_final_reward", "rl_gain", "rl_final_in_domain_accuracy"}) {
      o << " | " << run_stats(seeds, name, metric(key)).cell(std::string(key) == "rl_gain");
    }
    o << " | " << state_counts(seeds, name, false) << " / " << state_counts(seeds, name, true)
      << " |\n";
  }
  o << "\nMatched in-domain accuracy (the highest every run reached): " << Stats(matched).cell()
    << ".\n\n";
  const std::vector<std::string> names = run_names(seeds);
  bool header = false;
  for (const Comparison& c : comparisons()) {
    if (std::find(names.begin(), names.end(), c.a) == names.end() ||
        std::find(names.begin(), names.end(), c.b) == names.end()) {
      continue;
    }
    if (!header) {
      o << "Paired differences (per seed, first run minus second):\n\n"
        << "| difference | what it isolates | in-domain | out-of-domain | entropy | KL from base "
           "| @ matched acc: OOD | RL reward after | RL gain | greedy acc after RL |\n"
        << "|------------|------------------|----------:|--------------:|--------:|-------------:"
           "|-----:|-----:|-----:|-----:|\n";
      header = true;
    }
    o << "| " << c.a << " − " << c.b << " | " << c.what;
    for (const char* key : {"in_domain_accuracy", "out_of_domain_accuracy", "final_entropy",
                            "kl_from_base", "matched_out_of_domain_accuracy", "rl_final_reward",
                            "rl_gain", "rl_final_in_domain_accuracy"}) {
      o << " | " << difference_stats(seeds, c.a, c.b, metric(key)).cell(true);
    }
    o << " |\n";
  }
  return o.str();
}

int run_demo(Settings& st) {
  const auto t0 = Clock::now();
  fs::create_directories(st.out);
  std::printf("psft %s, LibTorch %s, %d threads, LM head %s\n", psft::version(), TORCH_VERSION,
              torch::get_num_threads(), st.unfused ? "unfused (--unfused)" : "fused into the loss");
  if (st.seeds == 0) {
    const Settings one = seeded(st, st.seed);
    Progress progress(seed_work(one));
    const SeedResult result = run_seed(one, st.out, progress);
    progress.finish();
    const double total = std::chrono::duration<double>(Clock::now() - t0).count();
    write_summary(st.out / "summary.json", one, result, total);
    print_table(result);
    std::printf("\nwrote %s and %s (%.0f s)\n", (st.out / "metrics.csv").c_str(),
                (st.out / "summary.json").c_str(), total);
    return 0;
  }
  Progress progress(seed_work(st) * st.seeds);
  std::vector<SeedResult> results;
  for (std::int64_t k = 0; k < st.seeds; ++k) {
    const Settings one = seeded(st, st.seed + static_cast<std::uint64_t>(k));
    const fs::path dir = st.out / ("seed-" + std::to_string(one.seed));
    std::printf(
        "\n== seed %llu: pretraining seed %llu%s, fine-tuning order seed %llu, RL seed %llu ==\n",
        static_cast<unsigned long long>(one.seed),
        static_cast<unsigned long long>(one.pretrain.seed),
        st.base.empty() ? "" : " (unused: --base)",
        static_cast<unsigned long long>(one.finetune.seed),
        static_cast<unsigned long long>(one.rl.seed));
    results.push_back(run_seed(one, dir, progress));
    write_summary(dir / "summary.json", one, results.back(), results.back().seconds);
    print_table(results.back());
    std::fflush(stdout);
  }
  progress.finish();
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  write_seeds_summary(st.out / "summary.json", st, results, total);
  const std::string table = seeds_markdown(st, results, total);
  {
    std::ofstream md(st.out / "seeds.md");
    TORCH_CHECK(md, "psft_gpt: cannot write ", (st.out / "seeds.md").string());
    md << table;
  }
  std::printf("\n%s\nwrote %s/seed-*/, %s and %s (%.0f s)\n", table.c_str(), st.out.c_str(),
              (st.out / "summary.json").c_str(), (st.out / "seeds.md").c_str(), total);
  return 0;
}

void make_quick(Settings& st) {
  st.quick = true;
  st.pretrain.model.dim = 32;
  st.pretrain.model.layers = 1;
  st.pretrain.steps = 60;
  st.pretrain.batch = 32;
  st.demonstrations = 64;
  st.finetune.epochs = 2;
  st.finetune.eval_every = 8;
  st.eval_per_skill = 20;
  st.sft_warmup = 4;
  st.rl.steps = 3;
  st.rl.prompts = 4;
  st.rl.group = 4;
  // The tiny model earns no reward; keep its (zero-advantage) groups so that
  // the update path still runs.
  st.rl.skip_uniform_groups = false;
  st.rl_eval_samples = 2;
}

int usage(const char* argv0) {
  std::fprintf(
      stderr,
      "usage: %s [demo] [--out DIR] [--quick] [--base FILE] [--cache-dir DIR] [--no-cache]\n"
      "          [--threads N] [--epochs N] [--demos N] [--global-batch N] [--mini-batches N]\n"
      "          [--ppo-epochs N] [--old-policy recompute|snapshot:K|ema:D] [--ema-decay D]\n"
      "          [--lr-sft X] [--lr-psft X] [--eps-high X] [--sft-warmup N] [--eval-every N]\n"
      "          [--rl-steps N] [--rl-lr X] [--rl-prompts N] [--rl-group N]\n"
      "          [--rl-mini-batches N] [--rl-ppo-epochs N] [--rl-temperature X]\n"
      "          [--rl-seed N] [--rl-keep-uniform-groups] [--rl-from a,b] [--only a,b]\n"
      "          [--rl-objective clipped|gspo|cispo] [--rl-eps-low X] [--rl-eps-high X]\n"
      "          [--rl-cispo-cap X] [--seed K] [--seeds N] [--same-base] [--unfused]\n"
      "          [--pretrain-steps N] [--dim N] [--layers N] [--mixture w,w,w,w]\n"
      "       %s pretrain --out FILE [--quick] [--threads N] [--pretrain-steps N] ...\n",
      argv0, argv0);
  return 2;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string p; std::getline(in, p, ',');) {
    if (!p.empty()) parts.push_back(p);
  }
  return parts;
}

}  // namespace

int main(int argc, char** argv) {
  Settings st;
  for (int k = 0; k < argc; ++k) {
    st.command_line += (k ? " " : "") + std::string(k ? argv[k] : "psft_gpt");
  }
  st.pretrain.model.vocab = gpt::vocab_size();
  st.pretrain.model.context = gpt::kContext;
  int i = 1;
  if (i < argc && argv[i][0] != '-') st.command = argv[i++];
  if (st.command != "demo" && st.command != "pretrain") return usage(argv[0]);
  // --quick first, so that explicit options override it.
  for (int k = i; k < argc; ++k) {
    if (std::string(argv[k]) == "--quick") make_quick(st);
  }
  bool out_given = false;
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "psft_gpt: %s needs a value\n", a.c_str());
        std::exit(usage(argv[0]));
      }
      return argv[++i];
    };
    if (a == "--quick") {
    } else if (a == "--out") {
      st.out = value();
      out_given = true;
    } else if (a == "--base") {
      st.base = value();
    } else if (a == "--cache-dir") {
      st.cache_dir = value();
    } else if (a == "--no-cache") {
      st.no_cache = true;
    } else if (a == "--threads") {
      st.threads = std::atoi(value().c_str());
    } else if (a == "--epochs") {
      st.finetune.epochs = std::atoll(value().c_str());
    } else if (a == "--demos") {
      st.demonstrations = std::atoll(value().c_str());
    } else if (a == "--mini-batches") {
      st.finetune.mini_batches = std::atoll(value().c_str());
    } else if (a == "--global-batch") {
      st.finetune.global_batch = std::atoll(value().c_str());
    } else if (a == "--ppo-epochs") {
      st.finetune.ppo_epochs = std::atoll(value().c_str());
    } else if (a == "--lr-sft") {
      st.lr_sft = std::atof(value().c_str());
    } else if (a == "--lr-psft") {
      st.lr_psft = std::atof(value().c_str());
    } else if (a == "--eps-high") {
      st.finetune.clip.eps_high = std::atof(value().c_str());
    } else if (a == "--sft-warmup") {
      st.sft_warmup = std::atoll(value().c_str());
    } else if (a == "--old-policy") {
      // recompute | snapshot:K | ema:DECAY
      const std::string v = value();
      const std::string kind = v.substr(0, v.find(':'));
      const std::string arg = v.find(':') == std::string::npos ? "" : v.substr(v.find(':') + 1);
      if (kind == "recompute") {
        st.finetune.old_policy.strategy = psft::OldPolicyStrategy::Recompute;
      } else if (kind == "snapshot" && !arg.empty()) {
        st.finetune.old_policy.strategy = psft::OldPolicyStrategy::Snapshot;
        st.finetune.old_policy.snapshot_interval = std::atoll(arg.c_str());
      } else if (kind == "ema" && !arg.empty()) {
        st.finetune.old_policy.strategy = psft::OldPolicyStrategy::Ema;
        st.finetune.old_policy.ema_decay = std::atof(arg.c_str());
      } else {
        return usage(argv[0]);
      }
    } else if (a == "--ema-decay") {
      st.ema_decay = std::atof(value().c_str());
    } else if (a == "--rl-lr") {
      st.rl.lr = std::atof(value().c_str());
    } else if (a == "--rl-steps") {
      st.rl.steps = std::atoll(value().c_str());
    } else if (a == "--rl-prompts") {
      st.rl.prompts = std::atoll(value().c_str());
    } else if (a == "--rl-group") {
      st.rl.group = std::atoll(value().c_str());
    } else if (a == "--rl-mini-batches") {
      st.rl.mini_batches = std::atoll(value().c_str());
    } else if (a == "--rl-ppo-epochs") {
      st.rl.ppo_epochs = std::atoll(value().c_str());
    } else if (a == "--rl-temperature") {
      st.rl.temperature = std::atof(value().c_str());
    } else if (a == "--rl-seed") {
      st.rl.seed = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--rl-objective") {
      // clipped: GRPO's token-level clipped objective; gspo: the same rule on
      // GSPO's sequence-level ratio; cispo: TRL's / Liger's CISPO, the
      // policy gradient weighted by sg(min(r, cap)).
      st.rl_objective = value();
      if (st.rl_objective == "clipped") {
        st.rl.loss.objective = psft::ObjectiveOptions{};
      } else if (st.rl_objective == "gspo") {
        st.rl.loss.objective = psft::ObjectiveOptions{};
        st.rl.loss.objective.ratio_level = psft::RatioLevel::Sequence;
      } else if (st.rl_objective == "cispo") {
        const double cap = st.rl.loss.objective.cispo_cap;
        st.rl.loss.objective = psft::ObjectiveOptions{};
        st.rl.loss.objective.kind = psft::Objective::CispoCapped;
        st.rl.loss.objective.cispo_cap = cap;
      } else {
        std::fprintf(stderr, "psft_gpt: --rl-objective is clipped, gspo or cispo, not %s\n",
                     st.rl_objective.c_str());
        return usage(argv[0]);
      }
    } else if (a == "--rl-cispo-cap") {
      st.rl.loss.objective.cispo_cap = std::atof(value().c_str());
    } else if (a == "--rl-eps-low") {
      st.rl.loss.clip.eps_low = std::atof(value().c_str());
    } else if (a == "--rl-eps-high") {
      st.rl.loss.clip.eps_high = std::atof(value().c_str());
    } else if (a == "--seed") {
      st.seed = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--seeds") {
      st.seeds = std::atoll(value().c_str());
      if (st.seeds < 1) return usage(argv[0]);
    } else if (a == "--same-base") {
      st.same_base = true;
    } else if (a == "--unfused") {
      st.unfused = true;
    } else if (a == "--rl-keep-uniform-groups") {
      st.rl.skip_uniform_groups = false;
    } else if (a == "--pretrain-steps") {
      st.pretrain.steps = std::atoll(value().c_str());
    } else if (a == "--dim") {
      st.pretrain.model.dim = std::atoll(value().c_str());
    } else if (a == "--layers") {
      st.pretrain.model.layers = std::atoll(value().c_str());
    } else if (a == "--mixture") {
      st.pretrain.mixture.clear();
      for (const auto& w : split(value())) st.pretrain.mixture.push_back(std::atof(w.c_str()));
      if (st.pretrain.mixture.size() != gpt::kSkillCount) return usage(argv[0]);
    } else if (a == "--eval-every") {
      st.finetune.eval_every = std::atoll(value().c_str());
    } else if (a == "--only") {
      st.only = split(value());
    } else if (a == "--rl-from") {
      st.rl_from = split(value());
    } else {
      std::fprintf(stderr, "psft_gpt: unknown option %s\n", a.c_str());
      return usage(argv[0]);
    }
  }
  st.finetune.unfused = st.rl.unfused = st.unfused;
  if (st.threads > 0) torch::set_num_threads(st.threads);
  // A quick run keeps its base model with its outputs, not in the user's cache.
  if (st.quick && st.cache_dir.empty()) st.cache_dir = st.out / "cache";
  try {
    if (st.command == "pretrain") {
      if (!out_given) return usage(argv[0]);
      Progress progress(st.pretrain.steps);
      gpt::Gpt model = run_pretraining(st, &progress);
      progress.finish();
      if (st.out.has_parent_path()) fs::create_directories(st.out.parent_path());
      torch::save(model, st.out.string());
      std::printf("saved %lld parameters to %s\n", static_cast<long long>(model->parameter_count()),
                  st.out.c_str());
      return 0;
    }
    return run_demo(st);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "psft_gpt: %s\n", e.what());
    return 1;
  }
}
