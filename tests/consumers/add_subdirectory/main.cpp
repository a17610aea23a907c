// Consumer smoke test: one PSFT loss and its backward pass through the
// public header, built the way a downstream project builds psft.
#include <psft/psft.hpp>

#include <ATen/Context.h>
#include <ATen/Functions.h>

#include <iostream>

int main() {
  at::manual_seed(0);
  const at::Tensor old_logp = -at::rand({4, 16}, at::kFloat);
  const at::Tensor logp =
      (old_logp + 0.1 * at::randn({4, 16}, at::kFloat)).detach().requires_grad_(true);
  const at::Tensor mask = at::rand({4, 16}, at::kFloat) > 0.25;

  const psft::LossResult result = psft::psft_loss(logp, old_logp, mask);
  result.loss.backward();

  const at::Tensor grad = logp.grad();
  if (!grad.defined() || !at::isfinite(grad).all().item<bool>() ||
      !at::isfinite(result.loss).item<bool>()) {
    std::cerr << "psft consumer: loss or gradient is not finite\n";
    return 1;
  }
  std::cout << "loss " << result.loss.item<double>() << ", clip_frac_high "
            << result.metrics.clip_frac_high.item<double>() << ", tokens "
            << result.metrics.token_count.item<double>() << "\n";
  std::cout << "ok\n";
  return 0;
}
