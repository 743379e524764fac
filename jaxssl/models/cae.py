"""CAE pretraining model (Chen et al., "Context Autoencoder for Self-Supervised Representation Learning", IJCV 2023).

Follows the reference ContextAutoencoderViT (Atten4Vis/CAE models/modeling_cae.py, modeling_cae_helper.py;
shared/reference/methods/cae_gmml_sit_mp3_selfie.md):
- encoder: a ViT with layer scale on cls + the visible patches only, fixed 2-D sin-cos positions (cls row zero);
- latent contextual regressor: cross-attention blocks whose queries are a learned mask token + the masked patches'
  positions, and whose keys / values are [visible latents; the queries themselves] (keys with positions, values
  without); the visible latents are never updated; a final LayerNorm;
- alignment target: the same encoder (current weights, not an EMA: the reference aliases its alignment encoder to the
  encoder's tensors) run on cls + the masked patches, in train mode, cls dropped, under stop-gradient;
- decoder: pre-LN self-attention blocks over the predicted masked latents only (positions added again), LayerNorm,
  and a linear head. The reference's head predicts DALL-E token ids (8192 classes); this one predicts each masked
  patch's pixels (MAE's target), since no DALL-E tokenizer is available offline.
Masks come in as index arrays (jaxssl.masks.block_masking + mask_to_ids): `ids_keep` (B, n) visible tokens and
`ids_masked` (B, m) masked tokens, both ascending, so every shape is static.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import mae, vit

# The size table lives here only: encoder width / depth / heads / MLP ratio; the regressor's and decoder's width
# and heads (shared, as the reference's decoder_embed_dim / decoder_num_heads), regressor depth, decoder depth; the
# patch. B and L follow scripts/cae_base_*.sh and cae_large_1600e.sh (as intended: decoder width 1024, 16 heads).
_FIELDS = ('width', 'depth', 'heads', 'mlp_ratio', 'dec_width', 'dec_heads', 'reg_depth', 'dec_depth', 'patch')
_TABLE = {
    'micro': (64, 2, 4, 4.0, 64, 4, 1, 1, 16),  # tests and `runlocal` on a CPU; not a reference size
    'tiny': (128, 4, 4, 4.0, 128, 4, 2, 2, 16),  # CPU demos; not a reference size
    'B': (768, 12, 12, 4.0, 768, 12, 4, 4, 16),
    'L': (1024, 24, 16, 4.0, 1024, 16, 4, 4, 16),
}
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _TABLE.items()}


def decode_variant(variant: str) -> dict[str, Any]:
    """'B', 'B/16' or 'micro/4' -> CAEPretrain size fields. Raises ValueError listing valid names."""
    return mae.decode_variant(variant, VARIANTS)  # MAE's parser on CAE's table


def sincos_table(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """CAE's fixed 2-D table (grid_h * grid_w, dim), raster order: [sin(r w), cos(r w), sin(c w), cos(c w)] with
    r the token's row and c its column (the reference meshgrids (w, h) with 'ij' indexing, so its `out_w` half is
    the row). MAE's table puts the column first, so this is MAE's with its two halves swapped."""
    table = mae.sincos_2d_table(grid_h, grid_w, dim)
    return np.concatenate([table[:, dim // 2 :], table[:, : dim // 2]], axis=1)


class CrossAttention(nn.Module):
    """The reference's CrossAttention: separate q, k, v projections without biases, plus a q bias and a v bias
    (no k bias), scaled dot-product attention, output projection."""

    width: int
    heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array) -> jax.Array:
        chex.assert_rank([queries, keys, values], 3)
        chex.assert_equal_shape([keys, values])
        if self.width % self.heads:
            raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')

        def project(x: jax.Array, name: str, bias: bool) -> jax.Array:
            y = nn.Dense(self.width, use_bias=False, dtype=self.dtype, kernel_init=vit.dense_init, name=name)(x)
            if bias:
                y = y + self.param(f'{name}_bias', nn.initializers.zeros, (self.width,)).astype(y.dtype)
            return y.reshape(*y.shape[:2], self.heads, -1)

        q, k, v = project(queries, 'q', True), project(keys, 'k', False), project(values, 'v', True)
        out = vit.dot_product_attention(q, k, v, self.attention_impl).reshape(*queries.shape[:2], self.width)
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init, name='proj')(out)


class RegressorBlock(nn.Module):
    """x = q + DP(g1 * CA(LN_q(q + p_q), LN_k(kv + p_kv), LN_v(kv))); x = LN(x); x = x + DP(g2 * MLP(x))."""

    width: int
    heads: int
    mlp_hidden: int
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        queries: jax.Array,
        context: jax.Array,
        pos_q: jax.Array,
        pos_context: jax.Array,
        drop_path_rate: float = 0.0,
        train: bool = False,
    ) -> jax.Array:
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)

        def residual(branch: jax.Array, name: str) -> jax.Array:
            # The reference keeps a frozen gamma of ones when its init value is 0: no scaling.
            if self.layer_scale_init > 0:
                gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (self.width,))
                branch = branch * gamma.astype(branch.dtype)
            if train and drop_path_rate > 0:
                branch = vit.drop_path(branch, drop_path_rate, self.make_rng('drop_path'))
            return branch

        # No bias on the key norm: it shifts every key of a query's row by the same W_k b, which softmax cancels,
        # so its gradient is zero up to rounding (Adam would turn that noise into lr-sized steps); as vit.Attention
        # drops the key bias. The reference has it; it never changes the output (a converter would drop it).
        key_norm = nn.LayerNorm(self.layer_norm_eps, use_bias=False, dtype=self.dtype, name='norm1_k')
        attended = CrossAttention(self.width, self.heads, self.dtype, self.attention_impl, name='cross_attn')(
            norm('norm1_q')(queries + pos_q), key_norm(context + pos_context), norm('norm1_v')(context)
        )
        x = norm('norm2_cross')(queries + residual(attended, 'gamma_1_cross'))
        return x + residual(vit.Mlp(self.mlp_hidden, self.dtype, name='mlp_cross')(x), 'gamma_2_cross')


class CAEPretrain(nn.Module):
    """CAE encoder, latent contextual regressor and decoder.

    `__call__(images, ids_keep, ids_masked, train)` returns the decoder's predictions (B, m, num_outputs) in float32
    for the masked patches (in `ids_masked` order) and intermediates: 'encoded' (B, 1 + n, width) the encoder's
    output (cls first), 'latent_pred' (B, m, dec_width) the regressor's output and 'latent_target' (B, m, dec_width)
    the stop-gradient alignment target, both float32. `encode(images)` without ids runs the encoder on every token.
    """

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    dec_width: int
    dec_heads: int
    dec_mlp_hidden: int
    reg_depth: int
    dec_depth: int
    patch: int = 16
    channels: int = 3
    num_outputs: int | None = None  # None: patch * patch * channels pixels per masked patch
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1  # encoder (the reference's --layer_scale_init_value: 0.1 for B, 1e-5 for L)
    dec_layer_scale_init: float = 0.1  # regressor and decoder (--decoder_layer_scale_init_value)
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        common = dict(
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        # The reference's patch conv keeps the encoder's trunc_normal(0.02) (its top-level xavier re-init only
        # touches Linear layers); `init_params` applies it. cls and mask tokens: trunc_normal(0.02) cut at +-1 std.
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
        self.cls_token = self.param('cls_token', vit.truncated_normal_init(0.02), (1, 1, self.width))
        self.encoder = vit.Transformer(
            self.width, self.depth, self.heads, self.mlp_hidden, layer_scale_init=self.layer_scale_init, **common
        )
        if self.dec_width != self.width:  # the reference's encoder_to_regresser (+ norm), used only then
            self.encoder_to_regressor = nn.Dense(self.dec_width, dtype=self.dtype, kernel_init=vit.dense_init)
            self.encoder_to_regressor_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.mask_token = self.param('mask_token', vit.truncated_normal_init(0.02), (1, 1, self.dec_width))
        self.regressor_blocks = [
            RegressorBlock(
                self.dec_width,
                self.dec_heads,
                self.dec_mlp_hidden,
                self.layer_norm_eps,
                self.dec_layer_scale_init,
                self.dtype,
                self.attention_impl,
                name=f'regressor_{i:02d}',
            )
            for i in range(self.reg_depth)
        ]
        self.regressor_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.decoder = vit.Transformer(
            self.dec_width,
            self.dec_depth,
            self.dec_heads,
            self.dec_mlp_hidden,
            layer_scale_init=self.dec_layer_scale_init,
            **common,
        )
        outputs = self.num_outputs or self.patch * self.patch * self.channels
        self.head = nn.Dense(outputs, dtype=self.dtype, kernel_init=vit.dense_init)

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        chex.assert_rank(images, 4)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f'CAE takes square images, got {images.shape[1]}x{images.shape[2]}')
        return mae.token_grid(images.shape[1], self.patch)

    def encode(
        self, images: jax.Array, ids: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encoder output (B, 1 + n, width), cls token first, on the `ids` tokens (in that order) or on all."""
        table = jnp.asarray(sincos_table(*self._grid(images), self.width))
        if ids is not None:
            chex.assert_rank(ids, 2)
            chex.assert_axis_dimension(ids, 0, images.shape[0])
            table = table[ids]
        tokens = self.patch_embed(images, ids)
        tokens = tokens + table.astype(tokens.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        x, intermediates = self.encoder(jnp.concatenate([cls, tokens], axis=1), train)
        return x, dict(intermediates, encoded=x)

    def _to_regressor(self, x: jax.Array) -> jax.Array:
        if self.dec_width == self.width:
            return x
        return self.encoder_to_regressor_norm(self.encoder_to_regressor(x))

    def regress(
        self, visible: jax.Array, pos_visible: jax.Array, pos_masked: jax.Array, train: bool = False
    ) -> jax.Array:
        """Predicted latents (B, m, dec_width) of the masked patches from the visible latents (B, n, dec_width)."""
        chex.assert_rank([visible, pos_visible, pos_masked], 3)
        batch, masked = pos_masked.shape[:2]
        queries = jnp.broadcast_to(self.mask_token.astype(visible.dtype), (batch, masked, self.dec_width))
        pos_context = jnp.concatenate([pos_visible, pos_masked], axis=1)
        rates = np.linspace(0.0, self.drop_path_rate, self.reg_depth)
        for block, rate in zip(self.regressor_blocks, rates, strict=True):
            # Keys and values: the (never updated) visible latents and the current queries, as the reference.
            queries = block(
                queries, jnp.concatenate([visible, queries], axis=1), pos_masked, pos_context, float(rate), train
            )
        return self.regressor_norm(queries)

    def decode(self, latents: jax.Array, pos_masked: jax.Array, train: bool = False) -> jax.Array:
        """Predictions (B, m, num_outputs) in float32 from the predicted masked latents only."""
        x, _ = self.decoder(latents + pos_masked, train)  # ends with the decoder norm
        return self.head(x).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, ids_keep: jax.Array, ids_masked: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank([ids_keep, ids_masked], 2)
        grid = self._grid(images)
        chex.assert_equal(ids_keep.shape[1] + ids_masked.shape[1], grid[0] * grid[1])
        encoded, intermediates = self.encode(images, ids_keep, train)
        latents = self._to_regressor(encoded)[:, 1:]
        # The alignment target: the same encoder on cls + the masked patches (train mode, as the reference's
        # no_grad pass), cls dropped; no gradient reaches the encoder through it.
        target, _ = self.encode(images, ids_masked, train)
        target = jax.lax.stop_gradient(self._to_regressor(target)[:, 1:])
        table = jnp.asarray(sincos_table(*grid, self.dec_width)).astype(latents.dtype)
        pos_visible, pos_masked = table[ids_keep], table[ids_masked]
        predicted = self.regress(latents, pos_visible, pos_masked, train)
        prediction = self.decode(predicted, pos_masked, train)
        return prediction, dict(
            intermediates,
            latent_pred=predicted.astype(jnp.float32),
            latent_target=target.astype(jnp.float32),
        )


def init_params(
    model: CAEPretrain, rng: jax.Array, images: jax.Array, ids_keep: jax.Array, ids_masked: jax.Array
) -> dict[str, Any]:
    """model.init with the reference's patch-embedding init: trunc_normal(0.02) (cut at +-1 std) kernel, zero bias
    (vit.PatchEmbed keeps torch's Conv default). Every Dense is xavier_uniform with zero bias, as the reference's
    default (`--fix_init_weight` off) re-initialises every Linear."""
    init_rng, patch_rng = jax.random.split(rng)
    params = jax.tree.map(lambda x: x, model.init(init_rng, images, ids_keep, ids_masked)['params'])  # a copy
    proj = params['patch_embed']['proj']
    proj['kernel'] = vit.truncated_normal_init(0.02)(patch_rng, proj['kernel'].shape)
    proj['bias'] = jnp.zeros_like(proj['bias'])
    return params


def make_pretrain_model(variant: str, **overrides: Any) -> CAEPretrain:
    """A CAEPretrain of a named size ('B', 'L', 'micro', 'tiny'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(CAEPretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown CAEPretrain fields: {sorted(unknown)}')
    return CAEPretrain(**{**decode_variant(variant), **overrides})
