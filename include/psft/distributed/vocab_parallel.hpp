#pragma once
/// \file
/// Tensor (vocabulary) parallel log-probabilities and PSFT loss: the LM
/// head is split over the ranks of a group, and each rank holds the logits
/// of a slice [begin, end) of the vocabulary for the same tokens. The
/// results (log p of each label, entropy, loss, metrics) equal those of the
/// unsharded computation on every rank, and backward gives each rank the
/// gradient of its own slice. See docs/distributed.md.
///
///   const auto shard = psft::distributed::VocabShard::even(vocab, rank, world);
///   // logits: [B, T, shard.end - shard.begin], this rank's slice of the LM head
///   auto r = psft::distributed::vocab_parallel_psft_loss_from_logits(
///       logits, labels, old_logp, shard, all_reduce, loss_opts);
///   r.loss.backward();   // logits.grad() is this rank's slice of the full gradient
///
/// Communication: two all-reduces per forward call, none in backward (Note
/// [Vocabulary-parallel softmax]).

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include "psft/autograd/token_logprobs_function.hpp"
#include "psft/backend.hpp"
#include "psft/composed/logits.hpp"
#include "psft/core/config.hpp"
#include "psft/core/logits_options.hpp"
#include "psft/core/online_softmax.hpp"
#include "psft/core/options.hpp"
#include "psft/detail/checks.hpp"
#include "psft/distributed/communicator.hpp"
#include "psft/entropy.hpp"
#include "psft/hidden.hpp"
#include "psft/logits.hpp"
#include "psft/policy_loss.hpp"

PSFT_NAMESPACE_BEGIN
namespace distributed {

/// The slice of the vocabulary whose logits this rank holds: entries
/// [begin, end) of a vocabulary of vocab_size entries. The slices of the
/// ranks of a group must be disjoint and cover the vocabulary.
struct VocabShard {
  /// First vocabulary entry of this rank's slice.
  std::int64_t begin = 0;
  /// One past the last entry of this rank's slice.
  std::int64_t end = 0;
  /// Size V of the whole vocabulary.
  std::int64_t vocab_size = 0;

