// Test-only Python bindings over psft's public API, for tests/peers/check_peers.py,
// which compares psft with the real verl and TRL code. Built by
// torch.utils.cpp_extension.load (JIT) against the tools environment's torch;
// thin wrappers only: settings come in as Python dicts with the peers' own
// key names, and every result goes back as tensors so that autograd runs
// through psft's own backward.

#include <torch/python.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>

#include "psft/compat/trl.hpp"
#include "psft/compat/verl.hpp"
#include "psft/psft.hpp"

namespace py = pybind11;

namespace {

// Reads the keys of a settings dict, failing on a key that no wrapper reads
// (a typo in the check would otherwise test the defaults silently).
class Settings {
 public:
  Settings(const char* what, const py::dict& dict) : what_(what), dict_(dict) {}

  template <typename T>
  void read(const char* key, T& out) {
    seen_.insert(key);
    if (dict_.contains(key)) out = dict_[key].cast<T>();
  }

  // Absent: the struct's default; None: unset (std::nullopt), as the
  // peer's None.
  template <typename T>
  void read(const char* key, std::optional<T>& out) {
    seen_.insert(key);
    if (!dict_.contains(key)) return;
    if (dict_[key].is_none()) {
      out = std::nullopt;
    } else {
      out = dict_[key].cast<T>();
    }
  }

  void finish() const {
    for (const auto& item : dict_) {
      const std::string key = item.first.cast<std::string>();
      TORCH_CHECK(seen_.count(key) != 0, what_, ": unknown key '", key, "'");
    }
  }

