// fastvae::reparameterize_kl and its backward on CPU. Sampling on CUDA is the Triton backend's
// job; this kernel draws the same Philox stream (fastvae_math.h) so a seed gives the same z.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common.h"
#include "../cpu_utils.h"
#include "latent_cpu.h"

namespace fastvae {
namespace {

using cpu::acc_t;

// Sampling costs about 10 ns an element on one core (Philox and Box-Muller), so chunks far
// smaller than cpu::kChunk pay for their task: a 128x128 latent already runs on 4 threads. The
// chunks are fixed, so the KL's sum still has the same bits whatever the thread count.
constexpr int64_t kChunk = 4096;

uint64_t read_seed(const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->defined(), "sampling z needs a seed tensor, got None");
  TORCH_CHECK(seed->dim() == 0 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "seed must be a 0-dim int64 CPU tensor, got shape ", seed->sizes(), " ", seed->scalar_type(),
              " on ", seed->device());
  // The Philox key is the seed's 64 bits; fastvae.ops only passes seeds in [0, 2**63).
  return static_cast<uint64_t>(*seed->const_data_ptr<int64_t>());
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastvae::reparameterize_kl has a CPU kernel only (CUDA sampling is the "
              "Triton backend's), got ", name, " on ", t.device());
}

// Whether t's strides do not increase along `order` (dims of size 1 skipped): its elements lie in
// that order, densely or not.
bool laid_out_in(const at::Tensor& t, std::initializer_list<int64_t> order) {
  int64_t previous = std::numeric_limits<int64_t>::max();
  for (const int64_t d : order) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) > previous) return false;
    previous = t.stride(d);
  }
  return true;
}

// fastvae._checks.latent_memory_format: an input laid out channels-last (3d), densely or as a
// view (diffusers' torch.chunk of channels-last moments), gives outputs in that format. The loops
// run in row-major order on contiguous copies (the noise counter is the row-major index), and the
// outputs are laid out at the end: a copy each, on CPU only.
at::MemoryFormat latent_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !laid_out_in(t, {0, 1, 2, 3}) && laid_out_in(t, {0, 2, 3, 1})) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && !laid_out_in(t, {0, 1, 2, 3, 4}) && laid_out_in(t, {0, 2, 3, 4, 1})) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

at::TensorOptions accumulate_options(const at::Tensor& like) {
  return like.options().dtype(accumulate_type(like.scalar_type()));
}

template <typename scalar_t>
void reparameterize_kl_forward(const scalar_t* mu, const scalar_t* logvar, int64_t n, uint64_t seed,
                               Reduction reduction, double divisor, scalar_t* z, float* noise, acc_t<scalar_t>* kl) {
  using acc = acc_t<scalar_t>;
  const cpu::KlOutput kl_output = kl == nullptr                 ? cpu::KlOutput::None
                                  : reduction == Reduction::None ? cpu::KlOutput::Elementwise
                                                                 : cpu::KlOutput::Sum;
  std::vector<acc> partials(kl_output == cpu::KlOutput::Sum ? cpu::num_chunks(n, kChunk) : 0);
  at::parallel_for(0, cpu::num_chunks(n, kChunk), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const acc total = cpu::latent_forward(mu, logvar, seed, z, kl, kl_output, c * kChunk,
                                            cpu::chunk_end(c, n, kChunk), noise);
      if (!partials.empty()) partials[c] = total;
    }
  });
  if (kl_output == cpu::KlOutput::Sum) {
    *kl = cpu::ordered_sum(partials) / static_cast<acc>(divisor);
  }
}

