"""`fastvae train` on a GPU: what only CUDA can show. Apart from tests/test_train.py, which the GPU
session leaves to CI (bench/gpu_check.py's CPU_ONLY_TESTS), so that these run there."""

import json
import warnings

import pytest
import torch

from conftest import skip_unless_backend_runs
from fastvae import checkpoint
from fastvae.cli import main
from fastvae.training import step as step_module
from fastvae.training.graphed_step import GraphedStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = [
    "--image-size", "16", "--hidden-dims", "8,16", "--latent-dim", "4", "--batch-size", "8",
    "--train-size", "64", "--eval-size", "16", "--device", "cuda",
]


def test_reduce_overhead_replays_the_step_from_cuda_graphs_without_syncing(tmp_path, monkeypatch, capsys):
    skip_unless_backend_runs("triton", "reparameterize", "cuda")
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    real_compile_step = step_module.compile_step
    calls = []

    def sync_checked(step, mode, **options):
        compiled = real_compile_step(step, mode, **options)

        def run(*inputs):
            calls.append(1)
            if len(calls) <= 3:  # compiling, warming up, recording the graphs
                return compiled(*inputs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return compiled(*inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    monkeypatch.setattr(step_module, "compile_step", sync_checked)
    counters.clear()
    code = main(["train", *TINY, "--out", str(tmp_path), "--steps", "8", "--every", "8", "--log-every", "8",
                 "--compile", "reduce-overhead"])
    assert code == 0, capsys.readouterr().err
    assert len(calls) == 8
    assert "data kept on cuda" in capsys.readouterr().out
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.roots


def step_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


@needs_cuda
def test_an_eager_run_resumed_under_reduce_overhead_graphs_adam_as_a_fresh_one(tmp_path, capsys):
    # Issue 29, item 4: the resumed Adam was not capturable, its step counts on the host, and
    # inductor left its update out of the CUDA graphs.
    from torch._dynamo.utils import counters

    assert main(["train", *TINY, "--out", str(tmp_path), "--steps", "4", "--every", "4"]) == 0
    counters.clear()
    code = main(["train", *TINY, "--out", str(tmp_path), "--steps", "8", "--every", "4", "--resume",
                 "--compile", "reduce-overhead"])
    assert code == 0, capsys.readouterr().err
    assert counters["inductor"]["cudagraph_skips"] == 0
    saved = checkpoint.load(tmp_path / "ckpt.pt")
    assert all(group["capturable"] for group in saved["optimizer"]["param_groups"])
    # And back: an eager run resumes it with torch's eager Adam, its counts on the host.
    assert main(["train", *TINY, "--out", str(tmp_path), "--steps", "10", "--every", "2", "--resume"]) == 0
    saved = checkpoint.load(tmp_path / "ckpt.pt")
    assert not any(group["capturable"] for group in saved["optimizer"]["param_groups"])
    assert [line["step"] for line in step_losses(tmp_path)] == list(range(1, 11))


@needs_cuda
@pytest.mark.parametrize("options", [(), ("--compile",), ("--amp", "bf16")], ids=["fp32", "compiled", "bf16"])
def test_a_cuda_graph_run_follows_eager_replays_without_syncing_and_resumes_either_way(tmp_path, capsys,
                                                                                       monkeypatch, options):
    replays = []
    real_call = GraphedStep.__call__

    def sync_checked(self, indices, beta):
        if self.graph is None:  # warming up, capturing
            return real_call(self, indices, beta)
        replays.append(1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_call(self, indices, beta)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(GraphedStep, "__call__", sync_checked)

    def train(out, *more):
        return main(["train", *TINY, "--out", str(tmp_path / out), "--every", "5", "--log-every", "3", *options,
                     *map(str, more)])

    assert train("eager", "--steps", 10) == 0
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train("graphed", "--steps", 10, "--cuda-graph") == 0, capsys.readouterr().err
    # torch's warning that a capturable Adam steps uncaptured is not for the warm-up.
    assert not [w for w in caught if "capturable" in str(w.message)]
    assert "one CUDA graph a step" in capsys.readouterr().out
    assert len(replays) == 10 - 4  # 3 warm-up steps, the capture, then a replay a step
    # The same batches and noise; Adam capturable (in the graph) rounds otherwise than eager's.
    rel = 3e-2 if "bf16" in options else 1e-3
    expected = step_losses(tmp_path / "eager")
    for a, b in zip(expected, step_losses(tmp_path / "graphed"), strict=True):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    assert train("graphed_then_eager", "--steps", 5, "--cuda-graph") == 0
    assert train("graphed_then_eager", "--steps", 10, "--resume") == 0
    assert train("eager_then_graphed", "--steps", 5) == 0
    assert train("eager_then_graphed", "--steps", 10, "--resume", "--cuda-graph") == 0
    for run in ("graphed_then_eager", "eager_then_graphed"):
        losses = step_losses(tmp_path / run)
        assert [line["step"] for line in losses] == list(range(1, 11))
        for a, b in zip(expected, losses):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), (run, a["step"])
