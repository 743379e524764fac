"""Uni4Eye (Cai et al., MICCAI 2022): MAE on 2-D images and 3-D volumes through one encoder, with a dual-branch
decoder that reconstructs the masked patches' pixels and their gradient map.

Batch layout (every step carries both dimensionalities; see docs/methods.md for why mixed, not alternating):
  'image' (B, H, W, 3) ImageNet-normalised, 'ids_keep' (B, n) / 'ids_restore' (B, L) its MAE mask, 'label' (B,);
  'volume' (B, D, H3, W3, 1) z-scored, 'volume_ids_keep' (B, n3) / 'volume_ids_restore' (B, L3) its own mask, and
  'volume_label' (B,). Masks are drawn per sample in the input pipeline (jaxssl.masks.shuffle_masking).
Loss = sum over {image, volume} of pixel_weight * L_pixel + gradient_weight * L_gradient, each an MSE averaged over
the removed patches only, as MAE's; L_gradient's target is the Sobel gradient map G = 0.5 |G_x| + 0.5 |G_y| of the
network input (per channel, per 2-D slice for volumes), the successor code's formula.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_range
from jaxssl.data import volumes
from jaxssl.methods import base, mae
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mae as mae_model
from jaxssl.models import uni4eye as uni4eye_model

# OpenCV's Sobel kernels: the derivative taps and the smoothing taps of each aperture size; the 2-D kernel for the
# x derivative is outer(smoothing along y, derivative along x).
SOBEL = {
    3: (np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])),
    5: (np.array([-1.0, -2.0, 0.0, 2.0, 1.0]), np.array([1.0, 4.0, 6.0, 4.0, 1.0])),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks or volume generator cannot use."""
    mae.check_config(config)
    if config.loss.sobel_size not in SOBEL:
        raise ConfigError(f"bad value {config.loss.sobel_size!r} for 'loss.sobel_size'; valid: 3, 5")
    for key in ('loss.pixel_weight', 'loss.gradient_weight'):
        check_range(config, key, 0.0, float('inf'))
    c = config.input
    try:
        volumes.check_volume_shape(c.volume_depth, c.volume_size)
    except ValueError as e:
        raise ConfigError(f"bad value for 'input.volume_depth' / 'input.volume_size': {e}") from None
    patch = mae_model.decode_variant(config.model.variant)['patch']
    depth_patch = config.model.depth_patch
    if not isinstance(depth_patch, int) or depth_patch < 1:
        raise ConfigError(f"bad value {depth_patch!r} for 'model.depth_patch': must be an integer >= 1")
    try:
        grid = uni4eye_model.volume_grid((c.volume_depth, c.volume_size, c.volume_size), (depth_patch, patch, patch))
        masks.num_kept(int(np.prod(grid)), config.masking.ratio)
    except ValueError as e:
        keys = "'input.volume_depth' / 'input.volume_size' / 'model.depth_patch'"
        raise ConfigError(f'bad value for {keys}: {e}') from None


