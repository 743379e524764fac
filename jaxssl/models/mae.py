"""MAE pretraining model (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Matches the reference MaskedAutoencoderViT (facebookresearch/mae, models_mae.py; shared/reference/methods/
mae_siammae_cropmae_croco.md): a ViT encoder with a cls token on the visible patches only, then a lightweight
decoder on the visible tokens plus mask tokens at every masked position, predicting each patch's pixels.
The masks come in as index arrays made per sample in the input pipeline (jaxssl.masks.shuffle_masking), so every
shape is static: `ids_keep` (B, n) the kept tokens in shuffle order, `ids_restore` (B, L) each token's position in
the shuffle.

Layers come from jaxssl.models.vit (pre-LN blocks, fused qkv, exact GELU, LayerNorm eps 1e-6). One difference in
parameters, none in outputs: the reference's attention has a key bias and vit.Attention has none; a key bias adds
q . b_k to every logit of a query row, which softmax cancels, so it never changes the output (and gets zero
gradient); the converter drops it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import vit

# The size table lives here only: encoder width / depth / heads / MLP ratio, decoder width / depth / heads (MLP
# ratio 4, as the encoder's) and the default patch. B/L/H use the reference's 512-wide, 8-deep, 16-head decoder.
_FIELDS = ('width', 'depth', 'heads', 'mlp_ratio', 'dec_width', 'dec_depth', 'dec_heads', 'patch')
_TABLE = {
    'micro': (64, 2, 4, 4.0, 32, 1, 2, 16),  # tests and `runlocal` on a CPU; not a reference size
    'tiny': (128, 4, 4, 4.0, 64, 2, 4, 16),  # CPU demos and quality checks; not a reference size
    # ViT-Ti with a 4-block decoder of its own width: the small-scale continual MAE of the infinite-lr
    # paper; its encoder is DeiT-Tiny (TOV-VICReg's ViT-Tiny).
    'Ti': (192, 12, 3, 4.0, 192, 4, 3, 16),
    'S': (384, 12, 6, 4.0, 512, 8, 16, 16),  # GMML / DINO ViT-S/16 (no MAE reference model of this size)
    'B': (768, 12, 12, 4.0, 512, 8, 16, 16),
    'L': (1024, 24, 16, 4.0, 512, 8, 16, 16),
    'H': (1280, 32, 16, 4.0, 512, 8, 16, 14),
}
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _TABLE.items()}


def decode_variant(variant: str, table: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """'B', 'B/16' or 'H/14' -> MAEPretrain size fields. Raises ValueError listing valid names. `table` replaces
    VARIANTS for models with MAE's size fields and their own sizes (CroCo)."""
    table = VARIANTS if table is None else table
    size, _, patch = variant.partition('/')
    if size not in table:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(table)} (optionally '/patch')")
    spec = dict(table[size])
    if patch:
        if not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"bad patch size in variant '{variant}'")
        spec['patch'] = int(patch)
    mlp_ratio = spec.pop('mlp_ratio')
    spec['mlp_hidden'] = int(spec['width'] * mlp_ratio)
    spec['dec_mlp_hidden'] = int(spec['dec_width'] * mlp_ratio)
    return spec


def token_grid(image_size: int, patch: int) -> tuple[int, int]:
    """The (H', W') patch grid of a square image, e.g. (14, 14) for 224 px with patch 16."""
    if image_size % patch:
        raise ValueError(f'image size {image_size} is not divisible by patch {patch}')
    return image_size // patch, image_size // patch


