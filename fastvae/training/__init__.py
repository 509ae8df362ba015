"""`fastvae train`: the training loop (loop.py) and, each in a module of its own, what surrounds it:
options.py (the options and their memory costing), run_folder.py (lock, metrics.jsonl, checkpoint,
resume checks), distributed.py (DDP), step.py (the training step), inputs.py (the batches),
evaluation.py (held-out loss and grids), checks.py (what each check does), sigterm.py and errors.py."""

from fastvae.training.loop import run
from fastvae.training.options import add_arguments

__all__ = ["add_arguments", "run"]
