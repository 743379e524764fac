"""Selfie (Trinh et al. 2019): pick, for each masked patch location, the right patch among the masked patches of the
same image, from an attention-pooled summary of the visible patches plus the location's position embedding (CPC).

Batch layout: 'image' (B, H, W, 3) ImageNet-normalised; 'ids_shuffle' (B, N) int32, a random permutation of the
patch indices whose first `num_kept(N, masking.ratio)` entries are visible and the rest masked (MP3's mask, built
from jaxssl.masks.shuffle_masking in the Grain pipeline); 'label' (B,) where the source has labels (unused).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.methods import mae
from jaxssl.methods.mp3 import ids_shuffle_mask
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mae as mae_model
from jaxssl.models import selfie as selfie_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or masks cannot use (data paths are checked at run start)."""
    m = config.model
    check_choice(config, 'model.dtype', DTYPES)
    check_choice(config, 'model.position', selfie_model.POSITIONS)
    widths = tuple(m.patch_widths)
    if not widths or any(not isinstance(w, int) or w <= 0 or w % selfie_model.GROUPS for w in widths):
        raise ConfigError(
            f"bad value {widths} for 'model.patch_widths': need positive widths divisible by {selfie_model.GROUPS}"
        )
    for key in ('pool_depth', 'pool_heads', 'patch'):
        if not isinstance(m[key], int) or m[key] < 1:
            raise ConfigError(f"bad value {m[key]!r} for 'model.{key}': must be an integer >= 1")
    if widths[-1] % m.pool_heads:
        raise ConfigError(f"bad value {m.pool_heads} for 'model.pool_heads': must divide the width {widths[-1]}")
    try:
        grid = mae_model.token_grid(config.input.image_size, m.patch)
    except ValueError as e:
        raise ConfigError(f"bad value {config.input.image_size} for 'input.image_size': {e}") from None
    check_range(config, 'masking.ratio', 0.0, 1.0)
    tokens = grid[0] * grid[1]
    try:
        kept = masks.num_kept(tokens, config.masking.ratio)
    except ValueError as e:
        raise ConfigError(f"bad value {config.masking.ratio} for 'masking.ratio': {e}") from None
    if tokens - kept < 2:  # one masked patch has no distractor: the choice would be trivial
        raise ConfigError(
            f"bad value {config.masking.ratio} for 'masking.ratio': masks {tokens - kept} of {tokens} patches; "
            'the choice needs at least 2'
        )


def make_model(config: ml_collections.ConfigDict) -> selfie_model.SelfiePretrain:
    m = config.model
    return selfie_model.SelfiePretrain(
        patch_widths=tuple(m.patch_widths),
        pool_depth=m.pool_depth,
        pool_heads=m.pool_heads,
        patch=m.patch,
        position=m.position,
        layer_norm_eps=m.layer_norm_eps,
        dtype=DTYPES[m.dtype],
    )


def choice_loss(logits: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, m, m) choice logits whose right answer is the diagonal (query i, patch i)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.diagonal(logp, axis1=1, axis2=2))


class Method(mae.Method):
    """Selfie pretraining on MAE's image plumbing."""

    build_model = staticmethod(make_model)

    def sample_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return ids_shuffle_mask(self.num_tokens, self.config.masking.ratio, rng)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.model.init(rng, batch['image'], batch['ids_shuffle'], self.num_keep)['params'], {}

    def loss(self, params, extra, batch, rng, step):
        logits, _ = self.model.apply({'params': params}, batch['image'], batch['ids_shuffle'], self.num_keep)
        loss = choice_loss(logits)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[-1]))
        return loss, ({'loss': loss, 'choice_acc': accuracy}, extra)

    def represent(self, params, extra, batch):
        """P on every patch (the part the paper transfers): the mean patch vector and the patch vectors; and the
        attention pool's u over all patches."""
        _, intermediates = self.model.apply({'params': params}, batch['image'])
        patches = intermediates['patches'].astype(jnp.float32)
        return {
            'mean_pool': patches.mean(axis=1),
            'pooled': intermediates['pooled'].astype(jnp.float32),
            'tokens': patches,
        }

    def visualize(self, params, extra):
        return {}  # nothing is reconstructed

    def flops_per_example(self) -> None:
        return None
