"""Discrete Key-Value Bottleneck: the EMA k-means step against a numpy transcription of the reference's update,
locality of the value updates, skipping unused keys at test time, the paper's 2-D toy (the bottleneck keeps earlier
tasks, a linear probe forgets them), and the CLI on a training run's features."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import kv_bottleneck as kvb
from jaxssl import train
from jaxssl.config import load_config


def test_key_step_matches_a_transcription_of_the_reference():
    b = kvb.Bottleneck(codebooks=3, keys=5, key_dim=4, decay=0.9, eps=1e-5)
    state = kvb.init_state(jax.random.key(0), 6, 2, b)
    state = {**state, 'cluster_size': jnp.asarray(np.random.default_rng(1).uniform(0, 2, (3, 5)), jnp.float32)}
    z = np.random.default_rng(2).normal(size=(7, 6)).astype(np.float32)
    got = kvb.fit_keys_step(state, jnp.asarray(z), jax.random.key(3), b)

    s = jax.tree.map(lambda a: np.asarray(a, np.float64), state)
    x = np.einsum('bd,cdk->cbk', z, s['projection'])  # RandomDownProjection
    keys = s['keys']
    dist = -((x**2).sum(-1)[..., None] - 2 * np.einsum('cid,cjd->cij', x, keys) + (keys**2).sum(-1)[:, None])
    onehot = np.eye(5)[dist.argmax(-1)]
    size = 0.9 * s['cluster_size'] + 0.1 * onehot.sum(1)
    avg = 0.9 * s['keys_avg'] + 0.1 * np.einsum('cik,cij->ckj', x, onehot).transpose(0, 2, 1)
    smoothed = (size + 1e-5) / (size.sum(-1, keepdims=True) + 5 * 1e-5) * size.sum(-1, keepdims=True)
    np.testing.assert_allclose(got['cluster_size'], size, rtol=1e-5)
    np.testing.assert_allclose(got['keys_avg'], avg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got['keys'], avg / smoothed[..., None], rtol=1e-4, atol=1e-5)
    # Dead keys (EMA count under the threshold) take samples of the batch's queries.
    dead = kvb.fit_keys_step(state, jnp.asarray(z), jax.random.key(3), dataclasses.replace(b, dead_threshold=1e9))
    queries = np.asarray(kvb.split(jnp.asarray(z), state['projection'], 'random_projection'))
    for c in range(3):
        for j in range(5):
            assert any(np.allclose(dead['keys'][c, j], q, atol=1e-5) for q in queries[c])


def test_value_updates_stay_on_the_selected_keys_and_unused_keys_are_skipped():
    b = kvb.Bottleneck(codebooks=4, keys=32, key_dim=3)
    state = kvb.init_state(jax.random.key(0), 8, 3, b)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    optimizer, step = kvb.make_value_step(b, lr=0.3, clip=1.0, label_smoothing=0.1, num_classes=3)
    opt = optimizer.init(state['values'])
    new, _, loss = step(state, opt, z, jnp.asarray([0, 1, 2, 0, 1]))
    selected = np.zeros((4, 32), bool)
    indices = np.asarray(kvb.nearest_keys(kvb.split(z, state['projection'], b.splitter), state['keys']))
    for c in range(4):
        selected[c, indices[c]] = True
    changed = np.any(np.asarray(new['values']) != 0, axis=-1)
    assert np.array_equal(changed, selected) and float(loss) == pytest.approx(np.log(3), rel=1e-5)
    np.testing.assert_array_equal(new['counts'] > 0, selected)
    # At test time only counted keys are candidates: every prediction reads a trained value.
    other = jnp.asarray(np.random.default_rng(1).normal(size=(50, 8)), jnp.float32)
    usable = np.asarray(new['counts']) > 0
    picked = np.asarray(kvb.nearest_keys(kvb.split(other, new['projection'], b.splitter), new['keys'], usable))
    assert all(usable[c, picked[c]].all() for c in range(4))


def gaussian_toy(rng, per_class):
    """The paper's Fig. 2 data: 8 classes of 2-D Gaussians (std 0.035) in [0, 1]^2, learnt 2 classes at a time."""
    centres = np.array([[0.2, 0.2], [0.5, 0.2], [0.8, 0.2], [0.2, 0.5], [0.8, 0.5], [0.2, 0.8], [0.5, 0.8], [0.8, 0.8]])
    y = np.repeat(np.arange(8), per_class)
    return (centres[y] + rng.normal(0, 0.035, (len(y), 2))).astype(np.float32), y


def test_toy_bottleneck_keeps_earlier_tasks_where_a_linear_probe_forgets():
    rng = np.random.default_rng(0)
    train_set, test_set = gaussian_toy(rng, 50), gaussian_toy(rng, 50)
    tasks = [[0, 1], [2, 3], [4, 5], [6, 7]]
    b = kvb.Bottleneck(codebooks=1, keys=400, splitter='chunk')  # one codebook of 2-D keys, as the paper's toy
    results = kvb.class_incremental(
        train_set, test_set, tasks, b, key_epochs=100, epochs=100, batch_size=100, probe_lr=0.05,
        key_features=rng.uniform(0, 1, (10000, 2)).astype(np.float32),  # keys fitted on uniform inputs, no labels
    )  # fmt: skip
    assert results['kv_bottleneck'][-1] >= 0.85
    assert np.all(np.diff(results['kv_bottleneck']) > 0.15)  # each task adds its classes and keeps the earlier ones
    assert results['linear_probe'][0] == pytest.approx(0.25, abs=0.02)  # it learns each task ...
    assert results['linear_probe'][-1] <= 0.3  # ... and forgets the earlier ones


def test_cli_on_a_training_run(tmp_path):
    config = load_config(
        'configs/mae.py:runlocal',
        ['train.steps=1', 'eval.at_end=false', 'train.tensorboard=false', 'eval.max_train_clips=64',
         'eval.max_test_clips=32', 'eval.batch_size=16'],
    )  # fmt: skip
    train.train(config, str(tmp_path))
    code = kvb.main([f'--workdir={tmp_path}', '--representation=cls', '--codebooks=4', '--keys=16', '--key_dim=4',
                     '--epochs=2', '--key_epochs=1', '--batch_size=16', '--classes_per_task=5'])  # fmt: skip
    assert code == 0
    with open(tmp_path / 'kv_bottleneck.json') as f:
        results = json.load(f)
    assert results['tasks'] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(results['kv_bottleneck']) == len(results['linear_probe']) == 2
    assert kvb.main([f'--workdir={tmp_path}', '--representation=nope']) == 2  # names the representations it has
