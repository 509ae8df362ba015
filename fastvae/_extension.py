"""Loads ``fastvae._C``, the C++/CUDA extension. Without it fastvae still works on the reference path."""

from __future__ import annotations

import importlib
import warnings


def _load() -> str | None:
    try:
        # Importing it registers the fastvae:: operators with the dispatcher.
        importlib.import_module("fastvae._C")
    except (ImportError, OSError) as exc:
        warnings.warn(
            f"fastvae._C could not be loaded ({exc}); the 'cpp' backend is unavailable and "
            "fastvae.ops falls back to the reference. Build it with "
            "`pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return f"{type(exc).__name__}: {exc}"
    return None


# None when the extension is loaded, else why not. Loaded once, at import, so it warns once.
extension_error = _load()
