"""SiamMAE on the one trainer: a 2-step runlocal run on the built-in moving digits (frame pairs decoded from H.264),
on one device and sharded over 8 fake CPU devices (data x FSDP), ending with the frozen probes."""

import json
import os

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import load_config

SMALL_EVAL = ['eval.max_train_clips=32', 'eval.max_test_clips=16', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides):
    # Dropout off: the sharded run must reproduce the one-device run, and dropout masks depend on the layout.
    config = load_config(
        'configs/siammae.py:runlocal',
        [
            'train.steps=2',
            'train.log_every=1',
            'train.tensorboard=false',
            'model.dropout=0.0',
            'input.moving_digits_size=tiny',
            'input.global_batch=16',
            *overrides,
        ],
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
    return summary, jax.device_get(state), losses


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('siammae') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_losses = one_device
    summary, state, losses = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    # 16 videos x 2 frame pairs, each later frame with 64 - 3 masked patches, carry the loss.
    assert summary['final_loss_patches'] == 16 * 2 * 61
    np.testing.assert_allclose([losses[1], losses[2]], [want_losses[1], want_losses[2]], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    assert 0.0 <= summary['final_eval/label/cls/knn'] <= 1.0
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
