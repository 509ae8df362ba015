"""fastvae::vae_loss, the C++/CUDA fused negative ELBO, against fastvae.reference and float64 math.

Tolerances, per dtype of x_hat/x: the loss is accumulated in float32 (float64 for float64) from
the upcast inputs, as the reference does, so float16/bfloat16 inputs only change the gradients.
Those are rounded to the input dtype (half an ulp: 2**-11 for float16, 2**-8 for bfloat16) once,
or twice when the incoming weight of the image term is not 1 and the backward scales the image
gradient the forward wrote. Float32 sums differ from the reference's by summation order only.
"""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae import ops, reference

pytestmark = pytest.mark.skipif(fastvae.extension_error is not None, reason="fastvae._C is not built")

from fastvae.backends import cpp_ops  # noqa: E402  (registers fakes and autograd once _C is loaded)
from float64_math import float64_kl  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["sum", "batchmean", "mean"]
# (atol, rtol) of the 0-dim losses, relative to their size, and of the gradients.
LOSS_TOL = {
    torch.float16: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}
GRAD_TOL = {
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


RECONS = ["mse", "l1", "bce", "bce_logits"]
# (recon_reduction, kl_reduction): one reduction for both, and Stable Diffusion's split.
REDUCTION_PAIRS = [("sum", "sum"), ("batchmean", "batchmean"), ("mean", "mean"), ("mean", "batchmean")]


def sample_inputs(device, requires_grad, dtype=torch.float32, image=(4, 3, 9, 7), latent=(4, 10), seed=0, recon="mse"):
    """(x_hat, x, mu, logvar) with sizes that are not multiples of any vector width. For the BCE
    forms x is in [0, 1], and x_hat a probability in [0.02, 0.98] ("bce") or a logit ("bce_logits")."""
    gen = torch.Generator().manual_seed(seed)

    def make(shape, values):
        return values(shape).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    def normal(scale):
        return lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    def uniform(low, high):
        return lambda shape: low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)

    x_hat_values = {"bce": uniform(0.02, 0.98), "bce_logits": normal(3.0)}.get(recon, normal(1.0))
    x_values = uniform(0.0, 1.0) if recon in ("bce", "bce_logits") else normal(1.0)
    return make(image, x_hat_values), make(image, x_values), make(latent, normal(1.0)), make(latent, normal(0.5))


def divisors(x, mu, reductions):
    """What the summed recon and KL terms are divided by."""
    return tuple({"sum": 1, "batchmean": t.shape[0], "mean": t.numel()}[r] for t, r in zip((x, mu), reductions))


def float64_recon(x_hat, x, recon):
    """Elementwise (term, d term / d x_hat, d term / d x), written out independently of fastvae."""
    if recon == "mse":
        return (x_hat - x) ** 2, 2 * (x_hat - x), -2 * (x_hat - x)
    if recon == "l1":
        return (x_hat - x).abs(), torch.sign(x_hat - x), -torch.sign(x_hat - x)
    if recon == "bce":
        term = -(x * torch.log(x_hat).clamp(min=-100) + (1 - x) * torch.log(1 - x_hat).clamp(min=-100))
        return term, (x_hat - x) / (x_hat * (1 - x_hat)).clamp(min=1e-12), torch.log1p(-x_hat) - torch.log(x_hat)
    term = torch.clamp(x_hat, min=0) - x_hat * x + torch.log1p(torch.exp(-x_hat.abs()))
    return term, torch.sigmoid(x_hat) - x, -x_hat


def float64_loss(x_hat, x, mu, logvar, beta, reductions, recon="mse"):
    """The negative ELBO in float64, written out independently of fastvae."""
    x_hat, x, mu, logvar = (t.detach().double() for t in (x_hat, x, mu, logvar))
    recon_div, kl_div = divisors(x, mu, reductions)
    recon_value = float64_recon(x_hat, x, recon)[0].sum() / recon_div
    kl = (-0.5 * (1 + logvar - mu**2 - torch.exp(logvar))).sum() / kl_div
    return recon_value + beta * kl, recon_value, kl


def float64_grads(x_hat, x, mu, logvar, beta, reductions, weights, recon="mse"):
    """d(w_loss * loss + w_recon * recon + w_kl * kl) / d(x_hat, x, mu, logvar), in float64."""
    x_hat, x, mu, logvar = (t.detach().double() for t in (x_hat, x, mu, logvar))
    w_loss, w_recon, w_kl = weights
    recon_div, kl_div = divisors(x, mu, reductions)
    _, d_x_hat, d_x = float64_recon(x_hat, x, recon)
    image_weight = (w_loss + w_recon) / recon_div
    kl_weight = (beta * w_loss + w_kl) / kl_div
    return image_weight * d_x_hat, image_weight * d_x, kl_weight * mu, kl_weight * 0.5 * (torch.exp(logvar) - 1)


def assert_losses_close(actual, expected, dtype):
    atol, rtol = LOSS_TOL[dtype]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), atol=atol * max(1.0, abs(e.item())), rtol=rtol)


