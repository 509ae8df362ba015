"""diffusers' ``AutoencoderKL`` with fastvae posteriors, in one line.

    from fastvae.integrations.diffusers import patch
    vae = patch(AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse"))
    posterior = vae.encode(x).latent_dist     # a fastvae.DiagonalGaussian

``patch(vae)`` patches one model, ``patch(AutoencoderKL)`` the class (every instance, and
subclasses); ``unpatch`` undoes either and ``is_patched`` says which is in effect. Patching wraps the methods that build the posterior
(``encode``, and the deprecated ``tiled_encode``): each runs unchanged, then the
``DiagonalGaussianDistribution`` it returns is replaced by a :class:`fastvae.DiagonalGaussian` of
the same moments. Nothing else changes: weights, config, ``state_dict``, ``save_pretrained``,
``decode``, and ``forward`` (which calls ``encode``). diffusers' constructor still runs before the
swap, a clamp and two exponentials over the latents that nothing then reads; wrapping rather than
rewriting ``encode`` keeps its slicing, tiling and offload hooks as the installed diffusers has them.

diffusers is an optional dependency (``pip install fastvae[diffusers]``), imported by
:func:`patch`, :func:`unpatch` and :func:`is_patched` only.
"""

from __future__ import annotations

import functools
from types import MethodType
from typing import Callable

from fastvae.distributions import DiagonalGaussian

# The AutoencoderKL methods that return a posterior, alone or as the `latent_dist` of an output.
POSTERIOR_METHODS = ("encode", "tiled_encode")


def _autoencoder_kl_class() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ImportError(
            f"fastvae.integrations.diffusers needs diffusers, which failed to import ({exc}); "
            "install it with `pip install fastvae[diffusers]`"
        ) from exc
    return AutoencoderKL


def _to_fastvae(posterior) -> DiagonalGaussian:
    if isinstance(posterior, DiagonalGaussian):
        return posterior
    return DiagonalGaussian(posterior.parameters, deterministic=posterior.deterministic)


def _with_fastvae_posterior(output):
    """``output`` of an encode method, ``(posterior,)`` or ``AutoencoderKLOutput``, with a fastvae posterior."""
    if isinstance(output, tuple):
        return (_to_fastvae(output[0]), *output[1:])
    output.latent_dist = _to_fastvae(output.latent_dist)
    return output


def _class_method(original: Callable, inherited: bool) -> Callable:
    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return _with_fastvae_posterior(original(self, *args, **kwargs))

    patched._fastvae_patched = True
    # unpatch deletes an inherited method's wrapper rather than pinning the parent's method.
    patched._fastvae_inherited = inherited
    return patched


def _instance_method(name: str) -> Callable:
    # Looks the class's method up at each call, so patching the class too converts only once.
    # Bound with MethodType, so copy.deepcopy(vae) rebinds it to the copy.
    def patched(self, *args, **kwargs):
        return _with_fastvae_posterior(getattr(type(self), name)(self, *args, **kwargs))

    patched.__name__ = patched.__qualname__ = name
    patched._fastvae_patched = True
    return patched


_INSTANCE_METHODS = {name: _instance_method(name) for name in POSTERIOR_METHODS}


def _is_ours(method) -> bool:
    return getattr(method, "_fastvae_patched", False)


def _methods_of(cls: type) -> list[str]:
    return [name for name in POSTERIOR_METHODS if hasattr(cls, name)]


def _check_target(target) -> bool:
    """Whether ``target`` is a class; raises TypeError unless it is AutoencoderKL or an instance."""
    autoencoder_kl = _autoencoder_kl_class()
    if isinstance(target, type):
        if not issubclass(target, autoencoder_kl):
            raise TypeError(f"expected diffusers' AutoencoderKL (an instance or the class), got the class {target.__name__}")
        return True
    if not isinstance(target, autoencoder_kl):
        raise TypeError(
            f"expected diffusers' AutoencoderKL (an instance or the class), got {type(target).__name__}"
            " (to compile a patched model, patch it before torch.compile)"
        )
    return False


def patch(target):
    """Make ``target``, an ``AutoencoderKL`` or the class itself, return fastvae posteriors.

    Returns ``target``. Patching a patched target does nothing.
    """
    if _check_target(target):
        for name in _methods_of(target):
            original = getattr(target, name)
            if not _is_ours(original):
                setattr(target, name, _class_method(original, inherited=name not in target.__dict__))
        return target
    for name in _methods_of(type(target)):
        if not _is_ours(target.__dict__.get(name)):
            setattr(target, name, MethodType(_INSTANCE_METHODS[name], target))
    return target


def unpatch(target):
    """Undo :func:`patch` on ``target`` (an instance, or the class); returns ``target``."""
    if _check_target(target):
        for name in _methods_of(target):
            patched = target.__dict__.get(name)
            if not _is_ours(patched):
                continue
            if patched._fastvae_inherited:
                delattr(target, name)
            else:
                setattr(target, name, patched.__wrapped__)
        return target
    for name in _methods_of(type(target)):
        if _is_ours(target.__dict__.get(name)):
            delattr(target, name)
    return target


def is_patched(target) -> bool:
    """Whether ``target`` (an instance or the class) returns fastvae posteriors from ``encode``."""
    _check_target(target)
    return _is_ours(getattr(target, "encode"))
