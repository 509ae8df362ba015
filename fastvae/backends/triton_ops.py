"""The Triton backend: custom ops around :mod:`fastvae.kernels.reparameterize_kl`.

Each op is a ``torch.library.custom_op`` in the ``fastvae`` namespace (prefixed ``triton_``)
with a fake kernel and an autograd registration whose backward is itself a custom op, so
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` see through them. Outside
``torch.compile`` the same kernels, saved tensors and backward run as plain autograd.Functions,
without the custom-op dispatch. They run on CUDA tensors, and on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``).

The seed reaches the ops as a 0-dim int64 tensor on the latents' device
(:func:`fastvae._seed.seed_tensor`), which the kernels load: the host never reads it.
"""

import os
from typing import Optional

import torch

from fastvae.backends._latent_outputs import empty_kl, empty_latent_like
from fastvae._seed import seed_tensor

OPS = frozenset({"reparameterize", "kl_divergence", "reparameterize_kl"})

try:
    from fastvae.kernels import reparameterize_kl as _kernels
except ImportError as exc:  # triton missing, or unusable on this platform
    _kernels = None
    _import_error = f"the Triton kernels could not be imported ({exc})"


def unavailable_reason(device: torch.device, op: Optional[str] = None) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or None when they can.

    Every op in :data:`OPS` runs wherever the kernels do, so ``op`` does not change the answer.
    """
    if _kernels is None:
        return _import_error
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if _kernels.INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return (
                "TRITON_INTERPRET=1 was set after triton built the kernels; "
                "set it before importing fastvae"
            )
        return (
            "Triton runs CPU tensors only under its interpreter; "
            "set TRITON_INTERPRET=1 before importing triton"
        )
    return f"Triton kernels run on CUDA tensors, not {device.type}"


# ---------------------------------------------------------------------------------------------
# The kernels, as functions of the ops' schemas


def _reparameterize_kernels(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    z, _ = _kernels.reparameterize_kl_forward(mu, logvar, seed, write_z=True, reduction=None)
    return z


def _kl_divergence_kernels(mu: torch.Tensor, logvar: torch.Tensor, reduction: str) -> torch.Tensor:
    _, kl = _kernels.reparameterize_kl_forward(mu, logvar, None, write_z=False, reduction=reduction)
    return kl


def _reparameterize_kl_kernels(
    mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels.reparameterize_kl_forward(mu, logvar, seed, write_z=True, reduction=reduction)


def _backward_kernels(
    grad_z: Optional[torch.Tensor],
    grad_kl: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    logvar: torch.Tensor,
    seed: Optional[torch.Tensor],
    reduction: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_mu, grad_logvar)``: eps is drawn again from ``seed``, mu read when ``grad_kl`` is given."""
    return _kernels.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Custom ops, with fake kernels: what torch.compile and opcheck trace

_reparameterize = torch.library.custom_op("fastvae::triton_reparameterize", _reparameterize_kernels, mutates_args=())
_kl_divergence = torch.library.custom_op("fastvae::triton_kl_divergence", _kl_divergence_kernels, mutates_args=())
_reparameterize_kl = torch.library.custom_op(
    "fastvae::triton_reparameterize_kl", _reparameterize_kl_kernels, mutates_args=()
)
_reparameterize_kl_backward = torch.library.custom_op(
    "fastvae::triton_reparameterize_kl_backward", _backward_kernels, mutates_args=()
)


@_reparameterize.register_fake
def _(mu, logvar, seed):
    return empty_latent_like(mu)


@_kl_divergence.register_fake
def _(mu, logvar, reduction):
    return empty_kl(mu, reduction)


@_reparameterize_kl.register_fake
def _(mu, logvar, seed, reduction):
    return empty_latent_like(mu), empty_kl(mu, reduction)


@_reparameterize_kl_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, reduction):
    return empty_latent_like(logvar), empty_latent_like(logvar)


# ---------------------------------------------------------------------------------------------
# Autograd. Unused outputs get None gradients (not zeros) so the backward skips their terms.


def _check_first_order(op: str) -> None:
    # The backward op has no derivative of its own: with create_graph=True (grad mode on in the
    # backward) the second derivative would be silently wrong, so refuse it.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} has no double backward: its gradient cannot be taken with create_graph=True (nor under "
            'torch.func transforms); use backend="reference" for higher-order gradients'
        )


