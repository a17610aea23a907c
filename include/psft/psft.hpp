#pragma once
/// \file
/// Umbrella header: everything a LibTorch trainer needs from psft.
///
///   #include <psft/psft.hpp>
///   auto result = psft::psft_loss(logp, old_logp, mask);
///   result.loss.backward();

#include "psft/backend.hpp"
#include "psft/core/options.hpp"
#include "psft/entropy.hpp"
#include "psft/logits.hpp"
#include "psft/normaliser.hpp"
#include "psft/policy_loss.hpp"
#include "psft/version.hpp"
