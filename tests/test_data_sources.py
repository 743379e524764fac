"""Clip sources (list files, class folders, TFDS array_record) and config.input validation."""

import os
import sys

import numpy as np
import pytest

from jaxssl.config import ConfigError, load_config
from jaxssl.data import check_input_config, make_source, sources
from jaxssl.data.encode import write_mp4
from jaxssl.data.pipeline import load_clip

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'videomae_v2.py')


def get_config(arg: str = ''):
    return load_config(f'{CONFIG}:{arg}' if arg else CONFIG)


def write_list(tmp_path, text: str) -> str:
    path = tmp_path / 'list.txt'
    path.write_text(text)
    return str(path)


def test_list_pretrain_format(tmp_path):
    records = sources.parse_list_file(
        write_list(tmp_path, 'k400/a.mp4 0 -1\nssv2/frames/17 1 48\n\n# comment\n/abs/b.mp4 0 -1\n'), '/data'
    )
    assert [(r['video'], r['kind'], r['start'], r['total']) for r in records] == [
        ('/data/k400/a.mp4', 'file', 0, -1),
        ('/data/ssv2/frames/17', 'frames', 1, 48),
        ('/abs/b.mp4', 'file', 0, -1),
    ]
    assert all('label' not in r for r in records)


def test_list_label_formats(tmp_path):
    two = sources.parse_list_file(write_list(tmp_path, 'a.mp4 3\nmy clip 2.mp4 7\n'))  # 'path label', spaces ok
    assert [(r['video'], r['label']) for r in two] == [('a.mp4', 3), ('my clip 2.mp4', 7)]
    four = sources.parse_list_file(write_list(tmp_path, 'a.mp4 0 -1 5\nf/1 0 30 2\n'))
    assert [(r['kind'], r['label']) for r in four] == [('file', 5), ('frames', 2)]
    raw = sources.parse_list_file(write_list(tmp_path, 'f/1 30 4\n'), columns='path,total,label')
    assert (raw[0]['start'], raw[0]['total'], raw[0]['label']) == (1, 30, 4)  # RawFrameClsDataset: start_idx 1


def test_list_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match=r'list.txt:2: label column'):
        sources.parse_list_file(write_list(tmp_path, 'a.mp4 0 -1 5\nb.mp4 0 -1\n'))
    with pytest.raises(ValueError, match=r'list.txt:1: expected columns'):
        sources.parse_list_file(write_list(tmp_path, 'a.mp4 0\n'), columns='path,start,total,label')
    with pytest.raises(ValueError, match=r'no samples'):
        sources.parse_list_file(write_list(tmp_path, '\n'))


@pytest.fixture(scope='module')
def clip_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp('clip') / 'c.mp4'
    frames = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    write_mp4(path, frames)
    return path.read_bytes()


def test_folder_source_labels_from_sorted_class_folders(tmp_path, clip_bytes):
    for cls, names in {'walk': ['b.mp4', 'a.mp4'], 'jump': ['x.avi'], 'empty': [], 'run': ['n/deep.mp4']}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / cls / name).write_bytes(clip_bytes)
    (tmp_path / 'walk' / 'notes.txt').write_text('not a video')
    source = sources.FolderSource(str(tmp_path))
    assert source.class_names == ['empty', 'jump', 'run', 'walk']
    got = [(os.path.relpath(source[i]['video'], tmp_path), source[i]['label']) for i in range(len(source))]
    assert got == [('jump/x.avi', 1), ('run/n/deep.mp4', 2), ('walk/a.mp4', 3), ('walk/b.mp4', 3)]


def _build_tfds(data_dir: str, dataset_name: str, examples, feature):
    """Writes a tiny TFDS dataset (array_record) locally, without TensorFlow."""
    import tensorflow_datasets as tfds

    class TestClips(tfds.core.GeneratorBasedBuilder):
        name = dataset_name
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            features = {'video': feature, 'label': tfds.features.ClassLabel(num_classes=5)}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            yield from enumerate(examples)

    TestClips(data_dir=data_dir, file_format='array_record').download_and_prepare()


def test_tfds_source_with_encoded_videos_and_with_frames(tmp_path, clip_bytes):
    import tensorflow_datasets as tfds

    _build_tfds(
        str(tmp_path),
        'jaxssl_test_mp4',
        [{'video': clip_bytes, 'label': i} for i in range(3)],
        tfds.features.Tensor(shape=(), dtype=np.object_),
    )
    arrays = np.random.default_rng(1).integers(0, 256, (2, 6, 8, 8, 3), dtype=np.uint8)
    _build_tfds(
        str(tmp_path),
        'jaxssl_test_frames',
        [{'video': a, 'label': 4} for a in arrays],
        tfds.features.Tensor(shape=(None, 8, 8, 3), dtype=np.uint8),
    )
    config = get_config('runlocal')
    config.input.dataset, config.input.tfds_data_dir = 'tfds', str(tmp_path)
    config.input.tfds_name = 'jaxssl_test_mp4'
    check_input_config(config)
    source = make_source(config)
    assert len(source) == 3 and source.label_keys == ('label',)
    record = source[2]
    assert record['kind'] == 'bytes' and record['label'] == 2
    clip = load_clip(record, 4, 2, np.random.default_rng(0))
    assert clip.shape == (4, 16, 16, 3)
    config.input.tfds_name = 'jaxssl_test_frames'
    record = make_source(config)[1]
    assert record['kind'] == 'array' and record['label'] == 4
    np.testing.assert_array_equal(load_clip(record, 3, 2, np.random.default_rng(0)), arrays[1][[0, 2, 4]])
    assert 'tensorflow' not in sys.modules  # reading needs no TensorFlow


def test_check_input_config_messages(tmp_path):
    config = get_config('')
    with pytest.raises(ConfigError, match=r'^input.list_file is empty: pass --config.input.list_file='):
        check_input_config(config)
    config.input.list_file = str(tmp_path / 'missing.csv')
    with pytest.raises(ConfigError, match=r"input.list_file '.*missing.csv' does not exist"):
        check_input_config(config)
    config.input.list_file = write_list(tmp_path, 'a.mp4 0 -1\n')
    check_input_config(config)
    config.input.list_columns = 'path,frames'
    with pytest.raises(ConfigError, match=r"'input.list_columns'"):
        check_input_config(config)
    config.input.list_columns = ''
    config.input.data_root = str(tmp_path / 'nowhere')
    with pytest.raises(ConfigError, match=r'input.data_root'):
        check_input_config(config)
    config.input.data_root = ''
    config.input.dataset = 'lists'
    with pytest.raises(ConfigError, match=r"'input.dataset'.*did you mean 'list'"):
        check_input_config(config)
    config.input.dataset, config.input.tfds_name = 'tfds', ''
    with pytest.raises(ConfigError, match=r'input.tfds_name is empty'):
        check_input_config(config)
    config.input.dataset = 'folder'
    with pytest.raises(ConfigError, match=r'input.data_root is empty'):
        check_input_config(config)
    config = get_config('runlocal')
    check_input_config(config)
    config.input.frame_template = 'img_{:05d}_{}.jpg'
    with pytest.raises(ConfigError, match=r'input.frame_template'):
        check_input_config(config)
    config = get_config('runlocal')
    config.input.num_sample = 0
    with pytest.raises(ConfigError, match=r'input.num_sample'):
        check_input_config(config)
