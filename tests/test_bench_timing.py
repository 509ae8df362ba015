"""fastvae.benchmarks.timing's split of a step's time into the host's and the device's, on a GPU."""

import torch

from conftest import skip_unless_backend_runs
from fastvae.benchmarks.timing import host_and_device_time


def _needs_cuda():
    # Triton runs on any CUDA device: its reason names the missing GPU.
    skip_unless_backend_runs("triton", "reparameterize", "cuda")


def _events_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def test_device_time_is_the_kernels_and_host_time_the_launches():
    _needs_cuda()
    cycles = 1 << 24  # milliseconds of GPU time, launched in microseconds
    busy = _events_time(lambda: torch.cuda._sleep(cycles))
    host, device = host_and_device_time(lambda: (), lambda: torch.cuda._sleep(cycles), torch.device("cuda"), 5)
    assert abs(device - busy) < 0.2 * busy, (device, busy)
    assert host < 0.2 * busy, (host, busy)


def test_a_step_that_syncs_has_no_split_time():
    _needs_cuda()

    def syncing():
        torch.cuda._sleep(1 << 16)
        torch.cuda.synchronize()

    assert host_and_device_time(lambda: (), syncing, torch.device("cuda"), 3) == (None, None)
