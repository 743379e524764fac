"""SSLD: the DMLLoss ("JS", a symmetric KL) against numpy, teacher errors naming the key, and a tiny teacher (saved with
params_io) distilled into a smaller student through train.train on one device and sharded over 8 fake CPU devices:
equal losses and parameters, the teacher frozen in the extra state."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import params_io, train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import sla, ssld

CONFIG = 'configs/ssld.py:runlocal'


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dml_loss_matches_numpy_and_is_a_symmetric_kl():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    ps, pt, eps = softmax(s), softmax(t), 1e-12
    want = np.mean(5 * (pt * np.log((pt + eps) / (ps + eps)) + ps * np.log((ps + eps) / (pt + eps))) / 2)
    np.testing.assert_allclose(ssld.dml_loss(jnp.asarray(s), jnp.asarray(t)), want, rtol=1e-5)
    kl = lambda p, q: (p * np.log(p / q)).sum(-1).mean()
    np.testing.assert_allclose(want, (kl(pt, ps) + kl(ps, pt)) / 2, rtol=1e-6)
    np.testing.assert_allclose(ssld.dml_loss(jnp.asarray(t), jnp.asarray(t)), 0.0, atol=1e-6)


def save_teacher(directory, outputs):
    """Random params of a 'tiny/4' shared-ViT classifier with `outputs` head outputs, as a params directory."""
    config = load_config('configs/sla.py:runlocal', ['model.variant=tiny/4'])
    model = sla.make_classifier(config, outputs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))['params'])
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    params_io.save_params(directory, params, {'kind': 'classifier', 'variant': 'tiny/4'})
    return str(directory), params


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp('teacher') / 'params', 10)


def test_teacher_errors_name_the_key(tmp_path, teacher):
    with pytest.raises(ConfigError, match=re.escape("'distill.teacher' is empty")):
        ssld.Method(load_config(CONFIG))
    with pytest.raises(ConfigError, match=re.escape("'distill.teacher_variant'")):
        load_config(CONFIG, ['distill.teacher_variant=XL'])
    path, _ = teacher
    with pytest.raises(ConfigError, match=re.escape("'distill.teacher'")):  # 10 outputs, 7 classes
        ssld.Method(load_config(CONFIG, [f'distill.teacher={path}', 'model.num_classes=7']))


def test_an_sla_sd_teacher_teaches_with_its_sd_head(tmp_path):
    path, params = save_teacher(tmp_path / 'sla_sd', 10 * 4 + 10)
    method = ssld.Method(load_config(CONFIG, [f'distill.teacher={path}']))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    full, _ = method.teacher.apply({'params': params}, images)
    np.testing.assert_array_equal(method.teacher_logits({'teacher': params}, images), full[:, 40:])


def run(workdir, *overrides):
    config = load_config(CONFIG, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


def test_runlocal_sharded_matches_one_device_and_keeps_the_teacher_frozen(tmp_path, teacher):
    path, saved = teacher
    common = (f'distill.teacher={path}', 'eval.at_end=false')
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', *common)
    sharded = ('mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0')
    summary, state, rows = run(tmp_path / 'sharded', *sharded, *common)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) and r['loss'] > 0 for r in rows)
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, state['params'], want_state['params'])
    jax.tree.map(np.testing.assert_array_equal, state['extra']['teacher'], saved)
    assert state['params']['head']['dense']['kernel'].shape == (64, 10)  # the micro student, the tiny teacher
    assert state['extra']['teacher']['head']['dense']['kernel'].shape == (128, 10)
