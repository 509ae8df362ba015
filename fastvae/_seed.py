"""Seeds for the in-kernel Philox noise of the fused backends."""

from __future__ import annotations

import torch

from fastvae._checks import SEED_LIMIT


def seed_tensor(seed: int | None) -> torch.Tensor:
    """The Philox key as a 0-dim int64 CPU tensor.

    With ``seed=None`` it is drawn from torch's default CPU generator, so ``torch.manual_seed``
    makes runs reproducible whatever the device. A tensor rather than a Python int, because
    ``torch.compile`` traces a random draw but would break the graph on ``.item()``.
    """
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device="cpu")
    return torch.tensor(seed, dtype=torch.int64)
