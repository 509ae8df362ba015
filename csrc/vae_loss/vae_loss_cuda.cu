// fastvae::vae_loss on CUDA. Forward: one kernel reads the image pair and the latents once,
// writes per-block partial sums (and, when asked, d loss / d x_hat from the same loads), and a
// one-block kernel adds the partials in a fixed order. Backward: one kernel writes every
// gradient, scaling the forward's image gradient by incoming gradients it reads on the device.
// (Why the image gradient is written in the forward: see vae_loss_cpu.cpp.) In place
// (vae_loss_backward_), the scaled image gradient becomes grad_x_hat and a weight of 1 skips the
// image: forward + backward of loss.backward() then move 3N elements, where recomputing the
// image gradient in the backward would move 5N.
//
// Determinism: the grid size is a function of the input sizes and dtypes only (not of the GPU
// nor of the pointers' alignment), each thread sums the same elements in the same order whether
// its loads are 16 bytes wide or not, each block reduces with a fixed tree of warp shuffles, and
// the partials are added by one block in a fixed order. No float atomics: the same inputs give
// the same loss bit for bit, on any GPU, at any alignment.
#include <algorithm>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fastvae_math.h"
#include "vae_loss.h"

namespace fastvae {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks an SM must hold at once. __launch_bounds__ makes ptxas fit each kernel in
// 65536 / (blocks * kThreads) registers. ptxas -v (sm_90): at 8 blocks (32 registers) some
// float32 forwards spill, at 6 (40) none without float64 do; float64's exp and log spill at 5
// (48) and not at 4 (64). The grid is capped at kSmsPerWave SMs' worth of these blocks, so it
// runs as one wave on a GPU of at least that many SMs (H100, H200: 132). A cap fixed by the
// dtypes rather than read from the GPU keeps the reduction tree, hence the bits, the same on
// every GPU.
constexpr int kSmsPerWave = 128;
constexpr int kMinBlocks = 6;
constexpr int kMinBlocksFloat64 = 4;  // where the image or the latents are float64

template <typename image_t, typename latent_t>
constexpr int kMinBlocksPerSm =
    std::is_same_v<image_t, double> || std::is_same_v<latent_t, double> ? kMinBlocksFloat64 : kMinBlocks;

template <typename image_t, typename latent_t>
constexpr int64_t max_blocks() {
  return int64_t{kSmsPerWave} * kMinBlocksPerSm<image_t, latent_t>;
}

// Each thread handles at least this many 16-byte packs before another block is added.
constexpr int64_t kPacksPerThread = 4;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// kVec scalars moved as one load or store: 128 bits when kVec = 16 / sizeof(scalar_t).
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide sum, valid in thread 0. `scratch` holds one value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : T(0);
  return warp == 0 ? warp_sum(v) : T(0);
}

// Pack p of `data`: one 16-byte load when kAligned, else kVec scalar loads of the same elements,
// so each thread sums the same elements in the same order either way.
template <bool kAligned, int kVec, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* __restrict__ data, int64_t p) {
  if constexpr (kAligned) {
    return reinterpret_cast<const Pack<scalar_t, kVec>*>(data)[p];
  } else {
    Pack<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.v[j] = data[p * kVec + j];
    return out;
  }
}

