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
