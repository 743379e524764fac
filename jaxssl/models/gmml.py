"""GMML / SiT model: a ViT that encodes the WHOLE corrupted image and reconstructs its pixels (Atito et al., SiT
2021 and "GMML is All you Need" 2022; shared/reference/methods/cae_gmml_sit_mp3_selfie.md).

Tokens: `task_tokens` learned tokens in front of the patches (GMML: one cls token; SiT v1: a rotation token and a
contrastive token), a learned position table over all of them, then jaxssl.models.vit blocks and a final LayerNorm.
Reconstruction reads the mean of the outputs of `recons_blocks` (1-indexed, -1 the last; before the final
norm), applies the final norm, drops the task tokens and runs the reference's RECHead: `head_layers` x (Linear,
GELU) (GMML: 3; SiT v1: 0), then ConvTranspose2d(width, C, kernel = stride = patch), which on non-overlapping
patches is one Linear to the patch's p * p * C pixels with a bias per channel (not per pixel), unpatchified. SiT's
heads (Linear(width, 4) on the rotation token, Linear(width, contrastive_dim) on the contrastive token) read the
final-norm output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import mae as mae_model
from jaxssl.models import vit

# The reference's Linear init (timm trunc_normal_(std=.02), cut at +-2 absolute: no cut in practice).
head_init = nn.initializers.normal(0.02)


class ReconstructionHead(nn.Module):
    """RECHead: tokens (B, L, D) -> pixels (B, H, W, C) in float32."""

    layers: int
    patch: int
    channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        chex.assert_rank(tokens, 3)
        width = tokens.shape[-1]
        x = tokens
        for i in range(self.layers):
            x = nn.gelu(nn.Dense(width, dtype=self.dtype, kernel_init=head_init, name=f'mlp_{i}')(x), approximate=False)
        # torch's ConvTranspose2d default init: uniform(+-1/sqrt(fan_in)), fan_in from weight dim 1: C * p * p.
        bound = 1 / np.sqrt(self.channels * self.patch * self.patch)
        uniform = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
        kernel = self.param('conv_transpose_kernel', uniform, (width, self.patch * self.patch * self.channels))
        bias = self.param('conv_transpose_bias', uniform, (self.channels,))
        pixels = jnp.dot(x, kernel.astype(x.dtype)).astype(jnp.float32)
        # patches (row, col, channel) with the channel fastest: the bias repeats over the p * p pixels.
        pixels = pixels + jnp.tile(bias, self.patch * self.patch)
        return mae_model.unpatchify(pixels, grid, self.patch)


class GMMLModel(nn.Module):
    """`__call__(images, train)` -> (reconstruction (B, H, W, C) float32, outputs, intermediates). outputs holds
    'encoded' (B, T + L, width) after the final norm (T = task_tokens) and, when configured, 'rotation' (B, 4) and
    'contrastive' (B, contrastive_dim) logits in float32, and SiT's 'task_weights'."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int = 16
    channels: int = 3
    task_tokens: int = 1
    recons_blocks: tuple[int, ...] = (6, 8, 10, 12)
    head_layers: int = 3
    rotation_classes: int = 0
    contrastive_dim: int = 0
    task_weights: int = 0  # SiT's learned uncertainty weights s_t, one per task, init 1 (a 1-D parameter: no decay)
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array], dict]:
        chex.assert_rank(images, 4)
        grid = mae_model.token_grid(images.shape[1], self.patch)
        chex.assert_axis_dimension(images, 2, images.shape[1])
        tokens = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype, name='patch_embed')(images)
        batch, num_patches = tokens.shape[:2]
        task = self.param('task_tokens', head_init, (1, self.task_tokens, self.width))
        x = jnp.concatenate([jnp.broadcast_to(task.astype(tokens.dtype), (batch, *task.shape[1:])), tokens], axis=1)
        pos = self.param('pos_embed', head_init, (1, self.task_tokens + num_patches, self.width))
        x = x + pos.astype(x.dtype)
        # final_norm off: the one norm below serves both the last block's output and the reconstruction's mean.
        x, intermediates = vit.Transformer(
            self.width,
            self.depth,
            self.heads,
            self.mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            final_norm=False,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name='encoder',
        )(x, train)
        norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='norm')
        encoded = norm(x)
        numbers = [b - 1 if b > 0 else self.depth + b for b in self.recons_blocks]  # 1-indexed; -1: the last
        recons = sum(intermediates[f'block_{i:02d}'] for i in numbers) / len(numbers)
        recons = norm(recons)[:, self.task_tokens :]
        pixels = ReconstructionHead(self.head_layers, self.patch, self.channels, self.dtype, name='rec_head')(
            recons, grid
        )
        outputs = {'encoded': encoded}
        if self.rotation_classes:
            dense = nn.Dense(self.rotation_classes, dtype=self.dtype, kernel_init=head_init, name='rotation_head')
            outputs['rotation'] = dense(encoded[:, 0]).astype(jnp.float32)
        if self.contrastive_dim:
            dense = nn.Dense(self.contrastive_dim, dtype=self.dtype, kernel_init=head_init, name='contrastive_head')
            outputs['contrastive'] = dense(encoded[:, 1]).astype(jnp.float32)
        if self.task_weights:
            outputs['task_weights'] = self.param('task_weights', nn.initializers.ones, (self.task_weights,))
        return pixels, outputs, intermediates


def make_model(variant: str, **overrides: Any) -> GMMLModel:
    """A GMMLModel of a named encoder size from jaxssl.models.mae's table ('S', 'B', 'micro', ...; '/patch')."""
    spec = mae_model.decode_variant(variant)
    fields = {f.name for f in dataclasses.fields(GMMLModel)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown GMMLModel fields: {sorted(unknown)}')
    encoder = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return GMMLModel(**{**encoder, **overrides})
