"""Training on several processes (torchrun, DDP): which rank this is, the sharded forward, BatchNorm
over the global batch, and the collectives by which the ranks decide together (the mean loss, a
SIGTERM one of them got, rank 0's verdicts) and leave together.

--batch-size is the global batch; each rank takes its contiguous part of every batch, BatchNorm and
the free-bits KL are computed over the global batch, and each image gets the same noise, so the run
follows the single-process one to float rounding.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastvae import ops
from fastvae.model import VAE
from fastvae.training.errors import DivergedError, RankZeroFailed, Stopped

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
        wrapper must be gone by then (see the loop)."""
        if not (self.distributed and dist.is_initialized()):
            return
        # Where every rank leaves here together (done, diverged, stopped or rank 0's write failed,
        # all decided in a collective), none closes its connections (destroying the group does, see
        # start) while another still works, say rank 0 on its grids. (The SIGABRT once blamed on
        # that was, most likely, the abort at exit that start prevents.) A rank leaving alone (its
        # own error) must not wait for the others.
        if leaving is None or isinstance(leaving, (DivergedError, Stopped)) or self.rank_zero_failed:
            dist.barrier()
        dist.destroy_process_group()


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
