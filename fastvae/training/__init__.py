"""`fastvae train`: the loop in loop.py, each concern around it in a module of its own
(docs/design.md#the-training-package lists them)."""

from fastvae.training.loop import run
from fastvae.training.options import add_arguments

__all__ = ["add_arguments", "run"]
