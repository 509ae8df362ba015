"""What every fused latent backend (Triton, C++) guarantees: exact gradients, and z in the input's layout.

The fused latent backward is exact to rounding at any logvar, in every dtype.

Measured as a diffusers AutoencoderKL user runs it: latents 8x4x16x16, mu of Stable Diffusion's
scale (|mu| up to ~20), logvar across diffusers' clamp range [-30, 20], one value per batch item.
A backward that takes dz/dlogvar as 0.5 * (z - mu), or rebuilds mu as z - std * eps, loses
std * eps to z's rounding when std is small next to mu or the dtype is narrow; it fails here.

The expected gradients are float64 math on the contract's eps (tests/philox.py). Each element
may be off by the dtype's rounding of the result, relative to the sum of the magnitudes of the
terms added (so a cancellation is not held against the kernel), plus what eps itself may differ
by (libm or Sleef against numpy: 4e-6 + 2e-6 * |eps|), scaled by its weight.
"""

import pytest
import torch
from conftest import DEVICES, skip_unless_backend_runs

from float64_math import philox_eps
from fastvae import ops

BACKENDS = ("triton", "cpp")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One logvar per batch item: the bottom of diffusers' clamp range to its top.
LOGVARS = (-30.0, -25.0, -20.0, -10.0, 0.0, 10.0, 15.0, 20.0)
SHAPE = (8, 4, 16, 16)
SEED = 2024
# The result's rounding to its dtype plus float32 arithmetic before it (a few ulps). bfloat16
# allows a whole ulp: Triton's interpreter truncates float32 -> bfloat16 where GPUs round.
RTOL = {torch.float16: 6e-4, torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-12}
EPS_ATOL, EPS_RTOL = 4e-6, 2e-6


def latents(device, dtype, logvars):
    """mu of SD scale; logvar constant over each batch item, taking the values of ``logvars``."""
    generator = torch.Generator().manual_seed(0)
    mu = 5 * torch.randn(len(logvars), *SHAPE[1:], generator=generator, dtype=torch.float64)
    logvar = torch.tensor(logvars, dtype=torch.float64).view(-1, 1, 1, 1).expand_as(mu).contiguous()
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (mu, logvar))


def upstream(dtype, kl, which):
    """grad_z (exactly representable in the dtype) and grad_kl, or None for the one not used."""
    generator = torch.Generator().manual_seed(1)
    grad_z = torch.randn(SHAPE, generator=generator).to(dtype) if which in ("z alone", "z", "both") else None
    grad_kl = 0.5 + torch.rand(kl.shape, generator=generator, dtype=kl.dtype) if which in ("kl", "both") else None
    return grad_z, grad_kl


def float64_grads(mu, logvar, grad_z, grad_kl):
    """(value, magnitude) of grad_mu and of grad_logvar, and the weight of eps in grad_logvar."""
    mu, logvar = mu.detach().cpu().double(), logvar.detach().cpu().double()
    eps = philox_eps(SEED, SHAPE)
    zero = torch.zeros_like(mu)
    gz = zero if grad_z is None else grad_z.double()
    w = zero if grad_kl is None else grad_kl.double().expand_as(mu) / mu.shape[0]  # batchmean
    z_term = gz * 0.5 * torch.exp(0.5 * logvar) * eps
    kl_term = w * 0.5 * (torch.exp(logvar) - 1)
    grad_mu = (gz + w * mu, gz.abs() + (w * mu).abs())
    grad_logvar = (z_term + kl_term, z_term.abs() + kl_term.abs())
    eps_weight = (gz * 0.5 * torch.exp(0.5 * logvar)).abs()
    return grad_mu, grad_logvar, eps_weight * (EPS_ATOL + EPS_RTOL * eps.abs())


