"""The image pipeline: sources (class folders, TFDS, built-in MNIST digits), decoding, MAE's augmentation, batch
layout, determinism, exact resume, process shards, skipped files, the evaluation pass, config errors."""

import io
import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxssl.config import ConfigError
from jaxssl.data import DecodeError, images, pipeline, skipped_files
from jaxssl.data.transforms import normalize


@pytest.fixture(autouse=True)
def fresh_failure_log(monkeypatch):
    """The pipeline logs only the first 20 unreadable files of a process: start each test at 0 and give the count back
    afterwards, so these tests neither depend on nor use up the log budget of the other tests in the session."""
    monkeypatch.setattr(pipeline, '_failures_logged', 0)


def make_config(**input_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    images.add_image_input_config(config, runlocal=True)
    config.input.global_batch = 4
    config.input.image_size = 16
    for key, value in input_overrides.items():
        config.input[key] = value
    return config


def png_bytes(array: np.ndarray, fmt: str = 'PNG') -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


class ListSource:
    """Records given in a list; label = the record's own index, so batches show which images they hold."""

    label_keys = ('label',)

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return {**self.records[index], 'label': index}


def array_source(count: int, size: int = 20) -> ListSource:
    rng = np.random.default_rng(7)
    return ListSource(
        [
            {'name': f'a{i}', 'image': rng.integers(0, 256, (size, size + 4, 3), np.uint8), 'kind': 'array'}
            for i in range(count)
        ]
    )


def take(dataset_or_iterator, n):
    it = iter(dataset_or_iterator)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_folder_source_labels_from_sorted_class_folders(tmp_path):
    picture = png_bytes(np.zeros((8, 8, 3), np.uint8))
    for cls, names in {'cat': ['b.png', 'a.JPG'], 'ant': ['x.png'], 'empty': [], 'dog': ['n/deep.png']}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / cls / name).write_bytes(picture)
    (tmp_path / 'cat' / 'notes.txt').write_text('not an image')
    source = images.ImageFolderSource(str(tmp_path))
    assert source.class_names == ['ant', 'cat', 'dog', 'empty']
    got = [(os.path.relpath(source[i]['image'], tmp_path), source[i]['label']) for i in range(len(source))]
    assert got == [('ant/x.png', 0), ('cat/a.JPG', 1), ('cat/b.png', 1), ('dog/n/deep.png', 2)]
    with pytest.raises(ValueError, match='no image files'):
        images.ImageFolderSource(str(tmp_path / 'empty'))


