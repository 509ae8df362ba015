"""``DiagonalGaussian``: diffusers' ``DiagonalGaussianDistribution`` on fastvae's fused ops.

The posterior of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE), and of the video and
audio autoencoders that reuse its class (Wan, HunyuanVideo, LTX, ...), is built from the
encoder's moments, (B, 2C, ...): (B, 2C, H, W) for images, (B, 2C, T, H, W) for video, (B, 2C, T)
for audio. Mean and log-variance are the two halves of dim 1, and the log-variance is clamped to
[-30, 20]. This class has the same constructor, attributes and methods
(``mean``, ``logvar``, ``std``, ``var``, ``parameters``, ``deterministic``, ``sample``, ``kl``,
``nll``, ``mode``), with the same values, so it can stand in for diffusers' class anywhere
(:mod:`fastvae.integrations.diffusers` makes an ``AutoencoderKL`` return it). It does not import
diffusers.

Where it differs from diffusers, on purpose:

* ``sample`` draws its noise inside the kernel (:func:`fastvae.ops.reparameterize`), from a Philox
  seed taken from ``generator`` (:func:`philox_seed`), so the same generator state gives the same
  sample, but not the numbers ``torch.randn`` would give.
* ``kl`` and ``nll`` are computed and returned in float32 (float64 for float64 moments) whatever
  the moments' dtype, as fastvae's ops are; diffusers sums bfloat16 moments in bfloat16.
* ``std`` and ``var`` are computed when read, not in the constructor, since training reads
  neither. The ``deterministic`` results of ``kl`` and ``nll`` (zero) are on the moments' device,
  where diffusers' are a CPU tensor.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastvae import ops
from fastvae._checks import SEED_LIMIT, accumulate_dtype, check_float_tensor, shape_str

# diffusers' clamp on the log-variance: exp(20) is a large variance and exp(-30) a tiny one,
# beyond which a barely trained encoder would overflow or divide by zero.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# The dims diffusers sums the KL (and by default the NLL) over, whatever the latents' rank:
# (B, C, H, W) gives (B,), but video's (B, C, T, H, W) gives (B, W), and audio's (B, C, T) raises.
_KL_DIMS = (1, 2, 3)


def _check_dims(dims: object, latents: torch.Tensor, method: str) -> tuple[int, ...]:
    """``dims`` as sorted non-negative dims of ``latents``; TypeError or ValueError if they are not."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, (list, tuple, range)) or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(f"{method} dims must be a sequence of ints, got {dims!r}")
    if not dims:
        raise ValueError(f"{method} dims must name at least one dim, got {tuple(dims)}")
    ndim = latents.dim()
    if any(not -ndim <= d < ndim for d in dims):
        raise ValueError(
            f"{method} sums over dims {tuple(dims)}, which latents of shape {shape_str(latents)} ({ndim} dims) do not "
            f"have; pass dims=, e.g. dims={tuple(range(1, ndim))} for each sample's total"
        )
    normalized = sorted(d % ndim for d in dims)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{method} dims name a dim twice: {tuple(dims)}")
    return tuple(normalized)


def _check_other(other: object) -> None:
    if other is not None and not (
        isinstance(getattr(other, "mean", None), torch.Tensor) and isinstance(getattr(other, "logvar", None), torch.Tensor)
    ):
        raise TypeError(
            f"other must be a Gaussian with mean and logvar tensors (a DiagonalGaussian, or diffusers' "
            f"DiagonalGaussianDistribution) or None for N(0, 1), got {type(other).__name__}"
        )


def _kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor, dims: tuple[int, ...], backend: str) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over ``dims``, in float32.

    Every dim but the first (each sample's total, diffusers' KL of image latents) is one pass of
    the fused per-sample KL on the latents as they lie, channels-last (3d) included; every dim,
    one pass of the fused sum. Any other dims (diffusers' 1..3 of video latents, leaving
    (B, W)) take the fused elementwise KL and a sum: reading the latents as rows of the kept
    indices would need a transposing copy of both halves and of their gradients, which measured
    2.4x slower, forward and backward, than the elementwise KL and the sum (29.5 ms against
    12.3 ms for Wan's 480p latents, (1, 16, 21, 60, 104), on an AMD EPYC, one thread).
    """
    kept = [d for d in range(mean.dim()) if d not in dims]
    if kept == [0]:
        return ops.kl_divergence(mean, logvar, reduction="per_sample", backend=backend)
    if not kept:
        return ops.kl_divergence(mean, logvar, reduction="sum", backend=backend)
    return ops.kl_divergence(mean, logvar, reduction="none", backend=backend).sum(dim=dims)


def philox_seed(generator: torch.Generator) -> int:
    """A Philox seed for the fused kernels drawn from ``generator``, which it advances.

    The seed is one ``torch.randint`` draw on the generator's own device, so re-seeding the
    generator (``manual_seed``, ``set_state``) reproduces the seed, and each call advances the
    generator as any torch draw does, so consecutive samples differ. For a CUDA generator the
    seed is read back to the host: one synchronisation per call that passes a generator.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    draw = torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=generator.device, generator=generator)
    return int(draw.item())


