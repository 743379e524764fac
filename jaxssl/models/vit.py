"""Vision Transformer building blocks shared by every ViT-based method.

Conventions: inputs are channels-last ((B, T, H, W, C) for video, (B, H, W, C) for images); parameters are
float32 and `dtype` sets the compute dtype (e.g. bfloat16); modules that other code probes return
`(output, intermediates)`. Numerics follow the VideoMAE / BEiT reference (shared/reference/videomae_v2.md):
pre-LN blocks, fused qkv projection with q and v biases but no k bias, exact GELU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torch.nn.Linear's reference init in VideoMAE pretraining; torch Conv3d keeps its default, which is
# kaiming_uniform(a=sqrt(5)): uniform(+-1/sqrt(fan_in)) for both kernel and bias.
dense_init = nn.initializers.xavier_uniform()
conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default Linear / Conv bias: uniform in +-1/sqrt(fan_in)."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_dense(features: int, fan_in: int, dtype: Any = jnp.float32, name: str | None = None) -> nn.Dense:
    """A Dense with torch.nn.Linear's default init: kernel (conv_init) and bias uniform in +-1/sqrt(fan_in)."""
    return nn.Dense(features, dtype=dtype, kernel_init=conv_init, bias_init=torch_bias_init(fan_in), name=name)


def sinusoid_table(num_positions: int, dim: int, base: float = 10000.0) -> np.ndarray:
    """The reference's fixed 1-D sin/cos table over the flattened token index, shape (num_positions, dim).

    angle(pos, j) = pos / base^(2 * floor(j / 2) / dim); sin on even j, cos on odd j (interleaved, not
    concatenated). Computed in float64 and returned as float32, like the reference. `base` is 10000 for ViTs;
    T-JEPA's feature tokens use 100.
    """
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    angle = position / np.power(base, exponent)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


