"""Where a fused call's time goes, host or device: each fused op against plain PyTorch's version.

For each op at the sizes the GPU goals name, forward + backward, fused and eager side by side:

* host: the wall time to issue one call, timed over back-to-back calls without a sync (on a
  GPU the host runs ahead of the kernels; on a CPU it is the whole call);
* wall: the same calls followed by a sync, per call (what a loop sees: the longer of the two);
* device: the kernels' own time per call, summed from torch.profiler's device events;
* kernels: device kernels launched per call.

Then torch.profiler's host functions of each fused call, by self CPU time: what a host-bound op
spends its microseconds on. `make gpu-check` runs it on the GPU (`--calls 200`); on a CPU (the
dry run) it profiles CPU tensors, where device time does not apply.

    python bench/profile_ops.py [--calls N] [--top K]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from fastvae import ops, reference


@dataclass
class Subject:
    name: str
    method: str
    make: Callable[[], tuple]
    call: Callable


def _latents(device, b, d):
    def make():
        mu = torch.randn(b, d, device=device, requires_grad=True)
        return mu, (0.1 * torch.randn(b, d, device=device)).requires_grad_()

    return make


def _images(device, b):
    def make():
        x_hat = torch.rand(b, 3, 64, 64, device=device, requires_grad=True)
        mu = torch.randn(b, 128, device=device, requires_grad=True)
        return x_hat, torch.rand(b, 3, 64, 64, device=device), mu, (0.1 * torch.randn(b, 128, device=device)).requires_grad_()

    return make


def _fwd_bwd(op):
    def call(*inputs):
        z, kl = op(*inputs)
        torch.autograd.backward((z, kl), (torch.ones_like(z), torch.ones_like(kl)))

    return call


def _loss_fwd_bwd(op):
    def call(*inputs):
        op(*inputs)[0].backward()

    return call


def subjects(device: torch.device) -> list[Subject]:
    cuda = device.type == "cuda"
    latent_sizes = [(256, 128), (4096, 1024)] if cuda else [(256, 128)]
    batch = 256 if cuda else 16
    found = []
    for b, d in latent_sizes:
        for method, op in (("eager", reference.reparameterize_kl), ("fused", ops.reparameterize_kl)):
            found.append(Subject(f"reparameterize_kl {b}x{d}", method, _latents(device, b, d), _fwd_bwd(op)))
    for method, op in (("eager", reference.vae_loss), ("fused", ops.vae_loss)):
        found.append(Subject(f"vae_loss {batch}x3x64x64", method, _images(device, batch), _loss_fwd_bwd(op)))
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_time_us(event) -> float:
    # torch renamed the CUDA-specific fields to device ones; 2.11 has both, later versions may not.
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _clear_grads(inputs: list[tuple]) -> None:
    # Each round starts as a training step does, without gradients to accumulate into.
    for args in inputs:
        for t in args:
            t.grad = None


def measure(subject: Subject, device: torch.device, calls: int, top: int) -> tuple[dict, str]:
    inputs = [subject.make() for _ in range(calls)]
    for args in inputs[:3]:
        subject.call(*args)
    _sync(device)
    host, wall = [], []
    for _ in range(3):
        _clear_grads(inputs)
        start = time.perf_counter()
        for args in inputs:
            subject.call(*args)
        issued = time.perf_counter()
        _sync(device)
        host.append((issued - start) / calls)
        wall.append((time.perf_counter() - start) / calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _clear_grads(inputs)
    with profile(activities=activities) as prof:
        for args in inputs:
            subject.call(*args)
        _sync(device)
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    row = {
        "host_us": statistics.median(host) * 1e6,
        "wall_us": statistics.median(wall) * 1e6,
        "device_us": sum(_device_time_us(e) for e in kernels) / calls if device.type == "cuda" else None,
        "kernels": len(kernels) / calls if device.type == "cuda" else None,
    }
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    return row, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per timing and per profile (default 50)")
    parser.add_argument("--top", type=int, default=12, help="host functions listed per fused call (default 12)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{'op, forward + backward':28} {'method':7} {'host us':>9} {'wall us':>9} {'device us':>10} {'kernels':>8}")
    tables = []
    for subject in subjects(device):
        row, table = measure(subject, device, args.calls, args.top)
        device_us = f"{row['device_us']:.1f}" if row["device_us"] is not None else "-"
        kernels = f"{row['kernels']:.1f}" if row["kernels"] is not None else "-"
        print(f"{subject.name:28} {subject.method:7} {row['host_us']:9.1f} {row['wall_us']:9.1f} {device_us:>10} {kernels:>8}",
              flush=True)
        if subject.method == "fused":
            tables.append(f"\n{subject.name}, fused: host functions by self CPU time, {args.calls} calls\n{table}")
    print("".join(tables))
    print(f"profile_ops: {len(subjects(device))} calls profiled on {device.type} "
          f"(host = issue time, wall = with a sync, device = kernel time, per call)")


if __name__ == "__main__":
    main()
