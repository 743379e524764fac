"""AdvEncoder (Zhou et al., "Downstream-agnostic Adversarial Examples", ICCV 2023): one universal adversarial
perturbation or patch, made by a generator, that pushes a frozen self-supervised encoder's features of every image
away from its features of the clean image, so that any downstream classifier built on the encoder fails.

Reference: CGCL-codes/AdvEncoder@3dd1c4e (gan_per_attack.py, gan_pat_attack.py, model/adv_gan.py, utils/nce.py,
utils/fr_util.py, utils/patch_utils.py), shared/reference/methods/tools_simcore_ctreduction_ssdd_ped_dkvb_advencoder_
rkhs.md section 6. Per step, on a batch x of images in [0, 1] pixels:
- the pattern p = generator(z) for a fixed noise batch z (jaxssl.models.uap_generator);
- perturbation: x' = x + clip(p, -eps, eps) (eps 10/255, x' not clipped); patch: x' = M p + (1 - M) x with a square
  mask M of int(sqrt(0.03 S^2)) pixels a side, 14 pixels from the bottom-right corner;
- loss = 5 x (-InfoNCE(E(x), E(x'))) + MSE(x', x) - MSE(H(x), H(x')): InfoNCE of L2-normalised features at
  temperature 0.1 with in-batch negatives (pushing x' away from x), the L2 size of the change, and H the
  high-pass filter (FFT, centred, a disc of radius 8 removed), whose difference is maximised;
- Adam (lr 2e-4, betas 0.5 / 0.999) on the generator only; E is frozen (ImageNet-normalised inputs).
The victim E is any jaxssl image run (`attack.victim`, its representation `attack.victim_representation`).

Evaluation: probes fitted on clean features of the evaluation train split (kNN, the reference's monitor, and the
library's linear probe) classify the test split clean, attacked, and under random noise of the same form (uniform
in [-eps, eps], or a uniform random patch): accuracies and the fooling rate (the share of test predictions the
pattern changes, the reference's attack success rate), plus the mean cosine between clean and attacked features.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import images as image_data
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import _frozen_run, _image, base
from jaxssl.models.uap_generator import PatternGenerator

FORMS = ('perturbation', 'patch')


def check_config(config: ml_collections.ConfigDict) -> None:
    a, g = config.attack, config.generator
    check_choice(config, 'attack.form', FORMS)
    size = 4 * 2 ** len(g.filters)
    if config.input.image_size != size:
        raise ConfigError(
            f"'input.image_size' {config.input.image_size}: the generator's {len(g.filters)} 'generator.filters' "
            f'make {size} x {size} patterns (4 x 2^layers)'
        )
    for key in ('epsilon', 'temperature'):
        if not a[key] > 0:
            raise ConfigError(f"bad value {a[key]} for 'attack.{key}': must be > 0")
    if not 0 < a.patch_ratio < 1:
        raise ConfigError(f"bad value {a.patch_ratio} for 'attack.patch_ratio': must be in (0, 1)")
    side = int((a.patch_ratio * size * size) ** 0.5)
    if not 0 <= a.patch_margin <= size - side:
        raise ConfigError(f"bad value {a.patch_margin} for 'attack.patch_margin': the {side}-pixel patch must fit")
    for key in ('noise_batch', 'noise_dim'):
        if g[key] < 1:
            raise ConfigError(f"bad value {g[key]} for 'generator.{key}': must be >= 1")
    if a.victim:
        _frozen_run.run_config(a.victim, 'attack.victim', size)


def high_frequency(pixels: jax.Array, radius: float) -> jax.Array:
    """fr_util.generate_high on (N, S, S, C): per image and channel, the 2-D spectrum centred (fftshift), zeroed
    where the distance to (S / 2, S / 2) is below `radius`, shifted back and inverted; the real part."""
    size = pixels.shape[1]
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    keep = np.sqrt((rows - size / 2) ** 2 + (cols - size / 2) ** 2) >= radius
    spectrum = jnp.fft.fftshift(jnp.fft.fft2(pixels, axes=(1, 2)), axes=(1, 2))
    spectrum = spectrum * jnp.asarray(keep, spectrum.real.dtype)[None, :, :, None]
    return jnp.real(jnp.fft.ifft2(jnp.fft.ifftshift(spectrum, axes=(1, 2)), axes=(1, 2)))


def info_nce(query: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """utils/nce.py's InfoNCE without explicit negatives: cosine logits / T, the diagonal is the positive."""
    normalise = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    logits = normalise(query) @ normalise(key).T / temperature
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(logits))).mean()


