"""Selfie: the choice loss and query / candidate logits against numpy, the pooling's visible-only input, config
checks, and a 2-step runlocal run on one device and sharded over 8 fake CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import selfie
from jaxssl.models import selfie as selfie_model

SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def test_choice_loss_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 4, 4)).astype(np.float32)
    # Query i's right patch is candidate i: -log softmax(row i)[i], averaged over images and queries.
    want = -np.mean([logits[b, i, i] - np.log(np.exp(logits[b, i]).sum()) for b in range(2) for i in range(4)])
    np.testing.assert_allclose(selfie.choice_loss(jnp.asarray(logits)), want, rtol=1e-6)
    # A perfect chooser (right patch far ahead) has loss ~0.
    assert float(selfie.choice_loss(jnp.eye(4)[None] * 50.0)) < 1e-6


def test_cut_patches_is_raster_order():
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    patches = np.asarray(selfie_model.cut_patches(images, 2))
    assert patches.shape == (2, 4, 2, 2, 1)
    np.testing.assert_array_equal(patches[0, 1, :, :, 0], np.asarray(images)[0, 0:2, 2:4, 0])  # row 0, column 1
    np.testing.assert_array_equal(patches[1, 2, :, :, 0], np.asarray(images)[1, 2:4, 0:2, 0])  # row 1, column 0


@pytest.fixture(scope='module')
def tiny():
    model = selfie_model.SelfiePretrain(patch_widths=(8, 16), pool_depth=1, pool_heads=2, patch=4)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    ids = jnp.asarray(np.stack([np.random.default_rng(s).permutation(16) for s in (1, 2)]), jnp.int32)
    params = model.init(jax.random.key(0), images, ids, 11)['params']
    apply = jax.jit(lambda im: model.apply({'params': params}, im, ids, 11))
    return apply, params, images, ids


def test_logits_are_pooled_query_plus_row_and_column_dot_candidates(tiny):
    apply, params, images, ids = tiny
    logits, inter = apply(images)
    u, h = np.asarray(inter['pooled']), np.asarray(inter['patches'])
    rows, cols = np.asarray(params['row_embed']), np.asarray(params['col_embed'])
    assert logits.shape == (2, 5, 5)  # 16 - 11 masked locations, each against the 5 masked patches
    for b in range(2):
        masked = np.asarray(ids[b, 11:])
        queries = u[b] + rows[masked // 4] + cols[masked % 4]  # a 4 x 4 grid: row = index // 4
        np.testing.assert_allclose(logits[b], queries @ h[b, 11:].T, rtol=1e-4, atol=1e-5)


def test_per_patch_position_embedding_indexes_the_masked_location():
    # The paper's 32-px setting: one learned vector per patch instead of row + column vectors.
    model = selfie_model.SelfiePretrain(patch_widths=(8,), pool_depth=1, pool_heads=2, patch=4, position='patch')
    images = jnp.asarray(np.random.default_rng(5).normal(size=(1, 8, 8, 3)), jnp.float32)  # 4 patches
    ids = jnp.asarray([[2, 0, 3, 1]], jnp.int32)  # patches 3 and 1 masked
    params = model.init(jax.random.key(1), images, ids, 2)['params']
    logits, inter = model.apply({'params': params}, images, ids, 2)
    queries = np.asarray(inter['pooled'])[0] + np.asarray(params['pos_embed'])[[3, 1]]
    np.testing.assert_allclose(logits[0], queries @ np.asarray(inter['patches'])[0, 2:].T, rtol=1e-4, atol=1e-5)


def test_pooling_sees_only_visible_patches(tiny):
    apply, _, images, ids = tiny
    logits, inter = apply(images)
    row, col = divmod(int(ids[0, 13]), 4)  # a masked patch of image 0
    changed_logits, changed = apply(images.at[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].add(1.0))
    np.testing.assert_allclose(changed['pooled'], inter['pooled'], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed_logits[0, :, 2], logits[0, :, 2], atol=1e-4)  # only its candidate column moves
    np.testing.assert_allclose(np.delete(changed_logits[0], 2, axis=1), np.delete(logits[0], 2, axis=1), rtol=1e-5)
    row, col = divmod(int(ids[0, 3]), 4)  # a visible patch: u moves
    _, changed = apply(images.at[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].add(1.0))
    assert not np.allclose(changed['pooled'][0], inter['pooled'][0], atol=1e-4)


@pytest.mark.parametrize(
    ('override', 'key'),
    [('masking.ratio=0.05', r'masking\.ratio'), ('model.patch_widths=(16, 20)', r'model\.patch_widths'),
     ('model.pool_heads=5', r'model\.pool_heads'), ('model.patch=5', r'input\.image_size'),
     ("model.position='grid'", r'model\.position')],
)  # fmt: skip
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config('configs/selfie.py:runlocal', [override])


def run(workdir, *overrides):
    config = load_config(
        'configs/selfie.py:runlocal', ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
    return summary, jax.device_get(state), losses


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('selfie') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_losses = one_device
    summary, state, losses = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    np.testing.assert_allclose([losses[1], losses[2]], [want_losses[1], want_losses[2]], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('mean_pool', 'pooled'):
        assert 0.0 <= summary[f'final_eval/label/{key}/knn'] <= 1.0