def loss_kwargs(recon, reductions):
    return {"recon": recon, "recon_reduction": reductions[0], "kl_reduction": reductions[1]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("reductions", REDUCTION_PAIRS)
@pytest.mark.parametrize("beta", [0.0, 4.5])
def test_forward_matches_reference_and_float64(device, dtype, recon, reductions, beta):
    inputs = sample_inputs(device, False, dtype, recon=recon)
    kwargs = loss_kwargs(recon, reductions)
    loss, recon_value, kl = ops.vae_loss(*inputs, beta=beta, **kwargs, backend="cpp")
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(t.shape == () and t.dtype == accumulate and t.device.type == device for t in (loss, recon_value, kl))
    assert_losses_close((loss, recon_value, kl), reference.vae_loss(*inputs, beta=beta, **kwargs), dtype)
    assert_losses_close((loss, recon_value, kl), float64_loss(*inputs, beta, reductions, recon), dtype)


def test_reduction_is_the_default_of_both_terms():
    inputs = sample_inputs("cpu", False)
    split = ops.vae_loss(*inputs, reduction="mean", kl_reduction="batchmean", backend="cpp")
    for actual, expected in zip(split, float64_loss(*inputs, 1.0, ("mean", "batchmean"))):
        torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("reductions", REDUCTION_PAIRS)
# Incoming gradients of (loss, recon, kl): loss.backward(); all three with an image weight
# (loss + recon) of 1, where the forward's image gradient is used as is; and one to scale by.
@pytest.mark.parametrize("weights, beta", [((1.0, 0.0, 0.0), 1.0), ((1.5, -0.5, 2.0), 0.25), ((0.5, 0.25, -1.0), 3.0)])
def test_gradients_of_all_three_outputs(device, dtype, recon, reductions, weights, beta):
    inputs = sample_inputs(device, True, dtype, recon=recon)
    kwargs = loss_kwargs(recon, reductions)
    grad_outputs = [torch.tensor(w, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                    for w in weights]
    outputs = ops.vae_loss(*inputs, beta=beta, **kwargs, backend="cpp")
    grads = torch.autograd.grad(outputs, inputs, grad_outputs)
    expected_outputs = reference.vae_loss(*inputs, beta=beta, **kwargs)
    reference_grads = torch.autograd.grad(expected_outputs, inputs, grad_outputs)
    atol, rtol = GRAD_TOL[dtype]
    for name, g, r, e in zip(("x_hat", "x", "mu", "logvar"), grads, reference_grads,
                             float64_grads(*inputs, beta, reductions, weights, recon)):
        assert g.dtype == dtype and g.shape == e.shape, name
        torch.testing.assert_close(g.double().cpu(), e.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name} vs reference: {m}")


def test_only_the_inputs_that_need_it_get_a_gradient():
    x_hat, x, mu, logvar = sample_inputs("cpu", False)
    x_hat.requires_grad_(True)
    loss, _, _ = ops.vae_loss(x_hat, x, mu, logvar, backend="cpp")
    (grad,) = torch.autograd.grad(loss, x_hat)
    torch.testing.assert_close(grad, 2 * (x_hat - x))


def test_image_gradient_is_only_written_when_a_backward_can_need_it():
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fastvae.vae_loss.default:
                calls.append(args[-1])
            return func(*args, **(kwargs or {}))

    inputs = sample_inputs("cpu", True)
    with Record():
        ops.vae_loss(*inputs, backend="cpp")
        with torch.no_grad():
            ops.vae_loss(*inputs, backend="cpp")
        ops.vae_loss(*(t.detach() for t in inputs), backend="cpp")
    assert calls == [True, False, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [1.0, 0.7])
@pytest.mark.parametrize("x_requires_grad, reused", [(False, True), (True, False)])
@pytest.mark.parametrize("recon", RECONS)
def test_backward_hands_over_the_forwards_image_gradient(device, weight, x_requires_grad, reused, recon):
    # The image gradient written by the forward becomes x_hat.grad itself, scaled in place (not
    # at all for loss.backward()): no image-sized tensor made and no copy. Only when x needs its
    # own gradient does the backward write new tensors.
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    x_hat, x, mu, logvar = sample_inputs(device, True, recon=recon)
    x = x.detach().requires_grad_(x_requires_grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ops.vae_loss(x_hat, x, mu, logvar, recon=recon, backend="cpp")[0]
    (weight * loss).backward()
    assert (x_hat.grad.data_ptr() in saved) == reused
    expected_x_hat, expected_x, _, _ = float64_grads(x_hat, x, mu, logvar, 1.0, ("sum", "sum"), (weight, 0, 0), recon)
    torch.testing.assert_close(x_hat.grad, expected_x_hat.float().to(device))
    if x_requires_grad:
        torch.testing.assert_close(x.grad, expected_x.float().to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_retained_graph_backpropagates_twice(device):
    # The handed-over image gradient is the graph's saved buffer: a second backward through the
    # retained graph must find it intact, and accumulating into x_hat.grad must not change it.
    x_hat, x, mu, logvar = sample_inputs(device, True)
    loss = ops.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", backend="cpp")[0]
    loss.backward(retain_graph=True)
    loss.backward()
    expected = reference.vae_loss(x_hat, x, mu, logvar, reduction="batchmean")[0]
    grads = torch.autograd.grad(2 * expected, (x_hat, mu, logvar))
    for actual, e in zip((x_hat.grad, mu.grad, logvar.grad), grads):
        torch.testing.assert_close(actual, e, atol=1e-5, rtol=1e-5)


@pytest.mark.cpp_raises
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_not_silently_wrong(device):
    inputs = sample_inputs(device, True)
    loss = ops.vae_loss(*inputs, backend="cpp")[0]
    with pytest.raises(RuntimeError, match="fastvae::vae_loss has no double backward"):
        torch.autograd.grad(loss, inputs, create_graph=True)
    # The first derivative is still there to take.
    torch.autograd.grad(loss, inputs)


def test_torch_func_grad_raises_on_the_cpp_backend():
    # docs/api.md's promise (Gradients): torch.func transforms need the reference backend, even for a first derivative.
    x_hat, x, mu, logvar = sample_inputs("cpu", False)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda m: ops.vae_loss(x_hat, x, m, logvar, backend="cpp")[0])(mu)


@pytest.mark.cpp_raises
def test_raw_op_without_image_gradient_refuses_to_backpropagate_to_the_image():
    inputs = sample_inputs("cpu", True)
    loss = torch.ops.fastvae.vae_loss(*inputs, 1.0, "mse", "sum", "sum", False)[0]
    with pytest.raises(RuntimeError, match="compute_image_grad=False"):
        torch.autograd.grad(loss, inputs[0])


@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("reductions", REDUCTION_PAIRS)
def test_gradcheck_float64(recon, reductions):
    inputs = sample_inputs("cpu", True, torch.float64, image=(3, 2, 5), latent=(3, 4), recon=recon)
    assert torch.autograd.gradcheck(
        lambda *args: ops.vae_loss(*args, beta=0.7, **loss_kwargs(recon, reductions), backend="cpp"), inputs
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("reductions", [("sum", "sum"), ("mean", "batchmean")])
def test_opcheck(device, recon, reductions):
    inputs = sample_inputs(device, True, torch.float32, image=(3, 2, 5), latent=(3, 4), recon=recon)
    torch.library.opcheck(torch.ops.fastvae.vae_loss.default, (*inputs, 0.7, recon, *reductions, True))
    # Without the image gradient, only the latents can get gradients.
    frozen_image = (inputs[0].detach(), inputs[1].detach(), *inputs[2:])
    torch.library.opcheck(torch.ops.fastvae.vae_loss.default, (*frozen_image, 0.7, recon, *reductions, False))
    grads = [torch.tensor(w, device=device) for w in (1.0, 0.5, -2.0)]
    x_hat, image_grad, mu, logvar = (t.detach() for t in inputs)
    for scale_image, compute_grad_x in [(True, True), (False, True), (True, False), (False, False)]:
        torch.library.opcheck(
            torch.ops.fastvae.vae_loss_backward.default,
            (*grads, image_grad, x_hat, mu, logvar, 0.7, recon, *reductions, scale_image, compute_grad_x),
        )
    for weight in (1.0, 0.5):
        in_place_grads = [torch.tensor(w, device=device) for w in (weight, 0.0, -2.0)]
        torch.library.opcheck(
            torch.ops.fastvae.vae_loss_backward_.default,
            (*in_place_grads, image_grad.clone(), mu, logvar, 0.7, *reductions),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_in_place_backward_scales_the_image_gradient_and_matches_the_functional_one(device, weight):
    x_hat, x, mu, logvar = (t.detach() for t in sample_inputs(device, False))
    # The image's weight is grad_loss + grad_recon: 1 (the image is left as it is) or 0.25.
    grads = [torch.tensor(w, device=device) for w in (weight, 0.0, -2.0)]
    image_grad = 2 * (x_hat - x)
    expected = torch.ops.fastvae.vae_loss_backward(
        *grads, image_grad, None, mu, logvar, 0.7, "mse", "mean", "mean", True, False
    )
    scaled = image_grad.clone()
    latent_grads = torch.ops.fastvae.vae_loss_backward_(*grads, scaled, mu, logvar, 0.7, "mean", "mean")
    torch.testing.assert_close(scaled, expected[0])
    torch.testing.assert_close(latent_grads[0], expected[2])
    torch.testing.assert_close(latent_grads[1], expected[3])
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.fastvae.vae_loss_backward_(*grads, scaled.transpose(-1, -2), mu, logvar, 0.7, "mean", "mean")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("absent", [(0,), (1,), (2,), (1, 2), (0, 1, 2)])
def test_an_absent_incoming_gradient_weighs_zero(device, absent):
    # Autograd leaves the gradient of an unused output (recon and kl under loss.backward())
    # undefined; the raw ops take None there as a zero, with no zero tensor made for it.
    x_hat, x, mu, logvar = (t.detach() for t in sample_inputs(device, False, recon="bce"))
    image_grad = x_hat - x
    given = [torch.tensor(w, device=device) for w in (0.75, 0.5, -2.0)]
    zeros = [torch.zeros((), device=device) if i in absent else g for i, g in enumerate(given)]
    nones = [None if i in absent else g for i, g in enumerate(given)]
    for scale_image, compute_grad_x in [(True, True), (False, True), (True, False)]:
        options = (mu, logvar, 0.7, "bce", "mean", "batchmean", scale_image, compute_grad_x)
        expected = torch.ops.fastvae.vae_loss_backward(*zeros, image_grad, x_hat, *options)
        actual = torch.ops.fastvae.vae_loss_backward(*nones, image_grad, x_hat, *options)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    scaled_expected, scaled = image_grad.clone(), image_grad.clone()
    expected = torch.ops.fastvae.vae_loss_backward_(*zeros, scaled_expected, mu, logvar, 0.7, "mean", "batchmean")
    actual = torch.ops.fastvae.vae_loss_backward_(*nones, scaled, mu, logvar, 0.7, "mean", "batchmean")
    for a, e in zip((scaled, *actual), (scaled_expected, *expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize(
    "recon, recon_reduction", [("mse", "batchmean"), ("l1", "sum"), ("bce", "mean"), ("bce_logits", "mean")]
)
def test_torch_compile_fullgraph(recon, recon_reduction):
    def loss_fn(x_hat, x, mu, logvar):
        loss, recon_value, kl = ops.vae_loss(
            x_hat, x, mu, logvar, beta=2.0, reduction="batchmean", recon=recon, recon_reduction=recon_reduction,
            backend="cpp",
        )
        return loss + 0.5 * kl, recon_value

    # aot_eager traces dynamo, the fake kernels and the autograd formula, without inductor's
    # code generation, which would only cost time here.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    inputs = sample_inputs("cpu", True, recon=recon)
    actual, expected = compiled(*inputs), loss_fn(*inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    for a, e in zip(torch.autograd.grad(actual[0], inputs), torch.autograd.grad(expected[0], inputs)):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recon", ["mse", "bce_logits"])
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype, recon):
    # Several 16Ki-element chunks, so two threads really split the work.
    inputs = sample_inputs("cpu", True, dtype, image=(5, 3, 64, 70), latent=(5, 9000), recon=recon)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 2):
            torch.set_num_threads(num_threads)
            outputs = ops.vae_loss(*inputs, beta=0.3, reduction="sum", recon=recon, backend="cpp")
            grads = torch.autograd.grad(outputs[0], inputs)
            results.append([t.detach() for t in (*outputs, *grads)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


_BUILD_OUTPUTS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from fastvae import ops

    gen = torch.Generator().manual_seed(0)
    results = []
    for recon in ("mse", "l1", "bce", "bce_logits"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            x_hat, x, mu, logvar = (torch.rand(shape, generator=gen, dtype=torch.float64)
                                    for shape in ((3, 5003), (3, 5003), (3, 7), (3, 7)))
            inputs = [t.to(dtype).requires_grad_() for t in (0.02 + 0.96 * x_hat, x, mu, logvar)]
            outputs = ops.vae_loss(*inputs, beta=0.5, recon=recon, backend="cpp")
            # A weight other than 1, so the backward's scaling loop runs too.
            results += [*outputs, *torch.autograd.grad(0.7 * outputs[0], inputs)]
    torch.save([r.detach() for r in results], sys.argv[1])
    """
)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="the CPU has no AVX2")
def test_avx2_and_baseline_builds_agree(tmp_path):
    runs = []
    for capability in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{capability}.pt"
        subprocess.run([sys.executable, "-c", _BUILD_OUTPUTS_SCRIPT, str(path)], env=env, check=True)
        runs.append(torch.load(path))
    names = ("loss", "recon", "kl", "grad_x_hat", "grad_x", "grad_mu", "grad_logvar")
    for i, (baseline, avx2) in enumerate(zip(*runs)):
        name = names[i % len(names)]
        recon = ("mse", "l1", "bce", "bce_logits")[i // (4 * len(names))]
        exact_in_both = (name in ("recon", "grad_x_hat", "grad_x") and recon in ("mse", "l1")) or (
            name == "grad_x_hat" and recon == "bce")
        if exact_in_both:
            # Adds, multiplies, divisions and comparisons only, on the same lanes in the same order:
            # the same bits. (The BCE image gradient takes no log.)
            assert torch.equal(baseline, avx2), f"{recon} {name}"
        elif name in ("loss", "recon") and recon in ("bce", "bce_logits") and baseline.dtype != torch.float64:
            # The AVX2 build's float32 lanes take the fast logs and exp of csrc/cpu_vec_math.h (within
            # 1 ulp, 2 for bce_logits: test_bce_log_within_an_ulp_of_float64), the baseline
            # build the C library's (within an ulp): a sum of positive terms, each within 3 ulps.
            eps = torch.finfo(torch.float32).eps
            torch.testing.assert_close(avx2, baseline, rtol=4 * eps, atol=0.0, msg=f"{recon} {name}")
        else:
            # The KL, the BCE target gradients and the bce_logits image gradient take exp and log from
            # Sleef (or csrc/cpu_vec_math.h) in the AVX2 build and from the C library in the baseline
            # build: each within 2 ulps of exact, not always the same one.
            eps = torch.finfo(baseline.dtype).eps
            torch.testing.assert_close(avx2, baseline, rtol=4 * eps, atol=4 * eps, msg=f"{recon} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "image, latent",
    [
        ((0, 3, 4, 4), (0, 8)),  # empty batch
        ((1,), (1, 1)),  # one element
        ((2, 17), (2, 3)),  # shorter than one vector
        ((3, 5, 7), (3, 11)),
        ((2, 16385), (2, 5)),  # one element past a chunk
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon", RECONS)
def test_edge_sizes(device, image, latent, reduction, recon):
    inputs = sample_inputs(device, True, torch.float32, image, latent, recon=recon)
    if image[0] == 0 and reduction != "sum":  # see test_the_mean_of_nothing_is_refused_by_every_backend
        for vae_loss in (reference.vae_loss, functools.partial(ops.vae_loss, backend="cpp")):
            with pytest.raises(ValueError, match="there are none, and their mean is undefined"):
                vae_loss(*inputs, beta=0.5, reduction=reduction, recon=recon)
        return
    outputs = ops.vae_loss(*inputs, beta=0.5, reduction=reduction, recon=recon, backend="cpp")
    expected = reference.vae_loss(*inputs, beta=0.5, reduction=reduction, recon=recon)
    for o, e in zip(outputs, expected):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(outputs[0], inputs)
    for g, e in zip(grads, torch.autograd.grad(expected[0], inputs)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def vae_loss_of_every_backend(device):
    """fastvae.reference's vae_loss and fastvae.ops' with each backend that has one on ``device``."""
    backends = [b for b in ops.BACKENDS if ops.unavailable_reason(b, "vae_loss", torch.device(device)) is None]
    assert "cpp" in backends and "reference" in backends  # the checks below must reach the fused one
    return [reference.vae_loss] + [functools.partial(ops.vae_loss, backend=b) for b in backends]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "image, latent, reductions, message",
    [
        ((0, 3, 4, 4), (0, 8), dict(reduction="mean"),
         r"reduction 'mean' of the reconstruction term averages over the elements of x, but x has shape \(0, 3, 4, 4\)"),
        ((0, 3, 4, 4), (0, 8), dict(reduction="batchmean"),
         r"reduction 'batchmean' of the reconstruction term averages over the samples of x, but x has shape \(0, 3, 4, 4\)"),
        ((0, 3, 4, 4), (0, 8), dict(recon_reduction="sum", kl_reduction="batchmean"),
         r"reduction 'batchmean' of the KL term averages over the samples of mu, but mu has shape \(0, 8\)"),
        ((2, 0), (2, 3), dict(recon_reduction="mean", kl_reduction="sum"), "averages over the elements of x"),
        ((2, 3), (2, 0), dict(recon_reduction="sum", kl_reduction="mean"), "averages over the elements of mu"),
    ],
)
def test_the_mean_of_nothing_is_refused_by_every_backend(device, image, latent, reductions, message):
    # torch's losses return NaN there, which a training step would take in without a word.
    inputs = sample_inputs(device, True, torch.float32, image, latent)
    for vae_loss in vae_loss_of_every_backend(device):
        with pytest.raises(ValueError, match=message + r".*: there are none, and their mean is undefined; use 'sum'"):
            vae_loss(*inputs, **reductions)


@pytest.mark.parametrize("device", DEVICES)
def test_what_an_empty_batch_can_be_reduced_to(device):
    # A sum of nothing is 0, and so is the per-sample mean of samples that have no elements.
    empty = sample_inputs(device, True, torch.float32, (0, 3, 4, 4), (0, 8))
    no_pixels = sample_inputs(device, True, torch.float32, (2, 0), (2, 3))
    expected_kl = float64_kl(*no_pixels[2:], "batchmean").item()
    for vae_loss in vae_loss_of_every_backend(device):
        for inputs, reduction, kl_value in ((empty, "sum", 0.0), (no_pixels, "batchmean", expected_kl)):
            loss, recon, kl = vae_loss(*inputs, beta=0.5, reduction=reduction)
            assert recon.item() == 0.0
            assert kl.item() == pytest.approx(kl_value, rel=1e-6) and loss.item() == pytest.approx(0.5 * kl_value)
            assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(loss, inputs), inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recon", RECONS)
def test_non_contiguous_inputs(device, dtype, recon):
    big = sample_inputs(device, False, dtype, image=(4, 3, 9, 8), latent=(4, 12), recon=recon)
    # A transpose, a strided slice, and views whose data starts off a 16-byte boundary.
    views = (big[0].transpose(2, 3), big[1].transpose(2, 3), big[2][:, 1:], big[3][:, :-1])
    leaves = [v.detach().requires_grad_(True) for v in views]
    outputs = ops.vae_loss(*leaves, beta=1.5, reduction="mean", recon=recon, backend="cpp")
    contiguous = [v.detach().contiguous().requires_grad_(True) for v in views]
    expected = ops.vae_loss(*contiguous, beta=1.5, reduction="mean", recon=recon, backend="cpp")
    for o, e in zip(outputs, expected):
        assert torch.equal(o, e)
    for g, e in zip(torch.autograd.grad(outputs[0], leaves), torch.autograd.grad(expected[0], contiguous)):
        assert torch.equal(g, e)
    # Contiguous, but one element into their storage: the CUDA kernels cannot use 16-byte loads.
    shifted = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in big]
    assert all(t.is_contiguous() and t.storage_offset() == 1 for t in shifted)
    # The same bits as aligned copies: the CUDA grid and each thread's elements do not depend on
    # the loads' width.
    aligned = [t.clone() for t in big]
    expected = ops.vae_loss(*aligned, recon=recon, backend="cpp")
    for o, e in zip(ops.vae_loss(*shifted, recon=recon, backend="cpp"), expected):
        assert torch.equal(o, e)


@pytest.mark.parametrize("image_dtype, latent_dtype", [(torch.float16, torch.float64), (torch.float64, torch.bfloat16)])
def test_image_and_latent_dtypes_may_differ(image_dtype, latent_dtype):
    x_hat, x, _, _ = sample_inputs("cpu", True, image_dtype)
    _, _, mu, logvar = sample_inputs("cpu", True, latent_dtype)
    outputs = ops.vae_loss(x_hat, x, mu, logvar, beta=2.0, reduction="batchmean", backend="cpp")
    expected = reference.vae_loss(x_hat, x, mu, logvar, beta=2.0, reduction="batchmean")
    # One side accumulates in float32 in both cases, and the loss adds the two terms.
    assert_losses_close(outputs, expected, torch.float32)
    grads = torch.autograd.grad(outputs[0], (x_hat, mu))
    for g, e, dtype in zip(grads, torch.autograd.grad(expected[0], (x_hat, mu)), (image_dtype, latent_dtype)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "x": a["x"][:, :2]}, ValueError, r"x_hat has shape \(4, 3, 9, 7\) but x has \(4, 2, 9, 7\)"),
        (lambda a: {**a, "mu": a["mu"][:3], "logvar": a["logvar"][:3]}, ValueError, "x has batch size 4 but mu has 3"),
        (lambda a: {**a, "x": a["x"].int()}, TypeError, "x must be float16, bfloat16, float32 or float64, got torch.int32"),
        (lambda a: {**a, "logvar": a["logvar"].to("meta")}, ValueError, "mu is on cpu but logvar is on meta"),
        (lambda a: {**a, "x_hat": a["x_hat"].int(), "x": a["x"].int()}, TypeError, "x_hat must be float16"),
        (lambda a: {**a, "reduction": "none"}, ValueError, "reduction must be one of 'sum', 'batchmean', 'mean'"),
        (lambda a: {**a, "recon": "huber"}, ValueError,
         "recon must be one of 'mse', 'l1', 'bce', 'bce_logits', got 'huber'"),
        (lambda a: {**a, "kl_reduction": "avg"}, ValueError,
         "kl_reduction must be one of 'sum', 'batchmean', 'mean', got 'avg'"),
        (lambda a: {**a, "recon_reduction": "none"}, ValueError,
         "recon_reduction must be one of 'sum', 'batchmean', 'mean', got 'none'"),
        (lambda a: {**a, "beta": "1"}, TypeError, "beta must be a real number, got str"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(change, error, message):
    x_hat, x, mu, logvar = sample_inputs("cpu", False)
    args = change({"x_hat": x_hat, "x": x, "mu": mu, "logvar": logvar, "beta": 1.0, "reduction": "sum"})
    with pytest.raises(error, match=message):
        ops.vae_loss(args.pop("x_hat"), args.pop("x"), args.pop("mu"), args.pop("logvar"), **args, backend="cpp")


@pytest.mark.cpp_raises
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, a[1][:, :2]), r"x_hat has shape \[4, 3, 9, 7\] but x has \[4, 2, 9, 7\]"),
        (lambda a: a.__setitem__(2, a[2][:3]), r"mu has shape \[3, 10\] but logvar has \[4, 10\]"),
        (lambda a: (a.__setitem__(2, a[2][:3]), a.__setitem__(3, a[3][:3])), "x has batch size 4 but mu has 3"),
        (lambda a: a.__setitem__(0, a[0].half()), "x_hat is Half but x is Float"),
        (lambda a: (a.__setitem__(0, a[0].long()), a.__setitem__(1, a[1].long())), "x_hat must be float16"),
        (lambda a: (a.__setitem__(0, a[0][0, 0, 0, 0]), a.__setitem__(1, a[1][0, 0, 0, 0])), "need a batch dimension"),
        (lambda a: a.__setitem__(6, "avg"), "reduction must be one of 'sum', 'batchmean', 'mean', got 'avg'"),
        (lambda a: a.__setitem__(5, "huber"), "recon must be one of 'mse', 'l1', 'bce', 'bce_logits', got 'huber'"),
    ],
)
def test_raw_op_rejects_bad_input_with_runtime_error(change, message):
    args = [*sample_inputs("cpu", False), 1.0, "mse", "sum", "sum", True]
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastvae.vae_loss(*args)


@pytest.mark.cpp_raises
def test_raw_backward_op_rejects_bad_incoming_gradients():
    _, image_grad, mu, logvar = sample_inputs("cpu", False)
    one = torch.tensor(1.0)
    tail = (mu, logvar, 1.0, "mse", "sum", "sum", True, True)
    with pytest.raises(RuntimeError, match="grad_recon must be 0-dimensional"):
        torch.ops.fastvae.vae_loss_backward(one, torch.ones(2), one, image_grad, None, *tail)
    with pytest.raises(RuntimeError, match="grad_kl is Double but the output it is the gradient of is Float"):
        torch.ops.fastvae.vae_loss_backward(one, one, one.double(), image_grad, None, *tail)
    with pytest.raises(RuntimeError, match="a function of x_hat, which must be given"):
        torch.ops.fastvae.vae_loss_backward(one, one, one, image_grad, None, mu, logvar, 1.0, "bce", "sum", "sum",
                                            True, True)


@pytest.mark.parametrize("recon", RECONS)
def test_backward_is_one_operator_call(recon):
    inputs = sample_inputs("cpu", True, recon=recon)
    loss, _, _ = ops.vae_loss(*inputs, recon=recon, backend="cpp")

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    one = torch.ones_like(loss)
    with Record() as record:
        torch.autograd.grad(loss, inputs, one)
    # Nothing else either: recon's and kl's unused gradients are not made into zero tensors.
    assert record.calls == ["fastvae.vae_loss_backward"]


def test_cpp_backend_availability():
    assert cpp_ops.unavailable_reason(torch.device("cpu")) is None
    cuda = torch.device("cuda")
    assert "Triton backend" in cpp_ops.unavailable_reason(cuda, "reparameterize")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fastvae::vae_loss", "CUDA")
    reason = cpp_ops.unavailable_reason(cuda, "vae_loss")
    assert (reason is None) == (has_kernel and torch.cuda.is_available()), reason
    if not has_kernel:
        assert "built without its CUDA kernels" in reason


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recon", RECONS)
def test_cuda_matches_cpu_and_is_bitwise_deterministic(dtype, recon):
    cpu_inputs = sample_inputs("cpu", True, dtype, image=(6, 3, 33, 31), latent=(6, 50), recon=recon)
    cuda_inputs = [t.detach().cuda().requires_grad_(True) for t in cpu_inputs]
    runs = []
    for _ in range(2):
        outputs = ops.vae_loss(*cuda_inputs, beta=0.5, reduction="mean", recon=recon, backend="cpp")
        runs.append([t.detach() for t in (*outputs, *torch.autograd.grad(outputs[0], cuda_inputs))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    cpu_outputs = ops.vae_loss(*cpu_inputs, beta=0.5, reduction="mean", recon=recon, backend="cpp")
    cpu_grads = torch.autograd.grad(cpu_outputs[0], cpu_inputs)
    assert_losses_close(runs[0][:3], cpu_outputs, dtype)
    for g, e in zip(runs[0][3:], cpu_grads):
        torch.testing.assert_close(g.cpu(), e, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_scaled_reduced_precision_gradients_do_not_underflow(device, dtype):
    # A GradScaler's 65536 on a "mean" loss over 64x3x64x64: the true gradient 2 (x_hat - x) / N
    # is around 1e-6, below float16's normal range. Storing it so and scaling afterwards rounded
    # 45% of the float16 gradients to zero (issue 10); the reference rounds once, after scaling.
    gen = torch.Generator().manual_seed(0)
    shape = (64, 3, 64, 64)
    x_hat64, x64 = (torch.rand(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    x_hat = x_hat64.to(device=device, dtype=dtype).requires_grad_(True)
    x = x64.to(device=device, dtype=dtype)
    mu, logvar = torch.zeros(64, 8, device=device, dtype=dtype), torch.zeros(64, 8, device=device, dtype=dtype)
    scale = 65536.0
    (ops.vae_loss(x_hat, x, mu, logvar, reduction="mean", backend="cpp")[0] * scale).backward()
    exact = scale * 2 * (x_hat.detach().double() - x.double()) / x.numel()
    # One rounding of the exact value to the dtype, as the reference's gradient has.
    rounded = exact.to(dtype).double()
    grad = x_hat.grad.double()
    assert (grad == 0).float().mean().item() <= (rounded == 0).float().mean().item() + 1e-4
    relative_l1 = ((grad - exact).abs().sum() / exact.abs().sum()).item()
    assert relative_l1 <= 2 * ((rounded - exact).abs().sum() / exact.abs().sum()).item() + 1e-6


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autocast_bfloat16_decoder_output_with_float32_target(backend):
    # Under autocast the decoder's output is bfloat16 and the batch float32: computed in float32,
    # as F.mse_loss computes the mix (issue 14), and the gradient flows back to the bfloat16 output.
    gen = torch.Generator().manual_seed(0)
    decoder = torch.nn.Linear(6, 5 * 7)
    x = torch.rand(4, 5, 7, generator=gen)
    z, mu, logvar = (torch.randn(4, 6, generator=gen, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat = decoder(z).view(4, 5, 7)
        assert x_hat.dtype == torch.bfloat16 and x.dtype == torch.float32
        loss, recon, kl = ops.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", backend=backend)
        expected_recon = F.mse_loss(x_hat, x, reduction="sum") / 4
    assert recon.dtype == torch.float32
    torch.testing.assert_close(recon, expected_recon.float(), atol=1e-6, rtol=1e-6)
    assert_losses_close((loss, recon, kl), float64_loss(x_hat.float(), x, mu, logvar, 1.0, ("batchmean", "batchmean")), torch.float32)
    (grad_z,) = torch.autograd.grad(loss, z, retain_graph=True)
    (expected_grad_z,) = torch.autograd.grad(expected_recon, z)
    torch.testing.assert_close(grad_z, expected_grad_z, atol=1e-3, rtol=1e-3)


TORCH_LOSSES = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "bce": F.binary_cross_entropy,
    "bce_logits": F.binary_cross_entropy_with_logits,
}


def assert_matches_torch_loss(recon, x_hat, x, dtype, reduction="sum"):
    """Values and both image gradients of vae_loss's recon term against torch's own loss on the same
    inputs (upcast as vae_loss computes), NaN nowhere torch has none."""
    x_hat = x_hat.to(dtype).requires_grad_(True)
    x = x.to(dtype).requires_grad_(True)
    mu, logvar = torch.zeros(x.shape[0], 2, dtype=dtype), torch.zeros(x.shape[0], 2, dtype=dtype)
    recon_value = ops.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction=reduction, backend="cpp")[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = TORCH_LOSSES[recon](x_hat.to(acc), x.to(acc), reduction=reduction)
    torch.testing.assert_close(recon_value, expected, rtol=1e-6, atol=1e-6)
    for name, g, e in zip(("x_hat", "x"), torch.autograd.grad(recon_value, (x_hat, x)),
                          torch.autograd.grad(expected, (x_hat, x))):
        assert not (g.isnan() & ~e.isnan()).any(), name
        torch.testing.assert_close(g, e, rtol=2e-3, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_at_probabilities_of_exactly_0_and_1(dtype):
    # Each log is clamped at -100 as in F.binary_cross_entropy: finite loss, gradients of +-1e12
    # in the image (infinite in float16, as torch's), and torch's infinite target gradients.
    x_hat = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5, 0.0], [1.0, 0.25, 0.0, 1.0, 1.0, 0.0]])
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5, 0.3], [0.7, 1.0, 1.0, 0.0, 1.0, 0.0]])
    assert_matches_torch_loss("bce", x_hat, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_logits_at_huge_logits(dtype):
    big = 6e4 if dtype == torch.float16 else 1e30
    x_hat = torch.tensor([[big, -big, big, -big, 40.0], [-40.0, big, -big, 0.0, 1e-3]])
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 0.5, 0.0]])
    assert_matches_torch_loss("bce_logits", x_hat, x, dtype)


def recon_per_element(recon, x_hat_values, neutral_x_hat):
    """The float32 recon term of vae_loss at each of x_hat_values with x = 1, each computed alone in
    the first lane of the vectorized loop (16 elements: two vectors), the other lanes at
    neutral_x_hat, where the term is exactly 0."""
    mu = torch.zeros(1, 1)
    x = torch.ones(1, 16)
    out = []
    for v in x_hat_values.tolist():
        x_hat = torch.full((1, 16), neutral_x_hat)
        x_hat[0, 0] = v
        out.append(torch.ops.fastvae.vae_loss(x_hat, x, mu, mu, 1.0, recon, "sum", "sum", False)[1])
    return torch.stack(out).double()


def ulps_off(got, exact):
    """|got - exact| in ulps of float32 at exact (float64)."""
    exact32 = exact.float().abs()
    ulp = (torch.nextafter(exact32, torch.tensor(float("inf"))) - exact32).double()
    return ((got - exact).abs() / ulp).nan_to_num(0.0)


def float32_sweep(lowest_exponent):
    """Float32 values in [2**lowest_exponent, 1]: 48 random mantissas in every binade, each binade's
    ends, and the values around the log kernels' split points sqrt(1/2) and sqrt(2) - 1."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.arange(lowest_exponent, 0, dtype=torch.float64)
    mantissas = torch.cat([torch.rand(exponents.numel(), 48, generator=gen, dtype=torch.float64),
                           torch.tensor([[0.0, 1.0]]).expand(exponents.numel(), 2)], dim=1)
    values = (torch.ldexp(1.0 + mantissas, exponents[:, None]).flatten().float().clamp(max=1.0))
    splits = torch.tensor([0.70710678, 0.41421356])
    around = torch.cat([splits, torch.nextafter(splits, torch.ones(2)), torch.nextafter(splits, torch.zeros(2))])
    return torch.cat([values, around])


def test_bce_log_within_an_ulp_of_float64():
    # The AVX2 build's fast log (csrc/cpu_vec_math.h) in every binade of [0, 1], subnormals included,
    # against float64 log clamped at -100 as torch's: within 1 ulp of float32 (0.66 measured; the C
    # library's and Sleef's, in the baseline build, within 0.52). 0 gives -inf before the clamp.
    edges = torch.tensor([0.0, 2.0**-149, 1e-45, 3e-44, 4e-44, 2.0**-126 - 2.0**-149, 2.0**-126, 1e-30,
                          1.0 - 2.0**-24, 1.0])
    p = torch.cat([float32_sweep(-149), edges])
    got = -recon_per_element("bce", p, 1.0)
    exact = p.double().log().clamp(min=-100.0)
    assert got[-1] == 0.0  # log(1) is exactly 0
    assert ulps_off(got, exact).max() <= 1.0


def test_bce_logits_softplus_within_two_ulps_of_float64():
    # log1p(exp(-|l|)) of the AVX2 build: the fast exp (csrc/cpu_vec_math.h), then the fast log1p on
    # (0, 1]: within 2 ulps of float64 (1.50 measured; the baseline build's within 1.2), from logits
    # of 2**-40 to 60. The other lanes at 80 keep the vectors on the fast exp, and their terms
    # (e^-80) are below half an ulp of any term up to l = 60, so the sum is lane 0's term.
    logits = torch.cat([float32_sweep(-40), torch.linspace(1.0, 60.0, 3000), torch.tensor([0.0])])
    got = recon_per_element("bce_logits", logits, 80.0)
    assert ulps_off(got, torch.log1p(torch.exp(-logits.double()))).max() <= 2.0
    # Past 87 in magnitude (here, in the other lanes) a vector takes Sleef's exp, for its
    # subnormals: the terms down to l = 104, where exp(-l) leaves the subnormals (0.92 measured).
    logits = torch.linspace(60.0, 104.0, 2000)
    got = recon_per_element("bce_logits", logits, 1e30)
    assert ulps_off(got, torch.log1p(torch.exp(-logits.double()))).max() <= 2.0


def test_bce_logits_gradient_within_two_ulps_of_float64():
    # The image gradient at x = 0 is sigmoid(l), each element on its own (no sum): e / (1 + e) below
    # 0 and 1 / (1 + e) above, with e = exp(-|l|) from the fast exp down to l = -87 and from Sleef's
    # past it (1.82, 0.72 and 1.42 ulps measured there). Sorted, so that each vector's lanes are of
    # one of those kinds but the vectors at -87.
    magnitudes = torch.cat([float32_sweep(-40), torch.linspace(1.0, 104.0, 8000)])
    logits = torch.cat([-magnitudes.flip(0), torch.tensor([0.0]), magnitudes])
    mu = torch.zeros(1, 1)
    grad = torch.ops.fastvae.vae_loss(logits[None], torch.zeros(1, logits.numel()), mu, mu, 1.0, "bce_logits",
                                      "sum", "sum", True)[3][0]
    assert ulps_off(grad.double(), torch.sigmoid(logits.double())).max() <= 2.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_l1_ties_take_torchs_zero_subgradient(dtype, reduction):
    # x_hat == x on every other element, longer than a vector so the vectorized loop sees ties.
    x = torch.linspace(-2, 2, 2 * 37).view(2, 37)
    x_hat = torch.where(torch.arange(37) % 2 == 0, x, x + 0.25)
    assert_matches_torch_loss("l1", x_hat, x, dtype, reduction)
