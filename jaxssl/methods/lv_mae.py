"""LV-MAE (Naiman et al., ICCV 2025) pretraining: mask most of a long video's segment embeddings and reconstruct them.

The objective is the reference's (amazon-science/lv-mae data/CombinedData.py, models_mae.py, the README's command):
1. A window of L segments of a video's unit-norm embeddings (jaxssl.data.embeddings).
2. n_keep = int(L (1 - mask.ratio)) segments stay visible (0.5 in the recommended command). `mask.type`:
   'importance' (the recommended): s_0 = 0, s_t = cos(e_(t-1), e_t); the n_keep segments of lowest s, the change
   points, stay visible and the most redundant are masked (deterministic given the window); 'random': MAE's
   uniform draw.
3. The encoder on the cls and the visible segments, the decoder on all L (jaxssl.models.lv_mae).
4. loss = the mean over every masked segment of the batch of mean_d (prediction - embedding)^2 (`loss.type`
   'mse'; 'cosine': 1 - cos(prediction, embedding), the reference's --cos_loss, off in its command).
Videos too short to keep one segment (N (1 - ratio) < 1) are skipped and counted; the reference redraws them.

Batch layout: 'embeddings' (B, max_len, D) float32 zero-padded, 'length' (B,), 'num_keep' (B,) (host-computed
int(L (1 - ratio)), as the reference's float arithmetic), 'label' (unused here).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import data
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import embeddings as embedding_data
from jaxssl.methods import base
from jaxssl.models import lv_mae

MASK_TYPES = ('importance', 'random')
LOSSES = ('mse', 'cosine')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the data, masks, model or loss cannot use."""
    check_choice(config, 'model.variant', lv_mae.VARIANTS)
    embedding_data.check_embedding_input_config(config)
    variant = lv_mae.VARIANTS[config.model.variant]
    if config.input.embedding_dim % variant['heads'] or config.input.embedding_dim % 2:
        raise ConfigError(
            f"'input.embedding_dim' {config.input.embedding_dim} is the encoder's width: it must be even and divide "
            f"over the '{config.model.variant}' variant's {variant['heads']} heads"
        )
    check_choice(config, 'mask.type', MASK_TYPES)
    check_range(config, 'mask.ratio', 0.0, 1.0)
    if not 0 < config.mask.ratio < 1:
        raise ConfigError(f"bad value {config.mask.ratio} for 'mask.ratio': must be in (0, 1)")
    check_choice(config, 'loss.type', LOSSES)


def min_segments(ratio: float) -> int:
    """The fewest segments a video needs to keep one visible: the reference rejects N (1 - ratio) < 1."""
    n = 1
    while n * (1 - ratio) < 1:
        n += 1
    return n


def visible_order(embeddings: jax.Array, length: jax.Array, mask_type: str, rng: jax.Array) -> jax.Array:
    """(B, T) segment indices, those to keep visible first, padding last: ascending s (s_0 = 0, s_t the cosine of
    consecutive segments; 'importance') or uniform noise ('random')."""
    b, t, _ = embeddings.shape
    if mask_type == 'importance':
        unit = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-8)
        cosine = jnp.sum(unit[:, 1:] * unit[:, :-1], axis=-1)
        scores = jnp.concatenate([jnp.zeros((b, 1)), cosine], axis=1)
    else:
        scores = jax.random.uniform(rng, (b, t))
    scores = jnp.where(jnp.arange(t) < length[:, None], scores, jnp.inf)
    return jnp.argsort(scores, axis=1, stable=True)


def reconstruction_loss(predicted: jax.Array, target: jax.Array, masked: jax.Array, kind: str) -> jax.Array:
    """The mean over the masked segments (B, T) of the per-segment MSE over dims, or 1 - cosine (eps 1e-6)."""
    if kind == 'mse':
        per_segment = jnp.mean((predicted - target) ** 2, axis=-1)
    else:
        norms = jnp.linalg.norm(predicted, axis=-1) * jnp.linalg.norm(target, axis=-1)
        per_segment = 1 - jnp.sum(predicted * target, axis=-1) / jnp.maximum(norms, 1e-6)
    masked = masked.astype(jnp.float32)
    return jnp.sum(per_segment * masked) / jnp.maximum(jnp.sum(masked), 1.0)