def assert_exact_to_rounding(name, actual, expected, magnitude, eps_error, logvars=LOGVARS):
    actual = actual.detach().cpu()
    dtype = actual.dtype
    rounded = expected.to(dtype)
    # The smallest subnormal: a result that rounds into the subnormals is off by up to half of it.
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    bound = RTOL[dtype] * magnitude + eps_error + tiny
    error = (actual.double() - expected).abs()
    overflowed = rounded.isinf()
    bad = torch.where(overflowed, actual != rounded, ~(error <= bound))
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        relative = (error / magnitude.clamp_min(tiny)).amax(dim=(1, 2, 3))
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} elements off, first at {index} (logvar "
            f"{logvars[index[0]]}): {actual[index].item()!r} vs {expected[index].item()!r}; worst "
            f"relative error per logvar: {dict(zip(logvars, (f'{r:.1e}' for r in relative.tolist())))}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["z alone", "z", "kl", "both"])
# float16 z overflows at logvar 20 (std * eps > 65504): numpy warns under Triton's interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_latent_gradients_are_exact_at_any_logvar(backend, device, dtype, which):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = latents(device, dtype, LOGVARS)
    if which == "z alone":  # reparameterize, the op without the KL
        z, kl = ops.reparameterize(mu, logvar, seed=SEED, backend=backend), None
    else:
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=SEED, backend=backend)
    grad_z, grad_kl = upstream(dtype, kl, which)
    outputs = [(out, g.to(device)) for out, g in ((z, grad_z), (kl, grad_kl)) if g is not None]
    actual = torch.autograd.grad([o for o, _ in outputs], (mu, logvar), [g for _, g in outputs])
    (mu_value, mu_magnitude), (lv_value, lv_magnitude), eps_error = float64_grads(mu, logvar, grad_z, grad_kl)
    assert_exact_to_rounding("grad_mu", actual[0], mu_value, mu_magnitude, torch.zeros_like(eps_error))
    assert_exact_to_rounding("grad_logvar", actual[1], lv_value, lv_magnitude, eps_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# exp(1000) is inf, and z with it; Triton's interpreter (numpy) warns where a GPU stays silent.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_grad_mu_is_exact_at_extreme_logvar(backend, device, dtype):
    # At logvar 40 std * eps swamps mu in z (float32 lost mu entirely: grad_mu 0 for 0.5), and at
    # 1000 std is inf (z - std * eps was NaN). grad_mu = grad_z + grad_kl * mu needs neither.
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    extremes = (40.0, 1000.0) * 4
    mu, logvar = latents(device, dtype, extremes)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=SEED, backend=backend)
    grad_z, grad_kl = upstream(dtype, kl, "both")
    grad_mu, _ = torch.autograd.grad((z, kl), (mu, logvar), (grad_z.to(device), grad_kl.to(device)))
    (value, magnitude), _, _ = float64_grads(mu, logvar, grad_z, grad_kl)
    assert grad_mu.isfinite().all()
    assert_exact_to_rounding("grad_mu", grad_mu, value, magnitude, torch.zeros_like(value), extremes)


# ---------------------------------------------------------------------------------------------
# Memory format: channels-last in, channels-last out, with the contiguous copy's values.

LAYOUTS = [
    pytest.param((8, 4, 16, 16), torch.channels_last, id="channels_last"),
    pytest.param((2, 3, 4, 5, 6), torch.channels_last_3d, id="channels_last_3d"),
]


