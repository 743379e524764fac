"""CroCo v2 (Weinzaepfel et al., ICCV 2023; CroCo v1, NeurIPS 2022): cross-view completion. Two views of one scene go
through one ViT encoder, view 1 with 90% of its patches masked, view 2 whole; a decoder with self-attention over
view 1's tokens (visible + mask tokens) and cross-attention to view 2's tokens reconstructs view 1's masked patches
(per-patch normalised pixels). v2 puts 2-D RoPE (base 100) in every attention instead of added positions.

Batch layout: 'image' (B, 2, S, S, 3), ImageNet-normalised, [view 1 (masked, the target), view 2 (whole)];
'ids_keep' (B, n) int32, view 1's visible tokens in raster order, and 'ids_restore' (B, L) int32
(jaxssl.masks.croco_masking_from_noise); 'label' (B,) where the source has labels (unused by the loss).

Data: the reference pretrains on pairs of real views of one scene (Habitat renders; for v2 also ARKitScenes,
MegaDepth, 3DStreetView, IndoorVL), each view an independent RandomCrop(224) plus its own colour jitter. No such
pairs are built in, so `croco_views` makes a STAND-IN pair from one image: one random resized crop to
(S + max_shift) px, then two independent (S, S) crops of it (a translation of up to max_shift px between the views)
and the reference's colour jitter on each. Any image source (folder, TFDS, the built-in digits) feeds it.
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
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import images as image_data
from jaxssl.data import views
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import base, cropmae
from jaxssl.methods.mae import masked_patch_mse, patch_targets
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import croco as croco_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, views or masks cannot use (data paths: at run start)."""
    try:
        spec = croco_model.decode_variant(config.model.variant)
    except ValueError:
        sizes = ', '.join(croco_model.VARIANTS)
        raise ConfigError(
            f"bad value '{config.model.variant}' for 'model.variant'; valid: {sizes} (optionally '/patch')"
        ) from None
    check_choice(config, 'model.dtype', DTYPES)
    check_choice(config, 'model.pos_embed', croco_model.POSITIONS)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    if config.model.pos_embed == 'rope':
        if not config.model.rope_base > 0:
            raise ConfigError(f"bad value {config.model.rope_base} for 'model.rope_base': must be > 0")
        for width, heads in ((spec['width'], spec['heads']), (spec['dec_width'], spec['dec_heads'])):
            if width % heads or (width // heads) % 4:
                raise ConfigError(
                    f"bad value '{config.model.variant}' for 'model.variant': 2-D RoPE needs head dims divisible "
                    f'by 4, got width {width} with {heads} heads'
                )
    size = config.input.image_size
    if not isinstance(size, int) or size <= 0 or size % spec['patch']:
        raise ConfigError(f"bad value {size} for 'input.image_size': must be a multiple of the patch {spec['patch']}")
    check_range(config, 'masking.ratio', 0.0, 1.0)
    try:
        croco_model.num_masked((size // spec['patch']) ** 2, config.masking.ratio)
    except ValueError as e:
        raise ConfigError(f"bad value {config.masking.ratio} for 'masking.ratio': {e}") from None
    shift = config.input.max_shift
    if not isinstance(shift, int) or shift < 0:
        raise ConfigError(f"bad value {shift!r} for 'input.max_shift': must be an integer >= 0")
    check_range(config, 'input.color_jitter', 0.0, 1.0)
    if config.input.num_sample != 1:
        raise ConfigError(
            f"bad value {config.input.num_sample} for 'input.num_sample': CroCo makes its 2 views in one sample; use 1"
        )


def make_model(config: ml_collections.ConfigDict) -> croco_model.CroCoPretrain:
    m = config.model
    return croco_model.make_pretrain_model(
        m.variant,
        pos_embed=m.pos_embed,
        rope_base=m.rope_base,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The reference's ColorJitter(b=c=s=strength, hue=0) on float [0, 1] RGB: the three factors ~ U(1 - s, 1 + s),
    applied in random order (torchvision's)."""
    ops = (views.adjust_brightness, views.adjust_contrast, views.adjust_saturation)
    factors = rng.uniform(1 - strength, 1 + strength, size=3)
    for index in rng.permutation(3):
        image = ops[index](image, factors[index])
    return image


def croco_views(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    max_shift: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter: float = 0.4,
    interpolation: str = 'bicubic',
) -> np.ndarray:
    """A stand-in pair of views of one scene (see the module docstring): a RandomResizedCrop of the image to
    (size + max_shift) px, two independent RandomCrop(size) of it (as the reference crops each real view on its
    own), each with its own colour jitter, normalised. uint8 (H, W, 3) -> float32 (2, size, size, 3),
    [view 1, view 2]."""
    base_crop = image_data.random_resized_crop(image, size + max_shift, rng, scale, ratio, interpolation)
    out = []
    for _ in range(2):
        top, left = rng.integers(0, max_shift + 1, size=2)
        crop = base_crop[top : top + size, left : left + size].astype(np.float32) / 255.0
        if color_jitter > 0:
            crop = jitter(crop, color_jitter, rng)
        out.append((crop - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(out).astype(np.float32)


def make_view(config: ml_collections.ConfigDict) -> image_data.View:
    """The two-view function `config.input` describes."""
    c = config.input
    return functools.partial(
        croco_views,
        size=c.image_size,
        max_shift=c.max_shift,
        scale=tuple(c.crop_scale),
        ratio=tuple(c.crop_ratio),
        color_jitter=c.color_jitter,
        interpolation=c.interpolation,
    )


def compute_loss(
    model: croco_model.CroCoPretrain,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array | None = None,
    train: bool = True,
    normalize_target: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference's MaskedMSE: (norm-)pixel MSE on view 1's masked patches only; view 2 is never a target."""
    pair = batch['image']
    chex.assert_rank(pair, 5)
    rngs = {'drop_path': rng} if train and rng is not None else {}
    prediction, _ = model.apply(
        {'params': params}, pair, batch['ids_keep'], batch['ids_restore'], train=train, rngs=rngs
    )
    mask = masks.removed_mask(batch['ids_restore'], batch['ids_keep'].shape[1])
    loss = masked_patch_mse(prediction, patch_targets(pair[:, 0], model.patch, normalize_target), mask)
    return loss, {'loss': loss, 'loss_patches': jnp.sum(mask)}


class Method(cropmae.Method):
    """CroCo pretraining for the trainer: CropMAE's two-view plumbing and probes, CroCo's masks (int(0.9 L) masked,
    visible tokens in raster order), model, stand-in views and loss on view 1."""

    build_model = staticmethod(make_model)
    build_view = staticmethod(make_view)
    visible_count = staticmethod(croco_model.num_visible)

    def sample_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return masks.croco_masking_from_noise(rng.random(self.num_tokens), self.config.masking.ratio)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params = croco_model.init_params(self.model, rng, batch['image'], batch['ids_keep'], batch['ids_restore'])
        return params, {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(
            self.model, params, batch, base.stream(rng, 'drop_path'), True, self.config.loss.norm_pix_loss
        )
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The encoder on every patch of one image (no mask), after its final norm: no cls token in CroCo, so the
        mean of the patch tokens, and the patch tokens (for attentive probes)."""
        encoded, _ = self.model.apply({'params': params}, batch['image'], method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        return {'mean_pool': encoded.mean(axis=1), 'tokens': encoded}

    def flops_per_example(self) -> float:
        m, tokens, kept = self.model, self.num_tokens, self.num_keep
        patch_dim = m.patch * m.patch * m.channels
        dec = m.dec_width
        # A decoder block: self-attention (4 projections, 2 products), cross-attention (q and out over view 1,
        # k and v over view 2, 2 products), MLP; multiply-adds count 2.
        block = transformer_flops(tokens, dec, 1, m.dec_mlp_hidden)  # self-attention and MLP
        block += 2 * tokens * dec * dec * 4 + 2 * 2 * tokens**2 * dec  # cross-attention
        forward = (
            2 * (tokens + kept) * patch_dim * m.width  # patch embedding of both views
            + transformer_flops(kept, m.width, m.depth, m.mlp_hidden)  # view 1's visible patches
            + transformer_flops(tokens, m.width, m.depth, m.mlp_hidden)  # the whole of view 2
            + 2 * (tokens + kept) * m.width * dec  # decoder_embed of both streams
            + m.dec_depth * block
            + 2 * tokens * dec * patch_dim  # prediction_head
        )
        return 3.0 * forward  # backward ~ 2x forward
