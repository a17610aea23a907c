#pragma once
/// \file
/// The list of objective rules (Note [Objective rules]): adding a variant is
/// its file in core/objectives/, one case below, an enumerator of RuleId
/// and of psft::Objective, and its tests (docs/objectives.md).

#include "psft/core/config.hpp"
#include "psft/core/objective_rule.hpp"
#include "psft/core/objectives/cispo.hpp"
#include "psft/core/objectives/clipped.hpp"
#include "psft/core/objectives/kl_penalty.hpp"
#include "psft/core/objectives/sapo.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// Calls f(Rule{}) with the rule struct of `id` and returns its result.
template <class F>
inline decltype(auto) visit_rule(RuleId id, F&& f) {
  switch (id) {
    case RuleId::CispoRelative:
      return f(CispoRelativeRule{});
    case RuleId::CispoCapped:
      return f(CispoCappedRule{});
    case RuleId::Sapo:
      return f(SapoRule{});
    case RuleId::KlPenalty:
      return f(KlPenaltyRule{});
    case RuleId::Clipped:
      break;
  }
  return f(ClippedRule{});
}

/// The rule of a loss call's objective.
inline RuleId rule_for(Objective kind) {
  switch (kind) {
    case Objective::CispoRelative:
      return RuleId::CispoRelative;
    case Objective::CispoCapped:
      return RuleId::CispoCapped;
    case Objective::Sapo:
      return RuleId::Sapo;
    case Objective::Clipped:
      break;
  }
  return RuleId::Clipped;
}

/// LossOptions' clip and objective settings in a kernel's accumulation type.
template <class T>
ObjectiveParams<T> objective_params(const LossOptions& opts) {
  const ClipOptions& c = opts.clip;
  const ObjectiveOptions& o = opts.objective;
  ObjectiveParams<T> p{static_cast<T>(c.eps_low), static_cast<T>(c.eps_high),
                       static_cast<T>(c.dual_clip ? *c.dual_clip : 0.0),
                       static_cast<T>(c.log_ratio_clamp), static_cast<T>(c.delta ? *c.delta : 0.0)};
  p.cispo_cap = static_cast<T>(o.cispo_cap);
  p.sapo_tau_pos = static_cast<T>(o.sapo_tau_pos);
  p.sapo_tau_neg = static_cast<T>(o.sapo_tau_neg);
  return p;
}

}  // namespace core
PSFT_NAMESPACE_END
