"""MP3 (Zhai et al., ICML 2022): masked position prediction. A ViT without position embeddings sees all patches as
queries but only a random context subset as keys / values; every token classifies its own position (N-way CE).

Batch layout: 'image' (B, H, W, 3) ImageNet-normalised; 'ids_shuffle' (B, N) int32, a random permutation of the
patch indices whose first `num_kept(N, masking.ratio)` entries are the context (jaxssl.masks.shuffle_masking made
per sample in the Grain pipeline); 'label' (B,) where the source has labels (unused by the loss). MAE's data
plumbing (jaxssl.methods.mae.Method) is reused as is; only the mask layout, model, loss and features differ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.methods import base, mae
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mp3 as mp3_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """MAE's checks: the size table, dtype, drop path, a square patch grid and a ratio that keeps a context."""
    mae.check_config(config)


def make_model(config: ml_collections.ConfigDict) -> mp3_model.MP3Pretrain:
    m = config.model
    return mp3_model.make_pretrain_model(
        m.variant,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def ids_shuffle_mask(num_tokens: int, ratio: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample's permutation (N,) int32: MAE's shuffle (jaxssl.masks.shuffle_masking), so its first
    num_kept(N, ratio) entries are MAE's kept tokens, here the context."""
    mask = masks.shuffle_masking(num_tokens, ratio, rng)
    return {'ids_shuffle': np.argsort(mask['ids_restore'], kind='stable').astype(np.int32)}


def position_loss(logits: jax.Array, positions: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, N, N) position logits against each token's true position (B, N)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, positions[..., None], axis=-1))


def compute_loss(
    model: mp3_model.MP3Pretrain,
    params: Any,
    batch: dict[str, jax.Array],
    num_context: int,
    rng: jax.Array | None = None,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Position classification of every token (context and the rest), with accuracies of each group."""
    rngs = {'drop_path': rng} if train and rng is not None else {}
    positions = batch['ids_shuffle']
    logits, _ = model.apply({'params': params}, batch['image'], positions, num_context, train=train, rngs=rngs)
    loss = position_loss(logits, positions)
    correct = (jnp.argmax(logits, axis=-1) == positions).astype(jnp.float32)
    metrics = {'loss': loss, 'position_acc_context': correct[:, :num_context].mean()}
    if num_context < correct.shape[1]:
        metrics['position_acc_rest'] = correct[:, num_context:].mean()
    return loss, metrics


class Method(mae.Method):
    """MP3 pretraining on MAE's image plumbing."""

    build_model = staticmethod(make_model)

    def sample_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return ids_shuffle_mask(self.num_tokens, self.config.masking.ratio, rng)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, batch['image'], batch['ids_shuffle'], self.num_keep)
        return variables['params'], {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(self.model, params, batch, self.num_keep, base.stream(rng, 'drop_path'), True)
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on every patch as context (no masking, no positions), after its final norm: the mean token
        (position-free, so a permutation-invariant feature) and the tokens (for attentive probes)."""
        _, intermediates = self.model.apply({'params': params}, batch['image'])
        encoded = intermediates['encoded'].astype(jnp.float32)
        return {'mean_pool': encoded.mean(axis=1), 'tokens': encoded}

    def visualize(self, params, extra):
        return {}  # nothing is reconstructed

    def flops_per_example(self) -> None:
        return None