 private:
  const char* what_;
  const py::dict& dict_;
  std::set<std::string> seen_;
};

psft::compat::verl::ActorSettings actor_settings(const py::dict& d) {
  Settings s("verl actor settings", d);
  psft::compat::verl::ActorSettings a;
  s.read("loss_agg_mode", a.loss_agg_mode);
  s.read("clip_ratio", a.clip_ratio);
  s.read("clip_ratio_low", a.clip_ratio_low);
  s.read("clip_ratio_high", a.clip_ratio_high);
  s.read("clip_ratio_c", a.clip_ratio_c);
  s.read("loss_scale_factor", a.loss_scale_factor);
  s.read("loss_mode", a.loss_mode);
  s.read("tau_pos", a.tau_pos);
  s.read("tau_neg", a.tau_neg);
  s.finish();
  return a;
}

psft::compat::verl::GlobalBatchInfo global_batch_info(const py::dict& d) {
  Settings s("verl global_batch_info", d);
  psft::compat::verl::GlobalBatchInfo g;
  s.read("batch_num_tokens", g.batch_num_tokens);
  s.read("global_batch_size", g.global_batch_size);
  s.read("dp_size", g.dp_size);
  s.finish();
  return g;
}

psft::compat::trl::GrpoSettings grpo_settings(const py::dict& d) {
  Settings s("TRL GRPO settings", d);
  psft::compat::trl::GrpoSettings g;
  s.read("loss_type", g.loss_type);
  s.read("epsilon", g.epsilon);
  s.read("epsilon_high", g.epsilon_high);
  s.read("delta", g.delta);
  s.read("max_completion_length", g.max_completion_length);
  s.read("num_processes", g.num_processes);
  s.read("steps_per_generation", g.steps_per_generation);
  s.read("importance_sampling_level", g.importance_sampling_level);
  s.read("sapo_temperature_pos", g.sapo_temperature_pos);
  s.read("sapo_temperature_neg", g.sapo_temperature_neg);
  s.finish();
  return g;
}

psft::compat::trl::SftSettings sft_settings(const py::dict& d) {
  Settings s("TRL SFT settings", d);
  psft::compat::trl::SftSettings t;
  s.read("loss_type", t.loss_type);
  s.read("average_tokens_across_devices", t.average_tokens_across_devices);
  s.read("num_processes", t.num_processes);
  s.finish();
  return t;
}

const char* reduction_name(psft::Reduction r) {
  switch (r) {
    case psft::Reduction::TokenMean:
      return "TokenMean";
    case psft::Reduction::SeqMeanTokenSum:
      return "SeqMeanTokenSum";
    case psft::Reduction::SeqMeanTokenMean:
      return "SeqMeanTokenMean";
    case psft::Reduction::SeqMeanTokenSumNorm:
      return "SeqMeanTokenSumNorm";
    case psft::Reduction::TokenSum:
      return "TokenSum";
    case psft::Reduction::TokenSumNorm:
      return "TokenSumNorm";
  }
  return "?";
}

const char* objective_name(psft::Objective k) {
  switch (k) {
    case psft::Objective::Clipped:
      return "Clipped";
    case psft::Objective::CispoRelative:
      return "CispoRelative";
    case psft::Objective::CispoCapped:
      return "CispoCapped";
    case psft::Objective::Sapo:
      return "Sapo";
  }
  return "?";
}

const char* kl_estimator_name(psft::KlEstimator k) {
  switch (k) {
    case psft::KlEstimator::K1:
      return "K1";
    case psft::KlEstimator::Abs:
      return "Abs";
    case psft::KlEstimator::K2:
      return "K2";
    case psft::KlEstimator::K3:
      return "K3";
    case psft::KlEstimator::K3Unclamped:
      return "K3Unclamped";
    case psft::KlEstimator::K1StraightThrough:
      return "K1StraightThrough";
    case psft::KlEstimator::AbsStraightThrough:
      return "AbsStraightThrough";
    case psft::KlEstimator::K3StraightThrough:
      return "K3StraightThrough";
  }
  return "?";
}

// The options a preset produced, for the check's report.
py::dict describe(const psft::LossOptions& o) {
  py::dict d;
  d["eps_low"] = o.clip.eps_low;
  d["eps_high"] = o.clip.eps_high;
  d["dual_clip"] = o.clip.dual_clip ? py::cast(*o.clip.dual_clip) : py::none();
  d["delta"] = o.clip.delta ? py::cast(*o.clip.delta) : py::none();
  d["log_ratio_clamp"] = o.clip.log_ratio_clamp;
  d["reduction"] = reduction_name(o.reduction);
  d["norm_constant"] = o.norm_constant ? py::cast(*o.norm_constant) : py::none();
  d["count_empty_sequences"] = o.count_empty_sequences;
  d["objective"] = objective_name(o.objective.kind);
  d["ratio_level"] = o.objective.ratio_level == psft::RatioLevel::Sequence ? "Sequence" : "Token";
  d["cispo_cap"] = o.objective.cispo_cap;
  d["sapo_tau_pos"] = o.objective.sapo_tau_pos;
  d["sapo_tau_neg"] = o.objective.sapo_tau_neg;
  if (o.normaliser) {
    const psft::Normaliser& n = *o.normaliser;
    d["tokens"] = n.tokens ? py::cast(*n.tokens) : py::none();
    d["sequences"] = n.sequences ? py::cast(*n.sequences) : py::none();
    d["world_size"] = n.world_size;
  }
  return d;
}

py::dict metrics_dict(const psft::LossMetrics& m) {
  py::dict d;
  d["clip_frac"] = m.clip_frac;
  d["clip_frac_dual"] = m.clip_frac_dual;
  d["clip_frac_high"] = m.clip_frac_high;
  d["clip_frac_low"] = m.clip_frac_low;
  d["approx_kl_k1"] = m.approx_kl_k1;
  d["approx_kl_k3"] = m.approx_kl_k3;
  d["ratio_mean"] = m.ratio_mean;
  d["ratio_min"] = m.ratio_min;
  d["ratio_max"] = m.ratio_max;
  d["token_count"] = m.token_count;
  return d;
}

py::dict loss_result(const psft::LossResult& r, const psft::LossOptions& opts) {
  py::dict d;
  d["loss"] = r.loss;
  d["metrics"] = metrics_dict(r.metrics);
  d["options"] = describe(opts);
  return d;
}

py::dict verl_policy_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                          const at::Tensor& advantages, const at::Tensor& mask,
                          const py::dict& actor, const py::dict& info) {
  const psft::LossOptions opts =
      psft::compat::verl::loss_options(actor_settings(actor), global_batch_info(info));
  return loss_result(psft::policy_loss(logp, old_logp, advantages, mask, opts), opts);
}

