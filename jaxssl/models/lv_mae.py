"""LV-MAE (Naiman et al., "LV-MAE: Learning Long Video Representations through Masked-Embedding Autoencoders", ICCV
2025): an MAE whose tokens are a long video's segment embeddings (from a frozen video encoder), masked and
reconstructed.

Laid out as the reference (amazon-science/lv-mae models_mae.py, `mae_vit_base_custom`):
- No patch embedding or input projection: each unit-norm segment embedding is a token, so the encoder's width is the
  embedding's (1,024). A cls token (N(0, 0.02)) in front; fixed 1-D sin-cos positions ([sin | cos], base 10,000;
  the cls row zeros, segment t at row t + 1) added to the visible tokens, which keep their time positions.
- Encoder: pre-norm ViT blocks (32 x 1,024, 16 heads, MLP ratio 4, exact GELU, LayerNorm eps 1e-6, qkv bias) over
  the cls and the visible segments (padding hidden from attention), a final LayerNorm.
- Decoder: Linear(width -> 512), a mask token (N(0, 0.02)) at every hidden segment, the sequence back in time order
  with the decoder's sin-cos positions, 8 x 512 blocks with 16 heads (positions past the video's length hidden from
  attention), LayerNorm, Linear(512 -> width): every segment's embedding.
Init: Xavier-uniform on every Linear (the fused qkv as one matrix), zero biases. jaxssl's attention has no k bias:
a k bias adds the same amount to all of a query's logits, so the softmax and the outputs do not depend on it.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import vit
from jaxssl.models.tjepa import sincos_table

VARIANTS: dict[str, dict[str, Any]] = {
    # the recommended command: encoder depth 32, 16 heads; decoder 8 x 512, 16 heads (the encoder is as wide as the
    # embeddings)
    'base': dict(depth=32, heads=16, dec_width=512, dec_depth=8, dec_heads=16),
    # CPU-sized, for tests and `runlocal` (not a reference size)
    'micro': dict(depth=2, heads=4, dec_width=32, dec_depth=1, dec_heads=4),
}
normal_02 = nn.initializers.normal(0.02)


def position_table(max_len: int, dim: int) -> np.ndarray:
    """(1 + max_len, dim): the cls row (zeros), then segment t's [sin | cos] row at t + 1."""
    return np.concatenate([np.zeros((1, dim), np.float32), sincos_table(max_len, dim)])


class LVMAE(nn.Module):
    """Segment embeddings (B, T, D) -> every segment's reconstruction (B, T, D), or encoded tokens (`encode`)."""

    width: int  # the embedding dimension
    depth: int
    heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    max_len: int = 256
    dtype: Any = jnp.float32

    def setup(self):
        common = dict(layer_norm_eps=1e-6, dtype=self.dtype)
        self.cls_token = self.param('cls_token', normal_02, (self.width,))
        self.encoder = vit.Transformer(self.width, self.depth, self.heads, 4 * self.width, **common, name='encoder')
        self.decoder_embed = nn.Dense(self.dec_width, kernel_init=vit.dense_init, dtype=self.dtype)
        self.mask_token = self.param('mask_token', normal_02, (self.dec_width,))
        self.decoder = vit.Transformer(
            self.dec_width, self.dec_depth, self.dec_heads, 4 * self.dec_width, **common, name='decoder'
        )
        self.decoder_pred = nn.Dense(self.width, kernel_init=vit.dense_init, dtype=self.dtype)

    def encode(self, embeddings: jax.Array, index: jax.Array, valid: jax.Array, train: bool = False) -> jax.Array:
        """Encoder output (B, 1 + K, width), cls first, on the segments at `index` (B, K) with their time positions;
        the invalid ones (valid False: padding) are hidden from attention."""
        chex.assert_rank([embeddings, index, valid], [3, 2, 2])
        table = jnp.asarray(position_table(self.max_len, self.width))
        tokens = vit.take_tokens(embeddings, index) + table[1:][index]
        b = embeddings.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, self.width)), tokens], axis=1)
        key_mask = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        x, _ = self.encoder(x, train, key_mask=key_mask)
        return x

    def __call__(
        self, embeddings: jax.Array, length: jax.Array, visible: jax.Array, valid: jax.Array, train: bool = False
    ) -> jax.Array:
        """embeddings (B, T, D) zero-padded, length (B,), visible (B, K) segment indices with valid (B, K) flags.
        Returns every segment's reconstruction (B, T, D) in float32 (positions past `length` are padding)."""
        b, t, _ = embeddings.shape
        encoded = self.decoder_embed(self.encode(embeddings, visible, valid, train))
        full = jnp.broadcast_to(self.mask_token.astype(encoded.dtype), (b, t, self.dec_width))
        full = vit.put_tokens(full, visible, valid, encoded[:, 1:])
        full = full + jnp.asarray(position_table(self.max_len, self.dec_width))[1 : t + 1].astype(full.dtype)
        x = jnp.concatenate([encoded[:, :1], full], axis=1)  # the cls's decoder position is the zero row
        key_mask = jnp.concatenate([jnp.ones((b, 1), bool), jnp.arange(t) < length[:, None]], axis=1)
        x, _ = self.decoder(x, train, key_mask=key_mask)  # ends with the decoder's LayerNorm
        return self.decoder_pred(x[:, 1:]).astype(jnp.float32)


def make_model(variant: str, width: int, **overrides: Any) -> LVMAE:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    return LVMAE(width=width, **{**VARIANTS[variant], **overrides})
