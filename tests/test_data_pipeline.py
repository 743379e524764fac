"""The Grain pretraining pipeline: batch layout, determinism, sharding, exact resume (with and without workers),
skipped-file counting."""

import logging
import os

import numpy as np
import pytest

from jaxssl.config import load_config
from jaxssl.data import make_pretrain_dataset, moving_digits, skipped_files
from jaxssl.data.sources import ListSource
from jaxssl.methods import videomae

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'videomae_v2.py')


def get_config(arg: str = ''):
    return load_config(f'{CONFIG}:{arg}' if arg else CONFIG)


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory):
    return moving_digits.ensure(str(tmp_path_factory.getbasetemp() / 'jaxssl-cache'), 'tiny')


class IdSource:
    """Wraps a source so that each clip's label is its own index: batches then show which clips they hold."""

    def __init__(self, source):
        self.source, self.label_keys = source, ('label',)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {**self.source[index], 'label': index}


def make_config(tiny_root, **input_overrides):
    config = get_config('runlocal')
    config.input.cache_dir = os.path.dirname(os.path.dirname(tiny_root))
    config.input.moving_digits_size = 'tiny'
    config.input.global_batch = 4
    for key, value in input_overrides.items():
        config.input[key] = value
    return config


def id_source(tiny_root, list_file='train.csv'):
    return IdSource(ListSource(os.path.join(tiny_root, list_file), tiny_root))


def take(dataset_or_iterator, n):
    it = iter(dataset_or_iterator)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_layout_with_masks_and_views(tiny_root):
    config = make_config(tiny_root, num_sample=2)
    transform = lambda sample, rng: {**sample, **videomae.sample_masks(config, rng)}
    batch = take(make_pretrain_dataset(config, seed=0, sample_transform=transform), 1)[0]
    b = 4 * 2  # global_batch x num_sample, one process
    assert batch['video'].shape == (b, 8, 32, 32, 3) and batch['video'].dtype == np.float32
    for key in ('label', 'direction', 'speed'):
        assert batch[key].shape == (b,) and batch[key].dtype == np.int32
    assert batch['visible_idx'].shape == (b, 8) and batch['target_idx'].shape == (b, 32)
    assert batch['target_weight'].dtype == np.float32
    assert sorted(batch) == ['direction', 'label', 'speed', 'target_idx', 'target_weight', 'video', 'visible_idx']
    # The views of a clip are adjacent; each view has its own crop and its own masks.
    ids = take(make_pretrain_dataset(config, seed=0, source=id_source(tiny_root)), 1)[0]['label']
    assert np.array_equal(ids[0::2], ids[1::2]) and len(set(ids[0::2])) == 4
    assert any(not np.array_equal(batch['visible_idx'][i], batch['visible_idx'][i + 1]) for i in range(0, b, 2))


def test_deterministic_for_a_seed(tiny_root):
    config = make_config(tiny_root)
    first = take(make_pretrain_dataset(config, seed=0), 3)
    assert_same_batches(first, take(make_pretrain_dataset(config, seed=0), 3))
    other = take(make_pretrain_dataset(config, seed=1), 1)[0]
    assert not np.array_equal(first[0]['video'], other['video'])


def test_processes_read_disjoint_shards_and_epochs_cover_them(tiny_root):
    config = make_config(tiny_root)  # 32 train clips, 2 processes x 2 clips per batch, one epoch = 8 batches each
    seen = []
    for process in range(2):
        ds = make_pretrain_dataset(
            config, seed=0, process_index=process, process_count=2, num_epochs=1, source=id_source(tiny_root)
        )
        ids = np.concatenate([b['label'] for b in ds])
        assert len(ids) == 16 and len(set(ids)) == 16  # each clip of the shard exactly once per epoch
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(32))


def test_global_batch_must_divide_over_processes(tiny_root):
    with pytest.raises(ValueError, match=r'input.global_batch=4 must be divisible by the 3'):
        make_pretrain_dataset(make_config(tiny_root), seed=0, process_count=3)


def test_resume_is_exact_without_workers(tiny_root):
    ds = make_pretrain_dataset(make_config(tiny_root), seed=0)
    it = iter(ds)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    resumed = iter(make_pretrain_dataset(make_config(tiny_root), seed=0))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), expected)


