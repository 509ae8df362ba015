"""Benchmark cases shared by ``pytest bench/ --benchmark`` and ``fastvae bench``.

Each case times one op (or the whole training step) one way: ``eager`` (fastvae.reference),
``compile`` (torch.compile of the reference), ``fused`` (fastvae's kernels), or a memory ``floor``
(a copy or an elementwise op over the same bytes). The table reports medians, speedups against
eager and compile, achieved bandwidth as a fraction of the measured copy bandwidth, and the bytes
each method keeps saved for the backward. The training step has its own table: images/s, and on
a GPU the host's and the device's time per step apart.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from fastvae import ops, reference
from fastvae.model import VAE

@dataclass
class Case:
    op: str
    method: str
    pass_: str
    size: str
    numel: int
    # Bytes the op must move through memory; None where bandwidth is not the limit (training step).
    bytes_moved: int | None
    # setup() builds fresh inputs (untimed) and returns the arguments of target(*args) (timed).
    setup: Callable[[], tuple] = field(repr=False)
    target: Callable[..., object] = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.pass_}-{self.size}-{self.method}"


@dataclass
class Row:
    op: str
    method: str
    pass_: str
    size: str
    numel: int
    median_s: float
    bytes_moved: int | None
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    # How median_s was timed on a GPU (CUDA events over K calls, or CUDA graph replays).
    timing: str | None = None
    # A training step on a GPU: seconds the host takes to issue it and the device to run it.
    host_s: float | None = None
    device_s: float | None = None


def _fused_backend(op: str, device: torch.device) -> str | None:
    """The fused backend for ``op`` on ``device``, or None when none can run here."""
    name = ops.auto_choice(op, device)[0]
    return None if name == "reference" else name


def _passes(forward: Callable, make_inputs: Callable[[], tuple], grad_of: Callable[[object], torch.Tensor]):
    """(setup, target) for each pass of a differentiable ``forward(*inputs)``."""

    def fwd_setup():
        return make_inputs()

    def fwd_bwd(*inputs):
        grad_of(forward(*inputs)).backward()

    def bwd_setup():
        return (grad_of(forward(*make_inputs())),)

    def bwd(scalar):
        scalar.backward()

    return {"fwd": (fwd_setup, forward), "bwd": (bwd_setup, bwd), "fwd+bwd": (fwd_setup, fwd_bwd)}


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _latent_cases(device: torch.device, shapes: list[tuple[int, int]], dtype: torch.dtype) -> list[Case]:
    fused = _fused_backend("reparameterize_kl", device)
    methods = {
        "eager": lambda mu, lv: reference.reparameterize_kl(mu, lv),
        "compile": _compiled(lambda mu, lv: reference.reparameterize_kl(mu, lv)),
    }
    if fused:
        methods["fused"] = lambda mu, lv: ops.reparameterize_kl(mu, lv, backend=fused)
    cases = []
    for b, d in shapes:
        n = b * d
        size = dtype.itemsize

        def make(b=b, d=d):
            mu = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
            lv = (0.1 * torch.randn(b, d, device=device, dtype=dtype)).requires_grad_()
            return mu, lv

        def scalar(out):
            z, kl = out
            return z.sum() + kl

        # Forward reads mu, logvar and writes z; backward reads grad_z, z and logvar and writes
        # both gradients. The reductions' scalars are negligible.
        moved = {"fwd": 3 * n * size, "bwd": 5 * n * size, "fwd+bwd": 8 * n * size}
        for method, fn in methods.items():
            for pass_, (setup, target) in _passes(fn, make, scalar).items():
                cases.append(Case("reparameterize_kl", method, pass_, f"{b}x{d}", n, moved[pass_], setup, target))
    return cases


def _loss_cases(
    device: torch.device, batches: list[int], dtype: torch.dtype, recon: str = "mse", image=(3, 64, 64), latent=128
) -> list[Case]:
    """vae_loss with reconstruction term ``recon``; its sizes are labelled with it unless "mse"."""
    fused = _fused_backend("vae_loss", device)
    methods = {
        "eager": lambda *t: reference.vae_loss(*t, recon=recon),
        "compile": _compiled(lambda *t: reference.vae_loss(*t, recon=recon)),
    }
    if fused:
        methods["fused"] = lambda *t: ops.vae_loss(*t, recon=recon, backend=fused)
    cases = []
    for b in batches:
        n = b * math.prod(image)
        size = dtype.itemsize

        def make(b=b):
            # Probabilities in [0, 1) serve every recon: as predictions, or as logits.
            x_hat = torch.rand(b, *image, device=device, dtype=dtype, requires_grad=True)
            x = torch.rand(b, *image, device=device, dtype=dtype)
            mu = torch.randn(b, latent, device=device, dtype=dtype, requires_grad=True)
            lv = (0.1 * torch.randn(b, latent, device=device, dtype=dtype)).requires_grad_()
            return x_hat, x, mu, lv

        # The images dominate. The loss and its gradient need x_hat and x read once and grad_x_hat
        # written once: 2N for the forward alone, 3N for both passes. The backward alone has no
        # such floor: fastvae's forward already wrote the image gradient, eager's did not.
        moved = {"fwd": 2 * n * size, "bwd": None, "fwd+bwd": 3 * n * size}
        label = f"{b}x{'x'.join(map(str, image))}"
        if recon != "mse":
            label = f"{recon}-{label}"
        for method, fn in methods.items():
            for pass_, (setup, target) in _passes(fn, make, lambda out: out[0]).items():
                cases.append(Case("vae_loss", method, pass_, label, n, moved[pass_], setup, target))
        if recon != "mse":
            continue

        def sub_setup(b=b):
            a, c = torch.rand(2, b, *image, device=device, dtype=dtype)
            return a, c, torch.empty_like(a)

        cases.append(Case("vae_loss", "floor", "fwd", label, n, 3 * n * size, sub_setup, lambda a, c, out: torch.sub(a, c, out=out)))
    return cases


def _train_cases(device: torch.device, batch: int, compile_: bool) -> list[Case]:
    """One optimizer step (forward, loss, backward, Adam) of fastvae.VAE at the CelebA recipe
    (64x64, latent 128) on a batch already on the device: plain PyTorch (the reference backend)
    and fastvae's ops, each eager and with the whole step under torch.compile. On a GPU the
    compiled steps replay CUDA graphs (reduce-overhead, "-ro"), and plain PyTorch also compiles in
    the default mode; on a CPU reduce-overhead is the default mode."""
    variants = {"eager": ("reference", None), "fused": ("auto", None)}
    if compile_ and device.type == "cuda":
        variants |= {
            "compile": ("reference", "default"),
            "compile-ro": ("reference", "reduce-overhead"),
            "fused+compile-ro": ("auto", "reduce-overhead"),
        }
    elif compile_:
        variants |= {"compile": ("reference", "default"), "fused+compile": ("auto", "default")}
    cases = []
    for method, (backend, mode) in variants.items():
        state: list = []

        def setup(backend=backend, mode=mode, state=state):
            # Built once per case: a new model each round would make torch.compile recompile.
            if not state:
                torch.manual_seed(0)
                model = VAE(backend=backend).to(device).train()
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

                def step(x):
                    optimizer.zero_grad(set_to_none=True)
                    model.loss(x).loss.backward()
                    optimizer.step()

                if mode is None:
                    state.append(step)
                else:
                    compiled = torch.compile(step, mode=mode, dynamic=False)

                    def compiled_step(x):
                        torch.compiler.cudagraph_mark_step_begin()  # each call is one iteration to CUDA graph trees
                        compiled(x)

                    state.append(compiled_step)
                state.append(torch.rand(batch, 3, 64, 64, device=device))
            return tuple(state)

        cases.append(Case("train_step", method, "step", f"batch {batch} 64x64", batch, None, setup, lambda step, x: step(x)))
    return cases


# smoke: each case once in CI's quick run; core: the sizes the GPU goals name (issue tracker's
# H200 table), forward + backward only, for `make gpu-check`'s few minutes; full: everything.
SCOPES = ("smoke", "core", "full")


def cases(device: torch.device, scope: str = "full") -> list[Case]:
    """Every case of ``scope`` (one of SCOPES) for ``device``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    quick = scope != "full"
    if device.type == "cuda":
        if scope == "core":
            latents, batches, train_batch = [(256, 128), (4096, 1024)], [256], 256
        else:
            latents = [(128, 128), (1024, 1024)] if quick else [(128, 128), (1024, 1024), (8192, 1024), (16384, 4096)]
            batches = [128] if quick else [128, 512, 2048]
            train_batch = 128
    else:
        latents = [(128, 128), (1024, 1024)] if quick else [(128, 128), (1024, 1024), (4096, 1024)]
        batches = [128] if quick else [16, 128]
        train_batch = 16
    # The other reconstruction terms at the largest batch, against the same floor; not in the
    # quick runs, where compiling their formulas would take most of their time.
    other_recons = () if quick else ("l1", "bce", "bce_logits")
    selected = (
        _latent_cases(device, latents, torch.float32)
        + _loss_cases(device, batches, torch.float32)
        + [c for recon in other_recons for c in _loss_cases(device, batches[-1:], torch.float32, recon)]
        + _train_cases(device, train_batch, compile_=scope != "smoke")
    )
    if scope == "core":
        # What a training step pays: forward + backward (and the floor they are measured against).
        selected = [c for c in selected if c.pass_ not in ("fwd", "bwd") or c.method == "floor"]
    return selected


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int = 1 << 24, rounds: int = 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), the memory ceiling."""
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = time_case(lambda: (src, dst), lambda s, d: d.copy_(s), device, rounds=rounds, warmup=3, numel=numel)
    return 2 * src.nbytes / seconds


def time_case(
    setup: Callable[[], tuple], target: Callable, device: torch.device, rounds: int, warmup: int, numel: int = 0
) -> float:
    """Median seconds of one ``target(*setup())`` over ``rounds`` timings; setup is not timed.

    On a CPU each timing is one call between host clocks. On a GPU a call of a few microseconds
    would time the host's launch and the sync instead of the kernels, so each timing is K calls
    back to back between two CUDA events, one sync per K (see cuda_timing).
    """
    if device.type == "cuda":
        return cuda_timing(setup, target, device, rounds, warmup, numel)[0]
    times = []
    for i in range(warmup + rounds):
        args = setup()
        start = time.perf_counter()
        target(*args)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# Calls timed back to back per CUDA event pair: enough that launch gaps average out, few enough
# that K sets of fresh inputs fit in memory (K is cut for large inputs).
CALLS_PER_SYNC = 20
CALLS_PER_SYNC_BYTES = 2 << 30
# At most this many elements, a forward pass is replayed from a CUDA graph: there the host's
# launch time would otherwise exceed the kernels' time even back to back.
GRAPH_MAX_NUMEL = 1 << 20


def cuda_timing(
    setup: Callable[[], tuple], target: Callable, device: torch.device, rounds: int, warmup: int, numel: int = 0
) -> tuple[float, str]:
    """(median seconds per call, how it was timed) with CUDA events.

    Each round runs K calls back to back between two events, each on its own fresh inputs made
    beforehand (a backward consumes its graph), and divides by K. ``graph`` timing, tried for
    small inputs when ``setup`` builds tensors only (forward passes), captures one call into a
    CUDA graph and replays it K times per round instead: no host work between the kernels.
    """
    probe = setup()
    input_bytes = sum(t.nbytes for t in probe if isinstance(t, torch.Tensor))
    calls = max(1, min(CALLS_PER_SYNC, CALLS_PER_SYNC_BYTES // max(input_bytes, 1)))
    if 0 < numel <= GRAPH_MAX_NUMEL:
        graphed = _graph_timing(probe, target, device, rounds, warmup, calls)
        if graphed is not None:
            return graphed, f"cuda graph, {calls} replays per sync"
    del probe
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + rounds):
        batch = [setup() for _ in range(calls)]
        torch.cuda.synchronize(device)
        start.record()
        for args in batch:
            target(*args)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3 / calls)
        del batch
    return statistics.median(times), f"cuda events, {calls} calls per sync"


def _graph_timing(args: tuple, target: Callable, device: torch.device, rounds: int, warmup: int, calls: int) -> float | None:
    """Median seconds per replay of ``target(*args)`` captured in a CUDA graph, or None when the
    call cannot be captured (a backward, a sync inside, a compile on first call) or its arguments
    are not all tensors (a training step: its host time is part of what is timed)."""
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if len(tensors) < len(args) or any(t.grad_fn is not None for t in tensors):
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                target(*args)
        torch.cuda.current_stream(device).wait_stream(stream)
        # As in a training step (zero_grad(set_to_none=True)): the captured backward writes the
        # gradients, and hands over the loss's image gradient, rather than accumulating.
        for t in tensors:
            t.grad = None
        with torch.cuda.graph(graph):
            target(*args)
    except Exception:  # noqa: BLE001  (capture errors come as several types; the events path still times it)
        torch.cuda.synchronize(device)
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + rounds):
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            graph.replay()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


# Longest sleep (GPU cycles, about a second) that host_and_device_time queues ahead of the calls.
_MAX_SLEEP_CYCLES = 1 << 31


def host_and_device_time(
    setup: Callable[[], tuple], target: Callable, device: torch.device, rounds: int, calls: int = 3
) -> tuple[float | None, float | None]:
    """(host, device) seconds per call of ``target(*setup())``, timed apart on a GPU.

    Each round keeps the GPU busy (``torch.cuda._sleep``) while the host issues ``calls`` calls:
    the host's wall time over them is its time to issue one, and CUDA events around them time
    the device alone, since every kernel was queued before the GPU reached it. A round where the
    sleep ended before the host was done (a sync inside the call, or a full launch queue: hence
    few calls) is run again with a longer sleep; (None, None) when the host never gets ahead.
    """
    args = setup()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    hosts, devices, cycles = [], [], 1 << 20
    while len(hosts) < rounds:
        torch.cuda.synchronize(device)
        torch.cuda._sleep(cycles)
        start.record()
        began = time.perf_counter()
        for _ in range(calls):
            target(*args)
        issued = time.perf_counter() - began
        end.record()
        ahead = not start.query()
        end.synchronize()
        if ahead:
            hosts.append(issued / calls)
            devices.append(start.elapsed_time(end) / 1e3 / calls)
        elif cycles >= _MAX_SLEEP_CYCLES:
            return None, None
        else:
            cycles = min(4 * cycles, _MAX_SLEEP_CYCLES)
    return statistics.median(hosts), statistics.median(devices)


def split_times(case: Case, device: torch.device, rounds: int) -> tuple[float | None, float | None]:
    """A training step's host and device time on a GPU (see host_and_device_time); else (None, None)."""
    if case.op != "train_step" or device.type != "cuda":
        return None, None
    return host_and_device_time(case.setup, case.target, device, rounds)


