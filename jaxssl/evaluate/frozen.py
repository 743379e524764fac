"""Frozen-feature evaluation of any pretraining method: features of a train and a test split, then probes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxssl import transferability
from jaxssl.evaluate import features, probes

PROBES = ('linear', 'knn', 'fewshot', 'attentive', 'logme')


def run_probes(
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    label_keys: Sequence[str],
    probe_names: Sequence[str] = ('linear', 'knn'),
    knn_k: int = 20,
    shots: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracies keyed '<label>/<representation>/<probe>' for every label and representation present."""
    unknown = set(probe_names) - set(PROBES)
    if unknown:
        raise ValueError(f'unknown probes {sorted(unknown)}; valid: {", ".join(PROBES)}')
    keep_train, keep_test = train['valid'] > 0, test['valid'] > 0
    labels = [k for k in label_keys if k in train]
    pooled = [k for k in train if k not in (*labels, 'valid', 'index', 'tokens') and train[k].ndim == 2]
    results = {}
    for label in labels:
        y_train, y_test = train[label][keep_train], test[label][keep_test]
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        for rep in pooled:
            x_train, x_test = train[rep][keep_train], test[rep][keep_test]
            if 'linear' in probe_names:
                acc = probes.linear_probe(x_train, y_train, x_test, y_test, num_classes, seed=seed)
                results[f'{label}/{rep}/linear'] = acc
            if 'knn' in probe_names:
                acc = probes.knn_probe(x_train, y_train, x_test, y_test, knn_k, num_classes=num_classes)
                results[f'{label}/{rep}/knn'] = acc
            if 'fewshot' in probe_names:
                acc = probes.few_shot_probe(x_train, y_train, x_test, y_test, shots, seed=seed)
                results[f'{label}/{rep}/{shots}shot'] = acc
            if 'logme' in probe_names:  # a transferability score of the training features, not an accuracy
                classes = np.unique(y_train, return_inverse=True)[1]
                results[f'{label}/{rep}/logme'] = transferability.logme(x_train, classes)
        if 'attentive' in probe_names and 'tokens' in train:
            tokens_train, tokens_test = train['tokens'][keep_train], test['tokens'][keep_test]
            acc = probes.attentive_probe(tokens_train, y_train, tokens_test, y_test, num_classes, seed=seed)
            results[f'{label}/tokens/attentive'] = acc
    return results


def evaluate(
    method: Any, params: Any, extra: Any, mesh: jax.sharding.Mesh, eval_config: ml_collections.ConfigDict
) -> dict[str, float]:
    """Probes `method.represent` with `method.eval_dataset` splits as `eval_config` says (see add_probe_config)."""
    e = eval_config
    splits = extract_splits(method, params, extra, mesh, e)
    return run_probes(splits['train'], splits['test'], e.label_keys, e.probes, e.knn_k, e.shots, seed=0)


def extract_splits(
    method: Any, params: Any, extra: Any, mesh: jax.sharding.Mesh, eval_config: ml_collections.ConfigDict
) -> dict[str, dict[str, np.ndarray]]:
    """{'train': features, 'test': features} (jaxssl.evaluate.features.extract) of the splits `eval_config` names."""
    e = eval_config
    keep_tokens = 'attentive' in e.probes
    splits = {}
    for name, split, max_clips in (('train', e.train_split, e.max_train_clips), ('test', e.split, e.max_test_clips)):
        dataset = method.eval_dataset(split, e.batch_size, max_clips, jax.process_index(), jax.process_count())
        splits[name] = features.extract(method, params, extra, dataset, mesh, keep_tokens)
    return splits


def add_probe_config(config: ml_collections.ConfigDict, label_keys: Sequence[str], runlocal: bool = False) -> None:
    """The eval section of a pretraining config: which splits, labels and probes Method.evaluate uses."""
    e = config.eval
    e.train_split = 'train'  # features to fit the probes on
    e.split = 'val'  # features to test them on
    e.label_keys = tuple(label_keys)
    # also 'fewshot', 'attentive' (keeps token features: memory grows with tokens), 'logme' (jaxssl.transferability's
    # LogME of the training features: a score, higher is better, not an accuracy)
    e.probes = ('linear', 'knn')
    e.knn_k = 20
    e.shots = 5
    e.batch_size = 32  # clips per host batch (x views must divide over the batch devices)
    e.max_train_clips = 1000 if runlocal else 10000  # 0: all
    e.max_test_clips = 500 if runlocal else 5000
