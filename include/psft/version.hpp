#pragma once
/// \file
/// psft's version.

#include "psft/core/config.hpp"

PSFT_NAMESPACE_BEGIN

/// The version as "major.minor.patch".
inline const char* version() { return "0.1.0"; }

PSFT_NAMESPACE_END