def saved_bytes(case: Case) -> int | None:
    """Bytes of the tensors the autograd graph of one forward keeps for the backward."""
    if case.op == "train_step" or case.method == "floor" or case.pass_ != "fwd":
        return None
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = case.setup()
        case.target(*inputs)
    # The op's inputs are alive whatever the backward needs; count only what the graph adds.
    for t in inputs:
        if isinstance(t, torch.Tensor):
            storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def measure(case: Case, device: torch.device, rounds: int, warmup: int) -> Row:
    timing = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        median, timing = cuda_timing(case.setup, case.target, device, rounds, warmup, case.numel)
    else:
        median = time_case(case.setup, case.target, device, rounds, warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Row(
        case.op, case.method, case.pass_, case.size, case.numel, median, case.bytes_moved, saved_bytes(case), peak,
        timing, *split_times(case, device, rounds),
    )


_METHOD_ORDER = ("eager", "compile", "compile-ro", "patched", "fused", "fused+compile", "fused+compile-ro", "floor")
_PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "step")


def row_order(row: Row) -> tuple:
    """Sort key that puts the methods of one op, size and pass next to each other."""
    return (row.op, row.numel, _PASS_ORDER.index(row.pass_), _METHOD_ORDER.index(row.method))


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


def plot(path: str, rows: list[Row], title: str) -> None:
    """Speedup over eager against size, one line per op and method (fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eager = {(r.op, r.size): r.median_s for r in rows if r.method == "eager" and r.pass_ == "fwd+bwd"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Time the fused ops and the training step against eager PyTorch and torch.compile."
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10, help="timed runs per case (median reported)")
    parser.add_argument("--full", action="store_true", help="every size and the compiled training step (slow on a CPU)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    rows = [measure(case, device, rounds=args.rounds, warmup=3) for case in cases(device, "full" if args.full else "smoke")]
    rows.sort(key=row_order)
    print(f"{device_name(device)}, torch {torch.__version__}")
    print(format_table(rows, bandwidth))
    return 0
