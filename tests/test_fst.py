"""FST (learning from future): the trainer's look-ahead against a transcription of the reference's loop, the poly
schedule, the entropy-filtered unsupervised loss, the reference's weak augmentation, the teacher's warmup and EMA,
and a sharded run of the method on the built-in phantoms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxssl import optim, sharding, train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import base, fst
from tests.sharded_runs import run

SPEC = 'configs/fst.py:runlocal'
LR, MOMENTUM, EMA = 0.1, 0.9, 0.5


class Toy(base.Method):
    """loss = |w - teacher - x|^2 / 2 (the teacher as a target, like a pseudo label); counts its calls in extra."""

    def loss(self, params, extra, batch, rng, step):
        r = params['w'] - jax.lax.stop_gradient(extra['teacher']) - batch['x']
        return 0.5 * jnp.sum(r**2), ({}, dict(extra, calls=extra['calls'] + 1))

    def update_extra(self, params, extra, step):
        decay = jnp.minimum(1.0 - 1.0 / (step + 1.0), EMA)
        return dict(extra, teacher=decay * extra['teacher'] + (1 - decay) * params['w'])


def lr(step):
    return LR / (1 + step)


def reference_loop(w, t, x, steps, lookahead):
    """semi_seg/train_semi.py's iteration, in numpy: torch SGD (momentum, no dampening) and update_ema; the lr
    scheduler steps once per real iteration."""
    b = np.zeros_like(w)
    for i in range(steps):
        decay = min(1 - 1 / (i + 1), EMA)
        ema = lambda t, w, decay=decay: decay * t + (1 - decay) * w

        def sgd(w, b, t, i=i):
            b = MOMENTUM * b + (w - t - x)
            return w - lr(i) * b, b

        saved = w.copy()
        for _ in range(lookahead):
            t = ema(t, w)
            w, b = sgd(w, b, t)
        if lookahead:
            t = ema(t, w)
            w = saved  # parameters only: the momentum and the teacher keep the virtual steps
        w, b = sgd(w, b, t)
        t = ema(t, w)
    return w, t, b


@pytest.mark.parametrize('lookahead', [0, 3])
def test_lookahead_step_equals_the_references_loop(lookahead):
    rng = np.random.default_rng(0)
    w, t, x = (rng.normal(size=3).astype(np.float32) for _ in range(3))
    optimizer = optax.chain(optax.trace(decay=MOMENTUM), optax.scale_by_learning_rate(lr))
    step_fn = jax.jit(train.make_train_step(Toy(None), optimizer, lr, accum=1, lookahead=lookahead))
    params = {'w': jnp.asarray(w)}
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt=optimizer.init(params),
                 extra={'teacher': jnp.asarray(t), 'calls': jnp.zeros((), jnp.int32)},
                 rng=jax.random.key_data(jax.random.key(0)), nonfinite=jnp.zeros((), jnp.int32),
                 first_nonfinite=-jnp.ones((), jnp.int32))  # fmt: skip
    for _ in range(3):
        state, _ = step_fn(state, {'x': jnp.asarray(x)})
    want_w, want_t, want_b = reference_loop(w, t, x, 3, lookahead)
    np.testing.assert_allclose(state['params']['w'], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state['extra']['teacher'], want_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state['opt'][0].trace['w'], want_b, rtol=1e-5, atol=1e-6)
    assert int(state['extra']['calls']) == 3 * (lookahead + 1)  # the virtual steps' extra state is kept
    assert int(state['opt'][1].count) == 3  # the lr schedule counts real steps only
    if lookahead:  # and the look-ahead changes the result
        assert np.abs(want_w - reference_loop(w, t, x, 3, 0)[0]).max() > 1e-3


class Fragile(Toy):
    """|w - x|^2 / 2 + sqrt(0.5 - sum(w)), without the teacher: finite at w = 0, NaN once a step has moved w
    towards x = 1."""

    def loss(self, params, extra, batch, rng, step):
        w = params['w']
        return 0.5 * jnp.sum((w - batch['x']) ** 2) + jnp.sqrt(0.5 - jnp.sum(w)), ({}, extra)


def test_a_nonfinite_virtual_step_fails_the_real_one():
    """The real step's loss is finite, but its teacher would carry the virtual step's NaN: the guard skips it."""
    optimizer = optax.sgd(1.0)
    step_fn = jax.jit(train.make_train_step(Fragile(None), optimizer, lambda s: 1.0, accum=1, lookahead=2))
    params, extra = {'w': jnp.zeros(3)}, {'teacher': jnp.zeros(3), 'calls': jnp.zeros((), jnp.int32)}
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt=optimizer.init(params), extra=extra,
                 rng=jax.random.key_data(jax.random.key(0)), nonfinite=jnp.zeros((), jnp.int32),
                 first_nonfinite=-jnp.ones((), jnp.int32))  # fmt: skip
    state, metrics = step_fn(state, {'x': jnp.ones(3)})
    assert np.isfinite(metrics['loss']) and int(state['nonfinite']) == 1
    np.testing.assert_array_equal(state['params']['w'], 0.0)
    np.testing.assert_array_equal(state['extra']['teacher'], 0.0)


def test_poly_schedule_and_bad_values():
    config = load_config(SPEC)
    schedule = optim.learning_rate_schedule(config, total_steps=100, steps_per_epoch=10)
    peak = optim.peak_learning_rate(config)
    for step in (0, 1, 50, 99):
        np.testing.assert_allclose(schedule(step), peak * (1 - step / 100) ** 0.9, rtol=1e-6)
    # Past the end (a look-ahead's optimiser counts more updates than steps): 0, not NaN, compiled too.
    assert float(jax.jit(schedule)(jnp.int32(400))) == 0.0 and float(jax.jit(schedule)(jnp.int32(100))) == 0.0
    assert optim.peak_learning_rate(load_config(SPEC, ['input.global_batch=16'])) == pytest.approx(0.05)  # fixed
    assert optim.peak_learning_rate(load_config(SPEC, ['optim.base_lr=0.32'])) == pytest.approx(0.01)  # overridable
    with pytest.raises(ConfigError, match='warmup'):
        optim.learning_rate_schedule(load_config(SPEC, ['optim.warmup_steps=5']), 100, 10)
    for overrides, key in ((['loss.drop_percent=0'], r'loss\.drop_percent'), (['loss.ema_decay=1.0'], 'ema_decay'),
                           (['input.labelled_volumes=0'], r'input\.labelled_volumes')):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            fst.Method(load_config(SPEC, overrides))
    with pytest.raises(ConfigError, match='mode'):
        load_config('configs/fst.py:mode=fixmatch')
    with pytest.raises(ConfigError, match=r'train\.lookahead_steps'):
        config = load_config(SPEC, ['train.lookahead_steps=-1'])
        train.check_batch(config, sharding.make_mesh(config))


def test_optimiser_equals_torch_sgd_with_a_decoder_group():
    """The config's optimiser: torch SGD (momentum 0.9, weight decay 1e-4 on every parameter, vectors too) with the
    encoder at lr and the decoder and head at 10 lr, both on the poly schedule stepped once per iteration."""
    config = load_config(SPEC)
    rng = np.random.default_rng(4)
    shapes = {'encoder': {'kernel': (3, 2), 'bias': (2,)}, 'decoder': {'kernel': (2, 2), 'bias': (2,)},
              'head': {'scale': (2,)}}  # fmt: skip
    params = {g: {k: rng.normal(size=v).astype(np.float32) for k, v in leaves.items()} for g, leaves in shapes.items()}
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    optimizer = optim.make_optimizer(config, params, schedule, total_steps=10, steps_per_epoch=5)
    state, jax_params = optimizer.init(params), jax.tree.map(jnp.asarray, params)
    torch_params = {
        g: {k: torch.tensor(v, requires_grad=True) for k, v in leaves.items()} for g, leaves in params.items()
    }
    peak = optim.peak_learning_rate(config)
    groups = [
        {'params': list(torch_params['encoder'].values()), 'lr': peak},
        {'params': [*torch_params['decoder'].values(), *torch_params['head'].values()], 'lr': 10 * peak},
    ]
    sgd = torch.optim.SGD(groups, lr=peak, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        grads = {g: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in leaves.items()}
                 for g, leaves in params.items()}  # fmt: skip
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads), state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for group, base_lr in zip(sgd.param_groups, (peak, 10 * peak), strict=True):
            group['lr'] = base_lr * (1 - step / 10) ** 0.9  # lr_helper.py's poly, stepped before the iteration
        for g, leaves in torch_params.items():
            for k, v in leaves.items():
                v.grad = torch.from_numpy(grads[g][k])
        sgd.step()
    for g, leaves in torch_params.items():
        for k, v in leaves.items():
            np.testing.assert_allclose(jax_params[g][k], v.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=(g, k))


def test_loss_labels_with_the_eval_mode_teacher_and_filters_with_its_train_mode_pass():
    """Pseudo labels: the evaluation-mode teacher's argmax (the warmup's teacher is the student itself, whatever
    extra['teacher'] holds); the new teacher averages: the statistics of its training-mode pass on both kinds of
    slices; the student's: its own pass on both."""
    method = fst.Method(load_config(SPEC, ['model.channels=(4,8)', 'input.image_size=16']))
    batch = method.example_batch(4)
    params, extra = method.init(jax.random.key(0), batch)
    other = jax.tree.map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(x.shape) + 1.0), params)
    extra = dict(extra, teacher=other, teacher_stats=jax.tree.map(lambda x: x + 0.1, extra['teacher_stats']))
    both = jnp.concatenate([batch['labelled'], batch['unlabelled']])

    def expected(teacher_params):
        teacher = method._variables(teacher_params, extra['teacher_stats'])
        labels = jnp.argmax(method.segmenter.apply(teacher, batch['unlabelled'], train=False)[0], -1)
        stats = method.segmenter.apply(teacher, both, train=True)[1]
        return labels, {name: stats[name]['batch_stats'] for name in stats}

    for step, teacher_params in ((0, params), (100, other)):  # warmup: 12 steps
        labels, teacher_stats = expected(teacher_params)
        _, (metrics, new_extra) = method.loss(params, extra, dict(batch, unlabelled_truth=labels), None, step)
        assert float(metrics['pseudo_label_accuracy']) == 1.0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_extra['teacher_stats'],
                     teacher_stats)  # fmt: skip
        student = method.segmenter.apply(method._variables(params, extra['student_stats']), both, train=True)[1]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_extra['student_stats'],
                     {name: student[name]['batch_stats'] for name in student})  # fmt: skip
    assert not np.array_equal(expected(params)[0], expected(other)[0])  # the two teachers label differently


