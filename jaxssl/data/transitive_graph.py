"""The object graph of Transitive Invariance (Wang, He, Gupta, ICCV 2017) and its training pairs.

Nodes are objects. Each node i has two views: A_i, the object as first seen, and A'_i, the same instance at the end
of a track (another viewpoint, pose, scale, lighting): an intra-instance edge. Inter-instance edges join different
objects that look alike (similar category and viewpoint), found by clustering features that an earlier
self-supervised signal gives (the paper: Doersch et al.'s context prediction) and linking neighbours within a
cluster. Transitivity over A - B (inter) and B - B' (intra) gives pairs neither edge type holds alone:
<A, B'>, <A', B> and <A', B'>.

Here (a small reconstruction; docs/methods.md says what is known and what is not):
- nodes: the images of a training source (the built-in MNIST digits by default);
- tracks: the paper tracks moving objects through videos; a track's end view A' is made here by a random smooth
  deformation of the image (rotation, scale, shear, shift, a stroke-width change, a gain), seeded per node, so the
  instance is the same and its appearance is not;
- inter edges: k-means of the A views' features, then each node's `neighbours` nearest members of its own cluster
  (cosine). The features are an earlier self-supervised run's representation of the images (the paper's role for
  Doersch et al.'s context prediction; e.g. the 2015 intra-only model), or grey pixels at 16 x 16, centred and
  L2-normalised (a weak, label-free stand-in that needs no earlier run);
- labels for the ranking loss's negatives: the cluster (two items of one cluster are never negatives of each other,
  as two patches of one video in 2015); with no inter edges mined, the node itself (2015's one label per video).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np

from jaxssl import kmeans
from jaxssl.data import images as image_data

log = logging.getLogger(__name__)

PAIR_KINDS = ('intra', 'inter', 'transitive')
KIND_IDS = {kind: i for i, kind in enumerate(PAIR_KINDS)}
FEATURE_SIDE = 16  # the clustering feature's grid


@dataclasses.dataclass(frozen=True)
class TrackConfig:
    """How far a track's end view moves from its start view: rotation in degrees (+-), scale (1 +- scale), shear
    (+-), shift as a fraction of the side (+-), gain range, and the chance of a thicker or thinner stroke (each)."""

    rotation: float = 30.0
    scale: float = 0.2
    shear: float = 0.2
    shift: float = 0.1
    gain: tuple[float, float] = (0.6, 1.0)
    stroke_prob: float = 1 / 3


def track_end(image: np.ndarray, rng: np.random.Generator, track: TrackConfig) -> np.ndarray:
    """The view at a track's end of the uint8 (H, W, 3) `image`: an affine warp about the centre (rotation, scale,
    shear, shift; zeros outside), then a 2 x 2 grey dilation or erosion (a bolder or finer stroke), then a gain."""
    from scipy import ndimage

    h, w = image.shape[:2]
    angle = math.radians(rng.uniform(-track.rotation, track.rotation))
    scale = rng.uniform(1 - track.scale, 1 + track.scale)
    shear = rng.uniform(-track.shear, track.shear)
    shift = rng.uniform(-track.shift, track.shift, size=2) * np.array([h, w])
    cos, sin = math.cos(angle), math.sin(angle)
    forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    # affine_transform maps output coordinates to input ones: the inverse of the motion, about the centre.
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - inverse @ (centre + shift)
    out = np.stack(
        [ndimage.affine_transform(image[..., c].astype(np.float32), inverse, offset, order=1) for c in range(3)], -1
    )
    stroke = rng.random()
    if stroke < track.stroke_prob:
        out = ndimage.grey_dilation(out, size=(2, 2, 1))
    elif stroke < 2 * track.stroke_prob:
        out = ndimage.grey_erosion(out, size=(2, 2, 1))
    out *= rng.uniform(*track.gain)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pixel_feature(image: np.ndarray) -> np.ndarray:
    """(256,) float32: a uint8 (H, W, 3) image as grey at 16 x 16 (bilinear), centred, L2-normalised."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(image).convert('L').resize((FEATURE_SIDE, FEATURE_SIDE), Image.BILINEAR))
    row = grey.astype(np.float32).ravel()
    row -= row.mean()
    return row / max(float(np.linalg.norm(row)), 1e-6)


