#pragma once
// Runs psft's CUDA kernels (include/psft/cuda/*.cuh) on the CPU, so that
// their code is executed and checked on machines without a GPU. For tests
// only; include it before any CUDA header and before psft/cuda/*.cuh, in a
// translation unit compiled by the host compiler.
//
// Note [CUDA kernels emulated on the CPU]
// A launch runs the grid's blocks one after another. The threads of a block
// are fibers (ucontext) on the calling thread: each runs until its next
// __syncthreads() or its end, then the next one runs. So
//   - __shared__ variables are `static` (one copy, used by one block at a
//     time), and threadIdx / blockIdx / blockDim / gridDim are globals set
//     before each fiber resumes;
//   - a barrier that some threads of a block reach and others skip (by
//     returning early or at a different __syncthreads call) is an error, not
//     a hang: CUDA leaves such code undefined;
//   - the order in which blocks, and threads between two barriers, run is
//     chosen by Options::order. A kernel whose threads race between barriers,
//     or whose blocks depend on each other's order, gives different results
//     under different orders; the tests compare them bit for bit.
//   - atomics are plain read-modify-writes and __threadfence() does nothing:
//     one block runs at a time, to completion, so every block sees every
//     write of the blocks that ran before it. A kernel whose blocks combine
//     their results through arrival counters (the last block to arrive sums
//     the others') therefore runs, and a result that depends on which block
//     arrived last shows up as order dependence.
// Not emulated: warps (shuffles, votes, warp-synchronous code), concurrent
// blocks, the memory model across blocks (a missing __threadfence() goes
// unnoticed), and timing. psft's kernels use no warp-level code. Device
// math functions are the host's (exp may differ from CUDA's by an ulp, and
// ex2.approx from exp2f by a few).

#if defined(__CUDACC__)
#error "cuda_emulator.hpp is for host compilers; nvcc compiles the real kernels"
#endif

