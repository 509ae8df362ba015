"""The clocks: a host clock on a CPU; on a GPU, CUDA events over K back-to-back calls or CUDA
graph replays, and a training step's host and device time apart."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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
