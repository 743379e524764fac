"""Distillation: known answers of the loss, and a tiny teacher (saved with params_io) distilled into a smaller student
through the trainer: the teacher stays frozen and the KL to it decreases."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxssl import params_io, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import moving_digits
from jaxssl.methods import videomae_distill
from jaxssl.models import videomae as videomae_model

CONFIG = 'configs/videomae_v2_distill.py:runlocal'
TEACHER = dict(width=96, depth=3, heads=4, mlp_hidden=192, patch=8, tubelet=2, channels=3, pos_embedding='sincos')


def test_kd_loss_known_answer():
    student = jnp.array([[0.0, 0.0]])
    teacher = jnp.array([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(videomae_distill.kd_loss(student, teacher, 1.0)) == pytest.approx(want, rel=1e-6)
    # T = 2: softmax(teacher / 2) = [1, sqrt 3] / (1 + sqrt 3); the KL is scaled by T^2 = 4.
    p = np.array([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
    want2 = 4 * float(np.sum(p * np.log(p / 0.5)))
    assert float(videomae_distill.kd_loss(student, teacher, 2.0)) == pytest.approx(want2, rel=1e-6)
    assert float(videomae_distill.kd_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_mixes_the_terms():
    student, teacher = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, math.log(3.0)]])
    targets = jnp.array([[1.0, 0.0]])
    kd = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    ce = math.log(2.0)
    total, parts = videomae_distill.distill_loss(student, teacher, targets, 0.3, 1.0)
    assert float(total) == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-6) and set(parts) == {'kd', 'ce'}
    feats_s, feats_t = jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 4.0]])
    total, parts = videomae_distill.distill_loss(student, teacher, targets, 0.3, 1.0, 2.0, feats_s, feats_t)
    assert float(parts['feature']) == pytest.approx(2.5) and float(total) == pytest.approx(0.3 * kd + 0.7 * ce + 5.0)


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
    """A tiny 'fine-tuned' teacher wider and deeper than the micro student, saved as a params directory."""
    model = videomae_model.VideoMAEClassifier(**TEACHER, num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(3), jnp.zeros((1, 8, 32, 32, 3)))['params'])
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    params['fc_norm']['scale'] = np.ones_like(params['fc_norm']['scale'])
    params['head']['kernel'] = (0.3 * rng.normal(size=params['head']['kernel'].shape)).astype(np.float32)
    directory = tmp_path_factory.mktemp('teacher') / 'params'
    metadata = {
        'kind': 'classifier',
        'variant': None,
        'model': {**TEACHER, 'num_classes': 10, 'use_mean_pooling': True},
    }
    params_io.save_params(directory, params, metadata)
    return str(directory), params


@pytest.fixture(scope='module')
def distilled(teacher_dir, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / 'jaxssl-cache'
    moving_digits.ensure(str(cache), 'tiny')
    path, _ = teacher_dir
    config = load_config(
        CONFIG,
        [f'distill.teacher={path}', f'input.cache_dir={cache}', 'input.moving_digits_size=tiny',
         'input.global_batch=8', 'input.label_key=label', 'train.steps=8', 'train.log_every=1',
         'train.tensorboard=false', 'eval.at_end=false', 'distill.alpha=1.0', 'distill.feature_weight=0.5',
         'optim.base_lr=0.2', 'optim.warmup_steps=1', 'mixup.mixup_alpha=0', 'mixup.cutmix_alpha=0',
         'augment.auto_augment=', 'augment.erase_prob=0', 'mesh.data=2'],
    )  # fmt: skip
    workdir = str(tmp_path_factory.mktemp('distill') / 'run')
    summary, state = train.train(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return summary, jax.device_get(state), rows


def test_teacher_is_frozen_and_student_is_smaller(teacher_dir, distilled):
    _, saved = teacher_dir
    summary, state, _ = distilled
    assert summary['final_step'] == 8
    flat = traverse_util.flatten_dict
    for name, value in flat(saved).items():
        np.testing.assert_array_equal(flat(state['extra']['teacher'])[name], value)
    assert state['params']['head']['kernel'].shape == (64, 10)  # the micro student
    assert state['params']['feature_proj']['kernel'].shape == (64, 96)  # student width -> teacher width


def test_kl_to_the_teacher_decreases(distilled):
    _, _, rows = distilled
    kd = [row['kd'] for row in rows if 'kd' in row]
    assert len(kd) == 8 and all(np.isfinite(kd))
    assert np.mean(kd[-3:]) < 0.7 * np.mean(kd[:2]), kd
    assert rows[-1]['feature'] < rows[0]['feature']


def test_teacher_errors(tmp_path, teacher_dir):
    config = load_config(CONFIG)
    with pytest.raises(ConfigError, match=r"'distill\.teacher' is empty"):
        videomae_distill.Method(config)
    path, _ = teacher_dir
    wrong = load_config(CONFIG, [f'distill.teacher={path}', 'input.label_key=speed'])  # 2 classes, teacher has 10
    with pytest.raises(ConfigError, match='teacher has 10 classes'):
        videomae_distill.Method(wrong)
