"""POA (Xu et al., "POA: Pre-training Once for Models of All Sizes", ECCV 2024): DINOv2 self-distillation
(jaxssl.methods.uni, which this subclasses) with an elastic student (alipay/POA poa/train/ssl_meta_arch.py;
shared/reference/methods/simclr_vicreg_dino_poa_uni.md section 5).

Each step the teacher (EMA of the intact student) distills into two passes of the student's shared parameters:
the intact network and one elastic sub-network (jaxssl.models.poa: a prefix of the channels and heads, a linspace
subset of the blocks), drawn from POA's list of (width, depth) pairs (small ones repeated more often, the intact one
left out) in a shuffled order cycled without replacement. With lambda = `loss.lambda_ie`:
  DINO  = lambda DINO(intact) + (1 - lambda) DINO(elastic)
  distil = (1 - lambda) [CE(softmax(intact / 0.1), elastic / 0.1) on the local crops + the same on the global crops]
           (the intact student's cls logits, no gradient, teach the elastic student's)
  iBOT  = lambda iBOT(intact) + (1 - lambda) iBOT(elastic), from epoch `loss.ibot_start_epochs` on (the students
          see unmasked global crops before)
  KoLeo = koleo_weight (KoLeo(intact) + KoLeo(elastic)) / 2
The gradients of both passes add up in one optimiser step and one EMA step. After training, `extract_submodel`
gives a standalone smaller ViT of any listed size from the teacher.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.config import ConfigError, check_range
from jaxssl.methods import base, dino, uni
from jaxssl.models import poa as poa_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """UNI's checks plus the elastic sizes and the loss weights."""
    uni.check_config(config)
    check_range(config, 'loss.lambda_ie', 0.0, 1.0)
    check_range(config, 'model.elastic_select_scale', 1.0, 1e6)
    if config.model.scan_layers:
        raise ConfigError("bad value True for 'model.scan_layers': the elastic pass reads unscanned blocks")
    if config.loss.ibot_start_epochs < 0:
        raise ConfigError(f"bad value {config.loss.ibot_start_epochs} for 'loss.ibot_start_epochs': must be >= 0")
    model = uni.make_model(config, builder=poa_model.make_model)
    head_dim = model.width // model.heads
    m = config.model
    if (
        not isinstance(m.elastic_min_width, int)
        or m.elastic_min_width % head_dim
        or not (0 < m.elastic_min_width < model.width)
    ):
        raise ConfigError(
            f"bad value {m.elastic_min_width!r} for 'model.elastic_min_width': a multiple of the head width "
            f'{head_dim} below the width {model.width}'
        )
    if not isinstance(m.elastic_min_depth, int) or not 0 < m.elastic_min_depth <= model.depth:
        raise ConfigError(f"bad value {m.elastic_min_depth!r} for 'model.elastic_min_depth': 1..{model.depth}")


class Method(uni.Method):
    """POA pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)
        self.model = uni.make_model(config, builder=poa_model.make_model)

    @functools.cached_property
    def networks(self) -> list[tuple[int, int]]:
        """POA's (width, depth) list; its last entry is the intact network, which the elastic draw leaves out."""
        m = self.config.model
        return poa_model.elastic_networks(
            self.model.width,
            self.model.depth,
            self.model.width // self.model.heads,
            m.elastic_min_width,
            m.elastic_min_depth,
            m.elastic_select_scale,
        )

    def sample_network(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(width, block mask (depth,)) of the step's elastic sub-network: entry `step mod n` of a shuffle of the n
        elastic entries, reshuffled every n steps (the reference's get_network_id), a pure function of the step."""
        n = len(self.networks) - 1
        cycle, position = step // n, step % n
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(self.config.seed), cycle), n)
        index = order[position]
        widths = jnp.asarray([w for w, _ in self.networks[:-1]], jnp.int32)
        blocks = jnp.asarray(poa_model.block_masks(self.networks[:-1], self.model.depth))
        return widths[index], blocks[index]

    def loss(self, params, extra, batch, rng, step):
        c = self.config.loss
        groups = self._groups(batch)
        batch_size, num_global = batch[dino.GLOBAL].shape[:2]
        _, steps_per_epoch = self.run_length
        ibot_on = step >= c.ibot_start_epochs * steps_per_epoch
        masks = dino.views_major(batch[uni.MASKS]) & ibot_on  # before iBOT starts the students see whole crops
        patch_idx, weights = uni.patch_slots(masks, self.slots)
        temp = self.temperature(step)
        cls_targets, patch_targets, extra = self.teacher_pass(extra, groups, patch_idx, weights, temp)
        width, blocks = self.sample_network(step)
        rngs = lambda name: {'drop_path': base.stream(rng, name)}
        intact = self.model.apply({'params': params}, groups, True, masks, patch_idx, rngs=rngs('intact'))
        elastic = self.model.apply(
            {'params': params}, groups, width, blocks, True, masks, patch_idx, rngs=rngs('elastic'),
            method=poa_model.POAModel.elastic,
        )  # fmt: skip
        terms = [self.student_terms(*out, cls_targets, patch_targets, weights, batch_size) for out in (intact, elastic)]
        lam = c.lambda_ie
        mix = {k: lam * terms[0][k] + (1 - lam) * terms[1][k] for k in ('dino_loss', 'ibot_loss')}
        koleo = (terms[0]['koleo_loss'] + terms[1]['koleo_loss']) / 2
        distil = distillation(intact[0], elastic[0], num_global * batch_size, c.student_temp)
        loss = (
            mix['dino_loss']
            + (1 - lam) * distil
            + c.koleo_weight * koleo
            + c.ibot_weight * jnp.where(ibot_on, mix['ibot_loss'], 0.0)
        )
        metrics = {
            'loss': loss,
            **mix,
            'koleo_loss': koleo,
            'distill_loss': distil,
            'intact_dino_loss': terms[0]['dino_loss'],
            'elastic_dino_loss': terms[1]['dino_loss'],
            'elastic_width': width.astype(jnp.float32),
            'elastic_depth': jnp.sum(blocks).astype(jnp.float32),
            'teacher_temp': temp,
            **dino.collapse_monitors(cls_targets),
        }
        return loss, (metrics, extra)

    def extract_submodel(self, params: Any, width: int, depth: int) -> tuple[poa_model.POAModel, Any]:
        """A standalone (model, params) of the sub-network (width, depth), e.g. from the teacher's parameters."""
        return poa_model.extract(self.model, params, width, depth)


def distillation(intact: jax.Array, elastic: jax.Array, num_global_rows: int, temp: float) -> jax.Array:
    """The reference's distill terms on cls logits (rows: global crops first, then local): the mean over rows of
    CE(softmax(intact / temp), elastic / temp), the intact side without gradient, for the local and for the global
    rows, summed."""
    targets = jax.nn.softmax(jax.lax.stop_gradient(intact) / temp, axis=-1)
    ce = -jnp.sum(targets * jax.nn.log_softmax(elastic / temp, axis=-1), axis=-1)
    glob, local = ce[:num_global_rows], ce[num_global_rows:]
    return jnp.mean(glob) + (jnp.mean(local) if local.size else 0.0)


# The (width, depth) sub-networks the reference extracts from its ViT-L/16: S/16, B/16 and L/16 itself.
REFERENCE_SIZES = {'S': (384, 12), 'B': (768, 12), 'L': (1024, 24)}
