"""SSAST (Gong et al., "SSAST: Self-Supervised Audio Spectrogram Transformer", AAAI 2022): joint discriminative and
generative masked spectrogram patch modelling.

Each step runs the encoder twice on every clip, with two independent masks of `masking.num_masked` patches
(the reference's `pretrain_mpc` and `pretrain_mpg` calls): the first pass's masked outputs go through `cpredlayer`
into an InfoNCE loss against the clip's own masked input patches, the second pass's through `gpredlayer` into an
MSE to them; loss = nce + 10 mse.

Batch layout: 'spectrogram' (B, frames, mel bins) normalised log-mel (jaxssl.data.audio); 'mpc_idx' and 'mpg_idx'
(B, num_masked) int32, the two masks' token indices (drawn per clip in the Grain pipeline); 'label' (unused here).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio
from jaxssl.methods import _audio, base
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import ssast as ssast_model

MASKINGS = ('cluster', 'frame')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks or front end cannot use."""
    check_choice(config, 'model.variant', ssast_model.VARIANTS)
    check_choice(config, 'model.patch', ssast_model.PATCHES)
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    check_choice(config, 'masking.kind', MASKINGS)
    audio.check_audio_input_config(config)
    patch = ssast_model.PATCHES[config.model.patch]
    try:
        grid = ssast_model.token_grid(config.input.num_mel_bins, config.input.target_length, patch)
    except ValueError as e:
        raise ConfigError(f"'model.patch' {config.model.patch} {patch} vs 'input.num_mel_bins' / "
                          f"'input.target_length': {e}") from None  # fmt: skip
    n, total = config.masking.num_masked, grid[0] * grid[1]
    limit = total - 2 if config.masking.kind == 'cluster' else total - 1
    if not 0 < n <= limit:
        raise ConfigError(f"bad value {n} for 'masking.num_masked': must be in [1, {limit}] for {total} patches")


def nce_loss(prediction: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference's masked patch classification: per clip, scores s[j, i] = target_j . prediction_i over its n
    masked patches (no temperature; the other masked patches of the same clip are the negatives); loss
    -mean_j log softmax_i(s[j, :])[j] (softmax over predictions, the reference's axis, not its paper's Eq. 1);
    accuracy: the share of predictions i whose argmax over j of that softmax is i (the reference's `acc`)."""
    scores = jnp.einsum('bjd,bid->bji', target.astype(jnp.float32), prediction.astype(jnp.float32))
    log_p = jax.nn.log_softmax(scores, axis=-1)
    n = scores.shape[-1]
    nce = -jnp.mean(jnp.diagonal(log_p, axis1=1, axis2=2))
    accuracy = jnp.mean(jnp.argmax(jnp.exp(log_p), axis=1) == jnp.arange(n))
    return nce, accuracy


class Method(_audio.AudioMethod):
    """SSAST pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, c = config.model, config.input
        self.patch = ssast_model.PATCHES[m.patch]
        self.grid = ssast_model.token_grid(c.num_mel_bins, c.target_length, self.patch)
        self.model = ssast_model.make_model(
            m.variant,
            self.grid,
            self.patch,
            drop_path_rate=m.drop_path_rate,
            scan_layers=m.scan_layers,
            remat=m.remat,
            dtype=DTYPES[m.dtype],
            attention_impl=m.attention_impl or None,
        )

    def sample_mask(self, rng: np.random.Generator) -> np.ndarray:
        k = self.config.masking
        if k.kind == 'cluster':
            return masks.ssast_cluster_mask(self.model.num_patches, self.grid[1], k.num_masked, rng, k.cluster)
        return masks.ssast_frame_mask(self.model.num_patches, k.num_masked, rng)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The two passes' masks, drawn independently per clip in the Grain pipeline."""
        return {**sample, 'mpc_idx': self.sample_mask(rng), 'mpg_idx': self.sample_mask(rng)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params = ssast_model.init_params(self.model, rng, batch['spectrogram'], batch['mpc_idx'], batch['mpg_idx'])
        return params, {}

    def loss(self, params, extra, batch, rng, step):
        spectrogram = batch['spectrogram']
        rngs = {'drop_path': base.stream(rng, 'drop_path')}
        mpc, mpg = self.model.apply(
            {'params': params}, spectrogram, batch['mpc_idx'], batch['mpg_idx'], train=True, rngs=rngs
        )
        patches = jax.lax.stop_gradient(ssast_model.patchify(spectrogram.astype(jnp.float32), self.patch))
        take = lambda idx: jnp.take_along_axis(patches, idx[..., None], axis=1)
        nce, accuracy = nce_loss(mpc, take(batch['mpc_idx']))
        mse = jnp.mean(jnp.square(mpg - take(batch['mpg_idx'])))
        w = self.config.loss
        loss = w.nce_weight * nce + w.mse_weight * mse
        return loss, ({'loss': loss, 'nce': nce, 'mse': mse, 'nce_accuracy': accuracy}, extra)

    def represent(self, params, extra, batch):
        """The encoder on the whole spectrogram: 'mean_pool', the mean of the patch tokens (the reference's
        fine-tuning default, ft_avgtok); 'cls', the mean of the cls and distillation tokens (ft_cls); 'tokens'; and
        'raw', the input's log-mel spectrum averaged over time, the baseline a pooled feature should beat."""
        spectrogram = batch['spectrogram']
        tokens, _ = self.model.apply({'params': params}, spectrogram, method=self.model.encode)
        tokens = tokens.astype(jnp.float32)
        patches = tokens[:, ssast_model.NUM_EXTRA_TOKENS :]
        return {
            'cls': tokens[:, :2].mean(axis=1),
            'mean_pool': patches.mean(axis=1),
            'tokens': patches,
            'raw': spectrogram.astype(jnp.float32).mean(axis=1),
        }

    def tokens_per_example(self) -> int:
        return self.model.num_patches

    def flops_per_example(self) -> float:
        m, n = self.model, self.config.masking.num_masked
        tokens = m.num_patches + ssast_model.NUM_EXTRA_TOKENS
        heads = 2 * n * (m.width * m.width + m.width * m.patch_dim)  # one head per pass, on the masked tokens
        encoder = 2 * m.num_patches * m.patch_dim * m.width + transformer_flops(tokens, m.width, m.depth, 4 * m.width)
        return 3.0 * (2 * encoder + 2 * heads)  # two passes; backward ~ 2x forward