def test_unsupervised_loss_drops_the_most_uncertain_pixels():
    rng = np.random.default_rng(1)
    logits, teacher = rng.normal(size=(2, 4, 5, 3)), 2 * rng.normal(size=(2, 4, 5, 3))
    labels = teacher.argmax(-1)
    loss, kept = fst.unsupervised_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(teacher), 80.0)
    p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
    entropy = -(p * np.log(p + 1e-10)).sum(-1)
    keep = entropy < np.percentile(entropy, 80)
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_q, labels[..., None], -1)[..., 0]
    weight = keep.size / keep.sum()  # loss_helper's batch_size * h * w / #kept
    np.testing.assert_allclose(loss, weight * ce[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(kept, keep.mean(), rtol=1e-6)
    assert keep.sum() == 32  # 80% of 40 pixels


def test_pseudo_label_quality_counts_known_pixels_only():
    pseudo = jnp.array([[0, 1, 2, 2, 1]])
    truth = jnp.array([[0, 1, 1, -1, -1]])  # 3 known pixels, 2 known foreground
    quality = fst.pseudo_label_quality(pseudo, truth)
    np.testing.assert_allclose([quality['pseudo_label_accuracy'], quality['pseudo_label_recall']], [2 / 3, 1 / 2])


def test_resize_matches_torch_and_the_augmentation_keeps_labels():
    image = np.random.default_rng(2).uniform(size=(48, 48)).astype(np.float32)
    t = torch.from_numpy(image)[None, None]
    for out in range(24, 97):  # every size RandResize makes of a 48 px slice (74: float32 indices matter)
        bilinear = torch.nn.functional.interpolate(t, size=(out, out), mode='bilinear', align_corners=False)
        nearest = torch.nn.functional.interpolate(t, size=(out, out), mode='nearest')
        np.testing.assert_allclose(fst.resize(image, out, 1), bilinear[0, 0].numpy(), atol=2e-5, err_msg=out)
        np.testing.assert_array_equal(fst.resize(image, out, 0), nearest[0, 0].numpy(), err_msg=out)
    label = np.zeros((48, 48), np.int32)
    label[10:30, 12:40] = 3
    rng = np.random.default_rng(3)
    scales = []
    for _ in range(40):
        x, y = fst.weak_augment(label.astype(np.float32) / 3, label, rng)
        assert x.shape == y.shape == (48, 48) and set(np.unique(y)) <= {0, 3}
        # The labels moved with the image, to torch 'nearest''s misalignment (up to a pixel, as the reference's).
        inside, region = x > 0.5, y == 3
        assert (inside & region).sum() / (inside | region).sum() > 0.75
        scales.append(np.sqrt(y.astype(bool).sum() / label.astype(bool).sum()))
    assert min(scales) < 0.9 and max(scales) > 1.1  # shrunk (zero padded) and enlarged (cropped) slices


def test_teacher_is_the_student_during_warmup_then_its_ema():
    method = fst.Method(load_config(SPEC, ['model.channels=(4,8)']))
    params, extra = method.init(jax.random.key(0), method.example_batch(1))
    moved = jax.tree.map(lambda x: x + 1.0, params)
    assert method.warmup_steps == 12  # one epoch: 100 unlabelled volumes / 8
    for step, decay in ((0, 0.0), (11, 0.0), (30, 1 - 1 / 31), (500, 0.99)):  # ema_decay 0.99
        teacher = method.update_extra(moved, extra, jnp.asarray(step))['teacher']
        jax.tree.map(lambda t, p, s, d=decay: np.testing.assert_allclose(t, d * p + (1 - d) * s, atol=1e-6),
                     teacher, params, moved)  # fmt: skip
        used = method.teacher_params(moved, extra, jnp.asarray(step))
        jax.tree.map(np.testing.assert_array_equal, used, moved if step < 12 else extra['teacher'])


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_reports_dice(tmp_path):
    """Two steps with one look-ahead step on 1 and on 8 devices give the same losses and student; the teacher's
    and the student's Dice per class are reported; the logged kept fraction is the 80th percentile's."""
    small = ('train.lookahead_steps=1', 'model.channels=(4,8,16)', 'eval.test_volumes=2')
    _, want, want_rows = run(SPEC, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *small)
    summary, state, rows = run(SPEC, tmp_path / 'sharded', 'mesh.data=8', *small)
    assert jax.device_count() == 8 and summary['nonfinite_steps'] == 0
    for key in ('loss', 'sup_loss', 'unsup_loss'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), state['params'], want['params'])
    assert 0.79 < rows[0]['kept_fraction'] <= 0.8 and 0 < rows[0]['pseudo_label_accuracy'] <= 1
    results = {k.removeprefix('final_eval/'): v for k, v in summary.items() if k.startswith('final_eval/')}
    assert {'teacher/dice', 'student/dice', 'teacher/dice/lv', 'student/dice/rv'} <= set(results)
    assert all(0 <= v <= 1 for v in results.values())
    # After 2 steps inside the 12-step warmup the teacher is a copy of the student.
    jax.tree.map(np.testing.assert_array_equal, state['extra']['teacher'], state['params'])
