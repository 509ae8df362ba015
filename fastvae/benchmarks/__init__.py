"""Benchmarks shared by ``pytest bench/ --benchmark`` and ``fastvae bench``.

Each case times one op (or the whole training step) one way: ``eager`` (fastvae.reference),
``compile`` (torch.compile of the reference), ``fused`` (fastvae's kernels), or a memory ``floor``
(a copy or an elementwise op over the same bytes). The table reports medians, speedups against
eager and compile, achieved bandwidth as a fraction of the measured copy bandwidth, and the bytes
each method keeps saved for the backward. The training step has its own table: images/s, and on
a GPU the host's and the device's time per step apart.

* ``case``: what a case is, and the helpers that make one per pass;
* ``op_cases``: the latent op's and the loss's cases;
* ``train_step``: the training-step cases, one per way of making the step;
* ``scopes``: which cases and sizes each scope (smoke, core, full) runs on each device;
* ``timing``: the clocks (host clock, CUDA events, CUDA graph replays, host and device apart);
* ``measure``: one case timed into a ``Row``, the results' schema;
* ``report``: the table, the JSON and the plot;
* ``command``: ``fastvae bench``.
"""
