"""Uni4Eye pretraining model (Cai et al., "Uni4Eye: Unified 2D and 3D Self-supervised Pre-training via Masked Image
Modeling Transformer for Ophthalmic Image Classification", MICCAI 2022; shared/reference/methods/
mmc_further_pretraining_uni4eye_infinite_lr.md).

An MAE whose patch embedding is the paper's Unified Patch Embedding: a 2-D module (p x p patches of (B, H, W, C)
images) and a 3-D module (d x p x p cubes of (B, D, H, W, C) volumes), chosen by the input's rank, in front of ONE
shared encoder (cls token + transformer). Its decoder has two branches (the paper's dual-branch multitask decoder):
'pixel' reconstructs the masked patches' pixels, 'gradient' their gradient map. Each branch is an MAE decoder
(embedding, mask token, transformer) shared by both dimensionalities, with one output head per dimensionality,
since a 2-D patch and a 3-D cube have different sizes (the successor code Davidczy/Uni4Eye_pp keeps
`decoder_pred2` / `decoder_pred3` the same way).

Position tables are fixed: the reference's 2-D sin-cos table for images (jaxssl.models.mae.sincos_2d_table) and
the 1-D sinusoid over the flattened (d, h, w) token index for volumes (vit.sinusoid_table, VideoMAE's). The
successor code leaves its 3-D tables at zero (their init is commented out); a fixed table is used here so that 3-D
tokens know where they are.
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

BRANCHES = ('pixel', 'gradient')


def volume_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (D', H', W') token grid of a (D, H, W) volume cut into `patch` cubes; ValueError if not divisible."""
    if any(s % p for s, p in zip(shape, patch, strict=True)):
        raise ValueError(f'volume shape {tuple(shape)} is not divisible by patch {tuple(patch)}')
    return tuple(s // p for s, p in zip(shape, patch, strict=True))


def patchify(x: jax.Array | np.ndarray, patch: tuple[int, ...]) -> jax.Array | np.ndarray:
    """(B, *spatial, C) -> (B, L, prod(patch) * C): tokens in row-major grid order, each vector in (within-patch
    row-major position, channel) order with the channel fastest. For 2-D it equals jaxssl.models.mae.patchify."""
    batch, *spatial, channels = x.shape
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    n = len(patch)
    x = x.reshape(batch, *(d for pair in zip(grid, patch, strict=True) for d in pair), channels)
    # (B, g0, p0, g1, p1, ..., C) -> (B, g0, g1, ..., p0, p1, ..., C)
    order = (0, *(1 + 2 * i for i in range(n)), *(2 + 2 * i for i in range(n)), 1 + 2 * n)
    return x.transpose(order).reshape(batch, int(np.prod(grid)), -1)


class _Branch(nn.Module):
    """One decoder branch: embedding, mask token, transformer and an output head per dimensionality."""

    dec_width: int
    dec_depth: int
    dec_heads: int
    dec_mlp_hidden: int
    out_2d: int
    out_3d: int
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.decoder_embed = nn.Dense(self.dec_width, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.dec_width))
        self.decoder = vit.Transformer(
            self.dec_width,
            self.dec_depth,
            self.dec_heads,
            self.dec_mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        dense = dict(dtype=self.dtype, kernel_init=vit.dense_init)
        self.pred_2d = nn.Dense(self.out_2d, **dense)
        self.pred_3d = nn.Dense(self.out_3d, **dense)

    def __call__(self, encoded: jax.Array, ids_restore: jax.Array, table: jax.Array, volume: bool, train: bool):
        x = self.decoder_embed(encoded)
        batch, kept = x.shape[0], x.shape[1] - 1
        num_tokens = ids_restore.shape[1]
        # [visible tokens in shuffle order, mask tokens], unshuffled into grid order; cls stays in front (as MAE).
        masked = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_tokens - kept, self.dec_width))
        tokens = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], axis=1), ids_restore[..., None], axis=1)
        tokens = tokens + table.astype(x.dtype)
        x, _ = self.decoder(jnp.concatenate([x[:, :1], tokens], axis=1), train)
        head = self.pred_3d if volume else self.pred_2d
        return head(x[:, 1:]).astype(jnp.float32)


