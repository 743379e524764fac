"""MMC model (Wu et al., "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding", arXiv 2308.11448):
one ViT that reads a masked view (masked patches replaced by a learned mask token, every position kept, as
SimMIM / GMML: the patch-level losses need an output at every masked position), a linear pixel head on the patch
outputs, a projection MLP on every token and a prediction MLP on the projections (the student's only, as BYOL /
MoCo v3), both with batch-statistics normalisation as MoCo v3's heads. The EMA teacher is the same module's
parameters run on the unmasked view up to the projection.

Layers and the 2-D sin-cos positions come from jaxssl.models.vit and jaxssl.models.mae; the size table is MAE's
(`mae.decode_variant`; the decoder fields are unused).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae, vit


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the tokens passed in (every axis but the features), always, and a
    learned scale and bias: MoCo v3's train-mode BN in the heads, with no running averages to keep (the heads are
    never used at evaluation). Under jit the mean spans the global batch whatever the mesh."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
        bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x32, axis=axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


class ProjectionMLP(nn.Module):
    """Linear -> batch norm -> GELU -> Linear, without biases. The batch norm matters: a random-init ViT gives nearly
    the same cls token for every image, and only batch statistics spread them apart enough for the contrast to start
    (with a per-token LayerNorm the runlocal contrast stayed at chance, docs/methods.md)."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # No biases (MoCo v3's heads have none): a bias before the norm is removed by the batch mean, and the
        # projector's output bias only feeds the predictor's norm, so both would get exactly zero gradients, which
        # Adam turns into full-size steps of rounding noise that differ between meshes.
        x = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, kernel_init=vit.dense_init)(x)
        x = nn.gelu(BatchStatNorm()(x), approximate=False)
        return nn.Dense(self.out, use_bias=False, dtype=self.dtype, kernel_init=vit.dense_init)(x)


class MMCModel(nn.Module):
    """`__call__(images, mask)` -> dict of float32 outputs: 'encoded' (B, 1 + L, width) the encoder output (cls first),
    'pixels' (B, L, patch * patch * C) the pixel prediction of every patch, 'proj' (B, 1 + L, head_out) and 'pred'
    (B, 1 + L, head_out). `teacher(images)` -> 'encoded' and 'proj' of the unmasked images (no predictor)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int = 16
    channels: int = 3
    head_hidden: int = 2048
    head_out: int = 256
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
        self.encoder = vit.Transformer(
            self.width,
            self.depth,
            self.heads,
            self.mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        pixels = self.patch * self.patch * self.channels
        self.pixel_head = nn.Dense(pixels, dtype=self.dtype, kernel_init=vit.dense_init)
        self.projector = ProjectionMLP(self.head_hidden, self.head_out, self.dtype)
        self.predictor = ProjectionMLP(self.head_hidden, self.head_out, self.dtype)

    def encode(self, images: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Encoder output (B, 1 + L, width), cls first; `mask` (B, L), nonzero = replaced by the mask token."""
        chex.assert_rank(images, 4)
        grid = mae.token_grid(images.shape[1], self.patch)
        tokens = self.patch_embed(images)
        if mask is not None:
            chex.assert_shape(mask, (images.shape[0], grid[0] * grid[1]))
            tokens = jnp.where(mask[..., None] > 0, self.mask_token.astype(tokens.dtype), tokens)
        tokens = tokens + jnp.asarray(mae.sincos_2d_table(*grid, self.width)).astype(tokens.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        x, _ = self.encoder(jnp.concatenate([cls, tokens], axis=1), train)
        return x

    def head(self, module: nn.Module, tokens: jax.Array) -> jax.Array:
        """A head on (B, 1 + L, D) tokens with separate batch statistics for the cls token and the patches."""
        return jnp.concatenate([module(tokens[:, :1]), module(tokens[:, 1:])], axis=1)

    def teacher(self, images: jax.Array) -> dict[str, jax.Array]:
        encoded = self.encode(images)
        return {'encoded': encoded.astype(jnp.float32), 'proj': self.head(self.projector, encoded).astype(jnp.float32)}

    def __call__(self, images: jax.Array, mask: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        encoded = self.encode(images, mask, train)
        proj = self.head(self.projector, encoded)
        return {
            'encoded': encoded.astype(jnp.float32),
            'pixels': self.pixel_head(encoded[:, 1:]).astype(jnp.float32),
            'proj': proj.astype(jnp.float32),
            'pred': self.head(self.predictor, proj).astype(jnp.float32),
        }


def init_params(model: MMCModel, rng: jax.Array, images: jax.Array, mask: jax.Array) -> dict[str, Any]:
    """model.init with MAE's reference patch-embedding init (xavier on the flattened conv kernel)."""
    init_rng, patch_rng = jax.random.split(rng)
    params = jax.tree.map(lambda x: x, model.init(init_rng, images, mask)['params'])  # a copy
    proj = params['patch_embed']['proj']
    proj['kernel'] = mae.reference_patch_kernel(patch_rng, proj['kernel'].shape)
    return params


def make_model(variant: str, **overrides: Any) -> MMCModel:
    """An MMCModel of a named MAE size ('B', 'L', 'micro', ...; '/patch' optional)."""
    spec = mae.decode_variant(variant)
    fields = {f.name for f in dataclasses.fields(MMCModel)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown MMCModel fields: {sorted(unknown)}')
    kept = {k: v for k, v in spec.items() if k in fields}
    return MMCModel(**{**kept, **overrides})
