"""fastvae.integrations.diffusers: a patched AutoencoderKL against diffusers' own.

A tiny AutoencoderKL built from a config (nothing downloaded): 32x32 images, 4 latent channels
at 16x16. The loss is diffusers' usual one, written here with plain torch: the reconstruction
error (L1 or MSE, mean) + kl_weight * posterior.kl().mean().
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fastvae import ops
from fastvae.data import render_shapes
from fastvae.distributions import DiagonalGaussian, philox_seed
from fastvae.integrations.diffusers import is_patched, patch, unpatch

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(
    not HAVE_DIFFUSERS, reason="diffusers is not installed (pip install fastvae[diffusers])"
)
if HAVE_DIFFUSERS:
    import diffusers.models.autoencoders.vae as diffusers_vae
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

ROOT = Path(__file__).resolve().parent.parent
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A KL weight large enough that the KL's gradients show in the parameters' (diffusers' is 1e-6).
KL_WEIGHT = 1e-2


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )


def images(batch=4, offset=0):
    """Built-in shapes, in diffusers' [-1, 1]."""
    return render_shapes(0, range(offset, offset + batch), 32) * 2 - 1


def training_loss(vae, x, recon, generator=None):
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator=generator)).sample
    recon_loss = F.l1_loss(x_hat, x) if recon == "l1" else F.mse_loss(x_hat, x)
    return recon_loss + KL_WEIGHT * posterior.kl().mean()


def kernel_eps(shape, generator, device, dtype, **_):
    """The noise the fused kernels draw for ``generator``, in place of diffusers' randn_tensor."""
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return ops.reparameterize(zeros, zeros, seed=philox_seed(generator))


