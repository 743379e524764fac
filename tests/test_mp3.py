"""MP3: the position loss and masks against numpy, the encoder's missing positions (permutation equivariance) and
context-only keys, config checks, and a 2-step runlocal run on one device and sharded over 8 fake CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import masks, train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import mp3
from jaxssl.models import mp3 as mp3_model

SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def test_position_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5)).astype(np.float32)
    positions = np.stack([rng.permutation(5) for _ in range(2)]).astype(np.int32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    want = -np.mean([logp[b, t, positions[b, t]] for b in range(2) for t in range(5)])
    np.testing.assert_allclose(mp3.position_loss(jnp.asarray(logits), jnp.asarray(positions)), want, rtol=1e-6)


def test_ids_shuffle_is_a_permutation_with_maes_kept_tokens_first():
    out = mp3.ids_shuffle_mask(16, 0.75, np.random.default_rng(3))['ids_shuffle']
    want = masks.shuffle_masking(16, 0.75, np.random.default_rng(3))['ids_keep']
    assert out.dtype == np.int32 and sorted(out.tolist()) == list(range(16))
    np.testing.assert_array_equal(out[:4], want)  # int(16 * 0.25) = 4 context tokens


@pytest.fixture(scope='module')
def tiny():
    model = mp3_model.MP3Pretrain(width=16, depth=2, heads=2, mlp_hidden=32, patch=4)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)  # 16 tokens
    ids = jnp.asarray(np.stack([np.random.default_rng(s).permutation(16) for s in (1, 2)]), jnp.int32)
    params = model.init(jax.random.key(0), images, ids, 6)['params']
    apply = jax.jit(lambda im, i, n: model.apply({'params': params}, im, i, n)[0], static_argnums=2)
    return apply, images, ids


def test_encoder_has_no_positions_permuting_tokens_permutes_outputs(tiny):
    apply, images, ids = tiny
    rng = np.random.default_rng(4)
    # A permutation inside the context (first 6) and one inside the rest: the same tokens, in another order.
    perm = np.concatenate([rng.permutation(6), 6 + rng.permutation(10)])
    want = np.asarray(apply(images, ids, 6))[:, perm]
    np.testing.assert_allclose(apply(images, ids[:, perm], 6), want, rtol=1e-5, atol=1e-5)
    # All tokens as context: any permutation.
    perm = rng.permutation(16)
    want = np.asarray(apply(images, ids, 16))[:, perm]
    np.testing.assert_allclose(apply(images, ids[:, perm], 16), want, rtol=1e-5, atol=1e-5)


def test_only_context_tokens_are_keys(tiny):
    apply, images, ids = tiny
    base = np.asarray(apply(images, ids, 6))

    def with_patch_changed(token):  # the pixels of patch `token` of the first image, replaced
        row, col = divmod(int(token), 4)
        return images.at[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].add(1.0)

    out = np.asarray(apply(with_patch_changed(ids[0, 10]), ids, 6))  # a non-context token
    np.testing.assert_allclose(np.delete(out[0], 10, axis=0), np.delete(base[0], 10, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0, 10], base[0, 10], atol=1e-3)  # its own output still moves
    out = np.asarray(apply(with_patch_changed(ids[0, 2]), ids, 6))  # a context token: every query reads it
    assert not np.allclose(out[0, 10], base[0, 10], atol=1e-3)
    np.testing.assert_allclose(out[1], base[1], rtol=1e-5, atol=1e-6)  # the other image is untouched


def test_bad_masking_ratio_names_the_key():
    with pytest.raises(ConfigError, match=r'masking\.ratio'):
        load_config('configs/mp3.py:runlocal', ['masking.ratio=1.0'])


def run(workdir, *overrides):
    config = load_config(
        'configs/mp3.py:runlocal', ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
    return summary, jax.device_get(state), losses


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('mp3') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_losses = one_device
    summary, state, losses = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    np.testing.assert_allclose([losses[1], losses[2]], [want_losses[1], want_losses[2]], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
