"""DINO (Caron et al., ICCV 2021): self-distillation with no labels. A student ViT + head is trained to match an EMA
teacher's centred, sharpened output distribution across multi-crop views of an image.

Batch layout (jaxssl.data.views.multi_crop_views in the Grain pipeline): 'global_crops' (B, G, S, S, 3) and
'local_crops' (B, L, s, s, 3) (absent with L = 0), ImageNet-normalised; 'label' (B,) where the source has labels
(unused by the loss). Extra state: the teacher's parameters (an EMA of the student's, momentum cosine from
model.teacher_momentum to 1 over the run) and the centre (1, out_dim) (an EMA, loss.center_momentum, of the mean
teacher logits over the global batch: under jit with the batch sharded over devices the mean is global, the
reference's all-reduce). The loss (facebookresearch/dino main_dino.py:DINOLoss) is the cross-entropy between
softmax((teacher - centre) / teacher_temp) of every global crop and log_softmax(student / student_temp) of every
other crop, averaged over the batch and over the G (G + L) - G pairs; the centre is updated after the loss with the
step's teacher logits. The probes read the teacher's backbone (the reference evaluates the teacher).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import optim
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.data import views
from jaxssl.methods import _image, base
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import dino as dino_model
from jaxssl.models import mae as mae_model
from jaxssl.models import resnet

GLOBAL, LOCAL = 'global_crops', 'local_crops'
# The parameters DINO's freeze_last_layer holds fixed during the first epoch(s) (optim.freeze_epochs).
LAST_LAYER = 'head/last_layer/.*'


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, crops or loss cannot use (data paths: at run start)."""
    check_choice(config, 'optim.name', ('adamw', 'sgd'))
    if resnet.is_resnet(config.model.variant):
        _image.check_resnet_config(config)
    else:
        _image.check_vit_config(config, ('input.image_size', 'input.local_crop_size'))
    for key in ('model.head_hidden', 'model.head_out', 'model.head_bottleneck', 'model.head_layers'):
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < 1:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= 1")
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': DINO's crops are one sample")
    if len(config.input.global_blur_probs) < 2 or len(config.input.global_solarize_probs) != len(
        config.input.global_blur_probs
    ):
        raise ConfigError(
            "'input.global_blur_probs' / 'input.global_solarize_probs': one probability per global crop, at least 2 "
            'crops (the loss pairs each global crop with the others)'
        )
    if not isinstance(config.input.local_crops_number, int) or config.input.local_crops_number < 0:
        raise ConfigError(f"bad value {config.input.local_crops_number!r} for 'input.local_crops_number': must be >= 0")
    for key in ('input.jitter_prob', 'input.grayscale_prob', 'input.local_blur_prob'):
        check_range(config, key, 0.0, 1.000001)
    for key in ('input.global_crop_scale', 'input.local_crop_scale'):
        low, high = config.input[key.split('.')[1]]
        if not 0 < low <= high <= 1:
            raise ConfigError(f"bad value {(low, high)} for '{key}': need 0 < low <= high <= 1")
    for key in ('loss.student_temp', 'loss.teacher_temp', 'loss.warmup_teacher_temp'):
        check_range(config, key, 1e-6, 100.0)
    check_range(config, 'loss.center_momentum', 0.0, 1.0)
    check_range(config, 'model.teacher_momentum', 0.0, 1.0)
    if config.loss.warmup_teacher_temp_epochs < 0:
        raise ConfigError(f"bad value {config.loss.warmup_teacher_temp_epochs} for 'loss.warmup_teacher_temp_epochs'")