// verl's use_kl_loss term: psft::kl_penalty with the estimator of verl's
// kl_loss_type, aggregated with the actor's options (loss_agg_mode and the
// global batch info, as verl's ppo_loss passes them to agg_loss).
py::dict verl_kl_penalty(const at::Tensor& logp, const at::Tensor& ref_logp, const at::Tensor& mask,
                         const std::string& kl_loss_type, const py::dict& actor,
                         const py::dict& info) {
  const psft::LossOptions opts =
      psft::compat::verl::loss_options(actor_settings(actor), global_batch_info(info));
  const psft::KlEstimator estimator = psft::compat::verl::kl_estimator(kl_loss_type);
  const psft::KlPenaltyResult r = psft::kl_penalty(logp, ref_logp, mask, estimator, opts);
  py::dict d;
  d["loss"] = r.loss;
  d["kl_mean"] = r.kl_mean;
  d["estimator"] = kl_estimator_name(estimator);
  d["options"] = describe(opts);
  return d;
}

// verl's agg_loss alone: sft_loss (Nll) on logp = -loss_mat aggregates the
// per-token values loss_mat with the preset's reduction, the code every psft
// loss shares.
py::dict verl_agg_loss(const at::Tensor& loss_mat, const at::Tensor& mask, const py::dict& actor,
                       const py::dict& info) {
  const psft::LossOptions opts =
      psft::compat::verl::loss_options(actor_settings(actor), global_batch_info(info));
  const psft::SftLossResult r = psft::sft_loss(-loss_mat, mask, psft::SftVariant::Nll, opts);
  py::dict d;
  d["loss"] = r.loss;
  d["options"] = describe(opts);
  return d;
}

// The PSFT recipe preset end to end from logits: policy_loss_from_logits with
// the given advantages (1 for PSFT) and the sampling temperature.
py::dict verl_psft_recipe_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                      const at::Tensor& old_logp, const at::Tensor& advantages,
                                      double temperature) {
  const psft::LossOptions opts = psft::compat::verl::psft_recipe();
  psft::LogitsOptions logits_opts;
  logits_opts.temperature = temperature;
  const psft::LogitsLossResult r =
      psft::policy_loss_from_logits(logits, labels, old_logp, advantages, opts, logits_opts);
  py::dict d;
  d["loss"] = r.loss;
  d["metrics"] = metrics_dict(r.metrics);
  d["logp"] = r.logp;
  d["entropy"] = r.entropy;
  d["options"] = describe(opts);
  return d;
}

py::dict token_logprobs(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                        bool entropy_grad) {
  psft::LogitsOptions opts;
  opts.temperature = temperature;
  opts.entropy_grad = entropy_grad;
  const psft::TokenLogprobs t = psft::token_logprobs(logits, labels, opts);
  py::dict d;
  d["logp"] = t.logp;
  d["entropy"] = t.entropy;
  return d;
}

