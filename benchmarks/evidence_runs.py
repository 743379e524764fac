"""Shared by the evidence scripts that run a method's config several times (settings x seeds) in their own
processes: each run's last evaluation record, and the table of means +- std over seeds."""

from __future__ import annotations

import json
import os

import numpy as np


def last_eval(workdir: str) -> dict[str, float]:
    """The last evaluation record of a run's metrics.jsonl, without the 'eval/' prefix."""
    found = {}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            if any(k.startswith('eval/') for k in record):
                found = {k[5:]: v for k, v in record.items() if k.startswith('eval/')}
    return found


def print_table(results: dict[str, list[dict[str, float]]], columns: tuple[str, ...]) -> None:
    """A markdown table: one row per setting, each column's mean +- std over its runs ('-' where none has it)."""
    print('| setting | ' + ' | '.join(columns) + ' |')
    print('|---' * (len(columns) + 1) + '|')
    for name, runs in results.items():
        cells = []
        for column in columns:
            values = np.array([r[column] for r in runs if column in r])
            cells.append(f'{values.mean():.3f} +- {values.std():.3f}' if len(values) else '-')
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
