"""fastvae.DiagonalGaussian against float64 math written here, without diffusers.

The formulas below are diffusers' DiagonalGaussianDistribution's, in float64: moments split in
two along dim 1, logvar clamped to [-30, 20], KL and NLL summed over dims 1..3. The fused
backends' noise is checked element by element against tests/philox.py (the noise contract);
the reference backend's, by its distribution. tests/test_diffusers.py compares with diffusers'
class itself.
"""

import math

import pytest
import torch
from scipy import stats

import fastvae
from float64_math import philox_eps
from fastvae import ops
from fastvae.distributions import DiagonalGaussian, philox_seed

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Fused backends that can run here: C++ on CPU, Triton on CPU under its interpreter.
FUSED = [b for b in ("cpp", "triton") if ops.unavailable_reason(b, "reparameterize", torch.device("cpu")) is None]
BACKENDS = ["reference", *FUSED]
# (B, C, H, W) latents: the SD VAE's 4 channels; one element; empty batch; odd sizes.
SHAPES = ((2, 4, 8, 8), (1, 1, 1, 1), (0, 4, 3, 3), (3, 3, 5, 7))
# The KL and NLL are accumulated in float32 (float64 for float64) from the rounded moments.
SUM_TOL = {torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5), torch.float32: (1e-4, 1e-5),
           torch.float64: (1e-10, 1e-12)}
# An exp computed in the dtype against float64 rounded to it: an ulp or two.
EXP_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 3e-7, torch.float64: 1e-15}
# z: eps is float32 and agrees with the numpy model to a few ulps, then one rounding to the dtype.
Z_TOL = {torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 8e-3), torch.float32: (4e-6, 2e-6),
         torch.float64: (4e-6, 2e-6)}


def moments(shape, dtype=torch.float64, seed=0, extremes=True, channels_last=False):
    """(B, 2C, H, W) moments; with ``extremes`` some logvars lie beyond the clamp on both sides."""
    b, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)
    logvar = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64).clamp(-3, 1)
    if extremes and logvar.numel():
        logvar.view(-1)[0] = -40.0
        logvar.view(-1)[-1] = 25.0 if dtype in (torch.float32, torch.float64) else -35.0
    parameters = torch.cat([mean, logvar], dim=1).to(dtype)
    if channels_last:
        parameters = parameters.to(memory_format=torch.channels_last)
    return parameters


def split64(parameters):
    """diffusers' mean and clamped logvar, in float64, differentiable in ``parameters``."""
    mean, logvar = torch.chunk(parameters.double(), 2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def float64_kl(parameters, other=None):
    mean, logvar = split64(parameters)
    if other is None:
        return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    other_mean, other_logvar = split64(other)
    return 0.5 * (
        (mean - other_mean) ** 2 / other_logvar.exp() + logvar.exp() / other_logvar.exp() - 1.0 - logvar + other_logvar
    ).sum(dim=(1, 2, 3))


def float64_nll(parameters, sample, dims=(1, 2, 3)):
    mean, logvar = split64(parameters)
    return 0.5 * (math.log(2 * math.pi) + logvar + (sample.double() - mean) ** 2 / logvar.exp()).sum(dim=dims)


def philox_z(parameters, seed):
    mean, logvar = split64(parameters)
    eps = philox_eps(seed, mean.shape)
    return mean + torch.exp(0.5 * logvar) * eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_attributes_are_diffusers_formulas(dtype, channels_last):
    parameters = moments((2, 4, 8, 8), dtype, channels_last=channels_last)
    posterior = DiagonalGaussian(parameters)
    mean, logvar = split64(parameters)
    assert posterior.parameters is parameters
    # mean is a view of the moments, as torch.chunk makes it in diffusers.
    assert posterior.mean.data_ptr() == parameters.data_ptr() and not posterior.mean.is_contiguous()
    assert posterior.mode() is posterior.mean
    for name, expected in (("mean", mean), ("logvar", logvar), ("std", (0.5 * logvar).exp()), ("var", logvar.exp())):
        actual = getattr(posterior, name)
        assert actual.dtype == dtype and actual.shape == (2, 4, 8, 8), name
        # mean and logvar are exact; std and var are an exp in the moments' dtype, as in diffusers.
        rtol = 0 if name in ("mean", "logvar") else EXP_RTOL[dtype]
        torch.testing.assert_close(actual.double(), expected.to(dtype).double(), atol=0, rtol=rtol)
    assert posterior.logvar.min() == -30.0
    if dtype in (torch.float32, torch.float64):
        assert posterior.logvar.max() == 20.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kl_is_per_sample_and_matches_float64(backend, dtype, shape):
    parameters = moments(shape, dtype).requires_grad_()
    kl = DiagonalGaussian(parameters, backend=backend).kl()
    expected = float64_kl(parameters)
    assert kl.shape == (shape[0],)
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol = SUM_TOL[dtype]
    torch.testing.assert_close(kl.double(), expected, atol=atol, rtol=rtol)

    # The gradient reaches the moments through the view and the clamp (zero beyond it).
    weights = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((kl.double() * weights).sum(), parameters) if shape[0] else (None,)
    if grad is not None:
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), parameters)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), expected_grad.to(dtype).double(), atol=atol, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else rtol)


