"""Selfie pretraining model (Trinh, Luong, Le, "Selfie: Self-supervised Pretraining for Image Embedding", 2019).

A patch network P encodes every patch on its own into one vector; an attention pooling network A (a transformer
whose first token is a learned query u0) summarises the visible patches' vectors into u; for each masked location,
v = u + the position embedding of that location (row + column
embeddings, or one per patch as the paper does on 32-px images), and v is scored by dot product against the vectors of
all masked patches of the same image (the right one and its distractors): an (m, m) logit matrix per image whose
diagonal is the answer. P is the paper's first three ResNet-50 blocks; here it is a small residual conv net with
GroupNorm (no batch statistics to carry in the trainer's state). Tokens come in shuffle order from `ids_shuffle`
(B, N): the first `num_visible` are visible, the rest masked, so every shape is static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import vit

GROUPS = 8  # GroupNorm groups: every patch-network width must divide by it
POSITIONS = ('row_col', 'patch')


class ResidualBlock(nn.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus a (projected when the shape changes) shortcut, ReLU."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda w, k, s, name: nn.Conv(w, (k, k), (s, s), use_bias=False, dtype=self.dtype, name=name)
        norm = lambda name: nn.GroupNorm(GROUPS, dtype=self.dtype, name=name)
        y = nn.relu(norm('norm1')(conv(self.width, 3, self.stride, 'conv1')(x)))
        y = norm('norm2')(conv(self.width, 3, 1, 'conv2')(y))
        if self.stride != 1 or x.shape[-1] != self.width:
            x = norm('norm_proj')(conv(self.width, 1, self.stride, 'proj')(x))
        return nn.relu(x + y)


class PatchNet(nn.Module):
    """Patches (M, p, p, C) -> vectors (M, widths[-1]): a conv stem, one residual block per width (stride 2 after
    the first), global average pooling."""

    widths: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        chex.assert_rank(patches, 4)
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype, name='stem')(patches)
        x = nn.relu(nn.GroupNorm(GROUPS, dtype=self.dtype, name='stem_norm')(x))
        for i, width in enumerate(self.widths):
            x = ResidualBlock(width, 1 if i == 0 else 2, self.dtype, name=f'block_{i}')(x)
        return x.mean(axis=(1, 2))


def cut_patches(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, patch, patch, C), raster patch order."""
    batch, height, width, channels = images.shape
    x = images.reshape(batch, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch, patch, channels)


class SelfiePretrain(nn.Module):
    """`__call__(images, ids_shuffle, num_visible)` -> (choice logits (B, m, m) float32, m = N - num_visible, row i
    the query of masked location i scored against every masked patch, target i; intermediates {'patches': P's
    vectors (B, N, width) in shuffle order, 'pooled': u (B, width)}). With `ids_shuffle=None` every patch is visible
    (raster order) and the logits are None (for probes)."""

    patch_widths: Sequence[int]
    pool_depth: int
    pool_heads: int
    patch: int = 8
    position: str = 'row_col'  # 'row_col': grid_h + grid_w vectors (the paper at 224 px); 'patch': one per patch
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @property
    def width(self) -> int:
        return self.patch_widths[-1]

    @nn.compact
    def __call__(
        self, images: jax.Array, ids_shuffle: jax.Array | None = None, num_visible: int = 0
    ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        chex.assert_rank(images, 4)
        grid = mae_model.token_grid(images.shape[1], self.patch)
        num_tokens = grid[0] * grid[1]
        patches = cut_patches(images, self.patch)
        if ids_shuffle is not None:
            chex.assert_shape(ids_shuffle, (images.shape[0], num_tokens))
            if not 0 < num_visible < num_tokens:
                raise ValueError(f'num_visible {num_visible} must be in [1, {num_tokens - 1}]')
            patches = jnp.take_along_axis(patches, ids_shuffle[:, :, None, None, None], axis=1)
        else:
            num_visible = num_tokens
        batch = images.shape[0]
        # P is shared by the visible patches and the candidates, and trained through both.
        h = PatchNet(tuple(self.patch_widths), self.dtype, name='patch_net')(patches.reshape(-1, *patches.shape[2:]))
        h = h.reshape(batch, num_tokens, self.width)
        u0 = self.param('query', nn.initializers.normal(0.02), (1, 1, self.width))
        pool = vit.Transformer(
            self.width,
            self.pool_depth,
            self.pool_heads,
            4 * self.width,
            layer_norm_eps=self.layer_norm_eps,
            dtype=self.dtype,
            name='attention_pool',
        )
        pooled, _ = pool(
            jnp.concatenate([jnp.broadcast_to(u0.astype(h.dtype), (batch, 1, self.width)), h[:, :num_visible]], axis=1)
        )
        u = pooled[:, 0]
        intermediates = {'patches': h, 'pooled': u}
        if ids_shuffle is None:
            return None, intermediates
        # The query of each masked location: u plus that location's position embedding.
        masked = ids_shuffle[:, num_visible:]
        if self.position == 'row_col':
            rows = self.param('row_embed', nn.initializers.normal(0.02), (grid[0], self.width))
            cols = self.param('col_embed', nn.initializers.normal(0.02), (grid[1], self.width))
            position = rows[masked // grid[1]] + cols[masked % grid[1]]
        elif self.position == 'patch':
            position = self.param('pos_embed', nn.initializers.normal(0.02), (num_tokens, self.width))[masked]
        else:
            raise ValueError(f"unknown position embedding '{self.position}'; valid: {', '.join(POSITIONS)}")
        queries = u[:, None] + position.astype(u.dtype)
        logits = jnp.einsum('bid,bjd->bij', queries, h[:, num_visible:])
        return logits.astype(jnp.float32), intermediates
