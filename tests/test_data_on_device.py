"""The order of an epoch kept on the device (EpochBatches.on_device), on CPU and, where there is
one, on a GPU. tests/test_data.py holds the rest of fastvae.data, which never touches a GPU."""

import pytest
import torch
from conftest import DEVICES

from fastvae.data import EpochBatches


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def _on(sampler, device, n):
    return [t.tolist() for t in _take(sampler.on_device(device), n)]


@pytest.mark.parametrize("device", DEVICES)
def test_epoch_batches_on_a_device_are_the_hosts_batches(device):
    # One order whichever path feeds the data: a run resumed on the other path, or on another GPU,
    # takes up the same batches.
    device = torch.device(device)
    batches = _take(EpochBatches(20, 4, seed=3).on_device(device), 10)  # 5 a batch: 2 epochs
    assert all(t.device.type == device.type and t.dtype == torch.int64 for t in batches)
    whole = [t.tolist() for t in batches]
    assert whole == _take(EpochBatches(20, 4, seed=3), 10)
    for epoch in (whole[:5], whole[5:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(20))
    assert whole[:5] != whole[5:]
    # Its own generator: torch's global ones (the training noise) neither move it nor are moved.
    torch.manual_seed(1234)
    assert _on(EpochBatches(20, 4, seed=3), device, 10) == whole
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1234).get_state())
    # Resumed mid-epoch it takes up the same order; ranks split each batch as on the host.
    assert _on(EpochBatches(20, 4, seed=3, start=7), device, 3) == whole[7:]
    ranks = [_on(EpochBatches(20, 4, seed=3, rank=r, world_size=2), device, 10) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole
    assert _on(EpochBatches(20, 4, seed=4), device, 10) != whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_epoch_on_the_gpu_is_drawn_without_a_host_sync():
    batches = EpochBatches(50_000, 256, seed=0).on_device(torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        next(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
