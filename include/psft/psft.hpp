#pragma once
/// \file
/// Umbrella header: everything a LibTorch trainer needs from psft.
///
/// \code
/// #include <psft/psft.hpp>
/// auto result = psft::psft_loss(logp, old_logp, mask);
/// result.loss.backward();
/// \endcode
///
/// The training-loop helpers (OldPolicy, schedules, recipe defaults) use the
/// torch::nn front end and live in <psft/train.hpp>.

#include "psft/backend.hpp"
#include "psft/core/options.hpp"
#include "psft/entropy.hpp"
#include "psft/hidden.hpp"
#include "psft/kl_penalty.hpp"
#include "psft/logits.hpp"
#include "psft/metric_log.hpp"
#include "psft/normaliser.hpp"
#include "psft/policy_loss.hpp"
#include "psft/sft_loss.hpp"
#include "psft/trust_region_monitor.hpp"
#include "psft/version.hpp"
