"""ResNet backbones (He et al., CVPR 2016) as torchvision builds them: the backbone of the joint-embedding papers'
headline rows (SimCLR, VICReg and DINO report ResNet-50).

torchvision's resnet18/34/50/101 (the v1.5 bottleneck: its stride is on the 3x3 convolution): a 7x7 stride-2 stem
and a 3x3 stride-2 max pool (or, with `small_stem`, the CIFAR stem of solo-learn and lightly: one 3x3 stride-1
convolution and no pool), four stages of 64, 128, 256, 512 channels (x 4 out of a bottleneck) times `width` / 64,
global average pooling, no classifier (the methods put their heads on the pooled features). Convolutions have no
bias and are initialised kaiming-normal (fan out, ReLU gain), BatchNorm scales 1 and shifts 0 (torchvision's
defaults); `zero_init_residual` starts each block's last BatchNorm scale at 0, so every block starts as the identity
(torchvision's option, on in VICReg's backbone; SimCLR's TF ResNet's init_zero). Padding is explicit and symmetric,
as torch's (flax's 'SAME' pads a stride-2 convolution on one side only).

BatchNorm (momentum 0.1 in torch's convention, eps 1e-5) normalises with the batch's statistics in training and
updates running averages in the 'batch_stats' collection; evaluation uses the running averages. Under jit with a
batch sharded over devices the statistics are the global batch's (torch's SyncBatchNorm). The variance is computed
in two passes (mean first), as torch's, since E[x^2] - E[x]^2 loses digits in float32 where few values per channel
reach the last stage. One difference: the running variance averages the biased batch variance (flax's), where
torch's averages the unbiased one, a factor n / (n - 1) with n the values per channel in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

# name -> (blocks per stage, bottleneck blocks)
VARIANTS = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
}


def is_resnet(variant: str) -> bool:
    """Whether a `model.variant` names a ResNet (the ViT sizes are jaxssl.models.mae's)."""
    return variant in VARIANTS


def feature_dim(variant: str, width: int = 64) -> int:
    """Channels of the pooled features: 512 (resnet18/34) or 2048 (resnet50/101) at width 64."""
    _, bottleneck = VARIANTS[variant]
    return width * 8 * (4 if bottleneck else 1)


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str) -> nn.Conv:
    """A kernel x kernel convolution without bias, torch's symmetric padding (kernel - 1) / 2, kaiming-normal init."""
    pad = (kernel - 1) // 2
    return nn.Conv(
        features, (kernel, kernel), strides, padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), name=name,
    )  # fmt: skip


def _norm(train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    """torch's BatchNorm2d (momentum 0.1, eps 1e-5) with a two-pass variance; scale 0 with `zero_scale`."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones, name=name,
    )  # fmt: skip


class _Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x 4) residual block, projection shortcut when the shape
    changes."""

    channels: int
    strides: int
    bottleneck: bool
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c, s, dt, zero = self.channels, self.strides, self.dtype, self.zero_init_residual
        out_channels = c * (4 if self.bottleneck else 1)
        if self.bottleneck:
            y = nn.relu(_norm(train, 'bn1')(_conv(c, 1, 1, dt, 'conv1')(x)))
            y = nn.relu(_norm(train, 'bn2')(_conv(c, 3, s, dt, 'conv2')(y)))
            y = _norm(train, 'bn3', zero)(_conv(out_channels, 1, 1, dt, 'conv3')(y))
        else:
            y = nn.relu(_norm(train, 'bn1')(_conv(c, 3, s, dt, 'conv1')(x)))
            y = _norm(train, 'bn2', zero)(_conv(c, 3, 1, dt, 'conv2')(y))
        if s != 1 or x.shape[-1] != out_channels:
            x = _norm(train, 'downsample_bn')(_conv(out_channels, 1, s, dt, 'downsample_conv')(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Images (B, H, W, C) -> pooled features (B, feature_dim) in float32."""

    stage_sizes: Sequence[int]
    bottleneck: bool
    width: int = 64
    small_stem: bool = False
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(images, 4)
        kernel, strides = (3, 1) if self.small_stem else (7, 2)
        x = nn.relu(_norm(train, 'bn1')(_conv(self.width, kernel, strides, self.dtype, 'conv1')(images)))
        if not self.small_stem:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _Block(
                    self.width * 2**stage, strides, self.bottleneck, self.zero_init_residual, self.dtype,
                    name=f'layer{stage + 1}_{block}',
                )(x, train)  # fmt: skip
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def make_resnet(
    variant: str,
    width: int = 64,
    small_stem: bool = False,
    zero_init_residual: bool = False,
    dtype: Any = jnp.float32,
) -> ResNet:
    """A ResNet by name ('resnet18', 'resnet34', 'resnet50', 'resnet101')."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet '{variant}'; valid: {', '.join(VARIANTS)}")
    stage_sizes, bottleneck = VARIANTS[variant]
    return ResNet(stage_sizes, bottleneck, width, small_stem, zero_init_residual, dtype)
