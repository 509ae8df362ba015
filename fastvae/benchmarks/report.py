"""The report of a run: the table a reader needs, the results' JSON, and the plot."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from fastvae.benchmarks.measure import Row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_METHOD_ORDER = ("eager", "compile", "compile-ro", "patched", "fused", "fused+compile", "fused+compile-ro", "fused+graph", "floor")
_METHOD_RANK = {method: i for i, method in enumerate(_METHOD_ORDER)}
_PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "step")


def row_order(row: Row) -> tuple:
    """Sort key that puts the methods of one op, size and pass next to each other; a method
    _METHOD_ORDER does not name (one just added to a case) comes after those it does."""
    return (row.op, row.numel, _PASS_ORDER.index(row.pass_), _METHOD_RANK.get(row.method, len(_METHOD_RANK)), row.method)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(rows: list[Row], bandwidth: float | None) -> str:
    """One line per case: median, speedups against eager and compile, bandwidth, saved bytes;
    then the training steps' own table."""
    baseline = {(r.op, r.pass_, r.size, r.method): r.median_s for r in rows}
    steps = [r for r in rows if r.op == "train_step"]
    rows = [r for r in rows if r.op != "train_step"]
    header = f"{'op':18} {'pass':8} {'size':18} {'method':15} {'median':>10} {'vs eager':>9} {'vs compile':>10} {'GB/s':>8} {'of copy':>8} {'saved MB':>9} {'peak MB':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        eager = baseline.get((r.op, r.pass_, r.size, "eager"))
        compiled = baseline.get((r.op, r.pass_, r.size, "compile"))
        gbps = r.bytes_moved / r.median_s / 1e9 if r.bytes_moved else None
        lines.append(
            f"{r.op:18} {r.pass_:8} {r.size:18} {r.method:15} {_format_seconds(r.median_s):>10} "
            f"{_ratio(eager, r.median_s):>9} {_ratio(compiled, r.median_s):>10} "
            f"{f'{gbps:.1f}' if gbps else '-':>8} "
            f"{f'{gbps * 1e9 / bandwidth:.0%}' if gbps and bandwidth else '-':>8} "
            f"{f'{r.saved_bytes / 2**20:.2f}' if r.saved_bytes is not None else '-':>9} "
            f"{f'{r.peak_bytes / 2**20:.0f}' if r.peak_bytes is not None else '-':>8}"
        )
    if bandwidth:
        lines.append(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    if steps:
        lines += ["", _format_steps(steps, baseline)]
    return "\n".join(lines)


def _format_steps(rows: list[Row], baseline: dict) -> str:
    """One line per training step: median, images/s, speedups, and on a GPU host and device time."""
    header = f"{'training step':18} {'method':16} {'median':>10} {'images/s':>9} {'vs eager':>9} {'vs compile':>10} {'host':>10} {'device':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        eager = baseline.get((r.op, r.pass_, r.size, "eager"))
        compiled = baseline.get((r.op, r.pass_, r.size, "compile"))
        lines.append(
            f"{r.size:18} {r.method:16} {_format_seconds(r.median_s):>10} {r.numel / r.median_s:>9.0f} "
            f"{_ratio(eager, r.median_s):>9} {_ratio(compiled, r.median_s):>10} "
            f"{_format_seconds(r.host_s) if r.host_s else '-':>10} {_format_seconds(r.device_s) if r.device_s else '-':>10}"
        )
    return "\n".join(lines)


def _format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def environment(device: torch.device, command: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }


def write_results(path: str, rows: list[Row], bandwidth: float | None, env: dict) -> None:
    with open(path, "w") as f:
        json.dump({**env, "copy_bandwidth_bytes_per_s": bandwidth, "rows": [asdict(r) for r in rows]}, f, indent=1)


def speedup_figure(rows: list[Row], title: str) -> Figure:
    """Speedup over eager against size, one line per op and method (fwd+bwd); a note in place of
    the legend where the rows hold no such pair (training steps alone, or one method alone)."""
    # A Figure of its own rather than pyplot's: no process-wide backend to switch, none left open.
    from matplotlib.figure import Figure

    eager = {(r.op, r.size): r.median_s for r in rows if r.method == "eager" and r.pass_ == "fwd+bwd"}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for op in sorted({r.op for r in rows if r.op != "train_step"}):
        for method in ("compile", "fused"):
            points = sorted(
                (r.numel, eager[(r.op, r.size)] / r.median_s)
                for r in rows
                if r.op == op and r.method == method and r.pass_ == "fwd+bwd" and (r.op, r.size) in eager
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{op} {method}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("elements")
    ax.set_ylabel("speedup over eager (forward + backward)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no forward + backward case timed against eager in this run",
                ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot(path: str, rows: list[Row], title: str) -> None:
    """Writes speedup_figure to ``path``."""
    speedup_figure(rows, title).savefig(path, dpi=120)
