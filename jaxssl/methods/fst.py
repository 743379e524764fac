"""FST, learning from future (Du, Yuan, Wang, Ye, Zhang, Tian, Ding, NeurIPS 2022): semi-supervised segmentation
by a mean teacher whose pseudo labels come from the student's future. Here on 2-D slices of medical volumes with
the UNet of jaxssl.models.unet (the global / local method's), a few labelled volumes and many unlabelled ones.

Reference: usr922/FST@5b44c01, semi_seg/train_semi.py and semi_seg/fst/utils/loss_helper.py (U2PL's code base),
shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md section 11.

Each step takes B labelled and B unlabelled slices. The student sees them in one batch (BatchNorm statistics over
both); the loss is
    CE(student(x_l), y_l) + w x CE_kept(student(x_u), argmax teacher(x_u))
with the teacher in evaluation mode for the pseudo labels, and a second, train-mode teacher pass on the whole
batch whose per-pixel entropy drops the `loss.drop_percent` percentile and above of the unlabelled pixels
(loss_helper.compute_unsupervised_loss: the kept pixels' mean CE divided by the kept fraction). That second pass
moves the teacher's own BatchNorm averages; its weights are an EMA of the student's, decay
min(1 - 1/(step + 1), loss.ema_decay). For the first `loss.teacher_warmup_epochs` epochs (the reference's first
epoch; an epoch is a pass over the unlabelled volumes) the teacher IS the student: the reference assigns the
student's tensors to it before each loss.

The future: with train.lookahead_steps K (3, the reference's), the trainer (jaxssl.train.make_train_step) takes K
virtual SGD steps on the same batch before each real one, the teacher absorbing each virtual student, restores the
student's weights and takes the real step with the pseudo labels of that teacher: 5 EMA updates per real step, all
with the step's one decay, every pass at the step's lr, and the virtual steps' effect on the momentum buffers and
the BatchNorm averages kept.
K = 0 is the plain mean teacher; loss.unsup_weight = 0 trains on the labelled slices alone.

Evaluation: the mean foreground Dice per test volume of the teacher (the network the reference evaluates and
keeps) and of the student, with their BatchNorm running averages.

Where jaxssl differs, each deliberate:
- The network is the global / local method's 2-D UNet from a random init, not DeepLabV3+ on an ImageNet ResNet-101;
  the decoder (and head) take 10x the lr as the reference's decoder.
- The entropy percentile is taken over the global batch (the reference: each GPU's batch).
- The labelled slices come from the first `input.labelled_volumes` volumes of `input.labelled_split`, the
  unlabelled ones from `input.split` (the reference splits one training set), one random slice per volume visit.
- Augmentation (both kinds of slices, the reference's weak pipeline): a resize by U(0.5, 1) or U(1, 2) with p 0.5
  each (bilinear image, nearest labels), a left-right flip with p 0.5, a random crop back to the slice size after
  centred zero padding (labels padded with 0, background, as the reference pads with 0).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import ndimage

from jaxssl import data
from jaxssl.config import ConfigError
from jaxssl.data import slices
from jaxssl.methods import _segmentation as segmentation
from jaxssl.methods import base

# The reference's BatchNorm (SyncBatchNorm, student and teacher): torch's default momentum 0.1, flax's 0.9.
BN_MOMENTUM = 0.9


def check_config(config: ml_collections.ConfigDict) -> None:
    c = config
    if not 0 < c.loss.drop_percent <= 100:
        raise ConfigError(f"bad value {c.loss.drop_percent} for 'loss.drop_percent': must be in (0, 100]")
    if not 0 <= c.loss.ema_decay < 1:
        raise ConfigError(f"bad value {c.loss.ema_decay} for 'loss.ema_decay': must be in [0, 1)")
    for key in ('input.labelled_volumes', 'eval.test_volumes'):
        section, name = key.split('.')
        value = c[section][name]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"bad value {value!r} for '{key}': must be an integer >= 1")
    if c.loss.teacher_warmup_epochs < 0 or c.loss.unsup_weight < 0:
        raise ConfigError("'loss.teacher_warmup_epochs' and 'loss.unsup_weight' must be >= 0")


def resize(image: np.ndarray, out: int, order: int) -> np.ndarray:
    """torch F.interpolate of a square (S, S) map to (out, out): 'bilinear' (align_corners=False) for order 1,
    'nearest' for order 0."""
    size = image.shape[0]
    if order == 0:  # torch's CPU kernel works in float32: its indices differ from float64's at some sizes
        scale = np.float32(size) / np.float32(out)
        index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(int), size - 1)
        return image[np.ix_(index, index)]
    grid = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
    coords = np.meshgrid(grid, grid, indexing='ij')
    return ndimage.map_coordinates(image, coords, order=1, mode='nearest').astype(image.dtype)


def weak_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The reference's training transform (RandResize (0.5, 2.0), RandomHorizontalFlip, Crop 'rand') of one slice
    (S, S) and its labels (S, S); the unlabelled slices pass a dummy label."""
    size = image.shape[0]
    scale = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 2.0)
    out = max(int(size * scale), 1)
    image, label = resize(image, out, 1), resize(label, out, 0)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    pad = max(size - out, 0)
    if pad:
        border = ((pad // 2, pad - pad // 2),) * 2
        image, label = np.pad(image, border), np.pad(label, border)
    top, left = rng.integers(0, image.shape[0] - size + 1, 2)
    crop = lambda a: np.ascontiguousarray(a[top : top + size, left : left + size])
    return crop(image), crop(label)


def unsupervised_loss(logits: jax.Array, pseudo_labels: jax.Array, teacher_logits: jax.Array,
                      drop_percent: float) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """loss_helper.compute_unsupervised_loss: the teacher's per-pixel entropy H; pixels with H >= its
    `drop_percent` percentile (linear interpolation, numpy's) are dropped; the kept pixels' mean CE divided by the
    kept fraction. (loss, kept fraction)."""
    p = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)
    keep = entropy < jnp.percentile(entropy, drop_percent)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), pseudo_labels)
    kept = jnp.maximum(jnp.sum(keep), 1)
    fraction = kept / keep.size
    return jnp.sum(jnp.where(keep, ce, 0.0)) / kept / fraction, fraction


