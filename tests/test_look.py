"""LOOK: the leave-one-out kNN loss against a numpy loop (self excluded, empty memory slots ignored, top-k only), the
FIFO memory update, config errors naming the key, and a 2-step runlocal run through train.train on one device and
sharded over 8 fake CPU devices with equal losses, parameters and memory."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import look

CONFIG = 'configs/look.py:runlocal'


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_loo_knn(f, y, memory, memory_labels, k, t):
    losses = []
    for i in range(len(f)):
        candidates = [(f[i] @ f[j], y[j]) for j in range(len(f)) if j != i]
        candidates += [(f[i] @ m, label) for m, label in zip(memory, memory_labels, strict=True) if label >= 0]
        top = sorted(candidates, key=lambda c: -c[0])[:k]
        weights = np.array([np.exp(s / t) for s, _ in top])
        same = np.array([label == y[i] for _, label in top])
        if same.any():
            losses.append(-np.log(weights[same].sum() / weights.sum()))
    return (np.mean(losses) if losses else 0.0), 1 - len(losses) / len(f)  # no image with a positive: loss 0


def test_loo_knn_loss_matches_numpy_and_leaves_self_out():
    rng = np.random.default_rng(0)
    f, memory = unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(5, 4)))
    y, memory_labels = np.array([0, 1, 0, 2, 1, 3]), np.array([1, 0, -1, 2, -1])
    for k in (1, 3, 8):
        loss, metrics = look.loo_knn_loss(*map(jnp.asarray, (f, y, memory, memory_labels)), k, 0.5, 4)
        want, no_positive = numpy_loo_knn(f, y, memory, memory_labels, k, 0.5)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose(metrics['no_positive'], no_positive, rtol=1e-6)
    # Its own copy would be every image's nearest neighbour (similarity 1): with self left out, a batch of one
    # image per class and no memory has no same-label neighbour at all.
    empty = jnp.zeros((0, 4)), jnp.zeros((0,), int)
    _, metrics = look.loo_knn_loss(jnp.asarray(f[:4]), jnp.arange(4), *empty, 2, 0.5, 4)
    assert metrics['no_positive'] == 1.0


def test_memory_is_a_fifo_of_detached_embeddings():
    memory, labels = jnp.arange(10.0).reshape(5, 2), jnp.array([0, 1, 2, -1, -1])
    new, new_labels = look.push(memory, labels, jnp.array([[7.0, 7.0], [8.0, 8.0]]), jnp.array([5, 6]))
    np.testing.assert_array_equal(new, [[7, 7], [8, 8], [0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(new_labels, [5, 6, 0, 1, 2])
    grad = jax.grad(lambda f: look.push(memory, labels, f, jnp.array([5, 6]))[0].sum())(jnp.ones((2, 2)))
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    'override, key',
    [
        ('loss.k=0', "'loss.k'"),
        ('loss.k=10000', "'loss.k'"),
        ('loss.temperature=0.0', "'loss.temperature'"),
        ('loss.memory_size=-1', "'loss.memory_size'"),
        ('model.num_classes=1', "'model.num_classes'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


def run(workdir, *overrides):
    config = load_config(CONFIG, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


def test_runlocal_sharded_matches_one_device_and_fills_the_memory(tmp_path):
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false')
    sharded = ('mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', 'eval.at_end=false')
    summary, state, rows = run(tmp_path / 'sharded', *sharded)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    for part in ('params', 'extra'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state[part], want_state[part])
    # Two steps of 64 images: the newest 128 slots hold unit embeddings and digit labels, the rest are still empty.
    labels = state['extra']['memory_labels']
    assert (labels[:128] >= 0).all() and (labels[:128] < 10).all() and (labels[128:] == -1).all()
    np.testing.assert_allclose(np.linalg.norm(state['extra']['memory'][:128], axis=-1), 1.0, rtol=1e-5)
