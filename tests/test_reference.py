"""fastvae.reference against formulas derived by hand and evaluated in float64 with math/numpy."""

import math

import numpy as np
import pytest
import torch

from fastvae import reference


def kl_elementwise_f64(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (s^2 + mu^2 - 1 - log s^2), with s^2 = exp(logvar).
    return 0.5 * (np.exp(logvar) + mu**2 - 1.0 - logvar)


def reduce_f64(elementwise: np.ndarray, reduction: str) -> np.ndarray:
    total = elementwise.sum()
    return {"sum": total, "batchmean": total / elementwise.shape[0], "mean": total / elementwise.size}[reduction]


def latents(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    logvar = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return mu, logvar


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (4, 3, 5, 5)])
def test_kl_divergence_matches_closed_form(shape, reduction):
    mu, logvar = latents(shape)
    expected = kl_elementwise_f64(mu.numpy(), logvar.numpy())
    if reduction != "none":
        expected = reduce_f64(expected, reduction)
    got = reference.kl_divergence(mu, logvar, reduction=reduction)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_exactly_at_the_prior():
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert reference.kl_divergence(mu, logvar).item() == 0.0


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_vae_loss_matches_closed_form(reduction, beta):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x_hat = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    mu, logvar = latents((5, 6))
    loss, recon, kl = reference.vae_loss(x_hat, x, mu, logvar, beta=beta, reduction=reduction)
    want_recon = reduce_f64((x_hat.numpy() - x.numpy()) ** 2, reduction)
    want_kl = reduce_f64(kl_elementwise_f64(mu.numpy(), logvar.numpy()), reduction)
    np.testing.assert_allclose(recon.item(), want_recon, rtol=1e-12)
    np.testing.assert_allclose(kl.item(), want_kl, rtol=1e-12)
    np.testing.assert_allclose(loss.item(), want_recon + beta * want_kl, rtol=1e-12)


def recon_elementwise_f64(x_hat, x, recon):
    """The reconstruction terms in numpy float64, from their likelihoods."""
    if recon == "mse":
        return (x_hat - x) ** 2
    if recon == "l1":
        return np.abs(x_hat - x)
    if recon == "bce":
        return -(x * np.maximum(np.log(x_hat), -100) + (1 - x) * np.maximum(np.log(1 - x_hat), -100))
    p = 1 / (1 + np.exp(-x_hat))
    return -(x * np.log(p) + (1 - x) * np.log(1 - p))


