"""Point-MAE (Pang et al., ECCV 2022) pretraining: reconstruct the points of masked local patches of a point cloud
(Chamfer-L2) from the visible patches.

The objective is the reference's `Point_MAE.forward` (Pang-Yatian/Point-MAE, models/Point_MAE.py) with
cfgs/pretrain.yaml: 64 FPS patches of 32 nearest points; `mask.ratio` 0.6 of them masked at random per cloud
(exactly int(0.6 G), drawn on device: at random, the 'rand' mask type of the pretraining config, or the int(0.6 G)
patches nearest a random one, 'block'); the encoder on the visible patches, the decoder on
those plus mask tokens; the Chamfer-L2 of each masked patch's predicted and true points, averaged over all masked
patches' points. The mini-PointNet's BatchNorm statistics over the global batch live in the extra state
('batch_stats'); the reference's are per GPU.

Batch layout: 'points' (B, num_points, 3) float32 (jaxssl.data.points), 'label' (unused here).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import points as point_data
from jaxssl.methods import _points, base
from jaxssl.models import point_mae

MASK_TYPES = ('rand', 'block')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the grouping, masks or model cannot use."""
    m = config.model
    check_choice(config, 'model.variant', point_mae.VARIANTS)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    point_data.check_points_input_config(config)
    if m.num_groups < 2 or m.group_size < 1:
        raise ConfigError("'model.num_groups' must be >= 2 and 'model.group_size' >= 1")
    if m.group_size > config.input.num_points or m.num_groups > config.input.num_points:
        raise ConfigError(
            f"'model.num_groups' ({m.num_groups}) and 'model.group_size' ({m.group_size}) must not exceed "
            f"'input.num_points' ({config.input.num_points})"
        )
    check_choice(config, 'mask.type', MASK_TYPES)
    check_range(config, 'mask.ratio', 0.0, 1.0)
    masked = int(config.mask.ratio * m.num_groups)
    if not 1 <= masked < m.num_groups:
        raise ConfigError(
            f"'mask.ratio' {config.mask.ratio} masks {masked} of {m.num_groups} patches: need at least one masked "
            'and one visible'
        )


def random_masks(rng: jax.Array, batch: int, groups: int, ratio: float) -> tuple[jax.Array, jax.Array]:
    """(visible (B, G - M), masked (B, M)) patch indices, each sorted: M = int(ratio G) patches per cloud chosen
    uniformly (_mask_center_rand)."""
    masked = int(ratio * groups)
    order = jnp.argsort(jax.random.uniform(rng, (batch, groups)), axis=1)
    return jnp.sort(order[:, masked:], axis=1), jnp.sort(order[:, :masked], axis=1)


def block_masks(rng: jax.Array, centres: jax.Array, ratio: float) -> tuple[jax.Array, jax.Array]:
    """(visible, masked) patch indices, each sorted: the int(ratio G) patches whose centres are nearest (L2, the
    seed itself first) to a patch drawn uniformly per cloud (_mask_center_block)."""
    b, g, _ = centres.shape
    masked = int(ratio * g)
    seed = jnp.take_along_axis(centres, jax.random.randint(rng, (b, 1, 1), 0, g), axis=1)
    order = jnp.argsort(jnp.linalg.norm(centres - seed, axis=-1), axis=1, stable=True)
    return jnp.sort(order[:, masked:], axis=1), jnp.sort(order[:, :masked], axis=1)


class Method(_points.PointMethod):
    """Point-MAE pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = point_mae.make_model(
            m.variant, num_groups=m.num_groups, group_size=m.group_size, drop_path_rate=m.drop_path_rate
        )

    def masks(self, rng: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(visible, masked) patch indices (B, G - M), (B, M) of `mask.type`."""
        m = self.model
        if self.config.mask.type == 'block':  # the centres the model's grouping will find
            index = point_mae.farthest_point_sample(points, m.num_groups)
            return block_masks(rng, jnp.take_along_axis(points, index[..., None], axis=1), self.config.mask.ratio)
        return random_masks(rng, points.shape[0], m.num_groups, self.config.mask.ratio)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        visible, masked = self.masks(jax.random.key(0), batch['points'])
        variables = point_mae.init_variables(self.model, rng, batch['points'], visible, masked)
        return variables['params'], {'batch_stats': variables['batch_stats']}

    def loss(self, params, extra, batch, rng, step):
        points = batch['points']
        visible, masked = self.masks(base.stream(rng, 'mask'), points)
        (loss, _), updated = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, points, visible, masked, train=True,
            rngs={'drop_path': base.stream(rng, 'drop_path')}, mutable=['batch_stats'],
        )  # fmt: skip
        extra = {'batch_stats': jax.lax.stop_gradient(updated['batch_stats'])}
        return loss, ({'loss': loss, 'chamfer_l2': loss}, extra)

    def represent(self, params, extra, batch):
        """Every patch's token, nothing masked: max- and mean-pooled, concatenated ('pooled'), and mean-pooled alone
        ('mean_pool'). (The reference's pretraining validation is disabled; its fine-tuning head reads the cls token
        and the max.)"""
        tokens = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, batch['points'], method=self.model.encode
        )
        mean = jnp.mean(tokens, axis=1)
        return {'pooled': jnp.concatenate([jnp.max(tokens, axis=1), mean], axis=-1), 'mean_pool': mean}

    def tokens_per_example(self) -> int:
        return self.model.num_groups

    def flops_per_example(self) -> float:
        """Forward + backward (3x) of the patch embedding, encoder (visible patches), decoder and head."""
        m, k = self.model, self.model.group_size
        g = m.num_groups
        v = g - int(self.config.mask.ratio * g)
        block = lambda n, width: 2 * n * 12 * width * width + 4 * n * n * width
        a, b, c = m.embed_dims
        embed = 2 * g * k * (3 * a + a * b + 2 * b * c + c * m.width)
        pos = 2 * (v + 2 * g) * (3 * 128 + 128 * m.width)
        encoder = m.depth * (block(v, m.width))
        decoder = m.decoder_depth * block(g, m.width) + 2 * (g - v) * m.width * 3 * k
        return 3.0 * (embed + pos + encoder + decoder)
