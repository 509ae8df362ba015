"""`make gpu-check`: everything a GPU session must verify, in one run of under 8 minutes.

On a CUDA machine with torch, triton, pytest and pytest-benchmark already installed and no
network (it creates no venv and downloads nothing). The steps run in the order of what a GPU
session needs most, so that a run cut short has the numbers first and the sanitizers last:

1. env        nvidia-smi, the versions, the toolkit
2. build      fastvae._C for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), with all cores, offline,
              verbose: the log keeps every compile and link command
3. probe      bench/exception_probe.py --facts: does an error raised inside fastvae._C reach
              Python (each case in its own process; gdb's native backtrace of any that crash),
              with the compilers, torch's build configuration and C++ ABI flag, ldd and the ELF
              notes of the extension, and the C++ runtimes the process mapped
4. bench      pytest bench/ --benchmark --bench-scope core: the sizes the project's GPU goals
              name, forward + backward, and the training step's cases, CUDA events over
              back-to-back calls, CUDA graphs at small sizes; bench/results/<gpu>.json rewritten
              after every case, so a step cut short keeps what it measured
5. profile    bench/profile_ops.py: each fused op and its eager version, host time, wall time,
              kernel time and launches per call, and torch.profiler's view of the host side
6. host       bench/host_overhead.py: the host time of a fused call, kernels stubbed out
7. tests      the suite on CUDA (Triton kernels and the CUDA loss for real, the CPU-vs-GPU
              sampling comparison, the in-place backward, >2^31 elements where memory allows,
              those one at a time in one xdist group), less the files that never touch a GPU,
              which CI runs in full (CPU_ONLY_TESTS)
8. train      `fastvae train` on CUDA with fp16 autocast and its GradScaler, a few dozen steps
9. warm       bench/kernel_smoke.py without the sanitizer: Triton compiles the kernels of the
              sanitizer steps into its cache here, not inside their time limits
10. memcheck  compute-sanitizer over bench/kernel_smoke.py: every kernel, once, small, with
              torch's caching allocator off (a pooled block hides an out-of-bounds access)
11. racecheck, 12. synccheck   compute-sanitizer's other tools over the same smoke run

Each step has its own time limit, and the limits add up to the whole run's budget (--budget,
default 455 s: inside 8 minutes with the grace a timed-out step gets): a step may run until the
sum of its limit and those before it has passed, so a step that ends early leaves its time to
the next, and none takes the time of those after it. A step that fails or times out does not
stop the next, and steps left when the budget is spent are reported as not run. Everything goes
to one folder (--out, else $OUT, else gpu-check-out/): gpu-check.log (every step's output),
summary.md (each step's status and one-line result, and the benchmark table; rewritten after
every step, so a run killed part way keeps it), and the benchmark's JSON and plot: four files,
as few as the device tool fetches back.

--dry-run rehearses it on a machine without a GPU (CI does): every step that needs no GPU runs
for real (the build's plan, the probe, the suite's collection, the smoke run on CPU, the
host-overhead script, a tiny training run, the benchmark's collection), and the others print
the command they would run. So a GPU run does not die on a typo.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# Seconds a timed-out step gets, after SIGINT, to write what it has before it is killed.
INTERRUPT_GRACE_S = 20
# Seconds for all steps together: with a last step's grace, within the 8 minutes a GPU run has.
BUDGET_S = 455
# Seconds each step of a dry run may take.
DRY_RUN_STEP_S = 300
# Test files that run no GPU code (training and the CLI on CPU, the data, the static checks of
# the cubins, this script): CI runs them in full, and on the GPU they would take the time the
# GPU tests need.
CPU_ONLY_TESTS = (
    "tests/test_train.py", "tests/test_cli.py", "tests/test_data.py", "tests/test_gpu_check.py",
    "tests/test_static_gpu_code.py", "tests/test_triton_compile.py",
)
TRAIN_OUT = os.path.join(tempfile.gettempdir(), "fastvae-gpu-check-train")


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    env: dict
    # What --dry-run runs instead (None: only print the command; it needs a GPU).
    dry_command: list[str] | None


def find_tool(name: str) -> str:
    """``name``'s path: on PATH, else in the toolkit the build uses (setup.find_cuda_home;
    compute-sanitizer is often not on PATH). The bare name when it is nowhere, so the step fails
    saying so."""
    found = shutil.which(name)
    if found:
        return found
    sys.path.insert(0, ROOT)
    try:
        import setup

        cuda_home = setup.find_cuda_home()
    finally:
        sys.path.remove(ROOT)
    candidates = [os.path.join(cuda_home, sub, name) for sub in ("bin", "compute-sanitizer")] if cuda_home else []
    return next((c for c in candidates if os.access(c, os.X_OK)), name)


def _sanitizer(tool: str, timeout_s: int) -> Step:
    command = [find_tool("compute-sanitizer"), "--tool", tool, "--error-exitcode", "1", "--print-limit", "20"]
    if tool == "memcheck":
        command += ["--leak-check", "no"]
    return Step(
        tool,
        command + [PY, "bench/kernel_smoke.py", "--device", "cuda"],
        timeout_s,
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        [PY, "bench/kernel_smoke.py", "--device", "cpu"] if tool == "memcheck" else None,
    )


def steps(cores: int) -> list[Step]:
    # PIP_BREAK_SYSTEM_PACKAGES: the machine's Python may be marked externally managed (PEP 668),
    # and there is no venv to install into.
    build_env = {
        "TORCH_CUDA_ARCH_LIST": "9.0", "FASTVAE_FORCE_CUDA": "1", "MAX_JOBS": str(cores),
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
    }
    # Triton compiles each test's kernels on the host: more workers than 8 shorten the suite on a
    # 16-core machine, the GPU being idle most of the time.
    # --dist loadgroup: the tests of more than 2**31 elements (xdist_group "over_2_31_elements")
    # run one after another on one worker, each freeing its memory before the next.
    pytest_workers = ["-n", str(min(12, cores)), "--dist", "loadgroup"] if _has_module("xdist") else []
    # A test file whose import fails (a missing optional module) must not stop the others.
    pytest_args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    cpu_only = [arg for path in CPU_ONLY_TESTS for arg in ("--ignore", path)]
    bench = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--benchmark", "--bench-scope", "core"]
    train = [PY, "-m", "fastvae", "train", "--every", "1000", "--out", TRAIN_OUT, "--overwrite"]
    warm_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # as under the sanitizer: the same specializations
    return [
        Step("env", [PY, "bench/gpu_check.py", "--report-env"], 10, {}, [PY, "bench/gpu_check.py", "--report-env"]),
        Step(
            "build",
            [PY, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."],
            90,
            build_env,
            # The plan only: the toolkit is found and the arch list is what the GPU build uses.
            [PY, "-c", "import setup; print(setup._cuda_plan())"],
        ),
        Step("probe", [PY, "bench/exception_probe.py", "--facts"], 25, {}, [PY, "bench/exception_probe.py", "--facts"]),
        Step("bench", bench, 140, {"FASTVAE_BENCH_BUDGET_S": "0.3"}, bench + ["--collect-only"]),
        Step("profile", [PY, "bench/profile_ops.py", "--calls", "200"], 20, {},
             [PY, "bench/profile_ops.py", "--calls", "3", "--top", "3"]),
        Step("host", [PY, "bench/host_overhead.py", "--rounds", "2000"], 10, {},
             [PY, "bench/host_overhead.py", "--rounds", "20"]),
        Step(
            "tests",
            [PY, "-m", "pytest", *pytest_args, "-rfEsx", "--durations", "20", *pytest_workers, *cpu_only, "tests"],
            90,
            {},
            [PY, "-m", "pytest", *pytest_args, "--collect-only", *cpu_only, "tests"],
        ),
        Step(
            "train",
            train + ["--device", "cuda", "--amp", "fp16", "--steps", "40", "--batch-size", "128",
                     "--train-size", "2048"],
            20,
            {},
            # fp16 needs CUDA: the rehearsal trains a little with bf16 on CPU instead.
            train + ["--device", "cpu", "--amp", "bf16", "--steps", "2", "--image-size", "16", "--hidden-dims", "8,16",
                     "--train-size", "64", "--eval-size", "16", "--batch-size", "8"],
        ),
        Step("warm", [PY, "bench/kernel_smoke.py", "--device", "cuda"], 15, warm_env, None),
        _sanitizer("memcheck", 15),
        _sanitizer("racecheck", 10),
        _sanitizer("synccheck", 10),
    ]


def report_env() -> None:
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
    try:
        import triton

        print("triton", triton.__version__)
    except ImportError as exc:
        print("triton missing:", exc)
    for tool in ("nvidia-smi", "nvcc", "compute-sanitizer", "cuobjdump", "ninja"):
        path = find_tool(tool)
        print(f"{tool:18}", path if os.path.isabs(path) else "NOT FOUND")
    nvcc = find_tool("nvcc")
    if os.path.isabs(nvcc):
        release = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
        found = release.rsplit("release ", 1)[-1].split(",")[0] if "release " in release else "unknown"
        if torch.version.cuda and found.split(".")[:1] != torch.version.cuda.split(".")[:1]:
            print(f"WARNING: nvcc is CUDA {found} but torch was built with CUDA {torch.version.cuda}: "
                  "the build step will refuse the mismatch")
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _last_line(text: str) -> str:
    """The step's own last word: pytest's counts, the sanitizer's error summary, the probe's
    verdict (the last non-empty line of its output, runs of `=` and blanks trimmed)."""
    lines = [line.strip().strip("=").strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), "")


def _run(step: Step, command: list[str], timeout_s: float, log) -> tuple[str, float, str]:
    """(status, seconds, the output's last line) of one step, its output appended to ``log``."""
    env = {**os.environ, **step.env}
    log.write(f"\n===== {step.name}: {shlex.join(command)}  (timeout {timeout_s:.0f} s)\n")
    log.flush()
    output_start = log.tell()
    start = time.monotonic()
    try:
        # Its own process group, so a timeout also ends what it started (pytest-xdist workers).
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except OSError as exc:
        status = f"could not start: {exc}"
    else:
        try:
            code = process.wait(timeout=timeout_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then stops but still writes its summary (the benchmark table
            # and bench/results/ for the cases timed so far). Then whatever is left is killed.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = f"timed out after {timeout_s:.0f} s"
    elapsed = time.monotonic() - start
    with open(log.name, errors="replace") as output:
        output.seek(output_start)
        last = _last_line(output.read())
    log.write(f"===== {step.name}: {status} in {elapsed:.1f} s\n")
    log.flush()
    return status, elapsed, last


def _benchmark_table(paths: list[str]) -> str:
    """The benchmark table of the JSON the bench step wrote, as its own terminal table, or why none."""
    found = [p for p in paths if p.endswith(".json")]
    if not found:
        return "No benchmark results were written."
    try:
        from fastvae.benchmarks.measure import Row
        from fastvae.benchmarks.report import format_table, row_order

        with open(found[0]) as f:
            results = json.load(f)
        rows = sorted((Row(**row) for row in results["rows"]), key=row_order)
        table = format_table(rows, results.get("copy_bandwidth_bytes_per_s"))
    except Exception as exc:  # the summary is still written, saying why the table is not there
        return f"The benchmark results in {os.path.basename(found[0])} could not be read: {exc!r}"
    return f"{results['device']}, `{results['command']}`, {len(rows)} cases:\n\n```\n{table}\n```"


def _copy_results(out: str, since: float) -> list[str]:
    copied = []
    for path in glob.glob(os.path.join(ROOT, "bench", "results", "*")):
        if os.path.getmtime(path) >= since:
            shutil.copy(path, out)
            copied.append(os.path.basename(path))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-check-out"))
    parser.add_argument("--dry-run", action="store_true", help="rehearse without a GPU (see the docstring)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--only", nargs="*", help="run only these steps (by name)")
    parser.add_argument("--report-env", action="store_true", help="print versions, GPU and tools, and exit")
    args = parser.parse_args(argv)
    if args.report_env:
        report_env()
        return 0
    os.makedirs(args.out, exist_ok=True)
    plan = [s for s in steps(os.cpu_count() or 1) if not args.only or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in steps(1)}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    for step in plan:
        tool = step.command[0]
        if tool != PY and not os.path.isabs(tool) and shutil.which(tool) is None and not args.dry_run:
            print(f"gpu-check: {tool} not found; step {step.name} will fail", file=sys.stderr)
    started = time.time()
    start = time.monotonic()
    deadline = start + args.budget
    rows, copied = [], []
    with open(os.path.join(args.out, "gpu-check.log"), "w") as log:
        log.write(f"gpu-check {'--dry-run ' if args.dry_run else ''}in {ROOT}, python {sys.version.split()[0]}\n")
        step_deadline = start
        for i, step in enumerate(plan):
            step_deadline += step.timeout_s
            # A rehearsal times nothing: its steps get what a slow machine needs, whatever the budget.
            left = DRY_RUN_STEP_S if args.dry_run else min(step_deadline, deadline) - time.monotonic()
            command = step.dry_command if args.dry_run else step.command
            if left < 5:
                status, elapsed, last = "not run: the budget was spent", 0.0, ""
            elif command is None:
                log.write(f"\n===== {step.name} (needs a GPU; would run): {shlex.join(step.command)}\n")
                status, elapsed, last = "dry run: needs a GPU, command printed", 0.0, ""
            else:
                status, elapsed, last = _run(step, command, left, log)
            rows.append((step, status, elapsed, last))
            print(f"gpu-check: {step.name:10} {status} ({elapsed:.0f} s) {last}", flush=True)
            copied = [] if args.dry_run else _copy_results(args.out, started)
            _write_summary(args.out, rows, plan[i + 1:], copied, args.dry_run)
    failed = [step.name for step, status, _, _ in rows if not _passed(status)]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps ok'}; see {args.out}/summary.md")
    return 1 if failed else 0


def _passed(status: str) -> bool:
    return status == "ok" or status.startswith("dry run")


def _write_summary(out: str, rows: list, pending: list[Step], copied: list[str], dry_run: bool) -> None:
    """summary.md of the steps run so far (``rows``), and those still to run: written after every
    step, so that a run killed part way keeps it."""
    failed = [step.name for step, status, _, _ in rows if not _passed(status)]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# gpu-check{' --dry-run' if dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n")
        f.write("| step | status | seconds | result | command |\n| --- | --- | ---: | --- | --- |\n")
        for step, status, elapsed, last in rows + [(step, "pending", 0.0, "") for step in pending]:
            command = step.dry_command if dry_run and step.dry_command else step.command
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            result = last.replace("|", "\\|")
            f.write(f"| {step.name} | {status} | {elapsed:.0f} | {result} | "
                    f"`{(env + ' ' if env else '') + shlex.join(command)}` |\n")
        f.write(f"\nTotal {sum(row[2] for row in rows):.0f} s. Failed: {', '.join(failed) or 'none'}. "
                f"Results copied: {', '.join(copied) or 'none'}. Full output: gpu-check.log.\n")
        if any(step.name == "bench" for step, *_ in rows) and not dry_run:
            f.write("\n## Benchmarks\n\n" + _benchmark_table([os.path.join(out, c) for c in copied]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