@pytest.mark.parametrize("recon", ["mse", "l1", "bce", "bce_logits"])
@pytest.mark.parametrize("recon_reduction, kl_reduction", [("mean", "batchmean"), ("sum", "mean")])
def test_vae_loss_recon_forms_and_split_reductions(recon, recon_reduction, kl_reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x_hat = 0.05 + 0.9 * torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    mu, logvar = latents((5, 6))
    loss, recon_value, kl = reference.vae_loss(
        x_hat, x, mu, logvar, beta=0.3, recon=recon, recon_reduction=recon_reduction, kl_reduction=kl_reduction
    )
    want_recon = reduce_f64(recon_elementwise_f64(x_hat.numpy(), x.numpy(), recon), recon_reduction)
    want_kl = reduce_f64(kl_elementwise_f64(mu.numpy(), logvar.numpy()), kl_reduction)
    np.testing.assert_allclose(recon_value.item(), want_recon, rtol=1e-12)
    np.testing.assert_allclose(kl.item(), want_kl, rtol=1e-12)
    np.testing.assert_allclose(loss.item(), want_recon + 0.3 * want_kl, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_reduce_in_float32(dtype):
    mu, logvar = latents((8, 16), dtype)
    z, kl = reference.reparameterize_kl(mu, logvar, seed=3)
    assert z.dtype == dtype and kl.dtype == torch.float32
    want = kl_elementwise_f64(mu.double().numpy(), logvar.double().numpy()).sum()
    np.testing.assert_allclose(kl.item(), want, rtol=1e-5)
    loss, recon, kl = reference.vae_loss(mu, logvar, mu, logvar)
    assert loss.dtype == recon.dtype == kl.dtype == torch.float32


def test_reparameterize_is_mu_plus_std_times_torch_normal():
    mu, logvar = latents((6, 10))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    z = reference.reparameterize(mu, logvar, seed=42)
    expected = mu.numpy() + np.exp(0.5 * logvar.numpy()) * eps.numpy()
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-14, atol=1e-14)


def test_reparameterize_seed_none_follows_torch_manual_seed():
    mu, logvar = latents((4, 4))
    torch.manual_seed(5)
    a = reference.reparameterize(mu, logvar)
    b = reference.reparameterize(mu, logvar)
    torch.manual_seed(5)
    assert torch.equal(reference.reparameterize(mu, logvar), a)
    assert not torch.equal(a, b)


def test_reparameterize_gradients_by_hand():
    mu, logvar = latents((3, 4))
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z = reference.reparameterize(mu, logvar, seed=9)
    eps = (z - mu) / torch.exp(0.5 * logvar)
    grad_mu, grad_logvar = torch.autograd.grad(z.sum(), (mu, logvar))
    # dz/dmu = 1; dz/dlogvar = 0.5 * exp(0.5 * logvar) * eps
    assert torch.equal(grad_mu, torch.ones_like(mu))
    np.testing.assert_allclose(
        grad_logvar.numpy(), 0.5 * np.exp(0.5 * logvar.detach().numpy()) * eps.detach().numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean", "none"])
def test_kl_gradcheck(reduction):
    mu, logvar = latents((3, 5))
    assert torch.autograd.gradcheck(
        lambda m, v: reference.kl_divergence(m, v, reduction=reduction),
        (mu.requires_grad_(), logvar.requires_grad_()),
    )


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
def test_vae_loss_gradcheck(reduction):
    g = torch.Generator().manual_seed(2)
    x_hat = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mu, logvar = latents((2, 3))
    assert torch.autograd.gradcheck(
        lambda *t: reference.vae_loss(*t, beta=0.5, reduction=reduction),
        (x_hat, x, mu.requires_grad_(), logvar.requires_grad_()),
    )


def test_reparameterize_gradcheck_with_fixed_seed():
    mu, logvar = latents((3, 4))
    assert torch.autograd.gradcheck(
        lambda m, v: reference.reparameterize(m, v, seed=7), (mu.requires_grad_(), logvar.requires_grad_())
    )


def test_empty_batch_follows_torch_reductions():
    mu, logvar = torch.zeros(0, 4), torch.zeros(0, 4)
    assert reference.kl_divergence(mu, logvar, reduction="sum").item() == 0.0
    assert math.isnan(reference.kl_divergence(mu, logvar, reduction="mean").item())
    assert math.isnan(reference.kl_divergence(mu, logvar, reduction="batchmean").item())
    assert reference.reparameterize(mu, logvar).shape == (0, 4)


BAD_LATENTS = [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, r"mu has shape \(2, 3\) but logvar has \(2, 4\)"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)), TypeError, "mu is torch.float32 but logvar is torch.float64"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)), TypeError, "mu must be float16"),
    (([0.0], torch.zeros(1)), TypeError, "mu must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("args,error,message", BAD_LATENTS)
@pytest.mark.parametrize("fn", [reference.reparameterize, reference.kl_divergence, reference.reparameterize_kl])
def test_bad_latents_raise_clear_errors(fn, args, error, message):
    with pytest.raises(error, match=message):
        fn(*args)


def test_bad_reduction_and_seed():
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'avg'"):
        reference.kl_divergence(mu, mu, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of .* got 'none'"):
        reference.vae_loss(mu, mu, mu, mu, reduction="none")
    with pytest.raises(ValueError, match="0-dimensional"):
        reference.kl_divergence(torch.tensor(1.0), torch.tensor(1.0), reduction="batchmean")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        reference.reparameterize(mu, mu, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int or None, got float"):
        reference.reparameterize(mu, mu, seed=1.5)


def test_vae_loss_bad_inputs():
    x, mu = torch.zeros(4, 3, 8, 8), torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"x_hat has shape \(4, 3, 4, 4\) but x has \(4, 3, 8, 8\)"):
        reference.vae_loss(torch.zeros(4, 3, 4, 4), x, mu, mu)
    with pytest.raises(ValueError, match="x has batch size 4 but mu has 3"):
        reference.vae_loss(x, x, torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="beta must be a real number, got str"):
        reference.vae_loss(x, x, mu, mu, beta="1")
    with pytest.raises(ValueError, match="recon must be one of 'mse', 'l1', 'bce', 'bce_logits', got 'mae'"):
        reference.vae_loss(x, x, mu, mu, recon="mae")
    with pytest.raises(ValueError, match="kl_reduction must be one of 'sum', 'batchmean', 'mean', got 'none'"):
        reference.vae_loss(x, x, mu, mu, kl_reduction="none")
