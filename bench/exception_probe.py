"""Does an error raised inside fastvae._C reach Python as an exception on this stack?

On the first GPU run (an H200, torch 2.11.0+cu130, Python 3.12.3) seven tests crashed their
process with a segmentation fault, each where a raw ``torch.ops.fastvae.*`` op failed one of
its own checks; every one of those checks prints a tensor's shape in its message, while the
raw-op checks whose message prints no shape (or an empty one) raised as they should. CI's
torch 2.11.0 on Python 3.12 raises them all. This script tells the cases apart, each in its own
process so that a crash is a result rather than the end of the run:

* torch's own error (a matmul of mismatched shapes), against the extension's;
* the extension's error with and without a shape in its message;
* before CUDA is initialised, after, and on CUDA tensors;
* the public API on the same bad input (a ValueError raised in Python, before any C++ runs).

A case that dies of a signal is run once more under gdb, where there is one, for the native
backtrace that Python's faulthandler cannot show. ``--facts`` first prints what the extension
was built with and what it loaded: compilers, torch's build configuration and C++ ABI flag,
``ldd`` and the ELF notes of fastvae._C, and the C++ runtime libraries mapped in the process.

    python bench/exception_probe.py --facts     # exit status 1 if any case crashed

The test suite runs the same cases (tests/test_build.py) and skips the raw-op error tests of a
process whose extension crashes on them, saying why, instead of losing the test worker.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each case's code runs in a fresh interpreter: the call must raise the named exception.
_SHAPE_MISMATCH = "torch.ops.fastvae.reparameterize_kl(torch.zeros(2, 3{dev}), torch.zeros(3, 2{dev}), None, 'sum', False, True, False)"
_BAD_RECON = (
    "z = torch.zeros(2, 3{dev}); torch.ops.fastvae.vae_loss(z, z, z, z, 1.0, 'huber', 'sum', 'sum', False)"
)
_CUDA_INIT = "torch.zeros(1, device='cuda'); "


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    raises: str
    needs_cuda: bool = False


CASES = (
    Case("torch's own error, CPU", "torch.mm(torch.zeros(2, 3), torch.zeros(2, 3))", "RuntimeError"),
    Case("fastvae._C error without a shape, CPU", _BAD_RECON.format(dev=""), "RuntimeError"),
    Case("fastvae._C error with a shape, CPU", _SHAPE_MISMATCH.format(dev=""), "RuntimeError"),
    Case("public API on the same input, CPU",
         "fastvae.ops.reparameterize_kl(torch.zeros(2, 3), torch.zeros(3, 2))", "ValueError"),
    Case("torch's own error, after CUDA init",
         _CUDA_INIT + "torch.mm(torch.zeros(2, 3), torch.zeros(2, 3))", "RuntimeError", True),
    Case("fastvae._C error without a shape, after CUDA init",
         _CUDA_INIT + _BAD_RECON.format(dev=""), "RuntimeError", True),
    Case("fastvae._C error with a shape, after CUDA init",
         _CUDA_INIT + _SHAPE_MISMATCH.format(dev=""), "RuntimeError", True),
    Case("fastvae._C error with a shape, CUDA tensors",
         "x = torch.zeros(4, 3, 9, 7, device='cuda'); m = torch.zeros(4, 2, device='cuda'); "
         "torch.ops.fastvae.vae_loss(x, x[:, :2], m, m, 1.0, 'mse', 'sum', 'sum', False)", "RuntimeError", True),
)


def _child_source(code: str) -> str:
    # The child reports the exception's type and first line itself and exits 0, so that any other
    # exit status means the exception never reached Python.
    return (
        "import torch, fastvae\n"
        "try:\n"
        f"    {code}\n"
        "except Exception as exc:\n"
        "    print('raised', type(exc).__name__ + ':', str(exc).splitlines()[0] if str(exc) else '')\n"
        "else:\n"
        "    print('raised nothing')\n"
    )


@dataclass
class Outcome:
    case: Case
    ok: bool
    # One line: what was raised, or how the process ended.
    result: str


def run_case(case: Case, timeout_s: float = 120) -> Outcome:
    """Runs ``case`` in a fresh interpreter and says whether it raised what it should."""
    try:
        child = subprocess.run([sys.executable, "-c", _child_source(case.code)], cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(case, False, f"hung for {timeout_s:.0f} s")
    lines = [line for line in child.stdout.splitlines() if line.startswith("raised ")]
    if child.returncode < 0:
        return Outcome(case, False, f"killed by {signal.Signals(-child.returncode).name}")
    if child.returncode != 0 or not lines:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return Outcome(case, False, f"exit status {child.returncode}: {tail}")
    result = lines[-1][len("raised "):]
    return Outcome(case, result.startswith(case.raises + ":"), result)


def cases(cuda: bool) -> list[Case]:
    return [case for case in CASES if cuda or not case.needs_cuda]


def raw_op_cases(cuda: bool) -> list[Case]:
    """The extension's errors that crashed on the H200 (a shape in the message), on each device."""
    names = ["fastvae._C error with a shape, CPU"] + (["fastvae._C error with a shape, CUDA tensors"] if cuda else [])
    return [case for case in CASES if case.name in names]