// The image loop is over packs of 16 bytes whether or not x_hat and x are 16-byte aligned
// (kAligned only picks the loads), and the grid is a function of the sizes: the loss has the
// same bits for any alignment. image_grad is fresh from the caching allocator, always aligned.
template <Recon kRecon, typename image_t, typename latent_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<image_t, latent_t>)
    vae_loss_forward_kernel(const image_t* __restrict__ x_hat, const image_t* __restrict__ x, int64_t n_image,
                            const latent_t* __restrict__ mu, const latent_t* __restrict__ logvar, int64_t n_latent,
                            acc_t<image_t> grad_weight, image_t* __restrict__ image_grad,
                            acc_t<image_t>* __restrict__ recon_partials, acc_t<latent_t>* __restrict__ kl_partials) {
  using image_acc = acc_t<image_t>;
  using latent_acc = acc_t<latent_t>;
  constexpr int kVec = 16 / sizeof(image_t);
  using P = Pack<image_t, kVec>;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;

  image_acc recon = 0;
  const int64_t n_packs = n_image / kVec;
  for (int64_t p = start; p < n_packs; p += stride) {
    const P a = load_pack<kAligned, kVec>(x_hat, p);
    const P b = load_pack<kAligned, kVec>(x, p);
    P g;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const image_acc va = static_cast<image_acc>(a.v[j]), vb = static_cast<image_acc>(b.v[j]);
      const TermAndGrad<image_acc> r = recon_term_and_grad<kRecon>(va, vb, grad_weight);
      recon += r.term;
      g.v[j] = static_cast<image_t>(r.grad);
    }
    if (image_grad != nullptr) reinterpret_cast<P*>(image_grad)[p] = g;
  }
  for (int64_t i = n_packs * kVec + start; i < n_image; i += stride) {
    const image_acc va = static_cast<image_acc>(x_hat[i]), vb = static_cast<image_acc>(x[i]);
    const TermAndGrad<image_acc> r = recon_term_and_grad<kRecon>(va, vb, grad_weight);
    recon += r.term;
    if (image_grad != nullptr) image_grad[i] = static_cast<image_t>(r.grad);
  }
  latent_acc kl = 0;
  for (int64_t i = start; i < n_latent; i += stride) {
    kl += kl_term(static_cast<latent_acc>(mu[i]), static_cast<latent_acc>(logvar[i]));
  }

  __shared__ image_acc recon_scratch[kWarps];
  __shared__ latent_acc kl_scratch[kWarps];
  recon = block_sum(recon, recon_scratch);
  kl = block_sum(kl, kl_scratch);
  if (threadIdx.x == 0) {
    recon_partials[blockIdx.x] = recon;
    kl_partials[blockIdx.x] = kl;
  }
}

template <typename image_acc, typename latent_acc>
__global__ void __launch_bounds__(kThreads)
    vae_loss_finalize_kernel(const image_acc* __restrict__ recon_partials, const latent_acc* __restrict__ kl_partials,
                             int num_partials, double beta, double image_divisor, double latent_divisor,
                             image_acc* __restrict__ loss, image_acc* __restrict__ recon, image_acc* __restrict__ kl) {
  image_acc r = 0;
  latent_acc k = 0;
  for (int i = threadIdx.x; i < num_partials; i += kThreads) {
    r += recon_partials[i];
    k += kl_partials[i];
  }
  __shared__ image_acc recon_scratch[kWarps];
  __shared__ latent_acc kl_scratch[kWarps];
  r = block_sum(r, recon_scratch);
  k = block_sum(k, kl_scratch);
  if (threadIdx.x == 0) {
    // Divisions, as the reference divides; the mean of nothing is 0/0 = nan, as in torch.
    const image_acc recon_value = r / static_cast<image_acc>(image_divisor);
    const image_acc kl_value = static_cast<image_acc>(k / static_cast<latent_acc>(latent_divisor));
    *recon = recon_value;
    *kl = kl_value;
    *loss = recon_value + static_cast<image_acc>(beta) * kl_value;
  }
}