class Uni4EyePretrain(nn.Module):
    """Shared encoder for 2-D images and 3-D volumes, dual-branch decoder.

    `__call__(x, ids_keep, ids_restore)` takes images (B, H, W, C_2d) or volumes (B, D, H, W, C_3d) and returns
    ({'pixel': (B, L, P), 'gradient': (B, L, P)} float32 predictions of every patch, P = prod(patch) * C),
    {'encoded': (B, 1 + n, width)}). `encode(x)` runs the encoder on every token (probes).
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
    depth_patch: int = 16  # the 3-D cube's extent along D (the successor code uses 16^3 cubes)
    channels: int = 3  # 2-D images (colour fundus photographs)
    volume_channels: int = 1  # 3-D volumes (grey OCT scans)
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @property
    def patch_2d(self) -> tuple[int, int]:
        return (self.patch, self.patch)

    @property
    def patch_3d(self) -> tuple[int, int, int]:
        return (self.depth_patch, self.patch, self.patch)

    def setup(self):
        common = dict(
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        # The Unified Patch Embedding: one module per input dimensionality, the rest of the network shared.
        self.patch_embed_2d = vit.PatchEmbed(self.width, self.patch_2d, dtype=self.dtype)
        self.patch_embed_3d = vit.PatchEmbed(self.width, self.patch_3d, dtype=self.dtype)
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
        self.encoder = vit.Transformer(self.width, self.depth, self.heads, self.mlp_hidden, **common)
        sizes = dict(
            out_2d=int(np.prod(self.patch_2d)) * self.channels,
            out_3d=int(np.prod(self.patch_3d)) * self.volume_channels,
        )
        dec = (self.dec_width, self.dec_depth, self.dec_heads, self.dec_mlp_hidden)
        self.pixel_decoder = _Branch(*dec, **sizes, **common)
        self.gradient_decoder = _Branch(*dec, **sizes, **common)

    def grid(self, x: jax.Array) -> tuple[int, ...]:
        """The token grid of an image (H', W') or a volume (D', H', W')."""
        if x.ndim == 4:
            if x.shape[1] != x.shape[2]:
                raise ValueError(f'Uni4Eye takes square images, got {x.shape[1]}x{x.shape[2]}')
            return mae.token_grid(x.shape[1], self.patch)
        return volume_grid(x.shape[1:4], self.patch_3d)

    def _tables(self, x: jax.Array, width: int) -> jax.Array:
        """The fixed position table (L, width) of the input's token grid."""
        if x.ndim == 4:
            return jnp.asarray(mae.sincos_2d_table(*self.grid(x), width))
        return jnp.asarray(vit.sinusoid_table(int(np.prod(self.grid(x))), width))

    def encode(
        self, x: jax.Array, ids_keep: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encoder output (B, 1 + n, width), cls first, on the `ids_keep` tokens (in that order) or on all."""
        if x.ndim not in (4, 5):
            raise ValueError(f'Uni4Eye takes (B, H, W, C) images or (B, D, H, W, C) volumes, got shape {x.shape}')
        embed = self.patch_embed_3d if x.ndim == 5 else self.patch_embed_2d
        table = self._tables(x, self.width)
        if ids_keep is not None:
            chex.assert_rank(ids_keep, 2)
            chex.assert_axis_dimension(ids_keep, 0, x.shape[0])
            table = table[ids_keep]
        tokens = embed(x, ids_keep)
        tokens = tokens + table.astype(tokens.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        out, intermediates = self.encoder(jnp.concatenate([cls, tokens], axis=1), train)
        return out, dict(intermediates, encoded=out)

    def __call__(
        self, x: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, train: bool = False
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        chex.assert_rank([ids_keep, ids_restore], 2)
        encoded, intermediates = self.encode(x, ids_keep, train)
        chex.assert_axis_dimension(ids_restore, 1, int(np.prod(self.grid(x))))
        table = self._tables(x, self.dec_width)
        volume = x.ndim == 5
        predictions = {
            'pixel': self.pixel_decoder(encoded, ids_restore, table, volume, train),
            'gradient': self.gradient_decoder(encoded, ids_restore, table, volume, train),
        }
        return predictions, intermediates

    def both(self, image, image_ids_keep, image_ids_restore, volume, volume_ids_keep, volume_ids_restore):
        """Runs an image batch and a volume batch: `init` through it creates every parameter."""
        return self(image, image_ids_keep, image_ids_restore), self(volume, volume_ids_keep, volume_ids_restore)


def init_params(model: Uni4EyePretrain, rng: jax.Array, *inputs: jax.Array) -> dict[str, Any]:
    """model.init through `both(image, ids_keep, ids_restore, volume, ids_keep, ids_restore)`, with MAE's reference
    patch-embedding init (xavier on the kernel's (width, fan_in) view) on both embeddings."""
    init_rng, rng_2d, rng_3d = jax.random.split(rng, 3)
    params = jax.tree.map(lambda x: x, model.init(init_rng, *inputs, method=model.both)['params'])
    for name, key in (('patch_embed_2d', rng_2d), ('patch_embed_3d', rng_3d)):
        proj = params[name]['proj']
        proj['kernel'] = mae.reference_patch_kernel(key, proj['kernel'].shape)
    return params


def make_pretrain_model(variant: str, **overrides: Any) -> Uni4EyePretrain:
    """A Uni4EyePretrain of one of MAE's named sizes ('B', 'L', 'micro', ...; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(Uni4EyePretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown Uni4EyePretrain fields: {sorted(unknown)}')
    return Uni4EyePretrain(**{**mae.decode_variant(variant), **overrides})
