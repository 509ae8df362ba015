"""The classic convolutional VAE (the CelebA 64x64 recipe), running its latent path and loss on fastvae.ops."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import nn

from fastvae import ops
from fastvae._checks import RECONS, shape_str

# The encoder stops halving once the feature map is this small, so small images get fewer blocks.
_MIN_FEATURE_SIZE = 4


class LossParts(NamedTuple):
    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def _num_blocks(image_size: int, requested: int) -> int:
    halvings_to_min = (image_size // _MIN_FEATURE_SIZE).bit_length() - 1
    return min(requested, halvings_to_min)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


class VAE(nn.Module):
    """Conv VAE: ``x_hat, mu, logvar = model(x)`` for images ``x`` of shape (N, C, S, S) in [0, 1].

    Encoder: Conv2d(k4, s2, p1) blocks halving the size and taking the channels of ``hidden_dims``,
    BatchNorm (not on the first block) and ReLU, then Linear layers to ``mu`` and ``logvar``.
    Decoder: Linear, reshape, ConvTranspose2d(k4, s2, p1) blocks with BatchNorm and ReLU, and a last
    ConvTranspose2d to the image channels with a Sigmoid. ``image_size`` is any power of two from
    16 up; the number of blocks shrinks so the smallest feature map stays 4x4.

    ``recon`` is the reconstruction term :meth:`loss` uses (see :func:`fastvae.ops.vae_loss`).
    With "bce_logits" the decoder ends without its Sigmoid: the model's ``x_hat`` are logits, and
    :meth:`sample`, :meth:`reconstruct` and :meth:`interpolate` apply the Sigmoid. The Sigmoid has
    no parameters, so the ``state_dict`` is the same for every ``recon``.

    ``backend`` ("auto", "reference", "triton", "cpp") picks the implementation of the sampling and
    of :meth:`loss` (see :mod:`fastvae.ops`); with "triton", which has no loss kernel, the loss uses
    "auto". The parameters, and so the ``state_dict``, are the same whatever the backend.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        latent_dim: int = 128,
        hidden_dims: Sequence[int] = (64, 128, 256, 512),
        backend: str = "auto",
        recon: str = "mse",
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("latent_dim", latent_dim)
        _check_positive_int("image_size", image_size)
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two from 16 up, got {image_size}")
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one block's channels, got ()")
        for h in hidden_dims:
            _check_positive_int("each of hidden_dims", h)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, ops.BACKENDS))}, got {backend!r}")
        if recon not in RECONS:
            raise ValueError(f"recon must be one of {', '.join(map(repr, RECONS))}, got {recon!r}")

        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.hidden_dims = hidden_dims
        self.backend = backend
        self.recon = recon

        dims = hidden_dims[: _num_blocks(image_size, len(hidden_dims))]
        self._feature_shape = (dims[-1], image_size >> len(dims), image_size >> len(dims))
        flat = dims[-1] * self._feature_shape[1] * self._feature_shape[2]

        encoder: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], 4, 2, 1), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(dims, dims[1:]):
            encoder += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)

        self.decoder_input = nn.Linear(latent_dim, flat)
        decoder: list[nn.Module] = []
        for c_in, c_out in zip(dims[::-1], dims[::-1][1:]):
            decoder += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        decoder += [nn.ConvTranspose2d(dims[0], in_channels, 4, 2, 1)]
        if recon != "bce_logits":
            decoder += [nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    @property
    def config(self) -> dict:
        """The constructor arguments that fix the architecture and the loss (not the backend).

        ``recon`` is there only when it is not the default "mse", so the configs of checkpoints
        written before it existed still match (and resume) an "mse" model's.
        """
        config = {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims),
        }
        if self.recon != "mse":
            config["recon"] = self.recon
        return config

    def _check_images(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = (self.in_channels, self.image_size, self.image_size)
        # The dtype is the tensor's metadata: checking it asks nothing of the device, and a
        # compiled model checks it once, while tracing.
        if not x.is_floating_point():
            raise TypeError(
                f"x must be floating-point images in [0, 1] of shape (N, {', '.join(map(str, expected))}), "
                f"got a {x.dtype} tensor (for 8-bit pixels, pass x.float() / 255)"
            )
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images (N, {', '.join(map(str, expected))}), got shape {shape_str(x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the model expects {self.in_channels}")
        if tuple(x.shape[2:]) != expected[1:]:
            raise ValueError(
                f"x has images of size {x.shape[2]}x{x.shape[3]} but the model expects "
                f"{self.image_size}x{self.image_size}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(x)
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output for latents ``z``: images, or logits with ``recon="bce_logits"``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {shape_str(z)}")
        h = self.decoder_input(z).view(-1, *self._feature_shape)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_hat, mu, logvar)``; z is sampled in train mode and is ``mu`` in eval mode."""
        mu, logvar = self.encode(x)
        if self.training:
            z = ops.reparameterize(mu, logvar, backend=self.backend)
        else:
            z = mu
        return self.decode(z), mu, logvar

    def loss(
        self,
        x: torch.Tensor,
        *,
        beta: float = 1.0,
        reduction: str = "sum",
        recon_reduction: str | None = None,
        kl_reduction: str | None = None,
    ) -> LossParts:
        """The negative ELBO of ``x``: ``(loss, recon, kl)`` as in :func:`fastvae.ops.vae_loss`,
        with the model's ``recon``."""
        x_hat, mu, logvar = self(x)
        backend = "auto" if self.backend == "triton" else self.backend
        # Under autocast the decoder's output may be lower precision than the batch: vae_loss
        # computes the pair in the promoted dtype, as torch's losses do.
        return LossParts(
            *ops.vae_loss(
                x_hat, x, mu, logvar, beta=beta, reduction=reduction, recon=self.recon,
                recon_reduction=recon_reduction, kl_reduction=kl_reduction, backend=backend,
            )
        )

    def _decode_images(self, z: torch.Tensor) -> torch.Tensor:
        """Images decoded from ``z``, whatever the decoder's output is."""
        decoded = self.decode(z)
        return torch.sigmoid(decoded) if self.recon == "bce_logits" else decoded

    def _inference(self, fn, *args):
        # Sampling utilities run in eval mode so BatchNorm uses (and does not update) its running stats.
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            self.train(was_training)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``n`` latents drawn from the prior N(0, I)."""
        _check_positive_int("n", n)
        param = self.decoder_input.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=generator.device if generator else "cpu")
        return self._inference(self._decode_images, z.to(device=param.device, dtype=param.dtype))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image of ``x``."""
        return self._inference(lambda x: self._decode_images(self.encode(x)[0]), x)

    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode ``steps`` points on the line between the posterior means of ``x1`` and ``x2``.

        For single images (C, H, W) the result is (steps, C, H, W); for batches (N, C, H, W) it is
        (N, steps, C, H, W).
        """
        _check_positive_int("steps", steps)
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        single = x1.dim() == 3
        if single:
            x1, x2 = x1.unsqueeze(0), x2.unsqueeze(0)

        def run(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
            if x1.shape[0] != x2.shape[0]:
                raise ValueError(f"x1 has {x1.shape[0]} images but x2 has {x2.shape[0]}")
            mu1, mu2 = self.encode(x1)[0], self.encode(x2)[0]
            t = torch.linspace(0, 1, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, 1)
            z = torch.lerp(mu1.unsqueeze(1), mu2.unsqueeze(1), t).flatten(0, 1)
            return self._decode_images(z).unflatten(0, (x1.shape[0], steps))

        out = self._inference(run, x1, x2)
        return out[0] if single else out

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu"
    ) -> VAE:
        """The trained model in a checkpoint of ``fastvae train`` (its ``--out``/ckpt.pt), in eval mode.

        The checkpoint's digest is checked first. A file that is damaged, not a checkpoint, or
        holds weights its config does not describe raises
        :class:`fastvae.checkpoint.CheckpointError` (a ValueError), in one line naming the file.
        """
        from fastvae.checkpoint import load_model

        return load_model(path, backend=backend, device=device)[0]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` (:attr:`config`) and ``model.safetensors`` (the weights) into
        ``folder``, made if missing, as diffusers and the Hub lay out a model; returns the folder."""
        from fastvae import pretrained

        return pretrained.save(self, folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu"
    ) -> VAE:
        """The model :meth:`save_pretrained` (or ``fastvae export``) wrote into ``folder``, in eval
        mode. The weights load without pickle; a missing, damaged or mismatched file raises
        :class:`fastvae.checkpoint.CheckpointError`, in one line naming it."""
        from fastvae import pretrained

        return pretrained.load(folder, backend=backend, device=device)
