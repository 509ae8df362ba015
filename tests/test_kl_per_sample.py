"""reduction="per_sample" of kl_divergence and reparameterize_kl, on every backend.

Each sample's KL total over every dim but the first, shape (B,): checked against
fastvae.reference and float64 math written here, forward and backward. The Triton kernels run
under Triton's interpreter on CPU tensors when there is no GPU (tests/conftest.py).
"""

import pytest
import torch
from conftest import DEVICES, skip_unless_backend_runs

from float64_math import float64_kl_per_sample, float64_z, philox_eps
from fastvae import ops, reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Each case skips, saying why, where its backend cannot run on its device (skip_unless_backend_runs).
FUSED = ["cpp", "triton"]
BACKENDS = ["reference", *FUSED]
# Empty batch; one sample; one element per sample; per-sample sizes not a multiple of Triton's
# 1024-element tile; samples straddling the C++ kernel's 4096-element chunks, and several samples
# per chunk; a 4-D latent map.
SHAPES = ((0, 8), (1, 5), (5, 1), (3, 1000), (3, 5003), (700, 13), (2, 4, 16, 16))
SMALL_SHAPES = ((1, 5), (5, 1), (3, 1000), (2, 3, 5, 7))
# Totals of up to 5003 terms of order 1, accumulated in float32 (float64 for float64) in a
# different order from torch's sum.
KL_TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-12, 1e-12)}
# Gradients: float32 (float64) math rounded once to the input dtype.
GRAD_TOL = {torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 8e-3), torch.float32: (1e-5, 1e-5),
            torch.float64: (1e-12, 1e-12)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_inputs(device, dtype, shape, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=generator, dtype=torch.float64)
    logvar = torch.randn(shape, generator=generator, dtype=torch.float64).clamp(-3, 1)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu, logvar))


