"""Self-distillation for further pretraining: the distillation loss's known answer, the teacher gets no gradient,
and the two-step recipe through the trainer: a 2-step MAE run (the further-pretrained teacher) then a 2-step
self-distillation run from it, on one device and sharded over the 8 fake CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import mae_self_distill

COMMON = ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.at_end=false']


def test_feature_distill_loss_known_answer():
    student = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    teacher = jnp.array([[0.0, 4.0, 0.0], [0.0, 1.0, 1.0]])
    # Sum over features and batch of the squared differences, / batch: ((1 + 4) + (1 + 4)) / 2.
    assert float(mae_self_distill.feature_distill_loss(student, teacher)) == pytest.approx(5.0)
    assert float(mae_self_distill.feature_distill_loss(teacher, teacher)) == 0.0
    grad_s, grad_t = jax.grad(mae_self_distill.feature_distill_loss, argnums=(0, 1))(student, teacher)
    np.testing.assert_allclose(grad_s, (student - teacher) * 2 / 2)  # d/ds of sum (s - t)^2 / B
    np.testing.assert_array_equal(grad_t, np.zeros_like(teacher))  # the teacher's side is a constant


def run(config_spec, workdir, *overrides):
    config = load_config(config_spec, [*COMMON, *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = {row['step']: row for row in map(json.loads, f) if 'loss' in row}
    return config, summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """Step 1: a 2-step further-pretrained MAE workdir, the teacher."""
    workdir = tmp_path_factory.mktemp('further') / 'run'
    _, _, state, _ = run('configs/mae.py:runlocal', workdir, 'mesh.data=1', 'optim.base_lr=0.05')
    return str(workdir), state['params']


@pytest.fixture(scope='module')
def one_device(teacher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('self_distill') / 'one'
    return run('configs/mae_self_distill.py:runlocal', workdir, f'distill.teacher={teacher[0]}', 'mesh.data=1')


def test_teacher_is_loaded_frozen_and_distilled_to(teacher, one_device):
    _, teacher_params = teacher
    config, summary, state, rows = one_device
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    # The extra state holds the teacher's encoder, exactly as step 1 left it after training, and only that.
    got = traverse_util.flatten_dict(state['extra']['teacher'], sep='/')
    want = traverse_util.flatten_dict(teacher_params, sep='/')
    assert set(got) == {n for n in want if not n.startswith(('decoder', 'mask_token'))}
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name])
    for row in rows.values():
        assert row['distill_loss'] > 0
        assert row['loss'] == pytest.approx(row['mae_loss'] + config.distill.weight * row['distill_loss'], rel=1e-5)


def test_loss_gradient_reaches_the_student_not_the_teacher(teacher, one_device):
    config, _, state, _ = one_device
    method = mae_self_distill.Method(config)
    batch = jax.tree.map(jnp.asarray, method.example_batch(4))
    params, extra = state['params'], state['extra']
    total = lambda p, e: method.loss(p, e, batch, jax.random.key(0), 0)[0]
    grad_teacher = jax.jit(jax.grad(total, argnums=1))(params, extra)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_teacher))

    def distill_only(p):
        student = method.cls_features(p, batch['image'], True, jax.random.key(1))
        return mae_self_distill.feature_distill_loss(
            student, method.cls_features(method.teacher_params(p, extra), batch['image'], False)
        )

    # The distillation term alone moves the student's encoder, not its decoder (nor, through the teacher's
    # tree, anything: the student's params that fill it are stopped).
    grad = jax.jit(jax.grad(distill_only))(params)
    assert float(jnp.abs(grad['encoder']['norm']['scale']).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad['decoder']))


@pytest.mark.slow
def test_sharded_matches_one_device(teacher, one_device, tmp_path):
    _, _, want_state, want_rows = one_device
    _, summary, state, rows = run(
        'configs/mae_self_distill.py:runlocal', tmp_path / 'sharded', f'distill.teacher={teacher[0]}',
        'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0',
    )  # fmt: skip
    assert jax.device_count() == 8 and summary['final_step'] == 2
    for step in (1, 2):
        for key in ('loss', 'mae_loss', 'distill_loss'):
            assert rows[step][key] == pytest.approx(want_rows[step][key], rel=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )


def test_config_recipe_and_errors():
    config = load_config('configs/mae_self_distill.py')
    o = config.optim
    assert (o.schedule, o.warmup_steps, o.min_lr, o.weight_decay, o.b2) == ('linear', 0, 0.0, 0.01, 0.95)
    assert config.input.global_batch == 64 and o.base_lr * 64 / 256 == pytest.approx(1.5e-4)
    assert (config.distill.weight, config.loss.norm_pix_loss, config.masking.ratio) == (1.0, True, 0.75)
    with pytest.raises(ConfigError, match=r"'distill\.weight'"):
        load_config('configs/mae_self_distill.py:runlocal', ['distill.weight=-1'])
    with pytest.raises(ConfigError, match=r"'distill\.teacher'"):
        mae_self_distill.Method(load_config('configs/mae_self_distill.py:runlocal'))
