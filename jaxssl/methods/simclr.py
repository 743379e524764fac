"""SimCLR (Chen et al., ICML 2020): two augmented views per image, a backbone and a projection head, NT-Xent over
the global batch.

Batch layout: 'image' (2B, S, S, 3), the two views of each image adjacent (input.num_sample = 2; jaxssl.data.views
makes them in the Grain pipeline), ImageNet-normalised; 'label' (2B,) where the source has labels (unused by the
loss). The loss all-gathers the projections over the mesh's batch axes inside shard_map (jaxssl.losses.
contrastive.global_nt_xent), so every anchor has the 2N - 2 negatives of the whole global batch whatever the
device count. The representation for probes is the backbone's cls token h, not the projection z.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.data import views
from jaxssl.losses import contrastive
from jaxssl.methods import _image, base
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import resnet
from jaxssl.models import simclr as simclr_model
from jaxssl.optim import OPTIMIZERS


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, views or loss cannot use (data paths: at run start)."""
    check_two_view_config(config, 'SimCLR')
    check_choice(config, 'model.head_type', simclr_model.HEAD_TYPES)
    if not config.model.head_kappa > 0:
        raise ConfigError(f"bad value {config.model.head_kappa} for 'model.head_kappa': must be > 0")
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")


def check_two_view_config(config: ml_collections.ConfigDict, method_name: str, num_sample: int = 2) -> None:
    """The model, two-view and optimiser keys shared by the methods built on this one (VICReg): `method_name` says whose
    message it is; `num_sample` is the input.num_sample it needs (TOV-VICReg makes its views per frame triplet: 1)."""
    if resnet.is_resnet(config.model.variant):
        _image.check_resnet_config(config)
    else:
        _image.check_vit_config(config)
    for key in ('model.head_hidden', 'model.head_out', 'model.head_layers'):
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < 1:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= 1")
    if config.input.num_sample != num_sample:
        raise ConfigError(
            f"bad value {config.input.num_sample} for 'input.num_sample': {method_name} takes {num_sample}"
        )
    for key in ('input.jitter_prob', 'input.grayscale_prob', 'input.blur_prob'):
        check_range(config, key, 0.0, 1.000001)
    check_range(config, 'input.jitter_strength', 0.0, math.inf)
    check_choice(config, 'optim.name', OPTIMIZERS)
    if config.optim.name == 'lars' and config.model.scan_layers:
        raise ConfigError(
            "'model.scan_layers' must be false with optim.name='lars': LARS's trust ratio is per layer, and a "
            'scanned stack holds all layers in one parameter'
        )


def make_resnet_backbone(config: ml_collections.ConfigDict, zero_init_residual: bool) -> resnet.ResNet:
    """The ResNet `config.model` names (variant, resnet_width, resnet_small_stem, dtype)."""
    m = config.model
    return resnet.make_resnet(
        m.variant, m.get('resnet_width', 64), m.get('resnet_small_stem', False), zero_init_residual, DTYPES[m.dtype]
    )


