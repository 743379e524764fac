"""Clip sources: random-access (len + getitem) lists of clips, one class per storage format, picked by config.

Each source returns a record dict per index:
  'name':  str, for messages (a path, or 'tfds:name/split[i]');
  'video': str path of a video file or of a folder of frames, encoded video bytes, or a decoded uint8 array
           (T, H, W, 3), as `kind` says;
  'kind':  'file' | 'frames' | 'bytes' | 'array';
  'start', 'total': first frame number and frame count of a frame folder (-1 where unknown / not a folder);
  and one int per name in the source's `label_keys` (e.g. 'label'; moving_digits adds 'direction', 'speed').
Records hold paths or bytes, never decoded video, so sources are cheap to pickle into Grain worker processes.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import ml_collections

from jaxssl.data import folders

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg')
LIST_COLUMNS = ('path', 'start', 'total', 'label')
# Trailing integer columns -> their meaning, for lists without an explicit column spec. One integer is the
# fine-tuning format 'path label'; two the pretraining format 'path start total'; three adds a label.
AUTO_COLUMNS = {0: (), 1: ('label',), 2: ('start', 'total'), 3: ('start', 'total', 'label')}


class ClipSource(Protocol):
    """What the pipeline needs of a source (Grain's RandomAccessDataSource plus the names of its labels)."""

    label_keys: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def parse_columns(columns: str) -> tuple[str, ...] | None:
    """'path,total,label' -> ('path', 'total', 'label'); '' -> None (detect per line). Raises ValueError."""
    if not columns:
        return None
    spec = tuple(c.strip() for c in columns.split(','))
    if spec[0] != 'path' or any(c not in LIST_COLUMNS for c in spec) or len(set(spec)) < len(spec):
        raise ValueError(f"bad list columns {columns!r}: 'path' first, then any of start,total,label")
    return spec


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def parse_list_file(list_file: str, data_root: str = '', columns: str = '') -> list[dict[str, Any]]:
    """Parses a reference-format list file into records.

    Lines are space separated: 'path 0 -1' (a video file), 'frame_dir start_idx total_frames' (a folder of
    extracted frames), either with a trailing integer label, or 'path label' (the fine-tuning format). Relative
    paths are joined to `data_root`; paths may contain spaces. `columns` overrides the detection with a
    comma-separated list of path,start,total,label (e.g. 'path,total,label' for frame lists without start, which then
    start at 1 as in the reference's RawFrameClsDataset). Raises ValueError naming the line on a malformed line.
    """
    spec = tuple(c.strip() for c in columns.split(',')) if columns else None
    if spec is not None and (
        spec[0] != 'path' or any(c not in LIST_COLUMNS for c in spec) or len(set(spec)) < len(spec)
    ):
        raise ValueError(f"bad list columns {columns!r}: 'path' first, then any of start,total,label")
    records, has_label = [], None
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            tokens = line.split()
            if spec is None:
                trailing = 0
                while trailing < min(3, len(tokens) - 1) and _is_int(tokens[len(tokens) - 1 - trailing]):
                    trailing += 1
                names = AUTO_COLUMNS[trailing]
            else:
                names = spec[1:]
                if len(tokens) <= len(names) or not all(_is_int(t) for t in tokens[len(tokens) - len(names) :]):
                    raise ValueError(f'{list_file}:{number}: expected columns {",".join(spec)}, got {line!r}')
            values = dict(zip(names, map(int, tokens[len(tokens) - len(names) :]), strict=True))
            path = ' '.join(tokens[: len(tokens) - len(names)])
            if has_label is None:
                has_label = 'label' in values
            elif has_label != ('label' in values):
                raise ValueError(f'{list_file}:{number}: label column present on some lines but not others: {line!r}')
            total = values.get('total', -1)
            record = {
                'name': os.path.join(data_root, path),
                'video': os.path.join(data_root, path),
                'kind': 'frames' if total >= 0 else 'file',
                'start': values.get('start', 1 if total >= 0 else 0),
                'total': total,
            }
            if has_label:
                record['label'] = values['label']
            records.append(record)
    if not records:
        raise ValueError(f'{list_file}: no samples')
    return records


class ListSource:
    """Clips listed in a reference-format list file (see `parse_list_file`)."""

    def __init__(self, list_file: str, data_root: str = '', columns: str = ''):
        self.list_file = list_file
        self._records = parse_list_file(list_file, data_root, columns)
        self.label_keys: tuple[str, ...] = ('label',) if 'label' in self._records[0] else ()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return f'ListSource({self.list_file!r}, {len(self)} clips)'


class FolderSource:
    """Video files in class sub-folders of `root` (root/<class>/<video>); labels index the sorted class names."""

    def __init__(self, root: str):
        self.root = root
        self.class_names, files = folders.class_folder_files(root, VIDEO_EXTENSIONS)
        self._records = [
            {'name': path, 'video': path, 'kind': 'file', 'start': 0, 'total': -1, 'label': label}
            for path, label in files
        ]
        if not self._records:
            raise ValueError(f'{root}: no video files ({", ".join(VIDEO_EXTENSIONS)}) in class sub-folders')
        self.label_keys: tuple[str, ...] = ('label',)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return f'FolderSource({self.root!r}, {len(self)} clips, {len(self.class_names)} classes)'


class TfdsSource:
    """A TFDS dataset read through `tfds.data_source` (array_record files; no TensorFlow needed).

    The `video_key` feature is either the encoded video file as bytes (a scalar Tensor of dtype object, decoded with
    PyAV) or decoded uint8 frames (T, H, W, 3). TFDS `Video` features store per-frame images whose encoding needs
    TensorFlow: to avoid it, store the mp4 bytes. `label_key` is used when the dataset has it.
    """

    def __init__(self, name: str, split: str, data_dir: str = '', video_key: str = 'video', label_key: str = 'label'):
        import tensorflow_datasets as tfds

        self.name, self.split, self.video_key = name, split, video_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        features = self._source.dataset_info.features
        if video_key not in features:
            raise ValueError(f"tfds dataset '{name}' has no feature '{video_key}'; features: {', '.join(features)}")
        self._label_key = label_key if label_key and label_key in features else ''
        self.label_keys: tuple[str, ...] = ('label',) if self._label_key else ()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        video = example[self.video_key]
        record = {
            'name': f'tfds:{self.name}/{self.split}[{index}]',
            'video': video,
            'kind': 'bytes' if isinstance(video, (bytes, bytearray)) else 'array',
            'start': 0,
            'total': -1,
        }
        if self._label_key:
            record['label'] = int(example[self._label_key])
        return record

    def __repr__(self) -> str:
        return f'TfdsSource({self.name!r}, {self.split!r}, {len(self)} clips)'


def make_source(config: ml_collections.ConfigDict, split: str | None = None) -> ClipSource:
    """The source `config.input.dataset` names: 'list', 'folder', 'tfds' or 'moving_digits'.

    `split` overrides `config.input.split` ('train' / 'val' for moving_digits, a TFDS split string for tfds; list and
    folder datasets name their split through `input.list_file` / `input.data_root`).
    """
    c = config.input
    split = split or c.split
    if c.dataset == 'list':
        return ListSource(c.list_file, c.data_root, c.list_columns)
    if c.dataset == 'folder':
        return FolderSource(c.data_root)
    if c.dataset == 'tfds':
        return TfdsSource(c.tfds_name, split, c.tfds_data_dir, c.tfds_video_key, c.tfds_label_key)
    if c.dataset == 'moving_digits':
        from jaxssl.data import moving_digits

        # The variant keys are optional: configs without them get the default digits.
        scale, blur = c.get('moving_digits_scale', 1.0), c.get('moving_digits_blur', 0.0)
        directions = tuple(c.get('moving_digits_directions', ()))
        return moving_digits.MovingDigitsSource(
            c.cache_dir, c.moving_digits_size, split, scale=scale, blur=blur, directions=directions
        )
    raise ValueError(f"unknown input.dataset '{c.dataset}'")
