// Conan test package: one PSFT loss through the installed headers, compared
// with values known in closed form.
#include <psft/psft.hpp>

#include <ATen/Functions.h>

#include <cmath>
#include <iostream>

int main() {
  // logp == old_logp: every ratio is exactly 1, so the token-mean loss is -1
  // and each of the N unmasked tokens gets the gradient -1 / N.
  const at::Tensor old_logp = at::full({2, 4}, -0.5, at::kFloat);
  const at::Tensor logp = old_logp.clone().requires_grad_(true);
  at::Tensor mask = at::ones({2, 4}, at::kBool);
  mask[1][3] = false;  // N = 7

  const psft::LossResult result = psft::psft_loss(logp, old_logp, mask);
  result.loss.backward();

  const double loss = result.loss.item<double>();
  const double grad = logp.grad()[0][0].item<double>();
  const double masked_grad = logp.grad()[1][3].item<double>();
  std::cout << "psft " << psft::version() << ": loss " << loss << ", grad " << grad << "\n";
  if (std::abs(loss + 1.0) > 1e-6 || std::abs(grad + 1.0 / 7.0) > 1e-6 || masked_grad != 0.0) {
    std::cerr << "test_package: expected loss -1 and gradient -1/7\n";
    return 1;
  }
  std::cout << "ok\n";
  return 0;
}
