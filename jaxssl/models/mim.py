"""A convolutional Mutual Information Machine for images (MIM, Livne et al. 2019; cMIM, Livne 2024): a Gaussian
encoder q(z|x), a Bernoulli pixel decoder p(x|z), and the decoder's hidden states for cMIM's informative embeddings.

Encoder: per width, Conv 3x3 stride 2 (same) + GELU; flatten; Dense(hidden) + GELU; Dense(2 x latent) split into the
mean and the log scale (log sigma, clamped from below at -6 as the cMIM reference clamps it: a floor that keeps
log q(z|x) finite while MIM's entropy term pushes the scale down). Decoder, mirrored: Dense(hidden) + GELU,
Dense(grid^2 x widths[-1]) + GELU, per width in reverse a ConvTranspose 3x3 stride 2 + GELU (the last to widths[0]),
then Conv 3x3 to per-pixel Bernoulli logits. No normalisation layers: a sample's latent and its embeddings never
depend on the rest of the batch.

The cMIM papers do not give their image network (shared/reference notes); this one is ours, small enough for 32 x 32
MNIST-like images.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

MIN_LOG_SCALE = -6.0  # the cMIM reference's floor on log sigma


class MIM(nn.Module):
    """Images in [0, 1] (B, S, S, C) -> q(z|x) parameters; z -> pixel logits and the decoder's hidden states."""

    image_size: int = 32
    channels: int = 3
    widths: Sequence[int] = (32, 64, 128)
    hidden: int = 512
    latent: int = 64

    @property
    def grid(self) -> int:
        """The side of the encoder's last feature map (and of the decoder's first)."""
        return self.image_size // 2 ** len(self.widths)

    def setup(self):
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f'image size {self.image_size} must be divisible by 2^{len(self.widths)}')
        self.encoder_convs = [nn.Conv(w, (3, 3), strides=(2, 2), padding='SAME') for w in self.widths]
        self.encoder_hidden = nn.Dense(self.hidden)
        self.posterior = nn.Dense(2 * self.latent)
        self.decoder_hidden = nn.Dense(self.hidden)
        self.decoder_grid = nn.Dense(self.grid**2 * self.widths[-1])
        outs = [*reversed(self.widths[:-1]), self.widths[0]]
        self.decoder_convs = [nn.ConvTranspose(w, (3, 3), strides=(2, 2), padding='SAME') for w in outs]
        self.output = nn.Conv(self.channels, (3, 3), padding='SAME')

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, log scale), each (B, latent); the log scale floored at MIN_LOG_SCALE."""
        chex.assert_shape(images, (None, self.image_size, self.image_size, self.channels))
        x = images.astype(jnp.float32)
        for conv in self.encoder_convs:
            x = nn.gelu(conv(x))
        x = nn.gelu(self.encoder_hidden(x.reshape(x.shape[0], -1)))
        mean, log_scale = jnp.split(self.posterior(x), 2, axis=-1)
        return mean, jnp.maximum(log_scale, MIN_LOG_SCALE)

    def decode(self, z: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(pixel logits (B, S, S, C), the decoder's hidden states: (B, hidden), then one (B, s, s, width) map per
        layer, coarse to fine)."""
        chex.assert_shape(z, (None, self.latent))
        h = nn.gelu(self.decoder_hidden(z))
        x = nn.gelu(self.decoder_grid(h)).reshape(z.shape[0], self.grid, self.grid, self.widths[-1])
        states = [h, x]
        for conv in self.decoder_convs:
            x = nn.gelu(conv(x))
            states.append(x)
        return self.output(x), states

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Init / a deterministic pass: (mean, log scale, pixel logits decoded from the mean)."""
        mean, log_scale = self.encode(images)
        logits, _ = self.decode(mean)
        return mean, log_scale, logits
