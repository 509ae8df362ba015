"""Loads ``fastvae._C``, the C++/CUDA extension. Without it fastvae still works on the reference path."""

from __future__ import annotations

import importlib
import warnings

REBUILD = "pip install -e . --no-build-isolation"


def built_against() -> str | None:
    """The torch version fastvae._C was compiled against (setup.py records it), or None if unknown."""
    try:
        from fastvae import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION


def explain_load_error(exc: BaseException, torch_version: str, built_with: str | None) -> str:
    """Why the extension did not load, and the fix.

    The extension is compiled against one torch's C++ ABI: after torch is upgraded or downgraded
    the load fails, usually with an undefined symbol, and the only fix is to build it again.
    """
    message = f"fastvae._C could not be loaded ({type(exc).__name__}: {exc})"
    if built_with is not None and built_with != torch_version:
        return (
            f"{message}: it was built against torch {built_with}, but torch {torch_version} is "
            f"installed, and the extension only loads with the torch it was built against. Rebuild it "
            f"with `{REBUILD}`."
        )
    if "undefined symbol" in str(exc):
        return (
            f"{message}: a symbol it needs from torch is missing, which means it was built against "
            f"another torch than {torch_version}. Rebuild it with `{REBUILD}`."
        )
    return f"{message}. Build it with `{REBUILD}`."


def _load() -> str | None:
    try:
        # Importing it registers the fastvae:: operators with the dispatcher.
        importlib.import_module("fastvae._C")
    except (ImportError, OSError) as exc:
        import torch

        warnings.warn(
            explain_load_error(exc, torch.__version__, built_against())
            + " Until then the 'cpp' backend is unavailable and fastvae.ops falls back to the reference.",
            RuntimeWarning,
            stacklevel=3,
        )
        return f"{type(exc).__name__}: {exc}"
    return None


# None when the extension is loaded, else why not. Loaded once, at import, so it warns once.
extension_error = _load()
