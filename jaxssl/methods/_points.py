"""Plumbing shared by the point-cloud methods: the jaxssl.data.points pipelines, skipped-file counts, an example
batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxssl import data
from jaxssl.data import points as point_data
from jaxssl.methods import base


class PointMethod(base.Method):
    """base.Method for methods whose examples are point clouds (config.input from `add_points_input_config`); they
    define init / loss / represent."""

    input_key = 'points'

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        source = point_data.make_point_source(self.config)
        dataset = point_data.make_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, source=source
        )
        return dataset, len(source)

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = point_data.make_eval_dataset(
            self.config, split=split, batch_size=batch_size, process_index=process_index,
            process_count=process_count, max_examples=max_examples,
        )  # fmt: skip
        return dataset

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Random clouds (B, num_points, 3) and zero labels."""
        rng = np.random.default_rng(0)
        points = rng.normal(size=(batch_size, self.config.input.num_points, 3)).astype(np.float32)
        return {'points': points, 'label': np.zeros(batch_size, np.int32)}