@pytest.fixture
def reductions(monkeypatch):
    """The reduction of each call of ops.kl_divergence while the test runs."""
    calls = []
    kl_divergence = ops.kl_divergence

    def recording(*args, **kwargs):
        calls.append(kwargs["reduction"])
        return kl_divergence(*args, **kwargs)

    monkeypatch.setattr(ops, "kl_divergence", recording)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_one_per_sample_reduction(backend, reductions):
    # 4-D latents: one call of the per-sample KL, no elementwise KL summed afterwards. Moments in
    # channels_last give the same bits from the C++ backend (it reduces row-major copies); Triton
    # reduces in storage order, as torch's sum does, so to float32 rounding.
    parameters = moments((3, 4, 5, 7), torch.float32)
    kl = DiagonalGaussian(parameters, backend=backend).kl()
    assert reductions == ["per_sample"]
    torch.testing.assert_close(kl.double(), float64_kl(parameters), atol=1e-4, rtol=1e-5)
    channels_last = parameters.to(memory_format=torch.channels_last)
    kl_channels_last = DiagonalGaussian(channels_last, backend=backend).kl()
    if backend == "cpp":
        assert torch.equal(kl_channels_last, kl)
    else:
        torch.testing.assert_close(kl_channels_last, kl)


# (latents shape, dims): video latents with diffusers' dims (B, W) and each sample's total; audio
# latents (B, C, T); dims that keep the batch out or in; an empty batch.
DIMS_CASES = (((2, 3, 4, 5, 6), (1, 2, 3)), ((2, 3, 4, 5, 6), (1, 2, 3, 4)), ((3, 4, 9), (1, 2)),
              ((3, 4, 9), (1,)), ((2, 3, 4, 5), (0, 2)), ((2, 3, 4, 5), (0, 1, 2, 3)), ((0, 3, 2, 2, 2), (1, 2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,dims", DIMS_CASES, ids=str)
def test_kl_over_any_dims_matches_float64(backend, channels_last, shape, dims, reductions):
    # diffusers sums dims 1, 2 and 3 whatever the rank: (B, C, T, H, W) gives (B, W). Each
    # sample's total (of any rank and layout) is one call of the fused per-sample KL, all dims
    # the fused sum; other dims the fused elementwise KL, summed.
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn(shape, generator=generator, dtype=torch.float64)
    logvar = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1.5
    parameters = torch.cat([mean, logvar], dim=1).float()
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
    if channels_last and len(shape) in layouts:
        parameters = parameters.to(memory_format=layouts[len(shape)])
    parameters.requires_grad_()
    kl = DiagonalGaussian(parameters, backend=backend).kl(dims=dims)
    if dims == tuple(range(1, len(shape))):
        assert reductions == ["per_sample"]
    else:
        assert reductions == ["sum" if len(dims) == len(shape) else "none"]
    mean64, logvar64 = torch.chunk(parameters.double(), 2, dim=1)
    expected = 0.5 * (mean64**2 + logvar64.exp() - 1.0 - logvar64).sum(dim=dims)
    assert kl.shape == expected.shape and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), expected, atol=1e-4, rtol=1e-5)
    if kl.numel():
        weights = torch.linspace(0.5, 1.5, kl.numel(), dtype=torch.float64).view(kl.shape)
        (grad,) = torch.autograd.grad((kl.double() * weights).sum(), parameters)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), parameters)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_between_two_gaussians(dtype):
    parameters, other = moments((2, 4, 5, 3), dtype, seed=1), moments((2, 4, 5, 3), dtype, seed=2, extremes=False)
    kl = DiagonalGaussian(parameters).kl(DiagonalGaussian(other))
    atol, rtol = SUM_TOL[dtype]
    torch.testing.assert_close(kl.double(), float64_kl(parameters, other), atol=atol, rtol=max(rtol, 1e-5))
    # Against itself the KL is zero.
    same = DiagonalGaussian(other)
    torch.testing.assert_close(same.kl(same), torch.zeros(2, dtype=kl.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, 2, 3), (1,), (0, 1, 2, 3)], ids=str)
