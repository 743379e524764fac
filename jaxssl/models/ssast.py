"""SSAST (Gong et al., AAAI 2022): a ViT on log-mel spectrogram patches, pretrained by masked patch modelling.

The reference (YuanGongND/ssast `src/models/ast_models.py`) is timm's distilled DeiT with a one-channel patch
convolution over (frequency, time): tokens in frequency-major order (index = f * time_patches + t), a cls and a
distillation token in front, a learned position table over all of them, a learned mask embedding in place of the
masked patches' embeddings, and two heads on the masked tokens' outputs: `cpredlayer` (the discriminative,
InfoNCE objective) and `gpredlayer` (the generative, MSE one), each Linear(D, D) - ReLU - Linear(D, patch area).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import vit

# Encoder width / depth / heads (MLP ratio 4, as DeiT). tiny / small / base are the reference's model_size values.
_TABLE = {
    'micro': (64, 2, 4),  # tests and `runlocal` on a CPU; not a reference size
    'mini': (128, 4, 4),  # CPU evidence runs; not a reference size
    'tiny': (192, 12, 3),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
}
VARIANTS = {name: dict(zip(('width', 'depth', 'heads'), row, strict=True)) for name, row in _TABLE.items()}
# The reference's two pretraining patch shapes, (frequency bins, frames): 16 x 16 patches, or 128 x 2 whole-spectrum
# frames ('frame', for speech).
PATCHES = {'patch': (16, 16), 'frame': (128, 2)}
NUM_EXTRA_TOKENS = 2  # cls + distillation token (DeiT's distilled variants, which every reference size uses)

# timm 0.4.5's trunc_normal_(std=.02) cuts at +-2 absolute, so it is N(0, 0.02) in practice.
normal_init = nn.initializers.normal(0.02)


def token_grid(num_mel_bins: int, frames: int, patch: tuple[int, int]) -> tuple[int, int]:
    """(frequency patches, time patches) of a (frames, num_mel_bins) spectrogram; raises if a side does not divide."""
    if num_mel_bins % patch[0] or frames % patch[1]:
        raise ValueError(f'{num_mel_bins} mel bins x {frames} frames do not divide into {patch} patches')
    return num_mel_bins // patch[0], frames // patch[1]


class PredictionHead(nn.Module):
    """The reference's cpredlayer / gpredlayer: Linear(D, D) - ReLU - Linear(D, out)."""

    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.relu(vit.torch_dense(width, width, self.dtype, 'fc1')(x))
        return vit.torch_dense(self.out, width, self.dtype, 'fc2')(x).astype(jnp.float32)


class SSAST(nn.Module):
    """Spectrograms (B, frames, mel bins) -> tokens; `__call__` runs the two pretraining passes."""

    width: int
    depth: int
    heads: int
    grid: tuple[int, int]  # (frequency patches, time patches)
    patch: tuple[int, int] = (16, 16)  # (frequency bins, frames)
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.patch[0] * self.patch[1]

    def setup(self):
        self.patch_embed = vit.PatchEmbed(self.width, self.patch, dtype=self.dtype)
        # torch's xavier_normal_ of a (1, 1, D) tensor: fan_in = fan_out = D, so N(0, 1 / D).
        self.mask_embed = self.param('mask_embed', nn.initializers.normal(self.width**-0.5), (1, 1, self.width))
        self.cls_token = self.param('cls_token', normal_init, (1, 1, self.width))
        self.dist_token = self.param('dist_token', normal_init, (1, 1, self.width))
        self.pos_embed = self.param('pos_embed', normal_init, (1, NUM_EXTRA_TOKENS + self.num_patches, self.width))
        self.encoder = vit.Transformer(
            width=self.width,
            depth=self.depth,
            heads=self.heads,
            mlp_hidden=4 * self.width,
            layer_norm_eps=self.layer_norm_eps,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        self.cpred = PredictionHead(self.patch_dim, self.dtype)
        self.gpred = PredictionHead(self.patch_dim, self.dtype)

    def encode(
        self, spectrogram: jax.Array, masked: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(B, frames, mel bins) -> (B, 2 + L, width) after the final norm (cls, dist, then the patches); where
        `masked` (B, L) is true, the patch embedding is replaced by the mask embedding."""
        chex.assert_rank(spectrogram, 3)
        x = self.patch_embed(jnp.swapaxes(spectrogram, 1, 2)[..., None])  # (B, F, T, 1): frequency-major tokens
        if masked is not None:
            chex.assert_shape(masked, x.shape[:2])
            x = jnp.where(masked[..., None], self.mask_embed.astype(x.dtype), x)
        extra = jnp.concatenate([self.cls_token, self.dist_token], axis=1).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(extra, (x.shape[0], *extra.shape[1:])), x], axis=1)
        return self.encoder(x + self.pos_embed.astype(x.dtype), train=train)

    def __call__(
        self, spectrogram: jax.Array, mpc_idx: jax.Array, mpg_idx: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """The reference's two passes (`pretrain_mpc`, `pretrain_mpg`), each with its own mask, run as one batch of
        2B: (cpred outputs at mpc_idx (B, n, patch area), gpred outputs at mpg_idx (B, m, patch area))."""
        batch = spectrogram.shape[0]
        rows = jnp.arange(batch)[:, None]
        masked = jnp.zeros((2, batch, self.num_patches), bool)
        masked = masked.at[0, rows, mpc_idx].set(True).at[1, rows, mpg_idx].set(True)
        tokens, _ = self.encode(jnp.concatenate([spectrogram, spectrogram]), masked.reshape(2 * batch, -1), train)
        patches = tokens[:, NUM_EXTRA_TOKENS:]
        take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=1)
        return self.cpred(take(patches[:batch], mpc_idx)), self.gpred(take(patches[batch:], mpg_idx))


def patchify(spectrogram: jax.Array, patch: tuple[int, int]) -> jax.Array:
    """(B, frames, mel bins) -> (B, L, patch area): torch's Unfold of the (B, 1, F, T) input, as the reference's
    targets: patches in frequency-major order, each flattened as (frequency, time)."""
    b, frames, bins = spectrogram.shape
    (pf, pt), (gf, gt) = patch, (bins // patch[0], frames // patch[1])
    x = jnp.swapaxes(spectrogram, 1, 2).reshape(b, gf, pf, gt, pt)
    return x.transpose(0, 1, 3, 2, 4).reshape(b, gf * gt, pf * pt)


def init_params(model: SSAST, rng: jax.Array, spectrogram: jax.Array, mpc_idx: jax.Array, mpg_idx: jax.Array) -> Any:
    """model.init with timm's ViT init of the encoder's Linear layers, N(0, 0.02) (biases are zeros already); the
    patch convolution and the heads keep torch's defaults, as the reference creates them after timm's init."""
    init_rng, dense_rng = jax.random.split(rng)
    params = model.init(init_rng, spectrogram, mpc_idx, mpg_idx)['params']
    return {**params, 'encoder': vit.redraw_kernels(params['encoder'], dense_rng, normal_init)}


def make_model(variant: str, grid: tuple[int, int], patch: tuple[int, int], **overrides: Any) -> SSAST:
    """An SSAST of a named size (micro, tiny, small, base)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(SSAST)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown SSAST fields: {sorted(unknown)}')
    return SSAST(**VARIANTS[variant], grid=tuple(grid), patch=tuple(patch), **overrides)