// The same with the KL's total per sample. The work is cut into the same fixed chunks as above,
// and each chunk into the stretches of the samples it holds; a sample's total is its stretches'
// sums added in chunk order, so it has the same bits whatever the thread count. With z, a chunk
// is swept twice: z over the whole chunk, as reparameterize_kl_forward does (so the vector/scalar
// split, and eps's last bit, is the same as for every other reduction), then the KL of each
// stretch, reading the chunk (32 KiB of float32 mu and logvar) from cache rather than memory.
template <typename scalar_t>
void reparameterize_kl_per_sample(const scalar_t* mu, const scalar_t* logvar, int64_t samples, int64_t sample_size,
                                  uint64_t seed, scalar_t* z, float* noise, acc_t<scalar_t>* kl) {
  using acc = acc_t<scalar_t>;
  const int64_t n = samples * sample_size, chunks = cpu::num_chunks(n, kChunk);
  // The stretch of chunk c and sample b goes to partials[c + b]: stretches in memory order have
  // increasing, distinct c + b (a later stretch has a later chunk, a later sample, or both).
  std::vector<acc> partials(chunks + samples, acc(0));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk, end = cpu::chunk_end(c, n, kChunk);
      if (z != nullptr) {
        cpu::latent_forward(mu, logvar, seed, z, /*kl=*/nullptr, cpu::KlOutput::None, begin, end, noise);
      }
      for (int64_t i = begin; i < end;) {
        const int64_t sample = i / sample_size, stop = std::min(end, (sample + 1) * sample_size);
        partials[c + sample] = cpu::latent_forward(mu, logvar, seed, /*z=*/static_cast<scalar_t*>(nullptr),
                                                   /*kl=*/nullptr, cpu::KlOutput::Sum, i, stop);
        i = stop;
      }
    }
  });
  for (int64_t sample = 0; sample < samples; ++sample) {
    acc total = 0;
    if (sample_size > 0) {
      const int64_t first_chunk = sample * sample_size / kChunk, last_chunk = ((sample + 1) * sample_size - 1) / kChunk;
      for (int64_t c = first_chunk; c <= last_chunk; ++c) total += partials[c + sample];
    }
    kl[sample] = total;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_cpu(const at::Tensor& mu_in,
                                                                     const at::Tensor& logvar_in,
                                                                     const std::optional<at::Tensor>& seed,
                                                                     c10::string_view reduction_name, bool compute_z,
                                                                     bool compute_kl, bool save_noise) {
  check_pair("mu", mu_in, "logvar", logvar_in);
  check_cpu(mu_in, "mu");
  const Reduction reduction = parse_reduction(reduction_name, /*allow_none=*/true);
  TORCH_CHECK(reduction != Reduction::PerSample || mu_in.dim() >= 2,
              "reduction 'per_sample' sums over every dim but the first, so it needs at least 2 dims, but mu has "
              "shape ", mu_in.sizes());
  const double divisor = reduction_divisor(reduction, mu_in);
  const uint64_t seed_value = compute_z ? read_seed(seed) : 0;
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  // Outputs not asked for are empty, so the schema keeps one fixed return type.
  at::Tensor z = compute_z ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  const bool write_noise = compute_z && save_noise;
  at::Tensor noise = at::empty(write_noise ? mu.sizes() : at::IntArrayRef{0}, mu.options().dtype(at::kFloat));
  at::Tensor kl = !compute_kl                          ? at::empty({0}, accumulate_options(mu))
                  : reduction == Reduction::None      ? at::empty(mu.sizes(), accumulate_options(mu))
                  : reduction == Reduction::PerSample ? at::empty({mu.size(0)}, accumulate_options(mu))
                                                      : at::empty({}, accumulate_options(mu));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_cpu", [&] {
    if (compute_kl && reduction == Reduction::PerSample) {
      const int64_t samples = mu.size(0);
      reparameterize_kl_per_sample(mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(), samples,
                                   samples == 0 ? 0 : mu.numel() / samples, seed_value,
                                   compute_z ? z.mutable_data_ptr<scalar_t>() : nullptr,
                                   write_noise ? noise.mutable_data_ptr<float>() : nullptr,
                                   kl.mutable_data_ptr<acc_t<scalar_t>>());
      return;
    }
    reparameterize_kl_forward(mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(), mu.numel(),
                              seed_value, reduction, divisor,
                              compute_z ? z.mutable_data_ptr<scalar_t>() : nullptr,
                              write_noise ? noise.mutable_data_ptr<float>() : nullptr,
                              compute_kl ? kl.mutable_data_ptr<acc_t<scalar_t>>() : nullptr);
  });
  const at::MemoryFormat memory_format = latent_memory_format(mu_in);
  if (compute_z) z = z.contiguous(memory_format);
  if (compute_kl && reduction == Reduction::None) kl = kl.contiguous(memory_format);
  return {z, kl, noise};
}

