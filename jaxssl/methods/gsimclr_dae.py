"""G-SimCLR stage 1 (Chakraborty et al., 2020; reference ariG23498/G-SimCLR): a denoising convolutional autoencoder
on the training images, whose latents `python -m jaxssl.pseudo_labels` clusters with k-means into the pseudo labels
that stage 2 (jaxssl.methods.gsimclr) batches by.

Batch layout: 'image' (B, S, S, 3), ImageNet-normalised like every image pipeline here, one plain view per image
(the reference trains its autoencoder on unaugmented images: resize + centre crop, input.eval_crop_pct = 1 keeps the
whole image). The loss maps it back to [0, 1] (the reference's /255 input), adds the training noise, and takes the
MSE of the sigmoid reconstruction against the clean image. The BatchNorm running statistics are `extra` state,
updated by the forward pass. `represent` gives the global average pool of the bottleneck, 'latent', the feature the
reference clusters (and probes read).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import data
from jaxssl.config import ConfigError
from jaxssl.data import images as image_data
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import base
from jaxssl.models import dae
from jaxssl.optim import OPTIMIZERS


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or loss cannot use (data paths: at run start)."""
    widths = tuple(config.model.widths)
    if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ConfigError(f"bad value {widths!r} for 'model.widths': need integers >= 1")
    if config.input.image_size % 2 ** len(widths):
        raise ConfigError(
            f"bad value {config.input.image_size} for 'input.image_size': must be divisible by 2^{len(widths)} "
            "(one 2x2 pool per entry of 'model.widths')"
        )
    if not config.model.noise_std >= 0:
        raise ConfigError(f"bad value {config.model.noise_std} for 'model.noise_std': must be >= 0")
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': the autoencoder takes 1 view")
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"bad value '{config.optim.name}' for 'optim.name'; valid: {', '.join(OPTIMIZERS)}")


def plain_view(image: np.ndarray, rng: np.random.Generator, *, size: int, crop_pct: float, interpolation: str):
    """The unaugmented training view (a pretraining View: the generator is unused)."""
    del rng
    return image_data.eval_view(image, size=size, crop_pct=crop_pct, interpolation=interpolation)


def to_unit_range(images: jax.Array) -> jax.Array:
    """ImageNet-normalised images -> [0, 1] pixels (the reference's /255 input and sigmoid target)."""
    return jnp.clip(images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN), 0.0, 1.0)


class Method(base.Method):
    """The denoising autoencoder for the trainer."""

    input_key = 'image'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = dae.DenoisingAutoencoder(widths=tuple(m.widths), kernel=m.kernel, noise_std=m.noise_std)

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)
        c = self.config.input
        source = image_data.make_image_source(self.config)
        view = functools.partial(plain_view, size=c.image_size, crop_pct=c.eval_crop_pct, interpolation=c.interpolation)
        dataset = image_data.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, view=view, source=source
        )
        return dataset, len(source)

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        return {'image': np.zeros((batch_size, size, size, 3), np.float32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, to_unit_range(batch['image']))
        return variables['params'], {'batch_stats': variables['batch_stats']}

    def loss(self, params, extra, batch, rng, step):
        images = batch['image']
        chex.assert_rank(images, 4)
        clean = to_unit_range(images)
        (reconstruction, _), updated = self.model.apply(
            {'params': params, **extra}, clean, True, rngs={'noise': base.stream(rng, 'noise')}, mutable=['batch_stats']
        )
        loss = dae.dae_loss(reconstruction, clean)
        return loss, ({'loss': loss}, {'batch_stats': updated['batch_stats']})

    def represent(self, params, extra, batch):
        """The bottleneck's global average pool (running BatchNorm statistics, no noise)."""
        _, outputs = self.model.apply({'params': params, **extra}, to_unit_range(batch['image']))
        return {'latent': outputs['latent']}

    def eval_dataset(self, split, batch_size, max_examples, process_index, process_count):
        dataset, _ = image_data.make_image_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )
        return dataset