  /// The usual split of V entries over world_size ranks (as Megatron's
  /// VocabParallelEmbedding when V is divisible): the first V % world_size
  /// ranks hold one entry more than the others. Needs V >= world_size, so
  /// that no slice is empty.
  static VocabShard even(std::int64_t vocab_size, std::int64_t rank, std::int64_t world_size) {
    TORCH_CHECK(world_size >= 1,
                "psft::distributed::VocabShard::even: world_size must be >= 1, got ", world_size);
    TORCH_CHECK(rank >= 0 && rank < world_size,
                "psft::distributed::VocabShard::even: rank must be in [0, ", world_size, "), got ",
                rank);
    TORCH_CHECK(vocab_size >= world_size,
                "psft::distributed::VocabShard::even: vocab_size must be >= world_size (",
                world_size, ") so that no slice is empty, got ", vocab_size);
    const std::int64_t base = vocab_size / world_size, extra = vocab_size % world_size;
    VocabShard s;
    s.begin = rank * base + (rank < extra ? rank : extra);
    s.end = s.begin + base + (rank < extra ? 1 : 0);
    s.vocab_size = vocab_size;
    return s;
  }
};

// Note [Vocabulary-parallel softmax]
// Each rank runs psft's own logits kernel (fused CPU, CUDA or composed) on
// its slice, with the label when it owns it and entry 0 of the slice
// otherwise, and gets per row the slice's core::OnlineSoftmax state {m_r,
// log S_r, A_r / S_r}; the owner of the label also reads its logit z_l.
// The slices are then merged as OnlineSoftmax::merge merges
// blocks, with the all-reduces doing the merging:
//
//   M = max_r m_r                                   (all-reduce 1: max)
//   d_r = m_r - M <= 0,   S_r' = e^{d_r} S_r,   A_r' = S_r' (A_r / S_r + d_r)
//   S = sum_r S_r',  A = sum_r A_r',  y_l = z_l - M  (all-reduce 2: sum)
//   log p(label) = y_l - log S,   H = log S - A / S
//
// (e^{d_r} with the cutoff of Note [Softmax cutoff]), so one all-reduce of
// three numbers per row, [S_r', A_r', y_l on the owner or 0], finishes
// every row on every rank with the same numbers. Everything stays relative
// to the maxima, as in core::OnlineSoftmax: no absolute log-sum-exp is
// formed, so logits of magnitude 1e3 lose no precision and H has no
// cancellation. Backward needs no communication: the kernel's backward reads
// per row {m, log S, A / S}, and {m_r, log S - d_r, A / S - d_r} (the global
// softmax seen from the slice's own max) make it compute d(g log p + h H) /
// dz_j = [j = label] g - p_j (g + h (z_j - E_p z)) for the global softmax p.
// On rows whose label another rank owns, the one-hot term the kernel added
// at entry 0 is removed by recomputing that one entry. The max all-reduce
// also carries a failure flag, and the sum all-reduce the slice widths, so
// that an error on one rank (a bad label, a NaN logit, slices that do not
// cover the vocabulary) is raised on every rank instead of leaving the
// others waiting in a collective.

namespace detail {

/// What the forward pass of one rank produces.
struct VocabParallelForward {
  at::Tensor logp;          ///< labels' shape, accumulation dtype (global log p)
  at::Tensor entropy;       ///< labels' shape, accumulation dtype (global H)
  at::Tensor stats;         ///< [N, 3] {m_r, log S - d_r, A / S - d_r} for backward
  at::Tensor local_labels;  ///< [N] int64: label - begin, 0 if not owned, ignore_index
  at::Tensor not_owned;     ///< [N] bool: scored rows whose label is on another rank
};

/// Checks that need no other rank; throws c10::Error.
inline void check_vocab_parallel_inputs(const char* api, const at::Tensor& logits,
                                        const at::Tensor& labels, const VocabShard& shard,
                                        const LogitsOptions& opts) {
  TORCH_CHECK(shard.vocab_size >= 1, api, ": shard.vocab_size must be >= 1, got ",
              shard.vocab_size);
  TORCH_CHECK(shard.begin >= 0 && shard.begin < shard.end && shard.end <= shard.vocab_size, api,
              ": shard must satisfy 0 <= begin < end <= vocab_size, got [", shard.begin, ", ",
              shard.end, ") of ", shard.vocab_size);
  ::psft::detail::check_float_tensor(api, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, api,
              ": logits must have shape [B, T, V_shard] or [N, V_shard], got ", logits.sizes());
  TORCH_CHECK(logits.size(-1) == shard.end - shard.begin, api,
              ": logits' last dimension must be the shard's width end - begin = ",
              shard.end - shard.begin, ", got ", logits.sizes());
  ::psft::detail::check_labels_and_options(api, logits, labels, opts);
  if (opts.check_inputs) {
    // Global vocabulary bounds; one synchronisation on an accelerator.
    const at::Tensor bad = at::logical_and(labels != opts.ignore_index,
                                           at::logical_or(labels < 0, labels >= shard.vocab_size));
    const std::int64_t count = bad.sum().item<std::int64_t>();
    TORCH_CHECK(count == 0, api, ": labels has ", count, " value(s) outside [0, ", shard.vocab_size,
                ") that are not ignore_index (", opts.ignore_index, ")");
  }
}

/// The forward pass (Note [Vocabulary-parallel softmax]); every rank of the
/// group must call it with the same labels.
inline VocabParallelForward vocab_parallel_forward(const char* api, const at::Tensor& logits,
                                                   const at::Tensor& labels,
                                                   const VocabShard& shard,
                                                   const AllReduce& all_reduce,
                                                   const LogitsOptions& opts, Backend backend) {
  check_all_reduce(api, all_reduce);
  const std::int64_t rows = labels.defined() ? labels.numel() : 0;
  const at::ScalarType acc =
      logits.defined() ? ::psft::detail::logits_accumulate_type(logits.scalar_type()) : at::kFloat;
  const at::TensorOptions acc_options =
      at::TensorOptions().dtype(acc).device(logits.defined() ? logits.device() : at::kCPU);

  // Local pass; a failure is reported to every rank through the max all-reduce.
  VocabParallelForward out;
  at::Tensor local_logp, local_entropy, local_stats, scored;
  std::string local_error;
  try {
    check_vocab_parallel_inputs(api, logits, labels, shard, opts);
    const at::Tensor flat_labels = labels.reshape({-1}).contiguous();
    scored = flat_labels != opts.ignore_index;
    const at::Tensor owned = at::logical_and(
        scored, at::logical_and(flat_labels >= shard.begin, flat_labels < shard.end));
    out.not_owned = at::logical_and(scored, owned.logical_not());
    out.local_labels =
        at::where(owned, flat_labels - shard.begin,
                  at::where(scored, at::zeros({}, flat_labels.options()), flat_labels));
    local_logp = at::empty({rows}, acc_options);
    local_entropy = at::empty({rows}, acc_options);
    local_stats = at::empty({rows, 3}, acc_options);
    ::psft::detail::run_token_logprobs_forward(api, logits.detach(), out.local_labels, opts,
                                               backend, local_logp, local_entropy, local_stats);
  } catch (const std::exception& e) {
    local_error = e.what();
  }

  // All-reduce 1 (max): the slices' maxima, and a failure flag.
  at::Tensor maxes = at::zeros({rows + 1}, acc_options);
  if (local_error.empty()) {
    maxes.narrow(0, 0, rows).copy_(local_stats.select(1, 0));
  } else {
    maxes[rows] = 1;
  }
  all_reduce(maxes, ReduceOp::Max);
  const bool any_failed = maxes[rows].item<double>() != 0;  // synchronisation 1 of 2
  TORCH_CHECK(local_error.empty(), local_error);
  TORCH_CHECK(!any_failed, api,
              ": another rank of the vocabulary-parallel group failed (see its error)");

  // All-reduce 2 (sum): the slices' S and A relative to the global max, the
  // owner's shifted label logit, and the slice widths.
  const double cutoff = composed::softmax_cutoff_for(acc);
  const at::Tensor zero = at::zeros({}, acc_options);
  const at::Tensor m_r = local_stats.select(1, 0);
  const at::Tensor log_sum_r = local_stats.select(1, 1);
  const at::Tensor shift = m_r - maxes.narrow(0, 0, rows);  // d_r <= 0 (0 on ignored rows)
  const at::Tensor sum_r = at::where(shift >= cutoff, (shift + log_sum_r).exp(), zero);
  const at::Tensor weighted_r = sum_r * (local_stats.select(1, 2) + shift);
  // The label's logit as the kernel saw it (same conversion and scaling),
  // shifted once: y_l = z_l - M, as exact as the unsharded z_l - m.
  const at::Tensor label_index = out.local_labels.clamp_min(0).view(labels.sizes()).unsqueeze(-1);
  const at::Tensor z_label =
      composed::scaled_logits(logits.detach().gather(-1, label_index).reshape({rows}), acc, opts);
  const at::Tensor owner_label = at::where(at::logical_and(scored, out.not_owned.logical_not()),
                                           z_label - maxes.narrow(0, 0, rows), zero);
  at::Tensor sums = at::zeros({3 * rows + 1}, acc_options);
  sums.narrow(0, 0, 3 * rows).view({rows, 3}).copy_(at::stack({sum_r, weighted_r, owner_label}, 1));
  sums[3 * rows] = static_cast<double>(shard.end - shard.begin);
  all_reduce(sums, ReduceOp::Sum);
  const double covered = sums[3 * rows].item<double>();  // synchronisation 2 of 2
  TORCH_CHECK(covered == static_cast<double>(shard.vocab_size), api,
              ": the ranks' vocabulary slices add up to ", covered,
              " entries, not vocab_size = ", shard.vocab_size,
              " (every rank must hold a disjoint slice, together all of them)");

  const at::Tensor parts = sums.narrow(0, 0, 3 * rows).view({rows, 3});
  const at::Tensor log_sum = parts.select(1, 0).log();
  const at::Tensor mean_shifted = parts.select(1, 1) / parts.select(1, 0);
  out.logp = at::where(scored, parts.select(1, 2) - log_sum, zero).view(labels.sizes());
  out.entropy = at::where(scored, log_sum - mean_shifted, zero).view(labels.sizes());
  out.stats = at::where(scored.unsqueeze(1),
                        at::stack({m_r, log_sum - shift, mean_shifted - shift}, 1), zero)
                  .contiguous();
  return out;
}

/// The gradient of this rank's logits slice (no communication): the logits
/// kernels' backward with the local labels, then, on rows whose label
/// another rank owns, entry 0 recomputed without the one-hot term the
/// kernel added there (Note [Vocabulary-parallel softmax]).
inline at::Tensor vocab_parallel_backward(const at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& not_owned, const at::Tensor& stats,
                                          const at::Tensor& grad_logp,
                                          const at::Tensor& grad_entropy, const LogitsOptions& opts,
                                          Backend backend) {
  at::Tensor grad_logits =
      ::psft::detail::run_token_logprobs_backward(::psft::detail::vocab_contiguous(logits), labels,
                                                  stats, grad_logp, grad_entropy, opts, backend);
  // Entry 0 of the rows another rank owns, with core::token_logprob_grad's
  // formula p (c0 + c1 y).
  const at::ScalarType acc = stats.scalar_type();
  const double cutoff = composed::softmax_cutoff_for(acc);
  const double inv_temperature = composed::inv_temperature_for(acc, opts.temperature);
  const std::int64_t vocab = logits.size(-1);
  const at::Tensor zero_rows = at::zeros({labels.numel()}, stats.options());
  const at::Tensor g = grad_logp.defined() ? grad_logp : zero_rows;
  const at::Tensor h = grad_entropy.defined() ? grad_entropy : zero_rows;
  const at::Tensor z =
      composed::scaled_logits(logits.detach().select(-1, 0).reshape({-1}), acc, opts);
  const at::Tensor y = z - stats.select(1, 0);
  const at::Tensor t = y - stats.select(1, 1);
  const at::Tensor p = t.clamp_min(cutoff).exp().mul_(t >= cutoff);
  const at::Tensor c0 = (g - h * stats.select(1, 2)) * -inv_temperature;
  const at::Tensor c1 = h * -inv_temperature;
  const at::Tensor entry =
      at::where(p > 0, p * (c0 + c1 * y.clamp_min(cutoff)), at::zeros({}, stats.options()));
  at::Tensor first = grad_logits.view({-1, vocab}).select(1, 0);
  first.copy_(at::where(not_owned, entry.to(grad_logits.scalar_type()), first));
  return grad_logits;
}

/// The vocabulary-parallel logits pass as a from-hidden loss's per-row pass:
/// each chunk's forward is vocab_parallel_forward (two all-reduces), its
/// backward vocab_parallel_backward, and hidden's gradient is summed over
/// the ranks once, after the last chunk.
struct VocabParallelRows : ::psft::detail::RowPass {
  VocabShard shard;      ///< this rank's slice
  AllReduce all_reduce;  ///< over the vocabulary-parallel group
  LogitsOptions opts;    ///< the per-row options
  Backend backend;       ///< the per-row kernels' backend
  /// The last chunk's forward, which its backward reads.
  mutable VocabParallelForward last;

