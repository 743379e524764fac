"""MP3 pretraining model (Zhai et al., "Position Prediction as an Effective Pretraining Strategy", ICML 2022).

A ViT with NO position embedding (and no cls token): patch tokens carry content only. A random subset of the tokens
is the context; in every block all tokens query but only the context tokens are keys and values (the reference's
masked context; vit.Attention's `num_context`), and a linear head classifies each token's own position among the
N patch positions. Tokens come in shuffle order, [context..., rest...], from `ids_shuffle` (B, N) made per sample
in the input pipeline, so the context is a static prefix and every shape is static.

Without position embeddings the encoder is permutation-equivariant: permuting the input tokens (within the context
and within the rest) permutes its outputs (tests/test_mp3.py checks it). Fine-tuning would add position embeddings
back (the paper's recipe); this module only pretrains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import vit


class MP3Pretrain(nn.Module):
    """`__call__(images, ids_shuffle, num_context)` -> (position logits (B, N, N) float32, one row per token in
    shuffle order, intermediates {'encoded': (B, N, width) final-normed tokens in that order, ...}). With
    `ids_shuffle=None` the tokens are in raster order and all of them are context (for probes)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int = 16
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, images: jax.Array, ids_shuffle: jax.Array | None = None, num_context: int = 0, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank(images, 4)
        grid = mae_model.token_grid(images.shape[1], self.patch)
        num_tokens = grid[0] * grid[1]
        if ids_shuffle is not None:
            chex.assert_shape(ids_shuffle, (images.shape[0], num_tokens))
            if not 0 < num_context <= num_tokens:
                raise ValueError(f'num_context {num_context} must be in [1, {num_tokens}]')
        tokens = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype, name='patch_embed')(
            images, ids_shuffle
        )
        # No position embedding: the only position signal is the label.
        encoder = vit.Transformer(
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
            num_context=num_context if ids_shuffle is not None else 0,
            name='encoder',
        )
        x, intermediates = encoder(tokens, train)
        logits = nn.Dense(num_tokens, dtype=self.dtype, kernel_init=vit.dense_init, name='head')(x)
        return logits.astype(jnp.float32), dict(intermediates, encoded=x)


def make_pretrain_model(variant: str, **overrides: Any) -> MP3Pretrain:
    """An MP3Pretrain of a size from MAE's table (its encoder fields; the decoder fields are unused)."""
    spec = mae_model.decode_variant(variant)
    fields = {f.name for f in dataclasses.fields(MP3Pretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown MP3Pretrain fields: {sorted(unknown)}')
    sizes = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return MP3Pretrain(**{**sizes, **overrides})
