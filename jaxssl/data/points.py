"""Point-cloud input: sources, Point-MAE's per-cloud preparation, and Grain pipelines for pretraining and evaluation.

Sources return one record per index: 'name', 'points' (a path or a float (N, >= 3) array), 'kind' ('file' | 'array')
and 'label':
  PointFolderSource      <root>/<class>/<file>.npy | .txt | .xyz: an (N, >= 3) array, or text rows of comma- or
                         space-separated numbers (ModelNet40's resampled .txt, x y z nx ny nz); the first 3
                         columns are the coordinates; labels index the sorted class names.
  SyntheticShapesSource  'synthetic_shapes', the built-in set: 8 kinds of solid's surface, generated on the fly.
Each cloud (Point-MAE's ShapeNet55Dataset and training loop): `input.num_points` of its points drawn at random
without replacement (the first ones in evaluation: a fixed subset), centred on their mean and scaled into the unit
ball (pc_norm); in training then scaled per axis by U(2/3, 3/2) and shifted by U(-0.2, 0.2)
(PointcloudScaleAndTranslate). Batches carry 'points' float32 (B, num_points, 3) and 'label'.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import folders, images, pipeline
from jaxssl.data.decode import DecodeError

POINT_EXTENSIONS = ('.npy', '.txt', '.xyz')
DATASETS = ('folder', 'synthetic_shapes')


# --- the built-in shapes ---------------------------------------------------------------------------------------------
def _mesh_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform over a triangle mesh's area."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    chosen = rng.choice(len(faces), n, p=areas / areas.sum())
    u, v = rng.random((2, n, 1))
    flip = (u + v) > 1  # reflect into the triangle: uniform barycentric coordinates
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return a[chosen] + u * (b - a)[chosen] + v * (c - a)[chosen]


_CUBE = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
_CUBE_FACES = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                        [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])  # fmt: skip
_PYRAMID = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [0, 0, 1]], float)
_PYRAMID_FACES = np.array([[0, 2, 1], [0, 3, 2], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
_TETRAHEDRON = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
_TETRAHEDRON_FACES = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])


def _round_surface(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform over the area of a sphere, cylinder, cone, torus or capsule (axis z)."""
    if kind == 'sphere':
        x = rng.normal(size=(n, 3))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    angle = rng.uniform(0, 2 * np.pi, n)
    ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    if kind == 'cylinder':  # radius 1, height 2: side 4 pi, caps 2 pi
        side = rng.random(n) < 2 / 3
        radius = np.where(side, 1.0, np.sqrt(rng.random(n)))
        z = np.where(side, rng.uniform(-1, 1, n), np.where(rng.random(n) < 0.5, -1.0, 1.0))
        return np.column_stack([ring * radius[:, None], z])
    if kind == 'cone':  # radius 1, height 2: lateral pi sqrt(5), base pi
        lateral = rng.random(n) < np.sqrt(5) / (np.sqrt(5) + 1)
        t = np.sqrt(rng.random(n))  # the distance from the apex (lateral) or the centre (base), area-uniform
        z = np.where(lateral, 1 - 2 * t, -1.0)
        return np.column_stack([ring * t[:, None], z])
    if kind == 'torus':  # radii 1 and 0.35: the tube angle drawn by rejection against the area element
        big, small = 1.0, 0.35
        tube = np.empty(0)
        while len(tube) < n:
            v = rng.uniform(0, 2 * np.pi, 2 * n)
            tube = np.concatenate([tube, v[rng.random(2 * n) < (big + small * np.cos(v)) / (big + small)]])
        tube = tube[:n]
        radius = big + small * np.cos(tube)
        return np.column_stack([ring * radius[:, None], small * np.sin(tube)])
    if kind == 'capsule':  # radius 0.5, a side of length 2 (2 pi) and two hemispheres (pi)
        side = rng.random(n) < 2 / 3
        cap = rng.normal(size=(n, 3))
        cap = 0.5 * cap / np.linalg.norm(cap, axis=1, keepdims=True)
        cap[:, 2] += np.sign(cap[:, 2])
        body = np.column_stack([0.5 * ring, rng.uniform(-1, 1, n)])
        return np.where(side[:, None], body, cap)
    raise ValueError(f'unknown shape {kind!r}')


