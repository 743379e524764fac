"""SiT (Atito et al., "SiT: Self-supervised vIsion Transformer", arXiv v1 2021; Sara-Ahmed/SiT@1aacd6a): GMML's
corrupted-image reconstruction plus two tasks on learned tokens, one model, three losses.

- Rotation: each view is rotated by k * 90 degrees clockwise (k uniform in 0..3, the label; the reference's
  RandomRotation) before it is corrupted; Linear(width, 4) on the rotation token (token 0) predicts k, cross entropy.
- Contrastive: Linear(width, contrastive_dim) on the contrastive token (token 1); NT-Xent (tau 0.5) between the
  two corrupted views of each image over the global batch (jaxssl.losses.contrastive.global_nt_xent: the reference's
  ContrastiveLoss, whose denominator is every view but the anchor).
- Reconstruction: the clean rotated view from the corrupted one (jaxssl.methods.gmml); v1's L1 is over every pixel.
- Weights: 'uncertainty' (v1's learned s_t, init 1): sum_t exp(-a_t s_t) L_t + 0.5 s_t with a = 1, 1, 0.5 for
  rotation, contrastive, reconstruction; or 'fixed': sum_t w_t L_t with loss.weights.

Batch layout: GMML's ('image' is the clean rotated view) plus 'rotation' (2B,) int32; input.num_sample = 2.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice
from jaxssl.losses import contrastive
from jaxssl.methods import gmml
from jaxssl.methods.simclr import split_views

TASKS = ('rotation', 'contrastive', 'reconstruction')
UNCERTAINTY_SCALE = (1.0, 1.0, 0.5)  # the reference's LearnedLoss.adj: CrossEntropy, Contrastive, L1
WEIGHTINGS = ('uncertainty', 'fixed')


def check_config(config: ml_collections.ConfigDict) -> None:
    gmml.check_config(config)
    if config.input.num_sample != 2:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': SiT takes 2 views")
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")
    if not isinstance(config.model.contrastive_dim, int) or config.model.contrastive_dim < 1:
        raise ConfigError(f"bad value {config.model.contrastive_dim!r} for 'model.contrastive_dim': must be >= 1")
    check_choice(config, 'loss.weighting', WEIGHTINGS)
    if len(config.loss.weights) != len(TASKS):
        raise ConfigError(f"bad value {config.loss.weights} for 'loss.weights': one weight per task {TASKS}")


def rotate(image: np.ndarray, k: int) -> np.ndarray:
    """(H, W, C) rotated k * 90 degrees clockwise: the reference's X.rot90(-k, [1, 2]) on (C, H, W)."""
    return np.ascontiguousarray(np.rot90(image, -k, axes=(0, 1)))


def weighted_total(losses: jax.Array, scales: jax.Array, weighting: str, weights: Any) -> jax.Array:
    """The multi-task loss of the per-task losses (3,): learned uncertainty with log-variance-like s (3,), or fixed."""
    if weighting == 'uncertainty':
        return jnp.sum(jnp.exp(-scales * jnp.asarray(UNCERTAINTY_SCALE)) * losses + 0.5 * scales)
    return jnp.sum(jnp.asarray(weights, jnp.float32) * losses)


class Method(gmml.Method):
    """SiT pretraining for the trainer: GMML's model and corruption with the rotation and contrastive tokens."""

    def model_fields(self) -> dict[str, Any]:
        uncertainty = self.config.loss.weighting == 'uncertainty'
        return dict(
            task_tokens=2, rotation_classes=4, contrastive_dim=self.config.model.contrastive_dim,
            task_weights=len(TASKS) if uncertainty else 0,
        )  # fmt: skip

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh:
        """The trainer's mesh (the same config and devices), for the loss's shard_map; made on first use."""
        return sharding.make_mesh(self.config)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Rotates the view, then adds GMML's corruption plan for it; runs in the Grain pipeline."""
        k = int(rng.integers(4))
        sample = {**sample, 'image': rotate(sample['image'], k), 'rotation': np.int32(k)}
        return super().sample_transform(sample, rng)

    def loss(self, params, extra, batch, rng, step):
        _, outputs, reconstruction = self.forward(params, batch, rng)
        labels = batch['rotation']
        rotation = optax.softmax_cross_entropy_with_integer_labels(outputs['rotation'], labels).mean()
        z1, z2 = split_views(outputs['contrastive'])
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if z1.shape[0] % devices:
            raise ConfigError(
                f"'input.global_batch': {z1.shape[0]} images per (micro-)batch do not split over the {devices} "
                'devices of the batch axes; SiT needs whole pairs of views on every device'
            )
        nt_xent, con_metrics = contrastive.global_nt_xent(
            z1, z2, self.config.loss.temperature, self.mesh, sharding.BATCH_AXES
        )
        losses = jnp.stack([rotation, nt_xent, reconstruction])
        c = self.config.loss
        scales = outputs.get('task_weights', jnp.zeros(len(TASKS)))
        total = weighted_total(losses, scales, c.weighting, tuple(c.weights))
        hits = jnp.argmax(outputs['rotation'], axis=-1) == labels
        metrics = {'loss': total, 'rotation_acc': jnp.mean(hits.astype(jnp.float32)), **con_metrics}
        metrics.update({f'{t}_loss': v for t, v in zip(TASKS, losses, strict=True)})
        if c.weighting == 'uncertainty':
            metrics.update({f'{t}_scale': scales[i] for i, t in enumerate(TASKS)})
        return total, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on the clean image after its final norm: the contrastive token (as 'cls'), the rotation
        token, and the mean of the patch tokens."""
        _, outputs, _ = self.model.apply({'params': params}, batch['image'])
        encoded = outputs['encoded'].astype(jnp.float32)
        return {'cls': encoded[:, 1], 'rotation_token': encoded[:, 0], 'mean_pool': encoded[:, 2:].mean(axis=1)}
