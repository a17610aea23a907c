/// \file
/// The smallest PSFT training loop: a toy next-token policy fit to fixed
/// demonstrations, once with psft::psft_loss and once with plain SFT (NLL).
///
///   toy_psft [--steps N] [--quick]
///
/// The policy predicts a token over a vocabulary of 32 from the previous
/// token. The demonstrations come from a fixed random "teacher" chain. As in
/// the PSFT recipe, each global batch first records old_logp under the
/// current weights (no grad), then takes several mini-batch optimizer steps;
/// the trust region stops pushing a token once its probability has risen
/// by more than a factor 1 + eps_high since the global batch began
/// (clip_high: the fraction of such tokens; ratio_max: the largest rise).
/// The first step of each global batch has ratio 1 everywhere, so there
/// PSFT is exactly SFT (loss -1).
///
/// Both objectives have the same optimum, the demonstrations' own
/// distribution, so on this toy their final numbers are close; the demo
/// shows the mechanics, not the paper's results.

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <psft/psft.hpp>

namespace {

constexpr std::int64_t kVocab = 32;
constexpr std::int64_t kLength = 24;  // tokens per demonstration
constexpr std::int64_t kDemonstrations = 256;
constexpr std::int64_t kGlobalBatch = 64;  // sequences per old-policy snapshot
constexpr std::int64_t kMiniBatches = 4;   // optimizer steps per global batch
constexpr double kLearningRate = 0.02;     // the same for both runs

/// Logits of the next token given the previous one.
struct PolicyImpl : torch::nn::Module {
  PolicyImpl()
      : embed(register_module("embed", torch::nn::Embedding(kVocab, 32))),
        head(register_module("head", torch::nn::Linear(32, kVocab))) {}
  torch::Tensor forward(const torch::Tensor& previous) {
    return head(torch::tanh(embed(previous)));
  }
  torch::nn::Embedding embed;
  torch::nn::Linear head;
};
TORCH_MODULE(Policy);

struct Demonstrations {
  torch::Tensor tokens;          // [D, kLength + 1], long
  torch::Tensor mask;            // [D, kLength], bool: padding is false
  double teacher_entropy = 0.0;  // of the chain that wrote them, per token
};

/// Sequences of random length from a fixed random bigram chain.
Demonstrations make_demonstrations() {
  const torch::Tensor teacher = torch::softmax(2.5 * torch::randn({kVocab, kVocab}), 1);
  Demonstrations d;
  d.tokens = torch::empty({kDemonstrations, kLength + 1}, torch::kLong);
  d.tokens.select(1, 0).copy_(torch::randint(kVocab, {kDemonstrations}));
  for (std::int64_t t = 0; t < kLength; ++t) {
    const torch::Tensor rows = teacher.index_select(0, d.tokens.select(1, t));
    d.tokens.select(1, t + 1).copy_(torch::multinomial(rows, 1).squeeze(1));
  }
  const torch::Tensor lengths = torch::randint(kLength / 2, kLength + 1, {kDemonstrations, 1});
  d.mask = torch::arange(kLength).unsqueeze(0) < lengths;
  const torch::Tensor row_entropy = -(teacher * teacher.log()).sum(1);
  const torch::Tensor per_token = row_entropy.index_select(0, d.tokens.slice(1, 0, -1).flatten());
  d.teacher_entropy =
      (per_token * d.mask.flatten()).sum().item<double>() / d.mask.sum().item<double>();
  return d;
}

/// Log-probabilities of the demonstrated tokens [B, T] and the policy's
/// entropy at each position [B, T].
std::pair<torch::Tensor, torch::Tensor> score(Policy& policy, const torch::Tensor& tokens) {
  const torch::Tensor log_probs = torch::log_softmax(policy->forward(tokens.slice(1, 0, -1)), -1);
  const torch::Tensor logp = log_probs.gather(-1, tokens.slice(1, 1).unsqueeze(-1)).squeeze(-1);
  const torch::Tensor entropy = -(log_probs.exp() * log_probs).sum(-1);
  return {logp, entropy};
}

double masked_mean(const torch::Tensor& x, const torch::Tensor& mask) {
  return ((x * mask).sum() / mask.sum()).item<double>();
}

/// Trains a fresh policy for `steps` optimizer steps and returns it.
Policy train(const Demonstrations& data, bool use_psft, std::int64_t steps, bool verbose) {
  torch::manual_seed(1);  // the same initial weights for both runs
  Policy policy;
  torch::optim::Adam optimizer(policy->parameters(), torch::optim::AdamOptions(kLearningRate));
  const std::int64_t mini = kGlobalBatch / kMiniBatches;
  torch::Tensor batch_tokens, batch_mask, old_logp;
  for (std::int64_t step = 0; step < steps; ++step) {
    if (step % kMiniBatches == 0) {  // a new global batch: snapshot the old policy
      const torch::Tensor pick = torch::randperm(kDemonstrations).slice(0, 0, kGlobalBatch);
      batch_tokens = data.tokens.index_select(0, pick);
      batch_mask = data.mask.index_select(0, pick);
      torch::NoGradGuard no_grad;
      old_logp = score(policy, batch_tokens).first;
    }
    const std::int64_t begin = (step % kMiniBatches) * mini;
    const torch::Tensor tokens = batch_tokens.slice(0, begin, begin + mini);
    const torch::Tensor mask = batch_mask.slice(0, begin, begin + mini);
    const auto [logp, entropy] = score(policy, tokens);

    torch::Tensor loss;
    if (use_psft) {
      const psft::LossResult r =
          psft::psft_loss(logp, old_logp.slice(0, begin, begin + mini), mask);
      loss = r.loss;
      if (verbose) {
        std::printf("%5lld %9.4f %10.3f %9.3f %9.3f\n", static_cast<long long>(step),
                    loss.item<double>(), r.metrics.clip_frac_high.item<double>(),
                    masked_mean(entropy.detach(), mask), r.metrics.ratio_max.item<double>());
      }
    } else {
      loss = -(logp * mask).sum() / mask.sum();  // SFT: token-mean NLL
    }
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }
  return policy;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 40;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      steps = 8;
    } else if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoll(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  torch::manual_seed(0);
  const Demonstrations data = make_demonstrations();
  std::printf("psft %s: %lld steps, %lld mini-batch steps per global batch of %lld sequences\n",
              psft::version(), static_cast<long long>(steps), static_cast<long long>(kMiniBatches),
              static_cast<long long>(kGlobalBatch));
  std::printf("%5s %9s %10s %9s %9s\n", "step", "loss", "clip_high", "entropy", "ratio_max");
  Policy psft_policy = train(data, /*use_psft=*/true, steps, /*verbose=*/true);
  Policy sft_policy = train(data, /*use_psft=*/false, steps, /*verbose=*/false);

  torch::NoGradGuard no_grad;
  std::printf("\nafter %lld steps on all %lld demonstrations (teacher entropy %.3f):\n",
              static_cast<long long>(steps), static_cast<long long>(kDemonstrations),
              data.teacher_entropy);
  for (auto& [name, policy] : {std::pair<const char*, Policy&>{"PSFT", psft_policy},
                               std::pair<const char*, Policy&>{"SFT ", sft_policy}}) {
    const auto [logp, entropy] = score(policy, data.tokens);
    std::printf("  %s  NLL %.3f  entropy %.3f\n", name, -masked_mean(logp, data.mask),
                masked_mean(entropy, data.mask));
  }
  return 0;
}
