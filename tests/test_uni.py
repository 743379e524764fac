"""UNI / DINOv2: KoLeo, Sinkhorn-Knopp and the iBOT patch loss against numpy written out by hand, the iBOT masks
(share of crops masked, ratio range, block shapes), the mask token reaching the backbone, config errors naming the
key, and a 2-step runlocal run through train.train on one device and sharded over 8 fake CPU devices (data x FSDP),
with Sinkhorn-Knopp and a separate iBOT head on the sharded run's comparison pair."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.losses import dinov2
from jaxssl.methods import uni
from jaxssl.models import uni as uni_model

CONFIG = 'configs/uni.py:runlocal'


def numpy_koleo(x, eps=1e-8):
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        dist = [np.linalg.norm(x[i] - x[j] + eps) if j != i else np.inf for j in range(len(x))]
        total += -np.log(min(dist) + eps)  # the nearest neighbour on the sphere = the largest inner product
    return total / len(x)


def test_koleo_matches_numpy_and_spreading_lowers_it():
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(dinov2.koleo_loss(jnp.asarray(x)), numpy_koleo(x.astype(np.float64)), rtol=1e-5)
    close = x.copy()
    close[1] = close[0] + 1e-3  # two near-duplicates: a large penalty
    assert float(dinov2.koleo_loss(jnp.asarray(close))) > float(dinov2.koleo_loss(jnp.asarray(x))) + 1.0


def numpy_sinkhorn(t, temp, iterations):
    q = np.exp(t / temp).T  # (K, B), the reference's layout
    n_prototypes, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def test_sinkhorn_knopp_matches_numpy_and_balances_rows_and_columns():
    t = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float64)
    got = np.asarray(dinov2.sinkhorn_knopp(jnp.asarray(t, jnp.float32), 0.5, 3))
    np.testing.assert_allclose(got, numpy_sinkhorn(t, 0.5, 3), rtol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)  # every sample a distribution
    # Columns approach n / K = 1.5 each as iterations grow (after 3 they are close, not exact).
    many = np.asarray(dinov2.sinkhorn_knopp(jnp.asarray(t, jnp.float32), 0.5, 50))
    np.testing.assert_allclose(many.sum(axis=0), 6 / 4, rtol=1e-4)
    # Padding rows (weight 0) are left out: the valid rows' targets equal those of the valid rows alone.
    weights = jnp.asarray([1, 1, 0, 1, 0, 1], jnp.float32)
    padded = np.asarray(dinov2.sinkhorn_knopp(jnp.asarray(t, jnp.float32), 0.5, 3, weights))
    np.testing.assert_allclose(padded[[0, 1, 3, 5]], numpy_sinkhorn(t[[0, 1, 3, 5]], 0.5, 3), rtol=1e-4)
    np.testing.assert_array_equal(padded[[2, 4]], 0.0)


def test_ibot_loss_counts_masked_tokens_only():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(3, 4, 5)).astype(np.float32)  # 3 images, 4 slots, 5 prototypes
    targets = rng.dirichlet(np.ones(5), size=(3, 4)).astype(np.float32)
    weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # the third image unmasked
    log_p = student / 0.1 - np.log(np.exp(student / 0.1).sum(-1, keepdims=True))
    per_image = [np.mean([-np.sum(targets[i, m] * log_p[i, m]) for m in np.flatnonzero(weights[i])]) for i in (0, 1)]
    want = (per_image[0] + per_image[1] + 0.0) / 3  # the unmasked image counts in the denominator
    got = dinov2.ibot_loss(jnp.asarray(student), jnp.asarray(targets), jnp.asarray(weights), 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Changing an unmasked slot's logits changes nothing.
    student[0, 3] += 10.0
    np.testing.assert_allclose(dinov2.ibot_loss(student, targets, weights, 0.1), want, rtol=1e-5)


def test_ibot_masks_probability_ratio_and_slots():
    rng = np.random.default_rng(3)
    masks = np.concatenate([uni.ibot_masks(2, (8, 8), rng, 0.5, (0.1, 0.5)) for _ in range(200)])
    counts = masks.sum(axis=1)
    masked = counts > 0
    assert 0.4 < masked.mean() < 0.6  # half the crops
    assert counts[masked].min() >= int(64 * 0.1) and counts[masked].max() <= int(64 * 0.5)
    idx, weights = uni.patch_slots(jnp.asarray(masks[:8]), 32)
    for i in range(8):  # the masked patches first, in raster order, then padding of weight 0
        n = counts[i]
        np.testing.assert_array_equal(np.asarray(idx[i, :n]), np.flatnonzero(masks[i]))
        np.testing.assert_array_equal(np.asarray(weights[i]), (np.arange(32) < n).astype(np.float32))


def test_mask_token_replaces_masked_patches_only():
    model = uni_model.make_model('micro/4', head_out=16, head_hidden=8, head_bottleneck=4, separate_ibot_head=True,
                                 ibot_out=12, ibot_hidden=8, ibot_bottleneck=4)  # fmt: skip
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    masks = jnp.zeros((2, 4), bool).at[0, 1].set(True)
    idx = jnp.asarray([[1, 0], [0, 1]], jnp.int32)
    params = model.init(jax.random.key(1), [images], False, masks, idx)['params']
    assert {'mask_token', 'ibot_head', 'head'} <= set(params)
    params['mask_token'] = jnp.ones_like(params['mask_token'])
    logits, out = model.apply({'params': params}, [images], False, masks, idx)
    plain, _ = model.apply({'params': params}, [images], False, None, idx)
    assert out['patch_logits'].shape == (2, 2, 12)
    np.testing.assert_allclose(logits[1], plain[1], rtol=1e-5)  # the unmasked image is untouched
    assert not np.allclose(logits[0], plain[0])
    tokens = model.apply({'params': params}, images[:1], False, method=model.encode)[0]
    manual = model.apply({'params': params}, images, False, masks, method=model.encode)[0]
    assert not np.allclose(tokens[0], manual[0])


@pytest.mark.parametrize(
    'override, key',
    [
        ('loss.centering=sinkhorn', "'loss.centering'"),
        ('loss.mask_ratio=(0.5,0.1)', "'loss.mask_ratio'"),
        ('loss.mask_probability=1.5', "'loss.mask_probability'"),
        ('loss.sinkhorn_iterations=0', "'loss.sinkhorn_iterations'"),
        ('model.ibot_out=0', "'model.ibot_out'"),
        ('loss.student_temp=0.0', "'loss.student_temp'"),
        ('model.variant=resnet50', "'model.variant'"),  # iBOT masks patch tokens
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides):
    config = load_config(
        CONFIG,
        ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'input.global_batch=16',
         'input.local_crops_number=2', 'loss.mask_probability=1.0', *overrides],
    )  # fmt: skip
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


# KoLeo is left out of the compared pair's objective: at initialisation the cls tokens are near-duplicates, so
# -log(nearest distance) amplifies float32 reduction-order differences between meshes (measured: 1e-3 relative on
# the total loss at step 1); its term is still computed and logged, and the default-config run trains with it.
SK = ['loss.centering=sinkhorn_knopp', 'model.separate_ibot_head=true', 'loss.koleo_weight=0.0']


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('uni') / 'one', 'mesh.data=1', 'eval.at_end=false', *SK)


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    summary, state, rows = run(
        tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SK, *SMALL_EVAL
    )
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    for key in ('ibot_loss', 'koleo_loss', 'dino_loss'):
        assert all(np.isfinite(r[key]) and r[key] != 0 for r in rows)
    for key in ('loss', 'dino_loss', 'ibot_loss'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5, err_msg=key)
    for part in ('params', 'extra'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state[part], want_state[part])
    assert 'ibot_head' in state['params'] and 'mask_token' in state['params']
    assert 0.0 <= summary['final_eval/label/cls/knn'] <= 1.0


def test_runlocal_default_config_runs_two_steps(tmp_path):
    """The shipped runlocal config (EMA centring, shared head) through the trainer: finite, centres moved."""
    summary, state, rows = run(tmp_path / 'default', 'mesh.data=1', 'eval.at_end=false')
    assert summary['final_step'] == 2 and all(np.isfinite(r['loss']) for r in rows)
    assert np.abs(state['extra']['center']).max() > 0 and np.abs(state['extra']['patch_center']).max() > 0
    assert 'ibot_head' not in state['params']
