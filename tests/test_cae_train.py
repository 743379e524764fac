"""CAE on the one trainer: a 2-step runlocal run on the built-in digits, on one device and sharded over 8 fake CPU
devices (data x FSDP), ending with the frozen probes and reconstruction pictures."""

import json
import os

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import load_config

# kNN only: the linear probe's solver is tested in test_evaluate.py and costs seconds to compile.
SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', 'eval.pictures=2',
              "eval.probes=('knn',)"]  # fmt: skip


def run(workdir, *overrides):
    config = load_config(
        'configs/cae.py:runlocal', ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('cae') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    workdir = tmp_path / 'sharded'
    summary, state, rows = run(workdir, 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2]
    for row, want in zip(rows, want_rows, strict=True):
        # Both terms are logged and make up the loss with the recipe's alignment weight 2.
        assert np.isfinite(row['loss']) and row['loss_alignment'] > 0 and row['loss_reconstruction'] > 0
        np.testing.assert_allclose(row['loss'], row['loss_reconstruction'] + 2 * row['loss_alignment'], rtol=1e-5)
        for key in ('loss', 'loss_reconstruction', 'loss_alignment'):
            np.testing.assert_allclose(row[key], want[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
    pictures = os.listdir(workdir / 'pictures')
    assert pictures == ['reconstruction_0000002.png']
    from PIL import Image

    with Image.open(workdir / 'pictures' / pictures[0]) as picture:
        # 2 rows of 4 panels (input, masked, reconstruction, prediction), each followed by a 2-pixel gutter.
        assert picture.size == (4 * (32 + 2), 2 * 32 + 2)