SHAPES = ('sphere', 'cube', 'cylinder', 'cone', 'torus', 'pyramid', 'tetrahedron', 'capsule')
_MESHES = {'cube': (_CUBE, _CUBE_FACES), 'pyramid': (_PYRAMID, _PYRAMID_FACES),
           'tetrahedron': (_TETRAHEDRON, _TETRAHEDRON_FACES)}  # fmt: skip


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation drawn uniformly (Haar): QR of a Gaussian matrix with the signs fixed, determinant +1."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def synthesize_shape(kind: int, rng: np.random.Generator, num_points: int = 2048) -> np.ndarray:
    """One cloud (num_points, 3) float32 of SHAPES[kind]'s surface: stretched per axis by U(0.75, 1.25), rotated
    at random, with N(0, 0.01) jitter."""
    name = SHAPES[kind]
    if name in _MESHES:
        points = _mesh_surface(*_MESHES[name], num_points, rng)
    else:
        points = _round_surface(name, num_points, rng)
    points = points * rng.uniform(0.75, 1.25, 3)
    points = points @ random_rotation(rng).T + rng.normal(scale=0.01, size=points.shape)
    return points.astype(np.float32)


class SyntheticShapesSource:
    """The built-in point clouds: 8 kinds of solid (SHAPES), `per_class` clouds each (train 200, val 50) of 2,048
    points, generated from (split, index) on the fly; the label is the kind."""

    label_keys = ('label',)

    def __init__(self, split: str):
        if split not in ('train', 'val'):
            raise ValueError(f"synthetic_shapes has splits 'train' and 'val', not '{split}'")
        self.split = split
        self.per_class = 200 if split == 'train' else 50
        self.classes = SHAPES

    def __len__(self) -> int:
        return self.per_class * len(SHAPES)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kind = index % len(SHAPES)
        rng = np.random.default_rng([7, self.split == 'val', index])
        points = synthesize_shape(kind, rng)
        return {'name': f'synthetic_shapes/{self.split}/{index}', 'points': points, 'kind': 'array', 'label': kind}

    def __repr__(self) -> str:
        return f'SyntheticShapesSource({self.split!r}, {len(self)} clouds)'


class PointFolderSource:
    """Point files in class sub-folders of `root` (root/<class>/<file>.npy|.txt|.xyz, nested folders allowed);
    labels index the sorted class names. Files are listed once, sorted."""

    label_keys = ('label',)

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"point folder '{root}' does not exist (input.data_root / input.split)")
        self.root = root
        self.classes, self.files = folders.class_folder_files(root, POINT_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(POINT_EXTENSIONS)} files in class folders under '{root}'")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[index]
        return {'name': path, 'points': path, 'kind': 'file', 'label': label}

    def __repr__(self) -> str:
        return f'PointFolderSource({self.root!r}, {len(self)} files, {len(self.classes)} classes)'


def make_point_source(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
    """The source `config.input` names, for `split` (default: input.split)."""
    c = config.input
    split = c.split if split is None else split
    if c.dataset == 'synthetic_shapes':
        return SyntheticShapesSource(split)
    if not c.data_root:
        raise ConfigError("'input.data_root' is empty: set it to <root> with <root>/<split>/<class>/<file>.npy")
    return PointFolderSource(os.path.join(c.data_root, split))


def decode_points(record: dict[str, Any], min_points: int = 1) -> np.ndarray:
    """A record's coordinates (N, 3) float32; DecodeError for files that cannot be read, hold fewer than
    `min_points` rows or non-finite coordinates."""
    if record['kind'] == 'array':
        points = np.asarray(record['points'], np.float32)
    else:
        path = record['points']
        try:
            if path.lower().endswith('.npy'):
                points = np.load(path, allow_pickle=False)
            else:
                with open(path) as f:
                    rows = [line.replace(',', ' ').split() for line in f if line.strip()]
                points = np.asarray(rows, np.float64)
        except (OSError, ValueError, EOFError) as e:
            raise DecodeError(f'cannot read {record["name"]}: {e}') from e
        points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] < 3:
        raise DecodeError(f'{record["name"]} holds shape {points.shape}: need (points, >= 3)')
    points = points[:, :3]
    if len(points) < min_points:
        raise DecodeError(f'{record["name"]} has {len(points)} points, fewer than input.num_points ({min_points})')
    if not np.all(np.isfinite(points)):
        raise DecodeError(f'{record["name"]} has non-finite coordinates')
    return points


