"""Statistics of the in-kernel noise of the Triton backend: is eps a stream of independent N(0, 1)?

test_reparameterize_kl.py pins eps to the Philox contract value by value; these tests check
that the contract's stream is good noise. With mu = 0 and logvar = 0, z is eps itself. Seeds
are fixed, so each test is deterministic; the bounds are five standard errors (or p > 1e-4),
which a sound generator passes and a biased, scaled or correlated one fails.
"""

import functools

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICES as DEVICES  # Triton takes CPU tensors only under its interpreter
from scipy import stats

from fastvae import ops

# CPU-only torch wheels come without triton; the Triton backend then has nothing to test.
pytest.importorskip("triton")

N = 2**16
BOUND = 5 / np.sqrt(N)  # five standard errors of a mean or a correlation of N samples


@functools.lru_cache(maxsize=None)
def draw(device, seed, shape=(N,)):
    zeros = torch.zeros(shape, device=device)
    eps = ops.reparameterize(zeros, zeros, seed=seed, backend="triton").cpu().double().numpy().ravel()
    eps.flags.writeable = False
    return eps


def correlation(a, b):
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_mean_and_variance(device):
    eps = draw(device, seed=2024)
    assert abs(eps.mean()) < BOUND
    # The variance of a sample variance of N(0, 1) is 2 / N.
    assert abs(eps.var() - 1) < 5 * np.sqrt(2 / N)


@pytest.mark.parametrize("device", DEVICES)
def test_distribution_is_standard_normal(device):
    eps = draw(device, seed=7, shape=(64, 4, 16, 16))
    assert stats.kstest(eps, "norm").pvalue > 1e-4
    # Box-Muller draws radius sqrt(-2 log u1) with u1 >= 1e-7: never beyond 5.68.
    assert np.abs(eps).max() < 5.7
    # The tails too, which the KS statistic barely weighs: P(|eps| > 2.5) = 0.0124.
    tail = np.mean(np.abs(eps) > 2.5)
    assert abs(tail - 0.0124) < 5 * np.sqrt(0.0124 / N)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lag", [1, 2, 1024])
def test_neighbouring_elements_are_uncorrelated(device, lag):
    # Lag 1024 pairs elements at the same lane of consecutive kernel tiles.
    eps = draw(device, seed=99)
    assert abs(correlation(eps[:-lag], eps[lag:])) < BOUND
    assert abs(correlation(eps[:-lag] ** 2, eps[lag:] ** 2)) < BOUND


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("seed_a", "seed_b"), [(0, 1), (5, 5 + 2**32), (123456789, 987654321)])
def test_seeds_are_uncorrelated(device, seed_a, seed_b):
    # Adjacent seeds, and seeds that differ only in the high key word.
    a, b = draw(device, seed_a), draw(device, seed_b)
    assert abs(correlation(a, b)) < BOUND
    assert abs(correlation(a**2, b**2)) < BOUND
