"""G-SimCLR stage 2 (Chakraborty et al., "G-SimCLR: Self-Supervised Contrastive Learning with Guided Projection via
Pseudo Labelling", 2020; reference ariG23498/G-SimCLR): SimCLR whose batches never hold two images of one pseudo
class, so fewer of NT-Xent's negatives are images of the anchor's own class.

Everything but the reading order is SimCLR's (jaxssl.methods.simclr): model, views, loss, probes. The pseudo labels
come from stage 1 (configs/gsimclr_dae.py, then `python -m jaxssl.pseudo_labels`): an int32 .npy with one label
per training image, named by input.pseudo_labels; jaxssl.data.distinct_batches orders the images so that every
global batch holds distinct labels (an epoch is as many such batches as the labels allow).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jaxssl import pseudo_labels
from jaxssl.config import ConfigError
from jaxssl.data import distinct_batches
from jaxssl.data import images as image_data
from jaxssl.methods import simclr


def check_config(config: ml_collections.ConfigDict) -> None:
    """SimCLR's checks; the pseudo-label file is checked when a run starts (it is a data path)."""
    simclr.check_config(config)


def load_pseudo_labels(config: ml_collections.ConfigDict, num_examples: int) -> np.ndarray:
    """input.pseudo_labels as int (N,), checked against the training source and the global batch."""
    how_to_make = (
        'make one with configs/gsimclr_dae.py and `python -m jaxssl.pseudo_labels --workdir=<that run> --clusters=K`'
    )
    labels = pseudo_labels.load_labels(config.input.pseudo_labels, num_examples, how_to_make, 'training images')
    clusters = len(np.unique(labels))
    if clusters < config.input.global_batch:
        raise ConfigError(
            f'input.pseudo_labels: {clusters} pseudo labels cannot fill a global batch of {config.input.global_batch} '
            "distinct ones ('input.global_batch'): cluster into at least that many groups"
        )
    return labels


class Method(simclr.Method):
    """SimCLR reading its images in batches of distinct pseudo labels."""

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)
        source = image_data.make_image_source(self.config)
        labels = load_pseudo_labels(self.config, len(source))
        order, per_epoch = distinct_batches.distinct_label_order(
            labels, self.config.input.global_batch, seed=seed, process_index=process_index, process_count=process_count
        )
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=simclr.make_view(self.config),
            source=source,
            order=order,
        )
        return dataset, per_epoch
