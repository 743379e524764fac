"""NeRF-MAE (Irshad, Zakharov, Guizilini, Gaidon, Kira, Ambrus, ECCV 2024): masked autoencoding of radiance grids.

Reference code: zubair-irshad/NeRF-MAE@721b5ee (nerf_mae/model/mae/swin_mae3d.py SwinTransformer_MAE3D_New,
run_swin_mae3d.py, train_mae3d.sh; nerf_rpn/datasets.py). Network: jaxssl.models.swin3d.

Batch: 'grid' (B, R, R, R, 4) RGB + alpha zero-padded to R^3, 'valid' (B, R, R, R) 1 on the scene's own voxels
(jaxssl.data.radiance_grids); training grids are turned and flipped first, as the reference's loader does.

Masking (window_masking_3d, 'random'): the token grid (R / p per side) is cut into cubes of `mask_unit` tokens per
side (4 tokens = 16 voxels in the reference); each cube is masked with probability `mask_ratio` (0.75), one draw
for the whole batch (the reference masks mask[:, cube] for every scene alike); tokens past the last whole cube are
never masked. Masked tokens become the mask token after the position table.

Loss (forward_loss): L = L_rgb + L_alpha with
  L_rgb = sum over voxels with target alpha > 0.01, visible ones too, of |rgb_pred - rgb|^2 (the 3 channels summed)
          / their count (raw RGB outputs, no activation);
  L_alpha = sum over masked voxels of the scene's own extent of (sigmoid(alpha_logit) - alpha)^2 / their count;
both pooled over the batch.

Evaluation on the val grids (fixed masks): PSNR of RGB on occupied voxels (all, and masked only; the reference's
measure, pooled over the val set here, averaged over batches there), alpha MSE on masked voxels, each beside a
baseline that looks at nothing (the val set's mean colour per channel / mean alpha);
and a voxel-labelling probe (the paper's voxel labelling, here on frozen features): every stage's output is
repeated up to the token grid and concatenated (MSM's multi-level features), a class-balanced ridge regression onto
one-hot token labels (each token's majority voxel class) is fitted on `eval.probe_scenes` grids of input.split and
scored on val: mIoU over the classes and accuracy (at most eval.probe_tokens random tokens per grid); beside it the
same probe on each token's raw voxels ('voxel_probe/input'), which sees no context.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import data
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images, radiance_grids
from jaxssl.data.decode import DecodeError
from jaxssl.methods import base
from jaxssl.models.swin3d import NeRFMAE

DATASETS = ('rooms', 'folder')
PROBE_RIDGE = 1e-3  # ridge strength, relative to the mean diagonal of the class-weighted Gram matrix


def check_config(config: ml_collections.ConfigDict) -> None:
    m, i, e = config.model, config.input, config.eval
    depths, heads = tuple(m.depths), tuple(m.heads)
    if not depths or len(depths) != len(heads) or min(depths) < 1:
        raise ConfigError(f"bad values {depths} / {heads} for 'model.depths' / 'model.heads': one of each per stage")
    if m.width < 6 or m.width % 6:
        raise ConfigError(f"bad value {m.width} for 'model.width': the 3-D sin-cos table needs a multiple of 6")
    if m.patch < 1 or i.resolution < m.patch:
        raise ConfigError(f"bad value {m.patch} for 'model.patch': voxels per token side, 1 to input.resolution")
    for s, h in enumerate(heads):
        if h < 1 or (m.width * 2**s) % h:
            raise ConfigError(f"bad value {heads} for 'model.heads': stage {s}'s width {m.width * 2**s} / heads")
    if i.resolution % m.patch:
        raise ConfigError(f"bad value {i.resolution} for 'input.resolution': must be divisible by 'model.patch'")
    tokens = i.resolution // m.patch
    if tokens % 2 ** (len(depths) - 1):
        raise ConfigError(
            f"bad value {i.resolution} for 'input.resolution': its {tokens} tokens per side must halve evenly "
            f"{len(depths) - 1} times (the decoder's skips)"
        )
    if m.window < 1:
        raise ConfigError(f"bad value {m.window} for 'model.window': must be >= 1")
    if not 1 <= config.mask.unit <= tokens:
        raise ConfigError(f"bad value {config.mask.unit} for 'mask.unit': tokens per cube side, 1 to {tokens}")
    check_range(config, 'mask.ratio', 0.0, 1.0)
    check_range(config, 'input.rotate_prob', 0.0, 1.0 + 1e-9)
    check_range(config, 'input.flip_prob', 0.0, 1.0 + 1e-9)
    check_range(config, 'model.drop_path', 0.0, 1.0)
    check_choice(config, 'input.dataset', DATASETS)
    check_choice(config, 'input.density', radiance_grids.DENSITY_KINDS)
    if i.dataset == 'folder' and not i.data_root:
        raise ConfigError("'input.data_root' is empty: input.dataset 'folder' reads <data_root>/{train,val}/*.npz")
    for key, split in (('input.split', i.split), ('eval.split', e.split)):
        if i.dataset == 'rooms' and split not in radiance_grids.SPLIT_SIZES:
            raise ConfigError(
                f"bad value '{split}' for '{key}': the built-in rooms have {sorted(radiance_grids.SPLIT_SIZES)}"
            )
        if i.dataset == 'folder' and not glob.glob(os.path.join(i.data_root, split, '*.npz')):
            raise ConfigError(f"'{key}' {split}: no .npz grids in {os.path.join(i.data_root, split)}")
    for key in ('scenes', 'batch_size', 'probe_scenes', 'probe_tokens', 'probe_classes'):
        if e[key] < 1:
            raise ConfigError(f"bad value {e[key]} for 'eval.{key}': must be >= 1")


def grid_source(config: ml_collections.ConfigDict, split: str, size: int | None = None) -> Any:
    i = config.input
    if i.dataset == 'rooms':
        return radiance_grids.RoomSource(split, size)
    return radiance_grids.FolderSource(i.data_root, split, size)


def cube_mask(rng: jax.Array, tokens: int, unit: int, ratio: float) -> jax.Array:
    """(1, n, n, n) bool, True = masked: cubes of unit^3 tokens masked with probability `ratio`, one draw shared by
    the batch; the tokens past the last whole cube stay visible (window_masking_3d's loop)."""
    cubes = tokens // unit
    drawn = jax.random.bernoulli(rng, ratio, (cubes,) * 3)
    mask = jnp.repeat(jnp.repeat(jnp.repeat(drawn, unit, 0), unit, 1), unit, 2)
    rest = tokens - cubes * unit
    return jnp.pad(mask, [(0, rest)] * 3)[None]


def voxel_mask(token_mask: jax.Array, patch: int) -> jax.Array:
    """(1, n, n, n) token mask -> (1, R, R, R) voxel mask."""
    for axis in (1, 2, 3):
        token_mask = jnp.repeat(token_mask, patch, axis=axis)
    return token_mask


def nerf_mae_loss(
    prediction: jax.Array, grid: jax.Array, valid: jax.Array, masked: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(L_rgb, L_alpha) of forward_loss: prediction / grid (B, R, R, R, 4), valid (B, R, R, R), masked (1 or B,
    R, R, R) voxels. Counts of zero give 0, not NaN."""
    occupied = (grid[..., 3] > radiance_grids.OCCUPIED).astype(jnp.float32)
    rgb_error = jnp.sum((prediction[..., :3] - grid[..., :3]) ** 2, axis=-1)
    loss_rgb = jnp.sum(rgb_error * occupied) / jnp.maximum(jnp.sum(occupied), 1.0)
    region = valid * masked.astype(jnp.float32)
    alpha_error = (jax.nn.sigmoid(prediction[..., 3]) - grid[..., 3]) ** 2
    loss_alpha = jnp.sum(alpha_error * region) / jnp.maximum(jnp.sum(region), 1.0)
    return loss_rgb, loss_alpha


def token_labels(labels: np.ndarray, valid: np.ndarray, patch: int, classes: int) -> np.ndarray:
    """(B, n, n, n) majority voxel class (0 to classes - 1) of each token; -1 for tokens outside the scene or
    without labels in that range."""
    b, r = labels.shape[0], labels.shape[1]
    n = r // patch
    cells = labels.reshape(b, n, patch, n, patch, n, patch).transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, n, n, n, -1)
    counts = np.stack([(cells == k).sum(-1) for k in range(classes)], axis=-1)  # labels outside [0, classes): none
    majority = counts.argmax(-1)
    inside = valid.reshape(b, n, patch, n, patch, n, patch).max(axis=(2, 4, 6)) > 0
    return np.where(inside & (counts.sum(-1) > 0), majority, -1)


def multilevel_features(stages: list[jax.Array]) -> jax.Array:
    """Every stage's output repeated up to the first stage's grid and concatenated: (B, n, n, n, sum of widths)."""
    n = stages[0].shape[1]
    parts = []
    for x in stages:
        f = n // x.shape[1]
        for axis in (1, 2, 3):
            x = jnp.repeat(x, f, axis=axis)
        parts.append(x)
    return jnp.concatenate(parts, axis=-1)


def composite(grid: np.ndarray, axis: int = 1) -> np.ndarray:
    """An orthographic picture of a (R, R, R, 4) RGB + alpha grid: front-to-back alpha compositing along `axis`,
    white behind; the third axis (up) is drawn upward. (R, R, 3) in [0, 1]."""
    g = np.moveaxis(np.asarray(grid, np.float64), axis, 1)  # (X, depth, Z, 4)
    rgb, alpha = np.clip(g[..., :3], 0, 1), np.clip(g[..., 3:], 0, 1)
    transmittance = np.cumprod(np.concatenate([np.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], axis=1), axis=1)
    image = np.sum(transmittance * alpha * rgb, axis=1) + np.prod(1 - alpha, axis=1)
    return np.clip(image.transpose(1, 0, 2)[::-1], 0, 1)


class Method(base.Method):
    """NeRF-MAE pretraining for the trainer."""

    input_key = 'grid'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = NeRFMAE(
            patch=m.patch, width=m.width, depths=tuple(m.depths), heads=tuple(m.heads), window=m.window,
            drop_path=m.drop_path,
        )  # fmt: skip
        self.tokens = config.input.resolution // m.patch

    # --- data ----------------------------------------------------------------------------------------------------
    def _decode(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return radiance_grids.load_grid(record, self.config.input.resolution, self.config.input.density)

    def dataset(self, seed, process_index, process_count):
        i = self.config.input
        source = grid_source(self.config, i.split)

        def view(item: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
            item = radiance_grids.augment(item, rng, i.rotate_prob, i.flip_prob)
            padded = radiance_grids.pad_grid(item['grid'], i.resolution)
            return {'grid': padded['grid'], 'valid': padded['valid']}

        dataset = images.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, view=view,
            source=source, decode=lambda record: radiance_grids.read_grid(record, i.resolution, i.density),
        )  # fmt: skip
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        r = self.config.input.resolution
        rng = np.random.default_rng(0)
        return {
            'grid': rng.uniform(size=(batch_size, r, r, r, 4)).astype(np.float32),
            'valid': np.ones((batch_size, r, r, r), np.float32),
        }

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    # --- model ---------------------------------------------------------------------------------------------------
    def _mask(self, rng: jax.Array) -> jax.Array:
        return cube_mask(rng, self.tokens, self.config.mask.unit, self.config.mask.ratio)

    def init(self, rng, batch):
        grid = jnp.asarray(batch['grid'])
        return self.model.init(rng, grid, self._mask(rng))['params'], {}

    def loss(self, params, extra, batch, rng, step):
        token_mask = self._mask(base.stream(rng, 'mask'))
        out = self.model.apply({'params': params}, batch['grid'], token_mask, base.stream(rng, 'drop_path'))
        masked = voxel_mask(token_mask, self.config.model.patch)
        loss_rgb, loss_alpha = nerf_mae_loss(out['prediction'], batch['grid'], batch['valid'], masked)
        loss = loss_rgb + loss_alpha
        metrics = {
            'loss': loss,
            'loss_rgb': loss_rgb,
            'loss_alpha': loss_alpha,
            'masked_fraction': jnp.mean(token_mask.astype(jnp.float32)),
        }
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """Each stage's output averaged over its grid: 'stage<s>' (B, width 2^s)."""
        grid = batch['grid'].reshape(-1, *batch['grid'].shape[-4:])
        out = self.model.apply({'params': params}, grid)
        return {f'stage{s}': x.mean(axis=(1, 2, 3)) for s, x in enumerate(out['stages'])}

    # --- evaluation ----------------------------------------------------------------------------------------------
    @functools.cached_property
    def _predict(self):
        """(params, grid, token mask) -> the prediction (B, R, R, R, 4)."""
        return jax.jit(
            lambda params, grid, token_mask: self.model.apply({'params': params}, grid, token_mask)['prediction']
        )

    @functools.cached_property
    def _features(self):
        """(params, grid) -> unmasked multi-level token features (B, n, n, n, D); XLA drops the unused decoder."""
        return jax.jit(lambda params, grid: multilevel_features(self.model.apply({'params': params}, grid)['stages']))

    def _batches(self, split: str, scenes: int, skipped: list[int] | None = None):
        """Decoded grids of the first `scenes` of `split`, in batches of eval.batch_size ('grid', 'valid',
        'labels'), decoded as they are needed (a 160^3 split is never held whole); unreadable ones are skipped and
        counted in `skipped[0]`."""
        source = grid_source(self.config, split, scenes)
        chunk = []
        for index in range(len(source)):
            try:
                chunk.append(self._decode(source[index]))
            except DecodeError:
                if skipped is not None:
                    skipped[0] += 1
            if len(chunk) == self.config.eval.batch_size or (chunk and index == len(source) - 1):
                yield {key: np.stack([item[key] for item in chunk]) for key in chunk[0]}
                chunk = []

    def _probe_rows(self, batch: dict[str, np.ndarray], features: np.ndarray, rng: np.random.Generator):
        """(design rows [features, 1] float64, token labels) of a batch's labelled tokens, at most
        eval.probe_tokens per grid (a random subset)."""
        classes, cap = self.config.eval.probe_classes, self.config.eval.probe_tokens
        labels = token_labels(batch['labels'], batch['valid'], self.config.model.patch, classes)
        xs, ys = [], []
        for f, y in zip(features, labels, strict=True):
            y = y.reshape(-1)
            keep = np.flatnonzero(y >= 0)
            if len(keep) > cap:
                keep = np.sort(rng.choice(keep, cap, replace=False))
            xs.append(np.asarray(f.reshape(-1, f.shape[-1])[keep], np.float64))
            ys.append(y[keep])
        x = np.concatenate(xs)
        return np.concatenate([x, np.ones((len(x), 1))], axis=1), np.concatenate(ys)

    def _probe_features(self, params) -> dict[str, Any]:
        """The voxel probe's inputs, batch -> (B, n, n, n, D) token features: 'voxel_probe' the network's
        multi-level features, 'voxel_probe/input' each token's own voxels (p^3 x RGB + alpha, a baseline that
        knows nothing beyond its token)."""
        p = self.config.model.patch

        def voxels(batch):
            b, r = batch['grid'].shape[:2]
            n = r // p
            cells = batch['grid'].reshape(b, n, p, n, p, n, p, 4).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            return cells.reshape(b, n, n, n, -1)

        return {
            'voxel_probe': lambda batch: jax.device_get(self._features(params, batch['grid'])),
            'voxel_probe/input': voxels,
        }

    def _fit_probes(self, featurizers: dict[str, Any], skipped: list[int]) -> dict[str, np.ndarray]:
        """Each voxel probe's weights (features + 1, classes): a ridge regression onto one-hot token labels with
        each class weighted by 1 / its token count, from per-class Gram matrices accumulated over eval.probe_scenes
        grids of input.split, read once for all probes. A probe is left out when its grids hold fewer than 2
        labelled classes (a folder without 'labels')."""
        classes = self.config.eval.probe_classes
        rngs = {name: np.random.default_rng(0) for name in featurizers}  # the same tokens for every probe
        sums: dict[str, list[Any]] = {}  # name -> [gram, moment, counts]
        for batch in self._batches(self.config.input.split, self.config.eval.probe_scenes, skipped):
            for name, featurize in featurizers.items():
                a, y = self._probe_rows(batch, featurize(batch), rngs[name])
                if name not in sums:
                    sums[name] = [np.zeros((classes, a.shape[1], a.shape[1])), np.zeros((a.shape[1], classes)),
                                  np.zeros(classes)]  # fmt: skip
                gram, moment, counts = sums[name]
                for k in np.unique(y):
                    rows = a[y == k]
                    gram[k] += rows.T @ rows
                    moment[:, k] += rows.sum(0)
                    counts[k] += len(rows)
        probes = {}
        for name, (gram, moment, counts) in sums.items():
            if np.count_nonzero(counts) < 2:
                continue
            weight = 1.0 / np.maximum(counts, 1.0)
            total = np.einsum('k,kij->ij', weight, gram)
            ridge = PROBE_RIDGE * np.trace(total) / len(total)
            probes[name] = np.linalg.solve(total + ridge * np.eye(len(total)), moment * weight)
        return probes

    def evaluate(self, params, extra, mesh):
        e, patch = self.config.eval, self.config.model.patch
        params = jax.device_put(jax.device_get(params), jax.local_devices()[0])  # on one device, once
        featurizers, fit_skipped = self._probe_features(params), [0]
        probes = self._fit_probes(featurizers, fit_skipped)
        sums: dict[str, float] = {}

        def add(key, value):
            sums[key] = sums.get(key, 0.0) + float(value)

        key, skipped = jax.random.PRNGKey(e.mask_seed), [0]
        rngs = {name: np.random.default_rng(1) for name in probes}  # the same tokens for every probe
        predicted: dict[str, list[np.ndarray]] = {name: [] for name in probes}
        truth: dict[str, list[np.ndarray]] = {name: [] for name in probes}
        for batch in self._batches(e.split, e.scenes, skipped):
            key, sub = jax.random.split(key)
            token_mask = self._mask(sub)
            pred = jax.device_get(self._predict(params, batch['grid'], token_mask))
            masked = np.asarray(voxel_mask(token_mask, patch))
            grid, valid = batch['grid'], batch['valid']
            occupied = grid[..., 3] > radiance_grids.OCCUPIED
            sq = np.sum((pred[..., :3] - grid[..., :3]) ** 2, axis=-1)
            for name, where in (('all', occupied), ('masked', occupied & (masked > 0))):
                add(f'rgb/sq/{name}', sq[where].sum())
                add(f'rgb/n/{name}', where.sum() * 3)
                for c in range(3):  # per channel: the baseline predicts the mean colour
                    add(f'rgb/s1/{name}/{c}', grid[..., c][where].sum())
                    add(f'rgb/s2/{name}/{c}', (grid[..., c][where] ** 2).sum())
            region = valid * masked
            alpha = 1.0 / (1.0 + np.exp(-pred[..., 3]))
            add('alpha/sq', ((alpha - grid[..., 3]) ** 2 * region).sum())
            add('alpha/n', region.sum())
            add('alpha/s1', (grid[..., 3] * region).sum())
            add('alpha/s2', (grid[..., 3] ** 2 * region).sum())
            for name, w in probes.items():
                a, y = self._probe_rows(batch, featurizers[name](batch), rngs[name])
                predicted[name].append((a @ w).argmax(-1))
                truth[name].append(y)
        if not sums:
            raise ConfigError(f"'eval.split' {e.split}: no readable grids")
        results: dict[str, float] = {'eval_skipped_files': float(skipped[0] + fit_skipped[0])}
        psnr = lambda mse: float(-10.0 * np.log10(max(mse, 1e-12)))
        for name in ('all', 'masked'):
            n = max(sums[f'rgb/n/{name}'], 1.0)  # channel values: voxels x 3
            baseline = sum(sums[f'rgb/s2/{name}/{c}'] - sums[f'rgb/s1/{name}/{c}'] ** 2 / (n / 3) for c in range(3))
            results[f'psnr/{name}'] = psnr(sums[f'rgb/sq/{name}'] / n)
            results[f'psnr/{name}/mean_colour'] = psnr(baseline / n)
        n = max(sums['alpha/n'], 1.0)
        results['alpha_mse/masked'] = sums['alpha/sq'] / n
        results['alpha_mse/masked/mean_alpha'] = sums['alpha/s2'] / n - (sums['alpha/s1'] / n) ** 2
        for name in probes:
            pred, y = np.concatenate(predicted[name]), np.concatenate(truth[name])
            ious = [np.sum((pred == k) & (y == k)) / np.sum((pred == k) | (y == k)) for k in np.unique(y)]
            results[f'{name}/miou'] = float(np.mean(ious))
            results[f'{name}/accuracy'] = float(np.mean(pred == y))
        return results

    def visualize(self, params, extra):
        """The first eval.pictures val grids, one row each, composited along the second axis: the masked input
        (masked voxels empty), the prediction (sigmoid alpha) and the target, left to right."""
        from jaxssl.evaluate import reconstruction

        count = self.config.eval.pictures
        if count <= 0:
            return {}
        batches = list(self._batches(self.config.eval.split, count))
        if not batches:
            return {}
        params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
        token_mask = self._mask(jax.random.PRNGKey(self.config.eval.mask_seed))
        masked = np.asarray(voxel_mask(token_mask, self.config.model.patch))[0]
        panels = []
        for batch in batches:
            pred = jax.device_get(self._predict(params, batch['grid'], token_mask))
            for grid, p in zip(batch['grid'], pred, strict=True):
                shown = np.concatenate([p[..., :3], 1.0 / (1.0 + np.exp(-p[..., 3:]))], axis=-1)
                hidden = grid * (1.0 - masked[..., None])
                panels.append({'views': np.stack([composite(hidden), composite(shown), composite(grid)])})
        return {'reconstruction': reconstruction.grid(panels[:count], order=('views',))}