def test_decode_files_bytes_and_arrays(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), np.uint8)
    (tmp_path / 'a.png').write_bytes(png_bytes(rgb))
    np.testing.assert_array_equal(
        images.decode_image({'name': 'a', 'image': str(tmp_path / 'a.png'), 'kind': 'file'}), rgb
    )
    grey = rgb[..., 0]
    decoded = images.decode_image({'name': 'g', 'image': png_bytes(grey), 'kind': 'bytes'})
    np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=-1))  # grey -> RGB
    np.testing.assert_array_equal(images.decode_image({'name': 'g', 'image': grey, 'kind': 'array'}), decoded)
    rgba = np.concatenate([rgb, np.full((6, 10, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(images.decode_image({'name': 'r', 'image': rgba, 'kind': 'array'}), rgb)
    (tmp_path / 'bad.jpg').write_bytes(png_bytes(rgb, 'JPEG')[:40])  # truncated
    for record in (
        {'name': 'bad', 'image': str(tmp_path / 'bad.jpg'), 'kind': 'file'},
        {'name': 'gone', 'image': str(tmp_path / 'missing.png'), 'kind': 'file'},
        {'name': 'junk', 'image': b'not an image', 'kind': 'bytes'},
        {'name': 'float', 'image': np.zeros((4, 4, 3), np.float32), 'kind': 'array'},
    ):
        with pytest.raises(DecodeError, match=record['name']):
            images.decode_image(record)


def test_tfds_source_with_encoded_images_and_arrays(tmp_path):
    import tensorflow_datasets as tfds

    pictures = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), np.uint8)

    def build(dataset_name, examples, feature):
        class TestImages(tfds.core.GeneratorBasedBuilder):
            name = dataset_name  # registered under this name when the class is defined
            VERSION = tfds.core.Version('1.0.0')

            def _info(self):
                features = {'image': feature, 'label': tfds.features.ClassLabel(num_classes=5)}
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {'train': self._generate_examples()}

            def _generate_examples(self):
                yield from enumerate(examples)

        TestImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()

    build('jaxssl_test_png', [{'image': png_bytes(p), 'label': i} for i, p in enumerate(pictures)],
          tfds.features.Tensor(shape=(), dtype=np.object_))  # fmt: skip
    build(
        'jaxssl_test_pixels',
        [{'image': p, 'label': 4} for p in pictures],
        tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
    )
    config = make_config(dataset='tfds', tfds_data_dir=str(tmp_path), tfds_name='jaxssl_test_png')
    images.check_image_input_config(config)
    source = images.make_image_source(config)
    assert len(source) == 3 and source.label_keys == ('label',)
    record = source[2]
    assert record['kind'] == 'bytes' and record['label'] == 2
    np.testing.assert_array_equal(images.decode_image(record), pictures[2])
    config.input.tfds_name = 'jaxssl_test_pixels'
    record = images.make_image_source(config)[1]
    assert record['kind'] == 'array' and record['label'] == 4
    np.testing.assert_array_equal(images.decode_image(record), pictures[1])
    assert 'tensorflow' not in sys.modules  # reading needs no TensorFlow


def test_builtin_digits_splits():
    train, val = images.DigitsSource('train'), images.DigitsSource('val')
    assert (len(train), len(val)) == (4000, 1000)
    for source, per_class in ((train, 400), (val, 100)):
        labels = np.array([source[i]['label'] for i in range(len(source))])
        assert np.array_equal(np.bincount(labels), [per_class] * 10)
    record = train[0]
    assert record['kind'] == 'array' and record['image'].shape == (28, 28) and record['image'].dtype == np.uint8
    # Different handwriting in the two splits: no val digit is a train digit.
    train_set = {train[i]['image'].tobytes() for i in range(len(train))}
    assert not any(val[i]['image'].tobytes() in train_set for i in range(len(val)))
    with pytest.raises(ValueError, match="no split 'test'"):
        images.DigitsSource('test')


def test_pretrain_view_crop_flip_and_normalisation():
    # A horizontal ramp: a crop of it is increasing left to right, a flipped one decreasing.
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    rng = np.random.default_rng(0)
    directions = []
    for _ in range(200):
        view = images.pretrain_view(ramp, rng, size=16)
        assert view.shape == (16, 16, 3) and view.dtype == np.float32
        directions.append(np.sign(view[8, -1, 0] - view[8, 0, 0]))
    assert set(directions) == {-1.0, 1.0} and 70 < directions.count(-1.0) < 130  # flip with p 0.5
    no_flip = [images.pretrain_view(ramp, rng, size=16, flip=False) for _ in range(50)]
    assert all(v[8, -1, 0] > v[8, 0, 0] for v in no_flip)
    # The whole image at scale (1, 1) and aspect 1: a plain resize, then ImageNet normalisation.
    flat = np.full((32, 32, 3), 128, np.uint8)
    whole = images.pretrain_view(flat, rng, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(whole, normalize(np.full((16, 16, 3), 128, np.uint8)), atol=1e-6)


def test_crop_areas_follow_the_scale_range():
    rng = np.random.default_rng(1)
    from jaxssl.data.finetune import random_resized_crop_box

    areas = [
        h * w / (100 * 100) for _, _, h, w in (random_resized_crop_box(100, 100, rng, (0.2, 1.0)) for _ in range(2000))
    ]
    # Area fraction ~ U(0.2, 1) up to rounding; large boxes with a non-square aspect do not fit and are redrawn (as
    # torchvision's), which pulls the mean below 0.6.
    assert 0.19 <= min(areas) < 0.21 and 0.95 < max(areas) <= 1.0
    assert 0.5 < np.mean(areas) < 0.6


def test_eval_view_resizes_the_short_side_then_centre_crops():
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), np.uint8)
    # size 32 / crop_pct 0.8 = 40: the short side is already 40, so no resize; the crop starts at (4, 14).
    np.testing.assert_allclose(images.eval_view(image, size=32, crop_pct=0.8), normalize(image[4:36, 14:46]), atol=1e-6)
    assert images.eval_view(image, size=16).shape == (16, 16, 3)  # short side 18, long 27, crop 16


def test_batch_layout_views_and_masks():
    config = make_config(num_sample=2)

    def add_mask(sample, rng):
        return {**sample, 'noise': rng.random(5).astype(np.float32)}

    batch = take(
        images.make_image_pretrain_dataset(config, seed=0, source=array_source(12), sample_transform=add_mask), 1
    )[0]
    assert sorted(batch) == ['image', 'label', 'noise']
    assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    ids = batch['label']
    assert np.array_equal(ids[0::2], ids[1::2]) and len(set(ids[0::2])) == 4  # the views of an image are adjacent
    assert not np.array_equal(batch['noise'][0], batch['noise'][1])  # each view has its own mask
    assert not np.array_equal(batch['image'][0], batch['image'][1])  # and its own crop


def test_deterministic_per_seed_and_epochs_cover_the_data():
    config = make_config()
    source = array_source(12)
    a = take(images.make_image_pretrain_dataset(config, seed=3, source=source), 6)
    assert_same_batches(a, take(images.make_image_pretrain_dataset(config, seed=3, source=source), 6))
    other = take(images.make_image_pretrain_dataset(config, seed=4, source=source), 1)[0]
    assert not np.array_equal(a[0]['image'], other['image'])
    for epoch in range(2):  # 3 batches of 4 per epoch: each image once per epoch
        labels = np.concatenate([b['label'] for b in a[3 * epoch : 3 * epoch + 3]])
        assert sorted(labels) == list(range(12))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_from_iterator_state_is_exact(num_workers):
    config = make_config(num_workers=num_workers)
    source = array_source(12)
    it = iter(images.make_image_pretrain_dataset(config, seed=0, source=source))
    take(it, 2)
    state = it.get_state()
    want = take(it, 3)
    resumed = iter(images.make_image_pretrain_dataset(config, seed=0, source=source))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), want)