def test_nll(dtype, dims):
    parameters = moments((2, 4, 6, 6), dtype, extremes=False)
    sample = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    nll = DiagonalGaussian(parameters).nll(sample, dims=dims)
    atol, rtol = SUM_TOL[dtype]
    torch.testing.assert_close(nll.double(), float64_nll(parameters, sample, dims), atol=atol, rtol=max(rtol, 1e-5))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_is_the_kernel_noise_of_the_generators_seed(backend, dtype, channels_last):
    parameters = moments((2, 4, 6, 5), dtype, channels_last=channels_last).requires_grad_()
    generator = torch.Generator().manual_seed(1234)
    seed = philox_seed(torch.Generator().manual_seed(1234))
    z = DiagonalGaussian(parameters, backend=backend).sample(generator=generator)
    expected = philox_z(parameters, seed)
    assert z.dtype == dtype and z.shape == (2, 4, 6, 5)
    atol, rtol = Z_TOL[dtype]
    torch.testing.assert_close(z.double(), expected, atol=atol, rtol=rtol)

    # Gradients: 1 for the mean, 0.5 * std * eps for the logvar inside the clamp, 0 beyond it.
    weights = torch.rand(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (grad,) = torch.autograd.grad((z.double() * weights).sum(), parameters)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), parameters)
    torch.testing.assert_close(grad.double(), expected_grad.to(dtype).double(), atol=atol, rtol=rtol)
    assert grad[0, 4, 0, 0] == 0  # logvar -40, clamped


