"""DINO: the loss (centring, sharpening, same-view pairs excluded) against numpy, the teacher's momentum and
temperature schedules, the EMA teacher and centre updates, multi-crop views and batches, config errors naming the
key, and a 2-step runlocal run through train.train on one device and sharded over 8 fake CPU devices (data x FSDP)
with equal losses, parameters and centres: the centre's batch mean is over the global batch whatever the mesh."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import views
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import dino
from jaxssl.models import dino as dino_model

CONFIG = 'configs/dino.py:runlocal'
RESNET = 'configs/dino.py:runlocal,variant=resnet18'


def numpy_dino_loss(student, teacher, center, student_temp, teacher_temp, same_view_pairs=False):
    """main_dino.py:DINOLoss, written out with loops: student (V, B, K), teacher (G, B, K)."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    total, terms = 0.0, 0
    for g in range(teacher.shape[0]):
        q = softmax((teacher[g] - center) / teacher_temp)
        for v in range(student.shape[0]):
            if v == g and not same_view_pairs:
                continue
            log_p = np.log(softmax(student[v] / student_temp))
            total += np.mean(np.sum(-q * log_p, axis=-1))
            terms += 1
    return total / terms


def test_loss_matches_numpy_with_centring_sharpening_and_pair_exclusion():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(5, 3, 7)).astype(np.float32)  # 2 global + 3 local crops, batch 3, 7 prototypes
    teacher = rng.normal(size=(2, 3, 7)).astype(np.float32)
    center = rng.normal(size=(1, 7)).astype(np.float32)
    got = dino.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), 0.1, 0.04)
    want = numpy_dino_loss(student, teacher, center, 0.1, 0.04)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # 2 x 5 - 2 = 8 terms: the same-view pairs (global crop g against itself) are left out.
    assert not np.isclose(want, numpy_dino_loss(student, teacher, center, 0.1, 0.04, same_view_pairs=True))
    # The centre matters (a non-constant shift of the teacher logits) and so does the teacher temperature.
    assert not np.isclose(want, numpy_dino_loss(student, teacher, 0 * center, 0.1, 0.04))
    assert not np.isclose(float(dino.dino_loss(student, teacher, center, 0.1, 0.07)), want)


def test_teacher_temperature_and_momentum_schedules():
    # np.linspace(0.04, 0.07, 4) per epoch, then 0.07.
    temps = [float(dino.teacher_temperature(e, 0.04, 0.07, 4)) for e in range(6)]
    np.testing.assert_allclose(temps, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], rtol=1e-6)
    assert float(dino.teacher_temperature(3, 0.04, 0.07, 0)) == pytest.approx(0.07)
    # utils.cosine_scheduler(0.996, 1, ...): 0.996 at the start, halfway 0.998, -> 1 at the end.
    got = [float(dino.teacher_momentum(s, 10, 0.996)) for s in (0, 5, 10)]
    want = [1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * s / 10)) for s in (0, 5, 10)]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_allclose(got, [0.996, 0.998, 1.0], rtol=1e-6)


def test_center_update_is_an_ema_of_the_mean_teacher_logits():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(2, 4, 6)).astype(np.float32)
    center = rng.normal(size=(1, 6)).astype(np.float32)
    got = dino.center_update(jnp.asarray(center), jnp.asarray(teacher), 0.9)
    want = 0.9 * center + 0.1 * teacher.reshape(-1, 6).sum(0, keepdims=True) / 8
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_teacher_follows_the_student_by_ema():
    config = load_config(CONFIG, [])
    method = dino.Method(config)
    total, _ = method.run_length
    params = {'a': jnp.ones((2, 3)), 'b': {'c': jnp.full(4, 2.0)}}
    extra = {'teacher': jax.tree.map(jnp.zeros_like, params), 'center': jnp.ones((1, 5))}
    new = method.update_extra(params, extra, jnp.asarray(0))
    m = config.model.teacher_momentum
    np.testing.assert_allclose(new['teacher']['a'], (1 - m) * 1.0, rtol=1e-4)  # float32 momentum
    np.testing.assert_allclose(new['teacher']['b']['c'], (1 - m) * 2.0, rtol=1e-4)
    np.testing.assert_array_equal(new['center'], extra['center'])  # the centre moves in the loss, not here
    last = method.update_extra(params, extra, jnp.asarray(total))
    np.testing.assert_allclose(last['teacher']['a'], 0.0, atol=1e-7)  # momentum 1 at the end of the run


