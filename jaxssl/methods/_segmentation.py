"""Pieces shared by the methods that train a 2-D UNet segmenter on labelled medical volumes (global_local's
fine-tuning evaluation, FST's semi-supervised training): the full UNet as one object, the Dice measures, the
labelled volumes of a split and the per-volume test Dice."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError
from jaxssl.data import decode, pipeline, slices
from jaxssl.models.unet import SegmentationHead, UNetDecoder, UNetEncoder


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """losses.py dice_loss_with_backgrnd: 1 - mean over images and classes of 2 sum(p y) / (sum p + sum y + 1e-10),
    p the softmax, targets (soft) one-hot (N, H, W, K)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    intersection = jnp.sum(p * targets, axis=(1, 2))
    total = jnp.sum(p, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2))
    return 1.0 - jnp.mean(2.0 * intersection / (total + 1e-10))


def foreground_dice(prediction: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """Per foreground class Dice of a whole volume's integer maps (f1 per class on the flattened volume); a class
    absent from both counts 1."""
    out = []
    for k in range(1, classes):
        p, y = prediction == k, label == k
        denominator = p.sum() + y.sum()
        out.append(1.0 if denominator == 0 else 2.0 * np.sum(p & y) / denominator)
    return np.array(out)


class Segmenter:
    """The full UNet of the fine-tuning stage as flat {'encoder', 'decoder', 'head'} variables."""

    def __init__(self, channels: tuple[int, ...], classes: int, momentum: float = 0.99):
        self.encoder, self.decoder = UNetEncoder(channels, momentum), UNetDecoder(channels, momentum=momentum)
        self.head = SegmentationHead(channels[0], classes, momentum)

    def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(rng, 3)
        encoder = self.encoder.init(keys[0], images)
        bottleneck, skips = self.encoder.apply(encoder, images)
        decoder = self.decoder.init(keys[1], bottleneck, skips)
        head = self.head.init(keys[2], self.decoder.apply(decoder, bottleneck, skips))
        return {'encoder': encoder, 'decoder': decoder, 'head': head}

    def apply(self, variables: dict[str, Any], images: jax.Array, train: bool) -> tuple[jax.Array, dict[str, Any]]:
        """(logits, the variables with the BatchNorm averages updated when training; unchanged otherwise)."""
        updated = {}

        def run(name, module, *inputs):
            out, state = module.apply(variables[name], *inputs, train, mutable=['batch_stats'])
            updated[name] = {**variables[name], **state}
            return out

        bottleneck, skips = run('encoder', self.encoder, images)
        features = run('decoder', self.decoder, bottleneck, skips)
        return run('head', self.head, features), updated


def labelled_volumes(
    config: ml_collections.ConfigDict, split: str, count: int, key: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (Z, S, S), labels (Z, S, S)) of the first `count` readable labelled volumes of `split` (unreadable or
    unlabelled ones are skipped and counted); `key` names the config key that asked for `count`."""
    source = slices.make_volume_source(config, split)
    volumes = []
    for index in range(len(source)):
        record = source[index]
        try:
            image, label = slices.decode_volume(record, config.input.image_size)
            if label is None:
                raise decode.DecodeError(f'{record["name"]} has no labels')
        except decode.DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            continue
        volumes.append((image, label))
        if len(volumes) == count:
            break
    if len(volumes) < count:
        raise ConfigError(f"'{key}' {count}: split '{split}' has {len(volumes)} labelled volumes")
    return volumes


@functools.partial(jax.jit, static_argnums=0)
def _predict(segmenter: Segmenter, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    logits, _ = segmenter.apply(variables, images, train=False)
    return jnp.argmax(logits, axis=-1)


def dice_report(segmenter: Segmenter, variables: dict[str, Any], volumes: list, names: tuple[str, ...],
                prefix: str) -> dict[str, float]:  # fmt: skip
    """'<prefix>/dice' (the mean over `volumes` of the mean foreground Dice, BatchNorm running averages) and
    '<prefix>/dice/<class>' for the foreground classes `names[1:]`; 16 slices a call."""
    scores = []
    for image, label in volumes:
        chunks = [jnp.asarray(image[i : i + 16, ..., None]) for i in range(0, len(image), 16)]
        prediction = np.concatenate([np.asarray(_predict(segmenter, variables, chunk)) for chunk in chunks])
        scores.append(foreground_dice(prediction, label, len(names)))
    scores = np.array(scores)
    return {f'{prefix}/dice': float(scores.mean()),
            **{f'{prefix}/dice/{name}': float(scores[:, k].mean()) for k, name in enumerate(names[1:])}}  # fmt: skip