def truncated_normal_init(stddev: float) -> nn.initializers.Initializer:
    """N(0, stddev) truncated at +-1 stddev: what the reference's trunc_normal_(std, a=-std, b=std) draws."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)

    return init


def redraw_kernels(params: Any, rng: jax.Array, init: nn.initializers.Initializer) -> Any:
    """`params` with every leaf named 'kernel' drawn anew from `init` (e.g. timm's or BERT's N(0, 0.02) for Linear
    layers that Flax initialises its own way); other leaves are kept."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(rng, len(leaves))
    leaves = [
        init(key, leaf.shape, leaf.dtype) if jax.tree_util.keystr(path).endswith("['kernel']") else leaf
        for (path, leaf), key in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


class PositionEmbedding(nn.Module):
    """Adds a position table to (B, N, D) tokens: the fixed sinusoid ('sincos') or a learned one ('learned').

    The fixed table is a constant (never a parameter, never checkpointed), as in the reference.
    """

    kind: str = 'sincos'

    @nn.compact
    def __call__(self, x: jax.Array, token_idx: jax.Array | None = None, num_tokens: int | None = None) -> jax.Array:
        """x: (B, N, D) tokens; or, with `token_idx` (B, K), the K tokens at those positions of a `num_tokens` grid."""
        _, tokens, width = x.shape
        if token_idx is not None:
            if num_tokens is None:
                raise ValueError('token_idx needs num_tokens, the size of the full position table')
            tokens = num_tokens
        if self.kind == 'sincos':
            table = jnp.asarray(sinusoid_table(tokens, width))[None]
        elif self.kind == 'learned':
            table = self.param('pos_embed', truncated_normal_init(0.02), (1, tokens, width))
        else:
            raise ValueError(f"unknown position embedding '{self.kind}'; valid: sincos, learned")
        if token_idx is not None:
            table = table[0][token_idx]
        return x + table.astype(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a 2D patch (p, p) or a 3D tubelet (t, p, p) embedding.

    Input (B, *spatial, C); output (B, N, width) with tokens in row-major (t, h, w) order, which is
    the reference's flattened token index. `impl` 'conv' runs a strided convolution, 'matmul' cuts the
    patches out with a reshape and runs one matrix product; both keep the convolution's parameters
    ('proj/kernel' (*patch, C, width), 'proj/bias'), so checkpoints do not depend on the choice.
    """

    width: int
    patch: Sequence[int]
    dtype: Dtype = jnp.float32
    impl: str = 'matmul'  # 1.25x faster ViT-B train steps than 'conv' on an H200 (docs/performance.md)

    @nn.compact
    def __call__(self, x: jax.Array, token_idx: jax.Array | None = None) -> jax.Array:
        """x: (B, *spatial, C) -> (B, N, width); with `token_idx` (B, K), only those K tokens (B, K, width)."""
        patch = tuple(self.patch)
        chex.assert_rank(x, len(patch) + 2)
        for axis, size in enumerate(patch):
            if x.shape[1 + axis] % size:
                raise ValueError(f'input shape {x.shape[1:-1]} is not divisible by patch {patch}')
        fan_in = int(np.prod(patch)) * x.shape[-1]
        bound = 1 / np.sqrt(fan_in)
        bias_init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
        if self.impl == 'conv':
            x = nn.Conv(
                self.width,
                kernel_size=patch,
                strides=patch,
                padding='VALID',
                dtype=self.dtype,
                kernel_init=conv_init,
                bias_init=bias_init,
                name='proj',
            )(x)
            x = x.reshape(x.shape[0], -1, self.width)
            return x if token_idx is None else jnp.take_along_axis(x, token_idx[..., None], axis=1)
        if self.impl == 'matmul':  # picks the patches first: unselected tokens cost nothing
            return _PatchMatmul(self.width, patch, self.dtype, bias_init, name='proj')(x, token_idx)
        raise ValueError(f"unknown patch embedding impl '{self.impl}'; valid: conv, matmul")


class _PatchMatmul(nn.Module):
    """The strided convolution of PatchEmbed as reshape + one matmul (same parameters, same result)."""

    width: int
    patch: tuple[int, ...]
    dtype: Dtype
    bias_init: Callable

    @nn.compact
    def __call__(self, x: jax.Array, token_idx: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param('kernel', conv_init, (*self.patch, channels, self.width))
        bias = self.param('bias', self.bias_init, (self.width,))
        # Cast first: the transpose and gather below then move compute-dtype (e.g. bf16) bytes, not float32 ones.
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel.reshape(-1, self.width), bias, dtype=self.dtype)
        grid = [size // p for size, p in zip(x.shape[1:-1], self.patch, strict=True)]
        # (B, g0, p0, g1, p1, ..., C) -> (B, g0, g1, ..., p0, p1, ..., C): patches become rows.
        x = x.reshape(x.shape[0], *(d for pair in zip(grid, self.patch, strict=True) for d in pair), channels)
        rank = len(self.patch)
        order = (0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1)
        x = x.transpose(order).reshape(x.shape[0], int(np.prod(grid)), -1)
        if token_idx is not None:
            x = jnp.take_along_axis(x, token_idx[..., None], axis=1)
        return x @ kernel + bias


def grid_positions(grid_h: int, grid_w: int) -> np.ndarray:
    """Integer (row, col) of each token of a (grid_h, grid_w) patch grid in raster order, int32 (grid_h * grid_w, 2):
    CroCo's PositionGetter (torch.cartesian_prod(y, x)), the `positions` that `rope_2d` takes."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.int32)


def rope_2d(x: jax.Array, positions: jax.Array, base: float = 100.0) -> jax.Array:
    """2-D rotary position embedding (CroCo v2's RoPE2D, naver/croco models/pos_embed.py) of (B, N, heads, head_dim)
    queries or keys at integer `positions` (B, N, 2) or (N, 2), (row, col) per token.

    The first half of each head's dims rotates with the row, the second half with the column; within a half of
    size m, dim j pairs with dim j + m / 2 (rotate-half, not interleaved), both at angle pos * base^(-2j / m) for
    j < m / 2: t * cos + rotate_half(t) * sin with rotate_half(a, b) = (-b, a). A dot product of a rotated query
    and key then depends on their positions only through the difference. Computed in float32, returned in x's dtype.
    """
    chex.assert_rank(x, 4)
    head_dim = x.shape[-1]
    if head_dim % 4:
        raise ValueError(f'2-D RoPE needs a head dim divisible by 4, got {head_dim}')
    if positions.shape[-2:] != (x.shape[1], 2):
        raise ValueError(f'positions {positions.shape} do not fit {x.shape[1]} tokens (need (..., N, 2))')
    half = head_dim // 2
    inv_freq = jnp.asarray(1.0 / base ** (np.arange(0, half, 2, dtype=np.float64) / half), jnp.float32)

    def rotate(t: jax.Array, pos: jax.Array) -> jax.Array:
        angle = pos.astype(jnp.float32)[..., None] * inv_freq  # (..., N, m / 2)
        angle = jnp.concatenate([angle, angle], axis=-1)[..., None, :]  # (..., N, 1, m): broadcast over heads
        first, second = jnp.split(t, 2, axis=-1)
        return t * jnp.cos(angle) + jnp.concatenate([-second, first], axis=-1) * jnp.sin(angle)

    rows, cols = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([rotate(rows, positions[..., 0]), rotate(cols, positions[..., 1])], axis=-1)
    return out.astype(x.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    impl: str | None = None,
    is_causal: bool = False,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention over (B, N, heads, head_dim) inputs; `is_causal` lets token i attend to tokens <= i only;
    `key_mask` (B, N) bool, if given, hides the False keys (padding) from every query.

    `impl` None (or '' / 'auto') picks cuDNN's fused flash attention on a GPU for bf16 / fp16 inputs it supports
    and XLA's otherwise: jax's own default (None) runs the unfused XLA attention even on GPUs. 'xla' and
    'cudnn' force one.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if impl in (None, '', 'auto'):
        if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation='cudnn')
            except (ValueError, NotImplementedError, RuntimeError):
                pass  # a shape or dtype cuDNN does not take: XLA's attention below
        impl = 'xla'
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)


def take_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, N, ...) at index (B, K) -> (B, K, ...): each example's tokens at its own indices."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def put_tokens(x: jax.Array, index: jax.Array, valid: jax.Array, values: jax.Array) -> jax.Array:
    """x (B, N, C) with the valid rows of values (B, K, C) written at index (B, K); invalid rows (padding) go
    nowhere."""
    target = jnp.where(valid, index, x.shape[1])
    return x.at[jnp.arange(x.shape[0])[:, None], target].set(values.astype(x.dtype), mode='drop')


