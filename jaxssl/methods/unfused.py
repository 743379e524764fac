"""UNFUSED (Seth, Ghosh, Umesh, Manocha, "UNFUSED: UNsupervised Finetuning Using SElf supervised Distillation",
ICASSP 2023 SASB workshop; code Sreyan88/LAPE, src/upstream/unfused/): a self-supervised teacher's features are
clustered into pseudo labels, and a randomly initialised student learns them with multi-exit self-distillation.

The three steps in jaxssl:
1. any audio run is the teacher (the reference's is a DeepCluster-trained AudioNTT; here e.g. configs/tera.py);
2. `python -m jaxssl.pseudo_labels --workdir=<teacher run> --representation=<name> --pca_whiten=128 --l2_normalize
   --iterations=20 --clusters=32` writes one label per training clip (the reference's clustering.py);
3. this method: the student (jaxssl.models.audio_ntt, BYOL-A's AudioNTT2020 with an exit after each conv block) and
   jaxssl.losses.self_distillation on input.pseudo_labels.

Batch layout: 'spectrogram' (B, T, mel) from the audio pipeline (input.features 'byola_log_mel', the reference's
front end, by default), 'pseudo_label' int32 (B,) from the .npy, and the source's own 'label' (unused here). The
BatchNorm running statistics are `extra` state. `represent` gives the clip embedding (max + mean over time of the fc
frames, the reference's upstream output), 'mean_pool' (the mean alone, what its downstream head reads) and the three
exits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import pseudo_labels
from jaxssl.config import ConfigError, check_range
from jaxssl.data import audio
from jaxssl.losses.self_distillation import self_distillation_loss
from jaxssl.methods import _audio, base
from jaxssl.models import audio_ntt


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, loss or input cannot use (the label file: at run start)."""
    audio.check_audio_input_config(config)
    c, m = config.input, config.model
    if c.features == 'waveform':
        raise ConfigError("'input.features' must be a log-mel front end for UNFUSED's CNN, not 'waveform'")
    for key in ('classes', 'channels', 'blocks', 'width'):
        if m[key] < 1:
            raise ConfigError(f"bad value {m[key]} for 'model.{key}': must be >= 1")
    if m.classes < 2:
        raise ConfigError(f"bad value {m.classes} for 'model.classes': need >= 2 pseudo classes")
    check_range(config, 'model.dropout', 0.0, 1.0)
    smallest = 2**m.blocks
    for key in ('target_length', 'num_mel_bins'):
        if c[key] < smallest:
            raise ConfigError(
                f"bad value {c[key]} for 'input.{key}': {m.blocks} 2x2 poolings ('model.blocks') need >= {smallest}"
            )
    for key in ('exit_weight', 'kl_weight', 'cosine_weight'):
        if not config.loss[key] >= 0:
            raise ConfigError(f"bad value {config.loss[key]} for 'loss.{key}': must be >= 0")


def load_pseudo_labels(config: ml_collections.ConfigDict, num_examples: int) -> np.ndarray:
    """input.pseudo_labels as int (N,), one per training clip, each in [0, model.classes)."""
    how_to_make = (
        'make one from a teacher run with `python -m jaxssl.pseudo_labels --workdir=<run> --pca_whiten=128 '
        '--l2_normalize --iterations=20 --clusters=K`'
    )
    labels = pseudo_labels.load_labels(config.input.pseudo_labels, num_examples, how_to_make, 'training clips')
    if labels.min() < 0 or labels.max() >= config.model.classes:
        raise ConfigError(
            f"input.pseudo_labels: labels {labels.min()}..{labels.max()} do not fit 'model.classes' = "
            f'{config.model.classes}: set it to the number of clusters'
        )
    return labels


class PseudoLabelledSource:
    """An audio source whose records also carry 'pseudo_label' (the pipeline batches every name in label_keys)."""

    def __init__(self, source: Any, labels: np.ndarray):
        self.source, self.labels = source, labels
        self.label_keys = (*source.label_keys, 'pseudo_label')

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], 'pseudo_label': int(self.labels[index])}

    def __repr__(self) -> str:
        return f'PseudoLabelledSource({self.source!r})'


class Method(_audio.AudioMethod):
    """UNFUSED's student for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = audio_ntt.Unfused(m.classes, m.channels, m.blocks, m.width, m.dropout)

    def train_source(self) -> Any:
        if self.config.input.features == 'byola_log_mel':
            audio.check_byola_statistics(self.config)
        source = super().train_source()
        return PseudoLabelledSource(source, load_pseudo_labels(self.config, len(source)))

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        c = self.config.input
        return {
            'spectrogram': np.zeros((batch_size, c.target_length, c.num_mel_bins), np.float32),
            'pseudo_label': np.zeros(batch_size, np.int32),
        }

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = self.model.init(rng, batch['spectrogram'])
        return variables['params'], {'batch_stats': variables['batch_stats']}

    def loss(self, params, extra, batch, rng, step):
        (clip_logits, exit_logits, _, _), updated = self.model.apply(
            {'params': params, **extra},
            batch['spectrogram'],
            True,
            rngs={'dropout': base.stream(rng, 'dropout')},
            mutable=['batch_stats'],
        )
        w = self.config.loss
        loss, metrics = self_distillation_loss(
            clip_logits,
            exit_logits,
            batch['pseudo_label'],
            exit_weight=w.exit_weight,
            kl_weight=w.kl_weight,
            cosine_weight=w.cosine_weight,
        )
        return loss, (metrics, {'batch_stats': jax.lax.stop_gradient(updated['batch_stats'])})

    def represent(self, params, extra, batch):
        """'embedding' (max + mean over time, the reference's upstream output), 'mean_pool' (its downstream head's
        pooling) and 'exit1'..'exitN' (each block's time-averaged map), with running BatchNorm statistics."""
        embedding, exits, frames = self.model.apply(
            {'params': params, **extra}, batch['spectrogram'], method=self.model.encode
        )
        out = {'embedding': embedding, 'mean_pool': jnp.mean(frames, axis=1)}
        out.update({f'exit{i + 1}': x for i, x in enumerate(exits)})
        return out