def make_model(config: ml_collections.ConfigDict) -> uni4eye_model.Uni4EyePretrain:
    m = config.model
    return uni4eye_model.make_pretrain_model(
        m.variant,
        depth_patch=m.depth_patch,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def sobel_gain(size: int) -> float:
    """The response of a Sobel kernel to a unit step edge (4 for 3x3, 48 for 5x5)."""
    derivative, smoothing = SOBEL[size]
    return float(derivative[derivative > 0].sum() * smoothing.sum())


def gradient_map(x: jax.Array, size: int = 5) -> jax.Array:
    """Sobel gradient map of (B, ..., H, W, C) inputs over their last two spatial axes (H, W), per channel and per
    leading slice: 0.5 |G_x| + 0.5 |G_y| with OpenCV's kernels of aperture `size` and its default border
    (BORDER_REFLECT_101, numpy's 'reflect'), divided by `sobel_gain(size)` so that a unit step edge gives 1: the
    target then has the pixels' scale (the successor code instead saturates OpenCV's output to uint8).
    Same shape, float32."""
    derivative, smoothing = SOBEL[size]
    x = x.astype(jnp.float32)
    h_axis, w_axis = x.ndim - 3, x.ndim - 2
    r = size // 2
    pad = [(0, 0)] * x.ndim
    pad[h_axis] = pad[w_axis] = (r, r)
    xp = jnp.pad(x, pad, mode='reflect')
    height, width = x.shape[h_axis], x.shape[w_axis]

    def correlate(y: jax.Array, taps: np.ndarray, axis: int, length: int) -> jax.Array:
        # Separable correlation as a sum of shifted slices: a handful of taps, no convolution kernel needed.
        return sum(float(t) * jax.lax.slice_in_dim(y, k, k + length, axis=axis) for k, t in enumerate(taps))

    gx = correlate(correlate(xp, derivative, w_axis, width), smoothing, h_axis, height)
    gy = correlate(correlate(xp, smoothing, w_axis, width), derivative, h_axis, height)
    return (0.5 * jnp.abs(gx) + 0.5 * jnp.abs(gy)) / sobel_gain(size)


def targets(x: jax.Array, patch: tuple[int, ...], normalize: bool, sobel_size: int) -> dict[str, jax.Array]:
    """Per-patch targets (B, L, prod(patch) * C) of both branches: the input's pixels and its gradient map, each
    per-patch normalised (MAE's norm_pix) if `normalize`."""

    def finish(values: jax.Array) -> jax.Array:
        patches = uni4eye_model.patchify(values.astype(jnp.float32), patch)
        return jax.lax.stop_gradient(mae.norm_pix(patches) if normalize else patches)

    return {'pixel': finish(x), 'gradient': finish(gradient_map(x, sobel_size))}


def input_losses(
    model: uni4eye_model.Uni4EyePretrain,
    params: Any,
    x: jax.Array,
    ids_keep: jax.Array,
    ids_restore: jax.Array,
    loss_config: ml_collections.ConfigDict,
    rng: jax.Array | None = None,
    train: bool = True,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """({'pixel': L, 'gradient': L} masked-patch MSEs of one input kind, removed-patch count)."""
    rngs = {'drop_path': rng} if train and rng is not None else {}
    predictions, _ = model.apply({'params': params}, x, ids_keep, ids_restore, train=train, rngs=rngs)
    patch = model.patch_3d if x.ndim == 5 else model.patch_2d
    target = targets(x, patch, loss_config.norm_pix_loss, loss_config.sobel_size)
    mask = masks.removed_mask(ids_restore, ids_keep.shape[1])
    losses = {k: mae.masked_patch_mse(predictions[k], target[k], mask) for k in uni4eye_model.BRANCHES}
    return losses, jnp.sum(mask)


def compute_loss(
    model: uni4eye_model.Uni4EyePretrain,
    params: Any,
    batch: dict[str, jax.Array],
    loss_config: ml_collections.ConfigDict,
    rng: jax.Array | None = None,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Uni4Eye objective on a batch carrying images and volumes (layout in the module docstring)."""
    weights = {'pixel': loss_config.pixel_weight, 'gradient': loss_config.gradient_weight}
    total, metrics, patches = 0.0, {}, 0.0
    for index, (kind, prefix) in enumerate((('2d', ''), ('3d', 'volume_'))):
        x = batch['image'] if kind == '2d' else batch['volume']
        kind_rng = None if rng is None else jax.random.fold_in(rng, index)  # own drop-path draws per input kind
        losses, count = input_losses(
            model, params, x, batch[f'{prefix}ids_keep'], batch[f'{prefix}ids_restore'], loss_config, kind_rng, train
        )
        for branch, value in losses.items():
            total = total + weights[branch] * value
            metrics[f'loss_{branch}_{kind}'] = value
        patches = patches + count
    return total, {'loss': total, 'loss_patches': patches, **metrics}


class Method(mae.Method):
    """Uni4Eye pretraining for the trainer: MAE's data, probes and pictures for the 2-D half, plus volumes."""

    build_model = staticmethod(make_model)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = config.input
        self.volume_shape = (c.volume_depth, c.volume_size, c.volume_size)
        grid = uni4eye_model.volume_grid(self.volume_shape, self.model.patch_3d)
        self.num_volume_tokens = int(np.prod(grid))
        self.num_volume_keep = masks.num_kept(self.num_volume_tokens, config.masking.ratio)

    def sample_volume(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One stand-in volume with its own mask; runs in the Grain pipeline next to each image."""
        volume, label = volumes.sample_volume(rng, self.config.input.volume_depth, self.config.input.volume_size)
        vmask = masks.shuffle_masking(self.num_volume_tokens, self.config.masking.ratio, rng)
        return {'volume': volume, 'volume_label': np.int32(label), **{f'volume_{k}': v for k, v in vmask.items()}}

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**super().sample_transform(sample, rng), **self.sample_volume(rng)}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(batch_size)
        rng = np.random.default_rng(1)
        samples = [self.sample_volume(rng) for _ in range(batch_size)]
        return {**batch, **{k: np.stack([s[k] for s in samples]) for k in samples[0]}}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        keys = ('image', 'ids_keep', 'ids_restore', 'volume', 'volume_ids_keep', 'volume_ids_restore')
        return uni4eye_model.init_params(self.model, rng, *(batch[k] for k in keys)), {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(self.model, params, batch, self.config.loss, base.stream(rng, 'drop_path'))
        return loss, (metrics, extra)

    def predict_patches(self, params: Any, images: np.ndarray, idx: dict[str, np.ndarray]) -> np.ndarray:
        """The pixel branch's prediction of every image patch, for MAE's reconstruction pictures."""
        predictions, _ = jax.jit(self.model.apply)({'params': params}, images, idx['ids_keep'], idx['ids_restore'])
        return np.asarray(jax.device_get(predictions['pixel']))

    def tokens_per_example(self) -> int:
        return self.num_tokens + self.num_volume_tokens

    def flops_per_example(self) -> None:
        return None  # MAE's count does not cover the second decoder branch or the volumes
