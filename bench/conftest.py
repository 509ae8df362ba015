"""pytest-benchmark setup: ``pytest bench/`` runs each case once (a smoke test for CI);
``pytest bench/ --benchmark`` times every case, prints one table and writes bench/results/,
rewriting its JSON after every case so that a run stopped part way keeps what it measured.
``--bench-scope core`` times only the sizes the project's GPU goals name, forward + backward
(what `make gpu-check` runs in its few minutes).

On a CPU the table's medians are pytest-benchmark's. On a GPU they come from CUDA events over
many back-to-back calls per sync, or CUDA graph replays at small sizes
(fastvae.benchmarks.timing.cuda_timing): a host clock around one synced call would time the launch.
A training step's host and device time are also timed apart there (host_and_device_time).
FASTVAE_BENCH_BUDGET_S sets the seconds of timed rounds per case (default 1).
"""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch

from fastvae.benchmarks.case import Case
from fastvae.benchmarks.measure import Row, row
from fastvae.benchmarks.report import environment, format_table, plot, row_order, write_results
from fastvae.benchmarks.scopes import SCOPES, cases
from fastvae.benchmarks.timing import CALLS_PER_SYNC, copy_bandwidth, cuda_timing, synchronize, time_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# FASTVAE_BENCH_RESULTS moves them (the tests do, so as not to overwrite the committed ones).
RESULTS = os.environ.get("FASTVAE_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
# Enough timed rounds for a stable median within about this many seconds per case.
BUDGET_S = float(os.environ.get("FASTVAE_BENCH_BUDGET_S", "1.0"))
_ROWS: list[Row] = []


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        help="time every case (warm-up, many rounds) and write bench/results/; without it each case runs once",
    )
    parser.addoption(
        "--bench-scope",
        choices=SCOPES,
        help="which cases: smoke (the default without --benchmark), core, or full (the default with it)",
    )


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
    # fastvae's own table says what matters; keep pytest-benchmark's to the raw medians.
    config.option.benchmark_columns = ["median", "iqr", "rounds"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        config = metafunc.config
        scope = config.getoption("--bench-scope") or ("full" if config.getoption("--benchmark") else "smoke")
        selected = [c for c in cases(DEVICE, scope) if c.op == metafunc.module.OP]
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.fixture
def run_case(benchmark, request):
    def run(case: Case) -> None:
        def setup():
            args = case.setup()
            synchronize(DEVICE)
            return args, {}

        def target(*args):
            case.target(*args)
            synchronize(DEVICE)

        if benchmark.disabled:
            benchmark.pedantic(target, setup=setup)
            return
        # Warm up (torch.compile compiles here, so no compile time is timed), then size the rounds.
        estimate = time_case(case.setup, case.target, DEVICE, rounds=1, warmup=3, numel=case.numel)
        rounds = max(5, min(200, int(BUDGET_S / max(estimate, 1e-6))))
        if DEVICE.type == "cuda":
            # A few host-timed rounds for pytest-benchmark's own table; fastvae's uses events.
            benchmark.pedantic(target, setup=setup, rounds=3, warmup_rounds=1, iterations=1)
            # Each round is up to CALLS_PER_SYNC calls: keep the rounds within the same budget.
            rounds = max(5, min(50, int(BUDGET_S / max(estimate * CALLS_PER_SYNC, 1e-6))))
            median, timing = cuda_timing(case.setup, case.target, DEVICE, rounds, 2, case.numel)
        else:
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
            median, timing = benchmark.stats.stats.median, None
        _ROWS.append(row(case, DEVICE, median, timing, rounds))
        _write_results(request.config)

    return run


def _results_path(env: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return os.path.join(RESULTS, f"{slug}.json")


@functools.cache
def _bandwidth() -> float:
    return copy_bandwidth(DEVICE)


def _write_results(config) -> dict:
    """Writes every row so far to bench/results/<device>.json (a new file, then renamed over the
    old one, so a run killed mid-write leaves the previous complete file); returns the run's env."""
    env = environment(DEVICE, "pytest " + " ".join(config.invocation_params.args))
    path = _results_path(env)
    os.makedirs(RESULTS, exist_ok=True)
    write_results(path + ".tmp", sorted(_ROWS, key=row_order), _bandwidth(), env)
    os.replace(path + ".tmp", path)
    return env


def pytest_terminal_summary(terminalreporter, config):
    if not _ROWS:
        return
    env = _write_results(config)
    terminalreporter.write_sep("=", f"fastvae benchmarks on {env['device']}")
    terminalreporter.write_line(format_table(sorted(_ROWS, key=row_order), _bandwidth()))
    path = _results_path(env)
    plot(path[: -len(".json")] + ".png", sorted(_ROWS, key=row_order), env["device"])
    terminalreporter.write_line(f"results written to {os.path.relpath(path)} and .png")
