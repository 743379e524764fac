"""SiT: rotation labels (the reference's clockwise k * 90 degrees, drawn per view before the corruption), the
uncertainty-weighted multi-task loss vs a hand computation, config errors naming the key, and a 2-step runlocal run
on one device and sharded over 8 fake CPU devices (data x FSDP) with equal losses and parameters: the global-batch
NT-Xent, the on-device noise and the donor images do not depend on the mesh."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import sit

CONFIG = 'configs/sit.py:runlocal'


def test_rotation_is_clockwise_quarter_turns():
    image = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    np.testing.assert_array_equal(sit.rotate(image, 0), image)
    one, two, three = (sit.rotate(image, k) for k in (1, 2, 3))
    assert one.shape == (4, 3, 2)
    for i in range(4):
        for j in range(3):
            np.testing.assert_array_equal(one[i, j], image[2 - j, i])  # clockwise: the left column becomes the top
            np.testing.assert_array_equal(three[i, j], image[j, 3 - i])
    for i in range(3):
        for j in range(4):
            np.testing.assert_array_equal(two[i, j], image[2 - i, 3 - j])


def test_views_are_rotated_by_their_label_before_the_corruption():
    config = load_config(CONFIG, ['input.global_batch=4'])
    method = sit.Method(config)
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    labels = []
    for seed in range(12):
        out = method.sample_transform({'image': image}, np.random.default_rng(seed))
        k = int(np.random.default_rng(seed).integers(4))  # the first draw of the view's generator
        assert out['rotation'] == k and out['rotation'].dtype == np.int32
        np.testing.assert_array_equal(out['image'], sit.rotate(image, k))  # the clean target is the rotated view
        assert out['mask'].shape == (32, 32) and out['mask'].any()
        labels.append(k)
    assert set(labels) == {0, 1, 2, 3}
    batch = next(iter(method.dataset(seed=0, process_index=0, process_count=1)[0]))
    assert batch['rotation'].shape == (8,) and batch['image'].shape == (8, 32, 32, 3)
    assert batch['mask'].shape == (8, 32, 32) and batch['paste'].shape == (8,)
    assert np.all((batch['rotation'] >= 0) & (batch['rotation'] < 4))


def test_uncertainty_weighting_matches_the_reference_formula():
    losses = jnp.array([1.3, 4.0, 0.7])
    scales = jnp.array([1.0, 0.5, 2.0])
    want = np.exp(-1.0) * 1.3 + 0.5 + np.exp(-0.5) * 4.0 + 0.25 + np.exp(-1.0) * 0.7 + 1.0  # a = 1, 1, 0.5
    np.testing.assert_allclose(sit.weighted_total(losses, scales, 'uncertainty', ()), want, rtol=1e-6)
    # d/ds_t = -a_t exp(-a_t s_t) L_t + 0.5
    grad = jax.grad(lambda s: sit.weighted_total(losses, s, 'uncertainty', ()))(scales)
    want_grad = [-np.exp(-1.0) * 1.3 + 0.5, -np.exp(-0.5) * 4.0 + 0.5, -0.5 * np.exp(-1.0) * 0.7 + 0.5]
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
    np.testing.assert_allclose(sit.weighted_total(losses, scales, 'fixed', (1.0, 0.5, 2.0)), 1.3 + 2.0 + 1.4, rtol=1e-6)


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.num_sample=1', "'input.num_sample'"),
        ('loss.temperature=0.0', "'loss.temperature'"),
        ('loss.weighting=learned', "'loss.weighting'"),
        ('loss.weights=(1.0,1.0)', "'loss.weights'"),
        ('model.contrastive_dim=0', "'model.contrastive_dim'"),
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


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('sit') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_one_device_logs_every_task(one_device):
    summary, state, rows = one_device
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    for row in rows:
        for task in sit.TASKS:
            assert np.isfinite(row[f'{task}_loss']) and row[f'{task}_loss'] > 0
        assert 0.0 <= row['rotation_acc'] <= 1.0 and 0.0 <= row['contrastive_acc'] <= 1.0
    # The learned task weights start at 1 and are trained.
    assert not np.allclose(state['params']['task_weights'], 1.0)


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    small_eval = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]
    summary, state, rows = run(tmp_path, 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *small_eval)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    for key in ('loss', 'rotation_loss', 'contrastive_loss', 'reconstruction_loss'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('label/cls/knn', 'label/mean_pool/knn', 'label/rotation_token/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
