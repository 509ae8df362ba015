"""Host time of one Triton-backend call, with the kernels replaced by no-ops, on CPU tensors.

On a GPU a call at a VAE's latent sizes (128x128) takes a few microseconds of kernel time, so
the host's share decides the speed: the Python wrapper, the autograd node and the launch. This
prints the medians, interleaved in one process, of reparameterize_kl forward + backward through

* the eager path (``autograd.Function``, what ``fastvae.ops`` runs outside torch.compile),
* the custom op (``torch.ops.fastvae.triton_reparameterize_kl``, what torch.compile traces),
* ``fastvae.reference`` on the same 2x2 tensors, whose arithmetic is negligible: a lower
  bound on eager PyTorch's host time for the same op on a GPU.

Run without TRITON_INTERPRET: ``python bench/host_overhead.py``. Nothing launches, so it needs
no GPU, and Triton's own launch cost (a few microseconds a launch on a GPU) is not included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastvae import reference
from fastvae.backends import triton_ops
from fastvae.kernels import reparameterize_kl as kernels

class _NoLaunch:
    """Stands in for a JITFunction: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000, help="calls of each kind (default 3000)")
    rounds = parser.parse_args().rounds
    kernels._reparameterize_kl_forward_kernel = _NoLaunch()
    kernels._reparameterize_kl_backward_kernel = _NoLaunch()
    mu = torch.randn(2, 2, requires_grad=True)
    logvar = torch.randn(2, 2, requires_grad=True)
    grads = (torch.ones(2, 2), torch.ones(()))
    calls = {
        "eager path (autograd.Function)": lambda: triton_ops.reparameterize_kl(mu, logvar, reduction="sum", seed=1),
        "custom op": lambda: torch.ops.fastvae.triton_reparameterize_kl(mu, logvar, torch.tensor(1), "sum"),
        "fastvae.reference": lambda: reference.reparameterize_kl(mu, logvar, seed=1),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            torch.autograd.backward(call(), grads)
            times[name].append(time.perf_counter() - start)
    print(f"reparameterize_kl forward + backward, host time, median of {rounds} (kernels not launched)")
    for name, samples in times.items():
        print(f"  {name:32} {statistics.median(samples) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
