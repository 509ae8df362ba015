"""The Triton reparameterize / KL kernels against fastvae.reference and float64 math.

eps comes from tests/philox.py, an independent model of the in-kernel noise (float64 on a GPU
excepted: see kernel_eps), so z and its gradients are checked element by element. Without a GPU the kernels run under Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import gc
import os
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import TRITON_DEVICES as DEVICES  # Triton takes CPU tensors only under its interpreter
from conftest import skip_unless_backend_runs

import philox
from float64_math import float64_kl, float64_kl_per_sample, float64_z, philox_eps

from fastvae import ops, reference

# CPU-only torch wheels come without triton; the Triton backend then has nothing to test.
pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastvae.kernels import reparameterize_kl as kernels  # noqa: E402
from fastvae.kernels.reparameterize_kl import _num_tiles  # noqa: E402

REDUCTIONS = ("sum", "batchmean", "mean", "none")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Empty, one element, not a multiple of the 1024-element tile, several tiles per program on CPU
# (its grid is 4 programs), and a 4-D latent map that is an exact number of tiles.
SHAPES = ((0, 8), (1,), (3, 1000), (41, 401), (2, 4, 16, 16))
SMALL_SHAPES = ((1,), (3, 1000), (2, 4, 16, 16))

# z and the gradients are computed in float32 (float64) and rounded once to the input dtype:
# half an ulp (rtol), plus float32 noise in eps near zero (atol).
Z_TOL = {
    torch.float16: (1e-5, 1e-3),
    # One ulp: Triton's interpreter truncates float32 -> bfloat16 where GPUs round to nearest.
    torch.bfloat16: (1e-5, 8e-3),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}
# The KL is accumulated in float32 (float64 for float64): the fused sum and torch's sum add in
# different orders.
KL_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_inputs(device, dtype, shape, requires_grad=False, seed=0):
    """|mu| < 5 and std < 1.7 in practice; with |eps| <= 5.7 (u1 >= 1e-7), |z| < 16."""
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=generator, dtype=torch.float64)
    logvar = torch.randn(shape, generator=generator, dtype=torch.float64).clamp(-3, 1)
    mu, logvar = (t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu, logvar))
    return mu, logvar


def kernel_eps(seed, like):
    """The eps the kernels draw for a tensor like ``like``, as float64 on the CPU.

    The contract's (tests/philox.py) wherever the kernels compute it exactly as the model does,
    including float64 under the interpreter. A GPU draws eps in float32 with its fast approximate
    log, cos and sqrt for every dtype (docs/api.md, Seeds), float64 latents included, so that the
    model is no float64 oracle there: float64 on a GPU takes the GPU's own eps, from reparameterize
    of zeros (z = 0 + exp(0) * eps, exact), after checking it against the model to float32's
    tolerance.
    """
    expected = philox_eps(seed, like.shape)
    if like.device.type != "cuda" or like.dtype != torch.float64:
        return expected
    zeros = torch.zeros(like.shape, device=like.device, dtype=torch.float64)
    eps = ops.reparameterize(zeros, zeros, seed=seed, backend="triton").cpu()
    assert_close(eps, expected, Z_TOL[torch.float32])
    return eps


def assert_close(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reparameterize_matches_float64_math(device, dtype, shape):
    mu, logvar = sample_inputs(device, dtype, shape)
    z = ops.reparameterize(mu, logvar, seed=1234, backend="triton")
    assert z.dtype == dtype and z.shape == mu.shape and z.device == mu.device
    assert_close(z.cpu(), float64_z(mu.cpu(), logvar.cpu(), kernel_eps(1234, mu)), Z_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_divergence_matches_reference(device, dtype, shape, reduction):
    mu, logvar = sample_inputs(device, dtype, shape)
    kl = ops.kl_divergence(mu, logvar, reduction=reduction, backend="triton")
    expected = reference.kl_divergence(mu, logvar, reduction=reduction)
    assert kl.dtype == acc_dtype(dtype) and kl.shape == expected.shape
    tol = KL_TOL[acc_dtype(dtype)]
    assert_close(kl, expected, tol)
    assert_close(kl.cpu(), float64_kl(mu.cpu(), logvar.cpu(), reduction), tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_is_both_ops_in_one(device, dtype, shape, reduction):
    mu, logvar = sample_inputs(device, dtype, shape)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=77, backend="triton")
    # Same kernel, same noise, same summation order: bit-identical to the separate ops.
    assert torch.equal(z, ops.reparameterize(mu, logvar, seed=77, backend="triton"))
    assert torch.equal(
        kl.nan_to_num(), ops.kl_divergence(mu, logvar, reduction=reduction, backend="triton").nan_to_num()
    )
    assert_close(z.cpu(), float64_z(mu.cpu(), logvar.cpu(), kernel_eps(77, mu)), Z_TOL[dtype])
    assert_close(kl, reference.kl_divergence(mu, logvar, reduction=reduction), KL_TOL[acc_dtype(dtype)])


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_of_successive_inputs(device):
    # Different data of one shape back to back: a reduction that summed before every program's
    # partial was in would pick up the previous call's partials (or garbage) and fail here.
    for seed in range(3):
        mu, logvar = sample_inputs(device, torch.float32, (41, 401), seed=seed)
        kl = ops.kl_divergence(mu, logvar, reduction="sum", backend="triton")
        assert_close(kl, reference.kl_divergence(mu, logvar, reduction="sum"), KL_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("shape", "expected"),
    [((0, 8), {"sum": 0.0, "batchmean": float("nan"), "mean": float("nan")}),
     ((4, 0), {"sum": 0.0, "batchmean": 0.0, "mean": float("nan")})],
)
def test_empty_inputs_follow_torch(device, shape, expected):
    mu, logvar = sample_inputs(device, torch.float32, shape)
    for reduction, value in expected.items():
        _, kl = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=0, backend="triton")
        ref = reference.kl_divergence(mu, logvar, reduction=reduction)
        torch.testing.assert_close(kl, ref, equal_nan=True)
        torch.testing.assert_close(kl.cpu(), torch.tensor(value), equal_nan=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="none", seed=0, backend="triton")
    assert z.shape == kl.shape == mu.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_non_contiguous_inputs_match_contiguous_copies(device, dtype):
    base_mu, base_logvar = sample_inputs(device, dtype, (24, 70))
    for view in (lambda t: t.t(), lambda t: t[:, ::3], lambda t: t.view(24, 7, 10).permute(2, 0, 1)):
        mu, logvar = view(base_mu), view(base_logvar)
        assert not mu.is_contiguous()
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="mean", seed=5, backend="triton")
        mu_c, logvar_c = mu.contiguous(), logvar.contiguous()
        z_c, kl_c = ops.reparameterize_kl(mu_c, logvar_c, reduction="mean", seed=5, backend="triton")
        assert torch.equal(z, z_c) and torch.equal(kl, kl_c)


# ---------------------------------------------------------------------------------------------
# Gradients


def grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_gradients(device, dtype, shape, reduction):
    mu, logvar = sample_inputs(device, dtype, shape, requires_grad=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=99, backend="triton")
    # Upstream gradients exactly representable in the dtypes the op receives them in.
    grad_z = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).double()
    grad_kl = 0.5 + torch.rand(kl.shape, generator=torch.Generator().manual_seed(2), dtype=kl.dtype).double()
    actual = grads((z, kl), (mu, logvar), (grad_z.to(device, dtype), grad_kl.to(device, kl.dtype)))

    mu64, logvar64 = (t.detach().cpu().double().requires_grad_() for t in (mu, logvar))
    outputs64 = (float64_z(mu64, logvar64, kernel_eps(99, mu)), float64_kl(mu64, logvar64, reduction))
    expected = grads(outputs64, (mu64, logvar64), (grad_z, grad_kl))
    for a, e in zip(actual, expected):
        assert a.dtype == dtype and a.shape == shape
        assert_close(a.cpu(), e, Z_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_divergence_gradients_match_reference(device, dtype, reduction):
    mu, logvar = sample_inputs(device, dtype, (3, 1000), requires_grad=True)
    kl = ops.kl_divergence(mu, logvar, reduction=reduction, backend="triton")
    generator = torch.Generator().manual_seed(3)
    grad_kl = 0.5 + torch.rand(kl.shape, generator=generator, dtype=kl.dtype).to(device)
    actual = grads(kl, (mu, logvar), grad_kl)
    expected = grads(reference.kl_divergence(mu, logvar, reduction=reduction), (mu, logvar), grad_kl)
    for a, e in zip(actual, expected):
        assert_close(a, e, Z_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_gradients(device, dtype):
    mu, logvar = sample_inputs(device, dtype, (3, 1000), requires_grad=True)
    z = ops.reparameterize(mu, logvar, seed=8, backend="triton")
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(4)).to(dtype).double()
    actual = grads(z, (mu, logvar), grad_z.to(device, dtype))
    mu64, logvar64 = (t.detach().cpu().double().requires_grad_() for t in (mu, logvar))
    expected = grads(float64_z(mu64, logvar64, kernel_eps(8, mu)), (mu64, logvar64), grad_z)
    for a, e in zip(actual, expected):
        assert_close(a.cpu(), e, Z_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_one_output_only(device):
    # The unused output's gradient arrives as None and its term is skipped, not added as zeros.
    mu, logvar = sample_inputs(device, torch.float32, (5, 300), requires_grad=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=6, backend="triton")
    kl_only = grads(kl, (mu, logvar), None)
    expected = grads(reference.kl_divergence(mu, logvar, reduction="batchmean"), (mu, logvar), None)
    for a, e in zip(kl_only, expected):
        assert_close(a, e, Z_TOL[torch.float32])
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=6, backend="triton")
    z_only = grads(z.square().sum(), (mu, logvar), None)
    mu64, logvar64 = (t.detach().cpu().double().requires_grad_() for t in (mu, logvar))
    expected = grads(float64_z(mu64, logvar64, kernel_eps(6, mu)).square().sum(), (mu64, logvar64), None)
    for a, e in zip(z_only, expected):
        assert_close(a.cpu(), e, (1e-4, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, op",
    [
        ("reparameterize", lambda mu, lv: ops.reparameterize(mu, lv, seed=1, backend="triton").sum()),
        ("kl_divergence", lambda mu, lv: ops.kl_divergence(mu, lv, backend="triton")),
        ("reparameterize_kl",
         lambda mu, lv: sum(t.sum() for t in ops.reparameterize_kl(mu, lv, seed=1, backend="triton"))),
    ],
    ids=["reparameterize", "kl_divergence", "reparameterize_kl"],
)
def test_double_backward_is_refused_not_silently_wrong(device, name, op):
    mu, logvar = sample_inputs(device, torch.float32, (3, 40), requires_grad=True)
    with pytest.raises(RuntimeError, match=f"fastvae::triton_{name} has no double backward"):
        torch.autograd.grad(op(mu, logvar), (mu, logvar), create_graph=True)
    torch.autograd.grad(op(mu, logvar), (mu, logvar))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_only_the_inputs_and_the_seed(device):
    # mu and logvar are alive anyway (the encoder's outputs), so the fused op allocates nothing
    # for its backward beyond the 8-byte seed; eps is drawn again. The reference keeps new tensors.
    def saved(fn):
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            fn()
        return tensors

    mu, logvar = sample_inputs(device, torch.float32, (64, 32), requires_grad=True)
    fused = saved(lambda: ops.reparameterize_kl(mu, logvar, seed=1, backend="triton"))
    inputs = [t for t in fused if t is mu or t is logvar]
    others = [t for t in fused if t is not mu and t is not logvar]
    assert len(inputs) == 2 and sum(t.numel() * t.element_size() for t in others) <= 8
    unfused = saved(lambda: reference.reparameterize_kl(mu, logvar, seed=1))
    assert sum(t.numel() for t in unfused if t is not mu and t is not logvar) >= 2 * mu.numel()


# ---------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("device", DEVICES)
def test_seeds(device):
    mu, logvar = sample_inputs(device, torch.float32, (16, 100))

    def run(seed):
        return ops.reparameterize_kl(mu, logvar, reduction="sum", seed=seed, backend="triton")

    z1, kl1 = run(2**40 + 3)
    z2, kl2 = run(2**40 + 3)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)
    assert not torch.equal(z1, run(2**40 + 4)[0])

    torch.manual_seed(11)
    first, second = run(None)[0], run(None)[0]
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    assert torch.equal(run(None)[0], first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1])
def test_seed_is_the_64_bit_philox_key(device, seed):
    # Python ints reach the kernel as int32, uint32 or int64 by value; every width must give
    # the contract's stream.
    mu, logvar = torch.zeros(3, 50, device=device), torch.zeros(3, 50, device=device)
    z = ops.reparameterize(mu, logvar, seed=seed, backend="triton")
    expected = torch.from_numpy(philox.randn_like(seed, (3, 50)))
    torch.testing.assert_close(z.cpu(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_drawn_seed_stays_on_the_device(device, monkeypatch):
    # seed=None draws the key on the latents' device and the kernels load it from there: nothing
    # is read back to the host (no sync; a captured CUDA graph replays the draw), forward or backward.
    mu, logvar = sample_inputs(device, torch.float32, (4, 300), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, _ = ops.reparameterize_kl(mu, logvar, seed=None, backend="triton")
    (seed,) = [t for t in saved if t is not mu and t is not logvar]
    assert seed.device == mu.device and seed.dtype == torch.int64 and seed.dim() == 0
    # The kernels drew eps from the key the op saved: z is the contract's noise for it.
    eps = philox_eps(int(seed), (4, 300)).to(device)
    expected = mu.detach().double() + torch.exp(0.5 * logvar.detach().double()) * eps
    torch.testing.assert_close(z.double(), expected, **dict(zip(("atol", "rtol"), Z_TOL[torch.float32])))

    def read_back(self):
        raise AssertionError("a tensor was read back to the host")

    monkeypatch.setattr(torch.Tensor, "item", read_back)
    monkeypatch.setattr(torch.Tensor, "tolist", read_back)
    monkeypatch.setattr(torch.Tensor, "__int__", read_back)
    z, kl = ops.reparameterize_kl(mu, logvar, seed=None, backend="triton")
    torch.autograd.backward((z, kl), (torch.ones_like(z), torch.ones_like(kl)))


def test_a_seed_on_another_device_is_refused():
    # The kernels load the key through its pointer: a key elsewhere would be a bad address.
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"0-dim int64 tensor on the latents' device \(cpu\), got a tensor on meta"):
        kernels.reparameterize_kl_forward(mu, mu, torch.tensor(1, device="meta"), write_z=True, reduction=None)
    with pytest.raises(ValueError, match=r"latents' device \(cpu\), got None"):
        kernels.reparameterize_kl_backward(mu, None, None, mu, None, reduction=None)


def _warm_stream():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return stream


def test_captured_graph_replays_draw_new_noise():
    # The draw is captured with the kernels: each replay takes a new key from torch's CUDA
    # generator (its Philox offset advances per replay), so the noise differs from replay to replay
    # while the KL, which has none, stays the same.
    skip_unless_backend_runs("triton", "reparameterize_kl", "cuda")
    mu, logvar = sample_inputs("cuda", torch.float32, (16, 4, 16, 16))
    stream = _warm_stream()
    with torch.cuda.stream(stream):  # compiles the kernels outside the capture
        expected_kl = ops.reparameterize_kl(mu, logvar, seed=None, backend="triton")[1]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        z, kl = ops.reparameterize_kl(mu, logvar, seed=None, backend="triton")
    graph.replay()
    first, first_kl = z.clone(), kl.clone()
    graph.replay()
    assert not torch.equal(z, first)
    assert torch.equal(kl, first_kl) and torch.equal(kl, expected_kl)
    # Both replays drew N(0, 1) noise: (z - mu) / std over 16k elements.
    for sample in (first, z):
        eps = (sample - mu) / torch.exp(0.5 * logvar)
        assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05


def test_compiled_step_is_recorded_as_a_cuda_graph():
    # torch.compile(mode="reduce-overhead") records a CUDA graph only when no op of the step runs on
    # the CPU or syncs: a host-drawn seed would make it skip cudagraphs (a cudagraph skip is counted).
    skip_unless_backend_runs("triton", "reparameterize_kl", "cuda")
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Linear(32, 2 * 4 * 8 * 8).cuda()
    x = torch.randn(8, 32, device="cuda")

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def step(x):
        mu, logvar = model(x).view(8, 2, 4, 8, 8).unbind(1)
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=None, backend="triton")
        return z, z.square().mean() + kl

    noise = []
    for _ in range(4):
        z, loss = step(x)
        loss.backward()
        noise.append(z.detach().clone())
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(x.device.index, create_if_none_exists=False)
    assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) >= 1
    # The last steps replayed the recorded graphs, with new noise each time.
    assert not torch.equal(noise[-1], noise[-2])


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile


def opcheck_cases(device):
    mu, logvar = sample_inputs(device, torch.float32, (6, 50), requires_grad=True)
    seed = torch.tensor(17, device=device)
    z, kl = torch.ops.fastvae.triton_reparameterize_kl(mu, logvar, seed, "batchmean")
    z, kl, mu_, logvar_ = (t.detach() for t in (z, kl, mu, logvar))
    grad_z = torch.randn_like(z)
    fastvae_ops = torch.ops.fastvae
    backward = fastvae_ops.triton_reparameterize_kl_backward.default
    return [
        (fastvae_ops.triton_reparameterize.default, (mu, logvar, seed)),
        (fastvae_ops.triton_kl_divergence.default, (mu, logvar, "mean")),
        (fastvae_ops.triton_kl_divergence.default, (mu, logvar, "none")),
        (fastvae_ops.triton_reparameterize_kl.default, (mu, logvar, seed, "sum")),
        # After reparameterize_kl, kl_divergence and reparameterize.
        (backward, (grad_z, torch.ones_like(kl), mu_, logvar_, seed, "batchmean")),
        (backward, (None, torch.ones_like(z), mu_, logvar_, None, "none")),
        (backward, (grad_z, None, None, logvar_, seed, None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()

    def step(mu, logvar):
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=21, backend="triton")
        return z.square().mean() + kl

    mu, logvar = sample_inputs(device, torch.float32, (8, 64), requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(mu, logvar)
    actual = grads(loss, (mu, logvar), None)
    expected_loss = step(mu, logvar)
    expected = grads(expected_loss, (mu, logvar), None)
    torch.testing.assert_close(loss, expected_loss)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


class Sampler(torch.nn.Module):
    """A latent head that samples in training and returns the mean otherwise."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(16, 8)

    def forward(self, h):
        mu, logvar = self.head(h).chunk(2, dim=1)
        if self.training:
            return ops.reparameterize_kl(mu, logvar, reduction="batchmean", backend="triton")
        return mu, ops.kl_divergence(mu, logvar, reduction="batchmean", backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_module_in_train_mode(device):
    torch._dynamo.reset()
    model = Sampler().to(device).train()
    compiled = torch.compile(model, fullgraph=True)
    h = torch.randn(32, 16, device=device)
    z, kl = compiled(h)
    (z.sum() + kl).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    mu, logvar = model.head(h).chunk(2, dim=1)
    torch.testing.assert_close(kl, reference.kl_divergence(mu, logvar, reduction="batchmean"))
    # The seed is drawn fresh per call, in the graph: two steps sample different noise.
    assert not torch.equal(compiled(h)[0], z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_eager_path_equals_the_custom_op(device, reduction):
    # Outside torch.compile fastvae.ops runs the kernels through an autograd.Function, not the
    # custom op torch.compile traces: both must give the same bits, forward and backward.
    mu, logvar = sample_inputs(device, torch.float32, (5, 300), requires_grad=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=9, backend="triton")
    op_z, op_kl = torch.ops.fastvae.triton_reparameterize_kl(mu, logvar, torch.tensor(9, device=device), reduction)
    assert torch.equal(z, op_z) and torch.equal(kl, op_kl)
    grad_outputs = (torch.randn_like(z), torch.randn_like(kl))
    for a, e in zip(grads((z, kl), (mu, logvar), grad_outputs), grads((op_z, op_kl), (mu, logvar), grad_outputs)):
        assert torch.equal(a, e)


def test_host_overhead_script_runs():
    # bench/host_overhead.py stubs the Triton kernels out and times the host side of each path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "host_overhead.py")
    result = subprocess.run(
        [sys.executable, script, "--rounds", "5"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = re.findall(r"^ +(.+?) +[0-9.]+ us$", result.stdout, re.MULTILINE)
    assert rows == [
        "reparameterize_kl, ops, seed=None",
        "reparameterize_kl, ops, seed=1",
        "reparameterize_kl, backend function",
        "reparameterize_kl, custom op",
        "reparameterize_kl, fastvae.reference",
        "kl_divergence per_sample, ops",
        "vae_loss, ops, cpp backend",
        "vae_loss, fastvae.reference",
    ]


# ---------------------------------------------------------------------------------------------
# Launches through the compiled kernel


def _unspecialized(kernel) -> set:
    """The kernel's do_not_specialize arguments, from a JITFunction or the interpreter's wrapper."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs["do_not_specialize"])


def test_one_launch_key_is_one_jit_specialization(monkeypatch):
    # On CUDA a launch whose key was seen before runs the kernel Triton compiled then, skipping the
    # JIT: launches sharing a key must be ones the JIT specializes alike (pointer alignment, ints
    # equal to 1 or divisible by 16, types, constexprs), or the kernel would run on arguments it
    # was not compiled for. The JIT's own specialization is asked of each recorded launch.
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    launches = []

    def record(kernel, grid, device, tensors, ints, flags, constexprs):
        key = kernels._launch_key(kernel, device, tensors, ints, flags)
        launches.append((kernel, key, (*tensors, *ints), constexprs))

    monkeypatch.setattr(kernels, "_launch", record)
    seed = torch.zeros((), dtype=torch.int64)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for shape in ((1,), (16,), (17,), (1, 1), (3, 16), (16, 1), (2, 40), (5, 2000), (4, 4096), (2, 3, 4, 5)):
            numel, aligned_again = int(np.prod(shape)), 16 // torch.empty((), dtype=dtype).element_size()
            # mu and logvar each aligned, not, or 16 bytes into their storage (aligned again).
            for mu_offset, logvar_offset in ((0, 0), (1, 0), (0, 1), (aligned_again, aligned_again)):
                mu = torch.zeros(numel + mu_offset, dtype=dtype)[mu_offset:].view(shape)
                logvar = torch.zeros(numel + logvar_offset, dtype=dtype)[logvar_offset:].view(shape)
                for write_z, reduction in ((True, None), (True, "sum"), (True, "none"), (False, "mean"),
                                           (False, "per_sample"), (True, "per_sample")):
                    kernels.reparameterize_kl_forward(mu, logvar, seed, write_z=write_z, reduction=reduction)
                kl_dtype = acc_dtype(dtype)
                for grad_z, grad_kl, reduction in ((mu, None, None), (None, torch.zeros(shape, dtype=kl_dtype), "none"),
                                                   (logvar, torch.zeros((), dtype=kl_dtype), "sum"),
                                                   (None, torch.zeros(shape[0], dtype=kl_dtype), "per_sample")):
                    kernels.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction=reduction)

    def jit_specialization(kernel, args, constexprs):
        unspecialized = _unspecialized(kernel)
        types = tuple(native_specialize_impl(BaseBackend, value, False, name not in unspecialized, True)
                      for name, value in zip(kernel.arg_names, args))
        return types + tuple(str(getattr(value, "value", value)) for value in constexprs.values())

    by_key = {}
    for kernel, key, args, constexprs in launches:
        if key is not None:
            by_key.setdefault(key, set()).add(jit_specialization(kernel, args, constexprs))
    assert all(len(specializations) == 1 for specializations in by_key.values())
    # The cases exercise the key: misaligned launches have none, and keys are shared and distinct.
    keyless = sum(key is None for _, key, _, _ in launches)
    assert 0 < keyless < len(launches) and len(by_key) < len(launches) - keyless and len(by_key) > 50


class _FakeKernel:
    """What _jit_only reads of a JITFunction (test_the_fake_kernel_reads_like_triton_s checks it)."""

    def __init__(self):
        self.debug = None
        self.pre_run_hooks = []


def _plain_kernel(x_ptr):
    pass


def test_the_fake_kernel_reads_like_triton_s():
    real = triton.runtime.jit.JITFunction(_plain_kernel)
    assert real.debug is None and real.pre_run_hooks == []
    hook = lambda *args, **kwargs: None  # noqa: E731
    real.add_pre_run_hook(hook)
    assert real.pre_run_hooks == [hook]


def test_the_jit_takes_launches_while_triton_debugs_or_instruments(monkeypatch):
    # Each of these makes triton's JITFunction.run compile another variant or run code before the
    # launch, which a launch through the kept compiled kernel would skip.
    knobs = triton.knobs
    kernel = _FakeKernel()
    assert not kernels._jit_only(kernel)
    for owner, name, value in (
        (knobs.runtime, "debug", True),  # TRITON_DEBUG=1
        (knobs.compilation, "instrumentation_mode", "consan"),  # TRITON_INSTRUMENTATION_MODE
        (knobs.runtime, "add_stages_inspection_hook", lambda: ("key", "hash")),
    ):
        with monkeypatch.context() as patched:
            patched.setattr(owner, name, value)
            assert kernels._jit_only(kernel), name
    assert not kernels._jit_only(kernel)
    kernel.debug = True  # @triton.jit(debug=True)
    assert kernels._jit_only(kernel)
    kernel.debug = None
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    assert kernels._jit_only(kernel)


class _BrokenLaunch:
    """A compiled kernel whose launch raises, as a launcher that rejects its arguments would."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        def launch(*args):
            self.calls += 1
            raise RuntimeError("launcher says no")

        return launch


def _recorded_reduction_launch(monkeypatch, mu, logvar):
    """(kernel, grid, args, constexprs) of a reduced KL's forward launch, recorded, not run."""
    launches = []
    monkeypatch.setattr(kernels, "_run", lambda kernel, grid, key, args, constexprs: launches.append(
        (kernel, grid, args, constexprs)))
    kernels.reparameterize_kl_forward(mu, logvar, None, write_z=False, reduction="sum")
    monkeypatch.undo()
    ((kernel, grid, args, constexprs),) = launches
    return kernel, grid, args, constexprs


def _fastvaes(caught):
    # Not the interpreter's own (triton 3.6's warns of numpy deprecations).
    return [w for w in caught if str(w.message).startswith("fastvae:")]


def test_a_failing_direct_launch_falls_back_to_the_jit_and_says_so_once(monkeypatch):
    skip_unless_backend_runs("triton", "kl_divergence", "cpu")
    mu, logvar = sample_inputs("cpu", torch.float32, (41, 401))
    kernel, grid, args, constexprs = _recorded_reduction_launch(monkeypatch, mu, logvar)
    kl = args[3]
    key = ("a key",)
    broken = _BrokenLaunch()
    monkeypatch.setattr(kernels, "_compiled", {key: broken})
    monkeypatch.setattr(kernels, "_jit_keys", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the once is fastvae's, not the warnings filter's
        for _ in range(3):
            kl.fill_(float("nan"))
            kernels._run(kernel, grid, key, args, constexprs)
            # The JIT ran the launch the compiled kernel refused.
            assert_close(kl, float64_kl(mu, logvar, "sum"), KL_TOL[torch.float32])
    assert broken.calls == 1 and key not in kernels._compiled and key in kernels._jit_keys
    (warning,) = _fastvaes(caught)
    assert warning.category is RuntimeWarning
    assert str(warning.message) == (
        "fastvae: launching the compiled _reparameterize_kl_forward_kernel directly failed "
        "(RuntimeError: launcher says no); launches of this variant go through Triton's JIT from now on"
    )


def test_a_debugging_triton_gets_every_launch_and_keeps_none(monkeypatch):
    skip_unless_backend_runs("triton", "kl_divergence", "cpu")
    mu, logvar = sample_inputs("cpu", torch.float32, (3, 1000))
    kernel, grid, args, constexprs = _recorded_reduction_launch(monkeypatch, mu, logvar)
    kept = _BrokenLaunch()
    monkeypatch.setattr(kernels, "_compiled", {("kept",): kept})
    monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels._run(kernel, grid, ("kept",), args, constexprs)
        kernels._run(kernel, grid, ("new",), args, constexprs)
    assert not _fastvaes(caught)
    assert_close(args[3], float64_kl(mu, logvar, "sum"), KL_TOL[torch.float32])
    # The kept kernel was not launched, and the debug variant the JIT made was not kept.
    assert kept.calls == 0 and kernels._compiled == {("kept",): kept}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", (None, *REDUCTIONS, "per_sample"))
def test_direct_launches_give_the_jits_bits(dtype, reduction, monkeypatch):
    mu, logvar = sample_inputs("cuda", dtype, (4, 4, 32, 32), requires_grad=True)
    generator = torch.Generator(device="cuda")

    def run():
        if reduction is None:
            outputs = (ops.reparameterize(mu, logvar, seed=13, backend="triton"),)
        else:
            outputs = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=13, backend="triton")
        generator.manual_seed(2)
        grad_outputs = tuple(torch.randn(o.shape, generator=generator, device="cuda").to(o.dtype) for o in outputs)
        return (*outputs, *torch.autograd.grad(outputs, (mu, logvar), grad_outputs))

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_jit_keys", set())
    with monkeypatch.context() as patched:
        patched.setattr(kernels, "_jit_only", lambda kernel: True)
        through_jit = run()
    assert kernels._compiled == {}
    run()  # keeps the kernels the JIT compiled
    launched = []

    class Counted:
        def __init__(self, compiled):
            self.compiled = compiled

        def __getitem__(self, grid):
            launched.append(grid)
            return self.compiled[grid]

    kernels._compiled.update({key: Counted(compiled) for key, compiled in kernels._compiled.items()})
    direct = run()
    assert len(launched) == 2  # forward and backward, both direct
    for a, e in zip(direct, through_jit, strict=True):
        assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_are_rejected():
    good = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"mu has shape \(2, 3\) but logvar has \(3, 2\)"):
        ops.reparameterize_kl(good, torch.zeros(3, 2), backend="triton")
    with pytest.raises(TypeError, match="mu is torch.float32 but logvar is torch.float64"):
        ops.reparameterize(good, good.double(), backend="triton")
    with pytest.raises(ValueError, match="mu is on cpu but logvar is on meta"):
        ops.kl_divergence(good, torch.zeros(2, 3, device="meta"), backend="triton")
    with pytest.raises(TypeError, match="mu must be float16, bfloat16, float32 or float64, got torch.int64"):
        ops.reparameterize_kl(good.long(), good.long(), backend="triton")
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.kl_divergence(good, good, reduction="total", backend="triton")
    with pytest.raises(ValueError, match="needs a batch dimension"):
        ops.kl_divergence(torch.zeros(()), torch.zeros(()), reduction="batchmean", backend="triton")
    with pytest.raises(TypeError, match="seed must be an int or None, got float"):
        ops.reparameterize(good, good, seed=1.5, backend="triton")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        ops.reparameterize_kl(good, good, seed=-1, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_the_raw_ops_refuse_an_unknown_reduction(device):
    # Called through torch.ops, without fastvae.ops' checks: "total" must not be summed as "sum".
    mu = torch.zeros(2, 3, device=device)
    for call in (
        lambda: torch.ops.fastvae.triton_kl_divergence(mu, mu, "total"),
        lambda: torch.ops.fastvae.triton_reparameterize_kl(mu, mu, torch.tensor(0, device=device), "total"),
        lambda: torch.ops.fastvae.triton_reparameterize_kl_backward(None, mu.sum(), mu, mu, None, "total"),
    ):
        with pytest.raises(ValueError, match="reduction must be 'sum', 'batchmean', 'mean', 'per_sample', 'none'"):
            call()


def test_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, fastvae\n"
        "try:\n"
        "    fastvae.ops.reparameterize_kl(torch.zeros(2, 2), torch.zeros(2, 2), backend='triton')\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "backend='triton' cannot run reparameterize_kl on cpu" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


# ---------------------------------------------------------------------------------------------
# 64-bit offsets


@pytest.mark.parametrize("device", DEVICES)
def test_int64_offsets_give_the_same_results(device, monkeypatch):
    # Small tensors through the int64-offset variant, as if they had 2**31 elements.
    mu, logvar = sample_inputs(device, torch.float32, (3, 1000), requires_grad=True)

    def run():
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="mean", seed=3, backend="triton")
        return (z, kl, *grads((z, kl), (mu, logvar), (torch.ones_like(z), torch.ones_like(kl))))

    expected = run()
    monkeypatch.setattr(kernels, "_INT32_LIMIT", 0)
    for actual, value in zip(run(), expected):
        assert torch.equal(actual, value)


@triton.jit
def _num_tiles_kernel(n_elements, out_ptr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    tl.store(out_ptr, _num_tiles(n_elements, BLOCK, INT64))


# The last count with int32 offsets, the window where Triton passes the count as int32 but the
# offsets need int64 (there cdiv's n + BLOCK - 1 overflowed int32: no tile ran), and beyond.
EDGE_COUNTS = (kernels._INT32_LIMIT, kernels._INT32_LIMIT + 1, 2**31 - 500, 2**31 - 1, 2**31, 2**31 + 3000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", EDGE_COUNTS)
def test_tile_count_at_the_int32_edge(device, numel):
    # The tile count both kernels loop to, computed by the kernels' own code for the count and
    # the INT64 flag the host passes: no 4 GiB latent needed.
    out = torch.zeros(1, dtype=torch.int64, device=device)
    _num_tiles_kernel[(1,)](numel, out, BLOCK=kernels.BLOCK, INT64=numel > kernels._INT32_LIMIT)
    assert out.item() == -(-numel // kernels.BLOCK)


@pytest.fixture
def gpu_memory_freed_after():
    """Gives the caching allocator's blocks back to the GPU once the test's tensors are gone."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


# About 26 GB each: under pytest-xdist (`make gpu-check` runs --dist loadgroup) the cases run one
# after another on one worker, each freeing its memory before the next checks what is free.
@pytest.mark.xdist_group("over_2_31_elements")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("numel", [2**31 - 500, 2**31 + 3000])
def test_around_2_31_elements(numel, gpu_memory_freed_after):
    # Six float16 tensors of numel elements: mu, logvar, z, grad_z, grad_mu, grad_logvar.
    if torch.cuda.mem_get_info()[0] < 6 * 2 * numel + 2**30:
        pytest.skip(f"needs {6 * 2 * numel / 2**30 + 1:.0f} GiB of free GPU memory")
    mu = torch.ones(numel, dtype=torch.float16, device="cuda", requires_grad=True)
    logvar = torch.zeros_like(mu, requires_grad=True)
    z, kl = ops.reparameterize_kl(mu, logvar, reduction="mean", seed=9, backend="triton")
    # Elementwise KL of mu = 1, logvar = 0 is 0.5: a kernel that ran no tile gives z = 0, KL = 0.
    assert abs(kl.item() - 0.5) < 1e-5
    grad_outputs = (torch.ones_like(z), torch.ones_like(kl))
    grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), grad_outputs)
    for start in (0, numel - 4096):
        part = slice(start, start + 4096)
        eps = torch.from_numpy(philox.randn(9, np.arange(start, start + 4096, dtype=np.uint64))).double()
        torch.testing.assert_close(z[part].cpu().double(), 1 + eps, atol=2e-3, rtol=1e-3)
        # d(mean KL)/dmu = mu / numel, below float16's resolution next to grad_z's 1.
        torch.testing.assert_close(grad_mu[part].cpu().double(), torch.ones_like(eps), atol=0, rtol=1e-3)
        torch.testing.assert_close(grad_logvar[part].cpu().double(), 0.5 * eps, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# The reduction under CUDA graphs, and what its bits depend on


@pytest.mark.parametrize("device", DEVICES)
def test_a_captured_reduction_gets_a_counter_of_its_own(device, monkeypatch):
    # Eager reductions on one stream share a cached arrival counter; a launch being captured into
    # a CUDA graph must not (the graph may replay on another stream beside them): it gets a fresh
    # zeroed one. Capture is simulated here; the GPU tests below capture for real.
    mu, logvar = sample_inputs(device, torch.float32, (41, 401))
    expected = ops.kl_divergence(mu, logvar, reduction="sum", backend="triton")
    shared = kernels._counter(mu.device)
    used = []
    counter = kernels._counter
    monkeypatch.setattr(kernels, "_counter", lambda d: used.append(counter(d)) or used[-1])
    assert torch.equal(ops.kl_divergence(mu, logvar, reduction="sum", backend="triton"), expected)
    assert used[-1] is shared
    monkeypatch.setattr(kernels, "_capturing", lambda d: True)
    for _ in range(2):
        assert torch.equal(ops.kl_divergence(mu, logvar, reduction="sum", backend="triton"), expected)
    assert used[1] is not shared and used[2] is not shared and used[1] is not used[2]
    # Every launch leaves its counter at zero.
    assert all(c.item() == 0 for c in used)


class _ThreadRoutedPool(TorchDispatchMode):
    """Stands in for a CUDA-graph pool that takes the allocations of the thread it is entered on, as
    torch 2.11's cudagraph trees do while they warm up under torch.compile(mode="reduce-overhead")
    (no stream is capturing then). A dispatch mode is per thread too: it records the address of
    every tensor the ops it sees create, and holds the tensors so that none is reused meanwhile."""

    def __init__(self):
        super().__init__()
        self.taken = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # New storage only: not a view, nor what an in-place op (set_ included) returns.
        if not func._schema.is_mutable and all(r.alias_info is None for r in func._schema.returns):
            self.taken += [(t.untyped_storage().data_ptr(), t) for t in pytree.tree_leaves(out)
                           if isinstance(t, torch.Tensor)]
        return out

    def holds(self, tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in {address for address, _ in self.taken}


@pytest.mark.parametrize("device", DEVICES)
def test_a_cached_counter_is_never_allocated_in_a_graph_pool(device, monkeypatch):
    # The counter outlives the call: allocated in a graph's pool, it would be handed out again
    # while cached, and a non-zero counter would leave the KL unwritten.
    monkeypatch.setattr(kernels, "_counters", {})
    mu, logvar = sample_inputs(device, torch.float32, (41, 401))
    with _ThreadRoutedPool() as pool:
        kl = ops.kl_divergence(mu, logvar, reduction="sum", backend="triton")
    (counter,) = kernels._counters.values()
    assert pool.holds(kl)  # the call's own allocations went to the pool
    assert not pool.holds(counter)
    assert counter.item() == 0
    assert_close(kl, float64_kl(mu, logvar, "sum"), KL_TOL[torch.float32])
    # Cached: a later call on the stream reuses it.
    assert_close(ops.kl_divergence(mu, logvar, reduction="sum", backend="triton"), kl, KL_TOL[torch.float32])
    assert list(kernels._counters.values()) == [counter]


def test_an_allocation_outside_graph_pools_raises_what_it_raised():
    def allocate():
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError, match="out of memory"):
        kernels._outside_graph_pools(allocate)
    assert kernels._outside_graph_pools(threading.get_ident) != threading.get_ident()


def _every_reducing_form(mu, logvar):
    """Each launch that counts arrivals: the reduced KL with and without z, per sample split across programs."""
    _, kl_sum = ops.reparameterize_kl(mu, logvar, reduction="sum", seed=None, backend="triton")
    return {
        "sum": kl_sum,
        "batchmean": ops.kl_divergence(mu, logvar, reduction="batchmean", backend="triton"),
        "mean": ops.kl_divergence(mu, logvar, reduction="mean", backend="triton"),
        "per_sample": ops.kl_divergence(mu, logvar, reduction="per_sample", backend="triton"),
    }


def _assert_float64_kl(kls, mu, logvar):
    assert kernels._splits(mu.shape[0], mu[0].numel()) > 1  # per sample goes through the counter
    for reduction, kl in kls.items():
        expected = float64_kl_per_sample(mu, logvar) if reduction == "per_sample" else float64_kl(mu, logvar, reduction)
        torch.testing.assert_close(kl.cpu().double(), expected, atol=0, rtol=1e-5, msg=reduction)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reduce_overhead_step_of_every_reducing_form_passes_cudagraph_asserts(monkeypatch):
    # The slow-path asserts check, before each recording, that the graph pool holds only what the
    # tree tracks: a counter cached during the warm-up would be an untracked live block there.
    skip_unless_backend_runs("triton", "reparameterize_kl", "cuda")
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_counters", {})  # the warm-up caches its stream's counter
    mu, logvar = sample_inputs("cuda", torch.float32, (4, 4, 64, 64))
    step = torch.compile(_every_reducing_form, mode="reduce-overhead", fullgraph=True)
    with inductor_config.patch({"triton.slow_path_cudagraph_asserts": True}):
        for _ in range(4):
            _assert_float64_kl(step(mu, logvar), mu, logvar)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_eager_then_reduce_overhead_then_eager_reductions_match_float64(monkeypatch):
    skip_unless_backend_runs("triton", "reparameterize_kl", "cuda")
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_counters", {})
    shapes = ((4, 4, 64, 64), (2, 4, 32, 32))
    inputs = [sample_inputs("cuda", torch.float32, shape, seed=i) for i, shape in enumerate(shapes)]
    for mu, logvar in inputs:
        _assert_float64_kl(_every_reducing_form(mu, logvar), mu, logvar)
    step = torch.compile(_every_reducing_form, mode="reduce-overhead")
    # A second shape warms up again on the tree's stream, after the first one's graph took its
    # blocks from the pool: a counter left in the pool would be one of them by then.
    for mu, logvar in inputs + inputs + inputs:
        _assert_float64_kl(step(mu, logvar), mu, logvar)
    torch.cuda.synchronize()
    for mu, logvar in inputs:
        _assert_float64_kl(_every_reducing_form(mu, logvar), mu, logvar)


def test_the_final_sum_is_the_same_on_every_gpu_model(monkeypatch):
    # The reduced KL's bits follow the grid, min(tiles, programs), and the final sum's width. The
    # width is fixed, so a latent of no more tiles than the smallest GPU runs programs (here SD's
    # 8x4x64x64: 128 tiles) sums in the same order on an A100 (108 SMs), an H100 (132), a B200 (148).
    device = torch.device("cpu")
    try:
        for sms in (108, 132, 148):
            monkeypatch.setattr(kernels, "_max_programs", lambda _, sms=sms: kernels.PROGRAMS_PER_SM * sms)
            kernels._reduction_width.cache_clear()
            assert kernels._reduction_width(device) == kernels.REDUCTION_WIDTH
            assert kernels._grid(device, 8 * 4 * 64 * 64) == 128
    finally:
        kernels._reduction_width.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graph_replay_beside_eager_reductions_on_the_capture_stream():
    # 1M elements: several tiles per program, so the replayed and the eager launches overlap.
    mu, logvar = sample_inputs("cuda", torch.float32, (64, 4, 64, 64), seed=0)
    other_mu, other_logvar = sample_inputs("cuda", torch.float32, (64, 4, 64, 64), seed=1)

    def kl(m, lv):
        return ops.kl_divergence(m, lv, reduction="sum", backend="triton")

    expected, other_expected = kl(mu, logvar), kl(other_mu, other_logvar)
    capture_stream, replay_stream = torch.cuda.Stream(), torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):  # warm up, and cache the stream's eager counter
        kl(mu, logvar)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        captured = kl(mu, logvar)
    torch.cuda.synchronize()
    for _ in range(20):
        with torch.cuda.stream(replay_stream):
            graph.replay()
        with torch.cuda.stream(capture_stream):
            eager = [kl(other_mu, other_logvar) for _ in range(4)]
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
        assert all(torch.equal(e, other_expected) for e in eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_captured_training_step_replays_like_eager():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 2 * 4 * 32 * 32).cuda()
    x = torch.randn(64, 64, device="cuda")

    def step():
        mu, logvar = model(x).view(64, 2, 4, 32, 32).unbind(1)
        z, kl = ops.reparameterize_kl(mu, logvar, reduction="batchmean", seed=3, backend="triton")
        loss = z.square().mean() + kl
        loss.backward()
        return loss.detach()

    expected_loss = step()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    capture_stream, replay_stream = torch.cuda.Stream(), torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        loss = step()
    other_mu, other_logvar = sample_inputs("cuda", torch.float32, (64, 4, 64, 64), seed=2)
    other_expected = ops.kl_divergence(other_mu, other_logvar, reduction="sum", backend="triton")
    torch.cuda.synchronize()
    for _ in range(5):
        with torch.cuda.stream(replay_stream):
            graph.replay()
        with torch.cuda.stream(capture_stream):
            eager = [ops.kl_divergence(other_mu, other_logvar, reduction="sum", backend="triton") for _ in range(4)]
        torch.cuda.synchronize()
        torch.testing.assert_close(loss, expected_loss)
        for p, g in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(p.grad, g)
        assert all(torch.equal(e, other_expected) for e in eager)
