"""T-JEPA's networks (Thimonier et al., arXiv 2410.05016; reference jose-melo/t-jepa @ 98dda99, src/encoder.py and
src/predictors.py): an FT-Transformer-style feature tokenizer with [REG] tokens, a post-norm ReLU transformer encoder,
and a narrow transformer predictor that fills target feature slots from the encoded context.

Token sequence of a row: `reg_tokens` [REG] tokens, then one token per numerical feature, then one per categorical
feature, in that order (positions 0 .. R + D - 1). A row arrives as one float array (B, Dn + Dc): scaled numerical
values, then category indices (see jaxssl.data.tabular).

Masked (padded) tokens: the context and target sets differ in size from batch to batch; they are padded to a fixed size
and `key_mask` hides the padding from attention, so the real tokens' outputs equal those of the unpadded sequence and
shapes stay static under jit.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models.vit import sinusoid_table

# Sizes: 'jannis' is the reference's tuned launch script (scripts/launch_tjepa.sh); 'small' and 'tiny' are CPU-sized;
# 'micro' is for tests (one block each: compiles fastest).
VARIANTS = {
    'jannis': dict(width=64, depth=16, heads=2, mlp=64, pred_width=16, pred_depth=16, pred_heads=4, pred_mlp=256),
    'small': dict(width=64, depth=4, heads=2, mlp=64, pred_width=16, pred_depth=4, pred_heads=4, pred_mlp=64),
    'tiny': dict(width=32, depth=2, heads=2, mlp=64, pred_width=16, pred_depth=2, pred_heads=2, pred_mlp=32),
    'micro': dict(width=16, depth=1, heads=2, mlp=32, pred_width=8, pred_depth=1, pred_heads=2, pred_mlp=16),
}

# The reference re-initialises every Linear and Embedding with trunc_normal_(std=0.02, a=-2, b=2) (bounds are
# absolute, so 100 std: a plain normal) and zero biases; torch's MultiheadAttention keeps its xavier-uniform in_proj.
dense_init = nn.initializers.normal(0.02)


def decode_variant(variant: str) -> dict[str, int]:
    if variant not in VARIANTS:
        raise ValueError(f'unknown T-JEPA variant {variant!r}; valid: {", ".join(VARIANTS)}')
    return dict(VARIANTS[variant])


def sincos_table(num_positions: int, dim: int) -> np.ndarray:
    """The predictor's fixed table (I-JEPA's get_1d_sincos_pos_embed): [sin(p w) | cos(p w)], w = 10000^(-2i/dim),
    sines and cosines concatenated (not interleaved), float32 (num_positions, dim)."""
    if dim % 2:
        raise ValueError(f'the sin-cos table needs an even width, got {dim}')
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angle = np.arange(num_positions, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def _kaiming_uniform_rows(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """torch's kaiming_uniform_(a=sqrt(5)) on an (n, width) Parameter: fan_in is the width, bound 1 / sqrt(width)."""
    bound = 1.0 / math.sqrt(shape[-1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Tokenizer(nn.Module):
    """Feature tokens: numerical x_j W_j + b_j, categorical E_j[x_j] + b_j, [REG] tokens W_r (a learned vector each);
    then the fixed interleaved sin/cos position table with base 100 over all R + D positions."""

    num_numerical: int
    cardinalities: tuple[int, ...]
    width: int
    reg_tokens: int = 1

    @nn.compact
    def __call__(self, rows: jax.Array) -> jax.Array:
        """rows (B, Dn + Dc) -> tokens (B, R + Dn + Dc, width)."""
        num, cat, reg = self.num_numerical, len(self.cardinalities), self.reg_tokens
        chex.assert_rank(rows, 2)
        chex.assert_axis_dimension(rows, 1, num + cat)
        batch = rows.shape[0]
        # As the reference, [REG] tokens share the numerical weight matrix (rows 0..R-1, times a constant 1) and get
        # no bias; the bias covers the D feature tokens.
        weight = self.param('weight', _kaiming_uniform_rows, (reg + num, self.width))
        bias = self.param('bias', _kaiming_uniform_rows, (num + cat, self.width))
        parts = [jnp.broadcast_to(weight[:reg], (batch, reg, self.width))]
        if num:
            parts.append(rows[:, :num, None] * weight[reg:] + bias[:num])
        if cat:
            # One table for all categorical columns, offset per column (the reference keeps one nn.Embedding each).
            table = self.param('category_embeddings', dense_init, (sum(self.cardinalities), self.width))
            offsets = jnp.asarray(np.cumsum((0, *self.cardinalities[:-1])), jnp.int32)
            codes = rows[:, num:].astype(jnp.int32) + offsets
            parts.append(table[codes] + bias[num:])
        tokens = jnp.concatenate(parts, axis=1)
        return tokens + jnp.asarray(sinusoid_table(reg + num + cat, self.width, base=100.0))


class Attention(nn.Module):
    """torch.nn.MultiheadAttention: fused in-projection with biases, dropout on the attention weights, padded keys
    hidden by `key_mask` (True = a real token)."""

    width: int
    heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
        batch, tokens, _ = x.shape
        if self.width % self.heads:
            raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')
        head_dim = self.width // self.heads
        qkv = nn.Dense(3 * self.width, kernel_init=nn.initializers.xavier_uniform(), name='in_proj')(x)
        q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.heads, head_dim), 3, axis=2)
        logits = jnp.einsum('bqhd,bkhd->bhqk', q[:, :, 0], k[:, :, 0]) / math.sqrt(head_dim)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=not train)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights, v[:, :, 0]).reshape(batch, tokens, self.width)
        return nn.Dense(self.width, kernel_init=dense_init, name='out_proj')(out)


