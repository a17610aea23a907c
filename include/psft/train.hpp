#pragma once
/// \file
/// Training umbrella: the loss API of <psft/psft.hpp> plus the training-loop
/// helpers of psft/train/ (OldPolicy, the SFT warm-up and learning-rate
/// schedules, the recipe defaults). Kept apart from <psft/psft.hpp> because
/// these helpers use the torch::nn front end (Module, Cloneable, optimizers,
/// serialize archives), which costs compile time that a loss-only consumer
/// need not pay. docs/guide.md shows a complete loop.
///
/// \code
/// #include <psft/train.hpp>
/// psft::OldPolicy<MyNet> old(net, {}, score);
/// \endcode

#include "psft/psft.hpp"
#include "psft/train/old_policy.hpp"
#include "psft/train/recipe.hpp"
#include "psft/train/schedule.hpp"
