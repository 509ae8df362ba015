"""Compiles every Triton kernel launch fastvae makes, for real GPUs, on a machine without one.

The interpreter runs the kernels' Python, not their compilation: a type that does not lower, a
dtype conversion or an atomic the backend rejects would only show on a GPU. So the host wrappers
in fastvae.kernels are run on CPU tensors with the kernels replaced by recorders, and each
recorded launch (argument types, constexprs, warps) is compiled ahead of time to a cubin for
sm_80 and sm_90 by Triton's own compiler and ptxas.

Run as a script, without TRITON_INTERPRET: ``python tests/triton_launches.py``. It prints one
line per compiled variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastvae.kernels import reparameterize_kl as kernels

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int32: "i32", torch.int64: "i64"}
# What the host passes as MAX_PROGRAMS on any GPU of up to 256 SMs. The host passes the same on
# CPU; pinned here so the compiled final reduction is the GPUs' whatever CPU_PROGRAMS is.
GPU_MAX_PROGRAMS = kernels.REDUCTION_WIDTH


def _arg_type(value) -> str:
    # As Triton's JIT types arguments: tensors by dtype, ints by the range their value needs.
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def record_launches() -> list:
    """Every launch the host wrappers make across dtypes, outputs, reductions, layouts and index widths,
    as ``(kernel, args, constexprs and num_warps)``."""
    launches: list = []
    original = kernels._run

    def record(kernel, grid, key, args, constexprs):
        launches.append((kernel, args, {**constexprs, "num_warps": kernels.NUM_WARPS}))

    kernels._run = record
    try:
        for dtype in DTYPES:
            _record_dtype(dtype, (4, 300))
            _record_dtype(dtype, (2, 3, 10, 10), torch.channels_last)
        # Per sample: one program a sample, and a sample split across programs.
        _record_dtype(torch.float32, (2, 4, 32, 32), kinds=((False, "per_sample"), (True, "per_sample")))
        # int64 offsets, on meta tensors (nothing allocated): a count just below 2**31, which
        # Triton passes as int32 although the offsets need int64, and one beyond it (int64).
        for numel in (2**31 - 500, 2**31 + 3000):
            _record_dtype(torch.float32, (numel,), device="meta")
    finally:
        kernels._run = original
    return launches


# (write_z, reduction) of the forward launches: each op's.
_KINDS = ((True, None), (True, "sum"), (True, "none"), (False, "mean"), (False, "per_sample"), (True, "per_sample"))


def _record_dtype(dtype: torch.dtype, shape: tuple, memory_format=torch.contiguous_format, device: str = "cpu",
                  kinds: tuple = _KINDS) -> None:
    mu = torch.zeros(shape, dtype=dtype, device=device).to(memory_format=memory_format)
    seed = torch.zeros((), dtype=torch.int64, device=device)
    for write_z, reduction in kinds:
        kernels.reparameterize_kl_forward(mu, mu, seed, write_z=write_z, reduction=reduction)
    # The KL and its gradient are in the accumulate dtype, as the forward returns them.
    kl_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kl_sum, kl_none = torch.zeros((), dtype=kl_dtype, device=device), torch.zeros_like(mu, dtype=kl_dtype)
    kl_per_sample = torch.zeros(shape[0], dtype=kl_dtype, device=device)
    for grad_z, grad_kl, reduction in (
        (mu, None, None),  # reparameterize
        (None, kl_none, "none"),  # kl_divergence, elementwise
        (mu, kl_sum, "sum"),  # reparameterize_kl
        (None, kl_sum, "batchmean"),
        (None, kl_per_sample, "per_sample"),  # kl_divergence per sample
        (mu, kl_per_sample, "per_sample"),
    ):
        kernels.reparameterize_kl_backward(grad_z, grad_kl, mu, mu, seed, reduction=reduction)


def _variant(launch) -> tuple:
    """(kernel name, signature, constexprs, options) of one recorded launch, hashable."""
    kernel, args, kwargs = launch
    kwargs = dict(kwargs)
    options = (("num_warps", kwargs.pop("num_warps")),)
    if "MAX_PROGRAMS" in kwargs:
        kwargs["MAX_PROGRAMS"] = GPU_MAX_PROGRAMS
    # Every argument typed as Triton's JIT types it, n_elements included: a count below 2**31
    # is an int32 even where INT64 is set.
    signature = tuple((name, _arg_type(value)) for name, value in zip(kernel.arg_names, args))
    signature += tuple((name, "constexpr") for name in kwargs)
    constexprs = tuple(
        (name, value.value if isinstance(value, tl.constexpr) else value) for name, value in kwargs.items()
    )
    return kernel.fn.__name__, signature, constexprs, options


def compile_variant(variant: tuple, target: GPUTarget) -> str:
    name, signature, constexprs, options = variant
    fn = getattr(kernels, name)
    compiled = triton.compile(ASTSource(fn, dict(signature), dict(constexprs)), target=target, options=dict(options))
    assert compiled.asm["cubin"], f"{name}: no cubin"
    flags = ", ".join(f"{k}={v}" for k, v in constexprs if k not in ("BLOCK", "MAX_PROGRAMS"))
    types = ", ".join(t for _, t in signature if t != "constexpr")
    return f"sm_{target.arch} {name}({types}; {flags})"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_launches: unset TRITON_INTERPRET; it would record interpreted kernels", file=sys.stderr)
        return 2
    variants = list(dict.fromkeys(_variant(launch) for launch in record_launches()))
    jobs = [(variant, target) for target in TARGETS for variant in variants]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for line in pool.map(compile_variant, *zip(*jobs)):
            print(line)
    print(f"triton_launches: {len(jobs)} variants compiled ({len(variants)} launches x {len(TARGETS)} targets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
