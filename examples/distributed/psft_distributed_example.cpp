// psft on torch.distributed (c10d): one process per rank, Gloo on the CPU.
//
//   scripts/run-distributed.sh 3            # 3 local ranks, FileStore
//   torchrun --nproc-per-node 3 build/main/examples/psft_distributed_example   # or any launcher
//
// Rank and world size come from RANK and WORLD_SIZE; the rendezvous is a
// FileStore at PSFT_STORE_FILE when set, otherwise a TCPStore at
// MASTER_ADDR:MASTER_PORT (what torchrun sets).
//
// Part 1, data parallel: a tiny LM head is replicated on every rank; each
// rank has micro-batches of its own, with different token counts. The
// step's normaliser is counted globally (one all-reduce), each micro-batch
// loss is backpropagated, then the gradients are averaged over the ranks as
// DDP does; Normaliser::world_size compensates DDP's division, so every
// rank steps with the full-batch gradient. Metrics are reduced as global
// sum / count.
//
// Part 2, vocabulary (tensor) parallel: the LM head's rows are split over
// the ranks; every rank computes the logits of its vocabulary slice for the
// same tokens, and psft combines the slices with two all-reduces. The loss
// is the same on every rank; each rank gets the gradient of its slice.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "psft/distributed/c10d.hpp"
#include "psft/psft.hpp"

namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

c10::intrusive_ptr<c10d::ProcessGroup> make_group(int rank, int world) {
  c10::intrusive_ptr<c10d::Store> store;
  if (const char* path = std::getenv("PSFT_STORE_FILE")) {
    store = c10::make_intrusive<c10d::FileStore>(path, world);
  } else {
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(env_int("MASTER_PORT", 29500));
    options.isServer = rank == 0;
    options.numWorkers = world;
    const char* host = std::getenv("MASTER_ADDR");
    store = c10::make_intrusive<c10d::TCPStore>(host ? host : "127.0.0.1", options);
  }
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  return group;
}

constexpr std::int64_t kHidden = 16, kVocab = 50, kLength = 12;

// One micro-batch: hidden states, labels (ignore_index on the prompt and
// the padding) and old log-probabilities.
struct MicroBatch {
  at::Tensor hidden, labels, old_logp;
};

MicroBatch make_batch(at::Generator& gen, std::int64_t batch, const at::Tensor& head) {
  MicroBatch mb;
  mb.hidden = at::randn({batch, kLength, kHidden}, gen);
  mb.labels = at::randint(0, kVocab, {batch, kLength}, gen, at::TensorOptions().dtype(at::kLong));
  const at::Tensor length = at::randint(1, kLength + 1, {batch, 1}, gen, mb.labels.options());
  const at::Tensor t = at::arange(kLength, mb.labels.options()).unsqueeze(0);
  mb.labels = at::where(t < length, mb.labels, at::full({}, -100, mb.labels.options()));
  at::NoGradGuard no_grad;
  mb.old_logp = psft::token_logprobs(at::matmul(mb.hidden, head.t()), mb.labels).logp;
  return mb;
}

}  // namespace

int main() {
  const int rank = env_int("RANK", 0), world = env_int("WORLD_SIZE", 1);
  const auto group = make_group(rank, world);
  const auto all_reduce = psft::distributed::c10d_all_reduce(group);

  // The same initial head on every rank (same seed).
  at::Generator init = at::detail::createCPUGenerator(0);
  at::Tensor head = (at::randn({kVocab, kHidden}, init) * 0.1).requires_grad_(true);

  // ---- Part 1: data parallel --------------------------------------------
  at::Generator data = at::detail::createCPUGenerator(100 + rank);  // each rank its own data
  std::vector<MicroBatch> micro_batches;
  for (int i = 0; i < 1 + rank % 2; ++i) micro_batches.push_back(make_batch(data, 2 + rank, head));

  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> masks;
    for (const MicroBatch& mb : micro_batches) masks.push_back(mb.labels != -100);
    psft::LossOptions opts;
    opts.normaliser = psft::distributed::global_normaliser(masks, group);  // one all-reduce

    double local_loss = 0.0;
    std::vector<psft::LossMetrics> metrics;
    for (const MicroBatch& mb : micro_batches) {
      const at::Tensor logits = at::matmul(mb.hidden, head.t());
      const auto r = psft::psft_loss_from_logits(logits, mb.labels, mb.old_logp, opts);
      r.loss.backward();
      local_loss += r.loss.item<double>();
      metrics.push_back(r.metrics);
    }
    // What DDP does after backward: average the gradients over the ranks.
    at::Tensor grad = head.grad();
    all_reduce(grad, psft::distributed::ReduceOp::Sum);
    grad.div_(world);
    const psft::LossMetrics global = psft::distributed::reduce_metrics(metrics, group);
    at::Tensor loss = at::full({1}, local_loss, at::TensorOptions().dtype(at::kDouble));
    all_reduce(loss, psft::distributed::ReduceOp::Sum);
    if (rank == 0) {
      std::printf(
          "data parallel  step %d: N = %.0f tokens, S = %.0f sequences over %d ranks, "
          "loss %.6f, |grad| %.6f, clip_frac_high %.4f, approx_kl_k3 %.2e\n",
          step, *opts.normaliser->tokens, *opts.normaliser->sequences, world,
          loss.item<double>() / world, grad.norm().item<double>(),
          global.clip_frac_high.item<double>(), global.approx_kl_k3.item<double>());
    }
    {
      at::NoGradGuard no_grad;
      head.sub_(grad, 0.5);
      head.mutable_grad().zero_();
    }
  }

  // ---- Part 2: vocabulary parallel -------------------------------------
  const auto shard = psft::distributed::VocabShard::even(kVocab, rank, world);
  at::Tensor head_slice =
      head.detach().narrow(0, shard.begin, shard.end - shard.begin).clone().requires_grad_(true);
  at::Generator shared = at::detail::createCPUGenerator(7);  // the same tokens on every rank
  const MicroBatch mb = make_batch(shared, 4, head.detach());
  for (int step = 0; step < 3; ++step) {
    const at::Tensor logits_slice = at::matmul(mb.hidden, head_slice.t());  // [B, T, V / world]
    const auto r = psft::distributed::vocab_parallel_psft_loss_from_logits(
        logits_slice, mb.labels, mb.old_logp, shard, group);
    r.loss.backward();  // head_slice.grad(): this rank's rows of the full gradient
    std::printf(
        "vocab parallel step %d, rank %d (vocabulary [%lld, %lld)): loss %.6f, "
        "entropy %.4f, |grad of slice| %.6f\n",
        step, rank, static_cast<long long>(shard.begin), static_cast<long long>(shard.end),
        r.loss.item<double>(), r.entropy_mean.item<double>(),
        head_slice.grad().norm().item<double>());
    at::NoGradGuard no_grad;
    head_slice.sub_(head_slice.grad(), 0.5);
    head_slice.mutable_grad().zero_();
  }
  return 0;
}
