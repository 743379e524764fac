"""MMC (Wu et al., "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding", arXiv 2308.11448):
Masked image modelling + Momentum self-distillation + global Contrast on one ViT, and the paper's zero-shot
prompt-patch segmentation as an evaluation.

Batch layout: 'image' (2B, S, S, 3), the two augmented views of each image adjacent (input.num_sample = 2, SimCLR's
view function), ImageNet-normalised; 'mask' (2B, L) float32, 1 = masked, a fresh block-wise mask per view
(jaxssl.masks.block_masking in the Grain pipeline); 'label' (2B,) where the source has labels (unused by the loss).

Per step the student (params) reads each view with its masked patches replaced by a mask token; the teacher (an EMA
of params, `extra['teacher']`) reads the same views unmasked. Loss, each term a mean in float32:
  rec_weight      x MSE of the student's pixel head on the masked patches (per-patch normalised pixels, MAE's target)
  distill_weight  x (2 - 2 cos) between the student's predicted token and the teacher's projected token, over the
                    masked patches (the teacher saw them, the student did not) plus the same on the cls token
  contrast_weight x InfoNCE of the student's predicted cls of one view against the teacher's projected cls of the
                    other view, negatives the teacher's other cls keys of the global batch, both directions averaged
The paper's full text and code were not available (shared/reference/methods/mmc_further_pretraining_uni4eye_infinite_
lr.md): the three parts follow its abstract, the forms follow the authors' nearby SiT code and iBOT / BYOL / MoCo v3
(docs/methods.md lists the choices).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks, sharding
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.evaluate import prompt_segmentation
from jaxssl.losses import contrastive
from jaxssl.methods import _image, base, mae, simclr
from jaxssl.methods.tjepa import ema_momentum
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import mae as mae_model
from jaxssl.models import mmc as mmc_model
from jaxssl.optim import training_steps


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, views or loss cannot use (data paths: at run start)."""
    mae.check_config(config)  # variant, dtype, drop path, image size / patch, masking ratio
    for key in ('model.head_hidden', 'model.head_out', 'masking.min_block'):
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < 1:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= 1")
    check_range(config, 'masking.min_aspect', 1e-6, 1.0 + 1e-9)
    if config.input.num_sample != 2:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': MMC takes 2 views")
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")
    for key in ('loss.rec_weight', 'loss.distill_weight', 'loss.contrast_weight'):
        check_range(config, key, 0.0, 1e6)
    ema = tuple(config.model.ema)
    if len(ema) != 2 or not all(0.0 <= m <= 1.0 for m in ema):
        raise ConfigError(f"bad value {config.model.ema!r} for 'model.ema': (start, end) momenta in [0, 1]")
    check_choice(config, 'eval.encoder', ('student', 'teacher'))
    check_range(config, 'eval.seg_threshold', -1.0, 1.0 + 1e-9)
    check_range(config, 'eval.seg_pixel_threshold', 0.0, 1.0)
    check_range(config, 'eval.seg_fg_fraction', 1e-6, 1.0 + 1e-9)


