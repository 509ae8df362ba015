"""What the loop does when it saves, every --every steps, at the end and when SIGTERM stops it: the
weights and Adam's state checked finite, the held-out loss (not on SIGTERM), then, by rank 0, the
PNG grids (with the held-out loss) and the checkpoint. The checks come first, so that a checkpoint
never holds a diverged model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastvae.model import VAE
from fastvae.training import evaluation, run_folder
from fastvae.training.checks import check_finite_state
from fastvae.training.distributed import World
from fastvae.training.inputs import Inputs


@dataclass(frozen=True)
class Checkpointer:
    """The run's state, as a save checks and writes it into ``path``; made once, after the resume."""

    args: argparse.Namespace
    path: Path
    model: VAE
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    inputs: Inputs
    beta_period: int
    world: World
    device: torch.device
    autocast: Callable[[], torch.autocast]
    loss_backend: str
    log: run_folder.MetricsLog | None  # rank 0's

    def save(self, step: int, *, evaluate: bool) -> tuple[dict | None, list[Path] | None]:
        """Save the run after ``step`` steps, with ``evaluate`` the held-out loss and the grids too;
        the held-out results and the grids written, on rank 0 (None elsewhere, and without
        ``evaluate``). Every rank stops together: with DivergedError when the state or the held-out
        loss is not finite, and, under DDP, when rank 0 could not write, with its error there and
        RankZeroFailed on the others."""
        check_finite_state(self.model, self.optimizer, step, self.path)
        results = None
        if evaluate:
            results = evaluation.check_held_out(self.model, self.inputs.eval_loader, self.device, self.autocast,
                                                self.loss_backend, step, self.world, self.log, self.path)
        grids = self.world.on_rank0(lambda: self._write(step, with_grids=evaluate), self.device)
        return results, grids

    def _write(self, step: int, *, with_grids: bool) -> list[Path] | None:
        grids = None
        if with_grids:
            grids = evaluation.write_grids(self.model, self.inputs.grid_images, self.path.parent, step, self.args.seed)
        self.log.flush()
        run_folder.save(self.path, step, self.model, self.optimizer, self.scaler, self.inputs.record, self.args,
                        self.beta_period)
        return grids
