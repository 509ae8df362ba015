// at::vec helpers shared by the vectorized CPU loops (vae_loss_cpu_kernels.h,
// reparameterize_kl_cpu_kernels.h). Like them, compiled once per build (baseline and AVX2) in the
// inline namespace CPU_CAPABILITY.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include "cpu_utils.h"

namespace fastvae::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// AccVec<scalar_t>::size() elements of `src`, widened to the accumulate type, and back.
template <typename scalar_t>
C10_ALWAYS_INLINE AccVec<scalar_t> load_widened(const scalar_t* src) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(src, out);
    return out;
  } else {
    return AccVec<scalar_t>::loadu(src);
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void store_narrowed(scalar_t* dst, const AccVec<scalar_t>& v) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(dst, AccVec<scalar_t>::size());
  } else {
    v.store(dst);
  }
}

// The lanes of `v` added in lane order, so the sum has the same bits in both builds.
template <typename T>
C10_ALWAYS_INLINE T lane_sum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t l = 0; l < at::vec::Vectorized<T>::size(); ++l) total += lanes[l];
  return total;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastvae::cpu
