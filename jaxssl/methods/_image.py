"""The plumbing every image method shares: its input key, the input pipeline's skipped-file counter, the labelled
eval split the frozen-feature probes read, and tokens per image for the progress line."""

from __future__ import annotations

from jaxssl import data
from jaxssl.data import images as image_data
from jaxssl.methods import base
from jaxssl.models import mae as mae_model


class ImageMethod(base.Method):
    """base.Method for methods whose examples are images (config.input from `add_image_input_config`) and whose
    `self.model` has a `patch` size; they define dataset / init / loss / represent."""

    input_key = 'image'

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = image_data.make_image_eval_dataset(
            self.config,
            split=split,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )
        return dataset

    def tokens_per_example(self) -> int:
        grid = mae_model.token_grid(self.config.input.image_size, self.model.patch)
        return grid[0] * grid[1]