  VocabParallelRows(const VocabShard& s, AllReduce r, const LogitsOptions& o, Backend b)
      : shard(s), all_reduce(std::move(r)), opts(o), backend(b) {}

  void forward(const char* api, std::int64_t, const at::Tensor& logits, const at::Tensor& labels,
               const at::Tensor& logp, const at::Tensor& entropy,
               const at::Tensor& stats) const override {
    last = vocab_parallel_forward(api, logits, labels, shard, all_reduce, opts, backend);
    logp.copy_(last.logp.reshape({-1}));
    entropy.copy_(last.entropy.reshape({-1}));
    if (stats.defined()) stats.copy_(last.stats);
  }

  at::Tensor backward(const at::Tensor& logits, const at::Tensor&, const at::Tensor& stats,
                      const at::Tensor& grad_logp, const at::Tensor& grad_entropy) const override {
    return vocab_parallel_backward(logits, last.local_labels, last.not_owned, stats, grad_logp,
                                   grad_entropy, opts, backend);
  }

  void finish_grad_hidden(at::Tensor& grad_hidden) const override {
    all_reduce(grad_hidden, ReduceOp::Sum);
  }
};

}  // namespace detail

namespace autograd {

/// logp, entropy = VocabParallelTokenLogprobsFunction::apply(logits, labels,
/// shard, all_reduce, opts, backend, api): forward all-reduces (two
/// collectives), backward is local. Gradient flows to this rank's logits
/// slice only; entropy is differentiable only when opts.entropy_grad.
class VocabParallelTokenLogprobsFunction
    : public torch::autograd::Function<VocabParallelTokenLogprobsFunction> {
 public:
  /// Runs detail::vocab_parallel_forward and saves what backward reads.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& labels,
                                                const VocabShard& shard,
                                                const AllReduce& all_reduce,
                                                const LogitsOptions& opts, Backend backend,
                                                const char* api) {
    detail::VocabParallelForward f =
        detail::vocab_parallel_forward(api, logits, labels, shard, all_reduce, opts, backend);
    ctx->save_for_backward({logits, f.local_labels, f.not_owned});
    ::psft::detail::save_logits_backward_state(ctx, f.stats, opts, backend);
    ctx->set_materialize_grads(false);
    if (!opts.entropy_grad) ctx->mark_non_differentiable({f.entropy});
    return {f.logp, f.entropy};
  }

