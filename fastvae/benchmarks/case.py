"""What a benchmark case is, and the helpers that make one case per pass of a differentiable op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    op: str
    method: str
    pass_: str
    size: str
    numel: int
    # Bytes the op must move through memory; None where bandwidth is not the limit (training step).
    bytes_moved: int | None
    # setup() builds fresh inputs (untimed) and returns the arguments of target(*args) (timed).
    setup: Callable[[], tuple] = field(repr=False)
    target: Callable[..., object] = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.pass_}-{self.size}-{self.method}"


def passes(forward: Callable, make_inputs: Callable[[], tuple], grad_of: Callable[[object], torch.Tensor]):
    """(setup, target) for each pass of a differentiable ``forward(*inputs)``."""

    def fwd_setup():
        return make_inputs()

    def fwd_bwd(*inputs):
        grad_of(forward(*inputs)).backward()

    def bwd_setup():
        return (grad_of(forward(*make_inputs())),)

    def bwd(scalar):
        scalar.backward()

    return {"fwd": (fwd_setup, forward), "bwd": (bwd_setup, bwd), "fwd+bwd": (fwd_setup, fwd_bwd)}


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)
