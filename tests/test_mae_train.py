"""MAE on the one trainer: a 2-step runlocal run on the built-in digits, on one device and sharded over 8 fake CPU
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
        'configs/mae.py:runlocal', ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
    return summary, jax.device_get(state), losses


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('mae') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_losses = one_device
    workdir = tmp_path / 'sharded'
    summary, state, losses = run(workdir, 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    np.testing.assert_allclose([losses[1], losses[2]], [want_losses[1], want_losses[2]], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    # The evaluation at the end: probes of the cls token and the mean patch token, and the pictures.
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
    pictures = os.listdir(workdir / 'pictures')
    assert pictures == ['reconstruction_0000002.png']
    from PIL import Image

    with Image.open(workdir / 'pictures' / pictures[0]) as picture:
        # 2 rows of 4 panels (input, masked, reconstruction, prediction), each followed by a 2-pixel gutter.
        assert picture.size == (4 * (32 + 2), 2 * 32 + 2)