def test_workers_give_the_same_stream_and_resume_exactly(tiny_root):
    config = make_config(tiny_root, num_sample=2)
    transform = lambda sample, rng: {**sample, **videomae.sample_masks(config, rng)}  # must reach the workers
    in_process = take(make_pretrain_dataset(config, seed=0, sample_transform=transform), 5)
    config.input.num_workers = 2
    it = iter(make_pretrain_dataset(config, seed=0, sample_transform=transform))
    assert_same_batches(take(it, 2), in_process[:2])
    state = it.get_state()
    resumed = iter(make_pretrain_dataset(config, seed=0, sample_transform=transform))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), in_process[2:])
    assert_same_batches(take(it, 3), in_process[2:])


@pytest.fixture(scope='module')
def broken_list(tiny_root, tmp_path_factory):
    """A list of 12 good moving_digits clips plus a truncated, a garbage and a missing file (labels = line index)."""
    folder = tmp_path_factory.mktemp('broken-list')
    good = open(os.path.join(tiny_root, 'train.csv')).read().splitlines()[:12]
    data = open(os.path.join(tiny_root, good[0].split()[0]), 'rb').read()
    (folder / 'truncated.mp4').write_bytes(data[: len(data) // 3])
    (folder / 'garbage.mp4').write_bytes(os.urandom(3000))
    lines = [f'{os.path.join(tiny_root, line.split()[0])} 0 -1' for line in good]
    lines[3:3] = [f'{folder}/truncated.mp4 0 -1', f'{folder}/garbage.mp4 0 -1', f'{folder}/missing.mp4 0 -1']
    path = folder / 'list.txt'
    path.write_text(''.join(f'{line} {i}\n' for i, line in enumerate(lines)))
    return str(path)


def test_broken_files_are_skipped_replaced_and_counted(tiny_root, broken_list, caplog, monkeypatch):
    from jaxssl.data import pipeline

    # The log is rate-limited per process (first 20 failures, then every 100th); earlier tests in the session may
    # have used up the first 20, so start this test's process count from zero.
    monkeypatch.setattr(pipeline, '_failures_logged', 0)
    config = make_config(tiny_root, dataset='list', list_file=broken_list, data_root='')
    before = skipped_files()
    with caplog.at_level(logging.WARNING, logger='jaxssl.data.pipeline'):
        batches = list(make_pretrain_dataset(config, seed=0, num_epochs=2))
    warnings = [r for r in caplog.records if 'skipping unreadable clip' in r.getMessage()]
    labels = np.concatenate([b['label'] for b in batches])
    assert len(labels) == 28  # 2 epochs x 15 clips, in batches of 4: nothing crashed, no batch was dropped
    assert not {3, 4, 5} & set(labels.tolist())  # the broken files' labels never appear
    assert skipped_files() - before == len(warnings) >= 6  # each broken file at least once per epoch
    assert {os.path.basename(r.args[0]) for r in warnings} == {'truncated.mp4', 'garbage.mp4', 'missing.mp4'}
    # With workers the same files are skipped in the worker processes, and counted in this one.
    config.input.num_workers = 2
    before = skipped_files()
    with_workers = list(make_pretrain_dataset(config, seed=0, num_epochs=2))
    assert_same_batches(with_workers, batches)
    assert skipped_files() - before == len(warnings)


def test_frame_folder_list(tmp_path, tiny_root):
    from PIL import Image

    from jaxssl.data import decode

    video = os.path.join(tiny_root, 'val/00000.mp4')
    frames = decode.read_video_frames(video, range(20))
    for clip in range(2):
        (tmp_path / f'clip{clip}').mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp_path / f'clip{clip}' / f'img_{i + 1:05d}.jpg')
    (tmp_path / 'list.txt').write_text('clip0 1 20 0\nclip1 1 20 1\n')
    config = make_config(tiny_root, dataset='list', list_file=str(tmp_path / 'list.txt'), data_root=str(tmp_path))
    config.input.global_batch = 2
    batch = take(make_pretrain_dataset(config, seed=0), 1)[0]
    assert batch['video'].shape == (2, 8, 32, 32, 3) and sorted(batch['label'].tolist()) == [0, 1]
