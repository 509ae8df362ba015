"""``fastvae info``: the versions in use and which backend each op runs on, and why."""

from __future__ import annotations

import argparse
import importlib.metadata

import torch

import fastvae
from fastvae import ops
from fastvae._extension import built_against, extension_error


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_line() -> str:
    if extension_error is not None:
        return f"not loaded ({extension_error})"
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastvae::vae_loss", "CUDA")
    kernels = "loaded, with CUDA kernels" if cuda else "loaded, CPU kernels only"
    return f"{kernels} (built against torch {built_against() or 'unknown'})"


def report() -> str:
    # CUDA rows even without a GPU: they say why the fused GPU kernels would not run here.
    devices = [torch.device("cpu"), torch.device("cuda")]
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "none visible"
    lines = [
        f"fastvae   {fastvae.__version__}",
        f"torch     {torch.__version__} (built for CUDA {torch.version.cuda or 'no CUDA'})",
        f"triton    {_version('triton')}",
        f"GPU       {gpu}",
        f"fastvae._C {_extension_line()}",
        "",
        "backend=\"auto\" picks:",
    ]
    for device in devices:
        for op in ops.OPS:
            chosen, passed_over = ops.auto_choice(op, device)
            why = f"  (passed over {'; '.join(passed_over)})" if passed_over else ""
            lines.append(f"  {device.type:4s} {op:18s} -> {chosen}{why}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__


def run(args: argparse.Namespace) -> int:
    print(report())
    return 0
