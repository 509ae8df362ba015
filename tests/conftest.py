import functools
import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. It must be
# switched on before triton is first imported, which happens lazily inside fastvae.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# True when Triton runs its kernels in the interpreter, which takes CPU tensors. Off wherever
# CUDA exists (unless set by hand): Triton then compiles for the GPU and rejects CPU tensors.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

CUDA_DEVICES = ["cuda"] if torch.cuda.is_available() else []
# Devices for the C++ and reference backends.
DEVICES = ["cpu"] + CUDA_DEVICES
# Devices for the Triton backend: CPU tensors only under the interpreter. The skip keeps the CPU
# cases visible on a GPU host, with the reason, instead of failing them or dropping them silently.
TRITON_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not TRITON_INTERPRETED,
            reason="Triton takes CPU tensors only under TRITON_INTERPRET=1, which is off in this run "
            "(as wherever CUDA is present); the same checks run on cuda",
        ),
    )
] + CUDA_DEVICES


def skip_unless_backend_runs(backend: str, op: str, device: str) -> None:
    """Skips the case, naming why, where ``backend`` cannot run ``op`` on ``device`` here: Triton
    on CPU tensors without its interpreter (any GPU host), the C++ backend's sampling on CUDA."""
    from fastvae import ops

    reason = ops.unavailable_reason(backend, op, torch.device(device))
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} on {device} here: {reason}")


def load_exception_probe():
    """bench/exception_probe.py, which runs each kind of error raised in fastvae._C in its own process."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import exception_probe
    finally:
        sys.path.pop(0)
    return exception_probe


@functools.cache
def _cpp_errors_crash() -> str | None:
    """Why raising from fastvae._C would crash this process, or None when its errors reach Python.

    Asked once per process, in subprocesses (bench/exception_probe.py), the first time a test
    marked ``cpp_raises`` is about to run: on a stack where an exception thrown inside the
    extension ends the process, those tests are skipped saying so instead of taking the test
    worker, and tests/test_build.py fails naming the cases.
    """
    exception_probe = load_exception_probe()
    failed = [o for o in map(exception_probe.run_case, exception_probe.raw_op_cases(torch.cuda.is_available()))
              if not o.ok]
    if not failed:
        return None
    return "; ".join(f"{o.case.name}: {o.result}" for o in failed)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cpp_raises") is None:
        return
    from fastvae import extension_error

    if extension_error is None and (crash := _cpp_errors_crash()) is not None:
        pytest.skip(f"an error raised inside fastvae._C does not reach Python on this stack ({crash}); "
                    "tests/test_build.py::test_errors_raised_in_the_extension_reach_python fails for it")