def assert_close(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kl_divergence_per_sample_matches_reference_and_float64(device, backend, dtype, shape):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, dtype, shape)
    kl = ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend)
    assert kl.shape == (shape[0],) and kl.dtype == acc_dtype(dtype) and kl.device == mu.device
    tol = KL_TOL[acc_dtype(dtype)]
    assert_close(kl, reference.kl_divergence(mu, logvar, reduction="per_sample"), tol)
    assert_close(kl.cpu(), float64_kl_per_sample(mu.cpu(), logvar.cpu()), tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reparameterize_kl_per_sample_is_both_ops_in_one(device, backend, dtype, shape):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, dtype, shape)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=77, backend=backend)
    # The same noise and the same per-sample sums as the separate ops, to the bit.
    assert torch.equal(z, ops.reparameterize(mu, logvar, seed=77, backend=backend))
    assert torch.equal(kl, ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend))
    assert_close(kl.cpu(), float64_kl_per_sample(mu.cpu(), logvar.cpu()), KL_TOL[acc_dtype(dtype)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_empty_samples_total_zero(device, backend):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, torch.float32, (4, 0))
    kl = ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend)
    assert torch.equal(kl.cpu(), torch.zeros(4))
    assert torch.equal(kl, reference.kl_divergence(mu, logvar, reduction="per_sample"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_non_contiguous_inputs_match_contiguous_copies(device, backend, dtype):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    base_mu, base_logvar = sample_inputs(device, dtype, (24, 70))
    for view in (lambda t: t.t(), lambda t: t[:, ::3], lambda t: t.view(24, 7, 10).permute(1, 0, 2)):
        mu, logvar = view(base_mu), view(base_logvar)
        assert not mu.is_contiguous()
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=5, backend=backend)
        z_c, kl_c = ops.reparameterize_kl(mu.contiguous(), logvar.contiguous(), reduction="per_sample", seed=5,
                                          backend=backend)
        assert torch.equal(z, z_c) and torch.equal(kl, kl_c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_channels_last_latents(device, backend):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = (t.to(memory_format=torch.channels_last) for t in sample_inputs(device, torch.float32, (3, 5, 7, 9)))
    assert not mu.is_contiguous()
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=4, backend=backend)
    z_c, kl_c = ops.reparameterize_kl(mu.contiguous(), logvar.contiguous(), reduction="per_sample", seed=4,
                                      backend=backend)
    assert torch.equal(z, z_c) and z.is_contiguous(memory_format=torch.channels_last)
    if backend == "cpp":
        # C++ reduces a contiguous copy: the same bits, as its other reductions.
        assert torch.equal(kl, kl_c)
    else:
        # Triton reads the sample in memory order, as its other reductions: the same to rounding.
        assert_close(kl, kl_c, KL_TOL[torch.float32])
    assert_close(kl.cpu(), float64_kl_per_sample(mu.cpu(), logvar.cpu()), KL_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Gradients


def grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_kl_divergence_per_sample_gradients_match_reference(device, backend, dtype, shape):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, dtype, shape, requires_grad=True)
    kl = ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend)
    # A different weight per sample, so each element must take its own sample's.
    grad_kl = torch.linspace(0.5, 2.0, shape[0], dtype=kl.dtype, device=device)
    actual = grads(kl, (mu, logvar), grad_kl)
    expected = grads(reference.kl_divergence(mu, logvar, reduction="per_sample"), (mu, logvar), grad_kl)
    for a, e in zip(actual, expected):
        assert a.dtype == dtype and a.shape == shape
        assert_close(a, e, GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_kl_per_sample_gradients_match_float64(device, backend, dtype):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    shape = (3, 1000)
    mu, logvar = sample_inputs(device, dtype, shape, requires_grad=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=99, backend=backend)
    grad_z = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).double()
    grad_kl = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    actual = grads((z, kl), (mu, logvar), (grad_z.to(device, dtype), grad_kl.to(device, kl.dtype)))
    mu64, logvar64 = (t.detach().cpu().double().requires_grad_() for t in (mu, logvar))
    outputs64 = (float64_z(mu64, logvar64, philox_eps(99, shape)), float64_kl_per_sample(mu64, logvar64))
    expected = grads(outputs64, (mu64, logvar64), (grad_z, grad_kl))
    for a, e in zip(actual, expected):
        # eps is float32 in the kernels: a few float32 ulps of z's gradient in float64.
        tol = (1e-5, 1e-5) if dtype == torch.float64 else GRAD_TOL[dtype]
        assert_close(a.cpu(), e, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_gradient_of_a_later_sum(device, backend):
    # kl.sum()'s backward hands the op an expanded (stride 0) gradient.
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, torch.float32, (4, 3, 5, 5), requires_grad=True)
    actual = grads(ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend).sum(), (mu, logvar), None)
    expected = grads(reference.kl_divergence(mu, logvar, reduction="sum"), (mu, logvar), None)
    for a, e in zip(actual, expected):
        assert_close(a, e, GRAD_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.skipif(ops.unavailable_reason("cpp", "kl_divergence", torch.device("cpu")) is not None,
                    reason="fastvae._C is not loaded")
@pytest.mark.parametrize("shape", [(3, 20000), (5000, 7), (2, 4, 64, 64)], ids=str)
def test_cpp_per_sample_has_the_same_bits_at_any_thread_count(shape):
    mu, logvar = sample_inputs("cpu", torch.float32, shape, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=3, backend="cpp")
            grad_kl = torch.linspace(-1, 1, shape[0])
            results.append((z, kl, *grads((z, kl), (mu, logvar), (torch.ones_like(z), grad_kl))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_repeated_calls_give_the_same_bits(device, backend):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, torch.float32, (6, 3000))
    first = ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend)
    for _ in range(3):
        assert torch.equal(ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend), first)


# Few large samples, each total split across programs (the Triton kernels' _splits): a power-of-
# two count of tiles, a count the split does not divide, a partial last tile, one sample, in both
# accumulate dtypes; and batches either side of the limit of PER_SAMPLE_PROGRAMS programs, where
# splitting stops (float32 only: the interpreter runs their hundreds of programs one by one).
SPLIT_CASES = [(shape, dtype) for shape in ((2, 4, 32, 32), (1, 5003), (3, 2049))
               for dtype in (torch.float32, torch.float64)] + [((256, 1025), torch.float32), ((257, 1025), torch.float32)]


def test_split_count_follows_the_shape_alone():
    pytest.importorskip("triton")
    from fastvae.kernels import reparameterize_kl as kernels

    shapes = ((2, 4096), (1, 5003), (3, 2049), (256, 1025), (257, 1025), (2, 65536), (1, 2**24))
    assert [kernels._splits(*shape) for shape in shapes] == [4, 4, 2, 2, 1, 64, kernels.PER_SAMPLE_PROGRAMS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "dtype"), SPLIT_CASES, ids=str)
