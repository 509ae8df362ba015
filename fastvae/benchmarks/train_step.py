"""The training-step cases: one optimizer step (forward, loss, backward, Adam) of fastvae.VAE at
the CelebA recipe (64x64, latent 128) on a batch already on the device, made several ways.

Each method pairs the VAE's backend with a StepBuilder, which makes the timed step from a fresh
model; a new method is one more builder and one more line in ``methods``.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastvae.benchmarks.case import Case
from fastvae.model import VAE
from fastvae.training.graphed_step import GraphedStep

Step = Callable[[torch.Tensor], torch.Tensor]
# Makes the step to time from a fresh model and the batch it will be called with (a step that
# captures a CUDA graph captures it on that batch).
StepBuilder = Callable[[VAE, torch.Tensor], Step]


def eager_step(model: VAE, x: torch.Tensor, *, capturable: bool = False) -> Step:
    """Zero the gradients, the loss, its backward and Adam's update; returns the loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=capturable)

    def step(x: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def graphed_step(model: VAE, x: torch.Tensor) -> Step:
    """The eager step, whole, captured into one CUDA graph and replayed (`fastvae train --cuda-graph`),
    with Adam capturable; the graph also gathers the batch from a training set on the device (here
    the batch itself). On a CPU the same static-buffer step runs uncaptured."""
    eager = eager_step(model, x, capturable=x.is_cuda)
    graphed = GraphedStep(lambda batch, beta: eager(batch), x, len(x), history_size=1)
    indices = torch.arange(len(x), device=x.device)
    return lambda batch: graphed(indices, 1.0)


def compiled_step(mode: str) -> StepBuilder:
    """The eager step, whole, under torch.compile in ``mode``."""

    def build(model: VAE, x: torch.Tensor) -> Step:
        compiled = torch.compile(eager_step(model, x), mode=mode, dynamic=False)

        def step(x: torch.Tensor) -> None:
            torch.compiler.cudagraph_mark_step_begin()  # each call is one iteration to CUDA graph trees
            compiled(x)

        return step

    return build


def methods(device: torch.device, compile_: bool) -> dict[str, tuple[str, StepBuilder]]:
    """Method name -> (the VAE's backend, its StepBuilder): plain PyTorch (the reference backend)
    and fastvae's ops, each eager and with the whole step under torch.compile. On a GPU the
    compiled steps replay CUDA graphs (reduce-overhead, "-ro"), and plain PyTorch also compiles in
    the default mode; on a CPU reduce-overhead is the default mode. On a GPU, fastvae's step is
    also captured whole into one CUDA graph ("fused+graph")."""
    table = {"eager": ("reference", eager_step), "fused": ("auto", eager_step)}
    if compile_ and device.type == "cuda":
        table |= {
            "compile": ("reference", compiled_step("default")),
            "compile-ro": ("reference", compiled_step("reduce-overhead")),
            "fused+compile-ro": ("auto", compiled_step("reduce-overhead")),
            "fused+graph": ("auto", graphed_step),
        }
    elif compile_:
        table |= {"compile": ("reference", compiled_step("default")), "fused+compile": ("auto", compiled_step("default"))}
    return table


def train_cases(device: torch.device, batch: int, compile_: bool) -> list[Case]:
    """One case per method of ``methods``, on a batch of ``batch`` images."""
    return [
        Case("train_step", method, "step", f"batch {batch} 64x64", batch, None,
             _setup(device, batch, backend, build), lambda step, x: step(x))
        for method, (backend, build) in methods(device, compile_).items()
    ]


def _setup(device: torch.device, batch: int, backend: str, build: StepBuilder) -> Callable[[], tuple]:
    state: list = []

    def setup() -> tuple:
        # Built once per case: a new model each round would make torch.compile recompile.
        if not state:
            torch.manual_seed(0)
            model = VAE(backend=backend).to(device).train()
            x = torch.rand(batch, 3, 64, 64, device=device)
            state.extend([build(model, x), x])
        return tuple(state)

    return setup