// The backward reads the float32 eps the forward saved (with mu and logvar, which the caller keeps
// anyway), where the Triton backward draws it again from the seed: exact at any logvar either way.
// On a CPU, Philox and Box-Muller cost more than the 4 bytes an element of saved eps: measured side
// by side (one process, calls interleaved, 2 threads on a 2-vCPU Intel Xeon VM, with a throwaway
// switch that drew eps again instead), forward + backward took 1.06x (128x128), 1.24x (1024x1024),
// 1.20x (4096x1024) as long in float32 and 1.26x (1024x1024) in bfloat16 when drawing again, with
// bit-equal gradients. On a GPU, whose ALUs idle while it waits on memory, drawing again should
// be nearly free (not measured: no GPU yet).
std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward_cpu(const std::optional<at::Tensor>& grad_z,
                                                                  const std::optional<at::Tensor>& grad_kl,
                                                                  const std::optional<at::Tensor>& noise_in,
                                                                  const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                                  c10::string_view reduction_name) {
  check_pair("mu", mu_in, "logvar", logvar_in);
  check_cpu(mu_in, "mu");
  const Reduction reduction = parse_reduction(reduction_name, /*allow_none=*/true);
  const bool has_grad_z = grad_z.has_value() && grad_z->defined();
  const bool has_grad_kl = grad_kl.has_value() && grad_kl->defined();
  at::Tensor gz, noise;
  if (has_grad_z) {
    TORCH_CHECK(noise_in.has_value() && noise_in->defined(),
                "grad_z needs the forward's noise (reparameterize_kl with save_noise=True), got None");
    check_pair("grad_z", *grad_z, "mu", mu_in);
    TORCH_CHECK(noise_in->scalar_type() == at::kFloat && noise_in->sizes() == mu_in.sizes() &&
                    noise_in->device() == mu_in.device(),
                "noise is ", noise_in->scalar_type(), " of shape ", noise_in->sizes(), " on ", noise_in->device(),
                " but grad_z needs Float of mu's shape ", mu_in.sizes(), " on ", mu_in.device(),
                " (reparameterize_kl with save_noise=True)");
    gz = grad_z->contiguous();
    noise = noise_in->contiguous();
  }
  at::Tensor gkl;
  if (has_grad_kl) {
    const auto acc = accumulate_type(mu_in.scalar_type());
    TORCH_CHECK(grad_kl->scalar_type() == acc && grad_kl->device() == mu_in.device(), "grad_kl is ",
                grad_kl->scalar_type(), " on ", grad_kl->device(), " but kl is ", acc, " on ", mu_in.device());
    if (reduction == Reduction::None) {
      TORCH_CHECK(grad_kl->sizes() == mu_in.sizes(), "grad_kl has shape ", grad_kl->sizes(),
                  " but the elementwise kl has ", mu_in.sizes());
    } else if (reduction == Reduction::PerSample) {
      TORCH_CHECK(mu_in.dim() >= 2 && grad_kl->dim() == 1 && grad_kl->size(0) == mu_in.size(0), "grad_kl has shape ",
                  grad_kl->sizes(), " but the per-sample kl of mu of shape ", mu_in.sizes(), " has (",
                  mu_in.dim() > 0 ? mu_in.size(0) : 0, ")");
    } else {
      TORCH_CHECK(grad_kl->dim() == 0, "grad_kl has shape ", grad_kl->sizes(), " but the reduced kl is 0-dim");
    }
    gkl = grad_kl->contiguous();
  }
  const double divisor = reduction_divisor(reduction, mu_in);
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const bool elementwise = reduction == Reduction::None;
    const bool per_sample = has_grad_kl && reduction == Reduction::PerSample;
    const cpu::LatentGradInputs<scalar_t> in{
        has_grad_z ? gz.const_data_ptr<scalar_t>() : nullptr,
        has_grad_z ? noise.const_data_ptr<float>() : nullptr,
        has_grad_kl && elementwise ? gkl.const_data_ptr<acc>() : nullptr,
        has_grad_kl,
        // Per sample, the weight is set for each sample's stretch below.
        has_grad_kl && !elementwise && !per_sample ? *gkl.const_data_ptr<acc>() / static_cast<acc>(divisor) : acc(0),
        mu.const_data_ptr<scalar_t>(),
        logvar.const_data_ptr<scalar_t>(),
    };
    scalar_t* grad_mu_data = grad_mu.mutable_data_ptr<scalar_t>();
    scalar_t* grad_logvar_data = grad_logvar.mutable_data_ptr<scalar_t>();
    const int64_t sample_size = per_sample && mu.numel() > 0 ? mu.numel() / mu.size(0) : 0;
    // No noise to draw: memory-bound, so the usual chunk size.
    at::parallel_for(0, mu.numel(), cpu::kChunk, [&](int64_t begin, int64_t end) {
      if (!per_sample) return cpu::latent_backward(in, grad_mu_data, grad_logvar_data, begin, end);
      // Each sample's stretch of [begin, end), weighted by the gradient of that sample's total.
      for (int64_t i = begin; i < end;) {
        const int64_t sample = i / sample_size, stop = std::min(end, (sample + 1) * sample_size);
        cpu::LatentGradInputs<scalar_t> stretch = in;
        stretch.kl_weight = gkl.const_data_ptr<acc>()[sample];
        cpu::latent_backward(stretch, grad_mu_data, grad_logvar_data, i, stop);
        i = stop;
      }
    });
  });
  return {grad_mu.contiguous(latent_memory_format(mu_in)), grad_logvar.contiguous(latent_memory_format(logvar_in))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("reparameterize_kl", &reparameterize_kl_cpu);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cpu);
}

}  // namespace fastvae
