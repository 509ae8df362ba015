"""Runs every fused kernel once, small, and checks each result against fastvae.reference.

Short on purpose: `make gpu-check` runs it under compute-sanitizer (memcheck, racecheck,
synccheck), which slows kernels by orders of magnitude. It covers each dtype, the vectorized and
the unaligned (scalar) paths of the CUDA loss, its in-place backward, and each output and
reduction of the Triton kernels, at sizes that are not multiples of a block or a vector. Every
reconstruction form of the loss runs, each with one reduction for both terms and with split ones.

    python bench/kernel_smoke.py --device cuda
    python bench/kernel_smoke.py --device cpu    # the same calls on CPU (Triton interpreted)
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("float16", "bfloat16", "float32", "float64")
# Loose: this checks that every kernel ran and wrote its outputs, not rounding (the tests do).
TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-4, "float64": 1e-9}


def _close(got, want, dtype: str, what: str) -> None:
    import torch

    torch.testing.assert_close(got.double(), want.double(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], msg=what)


def _vae_loss(device, dtype_name: str, aligned: bool) -> None:
    import torch

    from fastvae import ops, reference
    from fastvae._checks import RECONS

    dtype = getattr(torch, dtype_name)
    # 3*17*19 image elements: not a multiple of a 16-byte vector; a 1-element offset misaligns.
    offset = 0 if aligned else 1
    storage = torch.rand(2, 3 * 17 * 19 * 2 + offset, device=device, dtype=dtype)
    x_hat = storage[0, offset:offset + 3 * 17 * 19 * 2].view(2, 3, 17, 19).detach().requires_grad_()
    x = storage[1, offset:offset + 3 * 17 * 19 * 2].view(2, 3, 17, 19)
    mu = torch.randn(2, 37, device=device, dtype=dtype, requires_grad=True)
    logvar = (0.1 * torch.randn(2, 37, device=device, dtype=dtype)).requires_grad_()
    cases = [(recon, reductions) for recon in RECONS for reductions in (("sum", "sum"), ("mean", "batchmean"))]
    for recon, (recon_reduction, kl_reduction) in cases:
        options = dict(beta=0.5, recon=recon, recon_reduction=recon_reduction, kl_reduction=kl_reduction)
        what = f"{recon} {recon_reduction}/{kl_reduction} {dtype_name} aligned={aligned}"
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x_hat, x, mu, logvar)]
        loss = ops.vae_loss(*inputs, **options, backend="cpp")
        want = reference.vae_loss(x_hat, x, mu, logvar, **options)
        for got, expected, name in zip(loss, want, ("loss", "recon", "kl")):
            _close(got, expected, dtype_name, f"vae_loss {name} {what}")
        # loss.backward() takes the in-place backward; two weights take the out-of-place one.
        for weights in ((1.0, 0.0, 0.0), (0.7, 0.3, 0.2)):
            grads = torch.autograd.grad(
                [loss[0] * weights[0] + loss[1] * weights[1] + loss[2] * weights[2]],
                [inputs[0], inputs[2], inputs[3]], retain_graph=True,
            )
            want_grads = torch.autograd.grad(
                [want[0] * weights[0] + want[1] * weights[1] + want[2] * weights[2]],
                [x_hat, mu, logvar], retain_graph=True,
            )
            for got, expected in zip(grads, want_grads):
                _close(got, expected, dtype_name, f"vae_loss gradient {what} {weights}")


def _latent(device, dtype_name: str) -> None:
    import torch

    from fastvae import ops, reference

    dtype = getattr(torch, dtype_name)
    mu = torch.randn(3, 1001, device=device, dtype=dtype, requires_grad=True)
    logvar = (0.1 * torch.randn(3, 1001, device=device, dtype=dtype)).requires_grad_()
    for reduction in ("sum", "batchmean", "mean", "none", "per_sample"):
        kl = ops.kl_divergence(mu, logvar, reduction=reduction, backend="triton")
        _close(kl, reference.kl_divergence(mu, logvar, reduction=reduction), dtype_name, f"kl {reduction}")
        z, kl = ops.reparameterize_kl(mu, logvar, reduction=reduction, seed=5, backend="triton")
        torch.autograd.backward([z.float().sum(), kl.sum()])
    z = ops.reparameterize(mu, logvar, seed=5, backend="triton")
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    assert torch.isfinite(eps).all() and eps.abs().max() < 10, f"reparameterize {dtype_name}: eps out of range"
    z.float().sum().backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    import fastvae

    if fastvae.extension_error is not None:
        print(f"kernel_smoke: fastvae._C is not loaded: {fastvae.extension_error}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    for dtype in DTYPES:
        for aligned in (True, False):
            _vae_loss(device, dtype, aligned)
        _latent(device, dtype)
        print(f"kernel_smoke: {device} {dtype}: vae_loss (vectorized, unaligned, in place) and reparameterize_kl ok")
    if device != "cpu":
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
