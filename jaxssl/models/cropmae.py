"""CropMAE / SiamMAE pretraining model (Eymaël et al. 2024, "Efficient Image Pre-Training with Siamese Cropped Masked
Autoencoders"; Gupta et al. 2023, "Siamese Masked Autoencoders").

One ViT encoder (MAE's: jaxssl.models.mae.MAEPretrain.encode, shared weights) runs on two views of the same scene:
the first view unmasked (cls + every token, raster order), the second masked very hard (98.5% for CropMAE, 95% for
SiamMAE) through MAE's per-sample shuffle indices. The decoder follows the reference (alexandre-eymael/CropMAE
models/SiamMAE.py and models/components/DecoderBlock.py; shared/reference/methods/mae_siammae_cropmae_croco.md):

  query  = unshuffle([decoder_embed(enc(view2)), mask tokens]) + decoder sin-cos positions (cls row zero)
  memory = decoder_embed(enc(view1)), cls included, with no decoder positions and no norm
  block  = post-norm, cross-attention -> FFN -> self-attention:
           x = LN2(x + CA(x, memory)); x = LN3(x + FFN(x)); x = LN1(x + SA(x))
  then decoder_norm, decoder_pred, and the cls output dropped.

Attention is torch's nn.MultiheadAttention less its key bias (it never changes the output; see MultiHeadAttention):
q, k, v projections, dropout on the attention weights; the
FFN has a fixed hidden width (2048 in the reference) and dropout after its GELU; each residual branch has dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae, vit

# width, depth, heads, mlp_ratio (encoder); dec_width, dec_depth, dec_heads, dec_ffn (decoder); patch.
# S/16 with the 256-wide, 4-block, 8-head decoder and the fixed 2048 FFN is the reference's default (misc/util.py).
_FIELDS = ('width', 'depth', 'heads', 'mlp_ratio', 'dec_width', 'dec_depth', 'dec_heads', 'dec_ffn', 'patch')
_TABLE = {
    'micro': (64, 2, 4, 4.0, 32, 1, 2, 64, 16),  # tests and `runlocal` on a CPU; not a reference size
    'tiny': (128, 4, 4, 4.0, 64, 2, 4, 256, 16),  # CPU demos; not a reference size
    'S': (384, 12, 6, 4.0, 256, 4, 8, 2048, 16),
    'B': (768, 12, 12, 4.0, 256, 4, 8, 2048, 16),
}
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _TABLE.items()}


def decode_variant(variant: str) -> dict[str, Any]:
    """'S', 'S/16' or 'micro/4' -> CropMAEPretrain size fields. Raises ValueError listing valid names."""
    spec = mae.decode_variant(variant, VARIANTS)  # MAE's parser on CropMAE's table
    # MAEPretrain's own decoder fields are unused here; dec_mlp_hidden carries the cross decoder's FFN width.
    spec['dec_mlp_hidden'] = spec.pop('dec_ffn')
    return spec


class MultiHeadAttention(nn.Module):
    """torch's nn.MultiheadAttention (batch first): q from `x`, k and v from `memory`, q and v biases, dropout on
    the attention weights, then the output projection. Self-attention is `memory = x`.

    With `x_positions` (B, Nq, 2) and `memory_positions` (B, Nk, 2) (token (row, col)), queries and keys get 2-D
    RoPE (vit.rope_2d, base `rope_base`: CroCo v2's cross-attention); without, nothing changes."""

    width: int
    heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    rope_base: float = 100.0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array,
        train: bool = False,
        x_positions: jax.Array | None = None,
        memory_positions: jax.Array | None = None,
    ) -> jax.Array:
        chex.assert_rank([x, memory], 3)
        chex.assert_equal_shape_prefix([x, memory], 1)
        if self.width % self.heads:
            raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')
        head_dim = self.width // self.heads

        def project(inputs: jax.Array, name: str) -> jax.Array:
            # No key bias (as vit.Attention): it adds q . b_k to a whole row of logits, which softmax cancels, so
            # its gradient is zero up to rounding and Adam would turn that rounding noise into lr-sized steps.
            dense = nn.Dense(
                self.width, use_bias=name != 'key', dtype=self.dtype, kernel_init=vit.dense_init, name=name
            )
            y = dense(inputs)
            return y.reshape(*y.shape[:2], self.heads, head_dim)

        q, k, v = project(x, 'query'), project(memory, 'key'), project(memory, 'value')
        if (x_positions is None) != (memory_positions is None):
            raise ValueError('RoPE needs the positions of both the queries and the memory')
        if x_positions is not None:
            q, k = vit.rope_2d(q, x_positions, self.rope_base), vit.rope_2d(k, memory_positions, self.rope_base)
        # Softmax in float32 for bf16 stability; written out (not jax.nn.dot_product_attention) because the
        # reference drops attention weights, which the fused kernels cannot do.
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * head_dim**-0.5
        weights = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.softmax(logits, axis=-1))
        out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v).reshape(*x.shape[:2], self.width)
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init, name='out')(out)