  /// The gradient of this rank's slice; no communication.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "psft: vocab_parallel_token_logprobs does not support double backward "
                "(backward with create_graph=true)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& labels = saved[1];
    const at::Tensor& not_owned = saved[2];
    const ::psft::detail::LogitsBackwardState state =
        ::psft::detail::load_logits_backward_state(ctx);
    const at::Tensor& stats = state.stats;
    const LogitsOptions& opts = state.opts;
    const Backend backend = state.backend;

    const auto flat = [&](const at::Tensor& g) {
      return g.defined() ? g.reshape({-1}).to(stats.scalar_type()).contiguous() : at::Tensor();
    };
    const at::Tensor grad_logp = flat(grads[0]);
    const at::Tensor grad_entropy = opts.entropy_grad ? flat(grads[1]) : at::Tensor();
    at::Tensor grad_logits;
    if (logits.numel() == 0) {
      grad_logits = at::zeros_like(logits);
    } else if (grad_logp.defined() || grad_entropy.defined()) {
      grad_logits = detail::vocab_parallel_backward(logits, labels, not_owned, stats, grad_logp,
                                                    grad_entropy, opts, backend);
    }
    return {grad_logits,    // logits
            at::Tensor(),   // labels (integer)
            at::Tensor(),   // shard (not a tensor)
            at::Tensor(),   // all_reduce (not a tensor)
            at::Tensor(),   // opts (not a tensor)
            at::Tensor(),   // backend (not a tensor)
            at::Tensor()};  // api (not a tensor)
  }
};

}  // namespace autograd

