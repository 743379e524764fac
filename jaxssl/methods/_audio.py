"""Plumbing shared by the audio methods: the jaxssl.data.audio pipelines, skipped-file counts, an example batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxssl.data import audio, skipped_files
from jaxssl.methods import base


class AudioMethod(base.Method):
    """base.Method for methods whose examples are spectrograms (config.input from `add_audio_input_config`); they
    define `sample_transform` (the per-example masks or alterations), init / loss / represent."""

    input_key = 'spectrogram'

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return sample

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Random spectrograms (B, target_length, mel bins) through `sample_transform` (the method's masks or
        alterations), stacked."""
        rng = np.random.default_rng(0)
        c = self.config.input
        spectrograms = rng.normal(size=(batch_size, c.target_length, c.num_mel_bins)).astype(np.float32)
        samples = [self.sample_transform({'spectrogram': s}, rng) for s in spectrograms]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    def reading_order(self, source: Any, seed: int, process_index: int, process_count: int) -> Any:
        """(a Grain MapDataset of source indices to read in place of the shuffled shard, examples per epoch), or
        None for the shuffle."""
        return None

    def batch_transform(self) -> Any:
        """A picklable fn(host batch, rng) -> batch for work on whole batches (None: none), built in the main
        process so that Grain workers need no JAX."""
        return None

    def train_source(self) -> Any:
        """The training split's source (default: the one `config.input` names)."""
        return audio.make_audio_source(self.config)

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        source = self.train_source()
        order = self.reading_order(source, seed, process_index, process_count)
        dataset = audio.make_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            sample_transform=self.sample_transform,
            source=source,
            batch_transform=self.batch_transform(),
            order=None if order is None else order[0],
        )
        return dataset, len(source) if order is None else order[1]

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = audio.make_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )
        return dataset

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(skipped_files())}


def random_waveforms(batch_size: int, num_samples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Full-length noise waveforms ('waveform' (B, N) float32 at about a tenth of full scale, 'num_samples' (B,)):
    the example batch of the waveform methods, before their batch transform."""
    return {
        'waveform': rng.normal(size=(batch_size, num_samples)).astype(np.float32) * 0.1,
        'num_samples': np.full(batch_size, num_samples, np.int32),
    }
