/// \file
/// psft_gpt: PSFT vs SFT on a small GPT, end to end.
///
///   psft_gpt [demo] [--out DIR] [--quick] [--base FILE] [--cache-dir DIR] [options]
///   psft_gpt pretrain --out FILE [--quick]
///
/// demo pretrains (or loads from the cache) a base model on a mixture of
/// four character skills, fine-tunes it on one skill (addition) from a small
/// fixed set of demonstrations with SFT, PSFT and their variants, evaluates
/// in-domain and out-of-domain accuracy, token entropy, KL from the base and
/// the trust region's clip fraction, then runs a short GRPO-style RL stage
/// from the SFT and PSFT checkpoints. It writes DIR/metrics.csv (one row per
/// optimizer step), DIR/summary.json, and prints a comparison table;
/// examples/gpt/plot.py draws DIR/metrics.csv. See docs/demo.md.

#include <torch/torch.h>

#include <unistd.h>

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
#include <optional>
#include <sstream>
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
  fs::path out = "demo-out";
  fs::path cache_dir;
  fs::path base;  // a checkpoint of `psft_gpt pretrain` to start from
  bool quick = false;
  bool no_cache = false;
  int threads = 1;
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

void write_summary(const fs::path& path, const Settings& st, const gpt::Evaluator::Result& base,
                   const std::vector<RunSummary>& runs, double matched_target,
                   double total_seconds) {
  std::ofstream o(path);
  TORCH_CHECK(o, "psft_gpt: cannot write ", path.string());
  o << "{\n  \"psft_version\": \"" << psft::version() << "\",\n";
  o << "  \"quick\": " << (st.quick ? "true" : "false") << ",\n";
  o << "  \"task\": \"add\",\n  \"demonstrations\": " << st.demonstrations << ",\n";
  o << "  \"epochs\": " << st.finetune.epochs << ",\n";
  o << "  \"global_batch\": " << st.finetune.global_batch << ",\n";
  o << "  \"mini_batches\": " << st.finetune.mini_batches << ",\n";
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
      << ", \"rl_initial_reward\": " << json_number(r.rl_initial_reward)
      << ", \"rl_final_reward\": " << json_number(r.rl_final_reward)
      << ", \"rl_final_in_domain_accuracy\": " << json_number(r.rl_final_accuracy)
      << ", \"rl_first_steps_reward\": " << json_number(r.rl_first_steps_reward)
      << ", \"rl_last_steps_reward\": " << json_number(r.rl_last_steps_reward)
      << ", \"rl_mean_clip_frac\": " << json_number(r.rl_mean_clip_frac)
      << ", \"seconds\": " << json_number(r.seconds);
    // At matched in-domain accuracy: the first evaluation that reached it.
    for (const auto& [step, e] : r.evals) {
      if (e.in_domain >= matched_target) {
        o << ", \"at_matched_accuracy\": {\"step\": " << step
          << ", \"in_domain_accuracy\": " << json_number(e.in_domain)
          << ", \"out_of_domain_accuracy\": " << json_number(e.out_of_domain)
          << ", \"entropy\": " << json_number(e.entropy)
          << ", \"kl_from_base\": " << json_number(e.kl_from_base) << "}";
        break;
      }
    }
    o << "}" << (i + 1 < runs.size() ? "," : "") << "\n";
  }
  o << "  }\n}\n";
}

void print_table(const gpt::Evaluator::Result& base, const std::vector<RunSummary>& runs,
                 double matched_target) {
  std::printf("\n%-12s %-9s %8s %6s %6s %7s %7s %6s | %6s %6s %5s | %6s %6s %6s %6s\n", "run",
              "loss", "lr", "in", "ood", "entropy", "KL", "clip", "@step", "ood", "ent", "RL0",
              "RL", "RLin", "RLclip");
  std::printf("%-12s %-9s %8s %6.3f %6.3f %7.3f %7s %6s |\n", "base", "-", "-", base.in_domain,
              base.out_of_domain, base.entropy, "0", "-");
  for (const RunSummary& r : runs) {
    std::string name = objective_name(r.spec.objective);
    if (r.spec.sft_warmup_steps > 0) name = "SFT>PSFT";
    std::printf("%-12s %-9s %8.2g %6.3f %6.3f %7.3f %7.4f %6.3f |", r.spec.name.c_str(),
                name.substr(0, 9).c_str(), r.spec.lr, r.final_eval.in_domain,
                r.final_eval.out_of_domain, r.final_eval.entropy, r.final_eval.kl_from_base,
                r.mean_clip_frac);
    bool matched = false;
    for (const auto& [step, e] : r.evals) {
      if (e.in_domain >= matched_target) {
        std::printf(" %6lld %6.3f %5.3f |", static_cast<long long>(step), e.out_of_domain,
                    e.entropy);
        matched = true;
        break;
      }
    }
    if (!matched) std::printf(" %6s %6s %5s |", "-", "-", "-");
    if (r.has_rl) {
      std::printf(" %6.3f %6.3f %6.3f %6.3f\n", r.rl_initial_reward, r.rl_final_reward,
                  r.rl_final_accuracy, r.rl_mean_clip_frac);
    } else {
      std::printf(" %6s %6s %6s %6s\n", "-", "-", "-", "-");
    }
  }
  std::printf(
      "\nin/ood: greedy exact-match accuracy on held-out prompts of the task / of the other\n"
      "skills; entropy: token entropy on held-out task responses; KL: KL(model || base) per\n"
      "response token; clip: mean fraction of tokens with r > 1 + eps_high (for SFT/DFT, what\n"
      "PSFT would have clipped); @step/ood/ent: first evaluation with in-domain accuracy >=\n"
      "%.3f (matched accuracy); RL0/RL: sampled reward on the\n"
      "held-out task prompts before / after RL; RLin: greedy in-domain accuracy after RL;\n"
      "RLclip: mean fraction of tokens clipped in the RL updates.\n",
      matched_target);
}

