"""Adam's state set for the way the step runs, eager or under CUDA graphs.

A step replayed from a CUDA graph (``--cuda-graph``, or the graphs of ``--compile`` on a GPU)
needs Adam with ``capturable=True`` and each parameter's step count as a tensor on that
parameter's device: a count on the host would be read back at every step. torch.compile makes
a fresh optimizer so itself, but not one whose state a checkpoint filled, and a checkpoint
carries the flag of the run that wrote it, which may have stepped another way.
"""

from __future__ import annotations

import torch


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Set every param group's ``capturable`` and move each ``step`` count to match: onto its
    parameter's device when ``capturable``, else to the CPU, where torch's eager Adam keeps it.
    The counts keep their values and dtype, so the next update is the one the saved run made."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise TypeError(f"{type(optimizer).__name__} has no capturable option; expected Adam or another that has")
        group["capturable"] = capturable
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(param.device if capturable else "cpu")


def needs_capturable(device: torch.device, compiled: bool, graphed: bool) -> bool:
    """Whether a run's Adam must be capturable: on a GPU, when its step is compiled or graphed."""
    return device.type == "cuda" and (compiled or graphed)