// grad_x_hat and grad_x (each where not null) from image_grad, and the latent gradients.
// grad_x_hat may be image_grad itself (vae_loss_backward_, which also sets skip_unit_weight):
// each element is read before it is written, so those two are not __restrict__. grad_x is the
// negated image gradient for kTarget = Mse (standing for every form where it is),
// recon_grad_target<kTarget>(x_hat) otherwise. Elementwise: the loads' width changes no bits.
template <Recon kTarget, typename image_t, typename latent_t, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<image_t, latent_t>) vae_loss_backward_kernel(
    const acc_t<image_t>* __restrict__ grad_loss, const acc_t<image_t>* __restrict__ grad_recon,
    const acc_t<image_t>* __restrict__ grad_kl, acc_t<image_t> image_scale, acc_t<image_t> inverse_divisor,
    double beta, double latent_divisor, const image_t* image_grad, const image_t* __restrict__ x_hat,
    int64_t n_image, bool skip_unit_weight, const latent_t* __restrict__ mu, const latent_t* __restrict__ logvar,
    int64_t n_latent, image_t* grad_x_hat, image_t* __restrict__ grad_x, latent_t* __restrict__ grad_mu,
    latent_t* __restrict__ grad_logvar) {
  using image_acc = acc_t<image_t>;
  using latent_acc = acc_t<latent_t>;
  using P = Pack<image_t, kVec>;
  constexpr bool kNegated = recon_grad_target_is_negated(kTarget);
  // The image term appears in loss and recon, the KL term in loss (times beta) and kl; image_scale
  // is what the forward left out of image_grad. An absent incoming gradient is a null pointer.
  const image_acc g_loss = grad_loss != nullptr ? *grad_loss : image_acc(0);
  const image_acc g_image = g_loss + (grad_recon != nullptr ? *grad_recon : image_acc(0));
  const image_acc image_weight = g_image * image_scale;
  const image_acc target_weight = g_image * inverse_divisor;
  const image_acc g_kl = grad_kl != nullptr ? *grad_kl : image_acc(0);
  const latent_acc kl_weight = static_cast<latent_acc>(static_cast<image_acc>(beta) * g_loss + g_kl) /
                               static_cast<latent_acc>(latent_divisor);
  // In place, a weight of 1 (loss.backward()) leaves the image gradient as it is: the image is
  // neither read nor written. The weight is the same for every thread, so no thread diverges.
  if (skip_unit_weight && image_weight == image_acc(1)) n_image = 0;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;

  const int64_t n_packs = n_image / kVec;
  for (int64_t p = start; p < n_packs; p += stride) {
    if (grad_x_hat != nullptr || kNegated) {
      const P in = reinterpret_cast<const P*>(image_grad)[p];
      P g, neg;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const image_acc v = static_cast<image_acc>(in.v[j]) * image_weight;
        g.v[j] = static_cast<image_t>(v);
        neg.v[j] = static_cast<image_t>(-v);
      }
      if (grad_x_hat != nullptr) reinterpret_cast<P*>(grad_x_hat)[p] = g;
      if (kNegated && grad_x != nullptr) reinterpret_cast<P*>(grad_x)[p] = neg;
    }
    if constexpr (!kNegated) {
      if (grad_x != nullptr) {
        const P in = reinterpret_cast<const P*>(x_hat)[p];
        P t;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          t.v[j] = static_cast<image_t>(recon_grad_target<kTarget>(static_cast<image_acc>(in.v[j])) * target_weight);
        }
        reinterpret_cast<P*>(grad_x)[p] = t;
      }
    }
  }
  for (int64_t i = n_packs * kVec + start; i < n_image; i += stride) {
    const image_acc v = static_cast<image_acc>(image_grad[i]) * image_weight;
    if (grad_x_hat != nullptr) grad_x_hat[i] = static_cast<image_t>(v);
    if (grad_x != nullptr) {
      if constexpr (kNegated) {
        grad_x[i] = static_cast<image_t>(-v);
      } else {
        grad_x[i] = static_cast<image_t>(recon_grad_target<kTarget>(static_cast<image_acc>(x_hat[i])) * target_weight);
      }
    }
  }
  for (int64_t i = start; i < n_latent; i += stride) {
    grad_mu[i] = static_cast<latent_t>(kl_weight * kl_grad_mu(static_cast<latent_acc>(mu[i])));
    grad_logvar[i] = static_cast<latent_t>(kl_weight * kl_grad_logvar(static_cast<latent_acc>(logvar[i])));
  }
}

// A function of the sizes and dtypes only, so the reduction tree is the same on every GPU.
template <typename image_t, typename latent_t>
int num_blocks(int64_t n_image, int64_t n_latent, int vec) {
  const int64_t work = std::max((n_image + vec - 1) / vec, n_latent);
  const int64_t blocks = (work + kThreads * kPacksPerThread - 1) / (kThreads * kPacksPerThread);
  return static_cast<int>(std::clamp<int64_t>(blocks, 1, max_blocks<image_t, latent_t>()));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const at::Tensor& image, const at::Tensor& mu) {
  TORCH_CHECK(image.is_cuda() && mu.is_cuda(), "the CUDA kernel of fastvae::vae_loss got tensors on ",
              image.device(), " and ", mu.device());
}

