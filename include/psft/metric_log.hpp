#pragma once
/// \file
/// Every metric of a loss call as host numbers, read in one host-device
/// synchronisation, under psft's names or the names verl and TRL log
/// (docs/math.md, "Metrics", has the table side by side).
///
///   const psft::LogitsLossResult r = psft::psft_loss_from_logits(...);
///   for (const auto& [name, value] : psft::metrics_log(r, psft::MetricNames::Verl))
///     logger.add(name, value);   // actor/pg_clipfrac, actor/ppo_kl, actor/entropy, ...

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>
#include <vector>

#include "psft/core/config.hpp"
#include "psft/logits.hpp"
#include "psft/policy_loss.hpp"
#include "psft/sft_loss.hpp"

PSFT_NAMESPACE_BEGIN

/// Which names metrics_log gives the metrics.
enum class MetricNames {
  /// psft's field names: clip_frac, clip_frac_high, approx_kl_k1, ...
  Psft,
  /// verl's actor metrics (actor/pg_loss, actor/pg_clipfrac,
  /// actor/pg_clipfrac_lower, actor/ppo_kl, actor/entropy); metrics verl
  /// does not log keep psft's name under "psft/".
  Verl,
  /// TRL's GRPOTrainer metrics (loss, clip_ratio/high_mean,
  /// clip_ratio/low_mean, entropy); the others keep psft's name under "psft/".
  Trl,
};

/// (name, value) pairs in a fixed order.
using MetricLog = std::vector<std::pair<std::string, double>>;

namespace detail {

/// One metric: psft's name and its verl and TRL names ("" where the peer
/// does not log it). The one table of peer names.
struct MetricName {
  const char* psft;
  const char* verl;
  const char* trl;
};

inline const MetricName* metric_names(const std::string& psft_name) {
  static const MetricName table[] = {
      {"loss", "actor/pg_loss", "loss"},
      {"clip_frac", "actor/pg_clipfrac", ""},
      {"clip_frac_dual", "actor/pg_clipfrac_lower", ""},
      {"clip_frac_high", "", "clip_ratio/high_mean"},
      {"clip_frac_low", "", "clip_ratio/low_mean"},
      {"approx_kl_k1", "actor/ppo_kl", ""},
      {"approx_kl_k3", "", ""},
      {"ratio_mean", "", ""},
      {"ratio_min", "", ""},
      {"ratio_max", "", ""},
      {"token_count", "", ""},
      {"entropy_mean", "actor/entropy", "entropy"},
      {"nll_mean", "", ""},
  };
  for (const MetricName& n : table) {
    if (psft_name == n.psft) return &n;
  }
  return nullptr;
}

inline std::string metric_name(const std::string& psft_name, MetricNames names) {
  const MetricName* n = metric_names(psft_name);
  const char* peer = nullptr;
  if (n && names == MetricNames::Verl) peer = n->verl;
  if (n && names == MetricNames::Trl) peer = n->trl;
  if (peer == nullptr) return psft_name;
  return *peer ? std::string(peer) : "psft/" + psft_name;
}

/// Reads the 0-d tensors to the host with one synchronisation and names them.
inline MetricLog read_metrics(const char* api,
                              const std::vector<std::pair<const char*, at::Tensor>>& values,
                              MetricNames names) {
  TORCH_CHECK(names == MetricNames::Psft || names == MetricNames::Verl || names == MetricNames::Trl,
              api, ": names must be MetricNames::Psft, Verl or Trl, got the value ",
              static_cast<int>(names));
  std::vector<at::Tensor> flat;
  for (const auto& v : values) {
    TORCH_CHECK(v.second.defined() && v.second.numel() == 1, api, ": metric ", v.first,
                " is not a one-element tensor");
    TORCH_CHECK(v.second.device() == values.front().second.device(), api, ": metric ", v.first,
                " is on ", v.second.device(), ", the others on ", values.front().second.device());
    flat.push_back(v.second.detach().reshape({}).to(at::kDouble));
  }
  const at::Tensor host = at::stack(flat).cpu();  // the one synchronisation
  const double* h = host.data_ptr<double>();
  MetricLog log;
  for (std::size_t i = 0; i < values.size(); ++i) {
    log.emplace_back(metric_name(values[i].first, names), h[i]);
  }
  return log;
}

inline std::vector<std::pair<const char*, at::Tensor>> metric_tensors(const LossMetrics& m) {
  return {{"clip_frac", m.clip_frac},           {"clip_frac_dual", m.clip_frac_dual},
          {"clip_frac_high", m.clip_frac_high}, {"clip_frac_low", m.clip_frac_low},
          {"approx_kl_k1", m.approx_kl_k1},     {"approx_kl_k3", m.approx_kl_k3},
          {"ratio_mean", m.ratio_mean},         {"ratio_min", m.ratio_min},
          {"ratio_max", m.ratio_max},           {"token_count", m.token_count}};
}

}  // namespace detail

/// The trust-region metrics (LossMetrics, e.g. of merge_metrics) as host
/// numbers, one synchronisation.
inline MetricLog metrics_log(const LossMetrics& m, MetricNames names = MetricNames::Psft) {
  return detail::read_metrics("psft::metrics_log", detail::metric_tensors(m), names);
}

/// loss and the trust-region metrics of psft_loss / policy_loss.
inline MetricLog metrics_log(const LossResult& r, MetricNames names = MetricNames::Psft) {
  auto values = detail::metric_tensors(r.metrics);
  values.insert(values.begin(), {"loss", r.loss});
  return detail::read_metrics("psft::metrics_log", values, names);
}

/// loss, the trust-region metrics, entropy_mean and nll_mean of
/// psft_loss_from_logits / policy_loss_from_logits.
inline MetricLog metrics_log(const LogitsLossResult& r, MetricNames names = MetricNames::Psft) {
  auto values = detail::metric_tensors(r.metrics);
  values.insert(values.begin(), {"loss", r.loss});
  values.emplace_back("entropy_mean", r.entropy_mean);
  values.emplace_back("nll_mean", r.nll_mean);
  return detail::read_metrics("psft::metrics_log", values, names);
}

/// loss, token_count, entropy_mean and nll_mean of sft_loss_from_logits.
inline MetricLog metrics_log(const SftLogitsLossResult& r, MetricNames names = MetricNames::Psft) {
  return detail::read_metrics("psft::metrics_log",
                              {{"loss", r.loss},
                               {"token_count", r.token_count},
                               {"entropy_mean", r.entropy_mean},
                               {"nll_mean", r.nll_mean}},
                              names);
}

PSFT_NAMESPACE_END