@needs_diffusers
@pytest.mark.parametrize("channels_last", [False, True])
def test_patched_posterior_equals_diffusers(channels_last):
    vae = tiny_vae()
    x = images()
    if channels_last:
        vae, x = vae.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    theirs = vae.encode(x).latent_dist
    other = vae.encode(images(offset=4)).latent_dist
    patch(vae)
    ours = vae.encode(x).latent_dist
    assert type(theirs) is DiagonalGaussianDistribution and type(ours) is DiagonalGaussian
    assert not ours.mean.is_contiguous()  # a chunked view of the moments, as in diffusers
    # The encoder ran the same way, so the moments and everything elementwise are bit for bit equal.
    for name in ("parameters", "mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=0, rtol=0, msg=name)
    torch.testing.assert_close(ours.mode(), theirs.mode(), atol=0, rtol=0)
    assert ours.deterministic is theirs.deterministic is False
    # Sums in float32 in a different order.
    z = theirs.sample(torch.Generator().manual_seed(0))
    # z in diffusers' layout: channels-last for a channels-last model, though the mean is a view.
    assert ours.sample(torch.Generator().manual_seed(0)).stride() == z.stride()
    torch.testing.assert_close(ours.kl(), theirs.kl(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.kl(other), theirs.kl(other), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.nll(z), theirs.nll(z), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ours.nll(z, dims=[1]), theirs.nll(z, dims=[1]), atol=1e-3, rtol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("dtype", DTYPES)
def test_posterior_equals_diffusers_on_moments_of_every_dtype(dtype):
    moments = torch.randn(3, 8, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moments[:, 4:].mul_(2).clamp_(-3, 3)
    moments[0, 4, 0, 0], moments[1, 5, 0, 0] = -45.0, -31.0  # below the clamp
    moments = moments.to(dtype)
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=0, rtol=0, msg=name)
    # fastvae sums half-precision moments in float32: diffusers' sum of the same rounded moments
    # in float32 is the reference; diffusers' own half-precision sum is near it.
    theirs32 = DiagonalGaussianDistribution(moments.to(torch.float64 if dtype == torch.float64 else torch.float32))
    kl = ours.kl()
    assert kl.dtype == theirs32.kl().dtype
    torch.testing.assert_close(kl, theirs32.kl(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kl, theirs.kl().to(kl.dtype), atol=1.0, rtol=1e-2)
    sample = theirs32.mean + 0.5
    torch.testing.assert_close(ours.nll(sample.to(dtype)), theirs32.nll(sample.to(dtype).to(sample.dtype)), atol=1e-3, rtol=1e-5)


@needs_diffusers
def test_patched_sampling_is_gaussian_and_reproducible():
    vae = patch(tiny_vae())
    x = images(8)
    posterior = vae.encode(x).latent_dist
    reference = DiagonalGaussianDistribution(posterior.parameters)
    ours = (posterior.sample(torch.Generator().manual_seed(0)) - posterior.mean) / posterior.std
    theirs = (reference.sample(torch.Generator().manual_seed(0)) - reference.mean) / reference.std
    assert stats.kstest(ours.detach().flatten().numpy(), "norm").pvalue > 1e-3
    assert stats.ks_2samp(ours.detach().flatten().numpy(), theirs.detach().flatten().numpy()).pvalue > 1e-3
    # forward(sample_posterior=True, generator=...), as diffusers' scripts call it.
    with torch.no_grad():
        first = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        again = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        other = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)


@needs_diffusers
@pytest.mark.parametrize("recon", ["l1", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_matches_diffusers_given_the_same_z(recon, dtype, monkeypatch):
    theirs = tiny_vae().to(dtype)
    ours = patch(copy.deepcopy(theirs))
    x = images().to(dtype)
    our_loss = training_loss(ours, x, recon, generator=torch.Generator().manual_seed(11))
    # diffusers' sample() draws its eps with randn_tensor: hand it the kernel's eps for the same seed.
    monkeypatch.setattr(diffusers_vae, "randn_tensor", kernel_eps)
    their_loss = training_loss(theirs, x, recon, generator=torch.Generator().manual_seed(11))
    our_loss.backward()
    their_loss.backward()
    # float32: the KL is summed in another order. bfloat16: diffusers rounds the KL and the loss
    # to bfloat16 (an ulp of the loss), fastvae keeps them in float32; the gradients (largest
    # about 1) then differ by about an ulp. A different z moves them by 2e-2.
    loss_tol, grad_tol = ((1e-6, 1e-5), (1e-6, 1e-4)) if dtype == torch.float32 else ((0, 8e-3), (4e-3, 1.6e-2))
    torch.testing.assert_close(our_loss.to(dtype), their_loss, atol=loss_tol[0], rtol=loss_tol[1])
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, atol=grad_tol[0], rtol=grad_tol[1], msg=name)


@needs_diffusers
@pytest.mark.parametrize("recon", ["l1", "mse"])
def test_fused_loss_is_diffusers_loss(recon):
    # diffusers' recipe, reconstruction error averaged over pixels + kl_weight x the batch mean of
    # the per-sample KL, is one fused vae_loss: recon_reduction="mean", kl_reduction="batchmean".
    vae = patch(tiny_vae())
    x = images()
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(0))).sample
    recon_loss = F.l1_loss(x_hat, x) if recon == "l1" else F.mse_loss(x_hat, x)
    want = recon_loss + KL_WEIGHT * posterior.kl().mean()
    got, _, _ = ops.vae_loss(
        x_hat, x, posterior.mean, posterior.logvar, beta=KL_WEIGHT, recon=recon,
        recon_reduction="mean", kl_reduction="batchmean",
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    params = [p for p in vae.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(got, params, retain_graph=True), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@needs_diffusers
def test_thirty_steps_lower_the_loss_both_ways():
    x = images(8)
    for vae in (tiny_vae(), patch(tiny_vae())):
        optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
        torch.manual_seed(0)
        losses = []
        for step in range(30):
            loss = training_loss(vae, x[step % 2 * 4 :][:4], "l1")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


@needs_diffusers
def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) of encode, sample, decode and the loss. aot_eager traces
    what inductor would (dynamo, the fake kernels, AOTAutograd) without its minutes of C++ codegen
    on a CPU; bench/bench_autoencoder_kl.py runs inductor."""
    vae = patch(tiny_vae())
    x = images()
    compiled = torch.compile(lambda x: training_loss(vae, x, "l1"), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    compiled(x).backward()
    compiled_grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    training_loss(vae, x, "l1").backward()
    for p, g in zip(vae.parameters(), compiled_grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


@needs_diffusers
def test_patch_changes_only_the_posterior():
    vae = tiny_vae()
    untouched = copy.deepcopy(vae)
    x = images()
    before = vae(x).sample
    assert patch(vae) is vae and is_patched(vae) and not is_patched(untouched) and not is_patched(AutoencoderKL)
    patch(vae)  # twice is once
    assert set(vae.state_dict()) == set(untouched.state_dict())
    torch.testing.assert_close(vae(x).sample, before, atol=0, rtol=0)
    assert type(vae.encode(x, return_dict=False)[0]) is DiagonalGaussian
    assert type(untouched.encode(x).latent_dist) is DiagonalGaussianDistribution
    vae.enable_slicing()
    assert type(vae.encode(x).latent_dist) is DiagonalGaussian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiled_encode is deprecated in recent diffusers
        assert type(vae.tiled_encode(x).latent_dist) is DiagonalGaussian
    # A deep copy (an EMA model, say) is patched and encodes with its own weights.
    clone = copy.deepcopy(vae)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert is_patched(clone)
    assert not torch.equal(clone.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    assert unpatch(vae) is vae and not is_patched(vae)
    assert type(vae.encode(x).latent_dist) is DiagonalGaussianDistribution


@needs_diffusers
def test_patch_the_class():
    class Subclass(AutoencoderKL):
        pass

    vae, x = tiny_vae(), images(2)
    try:
        patch(AutoencoderKL)
        assert is_patched(AutoencoderKL) and is_patched(vae)
        assert type(vae.encode(x).latent_dist) is DiagonalGaussian
        patch(vae)  # on top of the class: converts once
        assert type(vae.encode(x).latent_dist) is DiagonalGaussian
        unpatch(vae)
    finally:
        unpatch(AutoencoderKL)
    assert not is_patched(AutoencoderKL) and type(vae.encode(x).latent_dist) is DiagonalGaussianDistribution
    patch(Subclass)
    assert "encode" in vars(Subclass) and not is_patched(AutoencoderKL)
    unpatch(Subclass)
    assert "encode" not in vars(Subclass)  # inherited again, not pinned


@needs_diffusers
def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="expected a diffusers autoencoder whose encode builds .* got Linear: no method"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got the class Linear"):
        patch(torch.nn.Linear)
    with pytest.raises(TypeError, match="patch it before torch.compile"):
        patch(torch.compile(tiny_vae()))


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"needs diffusers.*pip install fastvae\[diffusers\]"):
        patch(torch.nn.Linear(2, 2))


@needs_diffusers
def test_example_script_trains_and_writes_grids(tmp_path):
    command = [
        sys.executable, str(ROOT / "examples" / "train_autoencoder_kl.py"), "--steps", "4", "--every", "2",
        "--batch-size", "4", "--train-size", "16", "--block-out-channels", "8,16", "--norm-num-groups", "4",
        "--device", "cpu", "--out", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "fastvae posterior" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "reconstructions_000002.png").is_file() and (tmp_path / "reconstructions_000004.png").is_file()
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert tuple(reloaded.config.block_out_channels) == (8, 16)