// The CUDA headers keep these definitions (host_defines.h defines each only
// when it is not defined yet).
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() ::cuda_emulator::sync_threads(__LINE__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>  // exp and isfinite for float and double, unqualified, as in CUDA
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMULATOR_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMULATOR_ASAN 1
#endif
#endif
#if defined(CUDA_EMULATOR_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

/// CUDA's device intrinsics, on the host.
inline float __uint_as_float(unsigned int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
/// Loads through the read-only cache, and bypassing L1, on the device:
/// plain loads here.
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
/// Atomics on the device; blocks run one at a time, and fibers switch only
/// at barriers, here.
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old + value;
  return old;
}
inline unsigned int atomicOr(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old | value;
  return old;
}
/// Orders a thread's writes for other blocks; they run later here anyway.
inline void __threadfence() {}

// Built-in variables; set by the scheduler before a fiber runs.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emulator {

/// Order in which blocks, and threads between barriers, run.
enum class Order { Forward, Reverse, Shuffled };

struct Options {
  Order order = Order::Forward;
  std::uint64_t seed = 1;  ///< for Order::Shuffled
  /// Run only these blocks (all of the grid when empty), e.g. the few that
  /// touch the elements of interest in a huge grid.
  std::vector<unsigned> blocks;
};

/// A kernel broke a rule the emulator checks (barrier divergence).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

enum class State { Runnable, AtBarrier, Done };

/// Fiber stack size: psft's kernels keep a few hundred bytes per thread; the
/// rest is for sanitizer redzones and the host's math library.
constexpr std::size_t kStackBytes = std::size_t(256) << 10;

/// The threads of the block that is running.
struct Block {
  ucontext_t scheduler{};
  std::vector<ucontext_t> fibers;
  std::unique_ptr<char[]> stacks;
  std::vector<State> state;
  std::vector<int> barrier_line;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
#if defined(CUDA_EMULATOR_ASAN)
  const void* scheduler_stack = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

inline Block*& running() {
  static Block* block = nullptr;
  return block;
}

/// Switches from the running fiber to the scheduler; `finished` when the
/// fiber will not be resumed.
inline void yield_to_scheduler(Block& b, bool finished) {
#if defined(CUDA_EMULATOR_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, b.scheduler_stack,
                                 b.scheduler_stack_size);
#else
  (void)finished;
#endif
  swapcontext(&b.fibers[b.current], &b.scheduler);
#if defined(CUDA_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
}

inline void fiber_main() {
  Block& b = *running();
#if defined(CUDA_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  b.state[b.current] = State::Done;
  yield_to_scheduler(b, true);
}

inline void resume(Block& b, unsigned thread) {
  b.current = thread;
  threadIdx = uint3{thread, 0, 0};
#if defined(CUDA_EMULATOR_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, b.stacks.get() + std::size_t(thread) * kStackBytes,
                                 kStackBytes);
#endif
  swapcontext(&b.scheduler, &b.fibers[thread]);
#if defined(CUDA_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

inline void arrange(std::vector<unsigned>& items, const Options& o, std::mt19937_64& rng) {
  if (o.order == Order::Reverse) std::reverse(items.begin(), items.end());
  if (o.order == Order::Shuffled) std::shuffle(items.begin(), items.end(), rng);
}

/// Makes thread t's fiber start the kernel from the beginning.
inline void start_fiber(Block& b, unsigned t) {
  ucontext_t& f = b.fibers[t];
  getcontext(&f);
  f.uc_stack.ss_sp = b.stacks.get() + std::size_t(t) * kStackBytes;
  f.uc_stack.ss_size = kStackBytes;
  f.uc_link = nullptr;
  makecontext(&f, fiber_main, 0);
  b.state[t] = State::Runnable;
}

/// Runs one block to completion.
inline void run_block(Block& b, unsigned threads, const Options& o, std::mt19937_64& rng) {
  for (unsigned t = 0; t < threads; ++t) start_fiber(b, t);
  std::vector<unsigned> order(threads);
  for (;;) {
    std::iota(order.begin(), order.end(), 0u);
    arrange(order, o, rng);
    for (unsigned t : order)
      if (b.state[t] == State::Runnable) resume(b, t);
    if (b.error) std::rethrow_exception(b.error);
    unsigned waiting = 0, done = 0;
    int line = -1;
    bool same_line = true;
    for (unsigned t = 0; t < threads; ++t) {
      if (b.state[t] == State::Done) ++done;
      if (b.state[t] != State::AtBarrier) continue;
      if (waiting++ == 0) line = b.barrier_line[t];
      same_line = same_line && b.barrier_line[t] == line;
    }
    if (waiting == 0) return;
    const std::string where = "block " + std::to_string(blockIdx.x) + ": ";
    if (!same_line)
      throw Error(where + "threads wait at different __syncthreads() calls (line " +
                  std::to_string(line) + " and others)");
    if (done > 0)
      throw Error(where + std::to_string(waiting) +
                  " threads wait at the __syncthreads() of line " + std::to_string(line) +
                  " that " + std::to_string(done) + " threads skipped");
    for (unsigned t = 0; t < threads; ++t) b.state[t] = State::Runnable;
  }
}

/// Runs `body` as a 1-D grid of `grid` blocks of `threads` threads.
inline void run(unsigned grid, unsigned threads, const Options& o,
                const std::function<void()>& body) {
  if (threads == 0 || threads > 1024)
    throw std::invalid_argument("cuda_emulator: blockDim.x must be in [1, 1024]");
  if (running()) throw std::logic_error("cuda_emulator: a kernel launched from a kernel");
  Block b;
  b.fibers.resize(threads);
  b.stacks.reset(new char[std::size_t(threads) * kStackBytes]);
  b.state.assign(threads, State::Done);
  b.barrier_line.assign(threads, -1);
  b.body = &body;

  std::vector<unsigned> blocks = o.blocks;
  if (blocks.empty()) {
    blocks.resize(grid);
    std::iota(blocks.begin(), blocks.end(), 0u);
  }
  for (unsigned block : blocks)
    if (block >= grid) throw std::invalid_argument("cuda_emulator: block index past the grid");
  std::mt19937_64 rng(o.seed);
  arrange(blocks, o, rng);

  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(threads, 1, 1);
  running() = &b;
  try {
    for (unsigned block : blocks) {
      blockIdx = uint3{block, 0, 0};
      run_block(b, threads, o, rng);
    }
  } catch (...) {
    running() = nullptr;
    throw;
  }
  running() = nullptr;
}

}  // namespace detail

/// kernel<<<grid, threads>>>(args...), emulated (Note [CUDA kernels emulated
/// on the CPU]). Arguments are copied into the kernel's by-value parameters.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, const Options& o,
            const Args&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: wrong number of kernel arguments");
  const std::function<void()> body = [&] { kernel(args...); };
  detail::run(grid, threads, o, body);
}

/// The barrier: the calling fiber waits until every thread of its block
/// reaches the same __syncthreads().
inline void sync_threads(int line) {
  detail::Block* b = detail::running();
  if (!b) throw std::logic_error("cuda_emulator: __syncthreads() outside a kernel");
  b->state[b->current] = detail::State::AtBarrier;
  b->barrier_line[b->current] = line;
  detail::yield_to_scheduler(*b, false);
}

}  // namespace cuda_emulator