py::dict trl_grpo_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                       const at::Tensor& advantages, const at::Tensor& completion_mask,
                       const py::dict& settings, std::optional<double> num_items_in_batch,
                       std::int64_t gradient_accumulation_steps,
                       const std::optional<at::Tensor>& ref_logp, double beta) {
  psft::compat::trl::GrpoBatch batch;
  batch.completion_mask = completion_mask;
  batch.num_items_in_batch = num_items_in_batch;
  batch.gradient_accumulation_steps = gradient_accumulation_steps;
  const psft::LossOptions opts =
      psft::compat::trl::grpo_loss_options(grpo_settings(settings), batch);
  const psft::LossResult pg = psft::policy_loss(logp, old_logp, advantages, completion_mask, opts);
  if (beta == 0.0) return loss_result(pg, opts);
  // TRL's beta term (compat/trl.hpp): kl_penalty with K3Unclamped and the
  // same options, times beta, added to the policy loss.
  TORCH_CHECK(ref_logp.has_value(), "trl_grpo_loss: beta != 0 needs ref_logp");
  const psft::KlPenaltyResult kl =
      psft::kl_penalty(logp, *ref_logp, completion_mask, psft::KlEstimator::K3Unclamped, opts);
  psft::LossResult total = pg;
  total.loss = pg.loss + beta * kl.loss;
  py::dict d = loss_result(total, opts);
  d["kl_mean"] = kl.kl_mean;
  return d;
}

py::dict trl_sft_loss(const at::Tensor& logp, const at::Tensor& mask, const py::dict& settings,
                      std::optional<double> num_items_in_batch) {
  const psft::compat::trl::SftSettings s = sft_settings(settings);
  const psft::LossOptions opts = psft::compat::trl::sft_loss_options(s, num_items_in_batch, mask);
  const psft::SftLossResult r = psft::sft_loss(logp, mask, psft::compat::trl::sft_variant(s), opts);
  py::dict d;
  d["loss"] = r.loss;
  d["nll_mean"] = r.nll_mean;
  d["token_count"] = r.token_count;
  d["options"] = describe(opts);
  return d;
}

py::dict trl_sft_loss_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                  const py::dict& settings,
                                  std::optional<double> num_items_in_batch) {
  const psft::compat::trl::SftSettings s = sft_settings(settings);
  const psft::LossOptions opts =
      psft::compat::trl::sft_loss_options(s, num_items_in_batch, labels != -100);
  const psft::SftLogitsLossResult r =
      psft::sft_loss_from_logits(logits, labels, psft::compat::trl::sft_variant(s), opts);
  py::dict d;
  d["loss"] = r.loss;
  d["logp"] = r.logp;
  d["entropy"] = r.entropy;
  d["options"] = describe(opts);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "psft test bindings for the peer checks (tests/peers/check_peers.py)";
  m.def("verl_policy_loss", &verl_policy_loss, py::arg("logp"), py::arg("old_logp"),
        py::arg("advantages"), py::arg("mask"), py::arg("actor"), py::arg("info"));
  m.def("verl_kl_penalty", &verl_kl_penalty, py::arg("logp"), py::arg("ref_logp"), py::arg("mask"),
        py::arg("kl_loss_type"), py::arg("actor"), py::arg("info"));
  m.def("verl_agg_loss", &verl_agg_loss, py::arg("loss_mat"), py::arg("mask"), py::arg("actor"),
        py::arg("info"));
  m.def("verl_psft_recipe_from_logits", &verl_psft_recipe_from_logits, py::arg("logits"),
        py::arg("labels"), py::arg("old_logp"), py::arg("advantages"), py::arg("temperature"));
  m.def("token_logprobs", &token_logprobs, py::arg("logits"), py::arg("labels"),
        py::arg("temperature"), py::arg("entropy_grad"));
  m.def("trl_grpo_loss", &trl_grpo_loss, py::arg("logp"), py::arg("old_logp"),
        py::arg("advantages"), py::arg("completion_mask"), py::arg("settings"),
        py::arg("num_items_in_batch"), py::arg("gradient_accumulation_steps"),
        py::arg("ref_logp") = py::none(), py::arg("beta") = 0.0);
  m.def("trl_sft_loss", &trl_sft_loss, py::arg("logp"), py::arg("mask"), py::arg("settings"),
        py::arg("num_items_in_batch"));
  m.def("trl_sft_loss_from_logits", &trl_sft_loss_from_logits, py::arg("logits"), py::arg("labels"),
        py::arg("settings"), py::arg("num_items_in_batch"));
}
