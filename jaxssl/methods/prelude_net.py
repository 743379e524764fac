"""PreludeNet (Ziskind, Kim, Burachas, arXiv 2207.02972): a PredNet encoder trained self-supervised on next-frame
prediction, with decoders trained on depth labels to infer the current frame's depth and predict the next one's;
evaluated for depth accuracy and for invariance to lighting.

Reference code: PredNet's official Keras code (coxlab/prednet@843b452: prednet.py, kitti_train.py,
kitti_evaluate.py); PreludeNet's own code, decoder wiring, loss weights and dataset are not public, so the decoders,
the hybrid rule and the data are reconstructions (jaxssl.models.prednet, jaxssl.data.lit_scenes, docs/methods.md).

Batch: 'frames' (B, T, S, S, 3) in [0, 1] (PredNet's input, X / 255, no normalisation), 'depth' (B, T, S, S) divided
by input.depth_scale, 'valid' (B, T, S, S) 1 where depth has a target (not the sky, nor beyond the renderer's far
limit).

Loss = prednet_weight x PredNet's loss + depth_weight x (infer L1 + predict L1). PredNet's loss as kitti_train.py: the
mean |E_l| of each layer and step, weighted by layer (L_0: (1, 0, 0, 0); L_all: (1, 0.1, 0.1, 0.1)) and by step
(0 for the first, whose prediction is blind, 1 / (T - 1) for the others), averaged over the batch. The infer decoder's
L1 covers every step, the predict decoder's the steps after the first (its first state has seen nothing). The
depth gradient reaches the encoder scaled by model.depth_grad_scale (0: the paper's self-supervised encoder).

Evaluation on the val scenes, each rendered under every lighting of lit_scenes.EVAL_LIGHTINGS (or each lighting a
folder file holds): depth RMSE of both decoders per lighting (world units) and its spread over lightings; next-frame
MSE against the copy-last-frame baseline (kitti_evaluate.py's measures); two depth baselines that look at nothing,
each pixel's mean depth over the eval clips (infer's) and the previous step's true depth (predict's); and the
lighting invariance of each encoder layer, 1 - E|R(scene, lighting k) - R(scene, reference)|^2 / E|R(scene) -
R(other scene)|^2 under the reference lighting (1: lighting changes nothing, 0: it changes R as much as another
scene does), and of the inferred depth (RMSE between lightings).
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
from jaxssl.data import images, lit_scenes
from jaxssl.data.decode import DecodeError
from jaxssl.methods import base
from jaxssl.models.prednet import PreludeNet
from jaxssl.optim import OPTIMIZERS

DATASETS = ('lit_scenes', 'folder')
LIGHTINGS = ('random', 'reference')


def check_config(config: ml_collections.ConfigDict) -> None:
    m, c, i = config.model, config.loss, config.input
    stacks, rs, widths = tuple(m.stack_sizes), tuple(m.r_stack_sizes), tuple(m.decoder_widths)
    if len(stacks) < 1 or any(not isinstance(s, int) or s < 1 for s in stacks + rs + widths):
        raise ConfigError(f"bad value {stacks} for 'model.stack_sizes': positive channel counts, one per layer")
    if stacks[0] != 3:
        raise ConfigError(f"bad value {stacks} for 'model.stack_sizes': the first entry is the input's 3 channels")
    for key, value in (('model.r_stack_sizes', rs), ('model.decoder_widths', widths)):
        if len(value) != len(stacks):
            raise ConfigError(f"bad value {value} for '{key}': one entry per layer of 'model.stack_sizes' {stacks}")
    if len(tuple(c.layer_weights)) != len(stacks) or min(c.layer_weights) < 0:
        raise ConfigError(f"bad value {tuple(c.layer_weights)} for 'loss.layer_weights': {len(stacks)} weights >= 0")
    check_range(config, 'model.depth_grad_scale', 0.0, 1.0 + 1e-9)
    for key in ('prednet_weight', 'depth_weight'):
        check_range(config, f'loss.{key}', 0.0, float('inf'))
    if c.prednet_weight == 0 and c.depth_weight == 0:
        raise ConfigError("'loss.prednet_weight' and 'loss.depth_weight' are both 0: nothing to train")
    if i.image_size % 2 ** (len(stacks) - 1):
        raise ConfigError(
            f"bad value {i.image_size} for 'input.image_size': must be divisible by 2^{len(stacks) - 1} (one 2x2 "
            "pooling between the layers of 'model.stack_sizes')"
        )
    if not isinstance(i.frames, int) or i.frames < 2:
        raise ConfigError(f"bad value {i.frames!r} for 'input.frames': PredNet needs 2 or more frames")
    check_choice(config, 'input.dataset', DATASETS)
    check_choice(config, 'input.lighting', LIGHTINGS)
    check_choice(config, 'model.dtype', ('float32', 'bfloat16'))
    if c.prednet_weight > 0 and max(c.layer_weights) == 0:
        raise ConfigError("'loss.layer_weights' are all 0 while 'loss.prednet_weight' > 0: the PredNet loss would be 0")
    # The splits are checked now, not when the evaluation at the end of a long run first reads them.
    for key in ('input.split', 'eval.split'):
        split = i.split if key == 'input.split' else config.eval.split
        if i.dataset == 'lit_scenes' and split not in lit_scenes.SPLIT_SIZES:
            raise ConfigError(
                f"bad value '{split}' for '{key}': the built-in lit scenes have {sorted(lit_scenes.SPLIT_SIZES)}"
            )
        if i.dataset == 'folder' and i.data_root and not glob.glob(os.path.join(i.data_root, split, '*.npz')):
            raise ConfigError(
                f"'{key}' {split}: no .npz clips in {os.path.join(i.data_root, split)} ('input.data_root')"
            )
    if i.dataset == 'folder' and not i.data_root:
        raise ConfigError("'input.data_root' is empty: input.dataset 'folder' reads <data_root>/{train,val}/*.npz")
    if not i.depth_scale > 0:
        raise ConfigError(f"bad value {i.depth_scale} for 'input.depth_scale': must be > 0")
    if i.num_sample != 1:
        raise ConfigError(f"bad value {i.num_sample} for 'input.num_sample': one clip per example")
    for key in ('scenes', 'batch_size'):
        if config.eval[key] < 2:
            raise ConfigError(f"bad value {config.eval[key]} for 'eval.{key}': the invariance measure needs 2 or more")
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"bad value '{config.optim.name}' for 'optim.name'; valid: {', '.join(OPTIMIZERS)}")


# --- data ------------------------------------------------------------------------------------------------------------
class FolderSource:
    """Clips with depth in <root>/<split>/*.npz: 'frames' (T, H, W, 3) uint8 or [0, 1] floats, or (K, T, H, W, 3)
    for the same clip under K lightings (the invariance evaluation's input), and 'depth' (T, H, W), invalid where not
    finite or <= 0. Files are read when an example needs them; unreadable ones are skipped and counted."""

    label_keys: tuple[str, ...] = ()

    def __init__(self, root: str, split: str):
        self.root = os.path.join(root, split)
        self.files = sorted(glob.glob(os.path.join(self.root, '*.npz')))
        if not self.files:
            raise ConfigError(f"'input.data_root': no .npz clips in {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {'name': self.files[index], 'path': self.files[index]}


def load_clip(record: dict[str, Any], size: int, frames: int) -> dict[str, np.ndarray]:
    """A folder record's arrays: 'frames' float32 (K, T', S, S, 3) in [0, 1] (centre-cropped to S), 'depth' (T', S,
    S) with 0 where invalid. Raises DecodeError on anything the pipeline should skip and count."""
    try:
        with np.load(record['path'], allow_pickle=False) as f:
            clip, depth = np.asarray(f['frames']), np.asarray(f['depth'], np.float32)
    except Exception as e:  # a missing, truncated or corrupt file (BadZipFile, zlib.error, ...): skip it
        raise DecodeError(f'cannot read {record["name"]}: {type(e).__name__}: {e}') from e
    clip = clip[None] if clip.ndim == 4 else clip
    if clip.ndim != 5 or clip.shape[0] < 1 or clip.shape[-1] != 3 or depth.shape != clip.shape[1:4]:
        raise DecodeError(f'{record["name"]}: frames {clip.shape} and depth {depth.shape} do not match (K, T, H, W, 3)')
    if not (np.issubdtype(clip.dtype, np.integer) or np.issubdtype(clip.dtype, np.floating)):
        raise DecodeError(f'{record["name"]}: frames of dtype {clip.dtype}, need uint8 or floats')
    if clip.shape[1] < frames or min(clip.shape[2:4]) < size:
        raise DecodeError(f'{record["name"]}: {clip.shape[1:4]} (T, H, W) is smaller than {frames} x {size} x {size}')
    clip = clip.astype(np.float32) / 255.0 if clip.dtype == np.uint8 else clip.astype(np.float32)
    if not np.all(np.isfinite(clip)) or clip.min() < 0 or clip.max() > 1:
        raise DecodeError(f'{record["name"]}: frames must be uint8 or floats in [0, 1]')
    top, left = (clip.shape[2] - size) // 2, (clip.shape[3] - size) // 2
    window = (slice(top, top + size), slice(left, left + size))
    depth = depth[:, window[0], window[1]]
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0)
    return {'frames': clip[:, :, window[0], window[1]], 'depth': depth}


class Clips:
    """The examples of one split, built in or from a folder: `source[i]` -> a record, `views(record, lightings)` the
    (K, T, S, S, 3) frames, depth and valid mask of its clip under K lightings."""

    def __init__(self, config: ml_collections.ConfigDict, split: str, size: int | None = None):
        self.config = config
        i = config.input
        if i.dataset == 'lit_scenes':
            self.source = lit_scenes.LitSceneSource(split, size)
        else:
            self.source = FolderSource(i.data_root, split)

    def decode(self, record: dict[str, Any]) -> Any:
        if 'scene' in record:
            return record['scene']
        return load_clip(record, self.config.input.image_size, self.config.input.frames)

    def views(self, item: Any, lightings: Any, start: int = 0) -> dict[str, np.ndarray]:
        """lightings: Lighting objects (built-in scenes) or indices into a folder clip's lightings."""
        i = self.config.input
        if isinstance(item, lit_scenes.Scene):
            renders = [lit_scenes.render(item, light, i.frames, i.image_size) for light in lightings]
            frames = np.stack([r['frames'] for r in renders])
            depth, valid = renders[0]['depth'], renders[0]['valid']
        else:
            window = slice(start, start + i.frames)
            frames = item['frames'][np.asarray(lightings), window]
            depth = item['depth'][window]
            valid = depth > 0
        return {
            'frames': frames,
            'depth': (depth / i.depth_scale).astype(np.float32),
            'valid': valid.astype(np.float32),
        }

    def train_view(self, item: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One clip under one lighting: drawn (input.lighting 'random') or the reference; a random window of a
        longer folder clip."""
        reference = self.config.input.lighting == 'reference'
        if isinstance(item, lit_scenes.Scene):
            view = self.views(item, [lit_scenes.EVAL_LIGHTINGS[0] if reference else lit_scenes.sample_lighting(rng)])
        else:
            kinds, length = item['frames'].shape[:2]
            start = int(rng.integers(0, length - self.config.input.frames + 1))
            view = self.views(item, [0 if reference else int(rng.integers(0, kinds))], start)
        view['frames'] = view['frames'][0]
        return view

    def eval_lightings(self, item: Any) -> list[Any]:
        if isinstance(item, lit_scenes.Scene):
            return list(lit_scenes.EVAL_LIGHTINGS)
        return list(range(item['frames'].shape[0]))


def invariance(features: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over the batch of |f - ref|^2, sum of |ref - ref of the previous scene in the batch (the first: the
    last)|^2) for (B, ...) features of the same scenes under another lighting and the reference one; 1 - first /
    second is the invariance. Which scenes are compared depends on the batch (eval.batch_size)."""
    within = jnp.sum((features - reference) ** 2, axis=tuple(range(1, features.ndim)))
    between = jnp.sum((reference - jnp.roll(reference, 1, axis=0)) ** 2, axis=tuple(range(1, features.ndim)))
    return within.sum(), between.sum()


def time_weights(steps: int) -> np.ndarray:
    """kitti_train.py's weights over steps: 0 for the first (blind) prediction, 1 / (T - 1) for the others."""
    weights = np.full(steps, 1.0 / (steps - 1), np.float32)
    weights[0] = 0.0
    return weights


def prednet_loss(errors: jax.Array, layer_weights: Any) -> jax.Array:
    """PredNet's loss from the per-layer mean errors (B, T, L): sum over steps and layers, mean over the batch."""
    weights = jnp.asarray(time_weights(errors.shape[1]))[:, None] * jnp.asarray(layer_weights, jnp.float32)
    return jnp.mean(jnp.sum(errors * weights, axis=(1, 2)))


def masked_l1(prediction: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.abs(prediction - target) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


class Method(base.Method):
    """PreludeNet (and PredNet alone with loss.depth_weight = 0) for the trainer."""

    input_key = 'frames'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = PreludeNet(
            stack_sizes=tuple(m.stack_sizes),
            r_stack_sizes=tuple(m.r_stack_sizes),
            decoder_widths=tuple(m.decoder_widths),
            depth_grad_scale=float(m.depth_grad_scale),
            dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
        )

    # --- data ----------------------------------------------------------------------------------------------------
    def dataset(self, seed, process_index, process_count):
        clips = Clips(self.config, self.config.input.split)
        dataset = images.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count,
            view=clips.train_view, source=clips.source, decode=clips.decode,
        )  # fmt: skip
        return dataset, len(clips.source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        i = self.config.input
        shape = (batch_size, i.frames, i.image_size, i.image_size)
        rng = np.random.default_rng(0)
        return {
            'frames': rng.uniform(size=(*shape, 3)).astype(np.float32),
            'depth': rng.uniform(size=shape).astype(np.float32),
            'valid': np.ones(shape, np.float32),
        }

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    # --- model ---------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        return self.model.init(rng, jnp.asarray(batch['frames']))['params'], {}

    def loss(self, params, extra, batch, rng, step):
        out = self.model.apply({'params': params}, batch['frames'])
        c = self.config.loss
        prednet = prednet_loss(out['errors'], tuple(c.layer_weights))
        depth, valid = batch['depth'], batch['valid']
        infer = masked_l1(out['infer'], depth, valid)
        predict = masked_l1(out['predict'][:, 1:], depth[:, 1:], valid[:, 1:])
        loss = c.prednet_weight * prednet + c.depth_weight * (infer + predict)
        metrics = {
            'loss': loss,
            'prednet': prednet,
            'depth_infer_l1': infer,
            'depth_predict_l1': predict,
            'frame_mse': jnp.mean((out['prediction'][:, 1:] - batch['frames'][:, 1:]) ** 2),
        }
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """Each layer's R at the last step (formed from the frames before the last), averaged over space:
        'r<level>' (B, R_level)."""
        frames = batch['frames']
        out = self.model.apply({'params': params}, frames.reshape(-1, *frames.shape[-4:]), return_states=True)
        return {f'r{level}': r[:, -1].mean(axis=(1, 2)) for level, r in enumerate(out['r'])}

    # --- evaluation ----------------------------------------------------------------------------------------------
    @functools.cached_property
    def _forward(self):
        return jax.jit(lambda params, frames: self.model.apply({'params': params}, frames, return_states=True))

    def _eval_records(self, clips: Clips) -> tuple[list[dict[str, Any]], int, int]:
        """(the readable records among the first eval.scenes of eval.split, how many were skipped, the lighting
        count they share). Each is decoded once here to check it and again when its batch is evaluated, so a folder
        split is never held in memory whole."""
        records, kinds, skipped = [], set(), 0
        for index in range(min(len(clips.source), self.config.eval.scenes)):
            record = clips.source[index]
            try:
                kinds.add(len(clips.eval_lightings(clips.decode(record))))
                records.append(record)
            except DecodeError:
                skipped += 1
        if len(records) < 2:
            raise ConfigError(f"'eval.split' {self.config.eval.split}: {len(records)} readable clips, need 2 or more")
        if len(kinds) != 1:
            raise ConfigError(f'eval clips hold different numbers of lightings ({sorted(kinds)}); need one count')
        return records, skipped, kinds.pop()

    def evaluate(self, params, extra, mesh):
        e, i = self.config.eval, self.config.input
        clips = Clips(self.config, e.split, e.scenes)
        records, skipped, kinds = self._eval_records(clips)
        params = jax.device_put(jax.device_get(params), jax.local_devices()[0])  # on one device, once
        sums: dict[str, float] = {}
        pixel: dict[str, np.ndarray] = {}  # per-pixel sums of valid depth over clips and steps

        def add(key, value):
            sums[key] = sums.get(key, 0.0) + float(value)

        # Batches of eval.batch_size to 2 x eval.batch_size - 1 clips: never one alone, since the invariance
        # measure compares the scenes within a batch.
        for chunk_index in np.array_split(np.arange(len(records)), max(1, len(records) // e.batch_size)):
            items = [clips.decode(records[j]) for j in chunk_index]
            views = [clips.views(item, clips.eval_lightings(item)) for item in items]
            depth = np.stack([v['depth'] for v in views]) * i.depth_scale
            valid = np.stack([v['valid'] for v in views])
            for name, value in (('n', valid), ('s1', depth * valid), ('s2', depth**2 * valid)):
                pixel[name] = pixel.get(name, 0.0) + value.sum(axis=(0, 1))
            both = valid[:, 1:] * valid[:, :-1]
            add('copy_depth/sq', ((depth[:, 1:] - depth[:, :-1]) ** 2 * both).sum())
            add('copy_depth/n', both.sum())
            reference = None
            for k in range(kinds):
                frames = np.stack([v['frames'][k] for v in views])
                out = jax.device_get(self._forward(params, frames))
                for head in ('infer', 'predict'):
                    skip = 1 if head == 'predict' else 0
                    err = (out[head][:, skip:] * i.depth_scale - depth[:, skip:]) ** 2 * valid[:, skip:]
                    add(f'{head}/sq/{k}', err.sum())
                    add(f'{head}/n/{k}', valid[:, skip:].sum())
                add(f'frame/sq/{k}', ((out['prediction'][:, 1:] - frames[:, 1:]) ** 2).mean(axis=(1, 2, 3, 4)).sum())
                add(f'copy/sq/{k}', ((frames[:, :-1] - frames[:, 1:]) ** 2).mean(axis=(1, 2, 3, 4)).sum())
                add(f'frame/n/{k}', len(frames))
                if reference is None:
                    reference = out
                    continue
                for level, (r, ref) in enumerate(zip(out['r'], reference['r'], strict=True)):
                    within, between = invariance(r, ref)
                    add(f'inv/w/{level}', within)
                    add(f'inv/b/{level}', between)
                add('shift/sq', ((out['infer'] - reference['infer']) ** 2 * valid * i.depth_scale**2).sum())
                add('shift/n', valid.sum())
        results: dict[str, float] = {'eval_skipped_files': float(skipped)}
        for head in ('infer', 'predict'):
            rmse = [np.sqrt(sums[f'{head}/sq/{k}'] / max(sums[f'{head}/n/{k}'], 1.0)) for k in range(kinds)]
            results.update({f'depth_rmse/{head}/lighting{k}': float(v) for k, v in enumerate(rmse)})
            results[f'depth_rmse/{head}'] = float(np.mean(rmse))
            results[f'depth_rmse/{head}/spread'] = float(np.max(rmse) - np.min(rmse))
        # Baselines a decoder reaches without looking: each pixel's mean depth over the eval clips (infer's), and
        # the previous step's true depth (predict's).
        residual = pixel['s2'] - pixel['s1'] ** 2 / np.maximum(pixel['n'], 1.0)
        results['depth_rmse/pixel_mean'] = float(np.sqrt(residual.sum() / max(pixel['n'].sum(), 1.0)))
        results['depth_rmse/copy_last'] = float(np.sqrt(sums['copy_depth/sq'] / max(sums['copy_depth/n'], 1.0)))
        frame = [sums[f'frame/sq/{k}'] / sums[f'frame/n/{k}'] for k in range(kinds)]
        copy = [sums[f'copy/sq/{k}'] / sums[f'frame/n/{k}'] for k in range(kinds)]
        results['next_frame_mse'] = float(np.mean(frame))
        results['copy_last_mse'] = float(np.mean(copy))
        if kinds > 1:
            for level in range(len(self.config.model.stack_sizes)):
                within, between = sums[f'inv/w/{level}'], sums[f'inv/b/{level}']
                results[f'invariance/r{level}'] = float(1.0 - within / max(between, 1e-12))
            results['depth_shift_rmse/infer'] = float(np.sqrt(sums['shift/sq'] / max(sums['shift/n'], 1.0)))
        return results

    def visualize(self, params, extra):
        """The first val clip under each eval lighting: frames, PredNet's frame predictions, true depth, inferred
        and predicted depth (rows), steps left to right."""
        from jaxssl.evaluate import reconstruction

        if self.config.eval.pictures <= 0:
            return {}
        clips = Clips(self.config, self.config.eval.split)
        for index in range(len(clips.source)):  # the first readable clip
            try:
                item = clips.decode(clips.source[index])
                break
            except DecodeError:
                continue
        else:
            return {}
        params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
        views = clips.views(item, clips.eval_lightings(item))
        depth = np.repeat(np.clip(views['depth'], 0, 1)[..., None], 3, axis=-1)
        panels = []
        for frames in views['frames']:
            out = jax.device_get(self._forward(params, frames[None]))
            grey = lambda d: np.repeat(np.clip(d[0], 0, 1)[..., None], 3, axis=-1)
            panels.append({
                'frames': frames, 'prediction': out['prediction'][0], 'depth': depth,
                'infer': grey(out['infer']), 'predict': grey(out['predict']),
            })  # fmt: skip
        order = ('frames', 'prediction', 'depth', 'infer', 'predict')
        return {'depth': reconstruction.grid(panels, order=order)}
