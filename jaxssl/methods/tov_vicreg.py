"""TOV-VICReg (Goulão & Oliveira, "Pretraining the Vision Transformer using self-supervised methods for vision based
Deep Reinforcement Learning", 2022; reference mgoulao/TOV-VICReg): VICReg on two views of a video frame plus a
temporal-order-verification (TOV) head that tells whether the frame and its two neighbours are in order.

Batch layout (jaxssl.data.frame_triplets): 'image' (B, 4, S, S, 3) per video [view 1 of o_t, view 2 of o_t,
o_{t - k}, o_{t + k}] (input.frame_offset = k), 'order' (B, 3) int32, a permutation of the triplet drawn per sample
in the pipeline; 'frame_index' and the source's labels (unused by the loss). All 4B frames go through the backbone
once; VICReg's expander and loss (jaxssl.methods.vicreg, jaxssl.losses.vicreg: global-batch variance and
covariance) take the two views' cls tokens; the TOV head takes the cls tokens [y(o_t) of view 1, y(o_{t - k}),
y(o_{t + k})] (the reference's backbone features, before the expander), permuted by 'order', concatenated, and a
Linear to one logit; its binary cross-entropy (0: in order, 1: shuffled) is added with weight loss.temporal_coeff.
Probes read the backbone's cls token of a video's middle frame (jaxssl.data.frame_pairs' evaluation view).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice
from jaxssl.data import checks, frame_pairs, frame_triplets
from jaxssl.data.sources import make_source
from jaxssl.losses import temporal_order
from jaxssl.losses import vicreg as vicreg_loss
from jaxssl.methods import base, simclr, vicreg
from jaxssl.models import tov_vicreg as tov_model
from jaxssl.models.resnet import is_resnet

DATASETS = ('list', 'folder', 'tfds', 'moving_digits')


def check_config(config: ml_collections.ConfigDict) -> None:
    """VICReg's checks with one triplet sample per video, plus the frame offset and the TOV weight."""
    if is_resnet(config.model.variant):
        raise ConfigError(f"bad value '{config.model.variant}' for 'model.variant': TOV-VICReg pretrains a ViT")
    vicreg.check_config(config, 'TOV-VICReg', num_sample=1)
    check_choice(config, 'input.dataset', DATASETS)
    offset = config.input.frame_offset
    if not isinstance(offset, int) or offset < 1:
        raise ConfigError(f"bad value {offset!r} for 'input.frame_offset': must be an integer >= 1")
    value = config.loss.temporal_coeff
    if not (isinstance(value, int | float) and value >= 0):
        raise ConfigError(f"bad value {value!r} for 'loss.temporal_coeff': must be a number >= 0")


class Method(vicreg.Method):
    """TOV-VICReg pretraining for the trainer: VICReg's model and loss on frame triplets, plus the TOV head."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)  # not VICReg's __init__: it would build VICReg's model without the head
        self.model = vicreg.make_model(config, tov_model.make_model)

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        checks.check_clip_source_config(self.config)  # files and folders: when a run starts, not at config load
        source = make_source(self.config)
        dataset = frame_triplets.make_frame_triplet_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, source=source
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        rng = np.random.default_rng(0)
        return {
            'image': rng.normal(size=(batch_size, 4, size, size, 3)).astype(np.float32),
            'order': np.tile(np.arange(3, dtype=np.int32), (batch_size, 1)),
        }

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, batch['image'][:, 0])
        return variables['params'], {}

    def loss(self, params, extra, batch, rng, step):
        images, order = batch['image'], batch['order']
        chex.assert_rank(images, 5)
        b = images.shape[0]
        chex.assert_shape(images, (b, 4, None, None, None))
        chex.assert_shape(order, (b, 3))
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if b % devices:
            raise ConfigError(
                f"'input.global_batch': {b} videos per (micro-)batch do not split over the {devices} devices of the "
                'batch axes'
            )
        variables = {'params': params}
        encoded, _ = self.model.apply(
            variables,
            images.reshape(4 * b, *images.shape[2:]),
            True,
            rngs={'drop_path': base.stream(rng, 'drop_path')},
            method=self.model.encode,
        )
        y = encoded[:, 0].reshape(b, 4, -1)
        # The expander on both views at once (their rows adjacent), with batch-statistics BN as VICReg's `project`.
        z, _ = self.model.apply(
            variables, y[:, :2].reshape(2 * b, -1), method=self.model.project, mutable=['batch_stats']
        )
        z1, z2 = simclr.split_views(z)
        c = self.config.loss
        vic, metrics = vicreg_loss.global_vicreg(
            z1, z2, self.mesh, sharding.BATCH_AXES, c.sim_coeff, c.std_coeff, c.cov_coeff, c.std_eps
        )
        triplets = y[:, jnp.array([0, 2, 3])]  # [o_t (view 1), o_{t - k}, o_{t + k}], the reference's order
        logits = self.model.apply(
            variables, temporal_order.permute_triplets(triplets, order), method=self.model.order_logit
        )
        bce, tov_metrics = temporal_order.order_loss(logits, order)
        loss = vic + c.temporal_coeff * bce
        return loss, ({'loss': loss, 'vicreg': vic, **metrics, **tov_metrics}, extra)

    def eval_dataset(self, split, batch_size, max_examples, process_index, process_count):
        dataset, _ = frame_pairs.make_frame_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )
        return dataset

    def flops_per_example(self) -> float:
        """Per video: four frames through the backbone (the expander and TOV head on fewer rows: approximate)."""
        return 4.0 * super().flops_per_example()
