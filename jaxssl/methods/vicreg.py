"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): two augmented views per image, a backbone and an expander, and a loss of
invariance (MSE between the views' embeddings), variance (a hinge on each dimension's std) and covariance (the
off-diagonal of the embeddings' covariance), the last two over the GLOBAL batch.

Everything but the expander and the loss is SimCLR's (jaxssl.methods.simclr): the batch layout ('image' (2B, S, S, 3)
with the two views of each image adjacent, input.num_sample = 2), the view augmentations, the shared ViT backbone,
the mesh the loss's shard_map runs on, and `represent` (the backbone's cls token y and mean patch token, never the
expander's z). The loss all-gathers z over the mesh's batch axes inside shard_map (jaxssl.losses.vicreg.
global_vicreg), so the variance and covariance are statistics of the whole global batch whatever the device count.
"""

from __future__ import annotations

import math

import chex
import ml_collections

from jaxssl import sharding
from jaxssl.config import ConfigError
from jaxssl.losses import vicreg as vicreg_loss
from jaxssl.methods import base, simclr
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import resnet
from jaxssl.models import simclr as simclr_model
from jaxssl.models import vicreg as vicreg_model


def check_config(config: ml_collections.ConfigDict, method_name: str = 'VICReg', num_sample: int = 2) -> None:
    """Fails fast, naming the key, on values the model, views or loss cannot use (data paths: at run start).
    `method_name` and `num_sample` are for the methods built on this one (TOV-VICReg)."""
    simclr.check_two_view_config(config, method_name, num_sample)
    for key in ('loss.sim_coeff', 'loss.std_coeff', 'loss.cov_coeff'):
        value = config.loss[key.split('.')[1]]
        if not (isinstance(value, int | float) and value >= 0):
            raise ConfigError(f"bad value {value!r} for '{key}': must be a number >= 0")
    if not config.loss.std_eps > 0:
        # Zero would make the std's gradient infinite on a collapsed dimension, the case the hinge exists for.
        raise ConfigError(f"bad value {config.loss.std_eps} for 'loss.std_eps': must be > 0")


def make_model(
    config: ml_collections.ConfigDict, build=vicreg_model.make_model
) -> vicreg_model.VICRegModel | simclr_model.ResNetWithHead:
    """The model `config.model` describes, made by `build(variant, **fields)` (a subclass's builder: TOV-VICReg),
    or a ResNet with the expander (facebookresearch/vicreg's resnet50 is torchvision's, zero_init_residual on)."""
    m = config.model
    if resnet.is_resnet(m.variant):
        head = vicreg_model.Expander(m.head_hidden, m.head_out, m.head_layers)
        return simclr_model.ResNetWithHead(simclr.make_resnet_backbone(config, zero_init_residual=True), head)
    return build(
        m.variant,
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        head_layers=m.head_layers,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


class Method(simclr.Method):
    """VICReg pretraining for the trainer: SimCLR's data, backbone and probes with the expander and VICReg's loss."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)  # not SimCLR's __init__: it would build SimCLR's head
        self.model = make_model(config)

    def loss(self, params, extra, batch, rng, step):
        images = batch['image']
        chex.assert_rank(images, 4)
        z, extra = self.project(params, extra, images, base.stream(rng, 'drop_path'))
        z1, z2 = simclr.split_views(z)
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if z1.shape[0] % devices:
            raise ConfigError(
                f"'input.global_batch': {z1.shape[0]} images per (micro-)batch do not split over the {devices} "
                'devices of the batch axes; VICReg needs whole pairs of views on every device'
            )
        c = self.config.loss
        loss, metrics = vicreg_loss.global_vicreg(
            z1, z2, self.mesh, sharding.BATCH_AXES, c.sim_coeff, c.std_coeff, c.cov_coeff, c.std_eps
        )
        return loss, ({'loss': loss, **metrics}, extra)
