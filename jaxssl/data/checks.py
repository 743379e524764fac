"""Validation of config.input before anything is compiled or decoded: one-line ConfigErrors naming the key."""

from __future__ import annotations

import os

import ml_collections

from jaxssl.config import ConfigError, check_choice
from jaxssl.data.sources import parse_columns

DATASETS = ('list', 'folder', 'tfds', 'moving_digits')


def _positive(config: ml_collections.ConfigDict, key: str, minimum: int = 1) -> None:
    value = config.input[key]
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"bad value {value!r} for 'input.{key}': must be an integer >= {minimum}")


def check_input_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (one line, naming the key) for an input section that cannot produce data.

    Checks value ranges, that the selected dataset's required keys are set, and that the files and folders they
    name exist. Does not open videos.
    """
    for key in ('frames', 'sampling_stride'):
        _positive(config, key)
    check_clip_source_config(config)


def check_clip_source_config(config: ml_collections.ConfigDict) -> None:
    """The part of `check_input_config` that any reader of clip sources needs (batch, image size, workers, the
    dataset and its files), without the clip length: e.g. the frame-pair pipeline (jaxssl.data.frame_pairs)."""
    c = config.input
    check_choice(config, 'input.dataset', DATASETS)
    for key in ('num_sample', 'global_batch', 'image_size'):
        _positive(config, key)
    for key in ('num_workers', 'read_threads'):
        _positive(config, key, minimum=0)
    try:
        c.frame_template.format(1)
    except (IndexError, KeyError, ValueError) as e:
        raise ConfigError(
            f"bad value '{c.frame_template}' for 'input.frame_template': {e} (e.g. img_{{:05d}}.jpg)"
        ) from None
    if c.data_root and not os.path.isdir(c.data_root):
        raise ConfigError(f"input.data_root '{c.data_root}' is not a directory")
    if c.dataset == 'list':
        if not c.list_file:
            raise ConfigError(
                'input.list_file is empty: pass --config.input.list_file=/path/to/train.csv '
                "(lines 'path 0 -1' or 'frame_dir start_idx total_frames', paths relative to input.data_root)"
            )
        if not os.path.isfile(c.list_file):
            raise ConfigError(f"input.list_file '{c.list_file}' does not exist")
        try:
            parse_columns(c.list_columns)
        except ValueError as e:
            raise ConfigError(f"bad value for 'input.list_columns': {e}") from None
    elif c.dataset == 'folder':
        if not c.data_root:
            raise ConfigError(
                'input.data_root is empty: pass --config.input.data_root=/path/to/videos '
                "(one sub-folder of videos per class) for input.dataset='folder'"
            )
    elif c.dataset == 'tfds':
        if not c.tfds_name:
            raise ConfigError("input.tfds_name is empty: pass --config.input.tfds_name=NAME for input.dataset='tfds'")
        if c.tfds_data_dir and not os.path.isdir(c.tfds_data_dir):
            raise ConfigError(f"input.tfds_data_dir '{c.tfds_data_dir}' is not a directory")
    elif c.dataset == 'moving_digits':
        from jaxssl.data.moving_digits import SIZES

        check_choice(config, 'input.moving_digits_size', SIZES)
        for key, low, high in (('moving_digits_scale', 0.5, 4.0), ('moving_digits_blur', 0.0, 8.0)):
            value = c.get(key, low if key.endswith('blur') else 1.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ConfigError(f"bad value {value!r} for 'input.{key}': must be a number in [{low}, {high}]")
        directions = c.get('moving_digits_directions', ())
        if (
            not isinstance(directions, tuple | list)
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 8 for k in directions)
            or len(set(directions)) != len(directions)
        ):
            raise ConfigError(
                f"bad value {directions!r} for 'input.moving_digits_directions': distinct direction indices in 0..7 "
                '(empty: all 8)'
            )
        check_choice(config, 'input.split', ('train', 'val'))
