// The operator library as a C++ user sees it: loaded at run time (as `import fastvae._C` does),
// its ops found and called through the dispatcher, checked against ATen math (values and,
// through the C++ autograd, gradients), and checked to give the same bits whatever the number
// of threads.
#include <dlfcn.h>

#include <cstdio>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

using VaeLoss = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, std::string_view,
    std::string_view, std::string_view, bool);

// (loss, recon, kl, image_grad) of the squared error, both terms reduced with `reduction`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss(const at::Tensor& x_hat, const at::Tensor& x,
                                                                    const at::Tensor& mu, const at::Tensor& logvar,
                                                                    double beta, std::string_view reduction) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastvae::vae_loss", "").typed<VaeLoss>();
  return op.call(x_hat, x, mu, logvar, beta, "mse", reduction, reduction, /*compute_image_grad=*/true);
}

void test_matches_aten(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar) {
  const auto [loss, recon, kl, image_grad] = vae_loss(x_hat, x, mu, logvar, 0.5, "batchmean");
  const auto x64 = x.to(at::kDouble), mu64 = mu.to(at::kDouble), lv64 = logvar.to(at::kDouble);
  const double batch = static_cast<double>(x.size(0));
  const double want_recon = (x_hat.to(at::kDouble) - x64).square().sum().item<double>() / batch;
  const double want_kl = (-0.5 * (1 + lv64 - mu64.square() - lv64.exp())).sum().item<double>() / batch;
  expect(std::abs(recon.item<double>() - want_recon) <= 1e-5 * want_recon, "recon matches ATen");
  expect(std::abs(kl.item<double>() - want_kl) <= 1e-5 * std::abs(want_kl), "kl matches ATen");
  expect(std::abs(loss.item<double>() - (want_recon + 0.5 * want_kl)) <= 1e-5 * want_recon, "loss matches ATen");
  // float32 and float64 image gradients include the 1 / batch; float16 and bfloat16 leave it
  // to the backward (vae_loss/vae_loss.h).
  const bool includes_divisor = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const auto want_grad = (x_hat.to(at::kDouble) - x64) * (includes_divisor ? 2.0 / batch : 2.0);
  expect(at::allclose(image_grad.to(at::kDouble), want_grad, 1e-2, 1e-5), "image_grad matches ATen");
}

void test_thread_count_does_not_change_bits(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu,
                                            const at::Tensor& logvar) {
  at::set_num_threads(1);
  const auto one = vae_loss(x_hat, x, mu, logvar, 1.0, "sum");
  at::set_num_threads(2);
  const auto two = vae_loss(x_hat, x, mu, logvar, 1.0, "sum");
  expect(at::equal(std::get<0>(one), std::get<0>(two)), "loss bits with 1 and 2 threads");
  expect(at::equal(std::get<2>(one), std::get<2>(two)), "kl bits with 1 and 2 threads");
  expect(at::equal(std::get<3>(one), std::get<3>(two)), "image_grad bits with 1 and 2 threads");
}

// The op's autograd is registered in C++: loss.backward() gives every input its gradient, both
// where the forward's image gradient is handed over as is (weight 1) and where it is scaled.
void test_backward_matches_aten(const at::Tensor& x_hat_in, const at::Tensor& x, const at::Tensor& mu_in,
                                const at::Tensor& logvar_in) {
  for (const double weight : {1.0, 0.7}) {
    const at::Tensor x_hat = x_hat_in.clone().requires_grad_(), mu = mu_in.clone().requires_grad_();
    const at::Tensor logvar = logvar_in.clone().requires_grad_();
    const auto [loss, recon, kl, image_grad] = vae_loss(x_hat, x, mu, logvar, 0.5, "batchmean");
    (loss * weight).backward();
    const double scale = weight / static_cast<double>(x.size(0));
    const auto want_x_hat = (x_hat_in.to(at::kDouble) - x.to(at::kDouble)) * (2.0 * scale);
    const auto want_mu = mu_in.to(at::kDouble) * (0.5 * scale);
    const auto want_logvar = (logvar_in.to(at::kDouble).exp() - 1) * (0.25 * scale);
    expect(at::allclose(x_hat.grad().to(at::kDouble), want_x_hat, 1e-5, 1e-7), "grad x_hat matches ATen");
    expect(at::allclose(mu.grad().to(at::kDouble), want_mu, 1e-5, 1e-7), "grad mu matches ATen");
    expect(at::allclose(logvar.grad().to(at::kDouble), want_logvar, 1e-5, 1e-7), "grad logvar matches ATen");
  }
}

void test_bad_input_throws(const at::Tensor& x, const at::Tensor& mu) {
  try {
    vae_loss(x, x.narrow(1, 0, 1), mu, mu, 1.0, "sum");
    expect(false, "mismatched shapes throw");
  } catch (const c10::Error& e) {
    expect(std::string_view(e.what_without_backtrace()).find("x_hat has shape") != std::string_view::npos,
           "the error names both sides");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::printf("usage: test_ops path/to/libfastvae_ops.so (%s)\n", dlerror());
    return 2;
  }
  at::manual_seed(0);
  // Several 16Ki-element chunks, so two threads split the work.
  const at::Tensor x_hat = at::randn({6, 3, 61, 59}), x = at::randn({6, 3, 61, 59});
  const at::Tensor mu = at::randn({6, 40}), logvar = at::randn({6, 40});
  test_matches_aten(x_hat, x, mu, logvar);
  test_matches_aten(x_hat.to(at::kBFloat16), x.to(at::kBFloat16), mu.to(at::kDouble), logvar.to(at::kDouble));
  test_thread_count_does_not_change_bits(x_hat, x, mu, logvar);
  test_backward_matches_aten(x_hat, x, mu, logvar);
  test_bad_input_throws(x, mu);
  if (failures == 0) std::printf("fastvae ops: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