def make_model(config: ml_collections.ConfigDict) -> mmc_model.MMCModel:
    m = config.model
    return mmc_model.make_model(
        m.variant,
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def cosine_distance(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """2 - 2 cos(prediction, target) along the last axis (BYOL's normalised MSE), in float32."""
    p = contrastive.l2_normalize(prediction.astype(jnp.float32))
    t = contrastive.l2_normalize(target.astype(jnp.float32))
    return 2.0 - 2.0 * jnp.sum(p * t, axis=-1)


def distill_loss(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(patch term, cls term): the mean cosine distance over the masked patches (mask 1) of the batch, and over the
    cls tokens. prediction / target: (B, 1 + L, D), cls first; mask (B, L)."""
    chex.assert_equal_shape([prediction, target])
    chex.assert_shape(mask, (prediction.shape[0], prediction.shape[1] - 1))
    distance = cosine_distance(prediction, jax.lax.stop_gradient(target))
    patches = jnp.sum(distance[:, 1:] * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return patches, jnp.mean(distance[:, 0])


def global_contrast(
    queries: jax.Array, keys: jax.Array, temperature: float, mesh: jax.sharding.Mesh | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric cross-view InfoNCE: queries / keys (2B, D), each image's two views adjacent; view-1 queries
    against view-2 keys and view-2 queries against view-1 keys, over the global batch, averaged."""
    q1, q2 = simclr.split_views(queries)
    k1, k2 = simclr.split_views(jax.lax.stop_gradient(keys))
    loss12, m12 = contrastive.global_info_nce(q1, k2, temperature, mesh, sharding.BATCH_AXES)
    loss21, m21 = contrastive.global_info_nce(q2, k1, temperature, mesh, sharding.BATCH_AXES)
    accuracy = 0.5 * (m12['contrastive_acc'] + m21['contrastive_acc'])
    return 0.5 * (loss12 + loss21), {'contrastive_acc': accuracy}


def ema_update(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
    """momentum * teacher + (1 - momentum) * student, leaf by leaf."""
    return jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, teacher, student)


class Method(_image.ImageMethod):
    """MMC pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = make_model(config)
        self.grid = mae_model.token_grid(config.input.image_size, self.model.patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.num_masked = self.num_tokens - masks.num_kept(self.num_tokens, config.masking.ratio)
        self._total_steps: int | None = None

    @property
    def total_steps(self) -> int:
        """The run's length, for the momentum schedule (the source is read on first use, not at construction)."""
        if self._total_steps is None:
            self._total_steps, _ = training_steps(self.config, len(image_data.make_image_source(self.config)))
        return self._total_steps

    # --- data -------------------------------------------------------------------------------------------------
    def sample_mask(self, rng: np.random.Generator) -> np.ndarray:
        m = self.config.masking
        mask = masks.block_masking(self.grid, self.num_masked, rng, min_block=m.min_block, min_aspect=m.min_aspect)
        return mask.astype(np.float32)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**sample, 'mask': self.sample_mask(rng)}  # runs per view in the Grain pipeline

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=simclr.make_view(self.config),
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        size = self.config.input.image_size
        return {
            'image': rng.normal(size=(2 * batch_size, size, size, 3)).astype(np.float32),
            'mask': np.stack([self.sample_mask(rng) for _ in range(2 * batch_size)]),
        }

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params = mmc_model.init_params(self.model, rng, batch['image'], batch['mask'])
        return params, {'teacher': jax.tree.map(jnp.array, params)}  # the teacher starts as a copy

    def loss(self, params, extra, batch, rng, step):
        images, mask = batch['image'], batch['mask'].astype(jnp.float32)
        chex.assert_rank([images, mask], [4, 2])
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if images.shape[0] // 2 % devices:
            raise ConfigError(
                f"'input.global_batch': {images.shape[0] // 2} images per (micro-)batch do not split over the "
                f'{devices} devices of the batch axes; MMC needs whole pairs of views on every device'
            )
        c = self.config.loss
        student = self.model.apply(
            {'params': params}, images, mask, train=True, rngs={'drop_path': base.stream(rng, 'drop_path')}
        )
        teacher = self.model.apply({'params': extra['teacher']}, images, method=self.model.teacher)
        teacher = jax.lax.stop_gradient(teacher)
        rec = mae.masked_patch_mse(student['pixels'], mae.patch_targets(images, self.model.patch, c.norm_pix), mask)
        patch_distill, cls_distill = distill_loss(student['pred'], teacher['proj'], mask)
        contrast, metrics = global_contrast(student['pred'][:, 0], teacher['proj'][:, 0], c.temperature, self.mesh)
        loss = c.rec_weight * rec + c.distill_weight * (patch_distill + cls_distill) + c.contrast_weight * contrast
        metrics = {
            'loss': loss,
            'loss_rec': rec,
            'loss_distill_patch': patch_distill,
            'loss_distill_cls': cls_distill,
            'loss_contrast': contrast,
            **metrics,
            # A collapse monitor: how much the teacher's projected cls varies over the batch (0 = collapsed).
            'teacher_cls_std': jnp.mean(jnp.std(contrastive.l2_normalize(teacher['proj'][:, 0]), axis=0)),
        }
        return loss, (metrics, extra)

    def update_extra(self, params, extra, step):
        start, end = self.config.model.ema
        return {'teacher': ema_update(extra['teacher'], params, ema_momentum(step, self.total_steps, start, end))}

    # --- evaluation -------------------------------------------------------------------------------------------
    def represent(self, params, extra, batch):
        """The encoder (student, or the teacher with eval.encoder='teacher') on the whole unmasked image: cls token,
        mean patch token, and the patch tokens (the segmentation evaluation's features)."""
        weights = extra['teacher'] if self.config.eval.encoder == 'teacher' else params
        encoded = self.model.apply({'params': weights}, batch['image'], method=self.model.encode).astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1), 'tokens': encoded[:, 1:]}

    def segmentation_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images (N, S, S, 3) normalised, true masks (N, L) bool, prompts (N,)) of the first eval.seg_images
        valid eval-split images that have an object: patches with >= eval.seg_fg_fraction foreground pixels
        (pixel mean > eval.seg_pixel_threshold in [0, 1] pixels) are the object."""
        e = self.config.eval
        batches = self.eval_dataset(e.split, e.batch_size, e.seg_images, 0, 1)
        images = np.concatenate([b['image'][:, 0][b['valid'] > 0] for b in batches])
        pixels = images * IMAGENET_STD + IMAGENET_MEAN
        fraction = prompt_segmentation.foreground_fraction(pixels, self.model.patch, e.seg_pixel_threshold)
        truth = fraction >= e.seg_fg_fraction
        keep = truth.any(axis=1)
        return images[keep], truth[keep], prompt_segmentation.choose_prompts(fraction[keep])

    def evaluate(self, params, extra, mesh):
        """The frozen probes, plus the prompt-patch segmentation of the eval split ('seg/...', on process 0's
        images: a host-side numpy metric) when eval.seg_images > 0."""
        results = super().evaluate(params, extra, mesh)
        if self.config.eval.seg_images <= 0:
            return results
        images, truth, prompts = self.segmentation_inputs()
        represent = jax.jit(lambda p, x, im: self.represent(p, x, {'image': im})['tokens'])
        size = self.config.eval.batch_size
        chunks = [represent(params, extra, images[i : i + size]) for i in range(0, len(images), size)]
        tokens = np.concatenate([np.asarray(jax.device_get(t)) for t in chunks])
        seg = prompt_segmentation.evaluate(tokens, truth, prompts, self.config.eval.seg_threshold)
        return {**results, **{f'seg/{k}': v for k, v in seg.items()}}

    def tokens_per_example(self) -> int:
        return self.num_tokens

    def flops_per_example(self) -> float:
        """Per view: the student's forward + backward and the teacher's forward (heads on every token)."""
        m, tokens = self.model, self.num_tokens
        pixels = 2 * tokens * m.patch * m.patch * 3 * m.width  # the patch embedding, and the pixel head alike
        encoder = pixels + transformer_flops(tokens + 1, m.width, m.depth, m.mlp_hidden)
        projector = 2 * (tokens + 1) * (m.width * m.head_hidden + m.head_hidden * m.head_out)
        predictor = 2 * (tokens + 1) * 2 * m.head_out * m.head_hidden
        student = encoder + projector + predictor + pixels
        return 3.0 * student + encoder + projector
