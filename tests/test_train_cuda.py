"""`fastvae train` on a GPU: what only CUDA can show. Apart from tests/test_train.py, which the GPU
session leaves to CI (bench/gpu_check.py's CPU_ONLY_TESTS), so that these run there."""

import torch

from conftest import skip_unless_backend_runs
from fastvae.training import step as step_module
from fastvae.cli import main

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

    def sync_checked(step, mode):
        compiled = real_compile_step(step, mode)

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
