"""The 2-D UNet of Chaitanya et al. 2020 (krishnabits001/domain_specific_cl models.py, layers_bn.py) and its two
contrastive heads, as separate modules so each training stage holds only what it trains:

- UNetEncoder: L levels of two (3x3 conv + bias -> BatchNorm -> ReLU), 2x2 max-pooling between levels
  (reference: 16, 32, 64, 128, 128, 128 channels on 192 x 192 slices, a 6 x 6 x 128 bottleneck).
- UNetDecoder: up to L - 1 blocks, each a x2 nearest-neighbour upsampling, a 2x2 conv + BN + ReLU, the
  concatenation with the encoder level's output, then two 3x3 conv + BN + ReLU (the last block, at full
  resolution: one). Block k's params are named `block_k` whether the decoder has 3 blocks (the local stage) or all
  of them (segmentation), so a fine-tuning run takes the pretrained ones by name.
- SegmentationHead: two 3x3 conv + BN + ReLU of channels[0] and a 3x3 conv to the classes without bias.
- GlobalHead (g1): the flattened bottleneck -> Dense 1024 + ReLU -> Dense 128, both without bias.
- LocalHead (g2): 1x1 conv (no bias) + BN + ReLU -> 1x1 conv (no bias), then each fixed 3x3 region of the map
  flattened (H, W, C order) through a shared Dense 128 without bias.

BatchNorm as the reference's own layer: batch statistics in training, biased variance, epsilon 1e-3, running
averages with decay 0.99. Conv kernels are He-normal (std sqrt(2 / fan_in), the reference's 'xavier' helper),
biases zero; dense layers Glorot-uniform (tf.layers.dense's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HE_NORMAL = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # untruncated, as the reference's
GLOROT_UNIFORM = nn.initializers.xavier_uniform()  # tf.layers.dense's default


class ConvBlock(nn.Module):
    """k x k conv (+ bias) -> BatchNorm -> ReLU, the reference's conv2d_layer(..., batch_norm=True, relu=True)."""

    features: int
    kernel: int = 3
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Flax's SAME padding of an even kernel puts the extra zero after, as TF's does (the 2x2 conv).
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding='SAME', kernel_init=HE_NORMAL, name='conv')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-3, name='norm')(x)
        return nn.relu(x)


class UNetEncoder(nn.Module):
    """(N, H, W, C) -> (bottleneck (N, H / 2^(L-1), W / 2^(L-1), channels[-1]), the levels' outputs before pooling,
    first level first: the decoder's skips)."""

    channels: Sequence[int]
    momentum: float = 0.99  # the BatchNorm averages' decay (0: the last batch's statistics)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        chex.assert_rank(images, 4)
        x, skips = images, []
        for level, width in enumerate(self.channels):
            if level:
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = ConvBlock(width, momentum=self.momentum, name=f'level{level}_a')(x, train)
            x = ConvBlock(width, momentum=self.momentum, name=f'level{level}_b')(x, train)
            skips.append(x)
        return x, skips[:-1]


class UNetDecoder(nn.Module):
    """(bottleneck, skips) -> the output of the `blocks`-th decoder block (all L - 1 by default)."""

    channels: Sequence[int]
    blocks: int = 0
    momentum: float = 0.99

    @nn.compact
    def __call__(self, bottleneck: jax.Array, skips: Sequence[jax.Array], train: bool = False) -> jax.Array:
        total = len(self.channels) - 1
        blocks = self.blocks or total
        x = bottleneck
        for k in range(blocks):
            level = total - 1 - k  # the encoder level whose skip this block joins
            width = self.channels[level]
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # x2 nearest neighbour (exact, no corner alignment)
            x = ConvBlock(width, kernel=2, momentum=self.momentum, name=f'block{k}_up')(x, train)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = ConvBlock(width, momentum=self.momentum, name=f'block{k}_a')(x, train)
            if level:  # the reference's last block has a single conv
                x = ConvBlock(width, momentum=self.momentum, name=f'block{k}_b')(x, train)
        return x


class SegmentationHead(nn.Module):
    """The full-resolution decoder output -> class logits (N, H, W, classes)."""

    width: int
    classes: int
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ConvBlock(self.width, momentum=self.momentum, name='conv_a')(x, train)
        x = ConvBlock(self.width, momentum=self.momentum, name='conv_b')(x, train)
        return nn.Conv(self.classes, (3, 3), padding='SAME', use_bias=False, kernel_init=HE_NORMAL, name='logits')(x)


class GlobalHead(nn.Module):
    """g1: the bottleneck (N, h, w, c) flattened -> (N, dim)."""

    hidden: int = 1024
    dim: int = 128

    @nn.compact
    def __call__(self, bottleneck: jax.Array) -> jax.Array:
        x = bottleneck.reshape(bottleneck.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, use_bias=False, kernel_init=GLOROT_UNIFORM, name='hidden')(x))
        return nn.Dense(self.dim, use_bias=False, kernel_init=GLOROT_UNIFORM, name='out')(x)


class LocalHead(nn.Module):
    """g2 and the region embedding: a decoder map (N, H, W, C) and region top-left corners (R, 2) (3 x 3 regions)
    -> (N, R, dim)."""

    dim: int = 128
    region: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, corners: np.ndarray, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        x = nn.Conv(width, (1, 1), use_bias=False, kernel_init=HE_NORMAL, name='conv_a')(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name='norm')(x))
        x = nn.Conv(width, (1, 1), use_bias=False, kernel_init=HE_NORMAL, name='conv_b')(x)
        r = self.region
        regions = jnp.stack([x[:, i : i + r, j : j + r, :] for i, j in np.asarray(corners)], axis=1)
        regions = regions.reshape(*regions.shape[:2], r * r * width)
        return nn.Dense(self.dim, use_bias=False, kernel_init=GLOROT_UNIFORM, name='embed')(regions)
