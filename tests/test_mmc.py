"""MMC: known answers of its loss terms (numpy by hand), the EMA teacher update, the mask really hiding the masked
patches, the prompt-patch segmentation evaluator on features whose answer is known, config errors naming the key, and
a 2-step runlocal run through train.train on one device and sharded over 8 fake CPU devices (data x FSDP) with equal
losses and parameters, ending with the probes and the segmentation metrics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.evaluate import prompt_segmentation as seg
from jaxssl.losses import contrastive
from jaxssl.methods import mmc
from jaxssl.models import mmc as mmc_model

CONFIG = 'configs/mmc.py:runlocal'


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(q, k, t):
    """Mean over queries of -log softmax(q_i . k_j / t)[j = i], unit vectors, by a plain loop."""
    q, k = np_unit(q.astype(np.float64)), np_unit(k.astype(np.float64))
    losses = []
    for i in range(len(q)):
        logits = np.array([q[i] @ k[j] for j in range(len(k))]) / t
        losses.append(np.log(np.sum(np.exp(logits))) - logits[i])
    return np.mean(losses)


def test_distill_loss_known_answer():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    mask = (rng.random((3, 4)) < 0.5).astype(np.float32)
    mask[0, 0] = 1.0
    cos = np.sum(np_unit(pred) * np_unit(target), axis=-1)  # (3, 5), cls first
    want_patch = np.sum((2 - 2 * cos[:, 1:]) * mask) / mask.sum()
    want_cls = np.mean(2 - 2 * cos[:, 0])
    patch, cls = mmc.distill_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose([patch, cls], [want_patch, want_cls], rtol=1e-5)
    # Identical directions cost nothing; the target gets no gradient (it is the teacher's).
    same, _ = mmc.distill_loss(jnp.asarray(2 * target, jnp.float32), jnp.asarray(target, jnp.float32), mask)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    grad = jax.grad(lambda t: sum(mmc.distill_loss(jnp.asarray(pred, jnp.float32), t, mask)))(jnp.asarray(target))
    np.testing.assert_array_equal(grad, 0.0)


def test_info_nce_and_global_contrast_known_answers_on_one_and_eight_devices():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)
    loss, metrics = contrastive.info_nce(jnp.asarray(q), jnp.asarray(k), 0.2)
    np.testing.assert_allclose(loss, np_info_nce(q, k, 0.2), rtol=1e-5)
    hits = np.argmax(np_unit(q) @ np_unit(k).T, axis=1) == np.arange(8)
    np.testing.assert_allclose(metrics['contrastive_acc'], hits.mean())
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
    value_and_grad = lambda m: jax.jit(
        jax.value_and_grad(lambda a, b: contrastive.global_info_nce(a, b, 0.2, m)[0], argnums=(0, 1))
    )
    (one, grads_one), (eight, grads_eight) = value_and_grad(None)(q, k), value_and_grad(mesh)(q, k)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_eight, grads_one)
    # The cross-view form: views adjacent; view-1 queries against view-2 keys and back, averaged; keys detached.
    queries, keys = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 6)).astype(np.float32)
    want = 0.5 * (np_info_nce(queries[0::2], keys[1::2], 0.2) + np_info_nce(queries[1::2], keys[0::2], 0.2))
    got, _ = jax.jit(lambda a, b: mmc.global_contrast(a, b, 0.2, mesh))(queries, keys)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    key_grad = jax.grad(lambda b: mmc.global_contrast(jnp.asarray(queries), b, 0.2, None)[0])(jnp.asarray(keys))
    np.testing.assert_array_equal(key_grad, 0.0)


def test_ema_update_and_method_teacher_follows_params():
    teacher = {'a': np.array([1.0, 2.0]), 'b': {'c': np.array(4.0)}}
    student = {'a': np.array([3.0, 0.0]), 'b': {'c': np.array(0.0)}}
    out = mmc.ema_update(teacher, student, 0.75)
    np.testing.assert_allclose(out['a'], [1.5, 1.5])
    np.testing.assert_allclose(out['b']['c'], 3.0)
    method = mmc.Method(load_config(CONFIG, ['model.ema=(0.9, 0.5)', 'train.steps=10']))
    params = {'w': jnp.ones(3)}
    # Linear from 0.9 at step 0 to 0.5 at the last step: 0.7 halfway.
    got = method.update_extra(params, {'teacher': {'w': jnp.zeros(3)}}, jnp.asarray(5))
    np.testing.assert_allclose(got['teacher']['w'], 1 - 0.7, rtol=1e-6)


def test_head_batch_norm_uses_the_batch_statistics():
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(4, 5, 6)).astype(np.float32)
    norm = mmc_model.BatchStatNorm()
    params = norm.init(jax.random.key(0), x)
    want = (x - x.mean(axis=(0, 1))) / np.sqrt(x.var(axis=(0, 1)) + 1e-5)
    np.testing.assert_allclose(norm.apply(params, x), want, rtol=1e-4, atol=1e-5)


def test_masked_patches_are_hidden_from_the_student():
    model = mmc_model.make_model('micro/4', head_hidden=16, head_out=8)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16), np.float32)
    mask[:, [0, 5]] = 1.0
    params = jax.jit(lambda: mmc_model.init_params(model, jax.random.key(0), images, mask))()

    @jax.jit  # one compiled program: eager Flax is slow on CPU
    def both(x, m):
        return model.apply({'params': params}, x, m), model.apply({'params': params}, x, method=model.teacher)

    changed = images.copy()
    changed[:, :4, :4] += 5.0  # patch 0 (masked)
    (out, teacher), (out_changed, teacher_changed) = both(images, mask), both(changed, mask)
    for key in ('encoded', 'pixels', 'proj', 'pred'):
        np.testing.assert_allclose(out[key], out_changed[key], rtol=1e-5, atol=1e-5)
    # Unmasked, the same change is seen; the teacher is the encoder + projector of the student's weights.
    assert not np.allclose(teacher['encoded'], teacher_changed['encoded'], atol=1e-3)
    unmasked, _ = both(images, 0 * mask)
    np.testing.assert_allclose(teacher['proj'], unmasked['proj'], rtol=1e-5, atol=1e-6)


def test_prompt_segmentation_known_answers():
    # A 4x4 image of 2x2 patches: patch 0 full, patch 1 a quarter, patches 2 and 3 empty.
    image = np.zeros((1, 4, 4, 3), np.float32)
    image[0, :2, :2] = 1.0
    image[0, 0, 2] = 0.9
    np.testing.assert_allclose(seg.foreground_fraction(image, 2), [[1.0, 0.25, 0.0, 0.0]])
    np.testing.assert_array_equal(seg.choose_prompts(np.array([[0.2, 0.9, 0.9], [0.0, 0.1, 0.0]])), [1, 1])
    truth = np.array([[True, True, False, False], [False, False, False, False]])
    np.testing.assert_allclose(seg.iou(np.array([[True, False, True, False], [False] * 4]), truth), [1 / 3, 1.0])
    # Object patches along e1, background along e2 (orthogonal), one background patch at 45 degrees (cosine 0.707).
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    features = np.stack([e1 * 2, e1, e1 * 0.5, e2, e2 * 3, np_unit(e1 + e2), e2])[None]  # (1, 7, 3)
    truth = np.array([[True, True, True, False, False, False, False]])
    np.testing.assert_allclose(seg.cosine_to_prompt(features, np.array([1])), [[1, 1, 1, 0, 0, 2**-0.5, 0]])
    out = seg.evaluate(features, truth, np.array([1]), threshold=0.5)
    np.testing.assert_allclose(out['iou'], 3 / 4)  # the 45-degree patch is taken too
    # The best IoU is reached above the 45-degree cosine; ties go to the lowest such threshold of the sweep.
    assert out['best_iou'] == 1.0 and out['best_threshold'] == 0.75
    # sim_gap: object patches other than the prompt at 1, background mean (0 + 0 + 0.707 + 0) / 4.
    np.testing.assert_allclose(out['sim_gap'], 1 - 2**-0.5 / 4, rtol=1e-6)


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.num_sample=1', 'input.num_sample'),
        ('loss.temperature=0.0', 'loss.temperature'),
        ('loss.contrast_weight=-1.0', 'loss.contrast_weight'),
        ('model.ema=(0.9, 1.5)', 'model.ema'),
        ("eval.encoder='target'", 'eval.encoder'),
        ('masking.ratio=1.5', 'masking.ratio'),
        ('model.head_out=0', 'model.head_out'),
    ],
)
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(CONFIG, [override])


SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)",
              'eval.seg_images=32']  # fmt: skip


def run(workdir, *overrides):
    config = load_config(CONFIG, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('mmc') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2]
    terms = ('loss_rec', 'loss_distill_patch', 'loss_distill_cls', 'loss_contrast')
    for row, want in zip(rows, want_rows, strict=True):
        assert all(row[t] > 0 for t in terms)
        np.testing.assert_allclose(row['loss'], sum(row[t] for t in terms), rtol=1e-5)  # unit weights
        for key in ('loss', *terms):
            np.testing.assert_allclose(row[key], want[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('label/cls/knn', 'seg/iou', 'seg/best_iou'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
    assert -2.0 <= summary['final_eval/seg/sim_gap'] <= 2.0
