"""BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", ICML 2023): masked prediction of an
acoustic tokenizer's labels for 16 x 16 log-mel patches.

Iteration 1's tokenizer (`tokenizer.kind='random_projection'`, the paper's section 3.2.1; its code is not released)
projects each flattened patch x_t of the
normalised fbank by a frozen random matrix W and labels it with its nearest codebook vector,
argmin_i ||v_i - W x_t||^2, over K frozen random vectors. The paper does not say how W and V are drawn: W here is
Xavier-uniform and the v_i are unit vectors (normal draws, L2-normalised, as BEST-RQ's codebook), so no code wins
by its norm. Both come from `tokenizer.seed` and are constants, not parameters. Later iterations
(`tokenizer.kind='trained'`, `tokenizer.path`) label with a self-distilled tokenizer (jaxssl.methods.beats_tokenizer:
the nearest unit codebook vector of its output), frozen in the extra state.

Pretraining (section 3.2.2): 75% of the patches masked at random per clip; the encoder sees the visible patches
only; a Transformer label predictor reads the encoded tokens with zeros at the masked positions; cross-entropy on
the masked positions (padding patches excluded). See jaxssl.models.beats.Pretrain.

Batch layout: 'spectrogram' (B, frames, mel bins), jaxssl.data.audio's beats_fbank front end (padding frames are
zero); 'visible_idx' (B, kept) and 'masked_idx' (B, L - kept) int32, the tokens in time-major order, each sorted
(drawn per clip in the Grain pipeline); 'label' (unused here).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import masks, params_io
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio
from jaxssl.methods import _audio, base
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import beats as beats_model
from jaxssl.models import norm_ema_quantizer

TOKENIZERS = ('random_projection', 'trained')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, tokenizer or front end cannot use."""
    check_choice(config, 'model.variant', beats_model.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    for key in ('dropout', 'attention_dropout', 'activation_dropout', 'dropout_input'):
        check_range(config, f'model.{key}', 0.0, 1.0)
    check_range(config, 'model.layer_grad_decay', 0.0, 1.0 + 1e-9)
    if config.model.predictor_depth < 1:
        raise ConfigError(f"bad value {config.model.predictor_depth} for 'model.predictor_depth': must be >= 1")
    check_spectrogram_config(config)
    check_range(config, 'masking.ratio', 0.0, 1.0)
    try:
        kept = masks.num_kept(num_tokens(config), config.masking.ratio)
    except ValueError as e:
        raise ConfigError(f"bad value {config.masking.ratio} for 'masking.ratio': {e}") from None
    if kept == num_tokens(config):
        raise ConfigError(f"bad value {config.masking.ratio} for 'masking.ratio': it masks no patch")
    check_choice(config, 'tokenizer.kind', TOKENIZERS)
    for key in ('codebook_size', 'code_dim'):
        if config.tokenizer[key] < 1:
            raise ConfigError(f"bad value {config.tokenizer[key]} for 'tokenizer.{key}': must be >= 1")
    if config.tokenizer.kind == 'trained':
        stored_variant(config.tokenizer.path, config.tokenizer.variant, 'tokenizer')
        stored = run_config(config.tokenizer.path).get('quantizer', {})
        for key in ('codebook_size', 'code_dim'):
            if key in stored and stored[key] != config.tokenizer[key]:
                raise ConfigError(
                    f"bad value {config.tokenizer[key]} for 'tokenizer.{key}': the tokenizer at "
                    f'{config.tokenizer.path} has {stored[key]}'
                )


def check_spectrogram_config(config: ml_collections.ConfigDict) -> None:
    """The input BEATs reads: beats_fbank frames in whole 16 x 16 patches."""
    audio.check_audio_input_config(config)
    if config.input.features != 'beats_fbank':
        raise ConfigError("'input.features' must be 'beats_fbank' for BEATs (its patches are 16 x 16 fbank frames)")
    c = config.input
    if c.target_length % beats_model.PATCH[0] or c.num_mel_bins % beats_model.PATCH[1]:
        raise ConfigError(
            f"'input.target_length' ({c.target_length}) and 'input.num_mel_bins' ({c.num_mel_bins}) must be "
            f'multiples of the {beats_model.PATCH} patch'
        )


def stored_variant(path: str, variant: str, key: str) -> str:
    """The BEATs size of a stored run or params directory `<key>.path`: `<key>.variant` when set, else the params
    directory's metadata (jaxssl.models.beats_weights writes it) or the run's config.json model.variant. ConfigError
    naming the key when none says or the path holds nothing."""
    if not path:
        raise ConfigError(f"'{key}.path' is empty: pass a training workdir or params directory")
    try:
        _, metadata = params_io.stored_shapes(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"'{key}.path' {path}: {e}") from None
    variant = variant or metadata.get('variant') or run_config(path).get('model', {}).get('variant')
    if variant not in beats_model.VARIANTS:
        sizes = ', '.join(beats_model.VARIANTS)
        raise ConfigError(f"cannot tell the BEATs size of {path}: set '{key}.variant' ({sizes})")
    return variant


def run_config(path: str) -> dict[str, Any]:
    """A training workdir's config.json as a dict; {} for a params directory, which has none."""
    try:
        with open(os.path.join(path, 'config.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def num_tokens(config: ml_collections.ConfigDict) -> int:
    """Patches per clip: (target_length / 16) time patches x (num_mel_bins / 16) frequency patches."""
    return (config.input.target_length // beats_model.PATCH[0]) * (config.input.num_mel_bins // beats_model.PATCH[1])


def patchify(spectrogram: jax.Array) -> jax.Array:
    """(B, frames, mel bins) -> (B, L, 256) patches in the tokens' time-major order, each flattened as (frames,
    bins): the raw values the tokenizer projects."""
    b, frames, bins = spectrogram.shape
    (pt, pf), (gt, gf) = beats_model.PATCH, (frames // beats_model.PATCH[0], bins // beats_model.PATCH[1])
    x = spectrogram.reshape(b, gt, pt, gf, pf).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, gt * gf, pt * pf)


def random_projection_tokenizer(
    patch_dim: int, code_dim: int, codebook_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(W (patch_dim, code_dim) Xavier-uniform, codebook (codebook_size, code_dim) unit rows), float32, frozen."""
    rng = np.random.default_rng(seed)
    bound = np.sqrt(6.0 / (patch_dim + code_dim))
    projection = rng.uniform(-bound, bound, (patch_dim, code_dim))
    codebook = rng.normal(size=(codebook_size, code_dim))
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    return projection.astype(np.float32), codebook.astype(np.float32)


def tokenize(patches: jax.Array, projection: jax.Array, codebook: jax.Array) -> jax.Array:
    """The labels argmin_i ||v_i - W x||^2 of patches (..., patch_dim) -> (...,) int32."""
    matmul = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    projected = matmul(patches.astype(jnp.float32), projection)
    distance = jnp.sum(codebook**2, axis=-1) - 2.0 * matmul(projected, codebook.T)  # + ||W x||^2, equal for every i
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)


class Method(_audio.AudioMethod):
    """BEATs pretraining for the trainer: iteration 1 with the random-projection tokenizer (no extra state), or a
    later one with a trained tokenizer (extra state {'tokenizer': its frozen params, 'codebook' (K, d)})."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, t = config.model, config.tokenizer
        self.num_tokens = num_tokens(config)
        self.num_kept = masks.num_kept(self.num_tokens, config.masking.ratio)
        dropouts = {k: m[k] for k in ('dropout', 'attention_dropout', 'activation_dropout')}
        self.backbone = beats_model.make_backbone(
            m.variant, DTYPES[m.dtype], m.dropout_input, layer_grad_decay=m.layer_grad_decay, **dropouts
        )
        encoder = self.backbone.encoder
        predictor = beats_model.Encoder(
            encoder.width, m.predictor_depth, encoder.heads, encoder.mlp, encoder.pos_conv_kernel,
            encoder.pos_conv_groups, dtype=encoder.dtype, **dropouts,
        )  # fmt: skip
        self.model = beats_model.Pretrain(self.backbone, predictor, t.codebook_size)
        if t.kind == 'trained':
            variant = stored_variant(t.path, t.variant, 'tokenizer')
            # float32 whatever model.dtype: an argmax over 1,024 cosines flips labels on near-ties in bf16.
            self.tokenizer = beats_model.Tokenizer(beats_model.make_backbone(variant, jnp.float32), t.code_dim)
        else:
            patch_dim = beats_model.PATCH[0] * beats_model.PATCH[1]
            self.projection, self.codebook = random_projection_tokenizer(patch_dim, t.code_dim, t.codebook_size, t.seed)

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The clip's mask: num_kept random patches visible, the rest masked, each set in time-major order (the
        encoder's positions are its input's order)."""
        order = rng.permutation(self.num_tokens)
        visible, masked = np.sort(order[: self.num_kept]), np.sort(order[self.num_kept :])
        return {**sample, 'visible_idx': visible.astype(np.int32), 'masked_idx': masked.astype(np.int32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        spectrogram = batch['spectrogram']
        params = self.model.init(rng, spectrogram, batch['visible_idx'], batch['masked_idx'])['params']
        t = self.config.tokenizer
        if t.kind != 'trained':
            return params, {}
        shapes = jax.eval_shape(lambda x: self.tokenizer.init(jax.random.key(0), x)['params'], spectrogram)
        codebook = jax.ShapeDtypeStruct((t.codebook_size, t.code_dim), jnp.float32)
        if os.path.isdir(os.path.join(t.path, 'checkpoints')):  # a tokenizer run: its codebook is method state
            extra = base.load_frozen(t.path, 'tokenizer.path', {'tokenizer': shapes})
            extra.update(base.load_frozen(t.path, 'tokenizer.path', {'codebook': codebook}, tree='extra'))
        else:  # a params directory holding both
            extra = base.load_frozen(t.path, 'tokenizer.path', {'tokenizer': shapes, 'codebook': codebook})
        return params, extra

    def labels(self, extra: Any, spectrogram: jax.Array) -> jax.Array:
        """The tokenizer's label of every patch (B, L) int32."""
        if self.config.tokenizer.kind == 'trained':
            z = self.tokenizer.apply({'params': extra['tokenizer']}, spectrogram)
            return jax.lax.stop_gradient(norm_ema_quantizer.nearest_codes(z, extra['codebook']))
        return tokenize(patchify(spectrogram), jnp.asarray(self.projection), jnp.asarray(self.codebook))

    def loss(self, params, extra, batch, rng, step):
        spectrogram, masked_idx = batch['spectrogram'], batch['masked_idx']
        logits = self.model.apply(
            {'params': params}, spectrogram, batch['visible_idx'], masked_idx, deterministic=False,
            rngs={'dropout': base.stream(rng, 'dropout')},
        )  # fmt: skip
        take = lambda x: jnp.take_along_axis(x, masked_idx, axis=1)
        labels = take(self.labels(extra, spectrogram))
        weight = take(beats_model.token_valid(spectrogram)).astype(jnp.float32)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
        count = jnp.maximum(weight.sum(), 1.0)
        loss = jnp.sum(nll * weight) / count
        accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight) / count
        # How many codes the batch's targets use: a tokenizer whose labels collapse onto a few codes is easy to
        # predict and teaches nothing.
        used = jnp.zeros(self.config.tokenizer.codebook_size, bool).at[labels.ravel()].max(weight.ravel() > 0).sum()
        metrics = {'loss': loss, 'accuracy': accuracy, 'codes_used': used.astype(jnp.float32)}
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The backbone on the whole spectrogram: 'mean_pool', the mean of the non-padding patch tokens (the
        fine-tuning model's pooling); 'tokens'; and 'raw', the input fbank averaged over its frames, the baseline a
        pooled feature should beat."""
        spectrogram = batch['spectrogram']
        tokens, _ = self.backbone.apply({'params': params['backbone']}, spectrogram)
        tokens = tokens.astype(jnp.float32)
        valid = beats_model.token_valid(spectrogram)[..., None].astype(jnp.float32)
        frames = (jnp.abs(spectrogram).sum(axis=-1, keepdims=True) != 0).astype(jnp.float32)
        return {
            'mean_pool': jnp.sum(tokens * valid, axis=1) / jnp.maximum(valid.sum(axis=1), 1.0),
            'tokens': tokens,
            'raw': jnp.sum(spectrogram * frames, axis=1) / jnp.maximum(frames.sum(axis=1), 1.0),
        }

    def tokens_per_example(self) -> int:
        return self.num_tokens

    def flops_per_example(self) -> float:
        e, n, kept = self.backbone.encoder, self.num_tokens, self.num_kept
        patches = 2 * n * (256 * self.backbone.embed_dim + self.backbone.embed_dim * e.width)
        encoder = transformer_flops(kept, e.width, e.depth, e.mlp)
        predictor = transformer_flops(n, e.width, self.config.model.predictor_depth, e.mlp)
        head = 2 * (n - kept) * e.width * self.config.tokenizer.codebook_size
        labels = 0.0
        if self.config.tokenizer.kind == 'trained':  # the frozen tokenizer runs forward only, on every patch
            t = self.tokenizer.backbone.encoder
            labels = transformer_flops(n, t.width, t.depth, t.mlp)
        return 3.0 * (patches + encoder + predictor + head) + labels  # backward ~ 2x forward
