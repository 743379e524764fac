"""CAE (Chen et al., "Context Autoencoder for Self-Supervised Representation Learning", IJCV 2023): block-wise masking,
an encoder on the visible patches, a latent contextual regressor predicting the masked patches' latents, an alignment
loss to the encoder's own (stop-gradient) latents of the masked patches, and a decoder reconstructing the masked
patches from the predicted latents.

Batch layout: 'image' (B, H, W, 3) ImageNet-normalised; 'ids_keep' (B, n) and 'ids_masked' (B, m) int32, the
visible and masked tokens, ascending; 'ids_restore' (B, L) int32, each token's position in [ids_keep, ids_masked]
(for the pictures); all from jaxssl.masks.block_masking per sample in the input pipeline; 'label' (B,) where the
source has labels (unused by the loss).

Loss: MSE of the decoder's pixel predictions on the masked patches (per-patch normalised pixels by default, MAE's
target; the reference's is cross-entropy on DALL-E token ids, see docs/methods.md) + align_weight x MSE(predicted
latents, target latents), both means in float32, as the reference's engine_for_pretraining.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_range
from jaxssl.methods import base, mae
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import cae as cae_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks or loss cannot use (data paths: at run start)."""
    mae.check_config(config, cae_model)
    check_range(config, 'model.layer_scale_init', 0.0, 1e3)
    check_range(config, 'model.dec_layer_scale_init', 0.0, 1e3)
    check_range(config, 'loss.align_weight', 0.0, 1e6)
    check_range(config, 'masking.min_aspect', 1e-6, 1.0 + 1e-9)
    if not isinstance(config.masking.min_block, int) or config.masking.min_block < 1:
        raise ConfigError(f"bad value {config.masking.min_block!r} for 'masking.min_block': must be an integer >= 1")


def make_model(config: ml_collections.ConfigDict) -> cae_model.CAEPretrain:
    m = config.model
    return cae_model.make_pretrain_model(
        m.variant,
        layer_norm_eps=m.layer_norm_eps,
        layer_scale_init=m.layer_scale_init,
        dec_layer_scale_init=m.dec_layer_scale_init,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def cae_loss(
    prediction: jax.Array,
    target: jax.Array,
    latent_pred: jax.Array,
    latent_target: jax.Array,
    align_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean((prediction - target)^2) + align_weight * mean((latent_pred - latent_target)^2), in float32.
    prediction / target: (B, m, P) masked patches; latents: (B, m, D). Every sample masks the same number of
    patches, so the plain mean is the mean over masked patches of the whole batch."""
    reconstruction = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
    alignment = jnp.mean(jnp.square(latent_pred.astype(jnp.float32) - latent_target.astype(jnp.float32)))
    loss = reconstruction + align_weight * alignment
    return loss, {'loss': loss, 'loss_reconstruction': reconstruction, 'loss_alignment': alignment}


def compute_loss(
    model: cae_model.CAEPretrain,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array | None = None,
    train: bool = True,
    normalize_target: bool = True,
    align_weight: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CAE objective on one batch (see `cae_loss`)."""
    rngs = {'drop_path': rng} if train and rng is not None else {}
    prediction, inter = model.apply(
        {'params': params}, batch['image'], batch['ids_keep'], batch['ids_masked'], train=train, rngs=rngs
    )
    targets = mae.patch_targets(batch['image'], model.patch, normalize_target)
    targets = jnp.take_along_axis(targets, batch['ids_masked'][..., None], axis=1)
    return cae_loss(prediction, targets, inter['latent_pred'], inter['latent_target'], align_weight)


class Method(mae.Method):
    """CAE pretraining for the trainer: MAE's data plumbing, probes and pictures, with block-wise masks, the CAE
    model and its two-term loss."""

    build_model = staticmethod(make_model)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.num_masked = self.num_tokens - self.num_keep

    def sample_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        m = self.config.masking
        mask = masks.block_masking(self.grid, self.num_masked, rng, min_block=m.min_block, min_aspect=m.min_aspect)
        return masks.mask_to_ids(mask)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return cae_model.init_params(self.model, rng, batch['image'], batch['ids_keep'], batch['ids_masked']), {}

    def loss(self, params, extra, batch, rng, step):
        loss, metrics = compute_loss(
            self.model,
            params,
            batch,
            base.stream(rng, 'drop_path'),
            True,
            self.config.loss.norm_pix_loss,
            self.config.loss.align_weight,
        )
        return loss, (metrics, extra)

    def predict_patches(self, params: Any, images: np.ndarray, idx: dict[str, np.ndarray]) -> np.ndarray:
        """The decoder predicts the masked patches only; the visible ones are zeros in the prediction panel
        (their own mean colour once un-normalised with norm-pix)."""
        prediction, _ = jax.jit(self.model.apply)({'params': params}, images, idx['ids_keep'], idx['ids_masked'])
        prediction = np.asarray(jax.device_get(prediction))
        full = np.zeros((prediction.shape[0], self.num_tokens, prediction.shape[-1]), prediction.dtype)
        np.put_along_axis(full, idx['ids_masked'][..., None], prediction, axis=1)
        return full

    def flops_per_example(self) -> float:
        m, kept, masked = self.model, self.num_keep, self.num_masked
        patch_dim = m.patch * m.patch * m.channels
        context = kept + masked  # the regressor's keys / values: visible latents and the queries
        regressor_block = (
            2 * masked * m.dec_width * m.dec_width * 2  # q and output projections
            + 2 * context * m.dec_width * m.dec_width * 2  # k and v projections
            + 2 * 2 * masked * context * m.dec_width  # scores and weighted sums
            + 2 * 2 * masked * m.dec_width * m.dec_mlp_hidden  # MLP
        )
        trained = (
            2 * kept * patch_dim * m.width
            + transformer_flops(kept + 1, m.width, m.depth, m.mlp_hidden)
            + m.reg_depth * regressor_block
            + transformer_flops(masked, m.dec_width, m.dec_depth, m.dec_mlp_hidden)
            + 2 * masked * m.dec_width * patch_dim  # head
        )
        # The alignment target: forward only (no gradient), the encoder on cls + the masked patches.
        target = 2 * masked * patch_dim * m.width + transformer_flops(masked + 1, m.width, m.depth, m.mlp_hidden)
        return 3.0 * trained + target  # backward ~ 2x forward
