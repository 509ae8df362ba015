"""Seeds for the in-kernel Philox noise of the fused backends."""

from __future__ import annotations

import torch

from fastvae._checks import SEED_LIMIT


def seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The Philox key as a 0-dim int64 tensor on ``device``, where the kernels read it.

    With ``seed=None`` it is drawn on ``device`` by torch's generator for that device, which
    ``torch.manual_seed`` seeds (CPU and CUDA draw different keys from one manual seed). Nothing
    is read back to the host: no sync, no graph break under ``torch.compile``, and no CPU op to
    keep a compiled step out of a CUDA graph. Captured into a CUDA graph, the draw is replayed
    as torch replays its own random ops, from a Philox offset the graph advances at each replay:
    every replay samples new noise.
    """
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    return torch.full((), seed, dtype=torch.int64, device=device)
