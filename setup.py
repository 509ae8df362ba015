"""Builds fastvae and its extension fastvae._C.

The CPU operators are always built. The CUDA kernels are added when a CUDA toolkit and a CUDA
build of torch are both present, whether or not a GPU is visible; they target the archs in
TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX", as torch's own default is "the GPUs I can see"):
machine code for sm_80 and sm_90, and sm_90 PTX that the driver compiles for newer GPUs.

    FASTVAE_FORCE_CUDA=1   build the CUDA kernels or fail saying why
    FASTVAE_SKIP_CUDA=1    build the CPU operators only
    CUDA_HOME=/path        the toolkit to use (else found from nvcc, then /usr/local/cuda*)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _is_toolkit(path: str | os.PathLike | None) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime.h").is_file()


def _nvcc_toolkit() -> str | None:
    """The toolkit of the nvcc on PATH, even when that nvcc is a wrapper script or a symlink.

    nvcc reports its own install as TOP in a dry run, which sees through wrappers that torch's
    guess (the parent of the nvcc on PATH) does not.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    if _is_toolkit(Path(nvcc).resolve().parent.parent):
        return str(Path(nvcc).resolve().parent.parent)
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if match and _is_toolkit(match.group(1).strip()):
        return str(Path(match.group(1).strip()).resolve())
    return None


def find_cuda_home() -> str | None:
    """A folder holding include/cuda_runtime.h: CUDA_HOME/CUDA_PATH, then nvcc's, then /usr/local/cuda*."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            if _is_toolkit(value):
                return value
            print(f"fastvae: ignoring {variable}={value}: it has no include/cuda_runtime.h", file=sys.stderr)
    from_nvcc = _nvcc_toolkit()
    if from_nvcc:
        return from_nvcc
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_plan() -> tuple[bool, str]:
    """(build CUDA?, why). Sets CUDA_HOME for torch.utils.cpp_extension when building CUDA."""
    import torch

    if _flag("FASTVAE_SKIP_CUDA"):
        return False, "FASTVAE_SKIP_CUDA is set"
    cuda_home = find_cuda_home()
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME to the folder with include/cuda_runtime.h)")
    if missing:
        if _flag("FASTVAE_FORCE_CUDA"):
            raise RuntimeError("FASTVAE_FORCE_CUDA=1 but " + "; ".join(missing))
        return False, "; ".join(missing)
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    why = "FASTVAE_FORCE_CUDA is set" if _flag("FASTVAE_FORCE_CUDA") else f"toolkit at {cuda_home}"
    return True, f"{why}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def extensions_and_cmdclass():
    build_cuda, why = _cuda_plan()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # The *_avx2.cpp builds link last: see csrc/avx2_target.h.
    cpu_sources = sorted(
        (str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if "tests" not in p.parts),
        key=lambda path: (path.endswith("_avx2.cpp"), path),
    )
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    # No pybind11 and only the limited C API (module.cpp), so one binary serves every CPython >= 3.10.
    # The C++ standard is left to torch.utils.cpp_extension: it passes the one its headers need.
    # Hidden visibility, and on Linux a version script for what headers mark visible (torch's
    # classes, the standard library): the module exports PyInit__C alone, so each call it makes to
    # an inline function of those headers binds to its own copy, which no other library loaded in
    # the process can interpose on (tests/test_build.py checks the export).
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-psabi"]
    link_flags = []
    if sys.platform.startswith("linux"):
        link_flags.append(f"-Wl,--version-script={ROOT / 'csrc' / 'fastvae_C.map'}")
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is a `#pragma omp parallel` in torch's headers: without -fopenmp it
        # silently runs on one thread. libgomp resolves to the copy torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if build_cuda:
        print(f"fastvae: building fastvae._C for CPU+CUDA ({why})")
        extension = CUDAExtension(
            "fastvae._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xcompiler", "-fvisibility=hidden"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        print(f"fastvae: building fastvae._C for CPU only ({why})")
        extension = CppExtension(
            "fastvae._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else None

    class BuildExtensionAndRecord(BuildExtension):
        """Writes fastvae/_build_info.py beside the built fastvae._C once the build succeeded.

        It records the torch the extension was compiled against: its ABI is that torch's, so after
        a torch upgrade fastvae._extension can say why the load failed and how to rebuild.
        """

        def run(self):
            super().run()
            info = Path(self.get_ext_fullpath("fastvae._C")).parent / "_build_info.py"
            info.write_text(
                '"""Written by setup.py when it built fastvae._C: what the extension was built against."""\n\n'
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"CUDA_ARCHS = {archs!r}\n"
            )

    return [extension], {"build_ext": BuildExtensionAndRecord}


# Guarded so .ci/build_checks.sh can import find_cuda_home; pip and `python setup.py` run this as __main__.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions_and_cmdclass()
    setup(
        packages=[
            "fastvae", "fastvae.backends", "fastvae.benchmarks", "fastvae.integrations", "fastvae.kernels",
            "fastvae.training",
        ],
        package_dir={"fastvae.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
