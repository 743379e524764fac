"""Self-distillation for further pretraining (Lee et al., ICLR 2023), on MAE.

The recipe has two pretraining steps on the target data, both through the one trainer:
  1. further pretraining: MAE (configs/mae.py) initialised from a pretrained model theta_0 (`init_from`) gives
     theta_1: the teacher;
  2. self-distillation (this method): the student starts again from theta_0 (encoder and decoder, `init_from`),
     and is trained with
         loss = MAE loss (masked pass)  +  distill.weight * sum_d (h_s - h_t)^2 / B
     where h is the cls token of the encoder's final-norm output on the full, unmasked image, for the student (a
     second, unmasked forward pass) and for the frozen teacher theta_1 (seanie12/self-distillation trainer.py:
     MSE with reduction='sum' over the batch and the feature dimension, divided by the batch size, weight 1).
The teacher (`distill.teacher`: an MAE workdir, whose latest checkpoint is read, or a params directory) has the
student's architecture; its encoder is loaded into the extra state once, when the state is initialised (never on
resume: the checkpoint holds it), and gets no gradient. The student's params are MAE's, so step 3 (fine-tuning or
probes) reads them as any MAE run's.
"""

from __future__ import annotations

import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl import params_io
from jaxssl.config import ConfigError, check_range
from jaxssl.methods import base, mae
from jaxssl.methods.videomae import transformer_flops

# The teacher is an encoder: the reference saves only the ViTModel of step 1.
TEACHER_PARTS = ('patch_embed/.*', 'cls_token', 'encoder/.*')


def feature_distill_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """sum over the batch and the features of (student - teacher)^2, divided by the batch size (float32)."""
    chex.assert_equal_shape([student, teacher])
    chex.assert_rank(student, 2)
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return jnp.sum(jnp.square(diff)) / student.shape[0]


def check_config(config: ml_collections.ConfigDict) -> None:
    mae.check_config(config)
    check_range(config, 'distill.weight', 0.0, float('inf'))


class Method(mae.Method):
    """MAE with a hidden-representation distillation term to a frozen further-pretrained teacher."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if not config.distill.teacher:  # checked when a run starts, so the config itself loads without one
            raise ConfigError("'distill.teacher' is empty: pass the further-pretrained MAE workdir or params directory")

    def _load_teacher(self, shapes: Any) -> Any:
        """Host side: the teacher's encoder params as numpy arrays in the structure of `shapes` (once, at init)."""
        from flax import traverse_util

        try:
            loaded, _, _ = params_io.load_selected(self.config.distill.teacher, shapes, TEACHER_PARTS)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"'distill.teacher' {self.config.distill.teacher}: {e}") from None
        return traverse_util.unflatten_dict(loaded, sep='/')

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        from flax import traverse_util

        params, _ = super().init(rng, batch)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        flat = traverse_util.flatten_dict(shapes, sep='/')
        names = [n for n in flat if any(re.fullmatch(p, n) for p in TEACHER_PARTS)]
        shapes = traverse_util.unflatten_dict({n: flat[n] for n in names}, sep='/')
        # A host callback, not a closed-over constant: jit would embed the teacher's weights in the program.
        teacher = jax.pure_callback(lambda: self._load_teacher(shapes), shapes)
        return params, {'teacher': teacher}

    def teacher_params(self, params: Any, extra: Any) -> Any:
        """The teacher's encoder in a full MAE param tree: the module's setup declares the decoder too, so the
        student's (stopped, unused by the encoder) decoder params fill those places."""
        return {**jax.lax.stop_gradient(params), **extra['teacher']}

    def cls_features(self, params: Any, images: jax.Array, train: bool, rng: jax.Array | None = None) -> jax.Array:
        """The cls token of the encoder's final-norm output on every patch (no masking), (B, width) float32."""
        rngs = {'drop_path': rng} if train and rng is not None else {}
        encoded, _ = self.model.apply({'params': params}, images, None, train, method=self.model.encode, rngs=rngs)
        return encoded[:, 0].astype(jnp.float32)

    def loss(self, params, extra, batch, rng, step):
        mae_loss, metrics = mae.compute_loss(
            self.model, params, batch, base.stream(rng, 'drop_path'), True, self.config.loss.norm_pix_loss
        )
        student = self.cls_features(params, batch['image'], True, base.stream(rng, 'drop_path_full'))
        teacher = jax.lax.stop_gradient(self.cls_features(self.teacher_params(params, extra), batch['image'], False))
        distill = feature_distill_loss(student, teacher)
        loss = mae_loss + self.config.distill.weight * distill
        return loss, ({**metrics, 'loss': loss, 'mae_loss': mae_loss, 'distill_loss': distill}, extra)

    def flops_per_example(self) -> float:
        m, tokens = self.model, self.num_tokens
        encoder = 2 * tokens * m.patch * m.patch * m.channels * m.width
        encoder += transformer_flops(tokens + 1, m.width, m.depth, m.mlp_hidden)
        # + the student's unmasked pass (forward and backward) and the teacher's (forward only).
        return super().flops_per_example() + 3.0 * encoder + encoder
