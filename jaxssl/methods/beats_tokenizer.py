"""BEATs's self-distilled acoustic tokenizer (Chen et al., ICML 2023, section 3.3): the tokenizer of iteration n + 1,
trained to carry what a frozen BEATs of iteration n knows.

The tokenizer (jaxssl.models.beats.Tokenizer: a BEATs backbone, Linear - tanh - Linear to 256, L2 normalisation)
quantizes every patch to its nearest unit codebook vector (jaxssl.models.norm_ema_quantizer: K = 1024, cosine
k-means on the first batch, EMA 0.99 of the normalised code means, the codebook in the extra state). An estimator
(a 3-block Transformer, the paper's; its code is not released) reads the quantized sequence (straight-through) and
predicts the teacher's last-layer output of every patch. Loss: mean over patches of 1 - cos(prediction, teacher) +
beta ||sg(z_q) - z||^2 (the reference quantizer's MSE, beta 1). The teacher (`teacher.path`: a `configs/beats.py`
workdir, or a params directory holding 'backbone') runs on the whole, unmasked spectrogram, frozen.

The trained tokenizer labels iteration n + 1's pretraining: `configs/beats.py` with tokenizer.kind='trained' and
tokenizer.path=<this workdir>.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.methods import _audio, base
from jaxssl.methods import beats as beats_method
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import beats as beats_model
from jaxssl.models import norm_ema_quantizer as vq


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the tokenizer, estimator, teacher or front end cannot use."""
    check_choice(config, 'model.variant', beats_model.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    if config.model.estimator_depth < 1:
        raise ConfigError(f"bad value {config.model.estimator_depth} for 'model.estimator_depth': must be >= 1")
    for key in ('codebook_size', 'code_dim', 'kmeans_iterations'):
        if config.quantizer[key] < 1:
            raise ConfigError(f"bad value {config.quantizer[key]} for 'quantizer.{key}': must be >= 1")
    check_range(config, 'quantizer.decay', 0.0, 1.0)
    check_range(config, 'quantizer.beta', 0.0, float('inf'))
    beats_method.check_spectrogram_config(config)
    # teacher.path is checked when the method is built (the run's start): a config loads without one.


class Method(_audio.AudioMethod):
    """BEATs tokenizer training for the trainer; extra state {'teacher': frozen backbone params, 'codebook' (K, d),
    'usage' (K,) the EMA of each code's count, 'initialised' () bool}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, q = config.model, config.quantizer
        # No dropout (the released models' cfg has none; the paper names none for the tokenizer).
        no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        backbone = beats_model.make_backbone(m.variant, DTYPES[m.dtype], **no_dropout)
        encoder = backbone.encoder
        estimator = beats_model.Encoder(
            encoder.width, m.estimator_depth, encoder.heads, encoder.mlp, encoder.pos_conv_kernel,
            encoder.pos_conv_groups, dtype=encoder.dtype, **no_dropout,
        )  # fmt: skip
        teacher_variant = beats_method.stored_variant(config.teacher.path, config.teacher.variant, 'teacher')
        self.teacher = beats_model.make_backbone(teacher_variant, DTYPES[m.dtype])
        tokenizer = beats_model.Tokenizer(backbone, q.code_dim)
        self.model = beats_model.TokenizerTraining(tokenizer, estimator, self.teacher.encoder.width)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        spectrogram = batch['spectrogram']
        params = self.model.init(rng, spectrogram)['params']
        shapes = jax.eval_shape(lambda x: self.teacher.init(jax.random.key(0), x)['params'], spectrogram)
        q = self.config.quantizer
        extra = {
            'teacher': base.load_frozen(self.config.teacher.path, 'teacher.path', {'backbone': shapes})['backbone'],
            'codebook': jnp.zeros((q.codebook_size, q.code_dim), jnp.float32),  # set by k-means on the first batch
            'usage': jnp.zeros(q.codebook_size, jnp.float32),
            'initialised': jnp.zeros((), bool),
        }
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        q = self.config.quantizer
        spectrogram = batch['spectrogram']
        valid = beats_model.token_valid(spectrogram)
        weights = valid.reshape(-1).astype(jnp.float32)
        variables = {'params': params}
        z = self.model.apply(variables, spectrogram, method=self.model.encode)
        flat = jax.lax.stop_gradient(z).reshape(-1, q.code_dim)
        # The first step's codebook: k-means on this batch (usage starts at 0, as the reference's statistics).
        start = base.stream(rng, 'kmeans')
        kmeans = lambda: vq.kmeans_init(flat, weights, q.codebook_size, start, q.kmeans_iterations)[0]
        codebook = jax.lax.cond(extra['initialised'], lambda: extra['codebook'], kmeans)
        usage = extra['usage']
        codes = vq.nearest_codes(z, codebook)
        z_q = codebook[codes]
        commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z), axis=-1)
        quantized = z + jax.lax.stop_gradient(z_q - z)  # straight-through to the tokenizer
        prediction = self.model.apply(variables, quantized, valid, method=self.model.estimate)
        target, _ = self.teacher.apply({'params': extra['teacher']}, spectrogram)
        cosine = jnp.sum(vq.l2norm(prediction) * vq.l2norm(jax.lax.stop_gradient(target.astype(jnp.float32))), -1)
        count = jnp.maximum(weights.sum(), 1.0)
        mean = lambda x: jnp.sum(x.reshape(-1) * weights) / count
        cosine_loss, commitment_loss = 1.0 - mean(cosine), q.beta * mean(commitment)
        loss = cosine_loss + commitment_loss
        new_codebook, new_usage = vq.ema_update(codebook, usage, flat, codes.reshape(-1), weights, q.decay)
        used = jnp.zeros(q.codebook_size, bool).at[codes.reshape(-1)].max(weights > 0).sum()
        metrics = {
            'loss': loss,
            'cosine': mean(cosine),
            'commitment': commitment_loss,
            'codes_used': used.astype(jnp.float32),
        }
        new_extra = {**extra, 'codebook': new_codebook, 'usage': new_usage, 'initialised': jnp.ones((), bool)}
        return loss, (metrics, new_extra)

    def represent(self, params, extra, batch):
        """The tokenizer's backbone on the whole spectrogram: 'mean_pool' (non-padding patch tokens), 'tokens', and
        the teacher's 'teacher_mean_pool' beside it."""
        spectrogram = batch['spectrogram']
        valid = beats_model.token_valid(spectrogram)[..., None].astype(jnp.float32)
        pool = lambda tokens: jnp.sum(tokens.astype(jnp.float32) * valid, 1) / jnp.maximum(valid.sum(1), 1.0)
        tokens, _ = self.model.tokenizer.backbone.apply({'params': params['tokenizer']['backbone']}, spectrogram)
        teacher, _ = self.teacher.apply({'params': extra['teacher']}, spectrogram)
        return {'mean_pool': pool(tokens), 'tokens': tokens.astype(jnp.float32), 'teacher_mean_pool': pool(teacher)}

    def tokens_per_example(self) -> int:
        return beats_method.num_tokens(self.config)

    def flops_per_example(self) -> float:
        n, m = beats_method.num_tokens(self.config), self.config.model
        e, t = self.model.tokenizer.backbone.encoder, self.teacher.encoder
        tokenizer = transformer_flops(n, e.width, e.depth, e.mlp)
        estimator = transformer_flops(n, e.width, m.estimator_depth, e.mlp)
        teacher = transformer_flops(n, t.width, t.depth, t.mlp)
        return 3.0 * (tokenizer + estimator) + teacher  # the teacher runs forward only