def make_model(config: ml_collections.ConfigDict) -> simclr_model.SimCLRModel | simclr_model.ResNetWithHead:
    m = config.model
    if resnet.is_resnet(m.variant):
        # SimCLR's TF ResNet starts each block's last BatchNorm scale at 0 (init_zero).
        head = simclr_model.make_head(
            m.get('head_type', 'mlp'), m.head_hidden, m.head_out, m.head_layers, m.get('head_kappa', 1.0)
        )
        return simclr_model.ResNetWithHead(make_resnet_backbone(config, zero_init_residual=True), head)
    return simclr_model.make_model(
        m.variant,
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        head_layers=m.head_layers,
        head_type=m.get('head_type', 'mlp'),  # configs of methods built on SimCLR's (G-SimCLR) may lack the keys
        head_kappa=m.get('head_kappa', 1.0),
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def make_view(config: ml_collections.ConfigDict) -> image_data.View:
    """The training view function `config.input` describes."""
    c = config.input
    return functools.partial(
        views.simclr_view,
        size=c.image_size,
        scale=tuple(c.crop_scale),
        ratio=tuple(c.crop_ratio),
        flip=c.hflip,
        jitter_strength=c.jitter_strength,
        jitter_prob=c.jitter_prob,
        grayscale_prob=c.grayscale_prob,
        blur_prob=c.blur_prob,
        interpolation=c.interpolation,
    )


def split_views(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(2B, D) with each image's views adjacent -> view 1 (B, D), view 2 (B, D)."""
    chex.assert_rank(z, 2)
    pairs = z.reshape(z.shape[0] // 2, 2, z.shape[1])
    return pairs[:, 0], pairs[:, 1]


class Method(_image.ImageMethod):
    """SimCLR pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = make_model(config)

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=make_view(self.config),
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        rng = np.random.default_rng(0)
        return {'image': rng.normal(size=(2 * batch_size, size, size, 3)).astype(np.float32)}

    @property
    def resnet(self) -> bool:
        """A ResNet backbone, whose BatchNorm running averages are extra['batch_stats']."""
        return isinstance(self.model, simclr_model.ResNetWithHead)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        # The head's BatchNorm statistics are not state (see jaxssl.models.simclr); a ResNet's are.
        variables = self.model.init(rng, batch['image'])
        return variables['params'], ({'batch_stats': variables['batch_stats']} if self.resnet else {})

    def project(self, params: Any, extra: Any, images: jax.Array, rng: jax.Array | None) -> tuple[jax.Array, Any]:
        """Projections z (2B, head_out) of the views, in training mode (batch-statistics BN, drop path), and the
        extra state with a ResNet's running averages updated."""
        rngs = {'drop_path': rng} if rng is not None else {}
        variables = {'params': params, **({'batch_stats': extra['batch_stats']} if self.resnet else {})}
        (z, _), updated = self.model.apply(variables, images, True, rngs=rngs, mutable=['batch_stats'])
        if self.resnet:
            extra = dict(extra, batch_stats=jax.lax.stop_gradient(updated['batch_stats']))
        return z, extra

    def loss(self, params, extra, batch, rng, step):
        images = batch['image']
        chex.assert_rank(images, 4)
        z, extra = self.project(params, extra, images, base.stream(rng, 'drop_path'))
        z1, z2 = split_views(z)
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if z1.shape[0] % devices:
            raise ConfigError(
                f"'input.global_batch': {z1.shape[0]} images per (micro-)batch do not split over the {devices} "
                'devices of the batch axes; SimCLR needs whole pairs of views on every device'
            )
        loss, metrics = contrastive.global_nt_xent(z1, z2, self.config.loss.temperature, self.mesh, sharding.BATCH_AXES)
        return loss, ({'loss': loss, **metrics}, extra)

    def represent(self, params, extra, batch):
        """The backbone on the whole image: the cls token h (the representation SimCLR evaluates, before the
        projection head) and the mean of the patch tokens; a ResNet's pooled features (running averages)."""
        if self.resnet:
            variables = {'params': params, 'batch_stats': extra['batch_stats']}
            return {'pool': self.model.apply(variables, batch['image'], method=self.model.encode)}
        encoded, _ = self.model.apply({'params': params}, batch['image'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1)}

    def flops_per_example(self) -> float | None:
        """Per view (the trainer counts views as examples); None for a ResNet."""
        if self.resnet:
            return None
        m, tokens = self.model, self.tokens_per_example()
        head = [m.width] + [m.head_hidden] * (m.head_layers - 1) + [m.head_out] if m.head_type == 'mlp' else []
        forward = (
            2 * tokens * m.patch * m.patch * 3 * m.width
            + transformer_flops(tokens + 1, m.width, m.depth, m.mlp_hidden)
            + sum(2 * a * b for a, b in itertools.pairwise(head))
        )
        return 3.0 * forward
