"""NeRF-MAE's network (Irshad et al., ECCV 2024): a 3-D Swin Transformer over a radiance grid and a UNETR decoder.

As the official code (zubair-irshad/NeRF-MAE@721b5ee nerf_mae/model/mae/swin_mae3d.py, class
SwinTransformer_MAE3D_New, which run_swin_mae3d.py trains; unetr_block.py; torch_utils.py), channels last:

- patch partition: Conv3d(4 -> C, kernel = stride = p), LayerNorm; the fixed 3-D sin-cos table (below) is added,
  then masked tokens are replaced by a learned mask token (so they carry no position);
- stages i = 0..S-1 of width C 2^i: PatchMerging (stages > 0: the 8 voxels of each 2^3 cell concatenated in the
  reference's order, LayerNorm, Linear 8C -> 2C without bias), then Swin blocks x += DropPath(W-MSA(LN x)),
  x += DropPath(MLP(LN x)); odd blocks shift their windows by half a window. Stochastic depth grows linearly from 0
  to `drop_path` over all blocks. Every stage's output is kept (no final norm);
- window attention as torchvision's Swin made 3-D: pad to whole windows with zeros (padded tokens are attended to,
  unmasked, as in the reference), no shift on an axis whose padded size fits in one window, cyclic shift, a learned
  relative-position bias per head over the (2w - 1)^3 offsets, the -100 mask between shifted regions;
- decoder (UNETR up-blocks): from the last stage, ConvTranspose3d (kernel = stride = 2) to the next lower stage's
  width, concatenated with that stage's output, UnetResBlock; the last up-block goes from stage 0 by kernel =
  stride = p to C / 2 channels without a skip; a 1 x 1 conv to 4 channels (RGB, alpha logit). UnetResBlock:
  conv3 -> InstanceNorm -> LeakyReLU(0.01) -> conv3 -> InstanceNorm, + the input (through conv1 + InstanceNorm when
  the widths differ), LeakyReLU. InstanceNorm3d is torch's default: no affine, eps 1e-5, per sample and channel.

Init: every Linear N(0, 0.02) with zero bias (the reference's trunc_normal_ loop over modules, run after the
blocks'; its +-2 cut never bites at this std), the bias tables N(0, 0.02), the mask token N(0, 0.02); convolutions
torch's default kernel (kaiming uniform, a = sqrt 5, the transposed ones with torch's fan: out x k^3) with zero
biases (torch draws small uniform biases).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models.vit import drop_path

DENSE_INIT = nn.initializers.normal(0.02)  # torch trunc_normal_(std=.02) cuts at +-2 absolute: never, at this std
# ConvTranspose3d's weight is (in, out, k, k, k) in torch, whose kaiming_uniform_ takes the fan from its second axis.
TORCH_CONV_TRANSPOSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')  # kaiming_uniform_(a=sqrt 5)
SHIFT_MASK = -100.0  # torchvision's value between tokens of different shifted regions
LEAKY_SLOPE = 0.01  # unetr_block.py's LeakyReLU


def sincos_3d(dim: int, grid: int) -> np.ndarray:
    """torch_utils.get_3d_sincos_pos_embed as a (grid, grid, grid, dim) table: three 1-D MAE tables of dim / 3
    channels (sin half, then cos half; omega = 1 / 10000^(j / (dim / 6))), for axes (1, 0, 2) in that order (its
    meshgrid puts the second axis first)."""
    if dim % 6:
        raise ValueError(f'the 3-D sin-cos table needs a width divisible by 6, got {dim}')
    part = dim // 3
    omega = 1.0 / 10000 ** (np.arange(part // 2, dtype=np.float64) / (part / 2.0))
    pos = np.arange(grid, dtype=np.float64)
    one_axis = np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], axis=1)  # (grid, part)
    table = np.empty((grid, grid, grid, dim), np.float64)
    table[..., :part] = one_axis[None, :, None, :]  # the second axis
    table[..., part : 2 * part] = one_axis[:, None, None, :]  # the first axis
    table[..., 2 * part :] = one_axis[None, None, :, :]  # the third axis
    return table.astype(np.float32)


def relative_position_index(window: int) -> np.ndarray:
    """(w^3, w^3) indices into the (2w - 1)^3 bias table: offsets along the three axes, row-major."""
    coords = np.stack(np.meshgrid(*[np.arange(window)] * 3, indexing='ij')).reshape(3, -1)
    offsets = coords[:, :, None] - coords[:, None, :] + window - 1  # (3, N, N), each in [0, 2w - 2]
    span = 2 * window - 1
    return offsets[0] * span * span + offsets[1] * span + offsets[2]


def shift_regions(padded: Sequence[int], window: int, shift: Sequence[int]) -> np.ndarray:
    """(nW, w^3) region ids of the tokens of each window after a cyclic shift: torchvision's slices (0, -w), (-w,
    -s), (-s, None) per axis, numbered row-major; tokens of different regions must not attend to each other."""
    ids = np.zeros(tuple(padded), np.int32)
    cuts = [((0, -window), (-window, -s), (-s, None)) for s in shift]
    for count, (a, b, c) in enumerate(itertools.product(*cuts)):
        ids[a[0] : a[1], b[0] : b[1], c[0] : c[1]] = count
    return partition(ids[None, ..., None], window)[..., 0]


def partition(x: jax.Array | np.ndarray, window: int) -> Any:
    """(B, X, Y, Z, C) with sides divisible by w -> (B nW, w^3, C), windows row-major, tokens row-major inside."""
    b, nx, ny, nz, c = x.shape
    x = x.reshape(b, nx // window, window, ny // window, window, nz // window, window, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, window**3, c)


def unpartition(x: jax.Array, window: int, shape: Sequence[int]) -> jax.Array:
    b, nx, ny, nz, c = shape
    x = x.reshape(b, nx // window, ny // window, nz // window, window, window, window, c)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, nx, ny, nz, c)


class WindowAttention(nn.Module):
    """Shifted-window multi-head self-attention over (B, X, Y, Z, C) (the reference's shifted_window_attention)."""

    heads: int
    window: int
    shift: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, sx, sy, sz, c = x.shape
        w = self.window
        pads = [(-s) % w for s in (sx, sy, sz)]
        x = jnp.pad(x, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
        padded = x.shape[1:4]
        shift = [0 if w >= size else self.shift for size in padded]
        if any(shift):
            x = jnp.roll(x, [-s for s in shift], axis=(1, 2, 3))
        windows = partition(x, w)  # (B nW, N, C)
        n = w**3
        head_dim = c // self.heads
        qkv = nn.Dense(3 * c, kernel_init=DENSE_INIT, name='qkv')(windows)
        qkv = qkv.reshape(-1, n, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)  # (3, B nW, H, N, hd)
        q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
        attn = q @ jnp.swapaxes(k, -1, -2)  # (B nW, H, N, N)
        table = self.param('relative_position_bias_table', DENSE_INIT, ((2 * w - 1) ** 3, self.heads))
        bias = table[relative_position_index(w).reshape(-1)].reshape(n, n, self.heads).transpose(2, 0, 1)
        attn = attn + bias[None]
        if any(shift):
            regions = shift_regions(padded, w, shift)  # (nW, N)
            mask = np.where(regions[:, :, None] != regions[:, None, :], SHIFT_MASK, 0.0).astype(np.float32)
            attn = attn.reshape(b, -1, self.heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, self.heads, n, n)
        attn = jax.nn.softmax(attn, axis=-1)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(-1, n, c)
        out = nn.Dense(c, kernel_init=DENSE_INIT, name='proj')(out)
        out = unpartition(out, w, (b, *padded, c))
        if any(shift):
            out = jnp.roll(out, shift, axis=(1, 2, 3))
        return out[:, :sx, :sy, :sz]


class SwinBlock(nn.Module):
    heads: int
    window: int
    shift: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: float, rng: jax.Array | None) -> jax.Array:
        c = x.shape[-1]
        keys = jax.random.split(rng) if rng is not None and drop_rate > 0 else (None, None)
        branch = WindowAttention(self.heads, self.window, self.shift, name='attn')(
            nn.LayerNorm(epsilon=1e-5, name='norm1')(x)
        )
        x = x + (drop_path(branch, drop_rate, keys[0]) if keys[0] is not None else branch)
        h = nn.LayerNorm(epsilon=1e-5, name='norm2')(x)
        h = nn.Dense(int(c * self.mlp_ratio), kernel_init=DENSE_INIT, name='fc1')(h)
        h = nn.Dense(c, kernel_init=DENSE_INIT, name='fc2')(nn.gelu(h, approximate=False))  # torch's exact GELU
        return x + (drop_path(h, drop_rate, keys[1]) if keys[1] is not None else h)


class PatchMerging(nn.Module):
    """2x downsampling: each 2^3 cell's voxels concatenated as the reference's x0..x7 (offsets (0,0,0), (1,0,0),
    (0,1,0), (1,1,0), (0,0,1), (1,0,1), (0,1,1), (1,1,1)), LayerNorm(8C), Linear 8C -> 2C without bias. Odd sides
    are zero-padded first."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, x.shape[3] % 2), (0, 0)))
        offsets = [(i, j, k) for k in (0, 1) for j in (0, 1) for i in (0, 1)]
        x = jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in offsets], axis=-1)
        x = nn.LayerNorm(epsilon=1e-5, name='norm')(x)
        return nn.Dense(2 * c, use_bias=False, kernel_init=DENSE_INIT, name='reduction')(x)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """torch's InstanceNorm3d default: per sample and channel over space, biased variance, no affine."""
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def conv3d(features: int, kernel: int, name: str) -> nn.Conv:
    return nn.Conv(
        features, (kernel,) * 3, padding=kernel // 2, kernel_init=TORCH_CONV_INIT, bias_init=nn.initializers.zeros,
        name=name,
    )  # fmt: skip


class BlockUpsample(nn.Module):
    """ConvTranspose3d with kernel = stride = k and no padding: each voxel becomes a k^3 block, out[k i + a] =
    in[i] . W[a] + b. The kernel is stored (k, k, k, in, out) (torch's (in, out, k, k, k) transposed)."""

    features: int
    factor: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, (b, sx, sy, sz, c) = self.factor, x.shape
        kernel = self.param('kernel', TORCH_CONV_TRANSPOSE_INIT, (k, k, k, c, self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        y = jnp.einsum('bxyzc,ijkco->bxiyjzko', x, kernel) + bias
        return y.reshape(b, sx * k, sy * k, sz * k, self.features)


class ResBlock(nn.Module):
    """unetr_block.UnetResBlock (3x3x3 convs, InstanceNorm, LeakyReLU 0.01, a 1x1 conv on the residual when the
    widths differ)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = functools.partial(nn.leaky_relu, negative_slope=LEAKY_SLOPE)
        out = act(instance_norm(conv3d(self.features, 3, 'conv1')(x)))
        out = instance_norm(conv3d(self.features, 3, 'conv2')(out))
        residual = x
        if x.shape[-1] != self.features:
            residual = instance_norm(conv3d(self.features, 1, 'conv3')(x))
        return act(out + residual)


class UpBlock(nn.Module):
    """unetr_block.UnetrUpBlock with res_block=True: upsample, [up, skip] on channels, ResBlock."""

    features: int
    factor: int

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        x = BlockUpsample(self.features, self.factor, name='transp_conv')(x)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return ResBlock(self.features, name='conv_block')(x)


class NeRFMAE(nn.Module):
    """Masked radiance grid (B, R, R, R, 4) -> (B, R, R, R, 4) predictions (RGB, alpha logit) and stage outputs."""

    patch: int = 4
    width: int = 96
    depths: Sequence[int] = (2, 2, 18, 2)
    heads: Sequence[int] = (3, 6, 12, 24)
    window: int = 4
    drop_path: float = 0.1
    out_channels: int = 4

    @nn.compact
    def __call__(
        self, grid: jax.Array, token_mask: jax.Array | None = None, rng: jax.Array | None = None
    ) -> dict[str, Any]:
        """grid: (B, R, R, R, 4); token_mask: (B or 1, n, n, n) bool, True = masked (n = R / patch); rng: drop path
        (None: deterministic). Returns 'prediction' (B, R, R, R, out_channels) and 'stages' [(B, n / 2^i, ..., C
        2^i)]."""
        chex.assert_rank(grid, 5)
        p, c0 = self.patch, self.width
        if c0 % 2:
            raise ValueError(f'width {c0} must be even (the last up-block has width / 2 channels)')
        x = nn.Conv(c0, (p,) * 3, strides=(p,) * 3, padding='VALID', kernel_init=TORCH_CONV_INIT, name='patch_embed')(
            grid
        )
        x = nn.LayerNorm(epsilon=1e-5, name='patch_norm')(x)
        n = x.shape[1]
        if not x.shape[1] == x.shape[2] == x.shape[3]:
            raise ValueError(f'NeRF-MAE works on cubic grids; got tokens {x.shape[1:4]}')
        x = x + jnp.asarray(sincos_3d(c0, n))[None]
        if token_mask is not None:
            chex.assert_shape(token_mask, (None, n, n, n))
            mask_token = self.param('mask_token', DENSE_INIT, (c0,))
            x = jnp.where(token_mask[..., None], mask_token, x)
        total = sum(self.depths)
        rates = [self.drop_path * i / max(total - 1, 1) for i in range(total)]
        keys = list(jax.random.split(rng, total)) if rng is not None else [None] * total
        stages, block = [], 0
        for s, (depth, heads) in enumerate(zip(self.depths, self.heads, strict=True)):
            if s > 0:
                x = PatchMerging(name=f'merge{s}')(x)
            for i in range(depth):
                shift = 0 if i % 2 == 0 else self.window // 2
                x = SwinBlock(heads, self.window, shift, name=f'stage{s}_block{i}')(x, rates[block], keys[block])
                block += 1
            stages.append(x)
        y = stages[-1]
        for s in range(len(stages) - 1, 0, -1):
            y = UpBlock(c0 * 2 ** (s - 1), 2, name=f'decoder{s}')(y, stages[s - 1])
        y = UpBlock(c0 // 2, p, name='decoder0')(y)
        out = nn.Conv(self.out_channels, (1, 1, 1), kernel_init=TORCH_CONV_INIT, name='out')(y)
        return {'prediction': out, 'stages': stages}