def sincos_2d_table(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """The reference's fixed 2-D sin-cos table (util/pos_embed.py), shape (grid_h * grid_w, dim), raster order.

    With omega_k = 10000^(-k / (dim / 4)), k < dim / 4, the token in row y, column x gets
    [sin(x omega), cos(x omega), sin(y omega), cos(y omega)]: the column index fills the first half (the
    reference's code names that half `emb_h`, but it is built from the meshgrid's first output, the column), and each
    half is [sin block, cos block], not interleaved. Computed in float64, returned as float32. The cls token's row is
    zeros in the reference, so it is left out here.
    """
    if dim % 4:
        raise ValueError(f'2-D sin-cos positions need a width divisible by 4, got {dim}')
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing='ij')
    x, y = np.outer(cols.reshape(-1), omega), np.outer(rows.reshape(-1), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, L, patch * patch * C) in raster patch order, each vector (row, col, channel) with the
    channel fastest: the reference's einsum 'nchpwq->nhwpqc' on channels-first images."""
    batch, height, width, channels = images.shape
    x = images.reshape(batch, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height // patch) * (width // patch), -1)


def unpatchify(patches: jax.Array | np.ndarray, grid: tuple[int, int], patch: int) -> jax.Array | np.ndarray:
    """Inverse of `patchify`: (B, L, patch * patch * C) -> (B, H, W, C)."""
    batch, _, dim = patches.shape
    channels = dim // (patch * patch)
    x = patches.reshape(batch, grid[0], grid[1], patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid[0] * patch, grid[1] * patch, channels)


class MAEPretrain(nn.Module):
    """MAE encoder (cls + visible tokens) and decoder (all tokens); predicts every patch's pixels.

    `__call__(images, ids_keep, ids_restore)` returns predictions (B, L, patch * patch * C) in float32 (the cls
    output dropped, as the reference), plus intermediates {'encoded': (B, 1 + n, width) encoder output, cls first}.
    `encode(images)` without ids_keep runs the encoder on every token in raster order (for probes).
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
    layer_norm_eps: float = 1e-6
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
        # The patch kernel's reference init (xavier on its (width, p*p*C) view) is applied by `init_params`.
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
        # N(0, 0.02): the reference's normal_(std=.02) (its comment: timm's trunc_normal_ at 2 never cuts).
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
        self.encoder = vit.Transformer(self.width, self.depth, self.heads, self.mlp_hidden, **common)
        self.decoder_embed = nn.Dense(self.dec_width, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.dec_width))
        self.decoder = vit.Transformer(self.dec_width, self.dec_depth, self.dec_heads, self.dec_mlp_hidden, **common)
        self.decoder_pred = nn.Dense(
            self.patch * self.patch * self.channels, dtype=self.dtype, kernel_init=vit.dense_init
        )

    def encode(
        self, images: jax.Array, ids_keep: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encoder output (B, 1 + n, width), cls token first, on the `ids_keep` tokens (in that order) or on all."""
        chex.assert_rank(images, 4)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f'MAE takes square images, got {images.shape[1]}x{images.shape[2]}')
        grid = token_grid(images.shape[1], self.patch)
        table = jnp.asarray(sincos_2d_table(*grid, self.width))
        if ids_keep is not None:
            chex.assert_rank(ids_keep, 2)
            chex.assert_axis_dimension(ids_keep, 0, images.shape[0])
            table = table[ids_keep]
        # Only the kept patches are embedded (the embedding is per patch: the reference's embed-all-then-pick gives
        # the same tokens), each with its own position row.
        tokens = self.patch_embed(images, ids_keep)
        tokens = tokens + table.astype(tokens.dtype)
        # The cls token's position row is zeros in the reference, so cls + pos[0] is the cls token itself.
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        x, intermediates = self.encoder(jnp.concatenate([cls, tokens], axis=1), train)
        return x, dict(intermediates, encoded=x)

    def decode(self, encoded: jax.Array, ids_restore: jax.Array, train: bool = False) -> jax.Array:
        """Predictions (B, L, patch * patch * C) in float32 from the encoder output and the shuffle's inverse."""
        chex.assert_rank([encoded, ids_restore], [3, 2])
        num_tokens = ids_restore.shape[1]
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f'ids_restore has {num_tokens} tokens, not a square grid')
        x = self.decoder_embed(encoded)
        batch, kept = x.shape[0], x.shape[1] - 1
        # [visible tokens in shuffle order, mask tokens], then unshuffled into raster order; cls stays in front.
        masked = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_tokens - kept, self.dec_width))
        tokens = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], axis=1), ids_restore[..., None], axis=1)
        tokens = tokens + jnp.asarray(sincos_2d_table(side, side, self.dec_width)).astype(x.dtype)
        x, _ = self.decoder(jnp.concatenate([x[:, :1], tokens], axis=1), train)  # ends with the decoder norm
        return self.decoder_pred(x[:, 1:]).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank([ids_keep, ids_restore], 2)
        chex.assert_axis_dimension(ids_restore, 1, (images.shape[1] // self.patch) * (images.shape[2] // self.patch))
        encoded, intermediates = self.encode(images, ids_keep, train)
        return self.decode(encoded, ids_restore, train), intermediates


def reference_patch_kernel(rng: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """The reference's patch-embedding init: xavier_uniform on the (width, p * p * C) view of the conv weight."""
    *patch_dims, channels, width = kernel_shape
    fan_in = int(np.prod(patch_dims)) * channels
    return vit.dense_init(rng, (fan_in, width), jnp.float32).reshape(kernel_shape)


def init_params(
    model: MAEPretrain, rng: jax.Array, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array
) -> dict[str, Any]:
    """model.init with the reference's patch-embedding init (vit.PatchEmbed keeps torch's Conv default).

    The conv bias keeps torch's default, uniform(+-1 / sqrt(fan_in)), as the reference leaves it.
    """
    init_rng, patch_rng = jax.random.split(rng)
    params = jax.tree.map(lambda x: x, model.init(init_rng, images, ids_keep, ids_restore)['params'])  # a copy
    proj = params['patch_embed']['proj']
    proj['kernel'] = reference_patch_kernel(patch_rng, proj['kernel'].shape)
    return params


def make_pretrain_model(variant: str, **overrides: Any) -> MAEPretrain:
    """An MAEPretrain of a named size ('B', 'L', 'H', 'micro', 'tiny'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(MAEPretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown MAEPretrain fields: {sorted(unknown)}')
    return MAEPretrain(**{**decode_variant(variant), **overrides})
