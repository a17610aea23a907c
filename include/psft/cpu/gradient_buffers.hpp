#pragma once
/// \file
/// Reused memory for the CPU kernels' vocabulary-sized gradients
/// (Note [Gradient buffers]): cpu::empty_gradient hands out a tensor whose
/// memory, once the tensor dies, is kept for the next gradient of about the
/// same size instead of going back to the system. release_gradient_buffers
/// frees what is kept.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(_WIN32)
#include <malloc.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "psft/core/config.hpp"

// Note [Gradient buffers]
// A fresh [tokens, V] gradient costs more than writing it: glibc maps a
// buffer that large straight from the kernel and unmaps it on free, so
// every step's first touch of each 4 KiB page is a page fault in which the
// kernel zeroes the page, one extra pass over the gradient's bytes plus the
// faults' own cost (measured: a third of a from-logits forward + backward
// at [4096, 32000]). empty_gradient keeps the memory of a dead gradient
// (at most kKeptBuffers blocks) and gives it to the next request that fits
// in it (a block of b bytes serves requests of b / 2 to b bytes), so a
// training loop's gradients of one shape reuse one block and touch no new
// page after the first step. New blocks are 2 MiB aligned and advised as
// transparent huge pages (Linux, madvise(MADV_HUGEPAGE); a system with THP
// off ignores the advice), which makes the first step's faults 512 times
// fewer. Requests under kMinBytes go to at::empty. The kept blocks stay
// resident between steps, as a GPU caching allocator's do: that is memory
// a step would allocate anyway, and release_gradient_buffers() gives it
// back. PSFT_GRADIENT_BUFFERS=0 in the environment (read once) turns the
// reuse and the advice off.

PSFT_NAMESPACE_BEGIN
namespace cpu {

namespace gradient_detail {

/// Requests below this many bytes are left to at::empty.
constexpr std::size_t kMinBytes = std::size_t(2) << 20;
/// Blocks are multiples of this, and aligned to it (a huge page).
constexpr std::size_t kBlockAlign = std::size_t(2) << 20;
/// Dead blocks kept for reuse.
constexpr std::size_t kKeptBuffers = 2;

/// The kept blocks. Never destroyed (a tensor may die after static
/// destructors have run), so that returning a block is always safe.
struct Pool {
  std::mutex mutex;                                 ///< guards kept
  std::vector<std::pair<std::size_t, void*>> kept;  ///< (bytes, block) of dead buffers
};

inline Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

/// Whether PSFT_GRADIENT_BUFFERS allows reuse (unset or anything but "0").
inline bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("PSFT_GRADIENT_BUFFERS");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

/// A new block of `bytes` (a multiple of kBlockAlign), advised as huge pages.
inline void* allocate_block(std::size_t bytes) {
#if defined(_WIN32)
  void* block = _aligned_malloc(bytes, kBlockAlign);
  if (!block) throw std::bad_alloc();
#else
  void* block = nullptr;
  if (posix_memalign(&block, kBlockAlign, bytes) != 0) throw std::bad_alloc();
#endif
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(block, bytes, MADV_HUGEPAGE);  // advice: a refusal changes nothing
#endif
  return block;
}

/// Frees a block of allocate_block.
inline void free_block(void* block) {
#if defined(_WIN32)
  _aligned_free(block);
#else
  std::free(block);
#endif
}

/// A dead buffer's block: kept, or freed when kKeptBuffers larger ones are.
inline void return_block(void* block, std::size_t bytes) {
  Pool& p = pool();
  void* to_free = block;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.kept.emplace_back(bytes, block);
    if (p.kept.size() > kKeptBuffers) {
      // Free the smallest: the largest serve the most requests.
      const auto smallest = std::min_element(p.kept.begin(), p.kept.end());
      to_free = smallest->second;
      p.kept.erase(smallest);
    } else {
      to_free = nullptr;
    }
  }
  if (to_free) free_block(to_free);
}

/// A kept block of b bytes with bytes <= b <= 2 bytes (the smallest such),
/// taken out of the pool, or null.
inline std::pair<std::size_t, void*> take_block(std::size_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  auto best = p.kept.end();
  for (auto it = p.kept.begin(); it != p.kept.end(); ++it) {
    if (it->first >= bytes && it->first / 2 <= bytes &&
        (best == p.kept.end() || it->first < best->first)) {
      best = it;
    }
  }
  if (best == p.kept.end()) return {0, nullptr};
  const std::pair<std::size_t, void*> found = *best;
  p.kept.erase(best);
  return found;
}

}  // namespace gradient_detail

/// An uninitialised contiguous CPU tensor for a gradient of `sizes`, in
/// memory reused from earlier gradients where one fits (Note [Gradient
/// buffers]). Behaves as at::empty's result: the memory goes back to the
/// pool when the last tensor sharing it dies.
inline at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  std::int64_t numel = 1;
  for (const std::int64_t s : sizes) numel *= s;
  const std::size_t bytes = static_cast<std::size_t>(numel) *
                            c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < gradient_detail::kMinBytes || !gradient_detail::enabled()) {
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  }
  std::pair<std::size_t, void*> block = gradient_detail::take_block(bytes);
  if (!block.second) {
    const std::size_t rounded = (bytes + gradient_detail::kBlockAlign - 1) /
                                gradient_detail::kBlockAlign * gradient_detail::kBlockAlign;
    block = {rounded, gradient_detail::allocate_block(rounded)};
  }
  const std::size_t block_bytes = block.first;
  return at::from_blob(
      block.second, sizes,
      [block_bytes](void* data) { gradient_detail::return_block(data, block_bytes); }, options);
}

/// Frees the memory kept for gradients (Note [Gradient buffers]); the
/// gradients alive now are not affected. Returns the bytes freed.
inline std::size_t release_gradient_buffers() {
  gradient_detail::Pool& p = gradient_detail::pool();
  std::vector<std::pair<std::size_t, void*>> kept;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    kept.swap(p.kept);
  }
  std::size_t freed = 0;
  for (const auto& [bytes, block] : kept) {
    freed += bytes;
    gradient_detail::free_block(block);
  }
  return freed;
}

/// Bytes kept for reuse now (Note [Gradient buffers]).
inline std::size_t kept_gradient_bytes() {
  gradient_detail::Pool& p = gradient_detail::pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  std::size_t total = 0;
  for (const auto& kept : p.kept) total += kept.first;
  return total;
}

}  // namespace cpu
PSFT_NAMESPACE_END
