"""The DINOv2 / UNI model: DINO's ViT and cls head (jaxssl.models.dino) plus iBOT's pieces (facebookresearch/dinov2
models/vision_transformer.py, train/ssl_meta_arch.py): a learned mask token that replaces the patch embedding of
every masked patch before the positions are added, and a patch head on the backbone's patch tokens, either the cls
head itself (the default config) or a separate one (`separate_ibot_head`, the vitl14 / vitg14 configs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import dino as dino_model
from jaxssl.models import mae as mae_model


class UNIModel(dino_model.DINOModel):
    """Groups of crops, each (B_i, S_i, S_i, C), the first with optional masks (B_0, L) (True = masked) and patch
    slots `patch_idx` (B_0, M) -> (cls logits (sum B_i, out_dim), {'cls': backbone cls tokens (sum B_i, width),
    'patch_logits': (B_0, M, ibot_out) float32 logits of the first group's patch tokens at the slots})."""

    separate_ibot_head: bool = False
    ibot_out: int = 65536
    ibot_hidden: int = 2048
    ibot_bottleneck: int = 256

    def setup(self):
        super().setup()
        # DINOv2 initialises its mask token to zeros.
        self.mask_token = self.param('mask_token', nn.initializers.zeros, (1, self.width))
        if self.separate_ibot_head:
            self.ibot_head = dino_model.DINOHead(
                self.ibot_out, self.ibot_hidden, self.ibot_bottleneck, self.head_layers, self.norm_last_layer
            )

    def encode(
        self, images: jax.Array, train: bool = False, masks: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The backbone, (B, 1 + L, width) after the final norm; masked patches enter as the mask token."""
        chex.assert_rank(images, 4)
        tokens = self.patch_embed(images)
        if masks is not None:
            chex.assert_shape(masks, tokens.shape[:2])
            tokens = jnp.where(masks[..., None], self.mask_token.astype(tokens.dtype), tokens)
        return self.encode_tokens(tokens, images.shape[1], train)

    def patch_head(self, tokens: jax.Array) -> jax.Array:
        """(n, M, width) patch tokens -> (n, M, out) logits through the iBOT head (the cls head when shared)."""
        head = self.ibot_head if self.separate_ibot_head else self.head
        return head(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:2], -1)

    def __call__(
        self,
        groups: Sequence[jax.Array],
        train: bool = False,
        masks: jax.Array | None = None,
        patch_idx: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        encoded = [self.encode(images, train, masks if i == 0 else None)[0] for i, images in enumerate(groups)]
        h = jnp.concatenate([x[:, 0] for x in encoded], axis=0)
        logits = self.head(h)
        chex.assert_shape(logits, (sum(g.shape[0] for g in groups), self.head_out))
        out = {'cls': h}
        if patch_idx is not None:
            chex.assert_rank(patch_idx, 2)
            patches = jnp.take_along_axis(encoded[0][:, 1:], patch_idx[..., None], axis=1)
            out['patch_logits'] = self.patch_head(patches)
        elif self.is_initializing() and self.separate_ibot_head:
            self.patch_head(encoded[0][:, 1:2])  # creates the separate head's parameters
        return logits, out


def make_model(variant: str, **overrides: Any) -> UNIModel:
    """A UNIModel with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', ...; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return UNIModel(**fields, **overrides)
