// Unit tests of csrc/fastvae_math.h, the per-element math shared by the CPU and CUDA kernels:
// Philox against the Random123 known-answer vectors, the tl.randn transform against values of
// tests/philox.py (numpy), and every gradient against central finite differences.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "fastvae_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
  }
}

void expect_near(const char* what, double got, double want, double tol) {
  expect(std::fabs(got - want) <= tol, what, got, want);
}

void test_philox_known_answers() {
  struct Case {
    fastvae::Philox4x32 counter;
    uint32_t k0, k1;
    fastvae::Philox4x32 expected;
  };
  // philox4x32_10 rows of Random123's kat_vectors.
  const Case cases[] = {
      {{0, 0, 0, 0}, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       0xffffffffu,
       0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       0xa4093822u,
       0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Case& c : cases) {
    const fastvae::Philox4x32 r = fastvae::philox4x32_10(c.counter, c.k0, c.k1);
    expect(r.c0 == c.expected.c0, "philox word 0", r.c0, c.expected.c0);
    expect(r.c1 == c.expected.c1, "philox word 1", r.c1, c.expected.c1);
    expect(r.c2 == c.expected.c2, "philox word 2", r.c2, c.expected.c2);
    expect(r.c3 == c.expected.c3, "philox word 3", r.c3, c.expected.c3);
  }
}

void test_uniform_range() {
  expect(fastvae::uint_to_uniform(0u) == 0.0f, "uniform(0)", fastvae::uint_to_uniform(0u), 0.0);
  // The sign fold maps 0xffffffff (int32 -1) to 0 as well.
  expect(fastvae::uint_to_uniform(0xffffffffu) == 0.0f, "uniform(~0)", fastvae::uint_to_uniform(0xffffffffu), 0.0);
  // The largest int32 stays below 1 after rounding to float.
  const float top = fastvae::uint_to_uniform(0x7fffffffu);
  expect(top < 1.0f && top > 0.99999f, "uniform(INT32_MAX)", top, 1.0);
}

void test_normal_matches_numpy_model() {
  // tests/philox.py: randn(5, [0, 1, 2, 1000]). libm and numpy
  // round log/cos differently, by a few float32 ulps.
  const struct {
    uint64_t seed, index;
    double expected;
  } cases[] = {
      {5, 0, 0.7889513373374939},
      {5, 1, -0.3259551227092743},
      {5, 2, -1.6460034847259521},
      {5, 1000, 0.6489969491958618},
  };
  for (const auto& c : cases) {
    expect_near("philox_normal", fastvae::philox_normal(c.seed, c.index), c.expected, 2e-6);
  }
  // The counter's high word is the index's high half: indices 2**32 apart draw different noise.
  expect(fastvae::philox_normal(5, 1) != fastvae::philox_normal(5, (uint64_t{1} << 32) + 1),
         "index high word is used", fastvae::philox_normal(5, 1), 0);
}

template <typename F>
double central_difference(F f, double x) {
  const double h = 1e-6 * std::fmax(1.0, std::fabs(x));
  return (f(x + h) - f(x - h)) / (2 * h);
}

void test_kl_and_gradients() {
  // KL(N(0, 1) || N(0, 1)) = 0, and a value worked by hand: mu = 1, logvar = 0 gives 0.5.
  expect_near("kl_term(0, 0)", fastvae::kl_term(0.0, 0.0), 0.0, 0.0);
  expect_near("kl_term(1, 0)", fastvae::kl_term(1.0, 0.0), 0.5, 1e-15);
  expect_near("kl_term float", fastvae::kl_term(0.5f, -1.0f),
              -0.5 * (1 - 1.0 - 0.25 - std::exp(-1.0)), 1e-6);
  for (double mu : {-2.0, -0.3, 0.0, 1.7}) {
    for (double logvar : {-3.0, -0.5, 0.0, 2.2}) {
      expect_near("kl_grad_mu", fastvae::kl_grad_mu(mu),
                  central_difference([&](double m) { return fastvae::kl_term(m, logvar); }, mu), 1e-7);
      expect_near("kl_grad_logvar", fastvae::kl_grad_logvar(logvar),
                  central_difference([&](double lv) { return fastvae::kl_term(mu, lv); }, logvar), 1e-7);
    }
  }
}

template <fastvae::Recon kRecon>
void check_recon_gradients(const char* name, double x_hat, double x) {
  const double weight = 0.75;
  const double numeric =
      central_difference([&](double v) { return weight * fastvae::recon_term<kRecon>(v, x); }, x_hat);
  expect_near(name, fastvae::recon_grad<kRecon>(x_hat, x, weight), numeric, 1e-6 * std::fmax(1.0, std::fabs(numeric)));
  if constexpr (!fastvae::recon_grad_target_is_negated(kRecon)) {
    const double numeric_x = central_difference([&](double t) { return fastvae::recon_term<kRecon>(x_hat, t); }, x);
    expect_near(name, fastvae::recon_grad_target<kRecon>(x_hat), numeric_x, 1e-6 * std::fmax(1.0, std::fabs(numeric_x)));
  }
}

void test_recon_terms_and_gradients() {
  using fastvae::Recon;
  expect_near("mse", fastvae::recon_term<Recon::Mse>(3.0, 1.5), 2.25, 0.0);
  expect_near("l1", fastvae::recon_term<Recon::L1>(1.0, 3.5), 2.5, 0.0);
  expect_near("bce", fastvae::recon_term<Recon::Bce>(0.25, 1.0), -std::log(0.25), 1e-15);
  expect_near("bce_logits", fastvae::recon_term<Recon::BceLogits>(0.0, 0.3), std::log(2.0), 1e-15);
  for (double x_hat : {0.05, 0.3, 0.8}) {
    for (double x : {0.0, 0.4, 1.0}) {
      check_recon_gradients<Recon::Mse>("mse grad", x_hat, x);
      check_recon_gradients<Recon::L1>("l1 grad", x_hat, x);
      check_recon_gradients<Recon::Bce>("bce grad", x_hat, x);
      check_recon_gradients<Recon::BceLogits>("bce_logits grad", 4 * x_hat - 2, x);
    }
  }
  // torch's subgradient at a tie, and the clamps of F.binary_cross_entropy at 0 and 1.
  expect_near("l1 grad at a tie", fastvae::recon_grad<Recon::L1>(0.5f, 0.5f, 1.0f), 0.0, 0.0);
  expect_near("bce at x_hat = 0", fastvae::recon_term<Recon::Bce>(0.0, 1.0), 100.0, 0.0);
  expect_near("bce at x_hat = 1", fastvae::recon_term<Recon::Bce>(1.0f, 0.25f), 75.0, 1e-5);
  expect_near("bce grad at x_hat = 0", fastvae::recon_grad<Recon::Bce>(0.0, 1.0, 1.0), -1e12, 1.0);
  // Huge logits of either sign: finite, and exact where the answer is.
  expect_near("bce_logits at +1e30", fastvae::recon_term<Recon::BceLogits>(1e30f, 1.0f), 0.0, 0.0);
  expect_near("bce_logits at -1e30", fastvae::recon_term<Recon::BceLogits>(-1e30f, 0.0f), 0.0, 0.0);
  expect_near("bce_logits grad at +1e30", fastvae::recon_grad<Recon::BceLogits>(1e30f, 0.0f, 1.0f), 1.0, 0.0);
  expect_near("bce_logits grad at -1e30", fastvae::recon_grad<Recon::BceLogits>(-1e30f, 0.0f, 1.0f), 0.0, 0.0);
}

void test_reparameterize_and_gradient() {
  const double mu = 0.4, logvar = -0.8, eps = 1.3;
  const double z = fastvae::reparameterize(mu, logvar, eps);
  expect_near("reparameterize", z, mu + std::exp(0.5 * logvar) * eps, 1e-15);
  expect_near("reparameterize_grad_logvar", fastvae::reparameterize_grad_logvar(logvar, eps),
              central_difference([&](double lv) { return fastvae::reparameterize(mu, lv, eps); }, logvar), 1e-7);
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_uniform_range();
  test_normal_matches_numpy_model();
  test_kl_and_gradients();
  test_recon_terms_and_gradients();
  test_reparameterize_and_gradient();
  if (failures == 0) std::printf("fastvae_math: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
