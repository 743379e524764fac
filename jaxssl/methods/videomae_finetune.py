"""VideoMAE V2 fine-tuning (the reference's run_class_finetuning.py recipe) on the one trainer.

Model: VideoMAEClassifier (the pretrained encoder on all tokens, mean pooling, fc_norm, dropout, linear head with
init scale 0.001, drop path). Data: jaxssl.data.finetune_pipeline (random clip or segments, RandAugment, random
resized crop, flip, random erasing, num_sample repeated views). Loss: soft-target cross-entropy with Mixup / CutMix
and label smoothing drawn per batch on the device (jaxssl.mixup). Optimiser: the trainer's AdamW with layer-wise lr
decay through `optim.lr_rules` (optim.layer_decay_rules). Evaluation: multi-view test (eval.num_clips x
eval.num_crops views, softmax averaged over the views), top-1 / top-5 over the readable clips of `eval.split`.

Batch layout: 'video' (B, T, H, W, 3) ImageNet-normalised float32; 'label' (B,) int32.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import mixup, sharding
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.methods import base, videomae
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import videomae as videomae_model

# Classes of moving_digits' labels (jaxssl.data.moving_digits): digit, 8 directions, 2 speeds.
MOVING_DIGITS_CLASSES = {'label': 10, 'direction': 8, 'speed': 2}


def num_classes(config: ml_collections.ConfigDict) -> int:
    """model.num_classes, or (when 0) what the data says: moving_digits' label, a class-folder count."""
    if config.model.num_classes > 0:
        return int(config.model.num_classes)
    if config.input.dataset == 'moving_digits':
        return MOVING_DIGITS_CLASSES[config.input.label_key]
    if config.input.dataset == 'folder' and config.input.data_root:
        from jaxssl.data.sources import FolderSource

        return len(FolderSource(config.input.data_root).class_names)
    raise ConfigError(f"set 'model.num_classes' for input.dataset '{config.input.dataset}' (0 reads it from the data)")


def check_layer_decay_rules(config: ml_collections.ConfigDict, depth: int) -> None:
    """Fails when `optim.lr_rules` holds layer-decay rules built for another depth (e.g. after a variant override)."""
    for pattern, value in config.optim.lr_rules:
        stale = False
        if not isinstance(value, (int, float)):
            stale = len(value) != depth
        elif pattern.startswith('encoder/block_') and pattern[len('encoder/block_') :][:2].isdigit():
            stale = int(pattern[len('encoder/block_') :][:2]) >= depth
        if stale:
            raise ConfigError(
                f"'optim.lr_rules' were built for another depth than model.variant "
                f"'{config.model.variant}' ({depth} blocks): set the size with the config argument (variant=...)"
            )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, data or loss cannot use (paths are checked at run time)."""
    spec, _ = videomae.check_model_config(config)
    check_range(config, 'model.head_dropout', 0.0, 1.0)
    check_choice(config, 'input.temporal_sampling', ('clip', 'segments'))
    if config.input.dataset == 'moving_digits':
        check_choice(config, 'input.label_key', MOVING_DIGITS_CLASSES)
        check_choice(config, 'eval.split', ('train', 'val'))
    if config.model.num_classes < 0 or (config.model.num_classes == 0 and config.input.dataset in ('list', 'tfds')):
        raise ConfigError(f"set 'model.num_classes' (> 0) for input.dataset '{config.input.dataset}'")
    for key in ('mixup.mixup_alpha', 'mixup.cutmix_alpha'):
        check_range(config, key, 0.0, float('inf'))
    for key in ('mixup.prob', 'mixup.switch_prob'):
        check_range(config, key, 0.0, 1.0 + 1e-9)
    check_range(config, 'loss.label_smoothing', 0.0, 1.0)
    for key in ('eval.num_clips', 'eval.num_crops', 'eval.batch_size'):
        value = config.eval[key.split('.')[1]]
        if value < 1:
            raise ConfigError(f"bad value {value} for '{key}': must be >= 1")
    check_layer_decay_rules(config, spec['depth'])


def make_model(config: ml_collections.ConfigDict, classes: int) -> videomae_model.VideoMAEClassifier:
    m = config.model
    return videomae_model.make_classifier(
        m.variant,
        classes,
        tubelet=m.tubelet,
        layer_norm_eps=m.layer_norm_eps,
        layer_scale_init=m.layer_scale_init,
        pos_embedding=m.pos_embedding,
        drop_path_rate=m.drop_path_rate,
        head_dropout=m.head_dropout,
        init_scale=m.init_scale,
        use_mean_pooling=m.use_mean_pooling,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
        patch_embed_impl=m.patch_embed_impl,
    )


def mix_config(config: ml_collections.ConfigDict) -> mixup.MixConfig:
    x = config.mixup
    return mixup.MixConfig(x.mixup_alpha, x.cutmix_alpha, x.prob, x.switch_prob, config.loss.label_smoothing)


def batch_devices(config: ml_collections.ConfigDict) -> int:
    """Devices on the mesh's batch axes: the number of device-local Mixup groups."""
    return math.prod(sharding.mesh_shape(config, jax.device_count()))


