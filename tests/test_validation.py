"""Validation shared by every backend: a bad reduction is a ValueError before any kernel runs."""

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