def test_generator_reproduces_and_advances():
    parameters = moments((2, 4, 8, 8), torch.float32)
    posterior = DiagonalGaussian(parameters)
    generator = torch.Generator().manual_seed(7)
    first, second = posterior.sample(generator), posterior.sample(generator)
    assert not torch.equal(first, second)
    generator.manual_seed(7)
    torch.testing.assert_close(posterior.sample(generator), first, atol=0, rtol=0)
    torch.testing.assert_close(posterior.sample(generator), second, atol=0, rtol=0)
    assert not torch.equal(posterior.sample(torch.Generator().manual_seed(8)), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_generator_seeds_cuda_samples():
    posterior = DiagonalGaussian(moments((2, 4, 8, 8), torch.float32).cuda())
    generator = torch.Generator(device="cuda").manual_seed(7)
    first, second = posterior.sample(generator), posterior.sample(generator)
    assert not torch.equal(first, second)
    generator.manual_seed(7)
    torch.testing.assert_close(posterior.sample(generator), first, atol=0, rtol=0)


def test_default_generator_makes_samples_reproducible():
    posterior = DiagonalGaussian(moments((2, 4, 8, 8), torch.float32))
    torch.manual_seed(3)
    first = posterior.sample()
    torch.manual_seed(3)
    torch.testing.assert_close(posterior.sample(), first, atol=0, rtol=0)


def test_a_list_of_generators_seeds_each_row():
    parameters = moments((3, 4, 4, 4), torch.float32)
    posterior = DiagonalGaussian(parameters)
    z = posterior.sample([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for row, s in enumerate((1, 2, 3)):
        alone = DiagonalGaussian(parameters[row : row + 1]).sample(torch.Generator().manual_seed(s))
        torch.testing.assert_close(z[row : row + 1], alone, atol=0, rtol=0)
    # One generator in a list is that generator, as in diffusers.
    torch.testing.assert_close(
        posterior.sample([torch.Generator().manual_seed(1)]), posterior.sample(torch.Generator().manual_seed(1)),
        atol=0, rtol=0,
    )
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 3"):
        posterior.sample([torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_are_normal_around_the_mean(backend):
    parameters = moments((4, 4, 32, 32), torch.float32, extremes=False)
    posterior = DiagonalGaussian(parameters, backend=backend)
    standardized = (posterior.sample(torch.Generator().manual_seed(0)) - posterior.mean) / posterior.std
    result = stats.kstest(standardized.double().flatten().numpy(), "norm")
    assert result.pvalue > 1e-3, result


def test_deterministic():
    parameters = moments((2, 4, 3, 3), torch.float32).requires_grad_()
    posterior = DiagonalGaussian(parameters, deterministic=True)
    assert torch.count_nonzero(posterior.std) == 0 and torch.count_nonzero(posterior.var) == 0
    generator = torch.Generator().manual_seed(0)
    z = posterior.sample(generator)
    torch.testing.assert_close(z, posterior.mean, atol=0, rtol=0)
    assert z.data_ptr() != parameters.data_ptr()  # a copy: writing to it leaves the moments alone
    # The generator moves as for a random posterior (diffusers draws its noise either way), so a
    # script's later draws do not depend on deterministic.
    random = torch.Generator().manual_seed(0)
    DiagonalGaussian(parameters.detach()).sample(random)
    assert torch.equal(generator.get_state(), random.get_state())
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    posterior.sample(generators)
    assert all(not torch.equal(g.get_state(), torch.Generator().manual_seed(i).get_state())
               for i, g in enumerate(generators))
    for value in (posterior.kl(), posterior.nll(z)):
        assert value.shape == (1,) and value.item() == 0 and value.device == parameters.device


def test_bad_inputs_name_what_was_expected():
    with pytest.raises(TypeError, match="parameters must be a torch.Tensor, got list"):
        DiagonalGaussian([1.0, 2.0])
    with pytest.raises(TypeError, match="parameters must be float16, bfloat16, float32 or float64, got torch.int64"):
        DiagonalGaussian(torch.zeros(2, 8, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mean and logvar stacked along dim 1, got shape \(2, 7, 4, 4\)"):
        DiagonalGaussian(torch.zeros(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"got shape \(8\)"):
        DiagonalGaussian(torch.zeros(8))
    with pytest.raises(TypeError, match="deterministic must be a bool, got int"):
        DiagonalGaussian(torch.zeros(2, 8, 4, 4), deterministic=1)
    audio = DiagonalGaussian(torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match=r"kl sums over dims \(1, 2, 3\), which latents of shape \(2, 4, 4\) \(3 dims\) do not have; pass dims=, e.g. dims=\(1, 2\)"):
        audio.kl()
    with pytest.raises(ValueError, match=r"nll sums over dims \(1, 2, 3\), which latents of shape \(2, 4, 4\)"):
        audio.nll(torch.zeros(2, 4, 4))
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"other has latents of shape \(2, 4, 2, 2\) but self has \(2, 4, 4, 4\)"):
        posterior.kl(DiagonalGaussian(torch.zeros(2, 8, 2, 2)))
    with pytest.raises(ValueError, match="other is deterministic"):
        posterior.kl(DiagonalGaussian(torch.zeros(2, 8, 4, 4), deterministic=True))
    with pytest.raises(TypeError, match=r"other must be a Gaussian with mean and logvar tensors .* or None for N\(0, 1\), got int"):
        posterior.kl(3)
    with pytest.raises(ValueError, match=r"sample has shape \(2, 4, 4\) but the latents have \(2, 4, 4, 4\)"):
        posterior.nll(torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got float"):
        posterior.nll(1.0)
    with pytest.raises(TypeError, match="kl dims must be a sequence of ints, got 'ab'"):
        posterior.kl(dims="ab")
    with pytest.raises(TypeError, match=r"nll dims must be a sequence of ints, got \(1.0,\)"):
        posterior.nll(torch.zeros(2, 4, 4, 4), dims=(1.0,))
    with pytest.raises(ValueError, match=r"kl dims name a dim twice: \(1, -3\)"):
        posterior.kl(dims=(1, -3))
    with pytest.raises(ValueError, match=r"kl dims must name at least one dim, got \(\)"):
        posterior.kl(dims=())
    with pytest.raises(ValueError, match=r"kl sums over dims \(1, 4\), which latents of shape \(2, 4, 4, 4\) \(4 dims\)"):
        posterior.kl(dims=(1, 4))
    # Checked before the shortcut of a deterministic posterior, which computes nothing.
    with pytest.raises(TypeError, match="got int"):
        DiagonalGaussian(torch.zeros(2, 8, 4, 4), deterministic=True).kl(3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        posterior.sample(generator=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        DiagonalGaussian(torch.zeros(2, 8, 4, 4), backend="cuda").sample()


def test_exported_from_fastvae():
    assert fastvae.DiagonalGaussian is DiagonalGaussian
