"""diffusers' autoencoders with fastvae posteriors, in one line.

    from fastvae.integrations.diffusers import patch
    vae = patch(AutoencoderKLWan.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", subfolder="vae"))
    posterior = vae.encode(x).latent_dist     # a fastvae.DiagonalGaussian

``patch(vae)`` patches one model, ``patch(cls)`` the class (every instance, and subclasses);
``unpatch`` undoes either and ``is_patched`` says which is in effect.

Which models: every class whose own methods build diffusers' ``DiagonalGaussianDistribution``
(the (mean, log-variance) posterior that :class:`fastvae.DiagonalGaussian` stands in for) or its
``OobleckDiagonalGaussianDistribution`` (softplus scale, :class:`fastvae.distributions.OobleckGaussian`).
They are found by reading each method's bytecode for a global that is one of those classes, not
from a list, so a model added to diffusers is covered when it builds the same posterior. In
diffusers 0.42 that is AutoencoderKL and 26 more, image, video and audio (README.md names them).
A class that builds neither (VQModel, AutoencoderTiny, AutoencoderDC, or MiniMaxH3's audio VAE
with its mean and log-std) raises a TypeError naming it.

Patching wraps the methods that build the posterior (``encode``, and ``tiled_encode`` where it
does): each runs unchanged, then every diffusers posterior in what it returns (the result
itself, an item of a tuple, or an output's ``latent_dist``) is replaced by fastvae's class of
the same moments; anything else passes through (an
AutoencoderVidTok configured with a quantizer returns tensors). Nothing else changes: weights,
config, ``state_dict``, ``save_pretrained``, ``decode``, and ``forward`` (which calls ``encode``).
diffusers' constructor still runs before the swap, a clamp and two exponentials over the latents
that nothing then reads; wrapping rather than rewriting ``encode`` keeps its slicing, tiling,
caching and offload hooks as the installed diffusers has them.

diffusers is an optional dependency (``pip install fastvae[diffusers]``), imported by
:func:`patch`, :func:`unpatch`, :func:`is_patched` and :func:`posterior_methods` only.
"""

from __future__ import annotations

import functools
import inspect
import types
from types import MethodType
from typing import Callable, Iterator

from fastvae.distributions import DiagonalGaussian, OobleckGaussian


