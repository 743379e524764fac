"""Self-supervised label augmentation (SLA; Lee, Hwang and Shin, ICML 2020): supervised training on joint labels
(class x input transformation) with one softmax over N * M outputs, aggregated inference, and the self-distillation
variant SLA+SD.

Reference: hankook/SLA (trainers.py create_sla_trainer / create_sla_sd_trainer, augmentations.py rotation),
shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md section 3. Batch layout: 'image' (B, S, S, 3) and
'label' (B,) from the image pipeline (one view per image); the M rotations (rot90 by k = 0..3, or k in {0, 2} for
M = 2) are made on the device, as the reference does, each image's M rotations adjacent: row b * M + j is image b
rotated by transform j, and its joint label is y_b * M + j (class-major). Losses:
  SLA     L = CE(z, joint label) averaged over the B * M rows (x M with loss.large_loss, the reference's
          --with-large-loss);
  SLA+SD  L + CE(u, y) + T^2 KL(softmax(agg / T) || softmax(u / T)), with u an extra N-way head on the features of the
          untransformed images (rows j = 0) and agg the aggregated joint logits, not differentiated.
Aggregation averages logits: agg[b, c] = (1 / M) sum_j z[b * M + j, c * M + j]. The backbone is the shared ViT (the
reference: a CIFAR ResNet); both heads are linear layers on the cls token, here one Dense whose first N * M outputs
are the joint head and the last N the SD head (two linear heads on the same features are one). This module also
holds the base the other labelled methods on the shared ViT (LOOK, SSLD) build on.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import images as image_data
from jaxssl.methods import _image, base
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import mae as mae_model
from jaxssl.models import simclr as simclr_model
from jaxssl.optim import OPTIMIZERS

ROTATIONS = {4: (0, 1, 2, 3), 2: (0, 2)}  # the reference's rotation and rotation2 transforms: M -> quarter turns


def check_backbone_config(config: ml_collections.ConfigDict) -> None:
    """The ViT, label-count and optimiser keys every method built on this base shares."""
    _image.check_vit_config(config)
    if not isinstance(config.model.num_classes, int) or config.model.num_classes < 2:
        raise ConfigError(f"bad value {config.model.num_classes!r} for 'model.num_classes': must be an integer >= 2")
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': one view per image")
    check_choice(config, 'optim.name', OPTIMIZERS)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or loss cannot use (data paths: at run start)."""
    check_backbone_config(config)
    check_choice(config, 'loss.rotations', tuple(ROTATIONS))
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")


class LinearHead(nn.Module):
    """h (B, D) -> logits (B, outputs) in float32."""

    outputs: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        chex.assert_rank(h, 2)
        return nn.Dense(self.outputs, dtype=jnp.float32, name='dense')(h.astype(jnp.float32))


class ClassifierModel(simclr_model.SimCLRModel):
    """The shared ViT (SimCLR's backbone: cls token after the final norm) with a linear head of `head_out` outputs."""

    def make_head(self) -> nn.Module:
        return LinearHead(self.head_out)


def rotate(images: jax.Array, m: int) -> jax.Array:
    """(B, S, S, C) -> (B * M, S, S, C), each image's M rotations adjacent (torch.rot90(x, k, (2, 3)) on NCHW is
    numpy's rot90 over (H, W): counter-clockwise quarter turns)."""
    chex.assert_rank(images, 4)
    turned = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in ROTATIONS[m]], axis=1)
    return turned.reshape(-1, *images.shape[1:])


def joint_labels(labels: jax.Array, m: int) -> jax.Array:
    """(B,) class labels -> (B * M,) joint labels y * M + j, in the order `rotate` makes the rows."""
    return (labels[:, None] * m + jnp.arange(m)[None, :]).reshape(-1)