#define FASTVAE_DISPATCH_IMAGE_LATENT(image, latent, name, ...)                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image, name, [&] {    \
    using image_t = scalar_t;                                                       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, latent, name, [&] { \
      using latent_t = scalar_t;                                                    \
      __VA_ARGS__();                                                                \
    });                                                                             \
  })

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cuda(
    const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
    double beta, c10::string_view recon_name, c10::string_view recon_reduction, c10::string_view kl_reduction,
    bool compute_image_grad) {
  const VaeLossReductions reductions =
      check_vae_loss_inputs(x_hat_in, x_in, mu_in, logvar_in, recon_reduction, kl_reduction);
  const Recon recon_form = parse_recon(recon_name);
  check_cuda(x_in, mu_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x_hat = x_hat_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [loss, recon, kl, image_grad] = empty_vae_loss_outputs(x, compute_image_grad);
  FASTVAE_DISPATCH_IMAGE_LATENT(x.scalar_type(), mu.scalar_type(), "vae_loss_cuda", [&] {
    using image_acc = acc_t<image_t>;
    using latent_acc = acc_t<latent_t>;
    const auto* xh = x_hat.const_data_ptr<image_t>();
    const auto* xx = x.const_data_ptr<image_t>();
    const int blocks = num_blocks<image_t, latent_t>(x.numel(), mu.numel(), 16 / sizeof(image_t));
    const double image_divisor = reduction_divisor(reductions.recon, x);
    const image_acc grad_weight = image_grad_includes_divisor(x.scalar_type())
                                      ? image_acc(1) / static_cast<image_acc>(image_divisor)
                                      : image_acc(1);
    at::Tensor recon_partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<image_acc>::value));
    at::Tensor kl_partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<latent_acc>::value));
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(xh, xx, x.numel(), mu.const_data_ptr<latent_t>(),
                                              logvar.const_data_ptr<latent_t>(), mu.numel(), grad_weight,
                                              compute_image_grad ? image_grad.mutable_data_ptr<image_t>() : nullptr,
                                              recon_partials.mutable_data_ptr<image_acc>(),
                                              kl_partials.mutable_data_ptr<latent_acc>());
    };
    dispatch_recon(recon_form, [&](auto form) {
      constexpr Recon kRecon = decltype(form)::value;
      if (aligned16(xh) && aligned16(xx)) {
        launch(vae_loss_forward_kernel<kRecon, image_t, latent_t, true>);
      } else {
        launch(vae_loss_forward_kernel<kRecon, image_t, latent_t, false>);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    vae_loss_finalize_kernel<image_acc, latent_acc><<<1, kThreads, 0, stream>>>(
        recon_partials.const_data_ptr<image_acc>(), kl_partials.const_data_ptr<latent_acc>(), blocks, beta,
        image_divisor, reduction_divisor(reductions.kl, mu), loss.mutable_data_ptr<image_acc>(),
        recon.mutable_data_ptr<image_acc>(), kl.mutable_data_ptr<image_acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, recon, kl, image_grad};
}

// One launch of vae_loss_backward_kernel: grad_x_hat (may be image_grad itself) and grad_x where
// not null, and grad_mu, grad_logvar. x_hat is read for the BCE forms' grad_x only.
template <typename image_t, typename latent_t>
void launch_backward(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl,
                     const image_t* image_grad, const image_t* x_hat, Recon target, int64_t n_image,
                     double image_divisor, bool skip_unit_weight, const at::Tensor& mu, const at::Tensor& logvar,
                     double beta, double latent_divisor, image_t* grad_x_hat, image_t* grad_x, at::Tensor& grad_mu,
                     at::Tensor& grad_logvar) {
  using image_acc = acc_t<image_t>;
  constexpr int kVec = 16 / sizeof(image_t);
  // Fresh outputs are 16-byte aligned; image_grad and x_hat are unless a caller passed a view.
  const bool vectorized = aligned16(image_grad) && (grad_x_hat == nullptr || aligned16(grad_x_hat)) &&
                          (x_hat == nullptr || aligned16(x_hat));
  const int blocks = num_blocks<image_t, latent_t>(n_image, mu.numel(), vectorized ? kVec : 1);
  const image_acc inverse_divisor = image_acc(1) / static_cast<image_acc>(image_divisor);
  const image_acc image_scale =
      image_grad_includes_divisor(c10::CppTypeToScalarType<image_t>::value) ? image_acc(1) : inverse_divisor;
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        incoming_grad_ptr<image_acc>(grad_loss), incoming_grad_ptr<image_acc>(grad_recon),
        incoming_grad_ptr<image_acc>(grad_kl), image_scale, inverse_divisor, beta, latent_divisor, image_grad, x_hat,
        n_image, skip_unit_weight, mu.const_data_ptr<latent_t>(), logvar.const_data_ptr<latent_t>(), mu.numel(),
        grad_x_hat, grad_x, grad_mu.mutable_data_ptr<latent_t>(), grad_logvar.mutable_data_ptr<latent_t>());
  };
  // Mse stands for every form whose x gradient is the negated image gradient.
  dispatch_recon(recon_grad_target_is_negated(target) ? Recon::Mse : target, [&](auto form) {
    constexpr Recon kTarget = decltype(form)::value;
    if constexpr (kTarget == Recon::Mse || !recon_grad_target_is_negated(kTarget)) {
      if (vectorized) {
        launch(vae_loss_backward_kernel<kTarget, image_t, latent_t, kVec>);
      } else {
        launch(vae_loss_backward_kernel<kTarget, image_t, latent_t, 1>);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_backward_cuda(
    const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl,
    const at::Tensor& image_grad_in, const std::optional<at::Tensor>& x_hat_in, const at::Tensor& mu_in,
    const at::Tensor& logvar_in, double beta, c10::string_view recon_name, c10::string_view recon_reduction,
    c10::string_view kl_reduction, bool scale_image, bool compute_grad_x) {
  const VaeLossReductions reductions = check_vae_loss_backward_inputs(grad_loss, grad_recon, grad_kl, image_grad_in,
                                                                     mu_in, logvar_in, recon_reduction, kl_reduction);
  const Recon recon_form = parse_recon(recon_name);
  const bool needs_x_hat = check_target_grad_input(recon_form, compute_grad_x, x_hat_in, image_grad_in);
  check_cuda(image_grad_in, mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor image_grad = image_grad_in.contiguous();
  const at::Tensor x_hat = needs_x_hat ? x_hat_in->contiguous() : at::Tensor();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [grad_x_hat, grad_x, grad_mu, grad_logvar] =
      empty_vae_loss_backward_outputs(image_grad, mu, scale_image, compute_grad_x);
  const int64_t n_image = scale_image || compute_grad_x ? image_grad.numel() : 0;
  FASTVAE_DISPATCH_IMAGE_LATENT(image_grad.scalar_type(), mu.scalar_type(), "vae_loss_backward_cuda", [&] {
    launch_backward<image_t, latent_t>(
        grad_loss, grad_recon, grad_kl, image_grad.const_data_ptr<image_t>(),
        needs_x_hat ? x_hat.const_data_ptr<image_t>() : nullptr, needs_x_hat ? recon_form : Recon::Mse, n_image,
        reduction_divisor(reductions.recon, image_grad), /*skip_unit_weight=*/false, mu, logvar, beta,
        reduction_divisor(reductions.kl, mu), scale_image ? grad_x_hat.mutable_data_ptr<image_t>() : nullptr,
        compute_grad_x ? grad_x.mutable_data_ptr<image_t>() : nullptr, grad_mu, grad_logvar);
  });
  return {grad_x_hat, grad_x, grad_mu, grad_logvar};
}

std::tuple<at::Tensor, at::Tensor> vae_loss_backward_inplace_cuda(
    const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl, at::Tensor& image_grad,
    const at::Tensor& mu_in, const at::Tensor& logvar_in, double beta, c10::string_view recon_reduction,
    c10::string_view kl_reduction) {
  const VaeLossReductions reductions = check_vae_loss_backward_inplace_inputs(
      grad_loss, grad_recon, grad_kl, image_grad, mu_in, logvar_in, recon_reduction, kl_reduction);
  check_cuda(image_grad, mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [grad_mu, grad_logvar] = empty_latent_grads(mu);
  FASTVAE_DISPATCH_IMAGE_LATENT(image_grad.scalar_type(), mu.scalar_type(), "vae_loss_backward_inplace_cuda", [&] {
    image_t* data = image_grad.mutable_data_ptr<image_t>();
    launch_backward<image_t, latent_t>(grad_loss, grad_recon, grad_kl, data, /*x_hat=*/nullptr, Recon::Mse,
                                       image_grad.numel(), reduction_divisor(reductions.recon, image_grad),
                                       /*skip_unit_weight=*/true, mu, logvar, beta, reduction_divisor(reductions.kl, mu),
                                       /*grad_x_hat=*/data, /*grad_x=*/nullptr, grad_mu, grad_logvar);
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) {
  m.impl("vae_loss", &vae_loss_cuda);
  m.impl("vae_loss_backward", &vae_loss_backward_cuda);
  m.impl("vae_loss_backward_", &vae_loss_backward_inplace_cuda);
}

}  // namespace fastvae
