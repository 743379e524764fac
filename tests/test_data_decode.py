"""Decoding: the reference's frame sampler, seek-vs-sequential equality, frame identity, broken files, frame folders."""

import numpy as np
import pytest

from jaxssl.data import decode
from jaxssl.data.encode import write_mp4

NUM_FRAMES = 45
LEVEL = 5  # frame t is filled with grey level LEVEL * t, which survives compression well enough to identify t


def numbered_frames(n: int = NUM_FRAMES, height: int = 32, width: int = 48) -> np.ndarray:
    frames = np.repeat((np.arange(n, dtype=np.uint8) * LEVEL)[:, None, None, None], 3, axis=-1)
    frames = np.broadcast_to(frames, (n, height, width, 3)).copy()
    for t in range(n):  # a moving square, so frames also differ in structure and B-frames have motion to predict
        frames[t, 8:16, t % 40 : t % 40 + 8] = 255
    return frames


def frame_number(frame: np.ndarray) -> int:
    return round(float(np.median(frame[20:, :, 0])) / LEVEL)


@pytest.fixture(scope='module')
def video(tmp_path_factory):
    # Keyframes every 5 frames and 2 B-frames: seeking lands on real keyframes and decode order != display order.
    path = tmp_path_factory.mktemp('decode') / 'numbered.mp4'
    write_mp4(path, numbered_frames(), gop=5, bframes=2)
    return str(path)


@pytest.fixture(scope='module')
def sequential(video):
    return decode.read_video_frames(video, range(NUM_FRAMES), seek=False)


def test_clip_indices_long_video_strides_from_a_random_start():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(400):
        idx = decode.clip_indices(100, 16, 4, rng)
        assert np.array_equal(np.diff(idx), np.full(15, 4))
        starts.add(int(idx[0]))
    # start ~ U{0, ..., 100 - 64}, as the reference's randint(num_frames - skip_length + 1)
    assert min(starts) == 0 and max(starts) == 36 and len(starts) == 37


def test_clip_indices_short_video_repeats_last_frame_on_the_grid():
    rng = np.random.default_rng(0)
    assert decode.clip_indices(10, 8, 4, rng).tolist() == [0, 4, 8, 8, 8, 8, 8, 8]
    assert decode.clip_indices(9, 8, 4, rng).tolist() == [0, 4, 8, 8, 8, 8, 8, 8]
    assert decode.clip_indices(8, 8, 4, rng).tolist() == [0, 4, 4, 4, 4, 4, 4, 4]
    assert decode.clip_indices(1, 4, 2, rng).tolist() == [0, 0, 0, 0]
    assert decode.clip_indices(32, 8, 4, rng).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]  # exactly one start
    with pytest.raises(decode.DecodeError):
        decode.clip_indices(0, 8, 4, rng)


def test_sequential_decode_returns_frames_in_display_order(video, sequential):
    assert decode.video_num_frames(video) == NUM_FRAMES
    assert sequential.shape == (NUM_FRAMES, 32, 48, 3) and sequential.dtype == np.uint8
    assert [frame_number(f) for f in sequential] == list(range(NUM_FRAMES))


@pytest.mark.parametrize(
    'indices',
    [[0], [4], [5], [6], [13, 14, 15], [44], [3, 20, 41, 41, 41], [30, 2, 17], list(range(7, 45, 4))],
)
def test_seeking_matches_sequential_decode(video, sequential, indices):
    frames = decode.read_video_frames(video, indices)
    np.testing.assert_array_equal(frames, sequential[indices])


def test_seeking_from_bytes_and_with_an_index_function(video, sequential):
    with open(video, 'rb') as f:
        data = f.read()
    seen = []

    def pick(n):
        seen.append(n)
        return [n - 1, 12, 12]

    np.testing.assert_array_equal(decode.read_video_frames(data, pick), sequential[[44, 12, 12]])
    assert seen == [NUM_FRAMES]


def test_frames_past_the_end_raise(video):
    with pytest.raises(decode.DecodeError, match=r'before frame 45'):
        decode.read_video_frames(video, [40, 45])


@pytest.fixture(scope='module')
def broken_files(tmp_path_factory, video):
    folder = tmp_path_factory.mktemp('broken')
    with open(video, 'rb') as f:
        data = f.read()
    (folder / 'truncated.mp4').write_bytes(data[: len(data) // 2])
    (folder / 'garbage.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 8)
    (folder / 'empty.mp4').write_bytes(b'')
    return {
        'truncated': str(folder / 'truncated.mp4'),
        'garbage': str(folder / 'garbage.mp4'),
        'empty': str(folder / 'empty.mp4'),
        'missing': str(folder / 'missing.mp4'),
        'bytes': b'not a video at all' * 50,
    }


@pytest.mark.parametrize('which', ['truncated', 'garbage', 'empty', 'missing', 'bytes'])
def test_broken_videos_raise_decode_error(broken_files, which):
    with pytest.raises(decode.DecodeError):
        decode.read_video_frames(broken_files[which], [0, 1, 2])


def test_frame_folder_with_template(tmp_path):
    from PIL import Image

    frames = numbered_frames(6)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f'frame-{i + 1:03d}.png')  # 1-based, as extracted folders often are
    out = decode.read_frame_folder(str(tmp_path), [1, 3, 6, 6], template='frame-{:03d}.png')
    np.testing.assert_array_equal(out, frames[[0, 2, 5, 5]])
    with pytest.raises(decode.DecodeError, match=r'frame-007.png'):
        decode.read_frame_folder(str(tmp_path), [5, 7], template='frame-{:03d}.png')