def patch_mask(size: int, ratio: float, margin: int) -> np.ndarray:
    """patch_utils.mask_generation's square: side int(sqrt(ratio S^2)), at S - margin - side on both axes."""
    side = int((ratio * size * size) ** 0.5)
    start = size - margin - side
    mask = np.zeros((size, size, 1), np.float32)
    mask[start : start + side, start : start + side] = 1.0
    return mask


def to_pixels(images: jax.Array) -> jax.Array:
    return images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)


def to_normalised(pixels: jax.Array) -> jax.Array:
    return (pixels - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class _AttackedFeatures:
    """The frozen-feature evaluators' view of the attack (`params`: (pattern, random pattern), `extra`: the
    victim's state): the victim's features of each evaluation image clean, attacked, and under the random
    pattern."""

    input_key = 'image'
    represent_keys = ()

    def __init__(self, method: Method):
        self.method = method

    def represent(self, patterns, victim, batch):
        images, (pattern, random) = batch['image'], patterns
        features = lambda p: self.method.victim.features(victim, to_normalised(self.method.apply_pattern(images, p)))
        clean = self.method.victim.features(victim, images)
        return {'clean': clean, 'attacked': features(pattern), 'noise': features(random)}

    def eval_dataset(self, *args, **kwargs):
        return self.method.eval_dataset(*args, **kwargs)


class Method(_image.ImageMethod):
    """AdvEncoder for the trainer: params are the generator's; extra state {'victim': the frozen victim's state,
    'noise': the fixed generator input z, 'generator_stats': its BatchNorm averages (unused, as the reference's)}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        a = config.attack
        if not a.victim:
            raise ConfigError("'attack.victim' is empty: pass the workdir of the jaxssl image run to attack")
        self.victim = _frozen_run.FrozenImageRun(
            a.victim, 'attack.victim', config.input.image_size, a.victim_representation, 'attack.victim_representation'
        )
        self.generator = PatternGenerator(tuple(config.generator.filters))
        self.model = self.generator  # ImageMethod reads .model (no patch size: no tokens per example)
        self.mask = jnp.asarray(patch_mask(config.input.image_size, a.patch_ratio, a.patch_margin))

    # --- data ----------------------------------------------------------------------------------------------------
    def dataset(self, seed, process_index, process_count):
        # The reference's loader: Resize((64, 64)) and ToTensor, shuffled, no augmentation.
        view = lambda image, rng: image_data.eval_view(image, size=self.config.input.image_size, crop_pct=1.0)
        return self.view_dataset(seed, process_index, process_count, view)

    # --- the pattern ---------------------------------------------------------------------------------------------
    def pattern(self, params: Any, extra: Any) -> tuple[jax.Array, Any]:
        """(the (S, S, 3) pattern in pixel units, the generator's new BatchNorm averages): clipped to +-eps for a
        perturbation, to [0, 1] for a patch."""
        variables = {'params': params, 'batch_stats': extra['generator_stats']}
        raw, state = self.generator.apply(variables, extra['noise'], mutable=['batch_stats'])
        a = self.config.attack
        low, high = (-a.epsilon, a.epsilon) if a.form == 'perturbation' else (0.0, 1.0)
        return jnp.clip(raw, low, high), state['batch_stats']

    def random_pattern(self, rng: jax.Array) -> jax.Array:
        """The baseline: uniform noise in the pattern's range."""
        a, size = self.config.attack, self.config.input.image_size
        low, high = (-a.epsilon, a.epsilon) if a.form == 'perturbation' else (0.0, 1.0)
        return jax.random.uniform(rng, (size, size, 3), minval=low, maxval=high)

    def apply_pattern(self, images: jax.Array, pattern: jax.Array) -> jax.Array:
        """Normalised images (N, S, S, 3) -> the attacked images in pixel units."""
        pixels = to_pixels(images)
        if self.config.attack.form == 'perturbation':
            return pixels + pattern
        return self.mask * pattern + (1 - self.mask) * pixels

    # --- training ------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        g = self.config.generator
        noise_key, init_key = jax.random.split(base.stream(rng, 'generator'))
        noise = jax.random.normal(noise_key, (g.noise_batch, g.noise_dim))
        variables = self.generator.init(init_key, noise)
        extra = {'victim': self.victim.state(), 'noise': noise, 'generator_stats': variables['batch_stats']}
        return variables['params'], extra

    def loss(self, params, extra, batch, rng, step):
        a = self.config.attack
        pattern, stats = self.pattern(params, extra)
        images = batch['image']
        pixels, attacked = to_pixels(images), self.apply_pattern(images, pattern)
        clean = self.victim.features(extra['victim'], images)
        features = self.victim.features(extra['victim'], to_normalised(attacked))
        contrast = info_nce(clean, features, a.temperature)
        l2 = jnp.mean(jnp.square(attacked - pixels))
        hfc = jnp.mean(jnp.square(high_frequency(pixels, a.radius) - high_frequency(attacked, a.radius)))
        loss = a.weight * -contrast + l2 - hfc
        cosine = optax.cosine_similarity(clean, features).mean()
        metrics = {'loss': loss, 'info_nce': contrast, 'l2': l2, 'high_frequency': hfc, 'feature_cosine': cosine}
        return loss, (metrics, {**extra, 'generator_stats': stats})

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, params, extra, mesh):
        """'<probe>/<clean|attacked|noise>_accuracy', '<probe>/<attacked|noise>_fooling_rate' for the kNN and
        linear probes, and 'feature_cosine' between clean and attacked test features."""
        from jaxssl.evaluate import frozen, probes

        e = self.config.eval
        label = e.label_keys[0]
        patterns = (self.pattern(params, extra)[0], self.random_pattern(jax.random.key(self.config.seed)))
        splits = frozen.extract_splits(_AttackedFeatures(self), patterns, extra['victim'], mesh, e)
        train, test = splits['train'], splits['test']
        keep_train, keep_test = train['valid'] > 0, test['valid'] > 0
        x, y = train['clean'][keep_train], train[label][keep_train]
        truth = test[label][keep_test]
        num_classes = int(max(y.max(), truth.max())) + 1
        classifiers = {
            'knn': functools.partial(probes.knn_predict, x, y, k=e.knn_k, num_classes=num_classes),
            'linear': probes.linear_classifier(x, y, num_classes),
        }
        results = {}
        for name, predict in classifiers.items():
            clean = predict(test['clean'][keep_test])
            for kind in ('clean', 'attacked', 'noise'):
                predicted = clean if kind == 'clean' else predict(test[kind][keep_test])
                results[f'{name}/{kind}_accuracy'] = float(np.mean(predicted == truth))
                if kind != 'clean':
                    results[f'{name}/{kind}_fooling_rate'] = float(np.mean(predicted != clean))
        a, b = test['clean'][keep_test], test['attacked'][keep_test]
        cosine = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        results['feature_cosine'] = float(cosine.mean())
        return results

    def visualize(self, params, extra):
        """The pattern, stretched to the full 0-255 range to be visible."""
        pattern = np.asarray(jax.device_get(self.pattern(params, extra)[0]))
        span = max(float(pattern.max() - pattern.min()), 1e-12)
        return {'pattern': np.round((pattern - pattern.min()) / span * 255).astype(np.uint8)}