def _setup_reparameterize(ctx, inputs, output):
    _, logvar, seed = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logvar, seed)


def _setup_kl_divergence(ctx, inputs, output):
    mu, logvar, reduction = inputs
    ctx.reduction = reduction
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mu, logvar)


def _setup_reparameterize_kl(ctx, inputs, output):
    mu, logvar, seed, reduction = inputs
    ctx.reduction = reduction
    ctx.set_materialize_grads(False)
    # The inputs and the seed: nothing the forward allocated is kept alive. The backward draws
    # eps again rather than recovering it (or mu) from z, which would lose precision wherever
    # std is small next to mu or the dtype is narrow.
    ctx.save_for_backward(mu, logvar, seed)


class _Backwards:
    """The three forward ops' backward functions, computing the gradients with ``latent_grads``
    (the backward custom op when traced, or its kernels called directly)."""

    def __init__(self, latent_grads):
        self.latent_grads = latent_grads

    def reparameterize(self, ctx, grad_z):
        _check_first_order("fastvae::triton_reparameterize")
        logvar, seed = ctx.saved_tensors
        grad_mu, grad_logvar = self.latent_grads(grad_z, None, None, logvar, seed, None)
        return grad_mu, grad_logvar, None

    def kl_divergence(self, ctx, grad_kl):
        _check_first_order("fastvae::triton_kl_divergence")
        mu, logvar = ctx.saved_tensors
        grad_mu, grad_logvar = self.latent_grads(None, grad_kl, mu, logvar, None, ctx.reduction)
        return grad_mu, grad_logvar, None

    def reparameterize_kl(self, ctx, grad_z, grad_kl):
        _check_first_order("fastvae::triton_reparameterize_kl")
        mu, logvar, seed = ctx.saved_tensors
        if grad_z is None and grad_kl is None:
            return None, None, None, None
        grad_mu, grad_logvar = self.latent_grads(grad_z, grad_kl, mu, logvar, seed, ctx.reduction)
        return grad_mu, grad_logvar, None, None


_traced = _Backwards(_reparameterize_kl_backward)
_reparameterize.register_autograd(_traced.reparameterize, setup_context=_setup_reparameterize)
_kl_divergence.register_autograd(_traced.kl_divergence, setup_context=_setup_kl_divergence)
_reparameterize_kl.register_autograd(_traced.reparameterize_kl, setup_context=_setup_reparameterize_kl)


# Outside torch.compile the same forward, setup and backward run as plain autograd.Functions
# that call the kernels directly: on a GPU the custom-op dispatch would take longer than the
# kernels at a VAE's latent sizes (docs/performance.md has the host times).
_eager = _Backwards(_backward_kernels)


def _eager_function(name: str, kernels, setup_context, backward) -> type[torch.autograd.Function]:
    # forward takes ctx and calls setup_context itself: a Function with a separate setup_context
    # binds its arguments with inspect.signature on every call, which costs as much as the rest.
    def forward(ctx, *inputs):
        output = kernels(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_ReparameterizeFunction = _eager_function(
    "_ReparameterizeFunction", _reparameterize_kernels, _setup_reparameterize, _eager.reparameterize
)
_KlDivergenceFunction = _eager_function(
    "_KlDivergenceFunction", _kl_divergence_kernels, _setup_kl_divergence, _eager.kl_divergence
)
_ReparameterizeKlFunction = _eager_function(
    "_ReparameterizeKlFunction", _reparameterize_kl_kernels, _setup_reparameterize_kl, _eager.reparameterize_kl
)


def _call(op, function: type[torch.autograd.Function], *args):
    """The custom op while torch.compile traces (through its fake kernel), else the Function."""
    return op(*args) if torch.compiler.is_compiling() else function.apply(*args)


# ---------------------------------------------------------------------------------------------
# The backend's functions, with the signatures of fastvae.reference (inputs already validated)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed: Optional[int]) -> torch.Tensor:
    return _call(_reparameterize, _ReparameterizeFunction, mu, logvar, seed_tensor(seed, mu.device))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str) -> torch.Tensor:
    return _call(_kl_divergence, _KlDivergenceFunction, mu, logvar, reduction)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str, seed: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _call(_reparameterize_kl, _ReparameterizeKlFunction, mu, logvar, seed_tensor(seed, mu.device), reduction)
