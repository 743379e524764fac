"""CroCo on the one trainer: a 2-step runlocal run on the built-in digits (stand-in view pairs), on one device and
sharded over 8 fake CPU devices (data x FSDP), ending with the frozen probes."""

import json
import os

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import load_config

SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides):
    config = load_config(
        'configs/croco.py:runlocal', ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
    return summary, jax.device_get(state), losses


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('croco') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_losses = one_device
    summary, state, losses = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    # Every view 1 has int(0.9 * 64) = 57 masked patches: 64 pairs x 57 patches carry the loss.
    assert summary['final_loss_patches'] == 64 * 57
    np.testing.assert_allclose([losses[1], losses[2]], [want_losses[1], want_losses[2]], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
