"""Backend dispatch in fastvae.ops: what "auto" picks, what a forced backend says, and validation first."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvae
from fastvae import info, ops, reference

CPU = torch.device("cpu")


def test_reference_backend_is_the_reference():
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(
        ops.kl_divergence(mu, logvar, reduction="mean", backend="reference"),
        reference.kl_divergence(mu, logvar, reduction="mean"),
        rtol=0,
        atol=0,
    )
    z = ops.reparameterize(mu, logvar, seed=3, backend="reference")
    assert torch.equal(z, reference.reparameterize(mu, logvar, seed=3))


def test_auto_on_cpu_uses_the_extension_when_loaded():
    expected = "cpp" if fastvae.extension_error is None else "reference"
    for op in ops.OPS:
        assert ops.resolve_backend(op, CPU) == expected


def test_auto_on_cuda_without_a_usable_backend_falls_back_with_reasons():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the fused backends can run")
    chosen, passed_over = ops.auto_choice("reparameterize", torch.device("cuda"))
    assert chosen == "reference"
    assert [reason.split(":")[0] for reason in passed_over] == ["triton", "cpp"]


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference', 'triton', 'cpp', got 'cuda'"):
        ops.kl_divergence(torch.zeros(1, 1), torch.zeros(1, 1), backend="cuda")


def test_forced_backend_that_lacks_the_op_says_so():
    with pytest.raises(ValueError, match="backend='triton' cannot run vae_loss on cpu: triton backend does not implement vae_loss"):
        ops.resolve_backend("vae_loss", CPU, "triton")


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_inputs_are_validated_before_any_backend(backend):
    with pytest.raises(ValueError, match=r"mu has shape \(2, 3\) but logvar has \(3, 2\)"):
        ops.reparameterize_kl(torch.zeros(2, 3), torch.zeros(3, 2), backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), reduction="total", backend=backend)
    with pytest.raises(TypeError, match="x_hat must be float16, bfloat16, float32 or float64, got torch.int32"):
        x = torch.zeros(2, 3, dtype=torch.int32)
        ops.vae_loss(x, x, torch.zeros(2, 1), torch.zeros(2, 1), backend=backend)
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        ops.reparameterize(torch.zeros(2), torch.zeros(2), seed="7", backend=backend)


def test_info_reports_versions_and_a_backend_per_op():
    text = info.report()
    assert f"torch     {torch.__version__}" in text
    for op in ops.OPS:
        assert f"cpu  {op:18s} -> {ops.resolve_backend(op, CPU)}" in text
        assert f"cuda {op:18s} -> {ops.resolve_backend(op, torch.device('cuda'))}" in text
    if not torch.cuda.is_available():
        # Each CUDA line says why the faster backends were passed over: no GPU, or no triton at
        # all (CPU-only torch wheels come without it).
        reason = ops.unavailable_reason("triton", "reparameterize", torch.device("cuda"))
        assert f"passed over triton: {reason}" in text
        expected = "CUDA is not available" if importlib.util.find_spec("triton") else "could not be imported"
        assert expected in reason


def test_import_without_the_extension_warns_once_and_runs_on_the_reference():
    script = textwrap.dedent(
        """
        import sys, warnings
        import importlib.abc

        class HideExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastvae._C":
                    raise ImportError("hidden by the test")

        sys.meta_path.insert(0, HideExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastvae
            import fastvae.ops
        import torch
        messages = [str(w.message) for w in caught if "fastvae._C" in str(w.message)]
        assert len(messages) == 1 and "hidden by the test" in messages[0], messages
        assert fastvae.ops.resolve_backend("vae_loss", torch.device("cpu")) == "reference"
        x = torch.rand(2, 3)
        loss, recon, kl = fastvae.ops.vae_loss(x, x, torch.zeros(2, 4), torch.zeros(2, 4))
        assert loss.item() == 0.0
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
