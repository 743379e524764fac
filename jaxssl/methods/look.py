"""LOOK (Feng et al., ICLR 2022, "Rethinking supervised pre-training for better downstream transferring"): supervised
pretraining with a leave-one-out weighted kNN classifier as the loss, so that an image only has to share its label with
most of its k nearest neighbours and a class may keep several modes.

No reference code is public and the paper's method section could not be read (shared/reference/methods/
mirrorbert_tjepa_sla_look_ssld.md section 4): this is the fact sheet's reconstruction, with the memory design chosen
here and listed in docs/methods.md. Each image's embedding f_i (a linear projection of the ViT's cls token,
l2-normalised) is classified by its k most similar neighbours N_k(i) among the other images of the global batch and a
memory of the embeddings and labels of the last `loss.memory_size` training images (a FIFO queue, the newest first;
detached; empty slots masked), never itself:
  L_i = -log( sum_{j in N_k(i), y_j = y_i} exp(f_i.f_j / T) / sum_{j in N_k(i)} exp(f_i.f_j / T) ).
Images with no same-label neighbour among the k have an infinite loss and no useful gradient: they are left out of the
mean and counted in the metric 'no_positive'. The memory lives in the method's extra state and is pushed the batch's
embeddings in the forward pass, so each step's loss reads the memory of the steps before it.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.config import ConfigError
from jaxssl.methods import base, sla


def check_config(config: ml_collections.ConfigDict) -> None:
    sla.check_backbone_config(config)
    c = config.loss
    for key, minimum in (('embed_dim', 1), ('k', 1), ('memory_size', 0)):
        value = c[key]
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"bad value {value!r} for 'loss.{key}': must be an integer >= {minimum}")
    if c.k > c.memory_size + config.input.global_batch - 1:
        raise ConfigError(f"bad value {c.k} for 'loss.k': more than the memory plus the batch's other images")
    if not c.temperature > 0:
        raise ConfigError(f"bad value {c.temperature} for 'loss.temperature': must be > 0")


def loo_knn_loss(
    features: jax.Array,
    labels: jax.Array,
    memory: jax.Array,
    memory_labels: jax.Array,
    k: int,
    temperature: float,
    num_classes: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The leave-one-out kNN loss of l2-normalised `features` (B, D) with `labels` (B,) against the batch's other
    images and `memory` (Q, D) (not differentiated) whose `memory_labels` (Q,) are -1 for empty slots."""
    chex.assert_rank([features, labels, memory, memory_labels], [2, 1, 2, 1])
    b = features.shape[0]
    sims = features @ jnp.concatenate([features, jax.lax.stop_gradient(memory)]).T  # (B, B + Q)
    candidate_labels = jnp.concatenate([labels, memory_labels])
    # Leave one out: an image is never its own neighbour; empty memory slots are nobody's.
    usable = ~jnp.eye(b, b + memory.shape[0], dtype=bool) & (candidate_labels >= 0)[None, :]
    sims = jnp.where(usable, sims, -jnp.inf)
    top, index = jax.lax.top_k(sims, k)  # (B, k): the k nearest neighbours
    same = (candidate_labels[index] == labels[:, None]) & jnp.isfinite(top)
    logits = top / temperature
    positive = jax.nn.logsumexp(jnp.where(same, logits, -jnp.inf), axis=-1)
    has_positive = same.any(axis=-1)
    per_image = jax.nn.logsumexp(logits, axis=-1) - jnp.where(has_positive, positive, 0.0)
    loss = jnp.where(has_positive, per_image, 0.0).sum() / jnp.maximum(has_positive.sum(), 1)
    # The weighted kNN's own prediction: the label with the largest summed softmax weight among the neighbours.
    weights = jax.nn.softmax(logits, axis=-1)
    votes = (weights[..., None] * jax.nn.one_hot(candidate_labels[index], num_classes)).sum(axis=1)
    metrics = {'knn_acc': (votes.argmax(-1) == labels).mean(), 'no_positive': 1.0 - has_positive.mean()}
    return loss, dict(metrics, loss=loss)


def push(memory: jax.Array, memory_labels: jax.Array, features: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
    """The FIFO memory after enqueuing a batch: the newest B rows first, the oldest B dropped."""
    chex.assert_equal_shape_suffix([memory, features], 1)
    q = memory.shape[0]
    new = jnp.concatenate([jax.lax.stop_gradient(features).astype(memory.dtype), memory])[:q]
    return new, jnp.concatenate([labels.astype(memory_labels.dtype), memory_labels])[:q]


class Method(sla.ClassifierBase):
    """LOOK for the trainer; extra state {'memory': (Q, D), 'memory_labels': (Q,)}."""

    def outputs(self) -> int:
        return self.config.loss.embed_dim

    def init(self, rng, batch):
        params, _ = super().init(rng, batch)
        q, d = self.config.loss.memory_size, self.config.loss.embed_dim
        return params, {'memory': jnp.zeros((q, d), jnp.float32), 'memory_labels': jnp.full((q,), -1, jnp.int32)}

    def embed(self, params: Any, images: jax.Array, rng: jax.Array | None) -> jax.Array:
        z, _ = self.forward(params, images, rng)
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    def loss(self, params, extra, batch, rng, step):
        c = self.config.loss
        f = self.embed(params, batch['image'], base.stream(rng, 'drop_path'))
        loss, metrics = loo_knn_loss(
            f,
            batch['label'],
            extra['memory'],
            extra['memory_labels'],
            c.k,
            c.temperature,
            self.config.model.num_classes,
        )
        memory, memory_labels = push(extra['memory'], extra['memory_labels'], f, batch['label'])
        return loss, (metrics, {'memory': memory, 'memory_labels': memory_labels})

    def represent(self, params, extra, batch):
        """The backbone's cls token and mean patch token, and the normalised embedding the kNN loss trains."""
        return dict(super().represent(params, extra, batch), embedding=self.embed(params, batch['image'], None))
