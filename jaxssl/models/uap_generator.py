"""AdvEncoder's generator of one universal adversarial pattern (CGCL-codes/AdvEncoder model/adv_gan.py).

A DCGAN generator maps a fixed batch of B noise vectors to B images (ConvTranspose 4x4 from 1x1 to 4x4, then
stride-2 ConvTransposes doubling the size, BatchNorm + ReLU after each hidden layer, tanh out), and a 3x3
convolution whose input channels are the B images reduces them to one pattern (the reference's `residual_layer`,
run on the batch axis as channels). So the output size is 4 x 2^len(filters) (64 for the reference's four
filters), and the generator is tied to B. All weights N(0, 0.02), biases 0; BatchNorm always uses the batch's
statistics (the reference never switches the generator to evaluation mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

INIT = nn.initializers.normal(0.02)


def conv_transpose(features: int, stride: int, padding: int, name: str) -> nn.ConvTranspose:
    """torch.nn.ConvTranspose2d(kernel 4, stride, padding): XLA's transposed convolution with the kernel flipped
    (transpose_kernel) and k - 1 - padding on each side; the kernel is (4, 4, out, in)."""
    pad = 4 - 1 - padding
    return nn.ConvTranspose(features, (4, 4), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                            transpose_kernel=True, kernel_init=INIT, bias_init=nn.initializers.zeros,
                            name=name)  # fmt: skip


class PatternGenerator(nn.Module):
    """(B, noise_dim) noise -> (S, S, 3) pattern in [-1, 1]-ish (tanh, then the reduction conv)."""

    filters: Sequence[int] = (1024, 512, 256, 128)

    @nn.compact
    def __call__(self, noise: jax.Array) -> jax.Array:
        chex.assert_rank(noise, 2)
        x = noise[:, None, None, :]
        for i, width in enumerate(self.filters):
            x = conv_transpose(width, 1 if i == 0 else 2, 0 if i == 0 else 1, f'deconv_{i}')(x)
            # torch BatchNorm2d in training mode (batch statistics; running averages kept but never read).
            x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, name=f'bn_{i}')(x))
        images = jnp.tanh(conv_transpose(3, 2, 1, 'out')(x))  # (B, S, S, 3)
        # The B images as the input channels of one 3x3 convolution, per colour channel: (3, S, S, B) -> (3, S, S, 1).
        per_colour = jnp.transpose(images, (3, 1, 2, 0))
        reduced = nn.Conv(1, (3, 3), padding=1, kernel_init=INIT, bias_init=nn.initializers.zeros,
                          name='reduce')(per_colour)  # fmt: skip
        return jnp.transpose(reduced[..., 0], (1, 2, 0))
