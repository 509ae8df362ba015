"""A digest of a checkpoint's contents: sha256 over a canonical serialization of the values (the
tensors' bytes, the Python values' exact text), so that a file whose bytes were damaged anywhere
that changes what it loads as never passes for the file that was saved.

The digest covers what a load returns rather than the file's bytes: it needs no second read of a
file of hundreds of MB, and a damaged byte the loader never uses (zip padding) changes nothing
that could be trained on. It detects damage, not tampering: whoever can write the file can
recompute it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

PREFIX = "sha256:"


def content_digest(value: object) -> str:
    """``"sha256:<hex>"`` of ``value``: nested dicts, lists and tuples of tensors and Python
    scalars, as ``torch.load(weights_only=True)`` returns them. TypeError for anything else."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return PREFIX + digest.hexdigest()


def _feed(digest, value: object) -> None:
    # Each value is fed as "kind:length:" and then its content, so no two values feed the same bytes.
    def put(kind: str, content: bytes = b"", length: int | None = None) -> None:
        digest.update(f"{kind}:{len(content) if length is None else length}:".encode())
        digest.update(content)

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cannot digest a {value.layout} tensor")
        put("tensor", f"{value.dtype}{tuple(value.shape)}".encode())
        # The logical values, whatever the strides and storage: bytes only a view leaves out do not count.
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        put("bytes", length=data.numel())
        digest.update(data.numpy())
    elif value is None or isinstance(value, (bool, int, torch.dtype, torch.device)):
        put(type(value).__name__, str(value).encode())
    elif isinstance(value, float):
        put("float", value.hex().encode())  # exact, and tells -0.0 from 0.0
    elif isinstance(value, str):
        put("str", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes):
        put("bytes", value)
    elif isinstance(value, (list, tuple)):  # torch.Size too, fed as such
        put(type(value).__name__, length=len(value))
        for item in value:
            _feed(digest, item)
    elif type(value) in (dict, OrderedDict):
        # In insertion order, which pickling keeps.
        put(type(value).__name__, length=len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    else:
        raise TypeError(f"cannot digest a {type(value).__name__}")
