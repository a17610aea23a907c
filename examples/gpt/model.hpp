#pragma once
/// \file
/// A small GPT-style decoder in the LibTorch C++ front end: token and
/// position embeddings, pre-LayerNorm blocks of causal multi-head
/// self-attention and a GELU MLP, a final LayerNorm and a linear head.

#include <torch/torch.h>

#include <cmath>
#include <cstdint>

namespace gpt {

/// Size of the model.
struct GptConfig {
  std::int64_t vocab = 0;    ///< tokens
  std::int64_t context = 0;  ///< longest sequence
  std::int64_t dim = 64;     ///< model width
  std::int64_t heads = 4;    ///< attention heads (dim must divide)
  std::int64_t layers = 2;   ///< transformer blocks
};

/// One pre-LayerNorm transformer block. Cloneable, so that psft::OldPolicy
/// can keep a frozen copy of the model (its Snapshot and Ema strategies).
struct BlockImpl : torch::nn::Cloneable<BlockImpl> {
  BlockImpl(std::int64_t dim, std::int64_t heads) : dim(dim), heads(heads) { reset(); }

  void reset() override {
    ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
    ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", torch::nn::Linear(dim, 4 * dim));
    fc2 = register_module("fc2", torch::nn::Linear(4 * dim, dim));
  }

  /// x: [B, T, dim]; causal: [T, T] bool, true where attention is allowed.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& causal) {
    const std::int64_t b = x.size(0), t = x.size(1), hd = dim / heads;
    // [B, T, 3, H, hd] -> [3, B, H, T, hd]
    const torch::Tensor parts = qkv(ln1(x)).view({b, t, 3, heads, hd}).permute({2, 0, 3, 1, 4});
    const torch::Tensor q = parts[0], k = parts[1], v = parts[2];
    torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    att = torch::softmax(att.masked_fill(causal.logical_not(), -1e9), -1);
    const torch::Tensor y = torch::matmul(att, v).transpose(1, 2).reshape({b, t, dim});
    torch::Tensor h = x + proj(y);
    return h + fc2(torch::gelu(fc1(ln2(h))));
  }

  std::int64_t dim, heads;
  torch::nn::LayerNorm ln1{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  torch::nn::LayerNorm ln2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Block);

/// The decoder: logits [B, T, vocab] from token ids [B, T] (forward), or the
/// last hidden state for a loss with the LM head fused in (hidden).
struct GptImpl : torch::nn::Cloneable<GptImpl> {
  explicit GptImpl(const GptConfig& c) : config(c) {
    TORCH_CHECK(c.dim % c.heads == 0, "gpt: dim ", c.dim, " is not a multiple of heads ", c.heads);
    reset();
    // GPT-2's initialisation: N(0, 0.02) weights, zero biases.
    torch::NoGradGuard no_grad;
    for (auto& p : named_parameters()) {
      if (p.key().find("ln") != std::string::npos) continue;
      if (p.key().find("bias") != std::string::npos) {
        p.value().zero_();
      } else {
        p.value().normal_(0.0, 0.02);
      }
    }
  }

  void reset() override {
    token_embedding =
        register_module("token_embedding", torch::nn::Embedding(config.vocab, config.dim));
    position_embedding =
        register_module("position_embedding", torch::nn::Embedding(config.context, config.dim));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < config.layers; ++i)
      blocks->push_back(Block(config.dim, config.heads));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.dim})));
    head = register_module("head", torch::nn::Linear(config.dim, config.vocab));
  }

  /// The last hidden state ln_f(x), [B, T, dim], from token ids [B, T]: what
  /// the LM head reads, and what psft's from-hidden losses take together
  /// with head->weight ([vocab, dim]) and head->bias ([vocab]).
  torch::Tensor hidden(const torch::Tensor& ids) {
    const std::int64_t t = ids.size(1);
    TORCH_CHECK(t <= config.context, "gpt: sequence of ", t, " tokens, context is ",
                config.context);
    const torch::Tensor positions = torch::arange(t, ids.options());
    const torch::Tensor causal = torch::ones({t, t}, ids.options().dtype(torch::kBool)).tril();
    torch::Tensor x = token_embedding(ids) + position_embedding(positions);
    for (const auto& block : *blocks) x = block->as<Block>()->forward(x, causal);
    return ln_f(x);
  }

  /// Logits [B, T, vocab] from token ids [B, T].
  torch::Tensor forward(const torch::Tensor& ids) { return head(hidden(ids)); }

  std::int64_t parameter_count() {
    std::int64_t n = 0;
    for (const auto& p : parameters()) n += p.numel();
    return n;
  }

  GptConfig config;
  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Gpt);

/// A deep copy of `model` (its own parameters).
inline Gpt clone_model(const Gpt& model) {
  return Gpt(std::dynamic_pointer_cast<GptImpl>(model->clone()));
}

}  // namespace gpt
