"""Validation shared by every backend: a bad reduction is a ValueError before any kernel runs."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from fastvae import ops, reference

MU, LOGVAR = torch.zeros(2, 3), torch.zeros(2, 3)
X = torch.zeros(2, 1, 4, 4)
REDUCING_OPS = {
    "kl_divergence": lambda module, **kw: module.kl_divergence(MU, LOGVAR, **kw),
    "reparameterize_kl": lambda module, **kw: module.reparameterize_kl(MU, LOGVAR, **kw),
    "vae_loss": lambda module, **kw: module.vae_loss(X, X, MU, LOGVAR, **kw),
}


@pytest.mark.parametrize("reduction", [None, "", "Sum", 0])
@pytest.mark.parametrize("op", REDUCING_OPS)
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_a_missing_or_unknown_reduction_is_a_value_error_on_every_backend(backend, op, reduction):
    with pytest.raises(ValueError, match=f"reduction must be one of 'sum', .*, got {reduction!r}$"):
        REDUCING_OPS[op](ops, reduction=reduction, backend=backend)


@pytest.mark.parametrize("op", REDUCING_OPS)
def test_a_missing_reduction_is_a_value_error_in_the_reference(op):
    with pytest.raises(ValueError, match="reduction must be one of 'sum', .*, got None$"):
        REDUCING_OPS[op](reference, reduction=None)


@pytest.mark.parametrize("op", REDUCING_OPS)
def test_the_reduction_is_checked_before_a_backend_is_chosen(op, monkeypatch):
    def no_backend(*args):
        raise AssertionError("a backend was reached")

    monkeypatch.setattr(ops, "_implementation", no_backend)
    with pytest.raises(ValueError, match="got None$"):
        REDUCING_OPS[op](ops, reduction=None)


@pytest.mark.parametrize(
    "beta", [np.float32(0.5), np.float64(0.5), Fraction(1, 2), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)]
)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_beta_may_be_any_real_number(backend, beta):
    x_hat, mu = torch.full_like(X, 0.25), torch.ones(2, 3)
    expected = ops.vae_loss(x_hat, X, mu, LOGVAR, beta=0.5, backend=backend)
    got = ops.vae_loss(x_hat, X, mu, LOGVAR, beta=beta, backend=backend)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert ops.vae_loss(x_hat, X, mu, LOGVAR, beta=np.int64(2), backend=backend)[0].item() == (expected[1] + 2 * expected[2]).item()


@pytest.mark.parametrize(
    "beta, error, message",
    [
        (10**400, ValueError, "beta must be finite, got a int too large for a float"),
        (float("inf"), ValueError, "beta must be finite, got inf"),
        (np.float32("nan"), ValueError, "beta must be finite, got nan"),
        (torch.tensor(float("-inf")), ValueError, "beta must be finite, got -inf"),
        (True, TypeError, "beta must be a real number, got bool"),
        (1j, TypeError, "beta must be a real number, got complex"),
        (torch.ones(2), TypeError, r"a 0-dim real tensor, got a torch.float32 tensor of shape \(2\)"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_beta_that_is_not_a_finite_real_is_refused_by_name(backend, beta, error, message):
    with pytest.raises(error, match=message):
        ops.vae_loss(X, X, MU, LOGVAR, beta=beta, backend=backend)
