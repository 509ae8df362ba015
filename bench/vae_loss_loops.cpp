// The image loop of vae_loss's CPU forward timed alone, one thread, for each reconstruction term:
// the AVX2 build that the operator library ships (linked from it) reading x_hat and x and writing
// the image gradient, float32, 128x3x64x64 elements. Each term is timed twice: streaming the whole
// image from memory, and over one cache-resident 8192-element slice run as many times. A loop
// that takes as long in cache as from memory is bound by its arithmetic, not by memory, and no
// change of memory traffic can speed it up. Built by CMakeLists.txt (bench_vae_loss_loops) with
// the C++ tests, not run by ctest; `bash .ci/build_checks.sh` builds and runs it once, or, in a
// build folder configured as CMakeLists.txt says:
//
//   cmake --build build/cmake --target bench_vae_loss_loops && build/cmake/bench_vae_loss_loops
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "vae_loss/vae_loss_cpu_kernels.h"

namespace {

using fastvae::Recon;

constexpr int64_t kNumel = int64_t{128} * 3 * 64 * 64;
constexpr int64_t kCachedSlice = 8192;  // x_hat, x and the gradient: 96 KiB, within any L2
constexpr int kRepeats = 41;

// Fastest of kRepeats passes over kNumel elements, in milliseconds: one pass over the whole
// arrays, or kNumel / slice passes over their first `slice` elements.
template <Recon kRecon, bool kWriteGrad>
double fastest_ms(const std::vector<float>& x_hat, const std::vector<float>& x, std::vector<float>& grad,
                  int64_t slice) {
  double best = 1e300;
  volatile float sink = 0.0f;
  for (int repeat = 0; repeat < kRepeats; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    float total = 0.0f;
    for (int64_t done = 0; done < kNumel; done += slice) {
      total += fastvae::cpu::recon_sum_avx2<kRecon, kWriteGrad, float>(x_hat.data(), x.data(), 1.0f, grad.data(), 0,
                                                                      slice);
    }
    sink = sink + total;
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

template <Recon kRecon>
void report(const char* name, const std::vector<float>& x_hat, const std::vector<float>& x, std::vector<float>& grad) {
  std::printf("| `%s` | %.3f ms | %.3f ms | %.3f ms |\n", name, fastest_ms<kRecon, true>(x_hat, x, grad, kNumel),
              fastest_ms<kRecon, true>(x_hat, x, grad, kCachedSlice), fastest_ms<kRecon, false>(x_hat, x, grad, kCachedSlice));
}

}  // namespace

int main() {
  // The library's own choice of build, so that the loop timed is the one it runs here.
  if (!fastvae::cpu::use_avx2()) {
    std::printf("bench_vae_loss_loops: nothing to time, the library runs its baseline loops here "
                "(no AVX2, FMA or F16C, or ATEN_CPU_CAPABILITY=default)\n");
    return 0;
  }
  // The benchmark's inputs: probabilities and targets uniform in [0, 1), logits in [-6, 6).
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f), logit(-6.0f, 6.0f);
  std::vector<float> probability(kNumel), logits(kNumel), target(kNumel), grad(kNumel);
  for (int64_t i = 0; i < kNumel; ++i) {
    probability[i] = unit(rng);
    logits[i] = logit(rng);
    target[i] = unit(rng);
  }
  std::printf("vae_loss image loop, AVX2 build, float32, %ld elements, one thread, fastest of %d\n\n",
              static_cast<long>(kNumel), kRepeats);
  std::printf("| recon | from memory | in cache | in cache, no gradient |\n| --- | ---: | ---: | ---: |\n");
  report<Recon::Mse>("mse", probability, target, grad);
  report<Recon::L1>("l1", probability, target, grad);
  report<Recon::Bce>("bce", probability, target, grad);
  report<Recon::BceLogits>("bce_logits", logits, target, grad);
  return 0;
}
