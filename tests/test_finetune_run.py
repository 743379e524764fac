"""The fine-tuning pipeline (layout, determinism, resume, segment sampling) and runlocal fine-tuning through the
trainer and the CLI, ending with a multi-view accuracy on moving_digits' val split."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import load_config
from jaxssl.data import finetune_pipeline, moving_digits

CONFIG = 'configs/videomae_v2_finetune.py:runlocal'


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / 'jaxssl-cache'  # shared with the other data tests of the session
    moving_digits.ensure(str(base), 'tiny')
    return str(base)


def overrides(cache_dir, *extra):
    return [f'input.cache_dir={cache_dir}', 'input.moving_digits_size=tiny', 'input.global_batch=8',
            'eval.batch_size=8', 'train.tensorboard=false', *extra]  # fmt: skip


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_layout_labels_and_determinism(cache_dir):
    config = load_config(CONFIG, overrides(cache_dir, 'input.label_key=direction'))
    batch = next(iter(finetune_pipeline.make_finetune_dataset(config, seed=0)))
    assert batch['video'].shape == (16, 8, 32, 32, 3) and batch['video'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['label'][0::2], batch['label'][1::2])  # the 2 views of a clip
    assert not np.array_equal(batch['video'][0], batch['video'][1])  # ... are augmented independently
    assert batch['label'].max() < 8  # directions
    again = next(iter(finetune_pipeline.make_finetune_dataset(config, seed=0)))
    np.testing.assert_array_equal(batch['video'], again['video'])
    other = next(iter(finetune_pipeline.make_finetune_dataset(config, seed=1)))
    assert not np.array_equal(batch['video'], other['video'])


def test_iterator_state_resumes_exactly(cache_dir):
    config = load_config(CONFIG, overrides(cache_dir))
    it = iter(finetune_pipeline.make_finetune_dataset(config, seed=0))
    take(it, 2)
    state = it.get_state()
    want = take(it, 2)
    fresh = iter(finetune_pipeline.make_finetune_dataset(config, seed=0))
    fresh.set_state(state)
    for got, expected in zip(take(fresh, 2), want, strict=True):
        np.testing.assert_array_equal(got['video'], expected['video'])
        np.testing.assert_array_equal(got['label'], expected['label'])


def test_segment_sampling_known_answers():
    np.testing.assert_array_equal(finetune_pipeline.segment_frame_indices(32, 4, None), [4, 12, 20, 28])
    drawn = finetune_pipeline.segment_frame_indices(32, 4, np.random.default_rng(0))
    assert ((drawn >= [0, 8, 16, 24]) & (drawn < [8, 16, 24, 32])).all()
    np.testing.assert_array_equal(finetune_pipeline.segment_frame_indices(3, 5, None), [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(finetune_pipeline.segment_test_indices(32, 4, 2), [[0, 8, 16, 24], [4, 12, 20, 28]])


def test_segment_eval_views(cache_dir):
    config = load_config(CONFIG, overrides(cache_dir, 'input.temporal_sampling=segments'))
    ds, count = finetune_pipeline.make_finetune_eval_dataset(
        config, split='val', batch_size=4, num_clips=2, num_crops=3
    )
    batches = list(ds)
    assert count == 16 and len(batches) == 4
    assert batches[0]['video'].shape == (4, 6, 8, 32, 32, 3) and batches[0]['valid'].all()


@pytest.fixture(scope='module')
def finetuned(cache_dir, tmp_path_factory):
    config = load_config(CONFIG, overrides(cache_dir, 'train.steps=3', 'train.log_every=1'))
    workdir = str(tmp_path_factory.mktemp('finetune') / 'run')
    summary, state = train.train(config, workdir)
    return summary, jax.device_get(state), workdir


def test_runlocal_finetune_ends_with_accuracy(finetuned):
    summary, state, workdir = finetuned
    assert summary['final_step'] == 3 and summary['nonfinite_steps'] == 0
    assert summary['final_eval/clips'] == 16 and summary['final_eval/views'] == 6  # all 16 val clips, 2 x 3 views
    assert 0 <= summary['final_eval/top1'] <= summary['final_eval/top5'] <= 1
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert {'loss', 'mix_lambda', 'lr'} <= set(rows[0]) and any('eval/top1' in row for row in rows)
    assert all(np.isfinite(row['loss']) for row in rows if 'loss' in row)
    assert set(state['params']) == {'patch_embed', 'encoder', 'fc_norm', 'head'}


def test_cli_runlocal_finetune(cache_dir, tmp_path):
    command = [sys.executable, '-m', 'jaxssl.main', f'--config={CONFIG}', f'--workdir={tmp_path / "cli"}']
    command += [f'--config.{item}' for item in overrides(cache_dir, 'train.steps=2', 'eval.at_end=false')]
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'videomae_finetune:' in result.stdout and 'step 2/2' in result.stdout
    with open(tmp_path / 'cli' / 'summary.json') as f:
        assert json.load(f)['final_step'] == 2