class DiagonalGaussian:
    """N(mean, exp(logvar)) per element, from moments ``parameters`` = cat([mean, logvar], dim=1).

    ``mean`` and ``logvar`` are the halves of ``parameters`` along dim 1 (``mean`` a view of it, as
    in diffusers; ``logvar`` clamped to [-30, 20]). ``backend`` (not in diffusers) picks the
    backend of the fused ops, as ``backend=`` does in :mod:`fastvae.ops`.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, *, backend: str = "auto") -> None:
        check_float_tensor("parameters", parameters)
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(
                "parameters must be the moments (B, 2C, ...): mean and logvar stacked along dim 1, "
                f"got shape {shape_str(parameters)}"
            )
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        self.parameters = parameters
        self.deterministic = deterministic
        self.backend = backend
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, with eps drawn inside the kernel.

        ``generator`` as in diffusers: None (the seed comes from torch's default generator, so
        ``torch.manual_seed`` makes runs reproducible, and ``torch.compile`` traces the draw), a
        ``torch.Generator``, or a list of one generator per sample (each seeds its own row).
        Each call advances ``generator`` by one draw (per generator in a list), deterministic
        distributions too, since diffusers' draws its noise either way: the generator's later
        draws do not depend on ``deterministic`` (they differ from diffusers', whose draw is
        ``mean.numel()`` normals). A deterministic distribution returns a copy of ``mean``.
        """
        batch = self.mean.shape[0]
        if isinstance(generator, (list, tuple)) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {batch}; pass one per sample")
        if isinstance(generator, (list, tuple)):
            seed = [philox_seed(g) for g in generator]
        else:
            seed = None if generator is None else philox_seed(generator)
        if self.deterministic:
            return self.mean.clone()
        if isinstance(seed, list):
            rows = zip(self.mean.split(1), self.logvar.split(1), seed)
            return torch.cat([self._reparameterize(mean, logvar, row_seed) for mean, logvar, row_seed in rows])
        return self._reparameterize(self.mean, self.logvar, seed)

    def _reparameterize(self, mean: torch.Tensor, logvar: torch.Tensor, seed: int | None) -> torch.Tensor:
        return ops.reparameterize(mean, logvar, seed=seed, backend=self.backend)

    def kl(self, other: "DiagonalGaussian | None" = None, *, dims: Sequence[int] = _KL_DIMS) -> torch.Tensor:
        """KL(self || other), summed over ``dims``: diffusers' 1, 2 and 3 unless given.

        That is each sample's total, (B,), for image latents (B, C, H, W), but (B, W) for video
        latents (B, C, T, H, W), as diffusers' class gives (``dims=(1, 2, 3, 4)`` for each
        sample's total); audio latents (B, C, T) need ``dims`` (diffusers' raises an IndexError).
        ``dims`` is fastvae's, not diffusers'.

        ``other=None`` is the standard normal prior, in float32: for the totals of each sample
        (image latents, or ``dims`` of every dim but the first) one pass of the fused per-sample
        KL with no elementwise intermediate; for other dims the fused elementwise KL and a sum
        (:func:`_kl_standard_normal` says why). ``kl().mean()`` of image latents equals
        ``fastvae.ops.kl_divergence(mean, logvar, reduction="batchmean")``; of video latents
        (B, C, T, H, W), ``kl_divergence(..., reduction="batchmean") / W``, which is how
        ``vae_loss`` takes diffusers' video loss in one pass (``beta=kl_weight / W``).

        With ``other`` (any object with ``mean`` and ``logvar``, diffusers' class too) no kernel
        fits, since the fused KL is against N(0, 1) only: it is the reference formula in
        PyTorch, which ``torch.compile`` fuses.
        """
        _check_other(other)
        dims = _check_dims(dims, self.mean, "kl")
        if self.deterministic:
            return self._zero()
        if other is None:
            return _kl_standard_normal(self.mean, self.logvar, dims, self.backend)
        if tuple(other.mean.shape) != tuple(self.mean.shape):
            raise ValueError(f"other has latents of shape {shape_str(other.mean)} but self has {shape_str(self.mean)}")
        if getattr(other, "deterministic", False):
            raise ValueError("other is deterministic (zero variance): the KL against it is infinite")
        acc = accumulate_dtype(self.mean.dtype)
        mean, logvar = self.mean.to(acc), self.logvar.to(acc)
        other_mean, other_logvar = other.mean.to(acc), other.logvar.to(acc)
        other_var = other_logvar.exp()
        elementwise = (mean - other_mean).pow(2) / other_var + logvar.exp() / other_var - 1.0 - logvar + other_logvar
        return 0.5 * elementwise.sum(dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = _KL_DIMS) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` (shaped as the latents) under this Gaussian,
        summed over ``dims``.

        Reference PyTorch (no fused kernel: training does not call it), in float32.
        """
        check_float_tensor("sample", sample)
        if sample.shape != self.mean.shape:
            raise ValueError(f"sample has shape {shape_str(sample)} but the latents have {shape_str(self.mean)}")
        if sample.device != self.mean.device:
            raise ValueError(f"sample is on {sample.device} but the latents are on {self.mean.device}")
        dims = _check_dims(dims, self.mean, "nll")
        if self.deterministic:
            return self._zero()
        acc = accumulate_dtype(self.mean.dtype)
        mean, logvar = self.mean.to(acc), self.logvar.to(acc)
        elementwise = math.log(2.0 * math.pi) + logvar + (sample.to(acc) - mean).pow(2) / logvar.exp()
        return 0.5 * elementwise.sum(dim=dims)

    def mode(self) -> torch.Tensor:
        return self.mean

    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, dtype=accumulate_dtype(self.mean.dtype), device=self.mean.device)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(latents {shape_str(self.mean)}, {self.mean.dtype}, deterministic={self.deterministic})"


class OobleckGaussian(DiagonalGaussian):
    """diffusers' ``OobleckDiagonalGaussianDistribution`` (AutoencoderOobleck, Cosmos3's audio
    tokenizer): N(mean, std^2) from moments ``cat([mean, scale], dim=1)``, std = softplus(scale)
    + 1e-4, no clamp.

    ``mean``, ``std``, ``var`` and ``logvar`` are diffusers' formulas, so the same bits;
    ``sample`` draws with the fused kernel from ``logvar`` (``exp(0.5 * logvar)`` is ``std`` to
    float rounding). ``kl`` is diffusers': twice the KL per element, summed over dim 1 and
    averaged over the rest, a scalar, taken from one fused sum. ``kl(other)`` is diffusers'
    formula as written, with ``+ logvar - other.logvar`` where the KL between Gaussians has
    ``- logvar + other.logvar``; it is zero against itself either way. diffusers' class has no
    ``nll``; this one has :class:`DiagonalGaussian`'s.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, *, backend: str = "auto") -> None:
        super().__init__(parameters, deterministic, backend=backend)
        self.mean, self.scale = torch.chunk(parameters, 2, dim=1)
        self._std = torch.nn.functional.softplus(self.scale) + 1e-4
        self._var = self._std * self._std
        self.logvar = torch.log(self._var)

    @property
    def std(self) -> torch.Tensor:
        return self._std

    @property
    def var(self) -> torch.Tensor:
        return self._var

    def kl(self, other: "OobleckGaussian | None" = None) -> torch.Tensor:
        _check_other(other)
        if self.deterministic:
            return self._zero()
        if other is None:
            total = ops.kl_divergence(self.mean, self.logvar, reduction="sum", backend=self.backend)
            # Twice the KL, averaged over every dim but 1: an empty batch gives nan, as a mean does.
            return total * 2.0 / (self.mean.numel() // self.mean.shape[1])
        if tuple(other.mean.shape) != tuple(self.mean.shape):
            raise ValueError(f"other has latents of shape {shape_str(other.mean)} but self has {shape_str(self.mean)}")
        acc = accumulate_dtype(self.mean.dtype)
        mean, logvar, other_logvar = self.mean.to(acc), self.logvar.to(acc), other.logvar.to(acc)
        other_var = other_logvar.exp()
        elementwise = (mean - other.mean.to(acc)).pow(2) / other_var + logvar.exp() / other_var + logvar - other_logvar - 1
        return elementwise.sum(1).mean()

    def __repr__(self) -> str:
        return f"OobleckGaussian(latents {shape_str(self.mean)}, {self.mean.dtype}, deterministic={self.deterministic})"
