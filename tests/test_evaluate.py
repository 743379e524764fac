"""Evaluation: probe known answers, reconstruction pictures, and online evaluation + the evaluate CLI on a tiny run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.evaluate import frozen, probes, reconstruction


@pytest.fixture(scope='module')
def blobs():
    """Four well-separated Gaussian classes and pure-noise features of the same shape."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 12)) * 3
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 12))
    noise = rng.normal(size=(400, 12))
    return x, y, noise


def test_probes_separate_signal_from_noise(blobs):
    x, y, noise = blobs
    split = 300
    for probe in (probes.linear_probe, probes.knn_probe, probes.few_shot_probe):
        assert probe(x[:split], y[:split], x[split:], y[split:]) > 0.95
        assert probe(noise[:split], y[:split], noise[split:], y[split:]) < 0.45  # chance is 0.25


def test_knn_known_answer():
    train_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = np.array([0, 0, 1])
    test_x = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert probes.knn_probe(train_x, train_y, test_x, np.array([0, 1]), k=1) == 1.0
    # k = 3 with a sharp temperature still follows the nearest neighbour; a flat one follows the majority (class 0).
    assert probes.knn_probe(train_x, train_y, test_x[1:], np.array([1]), k=3, temperature=0.01) == 1.0
    assert probes.knn_probe(train_x, train_y, test_x[1:], np.array([0]), k=3, temperature=100.0) == 1.0


def test_attentive_probe_finds_the_informative_token():
    """Class is carried by one token among distractors; mean pooling dilutes it, attention can pick it out."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    tokens = rng.normal(size=(300, 6, 8)).astype(np.float32)
    tokens[np.arange(300), rng.integers(0, 6, 300), :3] = np.eye(3)[y] * 4 + 2  # a marked token holds the class
    acc = probes.attentive_probe(tokens[:200], y[:200], tokens[200:], y[200:])
    assert acc > 0.85


def test_run_probes_names_and_validity():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    train = {'mean_pool': np.eye(2)[y] + 0.01 * rng.normal(size=(60, 2)), 'label': y, 'valid': np.ones(60, int)}
    test = {k: v.copy() for k, v in train.items()}
    test['valid'][:10] = 0
    test['label'][:10] = 1 - test['label'][:10]  # wrong labels on invalid rows: must be ignored
    results = frozen.run_probes(train, test, ['label'], ['linear', 'knn', 'fewshot'])
    assert set(results) == {'label/mean_pool/linear', 'label/mean_pool/knn', 'label/mean_pool/5shot'}
    assert all(v == 1.0 for v in results.values())
    with pytest.raises(ValueError, match='unknown probes'):
        frozen.run_probes(train, test, ['label'], ['svm'])


def test_reconstruction_panels_known_answer():
    rng = np.random.default_rng(3)
    pixels = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    video = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    tubes = reconstruction._tubes(pixels, 4, 2)  # 2 x 2 x 2 = 8 tokens
    np.testing.assert_allclose(reconstruction._untubes(tubes, pixels.shape, 4, 2), pixels)
    visible, target = np.array([0, 5]), np.array([1, 2, 6])
    # A perfect model predicts the normalised target; the reconstruction must then equal the input there.
    true = tubes[target]
    normalised = (true - true.mean(1, keepdims=True)) / true.std(1, ddof=1, keepdims=True)
    panels = reconstruction.reconstruct(video, normalised.reshape(3, -1), visible, target, 4, 2)
    recon = reconstruction._tubes(panels['reconstruction'], 4, 2)
    np.testing.assert_allclose(recon[target], tubes[target], atol=1e-5)
    np.testing.assert_allclose(recon[visible], tubes[visible], atol=1e-6)
    assert np.all(recon[[3, 4, 7]] == reconstruction.GREY)  # neither seen nor reconstructed
    masked = reconstruction._tubes(panels['masked'], 4, 2)
    assert np.all(masked[target] == reconstruction.GREY)
    picture = reconstruction.grid([panels])
    assert picture.dtype == np.uint8 and picture.shape == (4 * 8 + 3 * 2, 4 * (8 + 2), 3)
    assert reconstruction.animation(panels).shape == (4, 8, 4 * 8 + 3 * 2, 3)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A few pretraining steps on tiny moving digits with evaluation at the end (through the CLI)."""
    root = tmp_path_factory.mktemp('eval')
    workdir = root / 'run'
    overrides = [
        f'--config.input.cache_dir={root / "cache"}',
        '--config.input.moving_digits_size=tiny',
        '--config.input.global_batch=8',
        '--config.train.steps=4',
        '--config.eval.batch_size=8',
        '--config.eval.probes=("linear","knn","fewshot","attentive")',
        '--config.train.tensorboard=false',
    ]
    command = [sys.executable, '-m', 'jaxssl.main', '--config=configs/videomae_v2.py:runlocal', f'--workdir={workdir}']
    result = subprocess.run(command + overrides, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout, overrides


@pytest.mark.slow
def test_online_evaluation_reports_probes_and_pictures(tiny_run):
    workdir, stdout, _ = tiny_run
    assert 'eval at step 4' in stdout
    with open(workdir / 'summary.json') as f:
        summary = json.load(f)
    for key in ('label/mean_pool/linear', 'direction/mean_pool/knn', 'speed/mean_pool/5shot', 'label/tokens/attentive'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
    pictures = sorted(os.listdir(workdir / 'pictures'))
    assert pictures == ['reconstruction_0000004.png', 'reconstruction_clip0_0000004.gif']


def test_evaluate_cli_on_a_checkpoint(tiny_run):
    workdir, _, overrides = tiny_run
    cache = next(o for o in overrides if 'cache_dir' in o)
    command = [sys.executable, '-m', 'jaxssl.evaluate', f'--workdir={workdir}', '--config.eval.probes=("knn",)', cache]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout[result.stdout.index('{') :])
    assert set(metrics) == {
        f'{label}/{rep}/knn' for label in ('label', 'direction', 'speed') for rep in ('mean_pool', 'time_pool')
    }
    assert os.path.isfile(workdir / 'eval_4.json')
    bad = subprocess.run(
        [sys.executable, '-m', 'jaxssl.evaluate', '--workdir=/nonexistent'], capture_output=True, text=True
    )
    assert bad.returncode == 2 and 'no config.json' in bad.stderr
