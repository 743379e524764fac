"""Batches in which no two examples share a pseudo label: G-SimCLR's batch construction, for any Grain pipeline.

G-SimCLR (Chakraborty et al., 2020) clusters the images' autoencoder latents into K pseudo classes and builds each
SimCLR batch from distinct clusters, so no negative pair is (probably) of one class. The reference sorts the images
by their rank inside their cluster and batches consecutively without shuffling: while every cluster still has
members a batch holds one image per cluster, but once small clusters run out a batch can straddle two rank groups
and hold one cluster twice. Here the property holds for every batch, by construction:

  per epoch (numpy generator from (seed, epoch)): shuffle each cluster's members; repeatedly take the
  `batch_size` clusters with the most members left (ties broken by a per-epoch random priority) and pop one
  member of each; stop when fewer than `batch_size` clusters have members left; shuffle the batches' order.

Taking the fullest clusters first makes the most batches possible (so the count is the same every epoch); the
members left over differ between epochs. With K = batch size (the reference's choice) an epoch has as many batches as
the smallest cluster has members; K > batch size uses more of the data per epoch.

The order is global: every process computes the same batches and reads its own slice of each, so the GLOBAL batch
holds distinct pseudo labels whatever the process count.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxssl.data import pipeline


def distinct_label_batches(labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """(num_batches, batch_size) indices into `labels`, no label twice in a row; see the module docstring."""
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) < batch_size:
        raise ValueError(
            f'{len(classes)} pseudo labels cannot fill batches of {batch_size} distinct ones: cluster into at least '
            'as many groups as the global batch has images'
        )
    members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    left = np.array([len(m) for m in members])
    taken = np.zeros(len(classes), np.int64)
    priority = rng.permutation(len(classes))  # tie-break among clusters of equal size
    batches = []
    while True:
        # Fullest first; lexsort's last key is the primary one.
        chosen = np.lexsort((priority, -left))[:batch_size]
        if left[chosen[-1]] == 0:
            break
        batches.append(rng.permutation([members[c][taken[c]] for c in chosen]))
        taken[chosen] += 1
        left[chosen] -= 1
    if not batches:
        raise ValueError(f'no batch of {batch_size} distinct pseudo labels can be made')
    return np.stack(batches)[rng.permutation(len(batches))].astype(np.int64)


def num_batches(labels: np.ndarray, batch_size: int) -> int:
    """Batches per epoch: the same for every epoch (the greedy is optimal), computed from one draw."""
    return len(distinct_label_batches(labels, batch_size, np.random.default_rng(0)))


class DistinctLabelOrder(pipeline.EpochBatchOrder):
    """Grain map function: position in this process's stream -> source index, epoch after epoch. Global batch b of
    epoch e is batch b of `distinct_label_batches(labels, global_batch, rng(seed, e))`."""

    def __init__(self, labels: np.ndarray, global_batch: int, seed: int, process_index: int, process_count: int):
        self.labels, self.seed = np.asarray(labels), seed
        super().__init__(global_batch, num_batches(self.labels, global_batch), process_index, process_count)

    def batches(self, epoch: int) -> np.ndarray:
        return distinct_label_batches(self.labels, self.global_batch, np.random.default_rng([self.seed, epoch]))


def distinct_label_order(
    labels: np.ndarray,
    global_batch: int,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> tuple[grain.MapDataset, int]:
    """(a MapDataset of source indices in reading order for this process, examples per epoch over all processes).
    Batch it by global_batch // process_count to get host batches whose global batch has distinct labels."""
    if global_batch % process_count:
        raise ValueError(f'global batch {global_batch} does not split over {process_count} processes')
    order = DistinctLabelOrder(labels, global_batch, seed, process_index, process_count)
    per_epoch = order.batches_per_epoch * order.per_host
    length = per_epoch * num_epochs if num_epochs is not None else 2**62  # 2**62: "forever", as repeat(None)
    return grain.MapDataset.range(length).map(order), order.batches_per_epoch * global_batch
