"""Mixup / CutMix / label smoothing / soft-target cross-entropy: known answers and timm's batch-mode semantics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import mixup


def timm_mix(x, target, lam, use_cutmix, cy, cx, num_classes, smoothing):
    """A transcription of timm's Mixup(mode='batch') for a given lambda draw and box centre (x: B, T, H, W, C)."""
    x = x.copy()
    if use_cutmix:
        h, w = x.shape[2:4]
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
        xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
        x[:, :, yl:yh, xl:xh] = x[::-1][:, :, yl:yh, xl:xh]
        lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
    else:
        x = x * lam + x[::-1] * (1.0 - lam)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = np.full((len(target), num_classes), off)
    y1[np.arange(len(target)), target] = on
    y2 = y1[::-1]
    return x, y1 * lam + y2 * (1 - lam), lam


def test_label_smoothing_known_answer():
    got = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
    np.testing.assert_allclose(got, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]], atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ('lam', 'cy', 'cx', 'box', 'corrected'),
    [
        (0.64, 5, 5, (2, 8, 2, 8), 0.64),  # side int(10 * 0.6) = 6, centred: no clipping
        (0.64, 0, 5, (0, 3, 2, 8), 1 - 18 / 100),  # clipped at the top: 3 x 6
        (0.55, 9, 9, (6, 10, 6, 10), 1 - 16 / 100),  # side int(6.7) = 6, halves of 3: 4 x 4 after clipping
        (1.0, 4, 4, (4, 4, 4, 4), 1.0),  # empty box
    ],
)
def test_cutmix_box_known_answers(lam, cy, cx, box, corrected):
    got, lam_box = mixup.cutmix_box(jnp.float32(lam), jnp.int32(cy), jnp.int32(cx), 10, 10)
    assert tuple(int(v) for v in got) == box
    assert float(lam_box) == pytest.approx(corrected, abs=1e-6)


def test_mirror_within_groups():
    x = jnp.arange(8)
    np.testing.assert_array_equal(mixup.mirror(x), [7, 6, 5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(mixup.mirror(x, groups=2), [3, 2, 1, 0, 7, 6, 5, 4])
    with pytest.raises(ValueError, match='mixing groups'):
        mixup.mirror(x, groups=3)


@pytest.mark.parametrize('use_cutmix', [False, True])
def test_apply_mix_matches_timm(use_cutmix):
    rng = np.random.default_rng(0)
    video = rng.normal(size=(4, 2, 10, 12, 3)).astype(np.float32)
    labels = np.array([0, 3, 1, 2])
    lam, cy, cx = 0.7, 3, 9
    want_x, want_y, want_lam = timm_mix(video, labels, lam, use_cutmix, cy, cx, 5, 0.1)
    box, lam_box = mixup.cutmix_box(jnp.float32(lam), jnp.int32(cy), jnp.int32(cx), 10, 12)
    params = {
        'lam': lam_box if use_cutmix else jnp.float32(lam),
        'cutmix': jnp.asarray(use_cutmix),
        'box': jnp.stack(box),
    }
    got_x, got_y = mixup.apply_mix(jnp.asarray(video), jnp.asarray(labels), params, 5, 0.1)
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=1e-6, atol=1e-6)
    assert float(params['lam']) == pytest.approx(want_lam, abs=1e-6)
    np.testing.assert_allclose(np.asarray(got_y).sum(-1), 1.0, atol=1e-6)


def test_draw_mix_switches_and_disables():
    keys = jax.random.split(jax.random.key(0), 256)
    draw = jax.jit(jax.vmap(lambda k: mixup.draw_mix(k, mixup.MixConfig(0.8, 1.0, 1.0, 0.5, 0.1), 16, 16)))
    out = jax.device_get(draw(keys))
    assert 0.4 < out['cutmix'].mean() < 0.6  # switch prob 0.5
    assert ((out['lam'] >= 0) & (out['lam'] <= 1)).all()
    # Mixup lambdas ~ Beta(0.8, 0.8): mean 0.5, variance 1 / 10.4.
    lam_mixup = out['lam'][~out['cutmix']]
    assert abs(lam_mixup.mean() - 0.5) < 0.07 and abs(lam_mixup.var() - 1 / 10.4) < 0.03
    # CutMix lambdas are exactly 1 - box area / image area.
    y0, y1, x0, x1 = out['box'][out['cutmix']].T
    np.testing.assert_allclose(out['lam'][out['cutmix']], 1 - (y1 - y0) * (x1 - x0) / 256, atol=1e-6)
    never = jax.device_get(mixup.draw_mix(keys[0], mixup.MixConfig(prob=0.0), 16, 16))
    assert never['lam'] == 1 and not never['cutmix']
    off = jax.device_get(mixup.draw_mix(keys[0], mixup.MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0), 16, 16))
    assert off['lam'] == 1 and not off['cutmix']
    only_cut = jax.device_get(mixup.draw_mix(keys[1], mixup.MixConfig(mixup_alpha=0.0), 16, 16))
    assert only_cut['cutmix']


def test_soft_cross_entropy_known_answer():
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax [1/4, 3/4] and [1/2, 1/2]
    targets = jnp.array([[0.0, 1.0], [0.5, 0.5]])
    want = (-math.log(0.75) + -math.log(0.5)) / 2
    assert float(mixup.soft_cross_entropy(logits, targets)) == pytest.approx(want, rel=1e-6)
    # With smoothing and no mixing it is timm's LabelSmoothingCrossEntropy: (1 - s) * nll + s * mean(-log p).
    labels = jnp.array([1, 0])
    smoothed = mixup.smooth_one_hot(labels, 2, 0.1)
    log_p = np.log([[0.25, 0.75], [0.5, 0.5]])
    nll = -log_p[[0, 1], [1, 0]]
    want = np.mean(0.9 * nll + 0.1 * -log_p.mean(-1))
    assert float(mixup.soft_cross_entropy(logits, smoothed)) == pytest.approx(want, rel=1e-6)
