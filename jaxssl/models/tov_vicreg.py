"""TOV-VICReg model: VICReg's backbone and expander (jaxssl.models.vicreg) plus the temporal-order-verification head,
the reference's Linear(3 * width -> 1) on three concatenated backbone features (mgoulao/TOV-VICReg,
tov_vicreg/models/builder.py)."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import vicreg as vicreg_model


class TOVVICRegModel(vicreg_model.VICRegModel):
    """VICRegModel's fields and outputs; `order_logit` is the extra head."""

    def setup(self):
        super().setup()
        # PyTorch's nn.Linear kernel init, as the expander's; a zero bias (torch draws it from the same range).
        self.tov_head = nn.Dense(1, kernel_init=vicreg_model.TORCH_LINEAR_INIT, name='tov_head')

    def project(self, y: jax.Array) -> jax.Array:
        """The expander on backbone features y (B, width) -> z (B, head_out) float32."""
        return self.head(y)

    def order_logit(self, triplets: jax.Array) -> jax.Array:
        """(B, 3 * width) permuted, concatenated features -> (B,) float32 logits of 'shuffled'."""
        chex.assert_shape(triplets, (None, 3 * self.width))
        return self.tov_head(triplets.astype(jnp.float32))[:, 0]

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        z, intermediates = super().__call__(images, train)
        if self.is_initializing():  # create the head's parameters with the rest
            self.order_logit(jnp.zeros((1, 3 * self.width), jnp.float32))
        return z, intermediates


def make_model(variant: str, **overrides: Any) -> TOVVICRegModel:
    """A TOVVICRegModel with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', 'H'; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return TOVVICRegModel(**fields, **overrides)
