"""Training on several processes (torchrun, DDP): which rank this is, the sharded forward, BatchNorm
over the global batch, and the collectives by which the ranks decide together (the mean loss, a
SIGTERM one of them got, rank 0's verdicts) and leave together.

--batch-size is the global batch; each rank takes its contiguous part of every batch, BatchNorm and
the free-bits KL are computed over the global batch, and each image gets the same noise, so the run
follows the single-process one to float rounding.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastvae import ops
from fastvae.model import VAE
from fastvae.training.errors import DivergedError, RankFailed, RankZeroFailed, Stopped
from fastvae.training.sigterm import SigtermCatcher

T = TypeVar("T")


class World:
    """This process's place among the run's processes: rank 0 of 1 without torchrun. Each
    collective here is a no-op in one process."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size
        self.distributed, self.master = size > 1, rank == 0
        # rank 0 could not write the run's files, and every rank knows it (they leave together)
        self.rank_zero_failed = False

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun sets up in the environment."""
        size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(int(os.environ["RANK"]), size) if size > 1 else cls()

    def place(self, device: torch.device) -> torch.device:
        """This rank's device of the kind ``device`` names (its own GPU under torchrun), made current."""
        if self.distributed and device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def start(self, device: torch.device) -> None:
        if self.distributed:
            # torch.distributed.nn's functions default to group=group.WORLD, which Python evaluates
            # on import. Imported after the process group exists (DDP imports it, through
            # torch._dynamo), they hold that group for ever (torch 2.11 to 2.14), so leave() could
            # not end gloo's threads: one freeing a tensor as Python exited aborted the rank
            # ("terminate called without an active exception", 1 run in 25 on 2 busy CPUs).
            # Imported before, they hold None.
            import torch.distributed.nn  # noqa: F401

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def wrap(self, model: VAE, device: torch.device) -> nn.Module:
        """What the step calls for the training forward: the model, or under DDP its sharded forward."""
        if not self.distributed:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(ShardedForward(model, self.rank, self.size), device_ids=device_ids)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(values)
            values /= self.size
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        tensor = torch.tensor(float(flag), device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)

    def from_rank0(self, value: float, device: torch.device) -> float:
        """Rank 0's ``value`` on every rank: what only rank 0 computes, the others stop with it, not in
        their next collective."""
        if not self.distributed:
            return value
        verdict = torch.tensor(value, dtype=torch.float64, device=device)
        dist.broadcast(verdict, 0)
        return verdict.item()

    def on_rank0(self, write: Callable[[], T], device: torch.device) -> T | None:
        """``write()`` on rank 0, the one that writes the run's files; what it returns there. A failure
        there (a full disk, say) stops every rank: rank 0 with its error, the others with RankZeroFailed."""
        error, result = None, None
        if self.master:
            try:
                result = write()
            except Exception as exc:
                if not self.distributed:
                    raise
                error = exc
        if self.distributed:
            failed = torch.tensor(float(error is not None), device=device)
            dist.broadcast(failed, 0)
            if failed.item():
                self.rank_zero_failed = True
                if self.master:
                    raise error
                raise RankZeroFailed("rank 0 could not write the run's files (its line says why); stopped with it")
        return result

    def leave(self, leaving: BaseException | None) -> None:
        """End the process group, as the run leaves with the exception ``leaving`` or None. The DDP
        wrapper must be gone by then (see the loop).

        A rank that leaves alone with an error of its own says so to the others first. One that
        leaves because a collective broke under it raises RankFailed where another rank said so.
        """
        if not (self.distributed and dist.is_initialized()):
            return
        # torchrun stops the other ranks with SIGTERM once one has failed: this one is on its way
        # out already, and must get to its line.
        with SigtermCatcher():
            try:
                # Where every rank leaves here together (done, diverged, stopped or rank 0's write
                # failed, all decided in a collective), none closes its connections (destroying the
                # group does, see start) while another still works, say rank 0 on its grids. A rank
                # leaving alone must not wait for the others.
                if leaving is None or isinstance(leaving, (DivergedError, Stopped)) or self.rank_zero_failed:
                    dist.barrier()
                elif _broken_collective(leaving):
                    if failed := self._failed_ranks():
                        raise RankFailed(failed)
                elif isinstance(leaving, Exception):
                    self._mark_failed()
            finally:
                dist.destroy_process_group()

    # Set by a rank that leaves with an error of its own, in the store that torchrun keeps for the
    # run. Set before that rank's connections close, so it is there when another rank's collective
    # breaks on them.
    _FAILED_KEY = "fastvae/failed/{}"

    def _mark_failed(self) -> None:
        with contextlib.suppress(RuntimeError):  # the store gone too: the others keep their traceback
            # add(), unlike set(), waits for the store's answer: the key is in before this rank goes on.
            _default_store().add(self._FAILED_KEY.format(self.rank), 1)

    def _failed_ranks(self) -> list[int]:
        others = [rank for rank in range(self.size) if rank != self.rank]
        with contextlib.suppress(RuntimeError):
            store = _default_store()
            return [rank for rank in others if store.check([self._FAILED_KEY.format(rank)])]
        return []


def _broken_collective(error: BaseException) -> bool:
    # gloo reports a peer's closed connection as a plain RuntimeError (torch 2.11 to 2.14); its
    # newer errors, and NCCL's, are DistErrors. fastvae's own errors and torch's other ones (out
    # of memory, say) subclass RuntimeError: this rank's own, not a broken collective.
    return type(error) is RuntimeError or isinstance(error, dist.DistError)


def _default_store() -> dist.Store:
    # The process group's store, which torch.distributed keeps private (stable since torch 1.x).
    return dist.distributed_c10d._get_default_store()


class ShardedForward(nn.Module):
    """The VAE's training forward on one rank's part of a global batch.

    The noise is drawn for the whole global batch, with this rank's latents padded by zeros to
    their place in it, and then sliced: each image gets the eps it would get in one process.
    """

    def __init__(self, vae: VAE, rank: int, world_size: int) -> None:
        super().__init__()
        self.vae, self.rank, self.world_size = vae, rank, world_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.vae.encode(x)
        n = mu.shape[0]
        before, after = self.rank * n, (self.world_size - 1 - self.rank) * n
        z = ops.reparameterize(
            F.pad(mu, (0, 0, before, after)), F.pad(logvar, (0, 0, before, after)), backend=self.vae.backend
        )
        return self.vae.decode(z[before : before + n]), mu, logvar


class _AllReduceSum(torch.autograd.Function):
    # Each rank's output is the sum of every rank's input, so each input's gradient is the sum of
    # every rank's output gradient: an all-reduce both ways. (torch.distributed.nn's is deprecated,
    # and the functional collectives that replace it have no autograd for all_reduce.)
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, differentiable."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank, for gloo.

    torch's SyncBatchNorm does this for GPU tensors only. The all-reduces are differentiable,
    so the gradient is that of BatchNorm over the global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce_sum(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce_sum(centred.square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            # momentum None means a cumulative average, as in BatchNorm2d
            factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * (count / (count - 1)), factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap each BatchNorm2d for one over the global batch (same parameters and state dict)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            global_batchnorm(child, device)
    return module
