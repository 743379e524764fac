"""VideoMAE V2 distillation: a frozen (large) fine-tuned teacher classifier teaches a smaller student classifier.

VideoMAE V2 distils its K710-fine-tuned ViT-g into ViT-B and ViT-S students initialised from their own
post-pre-trained models (docs/MODEL_ZOO.md of the reference); the repository releases the distilled checkpoints but
no distillation code, and the loss is not specified there. This method implements the standard logit distillation
(Hinton et al.) on the fine-tuning recipe, with optional feature distillation:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * soft-target cross-entropy (Mixup / CutMix / label smoothing, as in fine-tuning)
         + feature_weight * MSE(proj(student pooled features), teacher pooled features)

Teacher and student see the same (mixed) clips. The teacher (`distill.teacher`: a params directory with metadata,
or a fine-tuning workdir) lives in the extra state, is loaded once when the state is initialised (never on resume:
the checkpoint holds it) and is never trained. The student's params are the classifier's (same names as fine-tuning,
so layer decay and `init_from` work unchanged) plus `feature_proj` when feature distillation is on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import mixup, params_io
from jaxssl.config import ConfigError, check_range
from jaxssl.methods import base, videomae_finetune
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import videomae as videomae_model

TEACHER_PARTS = ('patch_embed/.*', 'pos_embed/.*', 'encoder/.*', 'fc_norm/.*', 'head/.*')
PROJ = 'feature_proj'
# Fields of a params directory's metadata['model'] (python -m jaxssl.convert) that build the teacher.
TEACHER_FIELDS = ('width', 'depth', 'heads', 'mlp_hidden', 'patch', 'tubelet', 'channels', 'pos_embedding')
TEACHER_FIELDS += ('use_mean_pooling',)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (float32)."""
    t = temperature
    teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return t * t * jnp.mean(kl)


def feature_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """Mean squared error between (projected) student and teacher pooled features."""
    diff = student_features.astype(jnp.float32) - teacher_features.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


def distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    alpha: float,
    temperature: float,
    feature_weight: float = 0.0,
    student_features: jax.Array | None = None,
    teacher_features: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, parts) of the distillation objective in the module docstring."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    ce = mixup.soft_cross_entropy(student_logits, targets)
    total = alpha * kd + (1.0 - alpha) * ce
    parts = {'kd': kd, 'ce': ce}
    if feature_weight > 0:
        parts['feature'] = feature_loss(student_features, teacher_features)
        total = total + feature_weight * parts['feature']
    return total, parts


def check_config(config: ml_collections.ConfigDict) -> None:
    videomae_finetune.check_config(config)
    check_range(config, 'distill.alpha', 0.0, 1.0 + 1e-9)
    check_range(config, 'distill.temperature', 1e-6, float('inf'))
    check_range(config, 'distill.feature_weight', 0.0, float('inf'))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def teacher_model(config: ml_collections.ConfigDict) -> videomae_model.VideoMAEClassifier:
    """The teacher classifier `distill.teacher` describes: its metadata's model fields (python -m jaxssl.convert), or
    its variant (metadata, or a workdir's config.json, or `distill.teacher_variant`); classes read off the head."""
    path, d = config.distill.teacher, config.distill
    if not path:
        raise ConfigError("'distill.teacher' is empty: pass a teacher params directory or fine-tuning workdir")
    run = _read_json(os.path.join(path, 'config.json')).get('model', {})
    try:
        stored, metadata = params_io.stored_shapes(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"'distill.teacher' {path}: {e}") from None
    if 'head/kernel' not in stored:
        raise ConfigError(f"'distill.teacher' {path} has no classifier head: the teacher must be fine-tuned")
    classes = int(stored['head/kernel'][-1])
    scaled = any('gamma_1' in name for name in stored)
    common = dict(
        num_classes=classes,
        layer_scale_init=1.0 if scaled else 0.0,
        dtype=DTYPES[config.model.dtype],
        attention_impl=config.model.attention_impl or None,
        patch_embed_impl=config.model.patch_embed_impl,
    )
    fields = metadata.get('model') or {}
    if d.teacher_variant or not fields:
        variant = d.teacher_variant or metadata.get('variant') or run.get('variant')
        if not variant:
            raise ConfigError(f"cannot tell the teacher's size from {path}: set 'distill.teacher_variant'")
        return videomae_model.make_classifier(
            variant,
            tubelet=run.get('tubelet', metadata.get('tubelet', 2)),
            pos_embedding=run.get('pos_embedding', 'sincos'),
            use_mean_pooling=run.get('use_mean_pooling', True),
            **common,
        )
    return videomae_model.VideoMAEClassifier(**{k: v for k, v in fields.items() if k in TEACHER_FIELDS}, **common)


