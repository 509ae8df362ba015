"""What the loop does at each check, every --log-every steps: the steps' losses brought to the host,
logged and checked, the progress bar, and the state checked before a checkpoint."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastvae.training.distributed import World
from fastvae.training.errors import DivergedError
from fastvae.training.run_folder import MetricsLog, kept


class LossHistory:
    """The (objective, recon, kl) of each step since the last check, and its KL weight. The losses
    stay on the device until the check, so that the GPU is not synced each step."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._betas: list[float] = []

    def add(self, losses: torch.Tensor, beta: float) -> None:
        self._losses.append(losses)
        self._betas.append(beta)

    def check(self, step: int, world: World, log: MetricsLog | None, ckpt_path: Path) -> tuple[list[float], float]:
        """Log each step's losses, averaged over the ranks (into ``log``, rank 0's), up to ``step``,
        and the last step's losses and beta; raise DivergedError at the first that is not finite."""
        values = world.mean(torch.stack(self._losses))
        first, rows, betas = step - len(self._losses) + 1, values.tolist(), self._betas
        self._losses, self._betas = [], []
        diverged = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), None)
        if log is not None:  # the steps before a non-finite one are logged, so the history shows how it got there
            for i, ((l, r, k), b) in enumerate(zip(rows[:diverged], betas)):
                log.log({"step": first + i, "loss": l, "recon": r, "kl": k, "beta": b})
        if diverged is not None:
            raise DivergedError(f"loss is {rows[diverged][0]} at step {first + diverged}; stopped ({kept(ckpt_path)})")
        return rows[-1], betas[-1]


class Progress:
    """The progress bar (rank 0's): the last losses and the training speed since the last check."""

    def __init__(self, total: int, step: int, batch_size: int, *, show: bool) -> None:
        self._bar = tqdm(total=total, initial=step, disable=not show, dynamic_ncols=True)
        self._show, self._batch_size = show, batch_size
        self.restart_clock(step)

    def show(self, step: int, losses: list[float], beta: float) -> None:
        if not self._show:
            return
        images_per_s = (step - self._since[0]) * self._batch_size / (time.perf_counter() - self._since[1])
        self._bar.update(step - self._bar.n)
        l, r, k = losses
        self._bar.set_postfix(loss=f"{l:.4g}", recon=f"{r:.4g}", kl=f"{k:.4g}", beta=f"{beta:.3g}",
                              img_s=f"{images_per_s:.0f}")

    def restart_clock(self, step: int) -> None:
        """Count speed from here: evaluation time is not training speed."""
        self._since = (step, time.perf_counter())

    def close(self) -> None:
        self._bar.close()


def non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the parameters, buffers and optimizer state (Adam's moments can overflow while
    the weights stay finite) that hold a NaN or an infinity."""
    tensors = dict(model.state_dict())
    names = {param: name for name, param in model.named_parameters()}
    for param, state in optimizer.state.items():
        tensors.update({f"Adam's {key} of {names[param]}": t for key, t in state.items() if torch.is_tensor(t)})
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]


def check_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, ckpt_path: Path) -> None:
    """Raise DivergedError when the weights or Adam's state are not finite. A finite loss does not
    make finite weights: the step's update can overflow them (a huge --beta). DDP keeps every rank's
    weights equal, so all ranks stop here."""
    broken = non_finite_state(model, optimizer)
    if broken:
        raise DivergedError(f"{broken[0]} is not finite after step {step}; stopped ({kept(ckpt_path)})")
