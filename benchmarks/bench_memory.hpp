#pragma once
// Helpers shared by the CPU benchmarks: the peak resident memory of one
// call, and the CPU model for the figures' record. Linux; elsewhere the
// peak reads -1 and the model "unknown".

#include <fstream>
#include <sstream>
#include <string>

#include "psft/cpu/gradient_buffers.hpp"

namespace psft_bench {

/// A field of /proc/self/status in bytes (VmRSS, VmHWM), or -1.
inline double status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      std::istringstream value(line.substr(prefix.size()));
      double kb = -1;
      value >> kb;
      return kb * 1024.0;
    }
  }
  return -1;
}

/// Resets the high-water mark of resident memory to the current value.
inline bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return out.good();
}

/// Peak resident bytes of fn() above the resident bytes before it, or -1
/// (the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs
/// before the call and read after it). The gradient memory psft keeps for
/// reuse is released first, so that the peak counts a gradient's allocation
/// as a training loop's first step does.
template <class F>
double peak_extra_bytes(F&& fn) {
  psft::cpu::release_gradient_buffers();
  if (!reset_peak_rss()) {
    fn();
    return -1;
  }
  const double before = status_bytes("VmRSS");
  fn();
  const double peak = status_bytes("VmHWM");
  return before < 0 || peak < 0 ? -1 : peak - before;
}

/// /proc/cpuinfo's first "model name", or "unknown".
inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, 10, "model name") != 0) continue;
    const std::size_t colon = line.find(':');
    if (colon == std::string::npos) break;
    const std::size_t start = line.find_first_not_of(" \t", colon + 1);
    return start == std::string::npos ? "unknown" : line.substr(start);
  }
  return "unknown";
}

}  // namespace psft_bench
