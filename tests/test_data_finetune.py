"""Fine-tuning and test-time transforms: known answers for resizing, sampling, crops, erasing and RandAugment."""

import numpy as np
import pytest

from jaxssl.data import finetune, randaugment


def test_bilinear_resize_known_answer():
    # Half-pixel centres (torch align_corners=False / OpenCV INTER_LINEAR).
    up = finetune.bilinear_resize(np.array([[[[0.0], [10.0]]]]), 1, 4)  # source x = -0.25, 0.25, 0.75, 1.25
    np.testing.assert_allclose(up.ravel(), [0, 2.5, 7.5, 10])
    down = finetune.bilinear_resize(np.array([[[[0.0], [10.0], [20.0], [30.0]]]]), 1, 2)  # x = 0.5, 2.5
    np.testing.assert_allclose(down.ravel(), [5, 25])


def test_random_resized_crop_box_stays_in_range():
    rng = np.random.default_rng(0)
    for _ in range(300):
        y, x, h, w = finetune.random_resized_crop_box(120, 160, rng)
        assert 0 <= y and y + h <= 120 and 0 <= x and x + w <= 160
        assert 0.08 * 0.9 <= h * w / (120 * 160) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_box_falls_back_to_centre():
    # An unreachable area (scale > 1) never fits: the fallback is the centred crop with aspect clamped to 4/3.
    assert finetune.random_resized_crop_box(100, 300, np.random.default_rng(0), scale=(2.0, 3.0)) == (0, 83, 100, 133)
    assert finetune.random_resized_crop_box(100, 110, np.random.default_rng(0), scale=(2.0, 3.0)) == (0, 0, 100, 110)


def test_random_erasing_one_box_for_all_frames():
    frames = np.full((3, 40, 40, 3), 7.0, np.float32)
    out = finetune.random_erasing(frames, np.random.default_rng(0), prob=1.0)
    changed = np.any(out != 7.0, axis=-1)
    assert changed[0].any() and all(np.array_equal(changed[0], c) for c in changed)
    ys, xs = np.nonzero(changed[0])
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert changed[0].sum() == area and 0.02 * 1600 * 0.8 <= area <= 1600 / 3 * 1.2  # a filled rectangle
    assert not np.array_equal(out[0][changed[0]], out[1][changed[1]])  # fresh noise per frame
    assert np.array_equal(finetune.random_erasing(frames, np.random.default_rng(0), prob=0.0), frames)


def test_parse_policy():
    assert randaugment.parse_policy('rand-m7-n4-mstd0.5-inc1') == dict(magnitude=7.0, num_ops=4, magnitude_std=0.5)
    with pytest.raises(ValueError):
        randaugment.parse_policy('rand-m7-inc0')


def test_rand_augment_is_deterministic_and_shared_across_frames():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    clip = np.stack([frame, frame, frame])
    a = randaugment.rand_augment(clip, np.random.default_rng(5))
    b = randaugment.rand_augment(clip, np.random.default_rng(5))
    assert a.shape == clip.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(a[0], f) for f in a)  # identical frames stay identical: one op sequence per clip
    changed = sum(not np.array_equal(randaugment.rand_augment(clip, np.random.default_rng(s)), clip) for s in range(20))
    assert changed >= 15  # P(no op applied) = 0.5 ** 4


@pytest.mark.parametrize('name', randaugment.INCREASING_OPS)
def test_every_rand_augment_op_runs(name):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    out = randaugment._op(name, 7.0, image.size, np.random.default_rng(0))(image)
    assert out.size == image.size and out.mode == 'RGB'


def test_finetune_view_shape():
    clip = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    view = finetune.finetune_view(clip, 32, np.random.default_rng(0))
    assert view.shape == (4, 32, 32, 3) and view.dtype == np.float32 and np.isfinite(view).all()


def test_finetune_frame_indices_known_answers():
    # Long video: window of 16 frames ending at the (validation) centre (16 + 100) // 2 = 58, 4 points by linspace.
    assert finetune.finetune_frame_indices(100, 4, 4, None).tolist() == [42, 47, 52, 57]
    # Short video (12 <= 16): every 4th frame by linspace(0, 12, 3) = 0, 6, 12 -> clipped to 11, then padded.
    assert finetune.finetune_frame_indices(12, 4, 4, None).tolist() == [0, 6, 11, 11]
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = finetune.finetune_frame_indices(100, 4, 4, rng)
        assert idx[0] >= 0 and idx[-1] <= 98 and idx[-1] - idx[0] == 15


def test_test_views_known_positions():
    # 10 frames of 40x80, pixel value = frame number * 20 + column // 4 (R channel), so views reveal where they are.
    t, h, w = 10, 40, 80
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = (np.arange(t)[:, None, None] * 20 + np.arange(w)[None, None, :] // 4).astype(np.uint8)
    idx = finetune.test_frame_indices(t, 4, stride=1)
    assert idx.tolist() == list(range(10))
    views = finetune.test_views(frames[idx], 40, clip_len=4, num_clips=3, num_crops=3)
    assert views.shape == (9, 4, 40, 40, 3)
    raw = views[..., 0] * 0.229 + 0.485  # un-normalise the red channel back to [0, 1]
    value = np.round(raw * 255).astype(int)
    # Clip starts int(c * (10 - 4) / 2) = 0, 3, 6; crop starts int(k * (80 - 40) / 2) = 0, 20, 40 along the width.
    for c, t0 in enumerate([0, 3, 6]):
        for k, x0 in enumerate([0, 20, 40]):
            v = value[c * 3 + k]
            assert v[0, 0, 0] == t0 * 20 + x0 // 4, (c, k)
            assert v[3, 0, 0] == (t0 + 3) * 20 + x0 // 4


def test_test_frame_indices_pads_short_videos():
    assert finetune.test_frame_indices(10, 6, stride=4).tolist() == [0, 4, 8, 8, 8, 8]
    assert finetune.test_frame_indices(20, 3, stride=4).tolist() == [0, 4, 8, 12, 16]