def aggregate(joint: jax.Array, m: int) -> jax.Array:
    """Joint logits (B * M, N * M) -> aggregated class logits (B, N): agg[b, c] = mean_j joint[b * M + j, c * M + j]."""
    chex.assert_rank(joint, 2)
    rows, cols = joint.shape
    z = joint.reshape(rows // m, m, cols // m, m)  # [b, j, c, i]: row transform j, column transform i
    return jnp.einsum('bjcj->bc', z) / m


def sla_loss(
    joint: jax.Array,
    single: jax.Array | None,
    labels: jax.Array,
    m: int,
    temperature: float = 1.0,
    large_loss: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SLA loss on joint logits (B * M, N * M), plus SLA+SD's terms when `single` (B, N) logits of the
    untransformed images are given. Metrics: the loss parts and the training-batch accuracies of the single
    (transform 0's joint logits), aggregated and (SD) single-head predictions, as the reference logs."""
    chex.assert_rank([joint, labels], [2, 1])
    joint_ce = optax.softmax_cross_entropy_with_integer_labels(joint, joint_labels(labels, m)).mean()
    loss = joint_ce * m if large_loss else joint_ce
    agg = aggregate(joint, m)
    accuracy = lambda logits: (jnp.argmax(logits, -1) == labels).mean()
    metrics = {'joint_loss': joint_ce, 'single_acc': accuracy(joint[::m, ::m]), 'agg_acc': accuracy(agg)}
    if single is not None:
        chex.assert_equal_shape([single, agg])
        ce = optax.softmax_cross_entropy_with_integer_labels(single, labels).mean()
        target = jax.nn.softmax(jax.lax.stop_gradient(agg) / temperature)
        # torch's kl_div(log_softmax(u / T), softmax(agg / T), 'batchmean'): sum over classes, mean over images.
        kl = (target * (jnp.log(target) - jax.nn.log_softmax(single / temperature))).sum(-1).mean()
        loss = loss + ce + temperature**2 * kl
        metrics.update(sd_loss=ce, distill_loss=kl, sd_acc=accuracy(single))
    return loss, dict(metrics, loss=loss)


class ClassifierBase(_image.ImageMethod):
    """Labelled training of the shared ViT with a linear head on the built-in / folder / TFDS image sources: data,
    init, probes and FLOPs. Subclasses say how many outputs the head has and what the loss is."""

    needs_labels = True  # whether the loss reads the training labels (SSLD's does not)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = make_classifier(config, self.outputs())

    def outputs(self) -> int:
        return self.config.model.num_classes

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        if self.needs_labels:
            self.check_labels(source)
        dataset = image_data.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, source=source
        )
        return dataset, len(source)

    def check_labels(self, source: Any) -> None:
        """Fails, naming the key, when the training source has no labels or another number of classes."""
        if 'label' not in source.label_keys:
            raise ConfigError(f'input.dataset: {source!r} has no labels; {self.config.method} trains on labels')
        classes = getattr(source, 'class_names', None)
        if classes is not None and len(classes) != self.config.model.num_classes:
            raise ConfigError(
                f"bad value {self.config.model.num_classes} for 'model.num_classes': {source!r} has {len(classes)}"
            )

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        rng = np.random.default_rng(0)
        return {
            'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
            'label': rng.integers(0, self.config.model.num_classes, size=(batch_size,)).astype(np.int32),
        }

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.model.init(rng, batch['image'])['params'], {}

    def forward(self, params: Any, images: jax.Array, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(head outputs (B, outputs) float32, cls features (B, width)) in training mode (drop path)."""
        rngs = {'drop_path': rng} if rng is not None else {}
        logits, intermediates = self.model.apply({'params': params}, images, rng is not None, rngs=rngs)
        return logits, intermediates['cls']

    def represent(self, params, extra, batch):
        """The backbone on the whole image: the cls token and the mean of the patch tokens."""
        encoded, _ = self.model.apply({'params': params}, batch['image'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1)}

    def flops_per_example(self) -> float:
        """One forward + backward of one image through the backbone and head."""
        m, tokens = self.model, self.tokens_per_example()
        forward = (
            2 * tokens * m.patch * m.patch * 3 * m.width
            + transformer_flops(tokens + 1, m.width, m.depth, m.mlp_hidden)
            + 2 * m.width * m.head_out
        )
        return 3.0 * forward


def make_classifier(config: ml_collections.ConfigDict, outputs: int) -> ClassifierModel:
    m = config.model
    spec = mae_model.decode_variant(m.variant)
    return ClassifierModel(
        **{k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')},
        head_out=outputs,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


class Method(ClassifierBase):
    """SLA / SLA+SD (loss.self_distill) for the trainer."""

    def outputs(self) -> int:
        n, c = self.config.model.num_classes, self.config.loss
        return n * c.rotations + (n if c.self_distill else 0)

    def loss(self, params, extra, batch, rng, step):
        c, n = self.config.loss, self.config.model.num_classes
        chex.assert_rank(batch['image'], 4)
        logits, _ = self.forward(params, rotate(batch['image'], c.rotations), base.stream(rng, 'drop_path'))
        joint = logits[:, : n * c.rotations]
        # The SD head reads the untransformed images only (rows j = 0), as the reference's single_preds[::n].
        single = logits[:: c.rotations, n * c.rotations :] if c.self_distill else None
        loss, metrics = sla_loss(joint, single, batch['label'], c.rotations, c.temperature, c.large_loss)
        return loss, (metrics, extra)

    def flops_per_example(self) -> float:
        return self.config.loss.rotations * super().flops_per_example()  # M forward passes per image
