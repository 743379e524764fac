"""The plumbing every image-ViT method shares: the check of its ViT config keys, its input key, the input
pipeline's skipped-file counter, the labelled eval split the frozen-feature probes read, and tokens per image for
the progress line."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jaxssl import data
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.methods import base
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mae as mae_model


def check_vit_config(
    config: ml_collections.ConfigDict, size_keys: tuple[str, ...] = ('input.image_size',)
) -> dict[str, Any]:
    """Checks the shared image-ViT keys, naming the key: `model.variant` (jaxssl.models.mae's size table,
    optionally '/patch'), `model.dtype`, `model.drop_path_rate`, and that each image size in `size_keys` splits
    into patches. Returns the decoded variant."""
    try:
        spec = mae_model.decode_variant(config.model.variant)
    except ValueError:
        sizes = ', '.join(mae_model.VARIANTS)
        raise ConfigError(
            f"bad value '{config.model.variant}' for 'model.variant'; valid: {sizes} (optionally '/patch')"
        ) from None
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    for key in size_keys:
        group, name = key.split('.')
        try:
            mae_model.token_grid(config[group][name], spec['patch'])
        except ValueError as e:
            raise ConfigError(f"bad value {config[group][name]} for '{key}': {e}") from None
    return spec


def check_resnet_config(config: ml_collections.ConfigDict) -> None:
    """The ResNet backbone's keys (`model.resnet_width`, `model.dtype`), naming the key."""
    check_choice(config, 'model.dtype', DTYPES)
    width = config.model.get('resnet_width', 64)
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"bad value {width!r} for 'model.resnet_width': must be an integer >= 1")


class ImageMethod(base.Method):
    """base.Method for methods whose examples are images (config.input from `add_image_input_config`) and whose
    `self.model` has a `patch` size; they define dataset / init / loss / represent."""

    input_key = 'image'

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def view_dataset(self, seed: int, process_index: int, process_count: int, view: image_data.View) -> tuple[Any, int]:
        """(training batches of the images `config.input` names through `view`, images per epoch): for methods with
        their own view function. The input section is checked here, when a run starts, not at config load."""
        image_data.check_image_input_config(self.config)
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, view=view, source=source
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Random normalised images under 'image' (methods whose batches carry more keys override it)."""
        size = self.config.input.image_size
        return {'image': np.random.default_rng(0).normal(size=(batch_size, size, size, 3)).astype(np.float32)}

    def eval_source(self, split: str) -> Any:
        """The labelled images of an evaluation split; None: the source `config.input` describes."""
        return None

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = image_data.make_image_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
            source=self.eval_source(split),
        )
        return dataset

    def tokens_per_example(self) -> int | None:
        if not hasattr(self.model, 'patch'):  # a ResNet backbone: no tokens
            return None
        grid = mae_model.token_grid(self.config.input.image_size, self.model.patch)
        return grid[0] * grid[1]