def make_model(config: ml_collections.ConfigDict) -> dino_model.DINOModel | dino_model.DINOResNetModel:
    m = config.model
    return dino_model.make_model(
        m.variant,
        resnet_width=m.get('resnet_width', 64),
        resnet_small_stem=m.get('resnet_small_stem', False),
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        head_layers=m.head_layers,
        head_bottleneck=m.head_bottleneck,
        norm_last_layer=m.norm_last_layer,
        head_use_bn=m.get('head_use_bn', False),
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def crop_groups(config: ml_collections.ConfigDict) -> tuple[views.CropGroup, ...]:
    """The global group and (if input.local_crops_number > 0) the local group `config.input` describes."""
    c = config.input
    groups = [
        views.CropGroup(
            GLOBAL, c.image_size, tuple(c.global_crop_scale), tuple(c.global_blur_probs), tuple(c.global_solarize_probs)
        )
    ]
    if c.local_crops_number:
        n = c.local_crops_number
        groups.append(
            views.CropGroup(LOCAL, c.local_crop_size, tuple(c.local_crop_scale), (c.local_blur_prob,) * n, (0.0,) * n)
        )
    return tuple(groups)


def make_view(config: ml_collections.ConfigDict) -> image_data.View:
    c = config.input
    return functools.partial(
        views.multi_crop_views,
        groups=crop_groups(config),
        ratio=tuple(c.crop_ratio),
        flip=c.hflip,
        jitter=tuple(c.jitter),
        jitter_prob=c.jitter_prob,
        grayscale_prob=c.grayscale_prob,
        interpolation=c.interpolation,
    )


def pair_cross_entropy(student: jax.Array, targets: jax.Array, student_temp: float) -> jax.Array:
    """Student logits (V, B, K) of all crops, globals first; teacher targets (G, B, K) (probabilities) of the global
    crops. Mean over the pairs (teacher crop g, student crop v != g) of the batch-mean cross-entropy
    -sum_k targets_gk log_softmax(s_v / student_temp)_k (DINOv2 sums the same terms and divides by their count)."""
    chex.assert_rank([student, targets], 3)
    chex.assert_equal_shape([student[: targets.shape[0]], targets])
    log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)
    ce = -jnp.einsum('gbk,vbk->gv', targets, log_probs) / student.shape[1]  # (G, V), each a batch mean
    pairs = ~jnp.eye(targets.shape[0], student.shape[0], dtype=bool)  # same-view pairs excluded
    return jnp.sum(jnp.where(pairs, ce, 0.0)) / jnp.sum(pairs)


def dino_loss(
    student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float, teacher_temp: jax.Array
) -> jax.Array:
    """DINOLoss: student logits (V, B, K) of all crops, globals first; teacher logits (G, B, K) of the global crops.
    `pair_cross_entropy` against the centred, sharpened targets softmax((t_g - c) / teacher_temp)."""
    chex.assert_rank(teacher, 3)
    return pair_cross_entropy(student, centred_targets(teacher, center, teacher_temp), student_temp)


def centred_targets(teacher: jax.Array, center: jax.Array, teacher_temp: jax.Array) -> jax.Array:
    """The teacher's targets: softmax((t - c) / teacher_temp) over the prototypes."""
    return jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)


def teacher_temperature(epoch: jax.Array, start: float, end: float, warmup_epochs: int) -> jax.Array:
    """linspace(start, end, warmup_epochs) indexed by the epoch, then `end` (the reference's per-epoch schedule)."""
    epoch = jnp.asarray(epoch, jnp.float32)
    if warmup_epochs <= 0:
        return jnp.asarray(end, jnp.float32)
    ramp = start + (end - start) * epoch / max(warmup_epochs - 1, 1)
    return jnp.where(epoch < warmup_epochs, ramp, end)


def teacher_momentum(step: jax.Array, total_steps: int, start: float) -> jax.Array:
    """The reference's cosine_scheduler(start, 1): 1 - (1 - start) (cos(pi step / total) + 1) / 2."""
    progress = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - start) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def center_update(center: jax.Array, teacher: jax.Array, momentum: float) -> jax.Array:
    """c <- m c + (1 - m) mean(teacher logits over crops and the global batch); teacher (G, B, K)."""
    return momentum * center + (1.0 - momentum) * jnp.mean(teacher, axis=(0, 1))[None]


def views_major(crops: jax.Array) -> jax.Array:
    """(B, V, S, S, C) -> (V * B, S, S, C) with each crop index's batch contiguous (the reference's chunk order)."""
    return jnp.swapaxes(crops, 0, 1).reshape(-1, *crops.shape[2:])


