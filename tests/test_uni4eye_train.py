"""Uni4Eye on the one trainer: a 2-step runlocal run on the built-in digits and stand-in volumes, on one device and
sharded over 8 fake CPU devices (data x FSDP), ending with the frozen probes of the 2-D encoder."""

import json
import os

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import load_config

SMALL = ['input.global_batch=8', 'input.volume_depth=4', 'input.volume_size=16', 'model.depth_patch=2']
SMALL_EVAL = ['eval.max_train_clips=32', 'eval.max_test_clips=16', 'eval.batch_size=8', "eval.probes=('knn',)"]


def run(workdir, *overrides):
    config = load_config(
        'configs/uni4eye.py:runlocal',
        ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.pictures=0', *SMALL, *overrides],
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('uni4eye') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_trains_both_input_kinds(one_device):
    summary, _, rows = one_device
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    # 8 images x (64 - 16) removed patches + 8 volumes x (2 * 4 * 4 - 8) removed cubes carry the loss.
    assert summary['final_loss_patches'] == 8 * 48 + 8 * 24
    for row in rows:
        parts = [row[f'loss_{b}_{k}'] for b in ('pixel', 'gradient') for k in ('2d', '3d')]
        assert all(np.isfinite(parts)) and row['loss'] == pytest.approx(sum(parts), rel=1e-5)


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