class Block(nn.Module):
    """torch.nn.TransformerEncoderLayer with its defaults: post-norm, ReLU feed-forward, dropout in three places."""

    width: int
    heads: int
    mlp: int
    dropout: float = 0.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        attended = Attention(self.width, self.heads, self.dropout, name='self_attn')(x, key_mask, train)
        x = nn.LayerNorm(epsilon=self.eps, name='norm1')(x + drop(attended))
        y = nn.relu(nn.Dense(self.mlp, kernel_init=dense_init, name='linear1')(x))
        y = nn.Dense(self.width, kernel_init=dense_init, name='linear2')(drop(y))
        return nn.LayerNorm(epsilon=self.eps, name='norm2')(x + drop(y))


class TabularTransformer(nn.Module):
    """The reference's TabularEncoder: the block stack, then Dropout -> LayerNorm -> Linear -> Dropout -> LayerNorm."""

    width: int
    depth: int
    heads: int
    mlp: int
    dropout: float = 0.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.mlp, self.dropout, self.eps, name=f'block_{i:02d}')(
                x, key_mask, train
            )
        x = nn.LayerNorm(epsilon=self.eps, name='norm1')(drop(x))
        x = drop(nn.Dense(self.width, kernel_init=dense_init, name='fc')(x))
        return nn.LayerNorm(epsilon=self.eps, name='norm2')(x)


class Encoder(nn.Module):
    """Tokenizer + transformer. The context encoder passes `positions` (B, K): it encodes only those tokens (the
    reference drops the others before the transformer); the target encoder and evaluation encode the whole row."""

    num_numerical: int
    cardinalities: tuple[int, ...]
    width: int
    depth: int
    heads: int
    mlp: int
    reg_tokens: int = 1
    dropout: float = 0.0
    eps: float = 1e-5

    @nn.compact
    def __call__(
        self,
        rows: jax.Array,
        positions: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """rows (B, D) -> (encoded (B, K or R + D, width), {'tokens': the tokenizer output before selection})."""
        tokens = Tokenizer(self.num_numerical, self.cardinalities, self.width, self.reg_tokens, name='tokenizer')(rows)
        x = tokens
        if positions is not None:
            chex.assert_rank(positions, 2)
            x = jnp.take_along_axis(tokens, positions[..., None], axis=1)
        if key_mask is not None:
            chex.assert_equal_shape_prefix((x, key_mask), 2)
        encoded = TabularTransformer(
            self.width, self.depth, self.heads, self.mlp, self.dropout, self.eps, name='transformer'
        )(x, key_mask, train)
        return encoded, {'tokens': tokens}


class Predictor(nn.Module):
    """The reference's TransformerPredictor: context tokens projected to `pred_width` plus the fixed sin-cos table at
    their positions; one learned mask token plus the table at each target position; for each of the M target sets the
    context and its target slots go through a TabularTransformer, a LayerNorm, and the target slots are projected back
    to the encoder width."""

    width: int
    pred_width: int
    depth: int
    heads: int
    mlp: int
    num_positions: int  # R + D: the predictor's table covers the [REG] positions too
    dropout: float = 0.0
    eps: float = 1e-5

    @nn.compact
    def __call__(
        self,
        context: jax.Array,
        context_positions: jax.Array,
        context_mask: jax.Array,
        target_positions: jax.Array,
        target_mask: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """context (B, C, width), positions / masks (B, C); targets (B, M, T) -> predictions (B, M, T, width)."""
        batch, num_context, _ = context.shape
        _, num_sets, num_targets = target_positions.shape
        chex.assert_shape((context_positions, context_mask), (batch, num_context))
        chex.assert_shape(target_mask, (batch, num_sets, num_targets))
        table = jnp.asarray(sincos_table(self.num_positions, self.pred_width))
        x = nn.Dense(self.pred_width, kernel_init=dense_init, name='embed')(context) + table[context_positions]
        mask_token = self.param('mask_token', dense_init, (self.pred_width,))
        slots = mask_token + table[target_positions]  # (B, M, T, pred_width)
        # Each target set sees the whole context: repeat it per set and fold the sets into the batch.
        x = jnp.broadcast_to(x[:, None], (batch, num_sets, num_context, self.pred_width))
        x = jnp.concatenate([x, slots], axis=2).reshape(batch * num_sets, num_context + num_targets, self.pred_width)
        keys = jnp.broadcast_to(context_mask[:, None], (batch, num_sets, num_context))
        keys = jnp.concatenate([keys, target_mask], axis=2).reshape(batch * num_sets, -1)
        x = TabularTransformer(
            self.pred_width, self.depth, self.heads, self.mlp, self.dropout, self.eps, name='transformer'
        )(x, keys, train)
        x = nn.LayerNorm(epsilon=1e-5, name='norm')(x)[:, num_context:]
        x = nn.Dense(self.width, kernel_init=dense_init, name='proj')(x)
        return x.reshape(batch, num_sets, num_targets, self.width)
