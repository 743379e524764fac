"""GMML (Atito et al., "GMML is All you Need", 2022; Sara-Ahmed/GMML): group masked model learning. Connected groups of
pixels are corrupted, the ViT encodes the WHOLE corrupted image (no token dropping, no mask token), a light head
reconstructs the clean pixels, and the loss is the L1 over the corrupted pixel x channel entries only.

Batch layout: 'image' (V*B, S, S, 3) the clean views (input.num_sample = V, views of an image adjacent), ImageNet-
normalised; 'mask' (V*B, S, S) bool, True = corrupted; 'paste' (V*B,) bool: fill the mask from another image of the
batch instead of with noise; 'label' where the source has labels (unused by the loss).

Where the corruption happens: the block geometry is per sample and its while-loop has a data-dependent length, so
it is numpy in the Grain pipeline (jaxssl.masks.gmml_corruption: deterministic, off the accelerator). The pixels
are filled on device (`corrupt`): the pasted blocks come from another image of the batch, which a per-sample map
cannot see (the reference does this stage in its train loop, per batch), and N(0, 1) noise drawn on device saves
sending a second image per view to it.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.methods import _image, base
from jaxssl.methods.simclr import make_view
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import gmml as gmml_model

REGIONS = ('corrupted', 'all')  # loss.region: GMML's drop_only=1 / SiT v1's whole-image L1


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, corruption or loss cannot use (data paths: at run start)."""
    spec = _image.check_vit_config(config)
    blocks = tuple(config.model.recons_blocks)
    depth = spec['depth']
    if not blocks or not all(isinstance(b, int) and 1 <= abs(b) <= depth for b in blocks):
        raise ConfigError(
            f"bad value {blocks} for 'model.recons_blocks': need block numbers in 1..{depth} (1-indexed; -1: last)"
        )
    if not isinstance(config.model.head_layers, int) or config.model.head_layers < 0:
        raise ConfigError(f"bad value {config.model.head_layers!r} for 'model.head_layers': must be an integer >= 0")
    c = config.corruption
    for key in ('noise_ratio', 'replace_ratio', 'max_block'):
        check_range(config, f'corruption.{key}', 1e-9, 1.000001)
    check_range(config, 'corruption.replace_prob', 0.0, 1.000001)
    if not isinstance(c.align, int) or not 1 <= c.align < int(config.input.image_size * c.max_block):
        raise ConfigError(
            f"bad value {c.align!r} for 'corruption.align': must be an integer >= 1 and below the largest block, "
            f'int(image_size * max_block) = {int(config.input.image_size * c.max_block)}'
        )
    check_choice(config, 'loss.region', REGIONS)


def corrupt(images: jax.Array, mask: jax.Array, paste: jax.Array, rng: jax.Array, views: int) -> jax.Array:
    """Fills each image's mask with N(0, 1) noise (in normalised space, as the reference) or, where `paste`, with the
    same pixels of a random image of the batch: one of the same view slot (the reference draws from the same crop
    list, randint(0, n) including the image itself)."""
    chex.assert_rank([images, mask, paste], [4, 3, 1])
    n = images.shape[0]
    noise_rng, donor_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, images.shape, images.dtype)
    donor = jax.random.randint(donor_rng, (n,), 0, n // views) * views + jnp.arange(n) % views
    fill = jnp.where(paste[:, None, None, None], images[donor], noise)
    return jnp.where(mask[..., None], fill, images)


def reconstruction_l1(prediction: jax.Array, target: jax.Array, mask: jax.Array, region: str) -> jax.Array:
    """L1 to the clean images: the mean over the corrupted pixel x channel entries of the whole batch
    ('corrupted', the reference's recloss[mask == 1].mean()), or over all entries ('all')."""
    chex.assert_equal_shape([prediction, target])
    error = jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    if region == 'all':
        return jnp.mean(error)
    weight = mask.astype(jnp.float32)[..., None]
    return jnp.sum(error * weight) / (jnp.sum(weight) * error.shape[-1])


class Method(_image.ImageMethod):
    """GMML pretraining for the trainer; SiT (jaxssl.methods.sit) adds its task tokens and losses."""

    def model_fields(self) -> dict[str, Any]:
        """Model fields beyond the shared ones: GMML has one cls token and only the reconstruction head."""
        return {'task_tokens': 1}

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = gmml_model.make_model(
            m.variant,
            recons_blocks=tuple(m.recons_blocks),
            head_layers=m.head_layers,
            layer_norm_eps=m.layer_norm_eps,
            drop_path_rate=m.drop_path_rate,
            remat=m.remat,
            dtype=DTYPES[m.dtype],
            attention_impl=m.attention_impl or None,
            **self.model_fields(),
        )
        self.views = config.input.num_sample

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Adds one view's corruption plan; runs in the Grain pipeline."""
        c = self.config.corruption
        plan = masks.gmml_corruption(
            sample['image'].shape[0], rng, c.noise_ratio, c.replace_ratio, c.replace_prob, c.align, c.max_block
        )
        return {**sample, **plan}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=make_view(self.config),
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng, size = np.random.default_rng(0), self.config.input.image_size
        samples = [
            self.sample_transform({'image': rng.normal(size=(size, size, 3)).astype(np.float32)}, rng)
            for _ in range(batch_size * self.views)
        ]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.model.init(rng, batch['image'])['params'], {}

    def forward(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """(reconstruction, head outputs, reconstruction loss) of the corrupted batch, in training mode."""
        images = batch['image']
        corrupted = corrupt(images, batch['mask'], batch['paste'], base.stream(rng, 'corruption'), self.views)
        rngs = {'drop_path': base.stream(rng, 'drop_path')}
        pixels, outputs, _ = self.model.apply({'params': params}, corrupted, True, rngs=rngs)
        return pixels, outputs, reconstruction_l1(pixels, images, batch['mask'], self.config.loss.region)

    def loss(self, params, extra, batch, rng, step):
        _, _, loss = self.forward(params, batch, rng)
        corrupted = jnp.mean(batch['mask'].astype(jnp.float32))
        return loss, ({'loss': loss, 'corrupted_fraction': corrupted}, extra)

    def represent(self, params, extra, batch):
        """The encoder on the clean image after its final norm: the first task token (GMML's cls) and the mean of
        the patch tokens."""
        _, outputs, _ = self.model.apply({'params': params}, batch['image'])
        encoded = outputs['encoded'].astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, self.model.task_tokens :].mean(axis=1)}

    def flops_per_example(self) -> float:
        """Per view (the trainer counts views as examples): patch embedding, encoder, reconstruction head."""
        m, tokens = self.model, self.tokens_per_example()
        patch_dim = m.patch * m.patch * m.channels
        forward = (
            2 * tokens * patch_dim * m.width
            + transformer_flops(tokens + m.task_tokens, m.width, m.depth, m.mlp_hidden)
            + tokens * (m.head_layers * 2 * m.width * m.width + 2 * m.width * patch_dim)
        )
        return 3.0 * forward