def run_op(backend, mu, logvar):
    """z, the elementwise KL and the gradients of both with respect to mu and logvar."""
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="none", seed=SEED, backend=backend)
    generator = torch.Generator().manual_seed(3)
    grad_z = torch.randn(z.shape, generator=generator).to(device=z.device, dtype=z.dtype)
    grad_kl = torch.randn(kl.shape, generator=generator).to(device=kl.device, dtype=kl.dtype)
    return (z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize(("shape", "memory_format"), LAYOUTS)
def test_outputs_keep_the_channels_last_format(backend, device, dtype, shape, memory_format):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    generator = torch.Generator().manual_seed(4)
    mu, logvar = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    laid_out = [t.to(memory_format=memory_format).requires_grad_() for t in (mu, logvar)]
    contiguous = [t.clone().requires_grad_() for t in (mu, logvar)]
    assert not laid_out[0].is_contiguous()
    actual, expected = run_op(backend, *laid_out), run_op(backend, *contiguous)
    for name, a, e in zip(("z", "kl", "grad_mu", "grad_logvar"), actual, expected):
        # Same eps per element (the noise counter is the logical index), so the same bits.
        assert torch.equal(a, e), name
        assert a.is_contiguous(memory_format=memory_format) and a.stride() == laid_out[0].stride(), name
        assert e.is_contiguous(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_chunk_of_channels_last_moments_gives_channels_last_outputs(backend, device):
    # diffusers' posterior: torch.chunk(moments, 2, dim=1) of a channels-last model's moments, a
    # view that is not dense. torch's elementwise ops (the reference) give channels-last results.
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    moments = torch.randn(8, 8, 5, 4, generator=torch.Generator().manual_seed(5)).to(device)
    mu, logvar = torch.chunk(moments.to(memory_format=torch.channels_last), 2, dim=1)
    assert not mu.is_contiguous(memory_format=torch.channels_last)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="none", seed=SEED, backend=backend)
    z_copy, kl_copy = ops.reparameterize_kl(mu.contiguous(), logvar.contiguous(), reduction="none",
                                            seed=SEED, backend=backend)
    ref_z, ref_kl = ops.reparameterize_kl(mu, logvar, reduction="none", seed=SEED, backend="reference")
    for a, copy, ref in ((z, z_copy, ref_z), (kl, kl_copy, ref_kl)):
        assert a.stride() == ref.stride() and a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, copy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_other_layouts_give_contiguous_outputs(backend, device):
    # A slice of a contiguous tensor, a transposed matrix and one channel of a channels-last
    # tensor (both formats at once) give contiguous outputs of the same values.
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    base = torch.randn(8, 6, 5, 4, generator=torch.Generator().manual_seed(5)).to(device)
    for view in (base[:, :4], base[0, 0].t(), base.to(memory_format=torch.channels_last)[:, :1]):
        z, kl = ops.reparameterize_kl(view, view, reduction="none", seed=SEED, backend=backend)
        copy = view.contiguous()
        z_copy, kl_copy = ops.reparameterize_kl(copy, copy, reduction="none", seed=SEED, backend=backend)
        assert z.is_contiguous() and kl.is_contiguous()
        assert torch.equal(z, z_copy) and torch.equal(kl, kl_copy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_kernels_give_the_channels_last_strides(backend, device):
    # opcheck compares the fake kernels' strides with the real ones', forward and backward.
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    dense = [torch.randn(2, 4, 3, 5, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    chunked = torch.chunk(torch.randn(2, 8, 3, 5, device=device).to(memory_format=torch.channels_last), 2, dim=1)
    seed = torch.tensor(SEED)
    for mu, logvar in (dense, chunked):
        mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
        if backend == "triton":
            cases = [(torch.ops.fastvae.triton_reparameterize_kl.default, (mu, logvar, seed, "none")),
                     (torch.ops.fastvae.triton_reparameterize.default, (mu, logvar, seed))]
        else:
            cases = [(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed, "none", True, True, True))]
        for op, args in cases:
            torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# torch.func: docs/api.md says its transforms raise on the fused backends, even for first
# derivatives; the reference backend supports them.

LATENT_OPS = {
    "reparameterize": lambda mu, logvar, backend: ops.reparameterize(mu, logvar, seed=SEED, backend=backend).sum(),
    "kl_divergence": lambda mu, logvar, backend: ops.kl_divergence(mu, logvar, backend=backend),
    "reparameterize_kl": lambda mu, logvar, backend: ops.reparameterize_kl(mu, logvar, seed=SEED, backend=backend)[1],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(LATENT_OPS))
def test_torch_func_grad_raises_on_the_fused_backends(backend, op):
    skip_unless_backend_runs(backend, op, "cpu")
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(LATENT_OPS[op])(mu, logvar, backend)


@pytest.mark.parametrize("op", sorted(LATENT_OPS))
def test_torch_func_grad_of_the_reference_is_autograds(op):
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = torch.autograd.grad(LATENT_OPS[op](mu.requires_grad_(), logvar, "reference"), mu)[0]
    torch.testing.assert_close(torch.func.grad(LATENT_OPS[op])(mu.detach(), logvar, "reference"), expected)