int run_demo(Settings& st) {
  const auto t0 = Clock::now();
  fs::create_directories(st.out);
  const fs::path cache_dir = st.cache_dir.empty() ? default_cache_dir() : st.cache_dir;
  const fs::path base_path =
      st.base.empty() ? cache_dir / ("gpt-base-" + hex_hash(st.pretrain.key()) + ".pt") : st.base;

  const gpt::Dataset demos = gpt::make_dataset(gpt::Skill::Add, st.demonstrations, /*seed=*/2024);
  const std::vector<gpt::RunSpec> specs = run_specs(st);
  std::int64_t rl_runs = 0;
  for (const auto& s : specs) {
    rl_runs += std::find(st.rl_from.begin(), st.rl_from.end(), s.name) != st.rl_from.end();
  }
  const std::int64_t ft_steps = st.finetune.steps(st.demonstrations);
  Progress progress(st.pretrain.steps + ft_steps * static_cast<std::int64_t>(specs.size()) +
                    st.rl.steps * rl_runs);

  std::printf("psft %s, LibTorch %s, %d threads\n", psft::version(), TORCH_VERSION,
              torch::get_num_threads());
  bool loaded = false;
  gpt::Gpt base = load_or_pretrain(st, base_path, progress, &loaded);
  std::printf("base model: %lld parameters, %s %s\n",
              static_cast<long long>(base->parameter_count()),
              loaded ? "loaded from" : "pretrained and saved to", base_path.c_str());

  const gpt::Evaluator evaluator(base, gpt::Skill::Add, st.eval_per_skill, demos.examples);
  const gpt::Evaluator::Result base_eval = evaluator(base);
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
  std::fflush(stdout);

  CsvLog csv(st.out / "metrics.csv");
  std::vector<RunSummary> runs;
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
    gpt::Gpt tuned =
        gpt::finetune(base, demos, spec, st.finetune, evaluator, [&](const gpt::StepLog& s) {
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
        });
    summary.mean_clip_frac = clip_count ? clip_sum / clip_count : 0.0;
    if (std::find(st.rl_from.begin(), st.rl_from.end(), spec.name) != st.rl_from.end()) {
      std::vector<double> rewards;
      double rl_clip = 0;
      gpt::Gpt after =
          gpt::reinforce(tuned, gpt::Skill::Add, spec.name, st.rl, [&](const gpt::StepLog& s) {
            csv.write(s);
            rewards.push_back(s.reward);
            rl_clip += s.clip_frac_high;
            progress.advance();
            progress.show(spec.name + " RL step " + std::to_string(s.step) + " reward " +
                              fmt(s.reward, 3) + " H " + fmt(s.entropy, 3) + " clip " +
                              fmt(s.clip_frac_high, 3),
                          s.step == st.rl.steps);
          });
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
      summary.rl_initial_reward =
          gpt::sampled_reward(tuned, held_out, st.rl_eval_samples, st.rl.temperature, 4242);
      summary.rl_final_reward =
          gpt::sampled_reward(after, held_out, st.rl_eval_samples, st.rl.temperature, 4242);
      summary.rl_final_accuracy = gpt::accuracy(after, evaluator.per_skill[0]);
    }
    summary.seconds = std::chrono::duration<double>(Clock::now() - r0).count();
    runs.push_back(std::move(summary));
  }
  progress.finish();

  // Matched in-domain accuracy: the highest level every run reached.
  double matched = 1.0;
  for (const RunSummary& r : runs) {
    double best = 0;
    for (const auto& e : r.evals) best = std::max(best, e.second.in_domain);
    matched = std::min(matched, best);
  }
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  write_summary(st.out / "summary.json", st, base_eval, runs, matched, total);
  print_table(base_eval, runs, matched);
  std::printf("\nwrote %s and %s (%.0f s)\n", (st.out / "metrics.csv").c_str(),
              (st.out / "summary.json").c_str(), total);
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
