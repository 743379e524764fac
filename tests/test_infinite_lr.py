"""The infinite lr schedule and repeated cosine (jaxssl/optim.py): known answers at the phase boundaries, config
errors naming the key, and the MAE continual-pretraining config: task 1 starts from task 0's checkpoint, trains on
its own classes only, and continues the schedule (one device, then sharded over the 8 fake CPU devices)."""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxssl import optim, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import images

# Tasks of T = 100 steps: warmup 10, cooldown to 0.75 by step 50, constant to 80, anneal to 0.05 at T.
T, WARM, COOL, CONST, C, M = 100, 10, 50, 80, 0.75, 0.05


def infinite(cooldown='cosine'):
    return optim.infinite_schedule(1.0, T, WARM, COOL, CONST, C, M, cooldown)


def test_infinite_schedule_known_answers_at_the_phase_boundaries():
    s = infinite()
    want = {
        0: 0.0,
        5: 0.5,  # warmup from 0: t / T_w
        WARM: 1.0,  # the peak closes the warmup
        30: C + (1 - C) / 2,  # half-way through the cosine cooldown
        COOL: C,  # the cooldown ends at the constant lr
        65: C,
        CONST: C,  # the last constant step
        90: C * (M / C) ** 0.5,  # exponential anneal: half-way in log space
        99: C * (M / C) ** (19 / 20),
        T: C,  # task 1 starts at the constant lr: no re-warming, no cooldown
        T + 5: C,
        T + CONST: C,
        T + 90: C * (M / C) ** 0.5,
        3 * T + 99: C * (M / C) ** (19 / 20),
    }
    got = {step: float(s(step)) for step in want}
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, atol=1e-7)
    # T_ann -> T: the anneal reaches min_lr exactly at the end of the task.
    assert C * (M / C) ** ((T - CONST) / (T - CONST)) == pytest.approx(M)


def test_infinite_cooldown_shapes():
    p = (20 - WARM) / (COOL - WARM)  # 0.25 of the way through the cooldown
    h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1
    want = {
        'cosine': C + (1 - C) / 2 * (1 + math.cos(math.pi * p)),
        'linear': 1 - (1 - C) * p,
        'inv_sqrt': 1 + (C - 1) * h(p) / h(1),
    }
    for name, value in want.items():
        s = infinite(name)
        assert float(s(20)) == pytest.approx(value, rel=1e-6), name
        assert float(s(WARM)) == pytest.approx(1.0) and float(s(COOL)) == pytest.approx(C), name


def config_for(**optim_fields):
    fields = dict(base_lr=0.256, min_lr=0.0128, warmup_epochs=0, warmup_steps=WARM, epochs=1)
    fields.update(optim_fields)
    return ml_collections.ConfigDict(dict(optim=fields, input=dict(global_batch=256), train=dict(steps=T)))


def test_default_schedule_is_unchanged_and_cosine_repeats_per_task():
    want = optim.warmup_cosine(0.256, 0.0128, T, WARM)
    default = optim.learning_rate_schedule(config_for(), T, 1)  # a config without the schedule keys
    steps = np.arange(T)
    np.testing.assert_array_equal([default(i) for i in steps], [want(i) for i in steps])
    config = config_for(**optim.SCHEDULE_DEFAULTS)
    assert config.optim.schedule == 'cosine'
    explicit = optim.learning_rate_schedule(config, T, 1)
    np.testing.assert_array_equal([explicit(i) for i in steps], [default(i) for i in steps])
    # Repeated cosine: tasks of 40 steps in a run of 100: each restarts with the warmup, ends at min_lr.
    repeated = optim.learning_rate_schedule(config_for(task_steps=40), T, 1)
    cycle = optim.warmup_cosine(0.256, 0.0128, 40, WARM)
    np.testing.assert_allclose([repeated(i) for i in range(100)], [cycle(i % 40) for i in range(100)], rtol=1e-6)
    # A run for task 2 (offset 2 tasks) continues where tasks 0 and 1 left the schedule.
    later = optim.learning_rate_schedule(config_for(schedule='infinite', schedule_offset=2 * T), T, 1)
    s = optim.infinite_schedule(0.256, T, WARM, COOL, CONST, C * 0.256, M * 0.256)
    np.testing.assert_allclose([later(i) for i in range(T)], [s(i + 2 * T) for i in range(T)], rtol=1e-6)
    assert float(later(0)) == pytest.approx(C * 0.256)


def test_linear_schedule():
    s = optim.learning_rate_schedule(config_for(schedule='linear', min_lr=0.0), T, 1)
    np.testing.assert_allclose([s(0), s(5), s(WARM), s(55), s(T)], [0, 0.128, 0.256, 0.128, 0], atol=1e-7)


