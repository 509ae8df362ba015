"""An independent numpy model of Triton's ``tl.randn(seed, offset)``, the oracle for the noise contract.

The fused kernels draw ``eps`` for the element with logical row-major index ``i`` as
``tl.randn(seed, i)``: Philox-4x32-10 keyed by the 64-bit seed, counter ``(i_lo, i_hi, 0, 0)``,
then a Box-Muller transform of the first two output words, all in float32. This module
recomputes that stream with plain uint64 numpy arithmetic (32-bit products taken exactly in
64 bits), so a kernel that drifts from the contract fails its tests.
"""

from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUNDS = 10


def philox_4x32(seed: int, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four uint32 output words for counters ``(offset_lo, offset_hi, 0, 0)``, as uint64 arrays."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    c0 = offsets & _MASK32
    c1 = offsets >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed) & _MASK32
    k1 = np.uint64(seed) >> np.uint64(32)
    for _ in range(_ROUNDS):
        # A 32x32-bit product fits exactly in 64 bits: its high half is mulhi, its low half mul.
        prod_b = _ROUND_B * c2
        prod_a = _ROUND_A * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & _MASK32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(word: np.ndarray) -> np.ndarray:
    """Triton's uint32 -> [0, 1) map: fold the sign of the int32 view, scale in float32."""
    signed = word.astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    return folded.astype(np.float32) * np.float32(4.6566127342e-10)


def randn(seed: int, offsets: np.ndarray) -> np.ndarray:
    """float32 normals equal (to libm rounding) to ``tl.randn(seed, offsets)``."""
    c0, c1, _, _ = philox_4x32(seed, offsets)
    u1 = np.maximum(np.float32(1.0e-7), _uniform(c0))
    theta = np.float32(6.283185307179586) * _uniform(c1)
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (radius * np.cos(theta)).astype(np.float32)


def randn_like(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise a fused kernel draws for a tensor of ``shape``: offsets are row-major indices."""
    count = int(np.prod(shape, dtype=np.int64))
    return randn(seed, np.arange(count, dtype=np.uint64)).reshape(shape)