/// log p of each label and the token entropy when the vocabulary is split
/// over the ranks of a group: this rank holds logits[..., shard.begin :
/// shard.end]. Returns, on every rank, the same values as
/// psft::token_logprobs on the whole logits (up to rounding), and backward
/// gives the gradient of this rank's slice. Two all-reduces per call
/// (max over N + 1 numbers, sum over 3 N + 1 numbers, N = labels.numel()),
/// none in backward; two host-device synchronisations (three with
/// check_inputs), one after each all-reduce to raise errors on every rank.
/// Every rank of the group must call it with the same labels.
///
/// \param logits     [B, T, end - begin] or [N, end - begin]: this rank's
///                   slice, any dtype psft::token_logprobs accepts
/// \param labels     int64, logits' shape without the last dimension, global
///                   vocabulary ids in [0, vocab_size) or ignore_index
/// \param shard      this rank's slice of the vocabulary
/// \param all_reduce in-place all-reduce over the vocabulary-parallel group
/// \param opts       as psft::token_logprobs
/// \throws c10::Error on every rank when one rank's inputs are bad (see
///         psft::token_logprobs), or when the slices do not add up to the
///         vocabulary. Each slice must hold a finite logit in every scored
///         row (a slice that is -inf over a row is reported as an error).
inline TokenLogprobs vocab_parallel_token_logprobs(const at::Tensor& logits,
                                                   const at::Tensor& labels,
                                                   const VocabShard& shard,
                                                   const AllReduce& all_reduce,
                                                   const LogitsOptions& opts = {}) {
  const char* api = "psft::distributed::vocab_parallel_token_logprobs";
  TokenLogprobs out;
  out.backend = logits.defined() ? ::psft::detail::logits_backend_for(logits, opts.backend)
                                 : Backend::Composed;
  if (logits.defined() && logits.requires_grad() && torch::autograd::GradMode::is_enabled()) {
    auto outs = autograd::VocabParallelTokenLogprobsFunction::apply(
        logits, labels, shard, all_reduce, opts, out.backend, api);
    out.logp = outs[0];
    out.entropy = outs[1];
  } else {
    detail::VocabParallelForward f =
        detail::vocab_parallel_forward(api, logits, labels, shard, all_reduce, opts, out.backend);
    out.logp = f.logp;
    out.entropy = f.entropy;
  }
  return out;
}

