"""VideoMAE V2 (and VideoMAE v1 with decoder_ratio 0): dual-masked video autoencoding with a pixel loss.

Batch layout: 'video' (B, T, H, W, 3) normalised with ImageNet mean/std; 'visible_idx' (B, N_vis) int32;
'target_idx' (B, N_tgt) int32; 'target_weight' (B, N_tgt) float32 (1 where the encoder did not see the
token). jaxssl.masks builds the last three per sample in the input pipeline.
"""

from __future__ import annotations

from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import data, masks
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.methods import base
from jaxssl.models import videomae as videomae_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_model_config(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Checks the ViT fields shared by the pretraining, fine-tuning and distillation configs, naming the key.

    Returns the decoded variant and the token grid of the configured clip.
    """
    try:
        spec = videomae_model.decode_variant(config.model.variant)
    except ValueError:
        sizes = ', '.join(videomae_model.VARIANTS)
        raise ConfigError(
            f"bad value '{config.model.variant}' for 'model.variant'; valid: {sizes} (optionally '/patch')"
        ) from None
    check_choice(config, 'model.dtype', DTYPES)
    check_choice(config, 'model.pos_embedding', ('sincos', 'learned'))
    check_choice(config, 'model.attention_impl', ('', 'xla', 'cudnn'))
    check_choice(config, 'model.patch_embed_impl', ('conv', 'matmul'))
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    try:
        grid = videomae_model.token_grid(
            config.input.frames, config.input.image_size, spec['patch'], config.model.tubelet
        )
    except ValueError as e:
        raise ConfigError(f"bad 'input.frames' / 'input.image_size' for 'model.variant': {e}") from None
    return spec, grid


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or masks cannot use."""
    _, grid = check_model_config(config)
    check_range(config, 'masking.encoder_ratio', 0.0, 1.0)
    unroll = config.model.get('scan_unroll', 1)
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 0:
        raise ConfigError(f"bad value {unroll!r} for 'model.scan_unroll': layers per scan iteration, >= 0 (0 = all)")
    ratio = config.masking.decoder_ratio
    if ratio != 0 and not 0 < int(4 * ratio) < 4:
        raise ConfigError(
            f"bad value {ratio} for 'masking.decoder_ratio': 0 (VideoMAE v1) or in [0.25, 1) for running cells"
        )
    if ratio != 0 and (grid[1] % 2 or grid[2] % 2):
        raise ConfigError(
            f"'masking.decoder_ratio' > 0 needs an even token grid; 'input.image_size' gives {grid[1]}x{grid[2]}"
        )


def make_model(config: ml_collections.ConfigDict) -> videomae_model.VideoMAEPretrain:
    m = config.model
    return videomae_model.make_pretrain_model(
        m.variant,
        tubelet=m.tubelet,
        layer_norm_eps=m.layer_norm_eps,
        layer_scale_init=m.layer_scale_init,
        pos_embedding=m.pos_embedding,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        scan_unroll=m.get('scan_unroll', 1),
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
        patch_embed_impl=m.patch_embed_impl,
        split_qkv=m.get('split_qkv', False),
        approximate_gelu=m.get('approximate_gelu', False),
        recompute_gelu=m.get('recompute_gelu', False),
    )


def sample_masks(config: ml_collections.ConfigDict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample's encoder (tube) and decoder (running cell) masks as model indices; numpy, for the pipeline."""
    patch = videomae_model.decode_variant(config.model.variant)['patch']
    grid = videomae_model.token_grid(config.input.frames, config.input.image_size, patch, config.model.tubelet)
    encoder = masks.tube_mask(grid, config.masking.encoder_ratio, rng)
    decoder = masks.decoder_mask(encoder, grid, config.masking.decoder_ratio, rng)
    return masks.mask_indices(encoder, decoder)


def patch_targets(
    video: jax.Array, patch: int, tubelet: int = 2, normalize: bool = True, token_idx: jax.Array | None = None
) -> jax.Array:
    """Reconstruction targets (B, N, tubelet * patch * patch * C) from an ImageNet-normalised clip.

    Un-normalises to [0, 1], cuts (tubelet, patch, patch) tubes in token order, and (if `normalize`) normalises
    each tube per channel over its pixels with the unbiased std + 1e-6, as the reference does. The vector order
    is (p0 p1 p2 c), channel fastest. With `token_idx` (B, K) only those tubes are made (B, K, ...): each tube is
    normalised on its own, so this equals selecting afterwards, without the work on the others.
    """
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    layout = 'b (t p0) (h p1) (w p2) c -> b (t h w) (p0 p1 p2) c'
    tubes = einops.rearrange(video, layout, p0=tubelet, p1=patch, p2=patch)
    if token_idx is not None:
        tubes = jnp.take_along_axis(tubes, token_idx[..., None, None], axis=1)
    tubes = tubes.astype(jnp.float32) * std + mean
    if normalize:
        mu = tubes.mean(axis=-2, keepdims=True)
        sigma = jnp.sqrt(tubes.var(axis=-2, ddof=1, keepdims=True))
        tubes = (tubes - mu) / (sigma + 1e-6)
    return jax.lax.stop_gradient(tubes.reshape(*tubes.shape[:2], -1))


def masked_mse(prediction: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean squared error per token, averaged over the tokens with weight 1 across the whole batch."""
    per_token = jnp.mean(jnp.square(prediction - target), axis=-1)
    return jnp.sum(per_token * weight) / jnp.sum(weight)


def compute_loss(
    model: videomae_model.VideoMAEPretrain,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array | None = None,
    train: bool = True,
    normalize_target: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The VideoMAE V2 objective: normalised-pixel MSE at encoder-masked tokens among the decoder's targets."""
    rngs = {'drop_path': rng} if train and rng is not None else {}
    prediction, _ = model.apply(
        {'params': params},
        batch['video'],
        batch['visible_idx'],
        batch['target_idx'],
        train=train,
        rngs=rngs,
    )
    targets = patch_targets(batch['video'], model.patch, model.tubelet, normalize_target, batch['target_idx'])
    loss = masked_mse(prediction, targets, batch['target_weight'])
    return loss, {'loss': loss, 'loss_tokens': jnp.sum(batch['target_weight'])}


def transformer_flops(tokens: int, width: int, depth: int, mlp_hidden: int) -> float:
    """Forward matmul FLOPs of `depth` ViT blocks on `tokens` tokens (2 per multiply-add)."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp_hidden)
    attention = 2 * 2 * tokens * tokens * width
    return depth * (projections + attention)


class Method(base.Method):
    """VideoMAE V2 pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = make_model(config)
        self.grid = videomae_model.token_grid(
            config.input.frames, config.input.image_size, self.model.patch, self.model.tubelet
        )

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Adds one sample's masks (as model indices); runs in the Grain pipeline."""
        return {**sample, **sample_masks(self.config, rng)}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        data.check_input_config(self.config)  # paths are checked when a run starts, not when a config loads
        source = data.make_source(self.config)
        dataset = data.make_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        samples = [sample_masks(self.config, rng) for _ in range(batch_size)]
        batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        size = self.config.input.image_size
        batch['video'] = rng.normal(size=(batch_size, self.config.input.frames, size, size, 3)).astype(np.float32)
        return batch

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, batch['video'], batch['visible_idx'], batch['target_idx'])
        return variables['params'], {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(
            self.model, params, batch, base.stream(rng, 'drop_path'), True, self.config.loss.normalize_target
        )
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on all tokens (no masking): mean-pooled features and the tokens (for attentive probes)."""
        encoded, _ = self.model.apply({'params': params}, batch['video'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        batch_size, _, width = encoded.shape
        # Spatial mean per temporal slice, slices concatenated in order: keeps the time axis a linear probe needs
        # to read motion, which a mean over all tokens folds away.
        per_slice = encoded.reshape(batch_size, self.grid[0], -1, width).mean(axis=2)
        return {'mean_pool': encoded.mean(axis=1), 'time_pool': per_slice.reshape(batch_size, -1), 'tokens': encoded}

    def eval_dataset(self, split, batch_size, max_examples, process_index, process_count):
        dataset, _ = data.make_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            max_clips=max_examples,
            process_index=process_index,
            process_count=process_count,
        )
        return dataset

    def visualize(self, params, extra):
        """Reconstructions of the first `eval.pictures` clips of the eval split, masked as in training."""
        from jaxssl.evaluate import reconstruction

        count = self.config.eval.pictures
        if count <= 0:
            return {}
        batch = next(iter(self.eval_dataset(self.config.eval.split, count, count, 0, 1)))
        video = batch['video'][:, 0]
        rng = np.random.default_rng(self.config.seed)
        samples = [sample_masks(self.config, rng) for _ in range(count)]
        idx = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        prediction, _ = jax.jit(self.model.apply)({'params': params}, video, idx['visible_idx'], idx['target_idx'])
        prediction = np.asarray(jax.device_get(prediction))
        clips = [
            reconstruction.reconstruct(
                video[i],
                prediction[i],
                idx['visible_idx'][i],
                idx['target_idx'][i],
                self.model.patch,
                self.model.tubelet,
                self.config.loss.normalize_target,
            )
            for i in range(count)
        ]
        grid, animation = reconstruction.grid(clips), reconstruction.animation(clips[0])
        return {'reconstruction': grid, 'reconstruction_clip0': animation}

    def tokens_per_example(self) -> int:
        frames, height, width = self.grid
        return frames * height * width

    def flops_per_example(self) -> float:
        m, (frames, height, width) = self.model, self.grid
        tokens = frames * height * width
        per_frame = height * width
        visible = frames * (per_frame - int(self.config.masking.encoder_ratio * per_frame))
        ratio = self.config.masking.decoder_ratio
        targets = tokens - visible if ratio == 0 else tokens * (4 - int(4 * ratio)) // 4
        patch_dim = m.tubelet * m.patch * m.patch * m.channels
        embedded = visible if m.patch_embed_impl == 'matmul' else tokens  # 'conv' embeds every token, as the reference
        forward = (
            2 * embedded * patch_dim * m.width  # tubelet embedding
            + transformer_flops(visible, m.width, m.depth, m.mlp_hidden)
            + 2 * visible * m.width * m.dec_width  # encoder_to_decoder
            + transformer_flops(visible + targets, m.dec_width, m.dec_depth, m.dec_mlp_hidden)
            + 2 * targets * m.dec_width * patch_dim  # head
        )
        return 3.0 * forward  # backward ~ 2x forward
