"""CroCo / CroCo v2 pretraining model (Weinzaepfel et al., "CroCo: Self-Supervised Pre-training for 3D Vision Tasks by
Cross-View Completion", NeurIPS 2022; "CroCo v2: Improved Cross-view Completion Pre-training for Stereo Matching and
Optical Flow", ICCV 2023).

Follows naver/croco models/croco.py and models/blocks.py (shared/reference/methods/mae_siammae_cropmae_croco.md,
section 4): one ViT encoder (no cls token) runs on view 1's visible patches (raster order) and on all of view 2; a
shared `decoder_embed` projects both; view 1's stream is a mask-token grid with its visible tokens scattered back;
each decoder block is pre-norm

  x += SA(LN1 x);  x += CA(LN2 x, LNy y, LNy y);  x += MLP(LN3 x)      (y, view 2's tokens, passes through unchanged)

then `dec_norm` and a linear `prediction_head` to every patch's pixels. Positions: 'rope' (v2, RoPE100) rotates
queries and keys in the encoder's self-attention, the decoder's self-attention and its cross-attention (queries at
view 1's positions, keys at view 2's) and adds nothing to the tokens; 'cosine' (v1) adds MAE's fixed 2-D sin-cos
table to the encoder input and to both decoder streams.

Reused layers: vit.Transformer (encoder; RoPE through its `positions`), vit.Attention and vit.Mlp (decoder
self-attention, MLP), cropmae.MultiHeadAttention (cross-attention: separate q, k, v projections as the reference's
projq / projk / projv, RoPE through its positions). The reference's key biases are dropped, as everywhere here: a key
bias adds the same q . b_k to a whole row of logits, which softmax cancels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import cropmae, mae, vit

POSITIONS = ('rope', 'cosine')

# width, depth, heads, mlp_ratio (encoder); dec_width, dec_depth, dec_heads (decoder, MLP ratio as the encoder's);
# patch. Names are '<encoder>+<decoder>' after the released checkpoints (README.MD): CroCo.pth and
# CroCo_V2_ViTBase_SmallDecoder are B+S, CroCo_V2_ViTBase_BaseDecoder B+B, CroCo_V2_ViTLarge_BaseDecoder L+B.
_FIELDS = ('width', 'depth', 'heads', 'mlp_ratio', 'dec_width', 'dec_depth', 'dec_heads', 'patch')
_TABLE = {
    'micro': (64, 2, 4, 4.0, 32, 1, 2, 16),  # tests and `runlocal` on a CPU; not a reference size
    'tiny': (128, 4, 4, 4.0, 64, 2, 4, 16),  # CPU demos; not a reference size
    'B+S': (768, 12, 12, 4.0, 512, 8, 16, 16),
    'B+B': (768, 12, 12, 4.0, 768, 12, 12, 16),
    'L+B': (1024, 24, 16, 4.0, 768, 12, 12, 16),
}
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _TABLE.items()}


def decode_variant(variant: str) -> dict[str, Any]:
    """'B+S', 'L+B/16' or 'micro/4' -> CroCoPretrain size fields. Raises ValueError listing valid names."""
    return mae.decode_variant(variant, VARIANTS)


def num_masked(num_tokens: int, ratio: float) -> int:
    """Tokens CroCo masks in view 1: int(ratio * L) (RandomMask's num_mask; 196 at 0.9 -> 176, 20 visible), which is
    not MAE's rounding (int(L * (1 - ratio)) kept: 19 visible)."""
    masked = int(ratio * num_tokens)
    if not 0 <= masked < num_tokens:
        raise ValueError(f'mask ratio {ratio} masks {masked} of {num_tokens} tokens; at least one must stay visible')
    return masked


def num_visible(num_tokens: int, ratio: float) -> int:
    """Tokens of view 1 the encoder sees: L - num_masked(L, ratio)."""
    return num_tokens - num_masked(num_tokens, ratio)


class DecoderBlock(nn.Module):
    """The reference's pre-norm DecoderBlock: self-attention on view 1's tokens, cross-attention to view 2's (normed
    by this block's own `norm_y`), MLP; optional RoPE positions for both streams, optional drop path."""

    width: int
    heads: int
    mlp_hidden: int
    layer_norm_eps: float = 1e-6
    rope_base: float | None = 100.0  # None: no RoPE (CroCo v1's cosine positions are added outside the blocks)
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        y: jax.Array,
        x_positions: jax.Array | None = None,
        y_positions: jax.Array | None = None,
        drop_path_rate: float = 0.0,
        train: bool = False,
    ) -> jax.Array:
        chex.assert_axis_dimension(x, 2, self.width)
        chex.assert_axis_dimension(y, 2, self.width)
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)

        def residual(branch: jax.Array) -> jax.Array:
            if train and drop_path_rate > 0:
                return vit.drop_path(branch, drop_path_rate, self.make_rng('drop_path'))
            return branch

        rope = self.rope_base is not None
        base = self.rope_base or 100.0
        self_attention = vit.Attention(
            self.width, self.heads, True, self.dtype, self.attention_impl, rope_base=base, name='attn'
        )
        x = x + residual(self_attention(norm('norm1')(x), x_positions if rope else None))
        y_normed = norm('norm_y')(y)
        cross = cropmae.MultiHeadAttention(self.width, self.heads, 0.0, self.dtype, base, name='cross_attn')
        attended = cross(norm('norm2')(x), y_normed, train, *((x_positions, y_positions) if rope else (None, None)))
        x = x + residual(attended)
        return x + residual(vit.Mlp(self.mlp_hidden, self.dtype, name='mlp')(norm('norm3')(x)))