class FusedKernel(nn.Module):
    """The (in, features) kernel nn.Dense(features, use_bias=False) would create under this module's name: the same
    parameter path and init, for code that multiplies by slices of it."""

    features: int
    kernel_init: Callable = dense_init

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param('kernel', self.kernel_init, (in_features, self.features), jnp.float32)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, q and v biases, no k bias.

    `split_qkv` computes q, k and v as three matmuls with slices of the one (D, 3D) kernel (same parameters, same
    numbers), so none of them is a strided slice of a (B, N, 3D) product that must be copied out for the attention
    kernel (and concatenated back in the backward pass): a throughput lever (docs/performance.md).

    `num_context` > 0 restricts the keys and values to the first `num_context` tokens while every token still queries
    (MP3's masked context: the other tokens read the context but are never read).
    With `positions` (B, N, 2) or (N, 2) (each token's (row, col)), queries and keys get 2-D RoPE (`rope_2d`, base
    `rope_base`) before the product; without, nothing changes.
    """

    width: int
    heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # see dot_product_attention
    num_context: int = 0
    rope_base: float = 100.0  # CroCo v2's RoPE100; used only with positions
    split_qkv: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, key_mask: jax.Array | None = None
    ) -> jax.Array:
        batch, tokens, _ = x.shape
        if self.width % self.heads:
            raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')
        if self.split_qkv:
            kernel = FusedKernel(3 * self.width, name='qkv')(x.shape[-1])
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            q, k, v = (x @ kernel[:, i * self.width : (i + 1) * self.width] for i in range(3))
            if self.qkv_bias:
                q = q + self.param('q_bias', nn.initializers.zeros, (self.width,)).astype(q.dtype)
                v = v + self.param('v_bias', nn.initializers.zeros, (self.width,)).astype(v.dtype)
            q, k, v = (t.reshape(batch, tokens, self.heads, -1) for t in (q, k, v))
        else:
            qkv = nn.Dense(3 * self.width, use_bias=False, dtype=self.dtype, kernel_init=dense_init, name='qkv')(x)
            if self.qkv_bias:
                q_bias = self.param('q_bias', nn.initializers.zeros, (self.width,))
                v_bias = self.param('v_bias', nn.initializers.zeros, (self.width,))
                bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
                qkv = qkv + bias.astype(qkv.dtype)
            q, k, v = (t[:, :, 0] for t in jnp.split(qkv.reshape(batch, tokens, 3, self.heads, -1), 3, axis=2))
        if positions is not None:
            q, k = rope_2d(q, positions, self.rope_base), rope_2d(k, positions, self.rope_base)
        if self.num_context:
            k, v = k[:, : self.num_context], v[:, : self.num_context]
        out = dot_product_attention(q, k, v, self.attention_impl, key_mask=key_mask)
        out = out.reshape(batch, tokens, self.width)
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init, name='proj')(out)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2. Two throughput levers:
    - `approximate_gelu`: the tanh form (cuBLAS can apply it in the matmul's epilogue; it differs from the erf form
      by < 1e-3 and so from the reference's numbers);
    - `recompute_gelu`: the backward recomputes the GELU from fc1's output (which it keeps anyway) instead of
      keeping the forward's intermediates (for the erf form, two more (tokens, hidden) arrays per layer). The
      numbers are the same; it trades memory traffic for recomputing an elementwise function.
    """

    hidden: int
    dtype: Dtype = jnp.float32
    approximate_gelu: bool = False
    recompute_gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
        gelu = functools.partial(nn.gelu, approximate=self.approximate_gelu)
        x = jax.checkpoint(gelu)(x) if self.recompute_gelu else gelu(x)
        return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)