def test_samples_split_across_programs(device, shape, dtype):
    skip_unless_backend_runs("triton", "reparameterize_kl", device)
    mu, logvar = sample_inputs(device, dtype, shape)
    kl = ops.kl_divergence(mu, logvar, reduction="per_sample", backend="triton")
    assert_close(kl.cpu(), float64_kl_per_sample(mu.cpu(), logvar.cpu()), KL_TOL[dtype])
    # The same launch writing z too, and the same bits again: the partials are summed in order.
    z, kl_with_z = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=5, backend="triton")
    assert torch.equal(kl_with_z, kl)
    assert_close(z.cpu(), float64_z(mu.cpu(), logvar.cpu(), philox_eps(5, mu.shape)), GRAD_TOL[dtype])
    assert torch.equal(ops.kl_divergence(mu, logvar, reduction="per_sample", backend="triton"), kl)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile


def opcheck_cases(backend, device):
    mu, logvar = sample_inputs(device, torch.float32, (5, 3, 4, 6), requires_grad=True)
    seed = torch.tensor(17, device=device)
    grad_z, grad_kl = torch.randn(mu.shape, device=device), torch.randn(5, device=device)
    mu_, logvar_ = mu.detach(), logvar.detach()
    if backend == "triton":
        fastvae_ops = torch.ops.fastvae
        backward = fastvae_ops.triton_reparameterize_kl_backward.default
        return [
            (fastvae_ops.triton_kl_divergence.default, (mu, logvar, "per_sample")),
            (fastvae_ops.triton_reparameterize_kl.default, (mu, logvar, seed, "per_sample")),
            (backward, (grad_z, grad_kl, mu_, logvar_, seed, "per_sample")),
            (backward, (None, grad_kl, mu_, logvar_, None, "per_sample")),
        ]
    _, _, noise = torch.ops.fastvae.reparameterize_kl.default(mu_, logvar_, seed, "per_sample", True, True, True)
    return [
        (torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed, "per_sample", True, True, True)),
        (torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, None, "per_sample", False, True, False)),
        (torch.ops.fastvae.reparameterize_kl_backward.default, (grad_z, grad_kl, noise, mu_, logvar_, "per_sample")),
        (torch.ops.fastvae.reparameterize_kl_backward.default, (None, grad_kl, None, mu_, logvar_, "per_sample")),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(device, backend):
    skip_unless_backend_runs(backend, "reparameterize_kl", device)
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_matches_eager(backend):
    skip_unless_backend_runs(backend, "reparameterize_kl", "cpu")
    torch._dynamo.reset()

    def step(mu, logvar):
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="per_sample", seed=21, backend=backend)
        return z.square().mean() + kl.mean() + ops.kl_divergence(mu, logvar, reduction="per_sample", backend=backend)

    mu, logvar = sample_inputs("cpu", torch.float32, (4, 2, 3, 5), requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(mu, logvar)
    expected_loss = step(mu, logvar)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, expected_loss)
    grad_loss = torch.linspace(0.5, 1.5, 4)
    for a, e in zip(grads(loss, (mu, logvar), grad_loss), grads(expected_loss, (mu, logvar), grad_loss)):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8,), ()], ids=str)
def test_per_sample_needs_two_dims(backend, shape):
    skip_unless_backend_runs(backend, "reparameterize_kl", "cpu")
    mu = torch.zeros(shape)
    match = rf"reduction 'per_sample' .* needs at least 2 dims, but mu has shape \({', '.join(map(str, shape))}\)"
    with pytest.raises(ValueError, match=match):
        ops.kl_divergence(mu, mu, reduction="per_sample", backend=backend)
    with pytest.raises(ValueError, match=match):
        ops.reparameterize_kl(mu, mu, reduction="per_sample", seed=0, backend=backend)


@pytest.mark.cpp_raises
@pytest.mark.skipif(ops.unavailable_reason("cpp", "kl_divergence", torch.device("cpu")) is not None,
                    reason="fastvae._C is not loaded")
def test_cpp_operator_checks_its_own_inputs():
    mu = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"needs at least 2 dims, but mu has shape \[8\]"):
        torch.ops.fastvae.reparameterize_kl.default(mu, mu, None, "per_sample", False, True, False)
    mu = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match=r"grad_kl has shape \[4\] but the per-sample kl of mu of shape \[3, 4\]"):
        torch.ops.fastvae.reparameterize_kl_backward.default(None, torch.zeros(4), None, mu, mu, "per_sample")
    with pytest.raises(RuntimeError, match="'none', 'per_sample', got 'per_row'"):
        torch.ops.fastvae.reparameterize_kl.default(mu, mu, None, "per_row", False, True, False)
