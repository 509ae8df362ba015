// CPU building blocks: accumulate types, the fixed chunking that makes parallel sums
// deterministic, and the choice between the baseline and the AVX2 build of vectorized loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>

// Extensions are compiled for the x86-64 baseline (SSE2), where at::vec::Vectorized is a plain
// array. The vectorized loops are therefore compiled twice, the second time with AVX2 (see
// vae_loss/vae_loss_cpu_avx2.cpp), and the AVX2 build is called when the CPU has it.
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTVAE_AVX2_BUILD 1
#else
#define FASTVAE_AVX2_BUILD 0
#endif

namespace fastvae::cpu {

#if FASTVAE_AVX2_BUILD
// Follows torch's choice (ATEN_CPU_CAPABILITY=default turns the AVX2 loops off too), and asks the
// CPU itself as well, since ATEN_CPU_CAPABILITY=avx2 forces torch's choice on any CPU.
inline bool use_avx2() {
  static const bool enabled = [] {
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return enabled;
}
#endif

// float16/bfloat16 are computed in float, like at::opmath_type.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Parallel sums are taken over fixed chunks of kChunk elements whatever the number of threads,
// and the chunk partials are added in chunk order, so a sum has the same bits with 1 or 64
// threads. 16Ki elements amortize a task's overhead and are a multiple of every vector width.
constexpr int64_t kChunk = int64_t{1} << 14;

inline int64_t num_chunks(int64_t n, int64_t chunk_size = kChunk) { return (n + chunk_size - 1) / chunk_size; }

inline int64_t chunk_end(int64_t chunk, int64_t n, int64_t chunk_size = kChunk) {
  return std::min(n, (chunk + 1) * chunk_size);
}

// Chunk partials added in chunk order.
template <typename acc>
inline acc ordered_sum(const std::vector<acc>& partials) {
  acc total = 0;
  for (const acc p : partials) total += p;
  return total;
}

}  // namespace fastvae::cpu
