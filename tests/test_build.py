"""How fastvae is built and versioned: the version's one source, the CUDA archs and their PTX, and
what a stale extension says when it fails to load after a torch change."""

import ast
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvae
from fastvae import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import setup  # noqa: E402  (setup.py: only defines functions unless run as __main__)

from conftest import load_exception_probe  # noqa: E402
from static_gpu_code import require_static_checks, find_tool  # noqa: E402


def test_version_is_written_once():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^version\s*=", project, re.MULTILINE) is None, "pyproject.toml's [project] writes a version"
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = {attr = "fastvae.__version__"}' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastvae.__version__)
    # The installed metadata came from the same constant (a mismatch means: reinstall).
    assert importlib.metadata.version("fastvae") == fastvae.__version__


def test_setup_py_lists_every_package():
    # setup.py names its packages: one left out is missing from a wheel while the tests, run from
    # the source tree, still pass.
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    setup_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in setup_call.keywords if k.arg in ("packages", "package_dir")}
    found = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "fastvae"))  # does not follow a kernels symlink
        if "__init__.py" in files
    }
    assert sorted(keywords["packages"]) == sorted(found | set(keywords["package_dir"]))


def _arch_numbers(arch_list: str) -> list[float]:
    return [float(a.split("+")[0]) for a in re.split(r"[;\s]+", arch_list.strip()) if a]


def test_default_archs_embed_ptx_for_the_newest():
    archs = re.split(r"[;\s]+", setup.DEFAULT_CUDA_ARCHS.strip())
    newest = max(archs, key=lambda a: float(a.split("+")[0]))
    assert newest.endswith("+PTX"), f"{newest} of {setup.DEFAULT_CUDA_ARCHS} carries no PTX"
    assert [a for a in archs if a.endswith("+PTX")] == [newest]


def _cuda_archs_of_the_build() -> str:
    try:
        from fastvae import _build_info
    except ImportError:
        pytest.skip("fastvae/_build_info.py is missing: fastvae._C was built before setup.py recorded builds")
    if _build_info.CUDA_ARCHS is None:
        require_static_checks("fastvae._C was built without CUDA kernels (FASTVAE_FORCE_CUDA=1 builds them)")
    return _build_info.CUDA_ARCHS


def test_built_extension_holds_sass_per_arch_and_ptx_of_the_newest():
    archs = _cuda_archs_of_the_build()
    cuobjdump = find_tool("cuobjdump")
    import fastvae._C as ext

    ptx = subprocess.run([cuobjdump, "--list-ptx", ext.__file__], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True, check=True).stdout
    numbers = [int(round(a * 10)) for a in _arch_numbers(archs)]
    for arch in numbers:
        assert f"sm_{arch}" in elf, f"no sm_{arch} machine code in {ext.__file__}:\n{elf}"
    with_ptx = [int(round(_arch_numbers(a)[0] * 10)) for a in re.split(r"[;\s]+", archs) if a.endswith("+PTX")]
    assert set(re.findall(r"sm_(\d+)", ptx)) == {str(a) for a in with_ptx}, ptx


def test_build_records_the_torch_it_was_built_against():
    if fastvae.extension_error is not None:
        pytest.skip(f"fastvae._C is not loaded: {fastvae.extension_error}")
    assert _extension.built_against() in (torch.__version__, None)


def test_a_stale_extension_names_both_torches_and_the_fix():
    error = ImportError("fastvae/_C.abi3.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
    message = _extension.explain_load_error(error, "2.14.1", "2.11.0")
    assert "built against torch 2.11.0" in message and "torch 2.14.1 is installed" in message
    assert "undefined symbol: _ZN3c10" in message
    assert message.endswith("Rebuild it with `pip install -e . --no-build-isolation`.")
    # Unknown build (no record), but the symbol error says the same.
    message = _extension.explain_load_error(error, "2.14.1", None)
    assert "another torch than 2.14.1" in message and "pip install -e . --no-build-isolation" in message
    # Not a torch mismatch: no claim about torch versions.
    message = _extension.explain_load_error(ImportError("No module named 'fastvae._C'"), "2.14.1", "2.14.1")
    assert "torch" not in message.split("(")[0] and "built against" not in message


def test_import_after_a_torch_change_warns_with_the_fix():
    # A fresh process where the extension "fails" as after a torch upgrade, with a build record
    # naming another torch: the one warning must say both versions and the rebuild command.
    script = textwrap.dedent(
        """
        import sys, types, warnings
        import importlib.abc

        class StaleExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastvae._C":
                    raise ImportError("_C.abi3.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")

        sys.meta_path.insert(0, StaleExtension())
        sys.modules["fastvae._build_info"] = types.SimpleNamespace(TORCH_VERSION="0.0.0+stale", CUDA_ARCHS=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastvae
        import torch
        messages = [str(w.message) for w in caught if "fastvae._C" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "built against torch 0.0.0+stale" in out.stdout
    assert f"torch {torch.__version__} is installed" in out.stdout
    assert "pip install -e . --no-build-isolation" in out.stdout


_needs_extension = pytest.mark.skipif(fastvae.extension_error is not None, reason="fastvae._C is not built here")


@_needs_extension
def test_errors_raised_in_the_extension_reach_python():
    # On the H200's stack of 2026-12-04 a raw op's failed check with a shape in its message
    # killed the process; each case runs in its own process, so a crash fails this test alone.
    exception_probe = load_exception_probe()
    outcomes = [exception_probe.run_case(case) for case in exception_probe.cases(torch.cuda.is_available())]
    assert any(o.case.name.startswith("fastvae._C") for o in outcomes)
    failed = [f"{o.case.name}: {o.result}" for o in outcomes if not o.ok]
    assert not failed, "errors that did not reach Python as the expected exception:\n" + "\n".join(failed)


@_needs_extension
def test_the_extension_exports_its_module_init_alone():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    extension = importlib.import_module("fastvae._C").__file__
    symbols = subprocess.run([nm, "-D", "--defined-only", extension], capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in symbols.splitlines() if line.strip())
    assert exported == ["PyInit__C"], f"{extension} exports {len(exported)} symbols: {exported[:10]}"
