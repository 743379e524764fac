"""The one trainer on 8 fake CPU devices: sharding equivalence, accumulation, EMA extra state, NaN handling,
preemption and exact resume, multi-process agreement. Uses the small EMA-teacher method in ema_toy_method.py."""

import json
import os
import socket
import subprocess
import sys

import ema_toy_method
import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError

TESTS = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(TESTS, 'ema_toy_method.py')


def toy_config(**overrides):
    config = ema_toy_method.get_config()
    config.train.tensorboard = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def run(tmp_path, name, **overrides):
    summary, state = train.train(toy_config(**overrides), str(tmp_path / name))
    return summary, jax.device_get(state), read_losses(tmp_path / name)


def read_losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return {row['step']: row['loss'] for row in map(json.loads, f)}


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """3 steps on one device: the baseline every sharded variant must reproduce."""
    return run(tmp_path_factory.mktemp('single'), 'run', **{'train.steps': 3, 'mesh.data': 1, 'mesh.fsdp': 1})


@pytest.mark.parametrize(('data', 'fsdp'), [(8, 1), (2, 4)])
def test_sharded_runs_match_one_device(tmp_path, reference_run, data, fsdp):
    _, want_state, want_losses = reference_run
    summary, state, losses = run(
        tmp_path, 'run', **{'train.steps': 3, 'mesh.data': data, 'mesh.fsdp': fsdp, 'sharding.min_size': 0}
    )
    assert summary['final_step'] == 3
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [want_losses[s] for s in (1, 2, 3)], rtol=1e-5)
    assert_trees_close(state['params'], want_state['params'])
    assert_trees_close(state['extra'], want_state['extra'])


def test_fsdp_actually_shards_parameters():
    from jaxssl import sharding

    config = toy_config(**{'mesh.data': 2, 'mesh.fsdp': 4})
    mesh = sharding.make_mesh(config)
    spec = sharding.leaf_spec('params/encoder/kernel', (8, 32), mesh, min_size=0)
    assert spec == jax.sharding.PartitionSpec(None, 'fsdp')
    assert sharding.leaf_spec('opt/0/mu/encoder/kernel', (8, 32), mesh) == jax.sharding.PartitionSpec()  # too small
    scanned = sharding.leaf_spec('params/encoder/blocks/mlp/fc1/kernel', (8, 64, 256), mesh, min_size=0)
    assert scanned == jax.sharding.PartitionSpec(None, None, 'fsdp')  # never the layer axis
    ruled = sharding.leaf_spec('params/head/kernel', (64, 10), mesh, rules=[('.*head.*', ())], min_size=0)
    assert ruled == jax.sharding.PartitionSpec()


def test_gradient_accumulation_matches_full_batch(tmp_path, reference_run):
    _, want_state, want_losses = reference_run
    _, state, losses = run(tmp_path, 'run', **{'train.steps': 3, 'train.grad_accum': 4, 'mesh.data': 2})
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [want_losses[s] for s in (1, 2, 3)], rtol=1e-5)
    assert_trees_close(state['params'], want_state['params'])


def test_ema_teacher_follows_params(reference_run):
    _, state, _ = reference_run
    teacher, student = state['extra']['teacher'], state['params']
    # After 3 updates with momentum 0.9 the teacher moved towards the student but is not equal to it.
    diffs = jax.tree.leaves(jax.tree.map(lambda t, s: float(np.abs(t - s).max()), teacher, student))
    assert max(diffs) > 0
    assert int(state['step']) == 3 and int(state['nonfinite']) == 0


def test_bad_batch_fails_before_compiling(tmp_path):
    with pytest.raises(ConfigError, match=r"'input\.global_batch'"):
        train.train(toy_config(**{'input.global_batch': 12}), str(tmp_path / 'a'))  # 12 over 8 devices
    with pytest.raises(ConfigError, match=r"'train\.grad_accum'"):
        train.train(toy_config(**{'train.grad_accum': 3}), str(tmp_path / 'b'))


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(train.TrainingError, match='at step 1 ') as err:
        train.train(toy_config(**{'input.noise': float('nan')}), str(tmp_path / 'nan'))
    assert 'last good checkpoint: none' in str(err.value)
    assert not os.path.exists(tmp_path / 'nan' / 'checkpoints' / '2')


def test_nonfinite_skip_policy_keeps_params(tmp_path):
    summary, state, _ = run(tmp_path, 'skip', **{'input.noise': float('nan'), 'train.nonfinite': 'skip'})
    assert summary['nonfinite_steps'] == 6 and summary['final_step'] == 6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def main_subprocess(workdir, *flags, devices=8, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=TESTS, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    env.update(env_extra or {})
    command = [sys.executable, '-m', 'jaxssl.main', f'--config={CONFIG}', f'--workdir={workdir}']
    command += ['--config.train.tensorboard=false', *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('full') / 'run'
    result = main_subprocess(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_losses(workdir)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, uninterrupted):
    workdir = tmp_path / 'run'
    killed = main_subprocess(workdir, '--config.debug.sigkill_at_step=4')
    assert killed.returncode == -9  # SIGKILL: no chance to clean up
    assert sorted(read_losses(workdir)) == [1, 2, 3, 4]
    resumed = main_subprocess(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout and 'at step 4' in resumed.stdout
    losses = read_losses(workdir)
    assert [losses[s] for s in (5, 6)] == [uninterrupted[s] for s in (5, 6)]  # bitwise


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path, uninterrupted):
    workdir = tmp_path / 'run'
    stopped = main_subprocess(workdir, '--config.debug.sigterm_at_step=3')
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert 'stopping at step 3 on SIGTERM' in stopped.stdout
    assert os.path.isdir(workdir / 'checkpoints' / '3')
    resumed = main_subprocess(workdir)
    assert resumed.returncode == 0
    losses = read_losses(workdir)
    assert [losses[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path, uninterrupted):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=TESTS, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    procs = []
    for pid in range(2):
        command = [sys.executable, '-m', 'jaxssl.main', f'--config={CONFIG}', f'--workdir={tmp_path / "mp"}',
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}',
                   '--config.train.tensorboard=false', '--config.train.steps=3']  # fmt: skip
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert 'step 3/3' in outputs[0][0] and 'step 3/3' not in outputs[1][0]  # only process 0 logs
    assert '2 process(es)' in outputs[0][0]
    losses = read_losses(tmp_path / 'mp')
    # 2 processes x 4 devices vs 1 process x 8 devices: same global batches, same mesh size.
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [uninterrupted[s] for s in (1, 2, 3)], rtol=1e-6)
