"""The embedding head of the video-triplet ranking networks (Wang & Gupta 2015; Transitive Invariance 2017 trains
the same on VGG16): after the backbone's pooled features, fc6 (4096) + ReLU, fc7 (1024) + ReLU, then L2
normalisation, on which the ranking loss's D(a, b) = -a.b is taken.

Caffe's prototxts (xiaolonw/caffe-video_triplet) set both layers' biases to 1 (so the ReLUs start open) and use no
dropout; the embedding is therefore non-negative and of unit norm. The weights: 'xavier' in the VGG16 net
(c8842be rank_scripts/rank_vgg/imagenet_train.prototxt; Caffe's xavier is U(+-sqrt(3 / fan_in))), N(0, 0.005) in
the AlexNet one (c39ea1a rank_scripts/rank_alexnet/imagenet_train.prototxt), which suits its 9,216 inputs only: on a
few hundred pooled features it leaves every embedding nearly equal.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import simclr as simclr_model

KERNEL_INITS = {
    'xavier': lambda std: nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform'),
    'gaussian': nn.initializers.normal,
}


class RankingHead(nn.Module):
    """h (B, D) -> unit-norm, non-negative embedding (B, out_dim) float32: `layers` x (Dense + ReLU), the last of
    width out_dim, the others hidden_dim, then L2 normalisation. `weight_init`: 'xavier' or 'gaussian' (N(0,
    init_std))."""

    hidden_dim: int = 4096
    out_dim: int = 1024
    layers: int = 2
    weight_init: str = 'xavier'
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
                kernel_init=KERNEL_INITS[self.weight_init](self.init_std),
                bias_init=nn.initializers.constant(self.bias_init),
                name=f'fc_{i}',
            )(x)
            x = nn.relu(x)
        # Caffe's Norm layer (src/caffe/layers/norm_layer.cpp): x / (sqrt(sum x^2) + 1e-6).
        return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + 1e-6)


class RankingViT(simclr_model.SimCLRModel):
    """The shared ViT backbone (its cls token is h) with the ranking head; SimCLRModel's fields, head_hidden /
    head_out / head_layers sizing the head."""

    head_init: str = 'xavier'
    head_init_std: float = 0.005
    head_bias_init: float = 1.0

    def make_head(self) -> nn.Module:
        return RankingHead(
            self.head_hidden, self.head_out, self.head_layers, self.head_init, self.head_init_std, self.head_bias_init
        )


def make_vit(variant: str, **overrides: Any) -> RankingViT:
    """A RankingViT with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', 'H'; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return RankingViT(**fields, **overrides)
