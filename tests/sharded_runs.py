"""Two-step runs of a method's `runlocal` config on the one trainer, on one device and sharded over the 8 fake CPU
devices, for the per-method tests that both give the same losses and parameters."""

import json
import os

import jax
import numpy as np

from jaxssl import train
from jaxssl.config import load_config

# A small evaluation for the sharded run: the probes must run, not be accurate.
SMALL_EVAL = ('eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)")


def run(config_spec, workdir, *overrides):
    """(summary, final state on the host, the logged rows with a loss) of a 2-step run."""
    config = load_config(config_spec, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


def assert_sharded_matches_one_device(config_spec, tmp_path, *overrides, keys=('loss',), atol=1e-6):
    """Runs on 1 and on 8 devices (the latter with the probes at the end); asserts equal logged `keys` and params
    (to rtol 1e-4 and `atol`). Returns the sharded run's (summary, rows)."""
    _, want_state, want_rows = run(config_spec, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *overrides)
    summary, state, rows = run(config_spec, tmp_path / 'sharded', 'mesh.data=8', *overrides, *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    for key in keys:
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol), state['params'],
                 want_state['params'])  # fmt: skip
    return summary, rows