class Method(base.Method):
    """LV-MAE pretraining for the trainer."""

    input_key = 'embeddings'
    represent_keys = ('length',)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = config.input
        self.model = lv_mae.make_model(config.model.variant, c.embedding_dim, max_len=c.max_len)
        self.max_keep = int(c.max_len * (1 - config.mask.ratio))  # visible slots (the longest window's n_keep)

    def num_keep(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        del rng
        return {**sample, 'num_keep': np.int32(int(int(sample['length']) * (1 - self.config.mask.ratio)))}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        source = embedding_data.make_embedding_source(self.config)
        dataset = embedding_data.make_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, source=source,
            min_segments=min_segments(self.config.mask.ratio), sample_transform=self.num_keep,
        )  # fmt: skip
        return dataset, len(source)

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = embedding_data.make_eval_dataset(
            self.config, split=split, batch_size=batch_size, process_index=process_index,
            process_count=process_count, max_examples=max_examples,
        )  # fmt: skip
        return dataset

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        c = self.config.input
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch_size, c.max_len, c.embedding_dim))
        length = np.full(batch_size, c.max_len, np.int32)
        return {
            'embeddings': (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32),
            'length': length,
            'num_keep': (length * (1 - self.config.mask.ratio)).astype(np.int32),
            'label': np.zeros(batch_size, np.int32),
        }

    def masks(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(visible (B, max_keep) indices, their valid flags, masked (B, T) bool: hidden segments of the window)."""
        embeddings, length = batch['embeddings'], batch['length']
        order = visible_order(embeddings, length, self.config.mask.type, rng)
        visible = order[:, : self.max_keep]
        valid = jnp.arange(self.max_keep) < batch['num_keep'][:, None]
        t = embeddings.shape[1]
        kept = jnp.zeros((embeddings.shape[0], t + 1), bool)
        kept = kept.at[jnp.arange(len(visible))[:, None], jnp.where(valid, visible, t)].set(True)[:, :t]
        return visible, valid, (jnp.arange(t) < length[:, None]) & ~kept

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        visible, valid, _ = self.masks(batch, jax.random.key(0))
        variables = self.model.init(rng, batch['embeddings'], batch['length'], visible, valid)
        return variables['params'], {}

    def loss(self, params, extra, batch, rng, step):
        visible, valid, masked = self.masks(batch, base.stream(rng, 'mask'))
        # No drop path in LV-MAE: train=False skips vit.Block's stochastic-depth draws.
        predicted = self.model.apply({'params': params}, batch['embeddings'], batch['length'], visible, valid)
        loss = reconstruction_loss(predicted, batch['embeddings'], masked, self.config.loss.type)
        metrics = {'loss': loss, 'masked_segments': jnp.sum(masked) / masked.shape[0]}
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on every segment of the video (up to max_len), nothing masked: the mean of the segments'
        outputs (the reference's linear probe, 'mean_pool') and the cls token ('cls')."""
        embeddings, length = batch['embeddings'], batch['length']
        t = embeddings.shape[1]
        index = jnp.broadcast_to(jnp.arange(t), embeddings.shape[:2])
        valid = index < length[:, None]
        x = self.model.apply({'params': params}, embeddings, index, valid, method=self.model.encode)
        weights = valid.astype(x.dtype)[..., None]
        mean = jnp.sum(x[:, 1:] * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return {'mean_pool': mean, 'cls': x[:, 0]}

    def tokens_per_example(self) -> int:
        return self.config.input.max_len

    def flops_per_example(self) -> float:
        """Forward + backward (3x) of the encoder on 1 + max_keep tokens, the decoder on 1 + max_len and the two
        Linears, at the longest window."""
        m, t = self.model, self.config.input.max_len
        block = lambda n, width: 2 * n * 12 * width * width + 4 * n * n * width
        encoder = m.depth * block(1 + self.max_keep, m.width)
        decoder = m.dec_depth * block(1 + t, m.dec_width) + 2 * 2 * (1 + t) * m.width * m.dec_width
        return 3.0 * (encoder + decoder)
