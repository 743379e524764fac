"""MAE (He et al., CVPR 2022): random masking of 75% of the patches, asymmetric encoder / decoder, pixel loss.

Batch layout: 'image' (B, H, W, 3) normalised with ImageNet mean/std; 'ids_keep' (B, n) int32, the kept tokens in
shuffle order; 'ids_restore' (B, L) int32, each token's position in the shuffle (jaxssl.masks.shuffle_masking
builds both per sample in the input pipeline); 'label' (B,) where the source has labels (unused by the loss).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import _image, base
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import mae as mae_model

GREY = 0.5  # masked patches in the pictures


def check_config(config: ml_collections.ConfigDict, models: Any = mae_model) -> None:
    """Fails fast, naming the key, on values the model or masks cannot use (data paths are checked at run start).
    `models` is the module whose `decode_variant` / `VARIANTS` name the sizes (CropMAE passes its own)."""
    try:
        spec = models.decode_variant(config.model.variant)
    except ValueError:
        sizes = ', '.join(models.VARIANTS)
        raise ConfigError(
            f"bad value '{config.model.variant}' for 'model.variant'; valid: {sizes} (optionally '/patch')"
        ) from None
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    try:
        grid = mae_model.token_grid(config.input.image_size, spec['patch'])
    except ValueError as e:
        raise ConfigError(f"bad value {config.input.image_size} for 'input.image_size': {e}") from None
    check_range(config, 'masking.ratio', 0.0, 1.0)
    try:
        masks.num_kept(grid[0] * grid[1], config.masking.ratio)
    except ValueError as e:
        raise ConfigError(f"bad value {config.masking.ratio} for 'masking.ratio': {e}") from None


def make_model(config: ml_collections.ConfigDict) -> mae_model.MAEPretrain:
    m = config.model
    return mae_model.make_pretrain_model(
        m.variant,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def norm_pix(patches: jax.Array) -> jax.Array:
    """The reference's norm_pix_loss target: each patch normalised over all its p*p*C values jointly,
    (x - mean) / sqrt(var + 1e-6) with the unbiased variance (torch's .var default)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, ddof=1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + 1e-6)


def patch_targets(images: jax.Array, patch: int, normalize: bool = True) -> jax.Array:
    """Targets (B, L, patch * patch * C) from the ImageNet-normalised images themselves (the reference does not
    un-normalise: its target is patchify(imgs) of the network input), per-patch normalised if `normalize`."""
    targets = mae_model.patchify(images.astype(jnp.float32), patch)
    return jax.lax.stop_gradient(norm_pix(targets) if normalize else targets)


def masked_patch_mse(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error per patch, averaged over the removed patches (mask 1) of the whole batch."""
    per_patch = jnp.mean(jnp.square(prediction - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


def compute_loss(
    model: mae_model.MAEPretrain,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array | None = None,
    train: bool = True,
    normalize_target: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MAE objective: (normalised-)pixel MSE on the patches the encoder did not see."""
    rngs = {'drop_path': rng} if train and rng is not None else {}
    prediction, _ = model.apply(
        {'params': params}, batch['image'], batch['ids_keep'], batch['ids_restore'], train=train, rngs=rngs
    )
    mask = masks.removed_mask(batch['ids_restore'], batch['ids_keep'].shape[1])
    loss = masked_patch_mse(prediction, patch_targets(batch['image'], model.patch, normalize_target), mask)
    return loss, {'loss': loss, 'loss_patches': jnp.sum(mask)}


def reconstruction_panels(
    image: np.ndarray, prediction: np.ndarray, ids_restore: np.ndarray, num_keep: int, patch: int, normalized: bool
) -> np.ndarray:
    """One image's panels in [0, 1] pixels, (4, H, W, 3): input, masked input, reconstruction (predicted masked
    patches pasted into the visible ones, as the MAE paper shows), and the prediction of every patch.

    A norm-pix prediction is un-normalised with the true patch's mean and std (as the authors' visualisation of
    their norm-pix models), so the picture shows the structure predicted, at the true brightness.
    """
    target = np.asarray(mae_model.patchify(image[None], patch)[0])
    predicted = np.asarray(prediction, np.float32)
    if normalized:
        predicted = predicted * np.sqrt(target.var(axis=-1, ddof=1, keepdims=True) + 1e-6)
        predicted = predicted + target.mean(axis=-1, keepdims=True)
    removed = masks.removed_mask(np.asarray(ids_restore), num_keep).astype(bool)
    grid = mae_model.token_grid(image.shape[0], patch)

    def pixels(patches: np.ndarray) -> np.ndarray:
        return np.clip(mae_model.unpatchify(patches[None], grid, patch)[0] * IMAGENET_STD + IMAGENET_MEAN, 0, 1)

    masked = np.where(removed[:, None], np.nan, target)
    recon = np.where(removed[:, None], predicted, target)
    masked_pixels = np.nan_to_num(pixels(masked), nan=GREY)
    return np.stack([pixels(target), masked_pixels, pixels(recon), pixels(predicted)])


class Method(_image.ImageMethod):
    """MAE pretraining for the trainer."""

    build_model = staticmethod(make_model)  # subclasses (CropMAE) put their own model on the same plumbing
    visible_count = staticmethod(masks.num_kept)  # (tokens, ratio) -> visible tokens; CroCo rounds its own way

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = self.build_model(config)
        self.grid = mae_model.token_grid(config.input.image_size, self.model.patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.num_keep = self.visible_count(self.num_tokens, config.masking.ratio)

    def sample_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return masks.shuffle_masking(self.num_tokens, self.config.masking.ratio, rng)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Adds one view's mask (a fresh one per view); runs in the Grain pipeline."""
        return {**sample, **self.sample_masks(rng)}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = image_data.make_image_source(self.config)
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        samples = [self.sample_masks(rng) for _ in range(batch_size)]
        batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        size = self.config.input.image_size
        batch['image'] = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
        return batch

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return mae_model.init_params(self.model, rng, batch['image'], batch['ids_keep'], batch['ids_restore']), {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(
            self.model, params, batch, base.stream(rng, 'drop_path'), True, self.config.loss.norm_pix_loss
        )
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on every patch (no masking), after its final norm: the cls token (the reference's linear
        probe feature), the mean of the patch tokens, and the patch tokens (for attentive probes)."""
        encoded, _ = self.model.apply({'params': params}, batch['image'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1), 'tokens': encoded[:, 1:]}

    def visualize(self, params, extra):
        """Reconstructions of the first `eval.pictures` images of the eval split, masked as in training: one row
        per image (input, masked, reconstruction, prediction)."""
        from jaxssl.evaluate import reconstruction

        count = self.config.eval.pictures
        if count <= 0:
            return {}
        batch = next(iter(self.eval_dataset(self.config.eval.split, count, count, 0, 1)))
        images = batch['image'][:, 0]
        rng = np.random.default_rng(self.config.seed)
        samples = [self.sample_masks(rng) for _ in range(count)]
        idx = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        prediction = self.predict_patches(params, images, idx)
        rows = [
            reconstruction_panels(
                images[i],
                prediction[i],
                idx['ids_restore'][i],
                self.num_keep,
                self.model.patch,
                self.config.loss.norm_pix_loss,
            )
            for i in range(count)
        ]
        return {'reconstruction': reconstruction.grid([{'panels': r} for r in rows], order=('panels',))}

    def predict_patches(self, params: Any, images: np.ndarray, idx: dict[str, np.ndarray]) -> np.ndarray:
        """The model's prediction (B, L, patch * patch * C) of every patch, for the pictures; `idx` holds the
        batch's `sample_masks` arrays. Subclasses whose model predicts only some patches override it."""
        prediction, _ = jax.jit(self.model.apply)({'params': params}, images, idx['ids_keep'], idx['ids_restore'])
        return np.asarray(jax.device_get(prediction))

    def tokens_per_example(self) -> int:
        return self.num_tokens

    def flops_per_example(self) -> float:
        m, tokens, kept = self.model, self.num_tokens, self.num_keep
        patch_dim = m.patch * m.patch * m.channels
        forward = (
            2 * kept * patch_dim * m.width  # patch embedding of the kept patches only
            + transformer_flops(kept + 1, m.width, m.depth, m.mlp_hidden)  # + 1: the cls token
            + 2 * (kept + 1) * m.width * m.dec_width  # decoder_embed
            + transformer_flops(tokens + 1, m.dec_width, m.dec_depth, m.dec_mlp_hidden)
            + 2 * tokens * m.dec_width * patch_dim  # decoder_pred
        )
        return 3.0 * forward  # backward ~ 2x forward
