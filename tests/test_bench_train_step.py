"""fastvae.benchmarks.train_step: a method is a backend and a StepBuilder, and one more (as the
graphed step will be) needs nothing but its line in ``methods``."""

import torch

from fastvae.benchmarks import train_step
from fastvae.benchmarks.measure import measure
from fastvae.benchmarks.report import format_table, row_order
from fastvae.model import VAE

CPU = torch.device("cpu")


def test_the_methods_on_each_device():
    assert list(train_step.methods(CPU, compile_=False)) == ["eager", "fused"]
    assert list(train_step.methods(CPU, compile_=True)) == ["eager", "fused", "compile", "fused+compile"]
    cuda = list(train_step.methods(torch.device("cuda"), compile_=True))
    assert cuda == ["eager", "fused", "compile", "compile-ro", "fused+compile-ro", "fused+graph"]
    backends = {name: backend for name, (backend, _) in train_step.methods(torch.device("cuda"), compile_=True).items()}
    assert backends == {"eager": "reference", "fused": "auto", "compile": "reference", "compile-ro": "reference",
                        "fused+compile-ro": "auto", "fused+graph": "auto"}
    assert train_step.methods(torch.device("cuda"), compile_=True)["fused+graph"][1] is train_step.graphed_step


def test_the_graphed_method_steps_as_the_eager_one_bit_for_bit_where_it_runs_uncaptured():
    # On a CPU the graphed step is its static-buffer twin: the gather, the ring of losses and the
    # counter around the very step the eager method times.
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = []
    for build in (train_step.eager_step, train_step.graphed_step):
        torch.manual_seed(1)
        model = VAE(3, 16, 4, (8, 16)).train()
        step = build(model, x)
        losses = torch.stack([step(x).clone() for _ in range(3)])
        runs.append((losses, model.state_dict()))
    (eager_losses, eager_state), (graphed_losses, graphed_state) = runs
    assert torch.equal(graphed_losses, eager_losses) and len(set(eager_losses.tolist())) == 3  # it trained
    for name, value in eager_state.items():
        assert torch.equal(graphed_state[name], value), name


def test_a_new_method_is_built_once_timed_and_reported(monkeypatch):
    built, calls = [], []

    def graphed_step(model: VAE, x: torch.Tensor):
        built.append((model, x))
        eager = train_step.eager_step(model, x)

        def step(batch: torch.Tensor) -> None:
            calls.append(batch)
            eager(batch)

        return step

    methods = train_step.methods

    def with_graphed(device: torch.device, compile_: bool):
        return {**methods(device, compile_), "fused+graphed": ("auto", graphed_step)}

    monkeypatch.setattr(train_step, "methods", with_graphed)
    cases = {c.method: c for c in train_step.train_cases(CPU, batch=2, compile_=False)}
    assert list(cases) == ["eager", "fused", "fused+graphed"]
    case = cases["fused+graphed"]
    assert (case.id, case.numel, case.bytes_moved) == ("train_step-step-batch 2 64x64-fused+graphed", 2, None)

    rows = [measure(c, CPU, rounds=2, warmup=1) for c in cases.values()]
    (model, x), = built  # one model for every round, not one a round
    assert isinstance(model, VAE) and model.backend == "auto" and model.training
    assert x.shape == (2, 3, 64, 64)
    # The step is called on the batch it was built with (what a captured graph needs), once a round.
    assert len(calls) == 3 and all(batch is x for batch in calls)
    # Each case seeds alike: the methods time the same batch.
    _, fused_x = cases["fused"].setup()
    assert torch.equal(fused_x, x)

    rows.sort(key=row_order)
    assert [r.method for r in rows] == ["eager", "fused", "fused+graphed"]
    table = format_table(rows, None)
    steps = table.split("\n\n", 1)[1].splitlines()
    assert steps[0].startswith("training step ") and len(steps) == 2 + 3
    assert steps[-1].startswith("batch 2 64x64      fused+graphed    ")