class Method(videomae_finetune.Method):
    """Fine-tuning of a student classifier by distillation from a frozen teacher classifier."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.teacher = teacher_model(config)
        if self.teacher.num_classes != self.num_classes:
            raise ConfigError(
                f"the teacher has {self.teacher.num_classes} classes, the student ('model.num_classes') "
                f'{self.num_classes}'
            )
        self.proj = nn.Dense(self.teacher.width, name=PROJ, kernel_init=nn.initializers.xavier_uniform())

    def _teacher_shapes(self, video: jax.Array) -> Any:
        return jax.eval_shape(lambda v: self.teacher.init(jax.random.key(0), v)['params'], video)

    def _load_teacher(self, shapes: Any) -> Any:
        """Host side: the teacher params as numpy arrays in the structure of `shapes` (run once, at initialisation)."""
        try:
            loaded, _, _ = params_io.load_selected(self.config.distill.teacher, shapes, TEACHER_PARTS)
        except ValueError as e:
            raise ConfigError(f"'distill.teacher' {self.config.distill.teacher}: {e}") from None
        from flax import traverse_util

        return traverse_util.unflatten_dict(loaded, sep='/')

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params, _ = super().init(rng, batch)
        if self.config.distill.feature_weight > 0:
            params = dict(params, **{PROJ: self.proj.init(rng, jnp.zeros((1, self.model.width)))['params']})
        shapes = self._teacher_shapes(batch['video'])
        # A host callback, not a closed-over constant: jit would embed the teacher's weights in the program.
        teacher = jax.pure_callback(lambda: self._load_teacher(shapes), shapes)
        return params, {'teacher': teacher}

    def student_params(self, params: Any) -> Any:
        return {k: v for k, v in params.items() if k != PROJ}

    def logits(self, params: Any, video: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        return super().logits(self.student_params(params), video, rng)

    def loss(self, params, extra, batch, rng, step):
        d = self.config.distill
        video, targets, mixed = mixup.mix_batch(
            base.stream(rng, 'mixup'), batch['video'], batch['label'], self.num_classes, self.mix, self.mix_groups
        )
        student_logits, student = self.logits(params, video, rng)
        teacher_logits, teacher = self.teacher.apply({'params': extra['teacher']}, video)
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        student_features = teacher_features = None
        if d.feature_weight > 0:
            student_features = self.proj.apply({'params': params[PROJ]}, student['pooled'].astype(jnp.float32))
            teacher_features = jax.lax.stop_gradient(teacher['pooled'])
        loss, parts = distill_loss(
            student_logits, teacher_logits, targets, d.alpha, d.temperature, d.feature_weight,
            student_features, teacher_features,
        )  # fmt: skip
        agree = jnp.mean(jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
        return loss, ({'loss': loss, **parts, 'teacher_agreement': agree, 'mix_lambda': mixed['lam']}, extra)

    def flops_per_example(self) -> float:
        student = super().flops_per_example()
        m, c = self.teacher, self.config.input
        tokens = int(np.prod(videomae_model.token_grid(c.frames, c.image_size, m.patch, m.tubelet)))
        return student + float(transformer_flops(tokens, m.width, m.depth, m.mlp_hidden))  # teacher: forward only
