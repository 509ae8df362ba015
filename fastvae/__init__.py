"""fastvae: fused GPU kernels for training variational autoencoders, and a drop-in conv VAE."""

from fastvae import ops, reference
from fastvae._extension import extension_error
from fastvae.distributions import DiagonalGaussian
from fastvae.model import VAE

__all__ = ["VAE", "DiagonalGaussian", "ops", "reference", "extension_error"]
__version__ = "0.1.0"