class Method(_image.ImageMethod):
    """DINO pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = make_model(config)

    @property
    def resnet(self) -> bool:
        """A ResNet backbone. Its BatchNorm running averages live in extra: 'batch_stats' (the student's) and
        'teacher_batch_stats' (the teacher's own, from its forward passes: the EMA covers parameters only, as the
        reference's, whose teacher runs in train mode)."""
        return isinstance(self.model, dino_model.DINOResNetModel)

    @functools.cached_property
    def run_length(self) -> tuple[int, int]:
        """(total steps, steps per epoch): the momentum and teacher-temperature schedules are indexed by them."""
        return optim.training_steps(self.config, len(image_data.make_image_source(self.config)))

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=self.make_view(),
            source=source,
        )
        return dataset, len(source)

    def make_view(self) -> image_data.View:
        """The per-image view function of the input pipeline (a hook: UNI adds iBOT masks)."""
        return make_view(self.config)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {
            group.name: rng.normal(size=(batch_size, group.count, group.size, group.size, 3)).astype(np.float32)
            for group in crop_groups(self.config)
        }

    def _groups(self, batch: dict[str, jax.Array]) -> list[jax.Array]:
        return [views_major(batch[name]) for name in (GLOBAL, LOCAL) if name in batch]

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, self._groups(batch))
        params = variables['params']
        # The teacher starts as a copy of the student (the reference loads the student's state dict).
        center = jnp.zeros((1, self.config.model.head_out), jnp.float32)
        extra = {'teacher': params, 'center': center}
        if self.resnet:
            extra.update(batch_stats=variables['batch_stats'], teacher_batch_stats=variables['batch_stats'])
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        chex.assert_rank(batch[GLOBAL], 5)
        groups = self._groups(batch)
        batch_size, num_global = batch[GLOBAL].shape[:2]
        # The teacher sees the global crops only, without drop path (a ViT's), with batch statistics (a ResNet's:
        # the reference's teacher is in train mode); no gradient flows into it.
        teacher, teacher_stats = self.logits(
            extra['teacher'], extra.get('teacher_batch_stats'), groups[:1], train=self.resnet
        )
        teacher = jax.lax.stop_gradient(teacher).reshape(num_global, batch_size, -1)
        rngs = {'drop_path': base.stream(rng, 'drop_path')}
        student, student_stats = self.logits(params, extra.get('batch_stats'), groups, True, rngs)
        student = student.reshape(-1, batch_size, student.shape[-1])
        c = self.config.loss
        _, steps_per_epoch = self.run_length
        temp = teacher_temperature(
            step // steps_per_epoch, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs
        )
        targets = centred_targets(teacher, extra['center'], temp)
        loss = pair_cross_entropy(student, targets, c.student_temp)  # dino_loss, the targets kept for the monitors
        center = center_update(extra['center'], teacher, c.center_momentum)
        metrics = {'loss': loss, 'teacher_temp': temp, **collapse_monitors(targets)}
        extra = dict(extra, center=center)
        if self.resnet:
            extra.update(batch_stats=jax.lax.stop_gradient(student_stats), teacher_batch_stats=teacher_stats)
        return loss, (metrics, extra)

    def logits(
        self, params: Any, stats: Any, groups: list[jax.Array], train: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, Any]:
        """The model's head logits and the updated BatchNorm running averages (None without a ResNet: a head
        BatchNorm (model.head_use_bn) normalises with the batch's statistics, so its running averages are dropped)."""
        variables = {'params': params} if stats is None else {'params': params, 'batch_stats': stats}
        (logits, _), updated = self.model.apply(variables, groups, train, rngs=rngs, mutable=['batch_stats'])
        return logits, None if stats is None else updated['batch_stats']

    def update_extra(self, params: Any, extra: Any, step: jax.Array) -> Any:
        total_steps, _ = self.run_length
        m = teacher_momentum(step, total_steps, self.config.model.teacher_momentum)
        teacher = jax.tree.map(lambda t, p: m * t + (1 - m) * p, extra['teacher'], params)
        return dict(extra, teacher=teacher)

    def represent(self, params, extra, batch):
        """The teacher's backbone on the whole image (the reference evaluates the teacher): the cls token and the
        mean of the patch tokens; a ResNet's pooled features (with the teacher's running averages)."""
        if self.resnet:
            variables = {'params': extra['teacher'], 'batch_stats': extra['teacher_batch_stats']}
            return {'pool': self.model.apply(variables, batch['image'], method=self.model.encode)}
        encoded, _ = self.model.apply({'params': extra['teacher']}, batch['image'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1)}

    def tokens_per_example(self) -> int | None:
        """Backbone tokens of all crops of one image (None for a ResNet)."""
        if self.resnet:
            return None
        return sum(
            g.count * int(np.prod(mae_model.token_grid(g.size, self.model.patch))) for g in crop_groups(self.config)
        )


def collapse_monitors(targets: jax.Array) -> dict[str, jax.Array]:
    """The teacher's targets (..., K) (probabilities; rows over the batch and crops) -> 'teacher_entropy', the mean
    entropy of one target, and 'teacher_batch_entropy', the entropy of the mean target (DINO section 5.3's
    monitors). Uniform collapse: both at log K. One-prototype collapse: both near 0. Their difference (>= 0) is the
    information the targets carry about the image: a run that learns has a target entropy well below the batch
    entropy. Means over the sharded global batch (under jit the reductions are global). Sinkhorn-Knopp targets (UNI,
    POA) have a uniform batch mean by construction, so there only the target entropy is informative."""
    probs = targets.reshape(-1, targets.shape[-1])
    mean = jnp.mean(probs, axis=0)
    return {
        'teacher_entropy': -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)),
        'teacher_batch_entropy': -jnp.sum(mean * jnp.log(mean + 1e-12)),
    }
