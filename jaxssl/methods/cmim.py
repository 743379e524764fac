"""cMIM (Livne, arXiv 2411.10548 / 2509.21511): the Mutual Information Machine (A-MIM, a probabilistic autoencoder
that maximises the mutual information between images and latents and clusters the latents) with a contrastive term
that needs no augmented second view, and "informative embeddings" taken from the decoder's hidden states.

Batch layout: 'image' (B, S, S, 3), ImageNet-normalised like every image pipeline here, one plain view per image
(cMIM needs no positive augmentation; input.eval_crop_pct = 1 keeps the whole image). The loss maps it back to
[0, 1] pixels, averaged over RGB to one channel with model.channels = 1 (grey images such as MNIST's, whose three
copies would otherwise count three times in the likelihood): the encoder's input and the Bernoulli decoder's
targets. Each step draws one z per image from q(z|x) (stream 'latent') and takes jaxssl.losses.mim's per-sample
loss, averaged over the batch. The contrastive term's negatives are the whole global batch (the reference's are one
GPU's batch; with averaged negatives the term's scale does not depend on how many there are).

`represent`: 'mean', the encoder's mean mu(x) (MIM's representation), and 'informative': mu(x) concatenated with the
decoder's hidden states decoded from mu(x) (its dense layer, then each feature map averaged over space). The papers
say only that informative embeddings are training-free features from the decoder's hidden states; which states and
how they are pooled is our reading (docs/methods.md).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.losses import mim as mim_loss
from jaxssl.methods import _image, base
from jaxssl.methods.gsimclr_dae import plain_view, to_unit_range
from jaxssl.models import mim as mim_model
from jaxssl.optim import OPTIMIZERS


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or loss cannot use (data paths: at run start)."""
    m = config.model
    widths = tuple(m.widths)
    if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ConfigError(f"bad value {widths!r} for 'model.widths': need integers >= 1")
    if config.input.image_size % 2 ** len(widths):
        raise ConfigError(
            f"bad value {config.input.image_size} for 'input.image_size': must be divisible by 2^{len(widths)} "
            "(one stride-2 convolution per entry of 'model.widths')"
        )
    for key in ('hidden', 'latent'):
        if not isinstance(m[key], int) or m[key] < 1:
            raise ConfigError(f"bad value {m[key]!r} for 'model.{key}': need an integer >= 1")
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")
    check_range(config, 'loss.contrastive_weight', 0.0, float('inf'))
    if not config.loss.reconstruction_weight > 0:
        raise ConfigError(
            f"bad value {config.loss.reconstruction_weight} for 'loss.reconstruction_weight': must be > 0"
        )
    check_choice(config, 'loss.reconstruction_reduction', ('mean', 'sum'))
    if config.loss.contrastive_weight > 0 and config.input.global_batch < 2:
        raise ConfigError(
            f"bad value {config.input.global_batch} for 'input.global_batch': the contrastive term needs 2+ samples "
            'a batch (or loss.contrastive_weight = 0)'
        )
    if not isinstance(m.channels, int) or m.channels not in (1, 3):
        raise ConfigError(f"bad value {m.channels!r} for 'model.channels': 1 (grey) or 3 (RGB)")
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': cMIM takes one view")
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"bad value '{config.optim.name}' for 'optim.name'; valid: {', '.join(OPTIMIZERS)}")


def informative_embedding(mean: jax.Array, states: list[jax.Array]) -> jax.Array:
    """mu(x) concatenated with the decoder's hidden states (feature maps averaged over space): (B, D')."""
    pooled = [s if s.ndim == 2 else s.mean(axis=(1, 2)) for s in states]
    return jnp.concatenate([mean, *pooled], axis=-1)


class Method(_image.ImageMethod):
    """cMIM (and A-MIM with loss.contrastive_weight = 0) for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = mim_model.MIM(
            image_size=config.input.image_size,
            channels=m.channels,
            widths=tuple(m.widths),
            hidden=m.hidden,
            latent=m.latent,
        )

    def pixels(self, images: jax.Array) -> jax.Array:
        """ImageNet-normalised RGB images -> the model's [0, 1] pixels (grey with model.channels = 1)."""
        chex.assert_rank(images, 4)
        pixels = to_unit_range(images)
        return pixels.mean(axis=-1, keepdims=True) if self.config.model.channels == 1 else pixels

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        c = self.config.input
        view = functools.partial(plain_view, size=c.image_size, crop_pct=c.eval_crop_pct, interpolation=c.interpolation)
        return self.view_dataset(seed, process_index, process_count, view)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.model.init(rng, self.pixels(batch['image']))['params'], {}

    def loss(self, params, extra, batch, rng, step):
        pixels = self.pixels(batch['image'])
        mean, log_scale = self.model.apply({'params': params}, pixels, method=mim_model.MIM.encode)
        z = mean + jnp.exp(log_scale) * jax.random.normal(base.stream(rng, 'latent'), mean.shape)
        logits, _ = self.model.apply({'params': params}, z, method=mim_model.MIM.decode)
        c = self.config.loss
        loss, terms = mim_loss.mim_loss(
            logits,
            pixels,
            z,
            mean,
            log_scale,
            temperature=c.temperature,
            contrastive_weight=c.contrastive_weight,
            reconstruction_weight=c.reconstruction_weight,
            reconstruction_reduction=c.reconstruction_reduction,
        )
        # The posterior's mean scale: MIM's entropy term drives it down towards the floor (MIN_LOG_SCALE).
        metrics = {'loss': loss, **terms, 'log_scale': log_scale.mean()}
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        pixels = self.pixels(batch['image'])
        mean, _ = self.model.apply({'params': params}, pixels, method=mim_model.MIM.encode)
        _, states = self.model.apply({'params': params}, mean, method=mim_model.MIM.decode)
        return {'mean': mean, 'informative': informative_embedding(mean, states)}

    def visualize(self, params, extra):
        """The first `eval.pictures` images of the eval split (row 1), their reconstructions decoded from mu(x)
        (row 2) and as many images decoded from prior draws z ~ N(0, I) (row 3: MIM is a generative model too)."""
        from jaxssl.evaluate import reconstruction

        count = self.config.eval.pictures
        if count <= 0:
            return {}
        batch = next(iter(self.eval_dataset(self.config.eval.split, count, count, 0, 1)))
        pixels = self.pixels(jnp.asarray(batch['image'][:, 0]))
        mean, _ = self.model.apply({'params': params}, pixels, method=mim_model.MIM.encode)
        prior = jax.random.normal(jax.random.key(self.config.seed), mean.shape)
        rows = {'input': pixels}
        for name, z in (('reconstruction', mean), ('sample', prior)):
            logits, _ = self.model.apply({'params': params}, z, method=mim_model.MIM.decode)
            rows[name] = jax.nn.sigmoid(logits)
        rgb = {k: np.broadcast_to(np.asarray(v, np.float32), (*v.shape[:3], 3)) for k, v in rows.items()}
        return {'reconstruction': reconstruction.grid([rgb], order=('input', 'reconstruction', 'sample'))}