def test_head_prototypes_are_unit_vectors_and_logits_cosines():
    head = dino_model.DINOHead(out_dim=11, hidden_dim=8, bottleneck_dim=5, layers=3, norm_last_layer=True)
    h = jax.random.normal(jax.random.key(0), (4, 6))
    params = head.init(jax.random.key(1), h)['params']
    assert set(params['last_layer']) == {'v'}  # the gain is fixed at 1
    logits = head.apply({'params': params}, h)
    assert logits.shape == (4, 11) and float(jnp.max(jnp.abs(logits))) <= 1.0 + 1e-5
    learned = dino_model.DINOHead(11, 8, 5, 3, norm_last_layer=False).init(jax.random.key(1), h)['params']
    np.testing.assert_array_equal(learned['last_layer']['g'], np.ones(11))


def test_head_batchnorm_normalises_each_hidden_layer_with_the_batch_statistics():
    head = dino_model.DINOHead(out_dim=7, hidden_dim=8, bottleneck_dim=5, layers=2, use_bn=True)
    h = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    params = head.init(jax.random.key(1), h)['params']
    params = jax.tree.map(lambda p: p + 0.3 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params)
    got, _ = head.apply({'params': params}, h, mutable=['batch_stats'])
    p = jax.device_get(params)
    x = h @ p['dense_0']['kernel'] + p['dense_0']['bias']
    x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * p['bn_0']['scale'] + p['bn_0']['bias']  # torch BatchNorm1d
    x = np.asarray(jax.nn.gelu(x, approximate=False)) @ p['dense_1']['kernel'] + p['dense_1']['bias']
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    want = x @ (p['last_layer']['v'] / np.linalg.norm(p['last_layer']['v'], axis=0, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Off by default (the reference's --use_bn_in_head default): no BatchNorm parameters.
    plain = dino_model.DINOHead(7, 8, 5, 2).init(jax.random.key(1), h)['params']
    assert not any(name.startswith('bn_') for name in plain)


def test_collapse_monitors_tell_the_two_collapses_from_a_healthy_teacher():
    batch, k = 8, 32
    one_hot = lambda idx: jax.nn.one_hot(jnp.asarray(idx), k)[None]  # (1, B, K): one global crop
    cases = {
        'uniform': (jnp.full((2, batch, k), 1.0 / k), math.log(k), math.log(k)),
        'one prototype': (one_hot([3] * batch), 0.0, 0.0),
        'healthy': (one_hot(np.arange(batch)), 0.0, math.log(batch)),  # sharp, and a prototype per image
    }
    for name, (targets, target_entropy, batch_entropy) in cases.items():
        got = dino.collapse_monitors(targets)
        np.testing.assert_allclose(got['teacher_entropy'], target_entropy, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got['teacher_batch_entropy'], batch_entropy, atol=1e-5, err_msg=name)


def test_multi_crop_views_groups_sizes_and_per_view_probabilities():
    image = (np.random.default_rng(0).uniform(size=(28, 28, 3)) * 255).astype(np.uint8)
    groups = (
        views.CropGroup('global_crops', 16, (0.4, 1.0), (1.0, 0.1), (0.0, 0.2)),
        views.CropGroup('local_crops', 8, (0.05, 0.4), (0.5,) * 3, (0.0,) * 3),
    )
    make = lambda seed, **kw: views.multi_crop_views(image, np.random.default_rng(seed), groups=groups, **kw)
    a, b, c = make(1), make(1), make(2)
    assert a['global_crops'].shape == (2, 16, 16, 3) and a['local_crops'].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(a['local_crops'], b['local_crops'])
    assert not np.array_equal(a['global_crops'], c['global_crops'])
    # Nothing random applied except a view's solarisation with probability 1: the whole image, inverted above 128.
    plain = (views.CropGroup('g', 28, (1.0, 1.0), (0.0, 0.0), (0.0, 1.0)),)
    out = views.multi_crop_views(image, np.random.default_rng(0), groups=plain, ratio=(1.0, 1.0), flip=False,
                                 jitter_prob=0.0, grayscale_prob=0.0)['g']  # fmt: skip
    x = image / 255.0
    normalise = lambda y: (y - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[0], normalise(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], normalise(np.where(image >= 128, 1 - x, x)), rtol=1e-5, atol=1e-5)


def test_pipeline_batches_hold_global_and_local_crops():
    config = load_config(CONFIG, ['input.global_batch=4'])
    method = dino.Method(config)
    batch = next(iter(method.dataset(seed=3, process_index=0, process_count=1)[0]))
    n_local = config.input.local_crops_number
    assert batch['global_crops'].shape == (4, 2, 32, 32, 3) and batch['global_crops'].dtype == np.float32
    assert batch['local_crops'].shape == (4, n_local, 16, 16, 3)
    assert batch['label'].shape == (4,)
    assert not np.array_equal(batch['global_crops'][0, 0], batch['global_crops'][0, 1])
    example = method.example_batch(2)
    assert {k: v.shape for k, v in example.items()} == {
        'global_crops': (2, 2, 32, 32, 3),
        'local_crops': (2, n_local, 16, 16, 3),
    }


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.num_sample=2', "'input.num_sample'"),
        ('input.local_crop_size=18', "'input.local_crop_size'"),
        ('loss.student_temp=0.0', "'loss.student_temp'"),
        ('loss.center_momentum=1.5', "'loss.center_momentum'"),
        ('input.local_crop_scale=(0.5,0.2)', "'input.local_crop_scale'"),
        ('model.head_bottleneck=0', "'model.head_bottleneck'"),
        ('model.variant=XL', "'model.variant'"),
        ('optim.name=lars', "'optim.name'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


def test_resnet_recipe_is_the_readme_command_and_checks_its_keys():
    config = load_config('configs/dino.py:variant=resnet50', [])
    o, c = config.optim, config.input
    assert (o.name, o.base_lr, o.momentum, o.weight_decay, o.weight_decay_end, o.clip_grad) == (
        'sgd', 0.03, 0.9, 1e-4, 1e-4, 3.0
    )  # fmt: skip
    assert (tuple(c.global_crop_scale), tuple(c.local_crop_scale)) == ((0.14, 1.0), (0.05, 0.14))
    assert (config.loss.teacher_temp, config.loss.warmup_teacher_temp_epochs, c.global_batch) == (0.04, 0, 512)
    assert c.local_crops_number == 8
    model = dino.make_model(config)
    assert isinstance(model, dino_model.DINOResNetModel) and model.head.out_dim == 65536
    assert model.backbone.bottleneck and model.backbone.width == 64 and not model.backbone.small_stem
    small = dino.make_model(load_config(RESNET, []))
    assert small.backbone.width == 16 and small.backbone.small_stem
    # The small-data preset (lightly's CIFAR-10 settings) sets what the docs' runs t and y used.
    preset = load_config(RESNET + ',small_data', [])
    assert (preset.input.local_crops_number, preset.model.head_use_bn, preset.model.head_out) == (0, True, 2048)
    assert (preset.model.teacher_momentum, preset.loss.teacher_temp, preset.loss.warmup_teacher_temp_epochs) == (
        0.99, 0.04, 0
    )  # fmt: skip
    assert (preset.optim.name, preset.optim.base_lr, preset.optim.weight_decay, preset.optim.clip_grad) == (
        'sgd', 0.12, 5e-4, 0.0
    )  # fmt: skip
    assert tuple(preset.input.global_crop_scale) == (0.4, 1.0) and tuple(preset.optim.freeze_epochs) == ()
    with pytest.raises(ConfigError, match=re.escape("'model.resnet_width'")):
        load_config(RESNET, ['model.resnet_width=0'])


SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides, config=CONFIG):
    config = load_config(
        config, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'input.global_batch=16', *overrides]
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('dino') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    for part in ('params', 'extra'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state[part], want_state[part])
    # The mean target's entropy is at least a target's mean entropy (concavity): the monitors see the global batch.
    assert all(r['teacher_batch_entropy'] >= r['teacher_entropy'] - 1e-5 for r in rows)
    # The centre moved off zero and the teacher off the student's initial copy (EMA steps happened).
    assert np.abs(state['extra']['center']).max() > 0
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0


@pytest.mark.slow
def test_resnet_runs_sharded_like_one_device_with_its_batchnorm_state(tmp_path):
    """A ResNet-18 DINO (width 16, CIFAR stem): the BatchNorm statistics are the global batch's on any mesh, the
    student's and the teacher's running averages are kept apart, and the probes read the teacher's pooled features."""
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', config=RESNET)
    summary, state, rows = run(
        tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL, config=RESNET
    )
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    for part in ('params', 'extra'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state[part], want_state[part])
    student, teacher = state['extra']['batch_stats']['backbone'], state['extra']['teacher_batch_stats']['backbone']
    assert np.abs(teacher['bn1']['mean']).max() > 0  # the teacher's forward passes update its own averages
    # The student also saw the local crops, so its averages moved on from the teacher's.
    assert not np.allclose(student['bn1']['mean'], teacher['bn1']['mean'])
    assert 0.0 <= summary['final_eval/label/pool/knn'] <= 1.0
