"""TERA (Liu, Li, Lee, "TERA: Self-Supervised Learning of Transformer Encoder Representation for Speech", 2021): a
post-norm BERT encoder over log-mel frames and a spectrogram prediction head.

Laid out as s3prl's `upstream/mockingjay/model.py`: input Linear(mel bins -> width) + the fixed sinusoid position
table (the VideoMAE/BERT interleaved sin/cos), LayerNorm (eps 1e-12), dropout; post-norm blocks (jaxssl.models.bert's
Layer: attention and GELU MLP, each followed by dropout, the residual and a LayerNorm); `SpecHead`: Linear(width,
width) - GELU - LayerNorm - Linear(width, mel bins). Every Linear is initialised N(0, 0.02) with zero bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bert, vit

# (width, depth, heads, MLP hidden). base: logMelBase (3 x 768); slim: logMelSlim (12 x 384, 8 heads, MLP 768).
VARIANTS = {
    'micro': (64, 2, 4, 256),  # tests and `runlocal` on a CPU; not a reference size
    'base': (768, 3, 12, 3072),
    'slim': (384, 12, 8, 768),
}
init = nn.initializers.normal(0.02)  # s3prl's initializer_range, on every Linear


class TERA(nn.Module):
    """Spectrogram frames (B, T, mel bins) and their key mask (B, T) -> (prediction (B, T, mel bins), hidden)."""

    width: int
    depth: int
    heads: int
    mlp: int
    out_dim: int  # the mel bins the head predicts
    dropout: float = 0.1
    attention_dropout: float = 0.1
    eps: float = 1e-12
    dtype: Any = jnp.float32

    def setup(self):
        self.spec_transform = nn.Dense(self.width, dtype=self.dtype, kernel_init=init)
        self.input_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.input_dropout = nn.Dropout(self.dropout)
        self.layers = [
            bert.Layer(self.width, self.heads, self.mlp, self.dropout, self.attention_dropout, self.eps, self.dtype)
            for _ in range(self.depth)
        ]
        self.head_dense = nn.Dense(self.width, dtype=self.dtype, kernel_init=init)
        self.head_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.head_out = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=init)

    def encode(
        self, frames: jax.Array, key_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Hidden states (B, T, width) of the last block, and every block's under 'layer_i'."""
        chex.assert_rank([frames, key_mask], [3, 2])
        table = jnp.asarray(vit.sinusoid_table(frames.shape[1], self.width), self.dtype)
        x = self.spec_transform(frames.astype(self.dtype)) + table
        x = self.input_dropout(self.input_norm(x), deterministic=deterministic)
        intermediates = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, key_mask.astype(bool), deterministic)
            intermediates[f'layer_{i}'] = x
        return x, intermediates

    def __call__(
        self, frames: jax.Array, key_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        hidden, _ = self.encode(frames, key_mask, deterministic)
        x = self.head_norm(nn.gelu(self.head_dense(hidden), approximate=False))
        return self.head_out(x).astype(jnp.float32), hidden


def init_params(model: TERA, rng: jax.Array, frames: jax.Array, key_mask: jax.Array) -> Any:
    """model.init with s3prl's init_Transformer_weights: N(0, 0.02) for every Linear kernel (the BERT blocks' too),
    zero biases, unit LayerNorms."""
    init_rng, dense_rng = jax.random.split(rng)
    return vit.redraw_kernels(model.init(init_rng, frames, key_mask)['params'], dense_rng, init)


def make_model(variant: str, out_dim: int, **overrides: Any) -> TERA:
    """A TERA of a named size (micro, base, slim)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TERA)}
    if unknown:
        raise TypeError(f'unknown TERA fields: {sorted(unknown)}')
    width, depth, heads, mlp = VARIANTS[variant]
    return TERA(width=width, depth=depth, heads=heads, mlp=mlp, out_dim=out_dim, **overrides)
