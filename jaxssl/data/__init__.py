"""Input pipelines: video (clip sources, PyAV decoding, reference augmentation, Grain datasets, moving_digits) and
images (jaxssl.data.images).

Modules, one job each:
  sources        list files, class folders, TFDS array_record datasets -> records (paths / bytes + labels)
  decode         frame-accurate clip extraction (PyAV seeking) and frame folders (PIL); DecodeError
  encode         writing H.264 mp4 files (the built-in dataset, tests)
  transforms     pretraining augmentation (GroupMultiScaleCrop, resize, ImageNet normalisation)
  finetune       fine-tuning and test-time transforms (random resized crop, flip, erasing, multi-view)
  randaugment    RandAugment for clips
  moving_digits  the built-in dataset, generated on first use
  pipeline       the Grain pipeline and the skipped-file counter
  checks         config.input validation
  frame_pairs    two frames of one video at a random gap, one crop and flip for both (SiamMAE), on pipeline's
                 sources, decoding and skip-and-count policy
  images         the image pipeline: folder / TFDS / built-in mnist_digits sources, MAE-style views, Grain datasets
The trainer needs: check_input_config, make_pretrain_dataset, skipped_files.
"""

from jaxssl.data.checks import check_input_config
from jaxssl.data.decode import DecodeError
from jaxssl.data.pipeline import (
    ensure_absl_flags_parsed,
    host_batch_sizes,
    make_eval_dataset,
    make_pretrain_dataset,
    skipped_files,
)
from jaxssl.data.sources import ClipSource, make_source

__all__ = [
    'ClipSource',
    'DecodeError',
    'check_input_config',
    'ensure_absl_flags_parsed',
    'host_batch_sizes',
    'make_eval_dataset',
    'make_pretrain_dataset',
    'make_source',
    'skipped_files',
]
