#pragma once
/// \file
/// Synthetic multi-skill data for the GPT demo, generated in-process.
///
/// Every example is a prompt and a response over a small character
/// vocabulary. The prompt names the skill with an upper-case letter and gives
/// the input; the response is a separator, the answer and a terminator:
///
///   A37+45=82.     add two numbers below 100
///   Rkdfa:afdk;    reverse a word
///   Sdbca>abcd.    sort a word's letters
///   Nabz~bca;      shift each letter to the next one (z wraps to a)
///
/// The separator (one of = : > ~) and the terminator (. or ;) are drawn at
/// random for each demonstration: they are the free part of the response,
/// where a policy that keeps its entropy still spreads its probability, and
/// a policy that memorised its demonstrations does not. The answer itself is
/// determined by the prompt; the exact-match checker reads the answer between
/// any separator and any terminator.

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <psft/psft.hpp>

namespace gpt {

/// Token 0 is padding; the rest are the characters the skills use.
inline const std::string& vocabulary() {
  static const std::string v = "_0123456789abcdefghijklmnopqrstuvwxyz+=:>~.;ARSN";
  return v;
}
inline std::int64_t vocab_size() { return static_cast<std::int64_t>(vocabulary().size()); }
inline std::int64_t token_of(char c) {
  const auto pos = vocabulary().find(c);
  TORCH_CHECK(pos != std::string::npos, "gpt: character '", c, "' is not in the vocabulary");
  return static_cast<std::int64_t>(pos);
}
inline char char_of(std::int64_t t) {
  return (t >= 0 && t < vocab_size()) ? vocabulary()[static_cast<std::size_t>(t)] : '?';
}

constexpr const char* kSeparators = "=:>~";
constexpr const char* kTerminators = ".;";
inline bool is_separator(char c) {
  return c != '\0' && std::string(kSeparators).find(c) != std::string::npos;
}
inline bool is_terminator(char c) {
  return c != '\0' && std::string(kTerminators).find(c) != std::string::npos;
}

/// Tokens per sequence (prompt + response), padding included.
constexpr std::int64_t kContext = 16;

enum class Skill { Add = 0, Reverse = 1, Sort = 2, Next = 3 };
constexpr int kSkillCount = 4;
inline const char* skill_name(Skill s) {
  static const char* names[] = {"add", "reverse", "sort", "next"};
  return names[static_cast<int>(s)];
}

/// One example: the prompt, the answer, and one rendering of the response.
struct Example {
  Skill skill = Skill::Add;
  std::string prompt;    ///< e.g. "A37+45"
  std::string answer;    ///< e.g. "82"
  std::string response;  ///< e.g. "=82."
};

/// A random example of `skill`; the response's separator and terminator are
/// random too.
inline Example make_example(Skill skill, std::mt19937_64& rng) {
  Example e;
  e.skill = skill;
  auto letter = [&] {
    return static_cast<char>('a' + std::uniform_int_distribution<int>(0, 25)(rng));
  };
  auto word = [&] {
    const int n = std::uniform_int_distribution<int>(3, 5)(rng);
    std::string w;
    for (int i = 0; i < n; ++i) w += letter();
    return w;
  };
  switch (skill) {
    case Skill::Add: {
      const int a = std::uniform_int_distribution<int>(0, 99)(rng);
      const int b = std::uniform_int_distribution<int>(0, 99)(rng);
      e.prompt = "A" + std::to_string(a) + "+" + std::to_string(b);
      e.answer = std::to_string(a + b);
      break;
    }
    case Skill::Reverse: {
      const std::string w = word();
      e.prompt = "R" + w;
      e.answer = std::string(w.rbegin(), w.rend());
      break;
    }
    case Skill::Sort: {
      const std::string w = word();
      e.prompt = "S" + w;
      e.answer = w;
      std::sort(e.answer.begin(), e.answer.end());
      break;
    }
    case Skill::Next: {
      const std::string w = word();
      e.prompt = "N" + w;
      for (char c : w) e.answer += static_cast<char>(c == 'z' ? 'a' : c + 1);
      break;
    }
  }
  const char sep = kSeparators[std::uniform_int_distribution<int>(0, 3)(rng)];
  const char term = kTerminators[std::uniform_int_distribution<int>(0, 1)(rng)];
  e.response = std::string(1, sep) + e.answer + std::string(1, term);
  return e;
}

/// Whether `completion` (the generated response) is a correct answer: a
/// separator, exactly the answer, a terminator. Anything after the
/// terminator is ignored.
inline bool exact_match(const Example& e, const std::string& completion) {
  if (completion.size() < e.answer.size() + 2) return false;
  if (!is_separator(completion[0])) return false;
  const std::size_t end = completion.find_first_of(kTerminators, 1);
  if (end == std::string::npos) return false;
  return completion.substr(1, end - 1) == e.answer;
}

/// Examples as tensors: ids [N, kContext] (prompt + response + padding) and
/// the response mask [N, kContext] (true on the response's tokens).
struct Batch {
  torch::Tensor ids;            ///< int64 [N, kContext]
  torch::Tensor response_mask;  ///< bool [N, kContext]
  torch::Tensor prompt_length;  ///< int64 [N]
  torch::Tensor labels;         ///< int64 [N, kContext]: psft::shift_labels(ids, response_mask)
  std::int64_t size() const { return ids.size(0); }
  Batch rows(std::int64_t begin, std::int64_t end) const {
    return {ids.slice(0, begin, end), response_mask.slice(0, begin, end),
            prompt_length.slice(0, begin, end), labels.slice(0, begin, end)};
  }
  Batch select(const torch::Tensor& index) const {
    return {ids.index_select(0, index), response_mask.index_select(0, index),
            prompt_length.index_select(0, index), labels.index_select(0, index)};
  }
};

/// The examples as a Batch (they must fit in kContext tokens).
inline Batch to_batch(const std::vector<Example>& examples) {
  const auto n = static_cast<std::int64_t>(examples.size());
  torch::Tensor ids = torch::zeros({n, kContext}, torch::kLong);
  torch::Tensor mask = torch::zeros({n, kContext}, torch::kBool);
  torch::Tensor plen = torch::zeros({n}, torch::kLong);
  auto id = ids.accessor<std::int64_t, 2>();
  auto m = mask.accessor<bool, 2>();
  auto pl = plen.accessor<std::int64_t, 1>();
  for (std::int64_t i = 0; i < n; ++i) {
    const Example& e = examples[static_cast<std::size_t>(i)];
    const std::string text = e.prompt + e.response;
    TORCH_CHECK(static_cast<std::int64_t>(text.size()) <= kContext, "gpt: example '", text,
                "' is longer than the context");
    for (std::size_t t = 0; t < text.size(); ++t) {
      id[i][static_cast<std::int64_t>(t)] = token_of(text[t]);
      m[i][static_cast<std::int64_t>(t)] = t >= e.prompt.size();
    }
    pl[i] = static_cast<std::int64_t>(e.prompt.size());
  }
  torch::Tensor labels = psft::shift_labels(ids, mask);
  return {ids, mask, plen, labels};
}

/// A list of examples and their tensors.
struct Dataset {
  std::vector<Example> examples;
  Batch batch;
};

inline Dataset make_dataset(const std::vector<Skill>& skills, const std::vector<double>& weights,
                            std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  Dataset d;
  d.examples.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    d.examples.push_back(make_example(skills[static_cast<std::size_t>(pick(rng))], rng));
  }
  d.batch = to_batch(d.examples);
  return d;
}

inline Dataset make_dataset(Skill skill, std::int64_t n, std::uint64_t seed) {
  return make_dataset({skill}, {1.0}, n, seed);
}

}  // namespace gpt
