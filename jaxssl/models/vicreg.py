"""VICReg model: the shared ViT backbone of jaxssl.models.simclr (the cls token after the final norm is the
representation y) and VICReg's expander h(y) = z on which the loss is computed.

The expander is facebookresearch/vicreg's `Projector` (main_vicreg.py; shared/reference/methods/
simclr_vicreg_dino_poa_uni.md): `layers - 1` blocks of Linear + BatchNorm + ReLU, then a Linear without bias;
8192-8192-8192 in the paper. Kernels use PyTorch's default nn.Linear init, U(+-1/sqrt(fan_in)), which is
variance_scaling(1/3, fan_in, uniform). BatchNorm normalises with the statistics of the batch it sees: under jit
with the batch sharded these are global-batch statistics (the reference's SyncBN). Its running averages would only
serve the expander at test time and the expander is discarded after pretraining, so they are not kept.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import simclr as simclr_model

TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class Expander(nn.Module):
    """y (B, D) -> z (B, out_dim) in float32."""

    hidden_dim: int = 8192
    out_dim: int = 8192
    layers: int = 3
    bn_epsilon: float = 1e-5  # torch.nn.BatchNorm1d's default

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        chex.assert_rank(y, 2)
        # float32: the loss's covariance and hinge are taken on z, and BN's statistics want the precision.
        x = y.astype(jnp.float32)
        for i in range(self.layers - 1):
            # The bias is kept as the reference, although the BatchNorm after it removes its effect.
            x = nn.Dense(self.hidden_dim, kernel_init=TORCH_LINEAR_INIT, name=f'dense_{i}')(x)
            # use_running_average=False: batch statistics always (see the module docstring).
            x = nn.BatchNorm(use_running_average=False, epsilon=self.bn_epsilon, name=f'bn_{i}')(x)
            x = nn.relu(x)
        last = self.layers - 1
        x = nn.Dense(self.out_dim, use_bias=False, kernel_init=TORCH_LINEAR_INIT, name=f'dense_{last}')(x)
        chex.assert_shape(x, (y.shape[0], self.out_dim))
        return x


class VICRegModel(simclr_model.SimCLRModel):
    """Images (B, S, S, C) -> (z (B, head_out) float32, {'cls': y (B, width), 'encoded': (B, 1 + L, width)}). The
    fields are SimCLRModel's; head_hidden / head_out / head_layers size the expander."""

    def make_head(self) -> nn.Module:
        return Expander(self.head_hidden, self.head_out, self.head_layers)


def make_model(variant: str, **overrides: Any) -> VICRegModel:
    """A VICRegModel with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', 'H'; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return VICRegModel(**fields, **overrides)
