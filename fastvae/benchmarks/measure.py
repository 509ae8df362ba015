"""One case timed into a Row: its median, and what else a case reports (the bytes its forward
keeps for the backward, the peak memory, a training step's host and device time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastvae.benchmarks.case import Case
from fastvae.benchmarks.timing import cuda_timing, host_and_device_time, time_case


@dataclass
class Row:
    """What one case measured; a row of the results' JSON."""

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


def peak_bytes(case: Case, device: torch.device) -> int | None:
    """Peak CUDA memory over one call of the case, its inputs included; None on a CPU. Apart from
    the timing, whose K calls per sync each hold their own inputs."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    case.target(*case.setup())
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def row(case: Case, device: torch.device, median: float, timing: str | None, rounds: int) -> Row:
    """The Row of ``case``, timed at ``median`` seconds (``timing``: how, on a GPU) over ``rounds``,
    with the rest it reports, each measured apart: `fastvae bench`'s and `pytest bench/`'s, which
    time the case each its own way."""
    return Row(
        case.op, case.method, case.pass_, case.size, case.numel, median, case.bytes_moved, saved_bytes(case),
        peak_bytes(case, device), timing, *split_times(case, device, rounds),
    )


def measure(case: Case, device: torch.device, rounds: int, warmup: int) -> Row:
    """``case`` timed over ``rounds`` after ``warmup`` calls, into its Row (`fastvae bench`)."""
    if device.type == "cuda":
        median, timing = cuda_timing(case.setup, case.target, device, rounds, warmup, case.numel)
    else:
        median, timing = time_case(case.setup, case.target, device, rounds, warmup), None
    return row(case, device, median, timing, rounds)
