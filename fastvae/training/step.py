"""The training step: one optimizer step on a batch, eager, under torch.compile, or captured
whole into one CUDA graph (graphed_step.py).

The loop calls the step built by ``build_step`` once per batch with the step's KL weight and gets the
step's (objective, recon, kl) back, on the device.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastvae import ops
from fastvae.training.adam_state import needs_capturable, set_capturable
from fastvae.training.distributed import World, all_reduce_sum
from fastvae.training.graphed_step import GraphedStep


def beta_at(step: int, beta: float, schedule: str, period: int) -> float:
    """The KL weight for the step after ``step`` steps have been taken."""
    if schedule == "linear":
        return beta * min(1.0, step / period)
    if schedule == "cyclical":  # Fu et al., 2019: ramp over the first half of each cycle, then hold
        return beta * min(1.0, 2 * (step % period) / period)
    return beta


def free_bits_kl(mu, logvar, *, floor, reduction, global_batch, distributed, backend) -> torch.Tensor:
    """The KL term with each latent dimension's batch-mean KL raised to at least ``floor``
    (Kingma et al., 2016), reduced like the reference KL; computed over the global batch."""
    per_dim = ops.kl_divergence(mu, logvar, reduction="none", backend=backend).sum(0)
    if distributed:
        per_dim = all_reduce_sum(per_dim)
    total = (per_dim / global_batch).clamp(min=floor).sum()
    if reduction == "sum":
        return total * global_batch
    if reduction == "mean":
        return total / mu.shape[1]
    return total


@dataclass(frozen=True)
class Loss:
    """The objective's options, as the step needs them."""

    reduction: str
    recon: str
    recon_reduction: str | None
    kl_reduction: str | None
    free_bits: float
    global_batch: int
    # The loss has no Triton kernel; with --backend triton it goes to the best other backend.
    backend: str
    distributed: bool
    # DDP averages gradients over ranks; a term reduced by "sum" globally is the sum of the ranks'.
    recon_scale: int
    kl_scale: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, world: World) -> Loss:
        recon_scale, kl_scale = (
            world.size if (term_reduction or args.reduction) == "sum" else 1
            for term_reduction in (args.recon_reduction, args.kl_reduction)
        )
        return cls(
            args.reduction, args.recon, args.recon_reduction, args.kl_reduction, args.free_bits, args.batch_size,
            "auto" if args.backend == "triton" else args.backend, world.distributed, recon_scale, kl_scale,
        )


def autocast_for(device: torch.device, amp: str) -> Callable[[], torch.autocast]:
    """--amp's autocast on ``device``, made afresh for each use: torch.compile traces an autocast
    entered inside the step, not one made outside it."""
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def eager_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, autocast,
               loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step as a function of (batch, beta as a 0-d tensor)."""
    scaled = scaler.is_enabled()  # --amp fp16

    def train_step(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the step's (objective, recon, kl), float32."""
        with autocast():
            x_hat, mu, logvar = net(x)
            # beta, a tensor, weighs the KL here rather than in the op, whose beta is a float:
            # a changing --beta-schedule must not recompile a compiled step.
            _, recon, kl = ops.vae_loss(
                x_hat, x, mu, logvar, reduction=loss.reduction, recon=loss.recon,
                recon_reduction=loss.recon_reduction, kl_reduction=loss.kl_reduction, backend=loss.backend,
            )
            if loss.free_bits > 0:
                kl_term = free_bits_kl(  # already global, so not scaled
                    mu, logvar, floor=loss.free_bits, reduction=loss.kl_reduction or loss.reduction,
                    global_batch=loss.global_batch, distributed=loss.distributed, backend=loss.backend,
                )
            else:
                kl_term = loss.kl_scale * kl
            objective = loss.recon_scale * recon + beta * kl_term
        optimizer.zero_grad(set_to_none=True)
        if scaled:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
        else:  # the same steps: torch.compile does not trace the scaler, so would not compile Adam inside it
            objective.backward()
            optimizer.step()
        # Averaged over ranks, these are the global loss and its parts.
        return torch.stack([objective, loss.recon_scale * recon, loss.kl_scale * kl]).detach().float()

    return train_step


def build_step(mode: str, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               autocast, loss: Loss, device: torch.device, *, graph_on: torch.Tensor | None = None,
               rows: int = 1) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The loop's step, built once: a function of (batch, beta) that takes one optimizer step and
    returns its (objective, recon, kl), float32, on ``device``; eager, or compiled in --compile's ``mode``.

    With ``graph_on``, the training set kept on the GPU, the step (compiled or not) is captured
    whole into one CUDA graph (--cuda-graph, see graphed_step.py): the batch it takes is then the
    indices into that set, and its losses a row of a ring of ``rows``, which the loop reads at
    least that often: the most steps between two of its checks, so that the ring holds no row
    more than they need. Adam is made capturable wherever the step runs from CUDA graphs, also when
    a checkpoint of another run filled it.
    """
    graphed = graph_on is not None
    set_capturable(optimizer, needs_capturable(device, mode != "off", graphed))
    step = compile_step(eager_step(net, optimizer, scaler, autocast, loss), mode, graphed=graphed)
    if graphed:
        return GraphedStep(step, graph_on, loss.global_batch, history_size=rows)
    beta_tensor = torch.empty((), device=device)
    return lambda x, beta: step(x, beta_tensor.fill_(beta))


def compile_step(step, mode: str, *, graphed: bool = False):
    """``step`` under torch.compile in ``mode`` (--compile), or itself when "off".

    Random ops run as in eager (inductor's fallback_random), so a compiled run draws the noise
    of the eager one and either can resume the other's checkpoint. The model is not wrapped, so
    its state_dict keys stay those of an eager run. Dynamo cuts the step into three graphs (the
    forward with the loss, Adam's update, the stack of the losses), with Python between them at
    Optimizer.zero_grad, which it does not trace, and at Tensor.backward, where autograd runs the
    compiled backward; reduce-overhead replays each from CUDA graphs. Inside --cuda-graph's one
    graph (``graphed``) the compiled step is captured as it is.
    """
    if mode == "off":
        return step
    options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
    compiled = torch.compile(step, dynamic=False, options=options)
    if graphed:
        return compiled

    def run(*inputs):
        # Each call is one whole iteration to CUDA graph trees, which then reuse its memory on the
        # next: the losses, kept until the next check, are copied out.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs).clone()

    return run
