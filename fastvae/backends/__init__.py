"""Fused implementations of the ops in :mod:`fastvae.ops`, one module per backend.

Each backend module defines the ops it implements with the signatures of
:mod:`fastvae.reference` (inputs are already validated by :mod:`fastvae.ops`), plus:

* ``OPS``: the names of the ops it implements;
* ``unavailable_reason(device, op) -> str | None``: why it cannot run ``op`` on ``device``,
  or None.
"""
