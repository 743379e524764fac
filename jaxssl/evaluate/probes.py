"""Frozen-feature probes: linear (logistic regression), kNN (cosine), few-shot (nearest prototype) and attentive
(a small cross-attention pooler over token features, as V-JEPA evaluates video encoders).

All take numpy features and integer labels and return accuracies in [0, 1] (`linear_classifier` and `knn_predict`
give the predictions, for metrics other than accuracy). They are deterministic for a seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def _class_bucket(num_classes: int) -> int:
    """The padded class count the solver is compiled for: 16, 32, 64, ... so that probes of different labels share
    one compilation (the padded classes' logits are masked out: the solution is the unpadded one)."""
    return max(16, 1 << (num_classes - 1).bit_length())


def _fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, steps: int) -> tuple[jax.Array, jax.Array]:
    """Multinomial logistic regression, full batch, L-BFGS: weights (D, C) and bias (C,)."""
    bucket = _class_bucket(num_classes)
    w, b = _fit_logistic_jit(jnp.asarray(x, jnp.float32), jnp.asarray(y), num_classes, jnp.float32(l2), bucket, steps)
    return w[:, :num_classes], b[:num_classes]


# Features, L2 and the class count are arguments, not constants closed over: one compilation serves every L2 of the
# grid and every later probe of the same feature shape (compiling takes seconds on a CPU, solving a fraction of one).
@functools.partial(jax.jit, static_argnums=(4, 5))
def _fit_logistic_jit(x: jax.Array, y: jax.Array, num_classes: jax.Array, l2: jax.Array, bucket: int, steps: int):
    valid = jnp.arange(bucket) < num_classes

    def loss(p):
        logits = jnp.where(valid, x @ p['w'] + p['b'], -jnp.inf)  # padded classes: no probability, zero gradient
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(p['w'] ** 2)

    params = {'w': jnp.zeros((x.shape[1], bucket)), 'b': jnp.zeros(bucket)}
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), value

    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
    return params['w'], params['b']


def linear_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int | None = None,
    l2_grid: tuple[float, ...] = (1e-5, 1e-3, 1e-1),
    steps: int = 200,
    seed: int = 0,
) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression on standardised features, L2 chosen on a 20% held-out train split: returns the fitted
    probe, features (N, D) -> predicted labels (N,)."""
    num_classes = num_classes or int(train_y.max()) + 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))
    held = order[: max(len(order) // 5, 1)]
    fit = order[len(held) :]
    best_l2, best_acc = l2_grid[0], -1.0
    if len(l2_grid) > 1:
        for l2 in l2_grid:
            a, b = _standardise(train_x[fit], train_x[held])
            w, bias = _fit_logistic(a, train_y[fit], num_classes, l2, steps)
            acc = float(np.mean(np.argmax(b @ np.asarray(w) + np.asarray(bias), -1) == train_y[held]))
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    w, bias = _fit_logistic((train_x - mean) / std, train_y, num_classes, best_l2, steps)
    w, bias = np.asarray(w), np.asarray(bias)
    return lambda x: np.argmax((x - mean) / std @ w + bias, -1)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int | None = None,
    l2_grid: tuple[float, ...] = (1e-5, 1e-3, 1e-1),
    steps: int = 200,
    seed: int = 0,
) -> float:
    """Test accuracy of `linear_classifier`."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    predict = linear_classifier(train_x, train_y, num_classes, l2_grid, steps, seed)
    return float(np.mean(predict(test_x) == test_y))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted kNN on cosine similarity (votes exp(sim / T), as in DINO's evaluation): predicted labels (N,)."""
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_x))
    sims = _normalise(test_x) @ _normalise(train_x).T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
    votes = np.zeros((len(test_x), num_classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[top]), weights)
    return votes.argmax(1)


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of `knn_predict`."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    return float(np.mean(knn_predict(train_x, train_y, test_x, k, temperature, num_classes) == test_y))


def few_shot_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: int = 5,
    episodes: int = 10,
    seed: int = 0,
) -> float:
    """Mean accuracy of nearest-prototype classification (cosine) from `shots` random examples per class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(train_y)
    test_n = _normalise(test_x)
    accuracies = []
    for _ in range(episodes):
        prototypes = []
        for c in classes:
            members = np.flatnonzero(train_y == c)
            pick = rng.choice(members, size=min(shots, len(members)), replace=False)
            prototypes.append(_normalise(train_x[pick]).mean(0))
        predictions = classes[np.argmax(test_n @ _normalise(np.stack(prototypes)).T, axis=1)]
        accuracies.append(np.mean(predictions == test_y))
    return float(np.mean(accuracies))


class AttentivePooler(nn.Module):
    """One learned query cross-attending to the frozen tokens, then LayerNorm and a linear classifier."""

    num_classes: int
    heads: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        heads = self.heads if width % self.heads == 0 else 1
        query = self.param('query', nn.initializers.normal(0.02), (1, 1, width))
        query = jnp.broadcast_to(query, (tokens.shape[0], 1, width))
        pooled = nn.MultiHeadDotProductAttention(num_heads=heads)(query, nn.LayerNorm()(tokens))[:, 0]
        return nn.Dense(self.num_classes)(nn.LayerNorm()(pooled))


def attentive_probe(
    train_tokens: np.ndarray,
    train_y: np.ndarray,
    test_tokens: np.ndarray,
    test_y: np.ndarray,
    num_classes: int | None = None,
    epochs: int = 60,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> float:
    """Test accuracy of an attentive pooler trained with AdamW on frozen (N, T, D) token features."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    model = AttentivePooler(num_classes)
    params = model.init(jax.random.key(seed), jnp.asarray(train_tokens[:1]))
    steps_per_epoch = max(len(train_tokens) // batch_size, 1)
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch), weight_decay=0.01)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(train_tokens))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            params, opt_state = step(params, opt_state, jnp.asarray(train_tokens[idx]), jnp.asarray(train_y[idx]))
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    predictions = np.concatenate(
        [np.asarray(predict(params, jnp.asarray(test_tokens[i : i + 256]))) for i in range(0, len(test_tokens), 256)]
    )
    return float(np.mean(predictions == test_y))
