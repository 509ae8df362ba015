"""Host time of fused calls, with the Triton kernels replaced by no-ops, on tiny CPU tensors.

On a GPU a call at a VAE's latent sizes (128x128) takes a few microseconds of kernel time, so
the host's share decides the speed: validation and dispatch, the seed, the Python wrapper, the
autograd node and the launch. This prints the medians, interleaved in one process, of forward +
backward through

* ``fastvae.ops`` (what users call: validation, dispatch, the seed draw for ``seed=None``),
* the Triton backend's function (the eager ``autograd.Function`` path, after validation),
* the custom op (``torch.ops.fastvae.triton_reparameterize_kl``, what torch.compile traces),
* ``vae_loss`` through ``fastvae.ops`` on the C++ backend, whose CPU kernels on these tiny
  tensors cost next to nothing,
* ``fastvae.reference`` on the same tensors, whose arithmetic is negligible: a lower bound on
  eager PyTorch's host time for the same op on a GPU.

Run as ``python bench/host_overhead.py``: it switches on TRITON_INTERPRET itself, so that the
Triton backend takes CPU tensors, and replaces the kernels, so nothing runs in the interpreter.
It needs no GPU, and Triton's own launch (a few microseconds a launch on a GPU) is not included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, for the Triton backend to take CPU tensors

import torch  # noqa: E402

from fastvae import ops, reference  # noqa: E402
from fastvae.backends import triton_ops  # noqa: E402
from fastvae.kernels import reparameterize_kl as kernels  # noqa: E402


class _NoLaunch:
    """Stands in for a JITFunction: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000, help="calls of each kind (default 3000)")
    rounds = parser.parse_args().rounds
    # One thread: the C++ CPU kernels would otherwise wake a thread pool for a few elements, a
    # cost the GPU path does not have.
    torch.set_num_threads(1)
    kernels._reparameterize_kl_forward_kernel = _NoLaunch()
    kernels._reparameterize_kl_backward_kernel = _NoLaunch()
    mu = torch.randn(2, 2, requires_grad=True)
    logvar = torch.randn(2, 2, requires_grad=True)
    latent_grads = (torch.ones(2, 2), torch.ones(()))
    x_hat = torch.rand(2, 3, 4, 4, requires_grad=True)
    x = torch.rand(2, 3, 4, 4)
    loss_grad = (torch.ones(()),)

    def latent(op):
        return lambda: torch.autograd.backward(op(), latent_grads)

    def loss(op):
        return lambda: torch.autograd.backward(op()[0], loss_grad)

    calls = {
        "reparameterize_kl, ops, seed=None": latent(
            lambda: ops.reparameterize_kl(mu, logvar, seed=None, backend="triton")),
        "reparameterize_kl, ops, seed=1": latent(lambda: ops.reparameterize_kl(mu, logvar, seed=1, backend="triton")),
        "reparameterize_kl, backend function": latent(
            lambda: triton_ops.reparameterize_kl(mu, logvar, reduction="sum", seed=1)),
        "reparameterize_kl, custom op": latent(
            lambda: torch.ops.fastvae.triton_reparameterize_kl(mu, logvar, torch.tensor(1), "sum")),
        "reparameterize_kl, fastvae.reference": latent(lambda: reference.reparameterize_kl(mu, logvar, seed=1)),
        "kl_divergence per_sample, ops": lambda: torch.autograd.backward(
            ops.kl_divergence(mu, logvar, reduction="per_sample", backend="triton"), (torch.ones(2),)),
        "vae_loss, ops, cpp backend": loss(lambda: ops.vae_loss(x_hat, x, mu, logvar, backend="cpp")),
        "vae_loss, fastvae.reference": loss(lambda: reference.vae_loss(x_hat, x, mu, logvar)),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    print(f"forward + backward, host time, median of {rounds} (Triton kernels not launched)")
    for name, samples in times.items():
        print(f"  {name:40} {statistics.median(samples) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
