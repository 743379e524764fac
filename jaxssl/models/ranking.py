"""The embedding head of the video-triplet ranking networks (Wang & Gupta 2015; Transitive Invariance 2017 trains
the same on VGG16): after the backbone's pooled features, fc6 (4096) + ReLU, fc7 (1024) + ReLU, then L2
normalisation, on which the ranking loss's D(a, b) = -a.b is taken.

Caffe's prototxt (xiaolonw/caffe-video_triplet@c39ea1a, rank_scripts/rank_alexnet/imagenet_train.prototxt) draws
both layers' weights from N(0, 0.005) and sets their biases to 1 (so the ReLUs start open), with no dropout; the
embedding is therefore non-negative and of unit norm.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import simclr as simclr_model


class RankingHead(nn.Module):
    """h (B, D) -> unit-norm, non-negative embedding (B, out_dim) float32: `layers` x (Dense + ReLU), the last of
    width out_dim, the others hidden_dim, then L2 normalisation."""

    hidden_dim: int = 4096
    out_dim: int = 1024
    layers: int = 2
    init_std: float = 0.005
    bias_init: float = 1.0

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        chex.assert_rank(h, 2)
        x = h.astype(jnp.float32)
        for i in range(self.layers):
            features = self.out_dim if i == self.layers - 1 else self.hidden_dim
            x = nn.Dense(
                features,
                kernel_init=nn.initializers.normal(self.init_std),
                bias_init=nn.initializers.constant(self.bias_init),
                name=f'fc_{i}',
            )(x)
            x = nn.relu(x)
        # Caffe's Norm layer: x / sqrt(sum x^2); the epsilon only guards an all-zero row (every ReLU closed).
        return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class RankingViT(simclr_model.SimCLRModel):
    """The shared ViT backbone (its cls token is h) with the ranking head; SimCLRModel's fields, head_hidden /
    head_out / head_layers sizing the head."""

    head_init_std: float = 0.005
    head_bias_init: float = 1.0

    def make_head(self) -> nn.Module:
        return RankingHead(self.head_hidden, self.head_out, self.head_layers, self.head_init_std, self.head_bias_init)


def make_vit(variant: str, **overrides: Any) -> RankingViT:
    """A RankingViT with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', 'H'; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return RankingViT(**fields, **overrides)