@pytest.mark.parametrize(
    'fields, key',
    [
        (dict(schedule='cosine_restarts'), 'optim.schedule'),
        (dict(schedule='infinite', cooldown='exp'), 'optim.cooldown'),
        (dict(schedule='infinite', cooldown_ratio=0.9, constant_ratio=0.8), 'optim.cooldown_ratio'),
        (dict(schedule='infinite', constant_ratio=1.0), 'optim.constant_ratio'),
        (dict(schedule='infinite', constant_lr_ratio=1.5), 'optim.constant_lr_ratio'),
        (dict(schedule='infinite', min_lr_ratio=0.9), 'optim.min_lr_ratio'),
        (dict(schedule_offset=-1), 'optim.schedule_offset'),
        (dict(task_steps=2.5), 'optim.task_steps'),
        (dict(schedule='infinite', cooldown_ratio=0.05), 'optim.cooldown_ratio'),  # ends before the warmup
    ],
)
def test_schedule_config_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        optim.learning_rate_schedule(config_for(**{**optim.SCHEDULE_DEFAULTS, **fields}), T, 1)


def test_every_config_can_select_the_infinite_schedule_and_bad_values_fail_at_load():
    config = load_config('configs/simclr.py:runlocal', ['optim.schedule=infinite', 'optim.cooldown=linear'])
    assert config.optim.schedule == 'infinite'
    with pytest.raises(ConfigError, match=r"'optim\.schedule'"):
        load_config('configs/mae.py:runlocal', ['optim.schedule=cosin'])
    with pytest.raises(ConfigError, match=r"'input\.classes'"):  # data keys are checked when a run starts
        images.check_image_input_config(load_config('configs/mae_continual.py:runlocal', ['input.classes=(-1,)']))
    with pytest.raises(ConfigError, match="'task'"):
        load_config('configs/mae_continual.py:runlocal,task=5')


def test_continual_config_tasks():
    steps = {}
    for schedule in ('infinite', 'cosine'):
        for task in (0, 3):
            c = load_config(f'configs/mae_continual.py:runlocal,task={task},schedule={schedule}')
            assert c.input.classes == (2 * task, 2 * task + 1) and c.optim.schedule == schedule
            assert c.optim.task_steps == c.train.steps and c.optim.schedule_offset == task * c.train.steps
            steps[schedule, task] = optim.learning_rate_schedule(c, c.train.steps, 1)
    peak = 4e-3 * 64 / 256
    assert float(steps['infinite', 0](0)) == 0 and float(steps['infinite', 3](0)) == pytest.approx(C * peak)
    assert float(steps['cosine', 3](0)) == 0  # repeated cosine re-warms every task
    full = load_config('configs/mae_continual.py:task=1')
    assert full.input.tfds_name == 'cifar10' and full.model.variant == 'Ti/2' and full.train.steps == 7600


def test_class_subset_keeps_only_the_task_classes():
    config = load_config('configs/mae_continual.py:runlocal,task=2')
    source = images.make_image_source(config)
    labels = {source[i]['label'] for i in range(len(source))}
    assert labels == {4, 5} and 0 < len(source) < len(images.DigitsSource('train'))
    assert len(images.make_image_source(config, 'val')) == len(images.DigitsSource('val'))  # probes see all


def run(workdir, task, *overrides):
    config = load_config(
        f'configs/mae_continual.py:runlocal,task={task}',
        ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.at_end=false', *overrides],
    )
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return config, summary, jax.device_get(state), rows


@pytest.mark.slow
def test_continual_tasks_through_the_trainer(tmp_path):
    _, summary0, _, rows0 = run(tmp_path / 'task0', 0, 'mesh.data=1')
    assert summary0['final_step'] == 2 and rows0[0]['lr'] == 0.0  # task 0 warms up from 0
    # Task 1 from task 0's checkpoint, sharded over data x FSDP on the 8 fake devices.
    config, summary1, _, rows1 = run(
        tmp_path / 'task1', 1, f'init_from={tmp_path / "task0"}', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0'
    )
    assert jax.device_count() == 8 and summary1['final_step'] == 2 and summary1['nonfinite_steps'] == 0
    assert all(np.isfinite(r['loss']) for r in rows1)
    peak = optim.peak_learning_rate(config)
    np.testing.assert_allclose([r['lr'] for r in rows1], [C * peak, C * peak], rtol=1e-6)  # continues at constant
    with open(tmp_path / 'task1' / 'config.json') as f:
        assert json.load(f)['init_from'] == str(tmp_path / 'task0')