def topk_counts(probs: jax.Array, labels: jax.Array, valid: jax.Array, k: int = 5) -> jax.Array:
    """[top-1 hits, top-k hits, count] over the rows with valid > 0 (k is capped at the number of classes)."""
    k = min(k, probs.shape[-1])
    _, top = jax.lax.top_k(probs, k)
    hits = top == labels[:, None]
    valid = valid > 0
    return jnp.stack([jnp.sum(hits[:, 0] & valid), jnp.sum(jnp.any(hits, axis=1) & valid), jnp.sum(valid)]).astype(
        jnp.float32
    )


class Method(base.Method):
    """Supervised fine-tuning of a (pretrained) VideoMAE encoder with the reference's recipe."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.num_classes = num_classes(config)
        self.model = make_model(config, self.num_classes)
        self.mix = mix_config(config)
        self.mix_groups = batch_devices(config)
        self.grid = videomae_model.token_grid(
            config.input.frames, config.input.image_size, self.model.patch, self.model.tubelet
        )
        self._test_step = jax.jit(self.test_counts)

    # --- data ---------------------------------------------------------------------------------------------------
    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        from jaxssl import data
        from jaxssl.data import finetune_pipeline

        data.check_input_config(self.config)  # paths are checked when a run starts, not when a config loads
        e = self.config.eval
        if (e.every or e.at_end) and self.config.input.dataset in ('list', 'folder'):
            key = 'eval.list_file' if self.config.input.dataset == 'list' else 'eval.data_root'
            where = e.list_file if self.config.input.dataset == 'list' else e.data_root
            if not where or not os.path.exists(where):
                raise ConfigError(f"'{key}' {where!r} does not exist: name the test set, or set eval.at_end=false")
        source = data.make_source(self.config)
        dataset = finetune_pipeline.make_finetune_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, source=source
        )
        return dataset, len(source)

    def host_metrics(self) -> dict[str, float]:
        from jaxssl import data

        return {'skipped_files': float(data.skipped_files())}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        return {
            'video': np.zeros((batch_size, self.config.input.frames, size, size, 3), np.float32),
            'label': np.zeros((batch_size,), np.int32),
        }

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        """The multi-view test pass over `split` (see finetune_pipeline.make_finetune_eval_dataset)."""
        from jaxssl.data import finetune_pipeline

        e = self.config.eval
        dataset, _ = finetune_pipeline.make_finetune_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            num_clips=e.num_clips,
            num_crops=e.num_crops,
            process_index=process_index,
            process_count=process_count,
            max_clips=max_examples,
        )
        return dataset

    # --- model --------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.model.init(rng, batch['video'])['params'], {}

    def logits(self, params: Any, video: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(logits, intermediates); training mode (drop path, head dropout) when `rng` is given."""
        if rng is None:
            return self.model.apply({'params': params}, video)
        rngs = {'drop_path': base.stream(rng, 'drop_path'), 'dropout': base.stream(rng, 'dropout')}
        return self.model.apply({'params': params}, video, train=True, rngs=rngs)

    def loss(self, params, extra, batch, rng, step):
        video, targets, mixed = mixup.mix_batch(
            base.stream(rng, 'mixup'), batch['video'], batch['label'], self.num_classes, self.mix, self.mix_groups
        )
        logits, _ = self.logits(params, video, rng)
        loss = mixup.soft_cross_entropy(logits, targets)
        return loss, ({'loss': loss, 'mix_lambda': mixed['lam']}, extra)

    def represent(self, params, extra, batch):
        _, intermediates = self.logits(params, batch['video'])
        return {
            'pooled': intermediates['pooled'].astype(jnp.float32),
            'mean_pool': intermediates['encoded'].astype(jnp.float32).mean(axis=1),
        }

    # --- evaluation ---------------------------------------------------------------------------------------------
    def test_counts(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """[top-1 hits, top-5 hits, clips] of a (B, views, T, H, W, 3) batch: softmax averaged over the views."""
        clips, views = batch['video'].shape[:2]
        logits, _ = self.logits(params, batch['video'].reshape(clips * views, *batch['video'].shape[2:]))
        probs = jax.nn.softmax(logits, axis=-1).reshape(clips, views, -1).mean(axis=1)
        return topk_counts(probs, batch['label'], batch['valid'])

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Multi-view top-1 / top-5 accuracy on eval.split (every process runs the same number of sharded steps)."""
        from jaxssl.data import finetune_pipeline, pipeline

        e, c = self.config.eval, self.config.input
        processes, index = jax.process_count(), jax.process_index()
        devices = mesh.shape['data'] * mesh.shape['fsdp']
        global_batch = -(-e.batch_size // devices) * devices
        local = global_batch // processes
        source = finetune_pipeline.label_source(self.config, e.split)
        finetune_pipeline.check_label_key(self.config, source)
        total = len(pipeline.eval_indices(len(source), e.max_clips))
        steps = math.ceil(math.ceil(total / processes) / local)  # batches of the process with the most clips
        dataset, _ = finetune_pipeline.make_finetune_eval_dataset(
            self.config,
            split=e.split,
            batch_size=local,
            num_clips=e.num_clips,
            num_crops=e.num_crops,
            process_index=index,
            process_count=processes,
            max_clips=e.max_clips,
            source=source,
        )
        iterator = iter(dataset)
        views = e.num_clips * e.num_crops
        empty = {
            'video': np.zeros((local, views, c.frames, c.image_size, c.image_size, 3), np.float32),
            'label': np.zeros((local,), np.int32),
            'valid': np.zeros((local,), np.int32),
        }
        counts = np.zeros(3)
        for _ in range(steps):
            batch = next(iterator, None)
            if batch is not None:
                batch = {'video': batch['video'], 'label': batch[c.label_key], 'valid': batch['valid']}
            batch = sharding.global_batch(empty if batch is None else batch, mesh)
            counts += np.asarray(jax.device_get(self._test_step(params, batch)))
        hits1, hits5, clips = counts
        clips = float(clips)
        return {'top1': hits1 / max(clips, 1), 'top5': hits5 / max(clips, 1), 'clips': clips, 'views': float(views)}

    # --- accounting ---------------------------------------------------------------------------------------------
    def tokens_per_example(self) -> int:
        return math.prod(self.grid)

    def flops_per_example(self) -> float:
        m, tokens = self.model, math.prod(self.grid)
        patch_dim = m.tubelet * m.patch * m.patch * m.channels
        forward = (
            2 * tokens * patch_dim * m.width
            + transformer_flops(tokens, m.width, m.depth, m.mlp_hidden)
            + 2 * m.width * self.num_classes
        )
        return 3.0 * forward
