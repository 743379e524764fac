"""The ConvNet of the dataset-distillation literature (DC / DSA / MTT / KRR-ST): blocks of Conv 3x3 (stride 1,
padding 1) -> norm -> ReLU -> AvgPool 2x2, then the flattened map (`embed`) and a Linear head.

KRR-ST's (db-Lee/selfsup_dd models/convnet.py) takes one width per block (`convnet_128_256_512_bn`: 128, 256 and
512 channels, BatchNorm) and the fc maps the flattened embedding to the teacher's representation size. Weights and
biases use torch's default init (uniform +-1/sqrt(fan_in)): KRR-ST's kernels are those of freshly initialised and
briefly trained networks, so their initial distribution is part of the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models.vit import conv_init, torch_bias_init, torch_dense

NORMS = ('batch', 'instance', 'none')


class ConvNet(nn.Module):
    """(N, H, W, C) float32 -> (embedding (N, H / 2^L * W / 2^L * channels[-1]), head output (N, outputs));
    `outputs` 0 gives no head (the head output is then the embedding)."""

    channels: Sequence[int] = (128, 256, 512)
    outputs: int = 0
    norm: str = 'batch'

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(images, 4)
        x = images
        for i, width in enumerate(self.channels):
            fan_in = 9 * x.shape[-1]
            x = nn.Conv(width, (3, 3), padding=1, kernel_init=conv_init, bias_init=torch_bias_init(fan_in),
                        name=f'conv_{i}')(x)  # fmt: skip
            if self.norm == 'batch':
                # torch BatchNorm2d: momentum 0.1 (Flax's 0.9), eps 1e-5, batch statistics in training. The running
                # variance follows the biased batch variance (torch's the unbiased one: 1 / (n - 1) apart).
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f'norm_{i}')(x)
            elif self.norm == 'instance':
                # torch InstanceNorm2d(affine=True): per image and channel over the spatial axes, eps 1e-5.
                x = nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, name=f'norm_{i}')(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2))
        # Flatten in torch's (C, H, W) order, so a head converted from the reference reads the same features.
        embedding = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        if not self.outputs:
            return embedding, embedding
        return embedding, torch_dense(self.outputs, embedding.shape[-1], name='fc')(embedding)