def inter_edges(features: np.ndarray, clusters: np.ndarray, neighbours: int) -> np.ndarray:
    """int64 (E, 2) directed edges (i, j): j among the `neighbours` most similar (cosine of the L2-normalised
    `features`) other members of i's cluster; fewer in a cluster too small to hold them."""
    edges = []
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        if len(members) < 2:
            continue
        similarity = features[members] @ features[members].T
        np.fill_diagonal(similarity, -np.inf)
        k = min(neighbours, len(members) - 1)
        nearest = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
        edges.append(np.stack([np.repeat(members, k), members[nearest].ravel()], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)


def transitive_pairs(edges: np.ndarray, num_nodes: int, kinds: tuple[str, ...]) -> np.ndarray:
    """int64 (P, 3) training pairs (first view, second view, kind id) over the 2 * num_nodes views (view i: A_i,
    view num_nodes + i: A'_i): 'intra' <A_i, A'_i>, 'inter' <A_i, A_j>, 'transitive' <A_i, A'_j>, <A'_i, A_j>,
    <A'_i, A'_j> for every edge (i, j)."""
    n, (i, j) = num_nodes, edges.T
    by_kind = {
        'intra': [(np.arange(n), np.arange(n) + n)],
        'inter': [(i, j)],
        'transitive': [(i, j + n), (i + n, j), (i + n, j + n)],
    }
    rows = [
        np.stack([first, second, np.full_like(first, KIND_IDS[kind])], axis=1)
        for kind in kinds
        for first, second in by_kind[kind]
    ]
    return np.concatenate(rows).astype(np.int64)


def mix_kinds(pairs: np.ndarray, shares: tuple[float, ...], kinds: tuple[str, ...], seed: int) -> np.ndarray:
    """The pair list resampled so that kind k makes up shares[k] of it (same length, each kind's pairs drawn with
    replacement unless a kind keeps all of its own, deterministic in `seed`), `shares` following `kinds`."""
    total, rng, parts = len(pairs), np.random.default_rng([seed, 2]), []
    for kind, share in zip(kinds, np.asarray(shares, np.float64) / sum(shares), strict=True):
        own = pairs[pairs[:, 2] == KIND_IDS[kind]]
        want = round(share * total)
        parts.append(own if want == len(own) else own[rng.choice(len(own), size=want, replace=want > len(own))])
    return np.concatenate(parts)


class Nodes:
    """The graph's objects, decoded on demand so that no copy of the images is held (Grain workers each get one of
    this object): node i is record kept[i] of `source` (resized to node_size x node_size when > 0). View v < N is
    node v's start A_v; view N + v its track end A'_v, redrawn from the generator (seed, 1, v) at every read."""

    def __init__(self, source: Any, kept: np.ndarray, node_size: int, track: TrackConfig, seed: int):
        self.source, self.kept, self.node_size, self.track, self.seed = source, kept, node_size, track, seed

    def __len__(self) -> int:
        return len(self.kept)

    def start(self, node: int) -> np.ndarray:
        """uint8 (H, W, 3); raises DecodeError when the image cannot be read."""
        image = image_data.decode_image(self.source[int(self.kept[node])])
        return image_data._resize(image, self.node_size, self.node_size, 'bicubic') if self.node_size else image

    def view(self, index: int, start: np.ndarray | None = None) -> np.ndarray:
        """View `index` (uint8 (H, W, 3)); `start`: its node's start image, when already decoded."""
        node = index % len(self)
        start = self.start(node) if start is None else start
        return start if index == node else track_end(start, np.random.default_rng([self.seed, 1, node]), self.track)


def scan_nodes(source: Any, node_size: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One pass over `source`: the indices of its readable images, their classes when it has them, and their pixel
    features (N, 256). Unreadable images are skipped, logged and counted (skipped_files); all must have one size
    (after resizing to node_size when > 0). Shows progress on large sets."""
    from jaxssl.data import pipeline
    from jaxssl.data.decode import DecodeError

    kept, classes, features, shapes = [], [], [], set()
    started = time.monotonic()
    for index in range(len(source)):
        record = source[index]
        try:
            image = image_data.decode_image(record)
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            continue
        if node_size:
            image = image_data._resize(image, node_size, node_size, 'bicubic')
        shapes.add(image.shape)
        kept.append(index)
        classes.append(record.get('label', -1))
        features.append(pixel_feature(image))
        if (index + 1) % 100_000 == 0:
            log.warning('transitive graph: scanned %d / %d images (%.0f s)', index + 1, len(source),
                        time.monotonic() - started)  # fmt: skip
    if not kept:
        raise ValueError(f'{source!r} has no readable image to build the graph from')
    if len(shapes) > 1:
        raise ValueError(f'the training images have {len(shapes)} sizes: set graph.node_size to resize them')
    labelled = 'label' in getattr(source, 'label_keys', ())
    return np.asarray(kept), (np.asarray(classes) if labelled else None), np.stack(features)


@dataclasses.dataclass
class Graph:
    """labels: int64 (N,) the loss's label of each node (its cluster, or itself); edges: int64 (E, 2) the inter
    edges; pairs: int64 (P, 3) (first view, second view, kind id) over the 2N views of `Nodes`; stats: figures."""

    labels: np.ndarray
    edges: np.ndarray
    pairs: np.ndarray
    stats: dict[str, float]


def build_graph(
    features: np.ndarray,
    classes: np.ndarray | None,
    *,
    kinds: tuple[str, ...],
    num_clusters: int,
    neighbours: int,
    seed: int,
    kind_shares: tuple[float, ...] = (),
) -> Graph:
    """The graph over N objects from their `features` (N, D) (pixel features, or an earlier self-supervised run's;
    L2-normalised here), deterministic in `seed`. Logs its size and, given the objects' `classes` (N,), the share of
    inter edges that join one class (the graph's purity: how far the label-free features already separate the
    classes; the labels are used for nothing else). `kind_shares` (one per kind, in `kinds` order) resamples the pairs
    to those proportions; () keeps every pair once. Raises ValueError when no pair results."""
    started = time.monotonic()
    n = len(features)
    stats = {'graph_nodes': float(n)}
    if 'inter' in kinds or 'transitive' in kinds:
        if not 1 <= num_clusters <= n:
            raise ValueError(f'graph.clusters={num_clusters} must be in [1, {n}] (the nodes)')
        features = np.asarray(features, np.float64)
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        clusters, _, _ = kmeans.kmeans(features, num_clusters, seed=seed, max_iter=100)
        edges = inter_edges(features, clusters, neighbours)
        labels = clusters.astype(np.int64)
        stats['graph_inter_edges'] = float(len(edges))
        if classes is not None and len(edges):
            stats['graph_inter_purity'] = float((classes[edges[:, 0]] == classes[edges[:, 1]]).mean())
    else:
        edges, labels = np.zeros((0, 2), np.int64), np.arange(n, dtype=np.int64)
    pairs = transitive_pairs(edges, n, kinds)
    if not len(pairs):
        raise ValueError(f'the graph has no {" / ".join(kinds)} pairs: every cluster holds a single node')
    if kind_shares:
        pairs = mix_kinds(pairs, kind_shares, kinds, seed)
    stats['graph_pairs'] = float(len(pairs))
    summary = ', '.join(f'{k[6:]} {v:g}' for k, v in stats.items())
    log.warning('transitive graph: %s in %.1f s', summary, time.monotonic() - started)
    return Graph(labels, edges, pairs, stats)


class PairSource:
    """The graph's pairs as a source for jaxssl.data.images's pipeline: record i names pair i's two views, its loss
    label and its kind; `load` (the pipeline's decode) reads both views, uint8 (2, H, W, 3)."""

    def __init__(self, graph: Graph, nodes: Nodes):
        self.graph, self.nodes = graph, nodes
        self.label_keys = ('pair_label', 'pair_kind')

    def __len__(self) -> int:
        return len(self.graph.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, second, kind = (int(v) for v in self.graph.pairs[index])
        return {
            'name': f'transitive_graph[{index}]',
            'image': (first, second),
            'kind': 'pair',
            'pair_label': int(self.graph.labels[first % len(self.nodes)]),
            'pair_kind': kind,
        }

    def load(self, record: dict[str, Any]) -> np.ndarray:
        first, second = record['image']
        n = len(self.nodes)
        start = self.nodes.start(first % n)
        # An intra pair's two views are one node's: its image is decoded once.
        shared = start if first % n == second % n else None
        return np.stack([self.nodes.view(first, start), self.nodes.view(second, shared)])

    def __repr__(self) -> str:
        return f'PairSource({len(self)} pairs)'