def _command_output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    return (done.stdout + done.stderr).strip()


def _extension_path() -> str | None:
    found = glob.glob(os.path.join(ROOT, "fastvae", "_C*.so"))
    if found:
        return found[0]
    import importlib.util

    spec = importlib.util.find_spec("fastvae._C")
    return spec.origin if spec else None


def print_facts() -> None:
    import sysconfig

    import torch

    import fastvae

    print("python", sys.version.replace("\n", " "), "at", sys.executable)
    print("python built with CC:", sysconfig.get_config_var("CC"))
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "_GLIBCXX_USE_CXX11_ABI",
          torch._C._GLIBCXX_USE_CXX11_ABI, "extension:", fastvae.extension_error or "loaded")
    for tool in ("c++", "gcc", "nvcc", "ld"):
        path = shutil.which(tool)
        first = _command_output([path, "--version"]).splitlines()[:1] if path else ["not found"]
        version = " ".join(first) if tool != "nvcc" else _command_output([path, "--version"]).splitlines()[-1:]
        print(f"{tool:4} {path}: {version}")
    print(torch.__config__.show())
    extension = _extension_path()
    print("fastvae._C:", extension)
    if extension:
        for command in (["ldd", extension], ["readelf", "-n", extension], ["readelf", "-d", extension]):
            print("$", " ".join(command))
            print(_command_output(command))
    # Which copies of the C++ runtime and OpenMP this process really uses (the linker takes the
    # first one loaded, whatever ldd says on its own).
    runtimes = ("libstdc++", "libgcc_s", "libgomp", "libomp", "libiomp", "libcudart", "libc10.so")
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1] for line in maps if any(r in line for r in runtimes)})
    print("mapped runtime libraries:", *mapped, sep="\n  ")


def _native_backtrace(case: Case) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb on this machine for a native backtrace)"
    return _command_output([
        gdb, "-batch", "-nx", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
        "--args", sys.executable, "-c", _child_source(case.code),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", action="store_true", help="print the build and runtime facts first")
    args = parser.parse_args(argv)
    if args.facts:
        print_facts()
    import torch

    # In parallel: each case is a fresh interpreter that spends its seconds importing torch.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        outcomes = list(pool.map(run_case, cases(torch.cuda.is_available())))
    for outcome in outcomes:
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.case.name:52} {outcome.result}", flush=True)
    crashed = [o for o in outcomes if not o.ok]
    for outcome in crashed:
        print(f"\n--- native backtrace of '{outcome.case.name}' ---\n{_native_backtrace(outcome.case)}")
    print(f"exception probe: {len(outcomes) - len(crashed)} of {len(outcomes)} cases raised as they should"
          + (f"; FAILED: {', '.join(o.case.name for o in crashed)}" if crashed else ""))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