def normalize(points: np.ndarray) -> np.ndarray:
    """pc_norm: centred on the mean, divided by the largest distance from it."""
    points = points - points.mean(axis=0)
    return points / max(float(np.sqrt((points**2).sum(axis=1)).max()), 1e-12)


def example(points: np.ndarray, input_config: Any, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """One cloud's model input {'points': (num_points, 3) float32}: a random subset and the scale-and-translate
    augmentation with `rng` (training), the first num_points without (evaluation); normalised either way."""
    c = input_config
    if rng is None:
        chosen = points[: c.num_points]
    else:
        chosen = points[rng.permutation(len(points))[: c.num_points]]
    chosen = normalize(chosen.astype(np.float64))
    if rng is not None:
        chosen = chosen * rng.uniform(*c.scale_range, 3) + rng.uniform(-c.translate, c.translate, 3)
    return {'points': chosen.astype(np.float32)}


def make_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source: Any = None,
) -> grain.IterDataset:
    """Host-local pretraining batches {'points' (B_local, num_points, 3), 'label'}: the image pipeline's sharding,
    shuffling, resume and skip-and-count policy, with the point decoder and `example` in place of the image's."""
    c = config.input
    return images.make_image_pretrain_dataset(
        config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        view=lambda points, rng: example(points, c, rng),
        source=make_point_source(config) if source is None else source,
        decode=functools.partial(decode_points, min_points=c.num_points),
    )


class EvalPointLoader:
    """Grain map function: source index -> one cloud's evaluation input as a 1-view stack; an unreadable file
    yields `valid` 0 and zeros, and is counted (evaluation must see every example)."""

    def __init__(self, source: Any, config: ml_collections.ConfigDict, num_clips: int = 1, num_crops: int = 1):
        del num_clips, num_crops  # pipeline.make_eval_dataset's loader signature
        self.source, self.input = source, config.input

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        try:
            points, valid = example(decode_points(record, self.input.num_points), self.input)['points'], 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            points, valid = np.zeros((self.input.num_points, 3), np.float32), 0
        return {'points': points[None], 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def make_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a split: 'points' (B, 1, num_points, 3), 'index', 'valid', 'label'."""
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_examples,
        source=make_point_source(config, split),
        loader_cls=EvalPointLoader,
    )


def add_points_input_config(config: ml_collections.ConfigDict, *, runlocal: bool = False) -> None:
    """The `input` section of a point-cloud method's config (the built-in synthetic shapes with `runlocal`)."""
    c = config.input = ml_collections.ConfigDict()
    c.dataset = 'synthetic_shapes' if runlocal else 'folder'
    c.data_root = ''  # 'folder': <data_root>/<split>/<class>/<file>.npy|.txt|.xyz
    c.split = 'train'
    c.num_points = 512 if runlocal else 1024
    c.scale_range = (2.0 / 3.0, 3.0 / 2.0)  # per-axis scale in training
    c.translate = 0.2  # per-axis shift in training, U(-translate, translate)
    c.global_batch = 32 if runlocal else 128
    c.num_sample = 1  # views per example (the image pipeline's field)
    c.num_workers = 0 if runlocal else 8
    c.read_threads = 2 if runlocal else 1


def check_points_input_config(config: ml_collections.ConfigDict) -> None:
    c = config.input
    check_choice(config, 'input.dataset', DATASETS)
    if c.num_points < 1:
        raise ConfigError(f"bad value {c.num_points} for 'input.num_points': must be >= 1")
    low, high = c.scale_range
    if not 0 < low <= high:
        raise ConfigError(f"bad 'input.scale_range' {tuple(c.scale_range)}: need 0 < low <= high")
    if c.translate < 0:
        raise ConfigError(f"bad value {c.translate} for 'input.translate': must be >= 0")
