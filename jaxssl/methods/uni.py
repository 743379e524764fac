"""UNI (Chen et al., Nature Medicine 2024): a ViT-L/16 pretrained on pathology tiles with the DINOv2 recipe
(facebookresearch/dinov2 train/ssl_meta_arch.py; shared/reference/methods/simclr_vicreg_dino_poa_uni.md section 4).
DINO (jaxssl.methods.dino, whose multi-crop input, EMA teacher and schedules this subclasses) plus:
- iBOT: half the global crops (`loss.mask_probability`) get a BEiT block mask of U(mask_ratio) of their patches
  (jaxssl.masks.block_masking: blocks of >= 4 patches, aspect 0.3..3.3, at most half the grid per block), made per
  crop in the input pipeline ('masks' (B, G, L), True = masked). The student sees the masked global crops (mask
  token in place of the patch embedding) in both its DINO and iBOT terms; the teacher sees them whole. The iBOT loss
  is the cross-entropy between the teacher's and the student's patch-head outputs at the masked patches
  (jaxssl.losses.dinov2.ibot_loss), weight `loss.ibot_weight`.
- KoLeo on the student's backbone cls tokens of each global crop, summed over the crops, weight `loss.koleo_weight`.
- Teacher targets by EMA centring (DINO's, with a second centre for the patch logits: `loss.centering='centering'`,
  ssl_default_config) or Sinkhorn-Knopp (`'sinkhorn_knopp'`, 3 iterations, the vitl14 / vitg14 configs).
- The teacher temperature warms up per step (DINOv2), not per epoch (DINO).
Static shapes: each image's masked patches are gathered into M = int(L * mask_ratio[1]) slots (the most a mask can
hold) with a 0/1 weight, so the patch head runs on M tokens per global crop whatever the draw.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks as masks_lib
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.losses import dinov2
from jaxssl.methods import base, dino
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mae as mae_model
from jaxssl.models import resnet
from jaxssl.models import uni as uni_model

GLOBAL, LOCAL, MASKS = dino.GLOBAL, dino.LOCAL, 'masks'
CENTERINGS = ('centering', 'sinkhorn_knopp')


def check_config(config: ml_collections.ConfigDict) -> None:
    """DINO's checks plus iBOT's masking, KoLeo and the centring choice."""
    if resnet.is_resnet(config.model.variant):
        raise ConfigError(f"bad value '{config.model.variant}' for 'model.variant': iBOT masks patch tokens, so a ViT")
    dino.check_config(config)
    check_choice(config, 'loss.centering', CENTERINGS)
    check_range(config, 'loss.mask_probability', 0.0, 1.000001)
    low, high = config.loss.mask_ratio
    if not 0 <= low <= high < 1:
        raise ConfigError(f"bad value {(low, high)} for 'loss.mask_ratio': need 0 <= low <= high < 1")
    for key in ('loss.koleo_weight', 'loss.ibot_weight'):
        check_range(config, key, 0.0, 1e6)
    if not isinstance(config.loss.sinkhorn_iterations, int) or config.loss.sinkhorn_iterations < 1:
        raise ConfigError(f"bad value {config.loss.sinkhorn_iterations!r} for 'loss.sinkhorn_iterations'")
    for key in ('model.ibot_out', 'model.ibot_hidden', 'model.ibot_bottleneck'):
        if not isinstance(config.model[key.split('.')[1]], int) or config.model[key.split('.')[1]] < 1:
            raise ConfigError(f"bad value {config.model[key.split('.')[1]]!r} for '{key}': must be an integer >= 1")


def make_model(config: ml_collections.ConfigDict, builder=uni_model.make_model) -> uni_model.UNIModel:
    """The model `config.model` describes, built by `builder(variant, **fields)` (POA passes its elastic model's)."""
    m = config.model
    return builder(
        m.variant,
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        head_layers=m.head_layers,
        head_bottleneck=m.head_bottleneck,
        norm_last_layer=m.norm_last_layer,
        separate_ibot_head=m.separate_ibot_head,
        ibot_out=m.ibot_out if m.separate_ibot_head else m.head_out,
        ibot_hidden=m.ibot_hidden,
        ibot_bottleneck=m.ibot_bottleneck,
        layer_norm_eps=m.layer_norm_eps,
        layer_scale_init=m.layer_scale_init,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def ibot_masks(
    count: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
    """(count, H' * W') bool masks for one image's global crops: each crop is masked with `probability`, then
    int(L * U(ratio)) of its L patches in BEiT blocks (DINOv2's MaskingGenerator: >= 4 patches a block, aspect
    0.3..1/0.3, at most L / 2 a block); the others are all False."""
    num_tokens = grid[0] * grid[1]
    out = np.zeros((count, num_tokens), dtype=bool)
    for i in range(count):
        if rng.random() < probability:
            num = int(num_tokens * rng.uniform(*ratio))
            out[i] = masks_lib.block_masking(grid, num, rng, min_block=4, max_block=int(0.5 * num_tokens))
    return out


def masked_views(image: np.ndarray, rng: np.random.Generator, *, view, grid, probability, ratio) -> dict:
    """DINO's multi-crop views of one image plus its global crops' iBOT masks."""
    out = view(image, rng)
    out[MASKS] = ibot_masks(out[GLOBAL].shape[0], grid, rng, probability, ratio)
    return out


def patch_slots(masks: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """masks (n, L) -> (indices (n, slots) of the masked patches first, in raster order, weights (n, slots) 1 where
    the slot holds a masked patch)."""
    order = jnp.argsort(~masks, axis=1, stable=True)[:, :slots]
    return order.astype(jnp.int32), jnp.take_along_axis(masks, order, axis=1).astype(jnp.float32)


class Method(dino.Method):
    """DINOv2 / UNI pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)
        self.model = make_model(config)

    @property
    def grid(self) -> tuple[int, int]:
        return mae_model.token_grid(self.config.input.image_size, self.model.patch)

    @property
    def slots(self) -> int:
        return max(int(self.grid[0] * self.grid[1] * self.config.loss.mask_ratio[1]), 1)

    def make_view(self) -> image_data.View:
        c = self.config.loss
        return functools.partial(
            masked_views,
            view=dino.make_view(self.config),
            grid=self.grid,
            probability=c.mask_probability,
            ratio=tuple(c.mask_ratio),
        )

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(batch_size)
        count = batch[GLOBAL].shape[1]
        rng = np.random.default_rng(0)
        batch[MASKS] = np.stack([ibot_masks(count, self.grid, rng, 1.0) for _ in range(batch_size)])
        return batch

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params, extra = super().init(rng, batch)
        patch_out = self.model.ibot_out if self.model.separate_ibot_head else self.model.head_out
        return params, dict(extra, patch_center=jnp.zeros((1, patch_out), jnp.float32))

    def teacher_targets(
        self, logits: jax.Array, center: jax.Array, temp: jax.Array, weights: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(targets, new centre) of teacher logits (n, K), `weights` (n,) marking the real rows (patch slots)."""
        c = self.config.loss
        w = jnp.ones(logits.shape[:1], jnp.float32) if weights is None else weights
        if c.centering == 'sinkhorn_knopp':
            return dinov2.sinkhorn_knopp(logits, temp, c.sinkhorn_iterations, w), center
        targets = jax.nn.softmax((logits - center) / temp, axis=-1)
        # The reference's update_center: the mean teacher logits over the (masked-patch) rows of the global batch.
        # Nothing masked anywhere in the batch: the centre stays (the reference has no patches to average).
        total = jnp.sum(w)
        mean = jnp.sum(logits * w[:, None], axis=0, keepdims=True) / jnp.maximum(total, 1.0)
        moved = c.center_momentum * center + (1 - c.center_momentum) * mean
        return targets, jnp.where(total > 0, moved, center)

    def temperature(self, step: jax.Array) -> jax.Array:
        """DINOv2's teacher temperature: linear over the warmup epochs, per step."""
        c = self.config.loss
        _, steps_per_epoch = self.run_length
        warmup = c.warmup_teacher_temp_epochs * steps_per_epoch
        return dino.teacher_temperature(step, c.warmup_teacher_temp, c.teacher_temp, warmup)

    def teacher_pass(self, extra, groups, patch_idx, weights, temp) -> tuple[jax.Array, jax.Array, dict]:
        """The teacher on the whole global crops: (cls targets (G B, K), patch targets (G B, M, K') at the slots,
        extra state with the centres moved)."""
        logits, out = self.model.apply({'params': extra['teacher']}, groups[:1], False, None, patch_idx)
        logits, patch = jax.lax.stop_gradient((logits, out['patch_logits']))
        cls_targets, center = self.teacher_targets(logits, extra['center'], temp)
        patch_targets, patch_center = self.teacher_targets(
            patch.reshape(-1, patch.shape[-1]), extra['patch_center'], temp, weights.reshape(-1)
        )
        return cls_targets, patch_targets.reshape(patch.shape), dict(extra, center=center, patch_center=patch_center)

    def student_terms(self, logits, out, cls_targets, patch_targets, weights, batch_size) -> dict[str, jax.Array]:
        """One student pass's DINO (all crop pairs), iBOT (masked patches) and KoLeo (per global crop) terms."""
        c = self.config.loss
        num_global = cls_targets.shape[0] // batch_size
        dino_term = dino.pair_cross_entropy(
            logits.reshape(-1, batch_size, logits.shape[-1]),
            cls_targets.reshape(num_global, batch_size, -1),
            c.student_temp,
        )
        ibot_term = dinov2.ibot_loss(out['patch_logits'], patch_targets, weights, c.student_temp)
        cls_tokens = out['cls'][: num_global * batch_size].reshape(num_global, batch_size, -1)
        koleo_term = sum(dinov2.koleo_loss(cls_tokens[g]) for g in range(num_global))
        return {'dino_loss': dino_term, 'ibot_loss': ibot_term, 'koleo_loss': koleo_term}

    def loss(self, params, extra, batch, rng, step):
        groups = self._groups(batch)
        batch_size = batch[GLOBAL].shape[0]
        masks = dino.views_major(batch[MASKS])  # (G B, L), crop-major as the crops
        patch_idx, weights = patch_slots(masks, self.slots)
        temp = self.temperature(step)
        cls_targets, patch_targets, extra = self.teacher_pass(extra, groups, patch_idx, weights, temp)
        logits, out = self.model.apply(
            {'params': params}, groups, True, masks, patch_idx, rngs={'drop_path': base.stream(rng, 'drop_path')}
        )
        terms = self.student_terms(logits, out, cls_targets, patch_targets, weights, batch_size)
        c = self.config.loss
        loss = terms['dino_loss'] + c.koleo_weight * terms['koleo_loss'] + c.ibot_weight * terms['ibot_loss']
        metrics = dict(terms, loss=loss, teacher_temp=temp, masked_fraction=jnp.mean(masks.astype(jnp.float32)))
        metrics.update(dino.collapse_monitors(cls_targets))
        return loss, (metrics, extra)
