"""Pretraining augmentation: GroupMultiScaleCrop's sizes and 13 offsets against hand-computed values, resize, norm."""

import numpy as np
import pytest

from jaxssl.data import transforms


def test_crop_sizes_known_answer():
    # 240x320 frame, input 224: sides int(240 * [1, .875, .75, .66]) = 240, 210, 180, 158 (none within 2 of 224);
    # (h, w) pairs whose scale indices differ by at most 1, in the reference's order (h index outer).
    assert transforms.multiscale_crop_sizes(240, 320, 224) == [
        (240, 240), (240, 210),
        (210, 240), (210, 210), (210, 180),
        (180, 210), (180, 180), (180, 158),
        (158, 180), (158, 158),
    ]  # fmt: skip


def test_crop_sizes_snap_to_the_input_size():
    # Shorter side 258: int(258 * .875) = 225 is within 2 of 224 and snaps to it; 256 * .875 = 224 exactly.
    sides = {h for h, _ in transforms.multiscale_crop_sizes(258, 400, 224)}
    assert sides == {258, 224, 193, 170}
    sides = {h for h, _ in transforms.multiscale_crop_sizes(256, 340, 224)}
    assert sides == {256, 224, 192, 168}
    # Small inputs: 64 -> 64, 56, 48, 42; 32 +- 2 snaps nothing here.
    assert {h for h, _ in transforms.multiscale_crop_sizes(64, 64, 32)} == {64, 56, 48, 42}


def test_fixed_offsets_known_answer():
    # 240x320 frame, crop h=180, w=210: quarter steps y (240-180)//4 = 15, x (320-210)//4 = 27.
    assert transforms.fixed_crop_offsets(240, 320, 180, 210) == [
        (0, 0), (0, 108), (60, 0), (60, 108), (30, 54),        # corners, centre
        (30, 0), (30, 108), (60, 54), (0, 54),                 # edge midpoints
        (15, 27), (15, 81), (45, 27), (45, 81),                # quarter points
    ]  # fmt: skip
    assert len(transforms.fixed_crop_offsets(240, 320, 180, 210, more_fix_crop=False)) == 5


def test_sampled_crops_cover_exactly_the_reference_choices():
    rng = np.random.default_rng(0)
    draws = {transforms.sample_multiscale_crop(240, 320, 224, rng) for _ in range(6000)}
    expected = {
        (y, x, h, w)
        for h, w in transforms.multiscale_crop_sizes(240, 320, 224)
        for y, x in transforms.fixed_crop_offsets(240, 320, h, w)
    }
    assert draws == expected  # every one of the 10 sizes x 13 offsets (a few coincide), and nothing else


def test_normalize_known_values():
    frame = np.zeros((1, 1, 1, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 255, 0, 51
    out = transforms.normalize(frame)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out.ravel(), [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225], rtol=1e-6
    )


def test_resize_is_bilinear_and_keeps_constants():
    frames = np.full((2, 40, 60, 3), 77, np.uint8)
    out = transforms.resize_frames(frames, 24, 24)
    assert out.shape == (2, 24, 24, 3) and out.dtype == np.uint8 and np.all(out == 77)
    ramp = np.broadcast_to(np.linspace(0, 255, 60).astype(np.uint8)[None, None, :, None], (1, 40, 60, 3))
    row = transforms.resize_frames(ramp, 20, 30)[0, 10, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] < 10 and row[-1] > 245


@pytest.mark.parametrize('shape', [(8, 64, 64, 3), (4, 120, 160, 3)])
def test_pretrain_view_shape_and_range(shape):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, shape, dtype=np.uint8)
    view = transforms.pretrain_view(frames, 32, rng)
    assert view.shape == (shape[0], 32, 32, 3) and view.dtype == np.float32
    lo = (0 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
    hi = (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
    assert np.all(view >= lo - 1e-5) and np.all(view <= hi + 1e-5)


def test_pretrain_view_crops_the_same_box_in_every_frame():
    # Frame t holds value t everywhere except a bright marker: the marker lands at the same place in every frame.
    frames = np.repeat(np.arange(4, dtype=np.uint8)[:, None, None, None], 3, -1) * np.ones((4, 64, 64, 3), np.uint8)
    frames[:, 20:30, 25:35] = 255
    view = transforms.pretrain_view(frames, 32, np.random.default_rng(3))
    bright = view[..., 0] > 1.0
    assert bright.any() and all(np.array_equal(bright[0], b) for b in bright)