namespace detail {

inline LogitsLossResult vocab_parallel_loss_from_logits(
    const char* api, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const VocabShard& shard, const AllReduce& all_reduce,
    const LossOptions& loss_opts, const LogitsOptions& logits_opts) {
  const LogitsOptions opts =
      ::psft::detail::loss_from_logits_options(api, labels, old_logp, loss_opts, logits_opts);
  const TokenLogprobs t = vocab_parallel_token_logprobs(logits, labels, shard, all_reduce, opts);
  return ::psft::detail::loss_from_token_logprobs(api, t, labels, old_logp, advantages,
                                                  opts.ignore_index, loss_opts);
}

}  // namespace detail

/// psft::psft_loss_from_logits for a vocabulary-sharded LM head: the same
/// loss, metrics, logp and entropy on every rank of the group (the per-token
/// tensors are all-reduced, then every rank computes the loss of the same
/// tokens), and backward gives each rank the gradient of its logits slice.
/// Communication as vocab_parallel_token_logprobs (two all-reduces).
///
/// With data parallelism as well, loss_opts.normaliser comes from the
/// data-parallel group (global_normaliser), all_reduce is the
/// vocabulary-parallel group's.
inline LogitsLossResult vocab_parallel_psft_loss_from_logits(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const VocabShard& shard, const AllReduce& all_reduce, const LossOptions& loss_opts = {},
    const LogitsOptions& logits_opts = {}) {
  return detail::vocab_parallel_loss_from_logits(
      "psft::distributed::vocab_parallel_psft_loss_from_logits", logits, labels, old_logp,
      at::Tensor(), shard, all_reduce, loss_opts, logits_opts);
}

/// psft::policy_loss_from_logits (any advantages, dual clip) for a
/// vocabulary-sharded LM head; otherwise as
/// vocab_parallel_psft_loss_from_logits.
inline LogitsLossResult vocab_parallel_policy_loss_from_logits(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const VocabShard& shard, const AllReduce& all_reduce,
    const LossOptions& loss_opts = {}, const LogitsOptions& logits_opts = {}) {
  TORCH_CHECK(advantages.defined(),
              "psft::distributed::vocab_parallel_policy_loss_from_logits: advantages is an "
              "undefined tensor (use vocab_parallel_psft_loss_from_logits for A = 1)");
  return detail::vocab_parallel_loss_from_logits(
      "psft::distributed::vocab_parallel_policy_loss_from_logits", logits, labels, old_logp,
      advantages, shard, all_reduce, loss_opts, logits_opts);
}