class CrossDecoderBlock(nn.Module):
    """The reference's post-norm decoder block: cross-attention to the memory, FFN, then self-attention."""

    width: int
    heads: int
    ffn_hidden: int
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_axis_dimension(x, 2, self.width)
        chex.assert_axis_dimension(memory, 2, self.width)
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
        attention = lambda name: MultiHeadAttention(self.width, self.heads, self.dropout, self.dtype, name=name)
        # Norm names follow the reference (norm2 after the cross-attention, norm3 after the FFN, norm1 last) so a
        # converted checkpoint maps one to one.
        x = norm('norm2')(x + drop(attention('cross_attn')(x, memory, train)))
        hidden = nn.Dense(self.ffn_hidden, dtype=self.dtype, kernel_init=vit.dense_init, name='fc1')(x)
        hidden = drop(nn.gelu(hidden, approximate=False))  # exact GELU, as torch's nn.GELU
        x = norm('norm3')(
            x + drop(nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init, name='fc2')(hidden))
        )
        return norm('norm1')(x + drop(attention('self_attn')(x, x, train)))


class CropMAEPretrain(mae.MAEPretrain):
    """Siamese MAE: `__call__(views, ids_keep, ids_restore)` with views (B, 2, H, W, C), view 0 seen whole and view 1
    through `ids_keep` (B, n); returns predictions (B, L, patch * patch * C) for view 1 in float32 and intermediates
    {'encoded': view 1's encoder output (B, 1 + n, width), 'memory': view 0's (B, 1 + L, width)}.

    The encoder's parameters (patch_embed, cls_token, encoder) carry MAE's names, so `encode` is MAE's and an
    encoder trained here loads wherever an MAE encoder does. `dec_mlp_hidden` is the decoder FFN's width.
    """

    dropout: float = 0.1

    def setup(self):
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
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
        self.decoder_embed = nn.Dense(self.dec_width, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.dec_width))
        self.decoder_blocks = [
            CrossDecoderBlock(
                self.dec_width,
                self.dec_heads,
                self.dec_mlp_hidden,
                self.dropout,
                self.layer_norm_eps,
                self.dtype,
                name=f'decoder_block_{i:02d}',
            )
            for i in range(self.dec_depth)
        ]
        self.decoder_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.decoder_pred = nn.Dense(
            self.patch * self.patch * self.channels, dtype=self.dtype, kernel_init=vit.dense_init
        )

    def decode_pair(
        self, encoded: jax.Array, memory: jax.Array, ids_restore: jax.Array, train: bool = False
    ) -> jax.Array:
        """Predictions (B, L, patch * patch * C) in float32 of the masked view from its encoder output (B, 1 + n, D)
        and the unmasked view's (B, 1 + L', D) (its length need not equal L)."""
        chex.assert_rank([encoded, memory, ids_restore], [3, 3, 2])
        chex.assert_equal_shape_prefix([encoded, memory, ids_restore], 1)
        num_tokens = ids_restore.shape[1]
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f'ids_restore has {num_tokens} tokens, not a square grid')
        x = self.decoder_embed(encoded)
        batch, kept = x.shape[0], x.shape[1] - 1
        # As MAE: [visible tokens in shuffle order, mask tokens] unshuffled to raster order; cls stays in front and
        # gets no position (the reference's cls row of the table is zeros).
        masked = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_tokens - kept, self.dec_width))
        tokens = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], axis=1), ids_restore[..., None], axis=1)
        tokens = tokens + jnp.asarray(mae.sincos_2d_table(side, side, self.dec_width)).astype(x.dtype)
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        # The memory is only projected: no decoder positions (the encoder's own positions are already in it).
        memory = self.decoder_embed(memory)
        for block in self.decoder_blocks:
            x = block(x, memory, train)
        prediction = self.decoder_pred(self.decoder_norm(x)[:, 1:]).astype(jnp.float32)
        chex.assert_shape(prediction, (batch, num_tokens, self.patch * self.patch * self.channels))
        return prediction

    def __call__(
        self, views: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank([views, ids_keep, ids_restore], [5, 2, 2])
        chex.assert_axis_dimension(views, 1, 2)
        chex.assert_axis_dimension(ids_restore, 1, (views.shape[2] // self.patch) * (views.shape[3] // self.patch))
        # Shared weights: the same encoder on both views, the first whole, the second through its mask.
        memory, _ = self.encode(views[:, 0], None, train)
        encoded, intermediates = self.encode(views[:, 1], ids_keep, train)
        prediction = self.decode_pair(encoded, memory, ids_restore, train)
        return prediction, dict(intermediates, memory=memory)


def make_pretrain_model(variant: str, **overrides: Any) -> CropMAEPretrain:
    """A CropMAEPretrain of a named size ('S', 'B', 'micro', 'tiny'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(CropMAEPretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown CropMAEPretrain fields: {sorted(unknown)}')
    return CropMAEPretrain(**{**decode_variant(variant), **overrides})
