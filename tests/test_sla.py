"""SLA: rotations, joint labels, aggregation and the SLA / SLA+SD losses against numpy (the reference's formulas),
config errors naming the key, and a 2-step runlocal SLA+SD run through train.train on one device and sharded over 8
fake CPU devices (data x FSDP) with equal losses and parameters."""

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import sla

CONFIG = 'configs/sla.py:runlocal,sd'


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rotations_and_joint_labels_are_adjacent_and_class_major():
    images = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    out = np.asarray(sla.rotate(jnp.asarray(images), 4))
    assert out.shape == (8, 5, 5, 3)
    for b in range(2):
        for k in range(4):
            np.testing.assert_array_equal(out[b * 4 + k], np.rot90(images[b], k, axes=(0, 1)))
    two = np.asarray(sla.rotate(jnp.asarray(images), 2))
    np.testing.assert_array_equal(two[1], np.rot90(images[0], 2, axes=(0, 1)))
    np.testing.assert_array_equal(np.asarray(sla.joint_labels(jnp.array([3, 1]), 4)), [12, 13, 14, 15, 4, 5, 6, 7])


def test_aggregate_matches_the_reference_loop():
    m, n, b = 4, 3, 2
    joint = np.random.default_rng(1).normal(size=(b * m, n * m)).astype(np.float32)
    want = sum(joint[i::m, i::m] for i in range(m)) / m  # trainers.py: agg += preds[i::n, i::n] / n
    np.testing.assert_allclose(np.asarray(sla.aggregate(jnp.asarray(joint), m)), want, rtol=1e-6)


def test_sla_and_sd_losses_match_numpy():
    m, n, b, t = 4, 3, 2, 2.0
    rng = np.random.default_rng(2)
    joint = rng.normal(size=(b * m, n * m)).astype(np.float32)
    single = rng.normal(size=(b, n)).astype(np.float32)
    labels = np.array([2, 0])
    rows = np.stack([labels * m + j for j in range(m)], 1).reshape(-1)
    joint_ce = -log_softmax(joint)[np.arange(b * m), rows].mean()
    loss, metrics = sla.sla_loss(jnp.asarray(joint), None, jnp.asarray(labels), m)
    np.testing.assert_allclose(loss, joint_ce, rtol=1e-5)
    large, _ = sla.sla_loss(jnp.asarray(joint), None, jnp.asarray(labels), m, large_loss=True)
    np.testing.assert_allclose(large, m * joint_ce, rtol=1e-5)
    agg = sum(joint[i::m, i::m] for i in range(m)) / m
    np.testing.assert_allclose(metrics['agg_acc'], (agg.argmax(-1) == labels).mean())
    np.testing.assert_allclose(metrics['single_acc'], (joint[::m, ::m].argmax(-1) == labels).mean())
    ce = -log_softmax(single)[np.arange(b), labels].mean()
    p = np.exp(log_softmax(agg / t))
    kl = (p * (np.log(p) - log_softmax(single / t))).sum(-1).mean()
    loss, metrics = sla.sla_loss(jnp.asarray(joint), jnp.asarray(single), jnp.asarray(labels), m, temperature=t)
    np.testing.assert_allclose(metrics['distill_loss'], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, joint_ce + ce + t * t * kl, rtol=1e-5)


def test_distillation_target_is_not_differentiated():
    """SLA+SD's gradient w.r.t. the joint logits is the joint CE's alone: the aggregated target is a constant."""
    rng = np.random.default_rng(3)
    joint, single = jnp.asarray(rng.normal(size=(8, 12))), jnp.asarray(rng.normal(size=(2, 3)))
    labels = jnp.array([1, 2])
    with_sd = jax.grad(lambda z: sla.sla_loss(z, single, labels, 4)[0])(joint)
    without = jax.grad(lambda z: sla.sla_loss(z, None, labels, 4)[0])(joint)
    np.testing.assert_allclose(with_sd, without, rtol=1e-6)


@pytest.mark.parametrize(
    'override, key',
    [
        ('loss.rotations=3', "'loss.rotations'"),
        ('loss.temperature=0.0', "'loss.temperature'"),
        ('model.num_classes=1', "'model.num_classes'"),
        ('input.num_sample=2', "'input.num_sample'"),
        ('model.variant=XL', "'model.variant'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides):
    config = load_config(CONFIG, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path):
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false')
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ('single_acc', 'agg_acc', 'sd_acc'))
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    assert 0.0 <= summary['final_eval/label/cls/knn'] <= 1.0


def test_training_source_without_labels_or_with_other_classes_names_the_key():
    method = sla.Method(load_config(CONFIG))
    unlabelled = types.SimpleNamespace(label_keys=())
    with pytest.raises(ConfigError, match=re.escape('input.dataset')):
        method.check_labels(unlabelled)
    with pytest.raises(ConfigError, match=re.escape("'model.num_classes'")):
        method.check_labels(types.SimpleNamespace(label_keys=('label',), class_names=['a', 'b']))
    method.check_labels(types.SimpleNamespace(label_keys=('label',), class_names=list('0123456789')))
