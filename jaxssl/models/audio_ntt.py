"""BYOL-A's AudioNTT2020 encoder with UNFUSED's exits (Sreyan88/LAPE, src/encoder/audiontt.py `AudioNTT2020Task6` and
src/upstream/unfused/upstream_expert.py).

Encoder, for a log-mel (B, T, mel) (torch's (B, 1, mel, T)): `blocks` x [Conv 3x3 (padding 1, bias) -> BatchNorm ->
ReLU -> MaxPool 2x2]; after each block the feature map is laid out as frames (B, T', mel' x channels), flattened
mel-major (index mel' * channels + channel, torch's permute(0, 3, 2, 1)), and its time average is that block's exit
x_i (2048, 1024, 512 values for 64 mels and 64 channels). The last block's frames go through fc: Linear -> ReLU ->
Dropout(0.3) -> Linear -> ReLU, per frame (B, T'', width); the clip embedding is their max over time plus their
mean over time.

UNFUSED's heads: one `Project` per exit (Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, every Linear of
width `classes` and without bias) and a linear classifier (with bias) on the clip embedding.

Initialisation is torch's default (uniform +-1/sqrt(fan_in) for every Linear and Conv kernel and bias; BatchNorm
scale 1, offset 0, momentum 0.1, eps 1e-5), as the reference leaves it.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models.vit import conv_init, torch_bias_init


def torch_linear(features: int, fan_in: int, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    bias_init = torch_bias_init(fan_in) if use_bias else nn.initializers.zeros
    return nn.Dense(features, use_bias=use_bias, kernel_init=conv_init, bias_init=bias_init, name=name)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """torch's BatchNorm defaults (running averages move 0.1 towards each batch's statistics)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class AudioNTT(nn.Module):
    """(B, T, mel) log-mel -> (clip embedding (B, width), exits [(B, mel_i * channels)] per block, frames
    (B, T'', width))."""

    channels: int = 64
    blocks: int = 3
    width: int = 2048  # the reference's d
    dropout: float = 0.3

    @nn.compact
    def __call__(self, spectrogram: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array], jax.Array]:
        chex.assert_rank(spectrogram, 3)
        x = jnp.swapaxes(spectrogram, 1, 2)[..., None]  # (B, mel, T, 1): torch's (B, 1, mel, T) as NHWC
        exits = []
        for i in range(self.blocks):
            fan_in = 9 * x.shape[-1]
            x = nn.Conv(
                self.channels,
                (3, 3),
                padding=1,
                kernel_init=conv_init,
                bias_init=torch_bias_init(fan_in),
                name=f'conv{i + 1}',
            )(x)
            x = nn.relu(batch_norm(train, f'bn{i + 1}')(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            frames = jnp.swapaxes(x, 1, 2)  # (B, T', mel', C)
            frames = frames.reshape(*frames.shape[:2], -1)  # index mel' * C + c, as the reference's flatten
            exits.append(jnp.mean(frames, axis=1))
        h = nn.relu(torch_linear(self.width, frames.shape[-1], name='fc1')(frames))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.relu(torch_linear(self.width, self.width, name='fc2')(h))
        embedding = jnp.max(h, axis=1) + jnp.mean(h, axis=1)
        return embedding, exits, h


class Project(nn.Module):
    """UNFUSED's exit head: three bias-free Linears of width `classes`, BN + ReLU between them; logits out."""

    classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 2)
        for i in range(2):
            x = torch_linear(self.classes, x.shape[-1], use_bias=False, name=f'fc{i + 1}')(x)
            x = nn.relu(batch_norm(train, f'bn{i + 1}')(x))
        return torch_linear(self.classes, x.shape[-1], use_bias=False, name='fc3')(x)


class Unfused(nn.Module):
    """The student with its heads: (clip logits (B, classes), exit logits [(B, classes)] per block, embedding,
    exits)."""

    classes: int
    channels: int = 64
    blocks: int = 3
    width: int = 2048
    dropout: float = 0.3

    def setup(self):
        self.encoder = AudioNTT(self.channels, self.blocks, self.width, self.dropout)
        self.heads = [Project(self.classes, name=f'project{i + 1}') for i in range(self.blocks)]
        self.classifier = torch_linear(self.classes, self.width, name='classifier')

    def __call__(self, spectrogram: jax.Array, train: bool = False):
        embedding, exits, _ = self.encoder(spectrogram, train)
        exit_logits = [head(x, train) for head, x in zip(self.heads, exits, strict=True)]
        return self.classifier(embedding), exit_logits, embedding, exits

    def encode(self, spectrogram: jax.Array) -> tuple[jax.Array, list[jax.Array], jax.Array]:
        """The encoder alone, with running BatchNorm statistics and no dropout."""
        return self.encoder(spectrogram, False)
