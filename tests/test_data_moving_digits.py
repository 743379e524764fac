"""moving_digits: files, determinism, atomic generation, and labels that match what moves in the video."""

import json
import math
import os

import numpy as np
import pytest

from jaxssl.data import decode, moving_digits


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory):
    # A session-wide cache folder shared by the data tests (ensure() returns at once once it is there).
    return moving_digits.ensure(str(tmp_path_factory.getbasetemp() / 'jaxssl-cache'), 'tiny')


@pytest.fixture(scope='module')
def metadata(tiny_root):
    return moving_digits.load_metadata(tiny_root)


def test_layout_lists_and_metadata(tiny_root, metadata):
    sizes = moving_digits.SIZES['tiny']
    for split, count in sizes.items():
        lines = open(os.path.join(tiny_root, f'{split}.csv')).read().splitlines()
        assert len(lines) == count == len(metadata['splits'][split])
        for line, clip in zip(lines, metadata['splits'][split], strict=True):
            assert line == f'{clip["path"]} 0 -1 {clip["label"]}'  # reference list format with a label column
            assert os.path.isfile(os.path.join(tiny_root, clip['path']))
    source = moving_digits.MovingDigitsSource(os.path.dirname(os.path.dirname(tiny_root)), 'tiny', 'val')
    assert len(source) == sizes['val'] and source.label_keys == ('label', 'direction', 'speed')
    first = metadata['splits']['val'][0]
    assert {k: source[0][k] for k in source.label_keys} == {k: first[k] for k in source.label_keys}


def test_clip_format(tiny_root, metadata):
    path = os.path.join(tiny_root, metadata['splits']['train'][0]['path'])
    assert decode.video_num_frames(path) == moving_digits.FRAMES == 32
    frames = decode.read_video_frames(path, range(32))
    assert frames.shape == (32, 64, 64, 3)
    assert np.median(frames) < 10 and frames.max() > 200  # bright digits on a black canvas


def test_val_uses_unseen_digit_instances(metadata):
    train = {i for clip in metadata['splits']['train'] for i in clip['digit_index']}
    val = {i for clip in metadata['splits']['val'] for i in clip['digit_index']}
    assert train and val and not train & val


def _centroid(frame: np.ndarray) -> np.ndarray:
    mass = frame[..., 0].astype(np.float64)
    ys, xs = np.indices(mass.shape)
    return np.array([(xs * mass).sum(), (ys * mass).sum()]) / mass.sum()


def test_labels_match_the_motion(tiny_root, metadata):
    """The digits' centroid moves in the labelled direction at the labelled speed (decoded from the mp4 files)."""
    clips = metadata['splits']['train'] + metadata['splits']['val']
    assert {c['direction'] for c in clips} == set(range(8)) and {c['speed'] for c in clips} == {0, 1}
    for clip in clips:
        frames = decode.read_video_frames(os.path.join(tiny_root, clip['path']), [0, 31])
        dx, dy = _centroid(frames[1]) - _centroid(frames[0])
        angle = math.degrees(math.atan2(-dy, dx)) % 360  # image y points down; directions count counter-clockwise
        error = min(abs(angle - 45 * clip['direction']), 360 - abs(angle - 45 * clip['direction']))
        assert error < 12, (clip['path'], angle, clip['direction'])
        distance = math.hypot(dx, dy)
        expected = moving_digits.SPEEDS[clip['speed']] * 31  # 15.5 px slow, 31 px fast
        assert abs(distance - expected) < 3, (clip['path'], distance, clip['speed'])


def test_generation_is_deterministic(tmp_path, tiny_root, metadata):
    other = tmp_path / 'again'
    moving_digits.generate(str(other), 'tiny', seed=0, show_progress=False)
    again = json.loads((other / 'metadata.json').read_text())
    assert again == metadata
    path = metadata['splits']['val'][3]['path']
    np.testing.assert_array_equal(
        decode.read_video_frames(str(other / path), range(32)),
        decode.read_video_frames(os.path.join(tiny_root, path), range(32)),
    )
    assert (other / 'train.csv').read_text() == open(os.path.join(tiny_root, 'train.csv')).read()


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    real_write = moving_digits.write_mp4
    calls = []

    def failing_write(path, frames, **kwargs):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        real_write(path, frames, **kwargs)

    monkeypatch.setattr(moving_digits, 'write_mp4', failing_write)
    with pytest.raises(KeyboardInterrupt):
        moving_digits.ensure(str(tmp_path), 'tiny')
    root = moving_digits.dataset_dir(str(tmp_path), 'tiny')
    assert not os.path.exists(root)
    assert os.listdir(os.path.dirname(root)) == []  # the temporary folder is gone too