class CroCoPretrain(nn.Module):
    """Cross-view completion: `__call__(views, ids_keep, ids_restore)` with views (B, 2, H, W, C), view 0 (the
    target) seen through `ids_keep` (B, n) (its visible tokens in raster order), view 1 seen whole; returns
    predictions (B, L, patch * patch * C) of view 0's patches in float32 and intermediates {'encoded': view 0's
    encoder output (B, n, width), 'memory': view 1's (B, L, width)}. `ids_restore` (B, L) puts the [visible,
    masked] token list back in raster order (jaxssl.masks.croco_masking_from_noise).

    `encode(images, ids_keep=None)` runs the encoder (after its norm) on the chosen or all tokens, for probes.
    """

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    dec_mlp_hidden: int
    patch: int = 16
    channels: int = 3
    pos_embed: str = 'rope'  # 'rope' (CroCo v2) or 'cosine' (v1)
    rope_base: float = 100.0
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        if self.pos_embed not in POSITIONS:
            raise ValueError(f"unknown pos_embed '{self.pos_embed}'; valid: {', '.join(POSITIONS)}")
        # The patch kernel's reference init (xavier on its (width, p*p*C) view) is applied by `init_params`.
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
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
            rope_base=self.rope_base,
        )  # ends with the reference's enc_norm
        self.decoder_embed = nn.Dense(self.dec_width, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.dec_width))
        self.decoder_blocks = [
            DecoderBlock(
                self.dec_width,
                self.dec_heads,
                self.dec_mlp_hidden,
                self.layer_norm_eps,
                self.rope_base if self.pos_embed == 'rope' else None,
                self.dtype,
                self.attention_impl,
                name=f'decoder_block_{i:02d}',
            )
            for i in range(self.dec_depth)
        ]
        self.dec_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.prediction_head = nn.Dense(
            self.patch * self.patch * self.channels, dtype=self.dtype, kernel_init=vit.dense_init
        )

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        chex.assert_rank(images, 4)
        if images.shape[1] % self.patch or images.shape[2] % self.patch:
            raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch {self.patch}')
        return images.shape[1] // self.patch, images.shape[2] // self.patch

    def encode(
        self, images: jax.Array, ids_keep: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encoder output (B, n, width) on the `ids_keep` tokens (raster order expected) or (B, L, width) on all."""
        grid = self._grid(images)
        positions = jnp.asarray(vit.grid_positions(*grid))
        tokens = self.patch_embed(images, ids_keep)  # only the kept patches are embedded (per-patch: same tokens)
        if ids_keep is not None:
            chex.assert_rank(ids_keep, 2)
            chex.assert_axis_dimension(ids_keep, 0, images.shape[0])
            positions = positions[ids_keep]  # (B, n, 2)
        if self.pos_embed == 'cosine':
            table = jnp.asarray(mae.sincos_2d_table(*grid, self.width))
            table = table if ids_keep is None else table[ids_keep]
            tokens = tokens + table.astype(tokens.dtype)
            positions = None
        x, intermediates = self.encoder(tokens, train, positions)
        return x, dict(intermediates, encoded=x)

    def decode(
        self,
        encoded: jax.Array,
        memory: jax.Array,
        ids_restore: jax.Array,
        grid: tuple[int, int],
        train: bool = False,
    ) -> jax.Array:
        """Predictions (B, L, patch * patch * C) in float32 of view 1's patches from its encoder output (B, n, D),
        view 2's (B, L, D) and the inverse of the [visible, masked] order (B, L)."""
        chex.assert_rank([encoded, memory, ids_restore], [3, 3, 2])
        chex.assert_equal_shape_prefix([encoded, memory, ids_restore], 1)
        num_tokens = grid[0] * grid[1]
        chex.assert_axis_dimension(ids_restore, 1, num_tokens)
        chex.assert_axis_dimension(memory, 1, num_tokens)
        x = self.decoder_embed(encoded)
        batch, kept = x.shape[:2]
        # The reference scatters the visible tokens into a grid of mask tokens (f1_[~masks1] = visf1); with the
        # visible tokens in raster order that is MAE's unshuffle of [visible, mask tokens] by ids_restore.
        masked = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_tokens - kept, self.dec_width))
        x = jnp.take_along_axis(jnp.concatenate([x, masked], axis=1), ids_restore[..., None], axis=1)
        y = self.decoder_embed(memory)  # the same projection for both streams, as the reference
        positions = jnp.asarray(vit.grid_positions(*grid))
        if self.pos_embed == 'cosine':
            table = jnp.asarray(mae.sincos_2d_table(*grid, self.dec_width)).astype(x.dtype)
            x, y = x + table, y + table
        rates = np.linspace(0.0, self.drop_path_rate, self.dec_depth)
        for rate, block in zip(rates, self.decoder_blocks, strict=True):
            x = block(x, y, positions, positions, float(rate), train)
        prediction = self.prediction_head(self.dec_norm(x)).astype(jnp.float32)
        chex.assert_shape(prediction, (batch, num_tokens, self.patch * self.patch * self.channels))
        return prediction

    def __call__(
        self, views: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank([views, ids_keep, ids_restore], [5, 2, 2])
        chex.assert_axis_dimension(views, 1, 2)
        grid = self._grid(views[:, 0])
        # Shared weights: the same encoder on view 1 through its mask and on the whole of view 2.
        encoded, intermediates = self.encode(views[:, 0], ids_keep, train)
        memory, _ = self.encode(views[:, 1], None, train)
        prediction = self.decode(encoded, memory, ids_restore, grid, train)
        return prediction, dict(intermediates, memory=memory)


def init_params(
    model: CroCoPretrain, rng: jax.Array, views: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array
) -> dict[str, Any]:
    """model.init with the reference's patch-embedding init (xavier_uniform on the kernel's (width, p*p*C) view)."""
    init_rng, patch_rng = jax.random.split(rng)
    params = jax.tree.map(lambda x: x, model.init(init_rng, views, ids_keep, ids_restore)['params'])  # a copy
    proj = params['patch_embed']['proj']
    proj['kernel'] = mae.reference_patch_kernel(patch_rng, proj['kernel'].shape)
    return params


def make_pretrain_model(variant: str, **overrides: Any) -> CroCoPretrain:
    """A CroCoPretrain of a named size ('B+S', 'B+B', 'L+B', 'micro', 'tiny'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(CroCoPretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown CroCoPretrain fields: {sorted(unknown)}')
    return CroCoPretrain(**{**decode_variant(variant), **overrides})