def _posterior_classes() -> dict[type, type]:
    """Each diffusers posterior class that patch replaces, and the fastvae class replacing it."""
    try:
        import diffusers  # noqa: F401  (first: its submodules may be loaded while it is not importable)
        from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    except ImportError as exc:
        raise ImportError(
            f"fastvae.integrations.diffusers needs diffusers, which failed to import ({exc}); "
            "install it with `pip install fastvae[diffusers]`"
        ) from exc
    return {DiagonalGaussianDistribution: DiagonalGaussian, OobleckDiagonalGaussianDistribution: OobleckGaussian}


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of the functions, comprehensions and lambdas nested in it."""
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def _builds(method: object, posterior_classes: dict[type, type]) -> bool:
    """Whether ``method`` (under its decorators) names one of ``posterior_classes`` as a global."""
    function = inspect.unwrap(method) if callable(method) else method
    if not isinstance(function, types.FunctionType):
        return False
    return any(
        isinstance(value := function.__globals__.get(name), type) and value in posterior_classes
        for code in _code_objects(function.__code__)
        for name in code.co_names
    )


@functools.lru_cache(maxsize=None)
def _cached_posterior_methods(cls: type, posterior_classes: tuple[type, ...]) -> tuple[str, ...]:
    names = sorted(name for name in dir(cls) if not (name.startswith("__") and name.endswith("__")))
    # inspect.getattr_static: reading a property of the class would run it.
    classes = dict.fromkeys(posterior_classes)
    return tuple(name for name in names if _builds(inspect.getattr_static(cls, name), classes))


def _posterior_methods(cls: type) -> tuple[str, ...]:
    # diffusers is imported on every call (a dict lookup once it is loaded), cached or not, so
    # a missing diffusers always says so.
    return _cached_posterior_methods(cls, tuple(_posterior_classes()))


def posterior_methods(cls: type) -> tuple[str, ...]:
    """The methods of ``cls`` that build a diffusers posterior that fastvae replaces, which
    :func:`patch` wraps; empty for a class that :func:`patch` refuses."""
    if not isinstance(cls, type):
        raise TypeError(f"expected a class, got {type(cls).__name__}")
    return _posterior_methods(cls)


def _to_fastvae(item, posterior_classes: dict[type, type]):
    fastvae_class = posterior_classes.get(type(item))
    if fastvae_class is None:
        return item
    return fastvae_class(item.parameters, deterministic=item.deterministic)


def _with_fastvae_posterior(output):
    """``output`` of a posterior method with each diffusers posterior in it made a fastvae one."""
    posterior_classes = _posterior_classes()
    if isinstance(output, tuple):
        return type(output)(_to_fastvae(item, posterior_classes) for item in output)
    latent_dist = getattr(output, "latent_dist", None)
    if type(latent_dist) in posterior_classes:
        output.latent_dist = _to_fastvae(latent_dist, posterior_classes)
        return output
    return _to_fastvae(output, posterior_classes)


def _class_method(original: Callable, inherited: bool) -> Callable:
    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return _with_fastvae_posterior(original(self, *args, **kwargs))

    patched._fastvae_patched = True
    # unpatch deletes an inherited method's wrapper rather than pinning the parent's method.
    patched._fastvae_inherited = inherited
    return patched


@functools.lru_cache(maxsize=None)
def _instance_method(name: str) -> Callable:
    # Looks the class's method up at each call, so patching the class too converts only once.
    # Bound with MethodType, so copy.deepcopy(vae) rebinds it to the copy.
    def patched(self, *args, **kwargs):
        return _with_fastvae_posterior(getattr(type(self), name)(self, *args, **kwargs))

    patched.__name__ = patched.__qualname__ = name
    patched._fastvae_patched = True
    return patched


def _is_ours(method) -> bool:
    return getattr(method, "_fastvae_patched", False)


def _check_target(target) -> tuple[bool, tuple[str, ...]]:
    """``(is a class, its posterior methods)``; TypeError when there are none to patch."""
    is_class = isinstance(target, type)
    cls = target if is_class else type(target)
    methods = _posterior_methods(cls)
    if not methods:
        what = f"the class {cls.__name__}" if is_class else cls.__name__
        hint = "" if is_class else " (to compile a patched model, patch it before torch.compile)"
        raise TypeError(
            "expected a diffusers autoencoder whose encode builds diffusers' DiagonalGaussianDistribution "
            "or OobleckDiagonalGaussianDistribution "
            f"(AutoencoderKL, AutoencoderKLWan, ...; an instance or the class), got {what}: no method of "
            f"{cls.__name__} builds one, so there is no posterior to replace{hint}"
        )
    return is_class, methods


def patch(target):
    """Make ``target``, a diffusers autoencoder with a Gaussian posterior or its class, return
    fastvae posteriors.

    Returns ``target``. Patching a patched target does nothing.
    """
    is_class, methods = _check_target(target)
    if is_class:
        for name in methods:
            original = getattr(target, name)
            if not _is_ours(original):
                setattr(target, name, _class_method(original, inherited=name not in target.__dict__))
        return target
    for name in methods:
        if not _is_ours(target.__dict__.get(name)):
            setattr(target, name, MethodType(_instance_method(name), target))
    return target


def unpatch(target):
    """Undo :func:`patch` on ``target`` (an instance, or the class); returns ``target``."""
    is_class, methods = _check_target(target)
    if is_class:
        for name in methods:
            patched = target.__dict__.get(name)
            if not _is_ours(patched):
                continue
            if patched._fastvae_inherited:
                delattr(target, name)
            else:
                setattr(target, name, patched.__wrapped__)
        return target
    for name in methods:
        if _is_ours(target.__dict__.get(name)):
            delattr(target, name)
    return target


def is_patched(target) -> bool:
    """Whether ``target`` (an instance or the class) returns fastvae posteriors."""
    _, methods = _check_target(target)
    return all(_is_ours(getattr(target, name)) for name in methods)