def pseudo_label_quality(pseudo_labels: jax.Array, truth: jax.Array) -> dict[str, jax.Array]:
    """Against the unlabelled slices' true labels (-1: unknown, not counted): 'pseudo_label_accuracy' over the
    known pixels and 'pseudo_label_recall' over the known foreground ones (0 when none is known)."""
    known, foreground = truth >= 0, truth > 0
    right = pseudo_labels == truth
    return {
        'pseudo_label_accuracy': jnp.sum(right & known) / jnp.maximum(jnp.sum(known), 1),
        'pseudo_label_recall': jnp.sum(right & foreground) / jnp.maximum(jnp.sum(foreground), 1),
    }


class Method(base.Method):
    """params: the student UNet {'encoder', 'decoder', 'head'}; extra: {'teacher': its EMA weights,
    'student_stats' / 'teacher_stats': each network's BatchNorm averages}. Batches: 'labelled' and 'unlabelled'
    (B, S, S, 1) slices, 'label' (B, S, S) int32 and 'unlabelled_truth' (B, S, S) int32, the unlabelled slices'
    own labels where known (-1 elsewhere), read by the pseudo-label metrics only."""

    input_key = 'unlabelled'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        check_config(config)
        self.segmenter = segmentation.Segmenter(tuple(config.model.channels), config.model.classes, BN_MOMENTUM)
        self._labelled: tuple[np.ndarray, np.ndarray] | None = None
        steps_per_epoch = len(slices.make_volume_source(config, config.input.split)) // config.input.global_batch
        self.warmup_steps = int(config.loss.teacher_warmup_epochs * steps_per_epoch)

    # --- data (host side) ----------------------------------------------------------------------------------------
    def labelled_slices(self) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, S, S), labels (N, S, S)): every slice of the labelled volumes, read once."""
        if self._labelled is None:
            i = self.config.input
            volumes = segmentation.labelled_volumes(self.config, i.labelled_split, i.labelled_volumes,
                                                    'input.labelled_volumes')  # fmt: skip
            self._labelled = tuple(np.concatenate(parts) for parts in zip(*volumes, strict=True))
        return self._labelled

    def view(self, volume: tuple[np.ndarray, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One random slice of an unlabelled volume and one random labelled slice, each weakly augmented."""
        image, truth = volume
        row = rng.integers(0, len(image))
        # The unlabelled slice's own labels, where its volume has them, only measure the pseudo labels (-1: none).
        truth = np.full(image.shape[1:], -1, np.int32) if truth is None else truth[row]
        unlabelled, truth = weak_augment(image[row], truth + 1, rng)
        labelled_images, labels = self.labelled_slices()
        row = rng.integers(0, len(labelled_images))
        labelled, label = weak_augment(labelled_images[row], labels[row], rng)
        return {
            'unlabelled': unlabelled[..., None].astype(np.float32),
            'labelled': labelled[..., None].astype(np.float32),
            'label': label.astype(np.int32),
            'unlabelled_truth': (truth - 1).astype(np.int32),
        }

    def dataset(self, seed, process_index, process_count):
        self.labelled_slices()  # read (and checked) before the workers start
        return slices.make_volume_dataset(self.config, seed=seed, process_index=process_index,
                                          process_count=process_count, view=self.view)  # fmt: skip

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        rng = np.random.default_rng(0)
        return {
            'unlabelled': rng.uniform(size=(batch_size, size, size, 1)).astype(np.float32),
            'labelled': rng.uniform(size=(batch_size, size, size, 1)).astype(np.float32),
            'label': rng.integers(0, self.config.model.classes, (batch_size, size, size)).astype(np.int32),
            'unlabelled_truth': np.full((batch_size, size, size), -1, np.int32),
        }

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    # --- model ---------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        size = self.config.input.image_size
        variables = self.segmenter.init(base.stream(rng, 'fst'), jnp.zeros((1, size, size, 1)))
        params = {name: v['params'] for name, v in variables.items()}
        stats = {name: v['batch_stats'] for name, v in variables.items()}
        # The teacher's own init is never used: it is the student during the warmup (see the docstring).
        return params, {'teacher': params, 'student_stats': stats, 'teacher_stats': stats}

    @staticmethod
    def _variables(params: Any, stats: Any) -> dict[str, Any]:
        return {name: {'params': params[name], 'batch_stats': stats[name]} for name in params}

    def teacher_params(self, params: Any, extra: Any, step: jax.Array) -> Any:
        """The teacher's weights at `step`: the student's (no gradient) during the warmup, the EMA after it."""
        warm = step < self.warmup_steps
        return jax.tree.map(lambda s, t: jnp.where(warm, jax.lax.stop_gradient(s), t), params, extra['teacher'])

    def loss(self, params, extra, batch, rng, step):
        c = self.config.loss
        labelled, unlabelled = batch['labelled'], batch['unlabelled']
        chex.assert_rank(labelled, 4)
        chex.assert_equal_shape([labelled, unlabelled])
        chex.assert_equal_shape([labelled[..., 0], batch['label'], batch['unlabelled_truth']])
        b = labelled.shape[0]
        both = jnp.concatenate([labelled, unlabelled])
        teacher = self._variables(self.teacher_params(params, extra, step), extra['teacher_stats'])
        teacher_logits, _ = self.segmenter.apply(teacher, unlabelled, train=False)
        pseudo_labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
        logits, student_state = self.segmenter.apply(self._variables(params, extra['student_stats']), both, True)
        sup = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:b].astype(jnp.float32),
                                                                       batch['label']))  # fmt: skip
        # The train-mode teacher pass: its entropies filter the pseudo labels, its statistics become its averages.
        filter_logits, teacher_state = self.segmenter.apply(teacher, both, train=True)
        unsup, kept = unsupervised_loss(logits[b:], pseudo_labels, jax.lax.stop_gradient(filter_logits[b:]),
                                        c.drop_percent)  # fmt: skip
        loss = sup + c.unsup_weight * unsup
        stats = lambda state: {name: state[name]['batch_stats'] for name in state}
        new_extra = dict(extra, student_stats=stats(student_state),
                         teacher_stats=jax.lax.stop_gradient(stats(teacher_state)))  # fmt: skip
        metrics = {'sup_loss': sup, 'unsup_loss': unsup, 'kept_fraction': kept,
                   **pseudo_label_quality(pseudo_labels, batch['unlabelled_truth'])}  # fmt: skip
        return loss, (metrics, new_extra)

    def update_extra(self, params, extra, step):
        """The reference's update_ema: teacher = d teacher + (1 - d) student, d = min(1 - 1/(step + 1), ema_decay);
        during the warmup the teacher is the student (d = 0)."""
        c = self.config.loss
        decay = jnp.minimum(1.0 - 1.0 / (step + 1.0), c.ema_decay)
        decay = jnp.where(step < self.warmup_steps, 0.0, decay)
        teacher = jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, extra['teacher'], params)
        return dict(extra, teacher=teacher)

    def represent(self, params, extra, batch):
        """The global average of the student encoder's bottleneck (running averages), (B, channels[-1])."""
        variables = {'params': params['encoder'], 'batch_stats': extra['student_stats']['encoder']}
        bottleneck, _ = self.segmenter.encoder.apply(variables, batch['unlabelled'])
        return {'bottleneck': bottleneck.mean(axis=(1, 2))}

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, params, extra, mesh):
        """'teacher/dice' and 'student/dice' (mean foreground Dice over the test volumes) and '<net>/dice/<class>'."""
        e = self.config.eval
        volumes = segmentation.labelled_volumes(self.config, e.test_split, e.test_volumes, 'eval.test_volumes')
        params, extra = jax.device_get(params), jax.device_get(extra)
        # During the warmup update_extra copies the student, so extra['teacher'] is the teacher at any step.
        networks = {
            'teacher': self._variables(extra['teacher'], extra['teacher_stats']),
            'student': self._variables(params, extra['student_stats']),
        }
        results, names = {}, slices.class_names(self.config)
        for name, variables in networks.items():
            results.update(segmentation.dice_report(self.segmenter, variables, volumes, names, name))
        return results