namespace detail {

inline LogitsLossResult vocab_parallel_loss_from_hidden(
    const char* api, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& old_logp, const at::Tensor& advantages, const VocabShard& shard,
    const AllReduce& all_reduce, const LossOptions& loss_opts, const HiddenOptions& hidden_opts) {
  check_all_reduce(api, all_reduce);
  // Every check before the first collective; a failure reaches every rank
  // through one all-reduce of a flag, so that none waits in a chunk's.
  std::string local_error;
  ::psft::detail::ClippedHiddenLoss c;
  try {
    TORCH_CHECK(loss_opts.objective.ratio_level != RatioLevel::Sequence, api,
                ": objective.ratio_level = Sequence (GSPO) needs every token before any gradient; "
                "with a sharded head use vocab_parallel_policy_loss_from_logits");
    TORCH_CHECK(shard.vocab_size >= 1 && shard.begin >= 0 && shard.begin < shard.end &&
                    shard.end <= shard.vocab_size,
                api, ": shard must satisfy 0 <= begin < end <= vocab_size, got [", shard.begin,
                ", ", shard.end, ") of ", shard.vocab_size);
    TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(0) == shard.end - shard.begin,
                api, ": weight must be this rank's rows of the LM head, [end - begin, H] = [",
                shard.end - shard.begin, ", H], got ",
                weight.defined() ? weight.sizes() : at::IntArrayRef{});
    c = ::psft::detail::check_clipped_hidden_loss(api, hidden, weight, labels, old_logp, advantages,
                                                  loss_opts, hidden_opts, shard.vocab_size);
  } catch (const std::exception& e) {
    local_error = e.what();
  }
  at::Tensor failed = at::full(
      {1}, local_error.empty() ? 0.0 : 1.0,
      at::TensorOptions().dtype(at::kFloat).device(hidden.defined() ? hidden.device() : at::kCPU));
  all_reduce(failed, ReduceOp::Max);
  const bool any_failed = failed.item<double>() != 0;
  TORCH_CHECK(local_error.empty(), local_error);
  TORCH_CHECK(!any_failed, api,
              ": another rank of the vocabulary-parallel group failed (see its error)");
  const VocabParallelRows rows(shard, all_reduce, c.opts, c.plan.backend);
  c.plan.rows = &rows;
  return ::psft::detail::run_clipped_hidden_loss(c, hidden, weight, labels, old_logp, advantages,
                                                 loss_opts);
}

}  // namespace detail

/// psft::psft_loss_from_hidden for an LM head whose weight rows are sharded
/// over the ranks of a group (Megatron's layout): this rank holds rows
/// [shard.begin, shard.end) of the [V, H] weight (and of the bias, in
/// hidden_opts.bias), and every rank the same hidden state and labels. Each
/// chunk's logits slice goes through the vocabulary-parallel pass (two
/// all-reduces per chunk, of N_chunk + 1 and 3 N_chunk + 1 numbers); after
/// the last chunk hidden's gradient is summed over the ranks with one
/// all-reduce of [N, H], as a tensor-parallel LM head does, so every rank
/// gets the full gradient of hidden and the gradient of its own weight (and
/// bias) rows. One more all-reduce, of one number, before the first chunk
/// makes an error on any rank an error on every rank. The loss, metrics,
/// logp and entropy equal psft_loss_from_hidden's on the whole head, on
/// every rank. Every rank must call it with the same labels, old_logp and
/// options, and with hidden requiring a gradient on all ranks or on none.
/// objective.ratio_level = Sequence is refused (use the from-logits form).
inline LogitsLossResult vocab_parallel_psft_loss_from_hidden(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& old_logp, const VocabShard& shard, const AllReduce& all_reduce,
    const LossOptions& loss_opts = {}, const HiddenOptions& hidden_opts = {}) {
  return detail::vocab_parallel_loss_from_hidden(
      "psft::distributed::vocab_parallel_psft_loss_from_hidden", hidden, weight, labels, old_logp,
      at::Tensor(), shard, all_reduce, loss_opts, hidden_opts);
}

/// psft::policy_loss_from_hidden (any advantages) for a sharded LM head;
/// otherwise as vocab_parallel_psft_loss_from_hidden.
inline LogitsLossResult vocab_parallel_policy_loss_from_hidden(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& old_logp, const at::Tensor& advantages, const VocabShard& shard,
    const AllReduce& all_reduce, const LossOptions& loss_opts = {},
    const HiddenOptions& hidden_opts = {}) {
  TORCH_CHECK(advantages.defined(),
              "psft::distributed::vocab_parallel_policy_loss_from_hidden: advantages is an "
              "undefined tensor (use vocab_parallel_psft_loss_from_hidden for A = 1)");
  return detail::vocab_parallel_loss_from_hidden(
      "psft::distributed::vocab_parallel_policy_loss_from_hidden", hidden, weight, labels, old_logp,
      advantages, shard, all_reduce, loss_opts, hidden_opts);
}

}  // namespace distributed
PSFT_NAMESPACE_END