# The zoomed / blurred variant (input.moving_digits_scale / input.moving_digits_blur): same clips and labels.


def test_sprite_variant_zooms_pads_blurs_and_keeps_the_peak():
    digits = np.zeros((2, 28, 28), np.uint8)
    digits[0, 10:18, 12:14] = 200  # a vertical bar
    digits[1, 4, 4] = 90  # one dot
    assert moving_digits.sprite_images(digits) is digits  # the default draws the digits as they are
    zoomed = moving_digits.sprite_images(digits, scale=2.0)
    assert zoomed.shape == (2, 56, 56)
    assert zoomed[0, 21:35, 25:27].min() == 200 and zoomed[0, :19].max() == 0  # the bar at twice the coordinates
    blurred = moving_digits.sprite_images(digits, scale=2.0, blur=2.0)
    assert blurred.shape == (2, 56 + 2 * 6, 56 + 2 * 6)  # padded by ceil(3 * sigma) on each side
    assert [blurred[0].max(), blurred[1].max()] == [200, 90]  # each digit keeps its peak brightness
    assert blurred[0, :, 0].max() == 0 and blurred[0, 6 + 16, 6 + 20] > 0  # smooth tails, not cut off square
    ys, xs = np.nonzero(blurred[0] == 200)
    assert abs(ys.mean() - (6 + 27.5)) < 1 and abs(xs.mean() - (6 + 25.5)) < 1  # the bar stays where it was


def test_a_sprite_larger_than_its_room_travels_a_path_centred_on_the_canvas():
    assert moving_digits._start_range(1.0) == (0.0, 36 - 31.0)  # the default digits stay inside the canvas
    for v in (1.0, -1.0, 0.5):
        low, high = moving_digits._start_range(v, sprite=56)
        assert low == high  # no room to spare: one start
        middle = low + v * 31 / 2 + 56 / 2  # the sprite's centre half-way along the path
        assert middle == moving_digits.CANVAS / 2


def test_render_cuts_a_sprite_that_leaves_the_canvas():
    sprite = np.full((1, 10, 10), 255, np.uint8)
    spec = {'velocity': [1.0, 0.0], 'digit_index': [0], 'start_xy': [[-5.0, -3.0]]}
    frames = moving_digits.render_clip(spec, sprite)[..., 0]
    assert frames.shape == (32, 64, 64)
    assert frames[0].sum() == 255 * 5 * 7 and frames[0, :7, :5].min() == 255  # the part inside, at the corner
    assert frames[31].sum() == 255 * 10 * 7 and frames[31, :7, 26:36].min() == 255


def test_variant_has_its_own_folder_and_bad_values_fail_with_the_key(tmp_path):
    from jaxssl import data
    from jaxssl.config import ConfigError, load_config

    assert moving_digits.dataset_dir('/c', 'tiny').endswith('moving_digits/tiny-v1')
    assert moving_digits.dataset_dir('/c', 'tiny', 2.0, 8.0).endswith('moving_digits/tiny-v1-x2-blur8')
    for key, value in (('moving_digits_scale', 5.0), ('moving_digits_blur', -1.0)):
        config = load_config('configs/videomae_v2.py:runlocal', [f'input.cache_dir={tmp_path}'])
        config.input[key] = value
        with pytest.raises(ConfigError, match=f'input.{key}'):
            data.check_input_config(config)


def test_direction_subset_draws_only_those_directions_into_its_own_folder(tmp_path):
    from jaxssl import data
    from jaxssl.config import ConfigError, load_config

    assert moving_digits.dataset_dir('/c', 'tiny', directions=(0, 1, 7)).endswith('moving_digits/tiny-v1-dir017')
    # All 8 directions (in any order) are the default set, in the default folder.
    root = moving_digits.ensure(str(tmp_path), 'tiny', directions=(7, 1, 0))
    assert root.endswith('tiny-v1-dir017')
    assert moving_digits.ensure(str(tmp_path), 'tiny', directions=tuple(range(8))).endswith('tiny-v1')
    metadata = moving_digits.load_metadata(root)
    clips = [clip for split in metadata['splits'].values() for clip in split]
    assert {clip['direction'] for clip in clips} == {0, 1, 7} and metadata['direction_set'] == [0, 1, 7]
    source = moving_digits.MovingDigitsSource(str(tmp_path), 'tiny', 'train', directions=(0, 1, 7))
    assert {record['direction'] for record in source._records} <= {0, 1, 7}
    for bad in ((0, 8), (1, 1), (True,)):
        config = load_config('configs/videomae_v2.py:runlocal', [f'input.cache_dir={tmp_path}'])
        with config.unlocked():
            config.input.moving_digits_directions = bad
        with pytest.raises(ConfigError, match=r'input\.moving_digits_directions'):
            data.check_input_config(config)
