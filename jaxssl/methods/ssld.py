"""SSLD (PaddleClas's simple semi-supervised label distillation, arXiv 2103.05959): a student classifier trained only
on a frozen teacher's predictions, so unlabelled images can be used; no ground-truth loss.

Reference: PaddleClas ppcls/loss/dmlloss.py (DMLLoss, act='softmax', eps=1e-12) and ppcls/arch DistillationModel,
shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md section 5. With p = softmax (T = 1):
    L = mean_{b,c} [ C * (p_t log((p_t + eps) / (p_s + eps)) + p_s log((p_s + eps) / (p_t + eps))) / 2 ]
      = mean_b (KL(t || s) + KL(s || t)) / 2   (up to eps): the "JS" loss is a symmetric KL, without a mixture.
Teacher and student see the same augmented batch; the labels the pipeline carries are not read, so any image source
(labelled or not) serves. The teacher (`distill.teacher`: a params directory, python -m jaxssl.convert / params_io,
or a training workdir of a method on this base) is a shared-ViT classifier of `distill.teacher_variant` (or the
variant in its workdir's config.json); it lives in the extra state, loaded once at initialisation (the checkpoint
holds it on resume) and never trained. Its logits are the last N = model.num_classes outputs of its head: all of a
plain N-way head, or the SD head of an SLA+SD run (the predictor SLA+SD tests with).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxssl import params_io
from jaxssl.config import ConfigError
from jaxssl.methods import base, sla
from jaxssl.models import mae as mae_model

EPS = 1e-12  # DMLLoss's


def check_config(config: ml_collections.ConfigDict) -> None:
    sla.check_backbone_config(config)
    variant = config.distill.teacher_variant
    if variant:
        try:
            mae_model.decode_variant(variant)
        except ValueError:
            raise ConfigError(f"bad value '{variant}' for 'distill.teacher_variant'") from None


def dml_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """PaddleClas's DMLLoss with softmax: C x the mean over images and classes of the eps-smoothed symmetric KL / 2."""
    s = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
    t = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    ratio = jnp.log(t + EPS) - jnp.log(s + EPS)
    return (s.shape[-1] * (t * ratio - s * ratio) / 2).mean()


def teacher_model(config: ml_collections.ConfigDict) -> tuple[sla.ClassifierModel, int]:
    """(the teacher classifier `distill.teacher` describes, its head's output count)."""
    path, n = config.distill.teacher, config.model.num_classes
    if not path:
        raise ConfigError("'distill.teacher' is empty: pass a teacher params directory or training workdir")
    try:
        stored, metadata = params_io.stored_shapes(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"'distill.teacher' {path}: {e}") from None
    outputs = stored.get('head/dense/kernel', (0, 0))[-1]
    if outputs < n or (outputs - n) % n or (outputs - n) // n not in (0, *sla.ROTATIONS):
        raise ConfigError(
            f"'distill.teacher' {path}: a head of {outputs} outputs is neither N = model.num_classes ({n}) nor an "
            'SLA+SD head (N * M + N)'
        )
    run = {}
    try:
        with open(os.path.join(path, 'config.json')) as f:
            run = json.load(f).get('model', {})
    except (OSError, ValueError):
        pass  # a bare params directory has no run config: the metadata or distill.teacher_variant must say
    variant = config.distill.teacher_variant or metadata.get('variant') or run.get('variant')
    if not variant:
        raise ConfigError(f"cannot tell the teacher's size from {path}: set 'distill.teacher_variant'")
    teacher_config = ml_collections.ConfigDict(config.to_dict())
    teacher_config.model.variant = variant
    return sla.make_classifier(teacher_config, outputs), outputs


class Method(sla.ClassifierBase):
    """SSLD distillation for the trainer; extra state {'teacher': params}."""

    needs_labels = False  # any images: the teacher's predictions are the only targets

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.teacher, _ = teacher_model(config)

    def init(self, rng, batch):
        params, _ = super().init(rng, batch)
        shapes = jax.eval_shape(lambda x: self.teacher.init(jax.random.key(0), x)['params'], batch['image'])

        def load() -> Any:
            from flax import traverse_util

            try:
                loaded, _, _ = params_io.load_selected(self.config.distill.teacher, shapes)
            except ValueError as e:
                raise ConfigError(f"'distill.teacher' {self.config.distill.teacher}: {e}") from None
            return traverse_util.unflatten_dict(loaded, sep='/')

        # A host callback, not a closed-over constant: jit would embed the teacher's weights in the program.
        return params, {'teacher': jax.pure_callback(load, shapes)}

    def teacher_logits(self, extra: Any, images: jax.Array) -> jax.Array:
        logits, _ = self.teacher.apply({'params': extra['teacher']}, images)
        return jax.lax.stop_gradient(logits[:, -self.config.model.num_classes :])

    def loss(self, params, extra, batch, rng, step):
        student, _ = self.forward(params, batch['image'], base.stream(rng, 'drop_path'))
        teacher = self.teacher_logits(extra, batch['image'])
        loss = dml_loss(student, teacher)
        agree = jnp.mean(jnp.argmax(student, -1) == jnp.argmax(teacher, -1))
        return loss, ({'loss': loss, 'teacher_agreement': agree}, extra)
