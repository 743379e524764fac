"""G-SimCLR's denoising convolutional autoencoder (ariG23498/G-SimCLR, CIFAR10/Autoencoder.ipynb).

Encoder: per width, Conv 3x3 (same) + BatchNorm + ReLU + MaxPool 2x2; the last block's output (the reference's
`retrieval` layer) is the latent, and its global average pool the feature that k-means clusters. Decoder, mirrored:
per width in reverse, Conv 3x3 + BatchNorm + ReLU + UpSampling 2x (nearest, as Keras' UpSampling2D); then Conv 3x3 to
the image's channels and a sigmoid, so reconstructions are in [0, 1]. Gaussian noise (the reference's
GaussianNoise(0.01), active in training only) is added to the [0, 1] input before encoding. BatchNorm keeps running
statistics (Keras momentum 0.99) for the latent at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


class DenoisingAutoencoder(nn.Module):
    """Images in [0, 1] (B, S, S, C) -> (reconstruction (B, S, S, C) in [0, 1], {'latent': (B, D)})."""

    widths: Sequence[int] = (32, 64, 128)
    kernel: int = 3
    noise_std: float = 0.01
    bn_momentum: float = 0.99  # Keras' BatchNormalization default

    def _block(self, x: jax.Array, width: int, name: str, train: bool) -> jax.Array:
        x = nn.Conv(width, (self.kernel, self.kernel), padding='SAME', name=f'{name}_conv')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-3, name=f'{name}_bn')(x)
        return nn.relu(x)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank(images, 4)
        size, channels = images.shape[1], images.shape[3]
        if size % 2 ** len(self.widths):
            raise ValueError(f'image size {size} must be divisible by 2^{len(self.widths)} (one pool per width)')
        x = images.astype(jnp.float32)
        if train and self.noise_std > 0:
            x = x + self.noise_std * jax.random.normal(self.make_rng('noise'), x.shape)
        for i, width in enumerate(self.widths):
            x = self._block(x, width, f'encoder_{i}', train)
            x = nn.max_pool(x, (2, 2), (2, 2))
        latent = x.mean(axis=(1, 2))
        for i, width in enumerate(reversed(self.widths)):
            x = self._block(x, width, f'decoder_{i}', train)
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = nn.Conv(channels, (self.kernel, self.kernel), padding='SAME', name='output')(x)
        reconstruction = nn.sigmoid(x)
        chex.assert_equal_shape((reconstruction, images))
        return reconstruction, {'latent': latent}


def dae_loss(reconstruction: jax.Array, clean: jax.Array) -> jax.Array:
    """The reference's MSE between the reconstruction and the clean (noise-free) image, over every pixel."""
    chex.assert_equal_shape((reconstruction, clean))
    return jnp.mean((reconstruction.astype(jnp.float32) - clean.astype(jnp.float32)) ** 2)