def test_process_shards_are_disjoint():
    config = make_config()
    source = array_source(13)  # 13 over 2 processes: one image left out
    seen = []
    for index in range(2):
        batches = take(
            images.make_image_pretrain_dataset(config, seed=0, process_index=index, process_count=2, source=source), 3
        )
        assert all(b['image'].shape[0] == 2 for b in batches)
        seen.append({int(x) for b in batches for x in b['label']})
    assert seen[0] == set(range(0, 12, 2)) and seen[1] == set(range(1, 12, 2))


def test_unreadable_files_are_replaced_and_counted(tmp_path, caplog):
    good = png_bytes(np.full((8, 8, 3), 200, np.uint8))
    records = []
    for i in range(8):
        path = tmp_path / f'{i}.png'
        path.write_bytes(good if i % 4 else b'broken')  # images 0 and 4 cannot be read
        records.append({'name': str(path), 'image': str(path), 'kind': 'file'})
    config = make_config()
    before = skipped_files()
    batches = take(images.make_image_pretrain_dataset(config, seed=0, source=ListSource(records), num_epochs=1), 2)
    labels = np.concatenate([b['label'] for b in batches])
    assert not {0, 4} & set(labels.tolist()) and len(labels) == 8  # replaced by readable images of the shard
    assert skipped_files() - before == 2
    assert 'skipping unreadable clip' in caplog.text
    all_bad = ListSource([{**r, 'image': str(tmp_path / '0.png')} for r in records])
    with pytest.raises(RuntimeError, match='in a row could not be read'):
        take(images.make_image_pretrain_dataset(config, seed=0, source=all_bad), 1)


def test_eval_dataset_pads_and_marks_unreadable(tmp_path):
    source = array_source(5)
    source.records[3] = {'name': 'broken', 'image': b'junk', 'kind': 'bytes'}
    dataset, count = images.make_image_eval_dataset(make_config(), split='val', batch_size=4, source=source)
    batches = list(dataset)
    assert count == 5 and len(batches) == 2
    assert batches[0]['image'].shape == (4, 1, 16, 16, 3)
    valid = np.concatenate([b['valid'] for b in batches])
    assert valid.tolist() == [1, 1, 1, 0, 1, 0, 0, 0]  # broken image, then padding
    np.testing.assert_allclose(batches[0]['image'][1, 0], images.eval_view(source[1]['image'], size=16), atol=1e-6)
    again = list(images.make_image_eval_dataset(make_config(), split='val', batch_size=4, source=source)[0])
    assert_same_batches(batches, again)
    subset, count = images.make_image_eval_dataset(
        make_config(), split='val', batch_size=2, max_examples=3, source=source
    )
    assert count == 3 and np.concatenate([b['index'] for b in subset]).tolist() == [0, 2, 4, 0]


@pytest.mark.parametrize(
    ('overrides', 'needle'),
    [
        ({'dataset': 'imagenet'}, "'input.dataset'"),
        ({'dataset': 'folder'}, 'input.data_root is empty'),
        ({'dataset': 'folder', 'data_root': '/nowhere'}, "'/nowhere/train' is not a directory"),
        ({'dataset': 'tfds'}, 'input.tfds_name is empty'),
        ({'split': 'test'}, "'input.split'"),
        ({'crop_scale': (0.5, 0.2)}, "'input.crop_scale'"),
        ({'crop_ratio': (0.0, 1.0)}, "'input.crop_ratio'"),
        ({'eval_crop_pct': 1.5}, "'input.eval_crop_pct'"),
        ({'image_size': 0}, "'input.image_size'"),
        ({'interpolation': 'nearest'}, "'input.interpolation'"),
    ],
)
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        images.check_image_input_config(make_config(**overrides))
    assert needle in str(err.value) and '\n' not in str(err.value)


def test_folder_config_with_splits(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'train' / 'a' / 'x.png').write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    config = make_config(dataset='folder', data_root=str(tmp_path))
    images.check_image_input_config(config)
    assert len(images.make_image_source(config)) == 1
    with pytest.raises(ValueError, match='not a directory'):
        images.make_image_source(config, split='val')
