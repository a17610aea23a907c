#pragma once
/// \file
/// Validation of option values, shared by the LibTorch API (which raises
/// c10::Error) and the Eigen API (which throws std::invalid_argument).
/// Returns an empty string when the options are valid.

#include <cmath>
#include <sstream>
#include <string>

#include "psft/core/config.hpp"
#include "psft/core/options.hpp"

PSFT_NAMESPACE_BEGIN
namespace core {

/// The reduction's enumerator name ("TokenMean", ...), for messages.
inline const char* reduction_name(Reduction r) {
  switch (r) {
    case Reduction::TokenMean:
      return "TokenMean";
    case Reduction::SeqMeanTokenSum:
      return "SeqMeanTokenSum";
    case Reduction::SeqMeanTokenMean:
      return "SeqMeanTokenMean";
    case Reduction::SeqMeanTokenSumNorm:
      return "SeqMeanTokenSumNorm";
    case Reduction::TokenSum:
      return "TokenSum";
    case Reduction::TokenSumNorm:
      return "TokenSumNorm";
  }
  return "?";
}

/// Whether r is one of Reduction's enumerators (a value cast from a config
/// integer may not be).
inline bool is_valid(Reduction r) {
  switch (r) {
    case Reduction::TokenMean:
    case Reduction::SeqMeanTokenSum:
    case Reduction::SeqMeanTokenMean:
    case Reduction::SeqMeanTokenSumNorm:
    case Reduction::TokenSum:
    case Reduction::TokenSumNorm:
      return true;
  }
  return false;
}

/// Whether b is one of Backend's enumerators.
inline bool is_valid(Backend b) {
  switch (b) {
    case Backend::Auto:
    case Backend::FusedCpu:
    case Backend::FusedCuda:
    case Backend::Composed:
      return true;
  }
  return false;
}

/// Whether o is one of Objective's enumerators.
inline bool is_valid(Objective o) {
  switch (o) {
    case Objective::Clipped:
    case Objective::CispoRelative:
    case Objective::CispoCapped:
    case Objective::Sapo:
      return true;
  }
  return false;
}

/// Whether l is one of RatioLevel's enumerators.
inline bool is_valid(RatioLevel l) { return l == RatioLevel::Token || l == RatioLevel::Sequence; }

/// Why `o` is invalid for per-token inputs of `dim` dimensions, or "".
inline std::string objective_options_error(const ObjectiveOptions& o, int dim) {
  std::ostringstream e;
  if (!is_valid(o.kind)) {
    e << "objective.kind must be a psft::Objective enumerator (Clipped, CispoRelative, "
         "CispoCapped or Sapo), got the value "
      << static_cast<int>(o.kind);
  } else if (!is_valid(o.ratio_level)) {
    e << "objective.ratio_level must be RatioLevel::Token or RatioLevel::Sequence, got the value "
      << static_cast<int>(o.ratio_level);
  } else if (o.ratio_level == RatioLevel::Sequence && dim != 2) {
    e << "objective.ratio_level Sequence (GSPO) needs per-token tensors of shape [B, T] to know "
         "the sequences, got "
      << dim << " dimension(s)";
  } else if (!(std::isfinite(o.cispo_cap) && o.cispo_cap > 0)) {
    e << "objective.cispo_cap must be finite and > 0, got " << o.cispo_cap;
  } else if (!(std::isfinite(o.sapo_tau_pos) && o.sapo_tau_pos > 0)) {
    e << "objective.sapo_tau_pos must be finite and > 0, got " << o.sapo_tau_pos;
  } else if (!(std::isfinite(o.sapo_tau_neg) && o.sapo_tau_neg > 0)) {
    e << "objective.sapo_tau_neg must be finite and > 0, got " << o.sapo_tau_neg;
  }
  return e.str();
}

/// Whether the reduction divides by the sequence count S (and so needs
/// per-token tensors of shape [B, T]).
inline bool uses_sequences(Reduction r) {
  return r == Reduction::SeqMeanTokenSum || r == Reduction::SeqMeanTokenMean ||
         r == Reduction::SeqMeanTokenSumNorm;
}

/// Why `c` is invalid, or "" if it is valid.
inline std::string clip_options_error(const ClipOptions& c) {
  std::ostringstream e;
  if (!(std::isfinite(c.eps_low) && c.eps_low >= 0 && c.eps_low < 1)) {
    e << "clip.eps_low must be in [0, 1), got " << c.eps_low;
  } else if (!(std::isfinite(c.eps_high) && c.eps_high >= 0)) {
    e << "clip.eps_high must be finite and >= 0, got " << c.eps_high;
  } else if (c.dual_clip && !(std::isfinite(*c.dual_clip) && *c.dual_clip > 1)) {
    e << "clip.dual_clip (c) must be finite and > 1, got " << *c.dual_clip;
  } else if (!(std::isfinite(c.log_ratio_clamp) && c.log_ratio_clamp > 0)) {
    e << "clip.log_ratio_clamp must be finite and > 0, got " << c.log_ratio_clamp;
  } else if (c.delta && !(std::isfinite(*c.delta) && *c.delta > 1 + c.eps_high)) {
    e << "clip.delta must be finite and > 1 + eps_high = " << 1 + c.eps_high << ", got "
      << *c.delta;
  }
  return e.str();
}

/// Why `opts` is invalid for per-token inputs of `dim` dimensions, or "".
inline std::string loss_options_error(const LossOptions& opts, int dim) {
  std::string clip_error = clip_options_error(opts.clip);
  if (!clip_error.empty()) return clip_error;
  std::string objective_error = objective_options_error(opts.objective, dim);
  if (!objective_error.empty()) return objective_error;
  if (!std::isfinite(opts.entropy_coeff)) {
    return "entropy_coeff must be finite, got " + std::to_string(opts.entropy_coeff);
  }
  std::ostringstream e;
  if (!is_valid(opts.reduction)) {
    e << "reduction must be a psft::Reduction enumerator (TokenMean, SeqMeanTokenSum, "
         "SeqMeanTokenMean, SeqMeanTokenSumNorm, TokenSum or TokenSumNorm), got the value "
      << static_cast<int>(opts.reduction);
    return e.str();
  }
  if (!is_valid(opts.backend)) {
    e << "backend must be a psft::Backend enumerator (Auto, FusedCpu, FusedCuda or Composed), "
         "got the value "
      << static_cast<int>(opts.backend);
    return e.str();
  }
  const char* name = reduction_name(opts.reduction);
  if (uses_sequences(opts.reduction) && dim != 2) {
    e << "reduction " << name
      << " needs per-token tensors of shape [B, T] to know the sequences, got " << dim
      << " dimension(s)";
    return e.str();
  }
  if (opts.norm_constant && !(std::isfinite(*opts.norm_constant) && *opts.norm_constant > 0)) {
    e << "norm_constant must be finite and > 0, got " << *opts.norm_constant;
    return e.str();
  }
  if (!opts.normaliser) return {};
  const Normaliser& n = *opts.normaliser;
  if (n.world_size < 1) {
    e << "normaliser.world_size must be >= 1, got " << n.world_size;
    return e.str();
  }
  const char* count_name = nullptr;
  const std::optional<double>* count = nullptr;
  switch (opts.reduction) {
    case Reduction::TokenMean:
      count_name = "tokens";
      count = &n.tokens;
      break;
    case Reduction::SeqMeanTokenSum:
    case Reduction::SeqMeanTokenMean:
    case Reduction::SeqMeanTokenSumNorm:
      count_name = "sequences";
      count = &n.sequences;
      break;
    case Reduction::TokenSum:
    case Reduction::TokenSumNorm:
      return {};  // no count: a sum, or a constant C
  }
  if (!count->has_value()) {
    e << "normaliser." << count_name << " is needed by reduction " << name
      << " but unset; refusing to fall back to this micro-batch's own count";
  } else if (!(std::isfinite(**count) && **count >= 0)) {
    e << "normaliser." << count_name << " must be finite and >= 0, got " << **count;
  }
  return e.str();
}

}  // namespace core
PSFT_NAMESPACE_END