def drop_path(x: jax.Array, rate: jax.Array | float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`, rescaling the rest."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


class Block(nn.Module):
    """Pre-LN transformer block: x += DropPath(Attn(LN x)); x += DropPath(MLP(LN x)); optional layer scale.

    `drop_path_rate` is a call argument (not a field) so that a scanned stack can give each layer its own rate.
    `positions` (optional, see Attention) turns on 2-D RoPE in the attention; `key_mask` (optional, (B, N) bool)
    hides the False tokens (padding) from attention. Returns (x, None) so the block can be
    used directly as an nn.scan body.
    """

    width: int
    heads: int
    mlp_hidden: int
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.0  # > 0 enables the reference's gamma_1 / gamma_2
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    num_context: int = 0  # > 0: keys / values from the first num_context tokens only (see Attention)
    rope_base: float = 100.0
    split_qkv: bool = False  # throughput levers, see Attention and Mlp
    approximate_gelu: bool = False
    recompute_gelu: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        drop_path_rate: jax.Array | float = 0.0,
        train: bool = False,
        positions: jax.Array | None = None,
        key_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        def residual(branch: jax.Array, name: str) -> jax.Array:
            if self.layer_scale_init > 0:
                gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (self.width,))
                branch = branch * gamma.astype(branch.dtype)
            if train:
                branch = drop_path(branch, drop_path_rate, self.make_rng('drop_path'))
            return branch

        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        attention = Attention(
            self.width,
            self.heads,
            self.qkv_bias,
            self.dtype,
            self.attention_impl,
            num_context=self.num_context,
            rope_base=self.rope_base,
            split_qkv=self.split_qkv,
            name='attn',
        )
        y = attention(norm('norm1')(x), positions, key_mask)
        x = x + residual(y, 'gamma_1')
        mlp = Mlp(self.mlp_hidden, self.dtype, self.approximate_gelu, self.recompute_gelu, name='mlp')
        y = mlp(norm('norm2')(x))
        x = x + residual(y, 'gamma_2')
        return x, None


class Transformer(nn.Module):
    """A stack of `depth` Blocks with linearly increasing drop-path rates, then an optional final LayerNorm.

    Parameters are named `block_00`, `block_01`, ... or, with `scan_layers`, stacked along a leading axis
    under `blocks` (one compiled body: much faster compiles for deep models). `scan_unroll` layers run per loop
    iteration of the scan; 0 unrolls all of them: straight-line code with the stacked layout, whose few large
    leaves make the optimiser's updates a few kernels instead of one per layer and leaf. `remat` recomputes each
    block in the backward pass. Intermediates hold 'block_XX' outputs (unscanned only) and 'pre_norm'. `key_mask`
    (optional, (B, N) bool) hides the False tokens (padding) from every block's attention. `positions`
    (optional, (B, N, 2) or (N, 2) token (row, col)) gives every block's attention 2-D RoPE (base `rope_base`).
    """

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    final_norm: bool = True
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    num_context: int = 0  # > 0: every block's keys / values are the first num_context tokens (see Attention)
    rope_base: float = 100.0
    split_qkv: bool = False  # throughput levers, see Attention and Mlp
    approximate_gelu: bool = False
    recompute_gelu: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        positions: jax.Array | None = None,
        key_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank(x, 3)
        chex.assert_axis_dimension(x, 2, self.width)
        x = x.astype(self.dtype)
        block_kwargs = dict(
            width=self.width,
            heads=self.heads,
            mlp_hidden=self.mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            qkv_bias=self.qkv_bias,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            num_context=self.num_context,
            rope_base=self.rope_base,
            split_qkv=self.split_qkv,
            approximate_gelu=self.approximate_gelu,
            recompute_gelu=self.recompute_gelu,
        )
        rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
        block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        intermediates = {}
        if self.scan_layers:
            stack = nn.scan(
                block_cls,
                variable_axes={'params': 0},
                split_rngs={'params': True, 'drop_path': True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.depth,
                unroll=self.scan_unroll or self.depth,
            )(**block_kwargs, name='blocks')
            x, _ = stack(x, jnp.asarray(rates), train, positions, key_mask)
        else:
            for i in range(self.depth):
                block = block_cls(**block_kwargs, name=f'block_{i:02d}')
                x, _ = block(x, float(rates[i]), train, positions, key_mask)
                intermediates[f'block_{i:02d}'] = x
        intermediates['pre_norm'] = x
        if self.final_norm:
            x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='norm')(x)
        return x, intermediates


def stack_blocks(params: dict, depth: int) -> dict:
    """Converts unscanned `block_XX` parameters of a Transformer into the scanned `blocks` layout."""
    params = dict(params)
    blocks = [params.pop(f'block_{i:02d}') for i in range(depth)]
    params['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return params


def unstack_blocks(params: dict) -> dict:
    """Inverse of `stack_blocks`."""
    params = dict(params)
    blocks = params.pop('blocks')
    depth = jax.tree.leaves(blocks)[0].shape[0]
    for i in range(depth):
        params[f'block_{i:02d}'] = jax.tree.map(lambda x, i=i: x[i], blocks)
    return params
