"""CropMAE (Eymaël et al. 2024): a Siamese MAE on two crops of one image; the big crop is seen whole, the small crop
inside it is 98.5% masked and reconstructed through cross-attention to the big crop's tokens.

Batch layout: 'image' (B, 2, S, S, 3), ImageNet-normalised, [global view, local view] of each image (the local view
is a crop of the global one, so both come from one `cropmae_views` call in the Grain pipeline); 'ids_keep' (B, n) and
'ids_restore' (B, L) int32, the local view's MAE shuffle mask (jaxssl.masks.shuffle_masking); 'label' (B,) where the
source has labels (unused by the loss). The loss is MAE's (norm-pix) MSE on the local view's masked patches only.

SiamMAE (Gupta et al. 2023) is the same model with two frames of a video for the two views and a 95% mask:
jaxssl.methods.siammae subclasses this Method with the frame-pair video pipeline (jaxssl.data.frame_pairs).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_range
from jaxssl.data import images as image_data
from jaxssl.data.transforms import normalize
from jaxssl.methods import base, mae
from jaxssl.methods.mae import masked_patch_mse, patch_targets
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import cropmae as cropmae_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, views or masks cannot use (data paths: at run start)."""
    mae.check_config(config, cropmae_model)
    check_range(config, 'model.dropout', 0.0, 1.0)
    scale = tuple(config.input.local_crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"bad value {scale} for 'input.local_crop_scale': need (low, high), 0 < low <= high <= 1")
    if config.input.num_sample != 1:
        # Both views come from one loader call (the local crop is cut from the global one), so one sample per image.
        raise ConfigError(
            f"bad value {config.input.num_sample} for 'input.num_sample': CropMAE makes its 2 views in one sample; "
            'use 1'
        )


def make_model(config: ml_collections.ConfigDict) -> cropmae_model.CropMAEPretrain:
    m = config.model
    return cropmae_model.make_pretrain_model(
        m.variant,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        dropout=m.dropout,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def cropmae_views(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.1, 1.0),
    local_scale: tuple[float, float] = (0.3, 0.6),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    interpolation: str = 'bilinear',
) -> np.ndarray:
    """The reference's GlobalToLocal views (data/util/CropMAEStrategies.py): a RandomResizedCrop of the image to
    (size, size) with area in `scale` (the global view), then a RandomResizedCrop of that global crop with area in
    `local_scale` resized back to (size, size) (the local view); each flipped on its own with p 0.5, normalised.
    uint8 (H, W, 3) -> float32 (2, size, size, 3), [global, local]."""
    global_crop = image_data.random_resized_crop(image, size, rng, scale, ratio, interpolation)
    # Cut from the resized global crop (not from the image): the local view is always inside the global one.
    local_crop = image_data.random_resized_crop(global_crop, size, rng, local_scale, ratio, interpolation)
    views = []
    for crop in (global_crop, local_crop):
        if flip and rng.random() < 0.5:  # independent per view, as the reference
            crop = crop[:, ::-1]
        views.append(normalize(crop))
    return np.stack(views)


def make_view(config: ml_collections.ConfigDict) -> image_data.View:
    """The training view function `config.input` describes (both views at once)."""
    c = config.input
    return functools.partial(
        cropmae_views,
        size=c.image_size,
        scale=tuple(c.crop_scale),
        local_scale=tuple(c.local_crop_scale),
        ratio=tuple(c.crop_ratio),
        flip=c.hflip,
        interpolation=c.interpolation,
    )


def compute_loss(
    model: cropmae_model.CropMAEPretrain,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array | None = None,
    train: bool = True,
    normalize_target: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Norm-)pixel MSE on the local view's masked patches; the global view is never a target."""
    views = batch['image']
    chex.assert_rank(views, 5)
    rngs = {}
    if train and rng is not None:
        drop_path_rng, dropout_rng = jax.random.split(rng)
        rngs = {'drop_path': drop_path_rng, 'dropout': dropout_rng}
    prediction, _ = model.apply(
        {'params': params}, views, batch['ids_keep'], batch['ids_restore'], train=train, rngs=rngs
    )
    mask = masks.removed_mask(batch['ids_restore'], batch['ids_keep'].shape[1])
    loss = masked_patch_mse(prediction, patch_targets(views[:, 1], model.patch, normalize_target), mask)
    return loss, {'loss': loss, 'loss_patches': jnp.sum(mask)}


class Method(mae.Method):
    """CropMAE pretraining for the trainer: MAE's masks, data plumbing, probes and init, with two views per image,
    the cross-attention decoder and the loss on the local view."""

    build_model = staticmethod(make_model)
    build_view = staticmethod(make_view)  # the two-view function of config.input (CroCo's subclass puts its own)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Adds the local view's mask; runs in the Grain pipeline."""
        return {**sample, **self.sample_masks(rng)}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=self.build_view(self.config),
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(batch_size)
        batch['image'] = np.stack([batch['image'], batch['image'][::-1]], axis=1)  # (B, 2, S, S, 3): global, local
        return batch

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(
            self.model, params, batch, base.stream(rng, 'cropmae'), True, self.config.loss.norm_pix_loss
        )
        return loss, (metrics, extra)

    def visualize(self, params, extra):
        return {}  # MAE's single-view pictures do not fit the two-view model (not implemented yet)

    def tokens_per_example(self) -> int:
        return 2 * self.num_tokens  # both views

    def flops_per_example(self) -> float:
        m, tokens, kept = self.model, self.num_tokens, self.num_keep
        patch_dim = m.patch * m.patch * m.channels
        dec = m.dec_width
        # A decoder block: q/k/v/out projections twice (cross: k, v over the memory), the two attention products,
        # and the FFN; multiply-adds count 2.
        block = (
            2 * (tokens + 1) * dec * dec * 4  # self-attention projections
            + 2 * (tokens + 1) * dec * dec * 2
            + 2 * (tokens + 1) * dec * dec * 2  # cross: q, out | k, v (memory)
            + 2 * 2 * (tokens + 1) ** 2 * dec * 2  # scores and weighted sums, self and cross
            + 2 * 2 * (tokens + 1) * dec * m.dec_mlp_hidden  # FFN
        )
        forward = (
            2 * (tokens + kept) * patch_dim * m.width  # patch embedding of both views
            + transformer_flops(tokens + 1, m.width, m.depth, m.mlp_hidden)  # the whole global view
            + transformer_flops(kept + 1, m.width, m.depth, m.mlp_hidden)  # the local view's kept patches
            + 2 * (tokens + kept + 2) * m.width * dec  # decoder_embed of both streams
            + m.dec_depth * block
            + 2 * tokens * dec * patch_dim  # decoder_pred
        )
        return 3.0 * forward  # backward ~ 2x forward
