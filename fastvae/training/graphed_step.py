"""The whole training step captured once into one CUDA graph and replayed (``--cuda-graph``).

The graph holds everything a step does on the GPU: the batch gathered from the training set
kept there, the forward pass and the fused loss, the backward pass, Adam's update (capturable)
and the write of the step's losses into a ring of rows that the loop reads at its checks, at a
slot a step counter on the device picks. A step then costs the host two small copies (the
batch's indices and beta, into the buffers the graph reads) and a replay. The step inside may be
torch.compile'd (in the default mode: reduce-overhead's own CUDA graphs cannot be captured
inside this one); it is compiled during the warm-up.

A replay is the eager step:
* noise: with ``seed=None`` each step's Philox key is drawn on the GPU by torch's CUDA generator
  (:func:`fastvae._seed.seed_tensor`), which a capture registers: each replay reads the
  generator's offset and advances it by the graph's whole draw, so every replay draws new keys,
  the ones the eager steps would have drawn in its place, and a checkpoint's RNG state follows;
* BatchNorm's running statistics and batch count, and Adam's step counts, are updated in place
  on the device, so each replay advances them;
* the first ``warmup`` steps run uncaptured, on the side stream the capture then uses: cuBLAS's
  workspaces, autograd's streams, Adam's state and torch.compile's kernels are made there rather
  than mid-capture. They are real steps of the run, not rehearsals, so nothing is rolled back.

fp16 autocast is not graphed: GradScaler reads on the host whether a step overflowed, to skip
it, which a replay cannot do; bf16 needs no scaler.

On a CPU (``capture=False``) the same static-buffer step runs directly, with the same buffers,
ring and counter, so its logic is tested where there is no GPU.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from fastvae._checks import first_line, shape_str
from fastvae.training.errors import ConfigError

# Steps run uncaptured before the capture. torch.compile compiles on the first and may recompile
# on the second, once Adam's state exists; PyTorch's notes warm whole-network captures up with 3.
WARMUP_STEPS = 3


class CaptureError(ConfigError):
    """The step did something a CUDA graph cannot hold (a sync, a host read): it cannot be graphed."""


class GraphedStep:
    """``step(x, beta) -> losses`` run on batches gathered from ``images`` by index, captured into a
    CUDA graph after ``warmup`` uncaptured steps when ``capture`` (by default: on a GPU).

    Call it as ``graphed(indices, beta)`` with the batch's ``indices`` into ``images`` (int64, on
    ``images``' device) and the step's KL weight ``beta``, a float. It returns the step's losses
    as a row of a ring of ``history_size`` rows: the row holds them until ``history_size`` more
    steps are taken, so read the rows at least that often.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        batch_size: int,
        *,
        history_size: int,
        capture: bool | None = None,
        warmup: int = WARMUP_STEPS,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() < 2 or not images.is_floating_point():
            got = shape_str(images) if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor of (N, ...) images, got {got}")
        for name, value in (("batch_size", batch_size), ("history_size", history_size), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if batch_size > len(images):
            raise ValueError(f"batch_size is {batch_size} but images holds {len(images)}")
        device = images.device
        capture = device.type == "cuda" if capture is None else capture
        if capture and device.type != "cuda":
            raise ValueError(f"capture needs CUDA images, got images on {device}")
        self.step = step
        self.images = images
        self.capture = capture
        self.warmup = warmup
        self.indices = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.beta = torch.zeros((), device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)  # steps taken, advanced on the device
        self.history_size = history_size
        self.history: torch.Tensor | None = None  # made by the first step, shaped as its losses
        self.taken = 0  # steps taken, counted on the host
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream(device) if capture else None

    def __call__(self, indices: torch.Tensor, beta: float) -> torch.Tensor:
        self._check(indices, beta)
        self.indices.copy_(indices)
        self.beta.fill_(beta)
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._static_step()
        elif self.taken < self.warmup:
            with warnings.catch_warnings():
                # torch warns that a capturable Adam steps uncaptured: the warm-up does, by design.
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                self._on_side_stream(self._static_step)
        else:
            self._capture()
            self.graph.replay()  # the capture recorded the step; this runs it
        row = self.history[self.taken % self.history_size]
        self.taken += 1
        return row

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._static_step()
        except Exception as exc:  # noqa: BLE001  (an op that syncs or allocates on the host fails in many types)
            reason = first_line(exc)
            raise CaptureError(
                f"the training step could not be captured into a CUDA graph ({reason}); run it uncaptured"
            ) from exc
        self.graph = graph

    def _static_step(self) -> None:
        # Everything here reads and writes buffers whose addresses never change: the graph replays it.
        losses = self.step(self.images.index_select(0, self.indices), self.beta)
        if self.history is None:
            self.history = losses.new_zeros(self.history_size, *losses.shape)
        slot = self.counter.remainder(self.history_size).view(1)
        self.history.index_copy_(0, slot, losses.detach().unsqueeze(0))
        self.counter.add_(1)

    def _on_side_stream(self, work: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.images.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            work()
        current.wait_stream(self.stream)

    def _check(self, indices: object, beta: object) -> None:
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.shape != self.indices.shape:
            got = (f"{indices.dtype} {shape_str(indices)}" if isinstance(indices, torch.Tensor)
                   else type(indices).__name__)
            raise TypeError(f"indices must be int64 of shape {shape_str(self.indices)}, got {got}")
        if indices.device != self.images.device:
            raise ValueError(f"indices must be on {self.images.device}, where the images are, got {indices.device}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"beta must be a float, got {type(beta).__name__}")
