"""DINO model: the shared ViT backbone (SimCLR's: cls token after the final norm) and DINO's projection head.

The head is facebookresearch/dino's vision_transformer.py:DINOHead (shared/reference/methods/
simclr_vicreg_dino_poa_uni.md): an MLP d -> hidden -> hidden -> bottleneck with GELU and no normalisation (Dense
kernels ~ truncated normal, std 0.02, zero biases), the output L2-normalised, then a weight-normalised linear layer
bottleneck -> out_dim without bias, w = g v / ||v|| per output unit. With `norm_last_layer` the gain g is fixed
at 1 (the reference freezes weight_g), so the prototypes are unit vectors; otherwise g is trained (init 1).
`use_bn` (the reference's --use_bn_in_head, off by default) puts a BatchNorm after each hidden Linear, before the
GELU. It normalises with the statistics of the batch it sees, as the reference's teacher and student (both in
train mode, SyncBatchNorm): under jit with a sharded batch that is the global batch, and nothing is kept.

`make_model` also builds a ResNet-backed DINO (the reference's `--arch resnet50`, jaxssl.models.resnet): the
pooled features take the cls token's place, and the backbone's BatchNorm keeps running averages.

Images of any size whose side the patch divides go through the same ViT backbone: positions are the fixed 2-D sin-cos
table of the image's own token grid (jaxssl.models.mae.sincos_2d_table), so DINO's 96-px local crops need no
interpolated position embedding (the reference interpolates its learned table; see docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import resnet
from jaxssl.models import simclr as simclr_model


class WeightNormDense(nn.Module):
    """x (B, in) -> x w, w = g v / ||v|| with the norm over the input axis (torch weight_norm of a Linear, dim 0)."""

    features: int
    learn_gain: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch's default Linear init U(-1/sqrt(in), 1/sqrt(in)) (the reference builds this layer after its own init).
        v = self.param('v', nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'), (x.shape[-1], self.features))
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if self.learn_gain:
            w = w * self.param('g', nn.initializers.ones, (self.features,))
        return x @ w


class DINOHead(nn.Module):
    """h (B, D) -> logits (B, out_dim) in float32."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    layers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        chex.assert_rank(h, 2)
        x = h.astype(jnp.float32)
        dense = lambda features, name: nn.Dense(
            features, kernel_init=nn.initializers.truncated_normal(0.02), name=name
        )  # fmt: skip
        for i in range(self.layers - 1):
            x = dense(self.hidden_dim, f'dense_{i}')(x)
            if self.use_bn:  # torch BatchNorm1d: eps 1e-5, batch statistics (use_running_average=False)
                x = nn.BatchNorm(use_running_average=False, epsilon=1e-5, name=f'bn_{i}')(x)
            x = nn.gelu(x, approximate=False)  # torch nn.GELU: exact
        x = dense(self.bottleneck_dim, f'dense_{self.layers - 1}')(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        return WeightNormDense(self.out_dim, learn_gain=not self.norm_last_layer, name='last_layer')(x)


class DINOModel(simclr_model.SimCLRModel):
    """Groups of crops, each (B_i, S_i, S_i, C) -> (logits (sum B_i, out_dim) float32 in group order,
    {'cls': backbone cls tokens (sum B_i, width)}). `head_out` is the head's out_dim (prototypes)."""

    head_bottleneck: int = 256
    norm_last_layer: bool = True
    head_use_bn: bool = False

    def make_head(self) -> nn.Module:
        return DINOHead(
            self.head_out,
            self.head_hidden,
            self.head_bottleneck,
            self.head_layers,
            self.norm_last_layer,
            self.head_use_bn,
        )

    def __call__(self, groups: Sequence[jax.Array], train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        # One backbone pass per resolution, then the head once on all cls tokens (as the reference's MultiCropWrapper).
        h = jnp.concatenate([self.encode(images, train)[0][:, 0] for images in groups], axis=0)
        logits = self.head(h)
        chex.assert_shape(logits, (sum(g.shape[0] for g in groups), self.head_out))
        return logits, {'cls': h}


class DINOResNetModel(simclr_model.ResNetWithHead):
    """DINO with a ResNet backbone (the reference's `--arch resnet50`): as DINOModel, the pooled features in place
    of the cls token; `head` is a DINOHead. The backbone's BatchNorm keeps running averages ('batch_stats')."""

    def __call__(self, groups: Sequence[jax.Array], train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        # One backbone pass per resolution, so each group's BatchNorm statistics are its own (the reference's
        # MultiCropWrapper), then the head once on all features.
        h = jnp.concatenate([self.encode(images, train) for images in groups], axis=0)
        logits = self.head(h)
        chex.assert_shape(logits, (sum(g.shape[0] for g in groups), self.head.out_dim))
        return logits, {'cls': h}


def make_model(
    variant: str, resnet_width: int = 64, resnet_small_stem: bool = False, **overrides: Any
) -> DINOModel | DINOResNetModel:
    """A DINOModel with the encoder of a named ViT size ('micro', 'tiny', 'B', ...; '/patch' optional), or a
    DINOResNetModel for a ResNet name ('resnet18', 'resnet50', ...; base width and CIFAR stem as given). ViT-only
    overrides (drop path, layer norm, scan, remat, attention) are ignored for a ResNet."""
    if resnet.is_resnet(variant):
        backbone = resnet.make_resnet(
            variant, resnet_width, resnet_small_stem, dtype=overrides.get('dtype', jnp.float32)
        )
        head = DINOHead(
            *(overrides[k] for k in ('head_out', 'head_hidden', 'head_bottleneck', 'head_layers', 'norm_last_layer')),
            overrides.get('head_use_bn', False),
        )
        return DINOResNetModel(backbone, head)
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return DINOModel(**fields, **overrides)
