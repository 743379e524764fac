"""SiamMAE (Gupta et al., NeurIPS 2023, "Siamese Masked Autoencoders"): two frames of one video through one ViT
encoder; the earlier frame is seen whole, the later one 95% masked and reconstructed by a cross-attention decoder
whose queries are its tokens and whose memory is the earlier frame's encoded tokens.

The model, masks, loss and probes are CropMAE's (jaxssl.methods.cropmae, jaxssl.models.cropmae: the
reimplementation both methods share in alexandre-eymael/CropMAE models/SiamMAE.py); what differs is the data: frame
pairs from videos (jaxssl.data.frame_pairs), one crop and one flip shared by both frames, and a 95% mask.

Batch layout: 'image' (B, 2, S, S, 3), ImageNet-normalised, [earlier frame, later frame]; 'frame_index' (B, 2)
int32, the frames' indices in their video; 'ids_keep' (B, n) and 'ids_restore' (B, L) int32, the later frame's MAE
shuffle mask; the source's labels (B,) (unused by the loss). The loss is MAE's (norm-pix) MSE on the later frame's
masked patches only. Probes read the encoder on one frame (each eval video's middle frame).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import checks, frame_pairs, images
from jaxssl.data.sources import make_source
from jaxssl.methods import cropmae, mae
from jaxssl.models import cropmae as cropmae_model


def _pair(config: ml_collections.ConfigDict, key: str) -> tuple[float, float]:
    value = tuple(config.input[key])
    if len(value) != 2:
        raise ConfigError(f"bad value {value} for 'input.{key}': need (low, high)")
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, frame sampler, views or masks cannot use (data paths and
    sources are checked when a run starts)."""
    mae.check_config(config, cropmae_model)
    check_range(config, 'model.dropout', 0.0, 1.0)
    low, high = _pair(config, 'frame_gap')
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low < high):
        raise ConfigError(
            f"bad value {(low, high)} for 'input.frame_gap': need integers 1 <= low < high (gaps in [low, high))"
        )
    low, high = _pair(config, 'crop_scale')
    if not 0 < low <= high <= 1:
        raise ConfigError(f"bad value {(low, high)} for 'input.crop_scale': need 0 < low <= high <= 1")
    low, high = _pair(config, 'crop_ratio')
    if not 0 < low <= high:
        raise ConfigError(f"bad value {(low, high)} for 'input.crop_ratio': need 0 < low <= high")
    check_choice(config, 'input.interpolation', images.INTERPOLATIONS)
    if not 0 < config.input.eval_crop_pct <= 1:
        raise ConfigError(f"bad value {config.input.eval_crop_pct} for 'input.eval_crop_pct': must be in (0, 1]")


class Method(cropmae.Method):
    """SiamMAE pretraining for the trainer: CropMAE's model, masks, loss, init and probes on frame pairs."""

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        checks.check_clip_source_config(self.config)  # files and folders: when a run starts, not at config load
        source = make_source(self.config)
        dataset = frame_pairs.make_frame_pair_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            sample_transform=self.sample_transform,
            source=source,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, Any]:
        batch = super().example_batch(batch_size)  # 'image' (B, 2, S, S, 3) and the mask indices
        gap = self.config.input.frame_gap[0]
        batch['frame_index'] = np.tile(np.array([[0, gap]], np.int32), (batch_size, 1))
        return batch

    def eval_dataset(self, split, batch_size, max_examples, process_index, process_count):
        dataset, _ = frame_pairs.make_frame_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )
        return dataset
