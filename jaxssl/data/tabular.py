"""Tabular data: built-in tables, a CSV reader for user tables, the reference preprocessing, Grain pipelines.

A table becomes one float32 row per example, `(D,)` = the numerical features MinMax-scaled to [0, 1] (fitted on the rows
the model pretrains on), then the categorical features as category indices (stored as floats, exactly, so one array
carries a row: the T-JEPA reference passes rows the same way). Rows are split into train / val / test once per
`input.split_seed`, deterministically.

Built-in tables (offline, shipped by PyPI packages; `input.table` names one):
  fair           statsmodels' affairs survey, 6,366 rows: 4 numerical + 4 categorical features; target: any affair
  anes96         statsmodels' 1996 US election survey, 944 rows: 7 numerical + 2 categorical; target: the vote
  breast_cancer  scikit-learn, 569 rows, 30 numerical features, 2 classes
  wine           scikit-learn, 178 rows, 13 numerical features, 3 classes
Any other `input.table` is a path to a CSV file (delimiter sniffed unless `input.delimiter` is set); rows that cannot
be used (wrong field count, a missing value, text in a numerical column) are counted, reported and left out.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

MISSING = frozenset({'', 'na', 'n/a', 'nan', 'null', 'none', '?'})
SPLITS = ('train', 'val', 'test')
MAX_REPORTED = 5  # bad rows named in the report; the rest are only counted


@dataclasses.dataclass(frozen=True)
class Table:
    """A parsed table before scaling: raw numerical values, category indices and class indices."""

    name: str
    numerical: np.ndarray  # (N, Dn) float64, raw values
    categorical: np.ndarray  # (N, Dc) int32, index into `categories[j]`
    numerical_names: tuple[str, ...]
    categorical_names: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]  # per categorical column, its values in index order
    target: np.ndarray | None  # (N,) int32 class index; None for an unlabelled table
    target_name: str
    classes: tuple[str, ...]
    rows_read: int = 0  # data rows in the file, good and bad
    bad_rows: int = 0
    bad_examples: tuple[str, ...] = ()  # 'line 7: expected 9 fields, got 8', at most MAX_REPORTED

    @property
    def num_rows(self) -> int:
        return len(self.numerical)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categories)

    @property
    def num_features(self) -> int:
        return len(self.numerical_names) + len(self.categorical_names)

    def report(self) -> str:
        """One line: what was read and what was left out (with the first reasons)."""
        kinds = f'{len(self.numerical_names)} numerical + {len(self.categorical_names)} categorical features'
        target = (
            f"target '{self.target_name}' with {len(self.classes)} classes" if self.target is not None else 'no target'
        )
        text = f'table {self.name}: {self.num_rows} rows, {kinds}, {target}'
        if self.bad_rows:
            text += f'; left out {self.bad_rows} of {self.rows_read} rows ({"; ".join(self.bad_examples)}'
            text += ', ...)' if self.bad_rows > len(self.bad_examples) else ')'
        return text


class TableError(ValueError):
    """A table that cannot be used at all (missing file, unknown column, no usable row)."""


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _sorted_values(values: Sequence[str]) -> tuple[str, ...]:
    """Distinct values, in numeric order when all are numbers (so '2' < '10'), else in string order."""
    unique = set(values)
    if all(_is_number(v) for v in unique):
        return tuple(sorted(unique, key=float))
    return tuple(sorted(unique))


def _split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(',') if name.strip()]


def read_csv(
    path: str,
    target: str = '',
    categorical: str = 'auto',
    drop_columns: str = '',
    delimiter: str = '',
    name: str | None = None,
    target_transform: Callable[[str], str] | None = None,
) -> Table:
    """Reads a CSV table with a header row.

    target: the class column ('' for an unlabelled table); its values become class indices in sorted order.
    categorical: 'auto' (a column is categorical when most of its values are not numbers), or comma-separated column
      names ('' for none); every other column is numerical.
    drop_columns: comma-separated columns to ignore (ids, leaks).
    delimiter: '' sniffs it among , ; tab |.
    target_transform: maps a raw target value to its class name (built-in tables binarise a count this way).
    Rows with the wrong number of fields, a missing value (empty, NA, NaN, null, ?) or a non-number in a numerical
    column are left out and counted; the first few are named in `Table.bad_examples`.
    """
    if not os.path.isfile(path):
        raise TableError(f"table file '{path}' not found")
    with open(path, newline='') as f:
        sample = f.read(65536)
        f.seek(0)
        if delimiter:
            dialect: Any = csv.excel
            reader = csv.reader(f, dialect, delimiter=delimiter)
        else:
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=',;\t|')
            except csv.Error:
                dialect = csv.excel
            reader = csv.reader(f, dialect)
        lines = [(reader.line_num, row) for row in reader]
    if not lines:
        raise TableError(f"table file '{path}' is empty")
    header = [column.strip() for column in lines[0][1]]
    body = [(number, [v.strip() for v in row]) for number, row in lines[1:] if any(v.strip() for v in row)]
    dropped = set(_split_names(drop_columns))
    unknown = sorted((dropped | ({target} if target else set())) - set(header))
    if unknown:
        raise TableError(f'{path} has no column(s) {", ".join(unknown)}; columns: {", ".join(header)}')
    features = [c for c in header if c not in dropped and c != target]
    if not features:
        raise TableError(f'{path}: no feature columns left')
    column = {c: i for i, c in enumerate(header)}

    bad: list[tuple[int, str]] = []  # (line, reason)
    well_formed = []
    for number, row in body:
        if len(row) != len(header):
            bad.append((number, f'expected {len(header)} fields, got {len(row)}'))
            continue
        missing = [c for c in (*features, *([target] if target else [])) if row[column[c]].lower() in MISSING]
        if missing:
            bad.append((number, f'missing {missing[0]}'))
            continue
        well_formed.append((number, row))

    if categorical == 'auto':
        cat_names = [
            c for c in features if sum(_is_number(row[column[c]]) for _, row in well_formed) * 2 < len(well_formed)
        ]
    else:
        cat_names = _split_names(categorical)
        unknown = sorted(set(cat_names) - set(features))
        if unknown:
            raise TableError(f'categorical column(s) {", ".join(unknown)} are not feature columns of {path}')
    num_names = [c for c in features if c not in cat_names]

    good = []
    for number, row in well_formed:
        text = next((c for c in num_names if not _is_number(row[column[c]])), None)
        if text is not None:
            bad.append((number, f'{text}={row[column[text]]!r} is not a number'))
            continue
        good.append(row)
    reasons = [f'line {number}: {reason}' for number, reason in sorted(bad)[:MAX_REPORTED]]
    if not good:
        detail = f' ({"; ".join(reasons)})' if bad else ''
        raise TableError(f'{path}: no usable rows among {len(body)}{detail}')

    numerical = np.array([[float(row[column[c]]) for c in num_names] for row in good], np.float64)
    numerical = numerical.reshape(len(good), len(num_names))
    categories = tuple(_sorted_values([row[column[c]] for row in good]) for c in cat_names)
    lookup = [{v: i for i, v in enumerate(values)} for values in categories]
    codes = [[lookup[j][row[column[c]]] for j, c in enumerate(cat_names)] for row in good]
    categorical_array = np.array(codes, np.int32).reshape(len(good), len(cat_names))
    labels, classes = None, ()
    if target:
        raw = [row[column[target]] for row in good]
        raw = [target_transform(v) for v in raw] if target_transform else raw
        classes = _sorted_values(raw)
        index = {v: i for i, v in enumerate(classes)}
        labels = np.array([index[v] for v in raw], np.int32)
    return Table(
        name=name or os.path.basename(path),
        numerical=numerical,
        categorical=categorical_array,
        numerical_names=tuple(num_names),
        categorical_names=tuple(cat_names),
        categories=categories,
        target=labels,
        target_name=target,
        classes=classes,
        rows_read=len(body),
        bad_rows=len(bad),
        bad_examples=tuple(reasons),
    )


def _statsmodels_csv(dataset: str, file: str) -> str:
    """Path of a CSV file inside the installed statsmodels package, found without importing statsmodels (slow)."""
    spec = importlib.util.find_spec('statsmodels')
    if spec is None or not spec.submodule_search_locations:
        raise TableError(f"built-in table '{dataset}' needs statsmodels: pip install 'jaxssl[tabular]'")
    return os.path.join(next(iter(spec.submodule_search_locations)), 'datasets', dataset, file)


def _load_fair() -> Table:
    # Fair (1978): rating of the marriage, religiousness and both occupations are coded categories; 'affairs' is
    # time spent in affairs, binarised to any / none as the usual classification task on this table (32% positive).
    path = _statsmodels_csv('fair', 'fair.csv')
    return read_csv(
        path,
        target='affairs',
        categorical='rate_marriage,religious,occupation,occupation_husb',
        name='fair',
        target_transform=lambda v: 'any' if float(v) > 0 else 'none',
    )


def _load_anes96() -> Table:
    # 1996 American National Election Study: party identification and education level are coded categories;
    # the 7-point left-right placements are ordinal and stay numerical. Target: Dole (1) or Clinton (0).
    path = _statsmodels_csv('anes96', 'anes96.csv')
    return read_csv(path, target='vote', categorical='PID,educ', name='anes96')


def _sklearn_table(name: str, loader_name: str) -> Table:
    from sklearn import datasets

    bunch = getattr(datasets, loader_name)()
    x = np.asarray(bunch.data, np.float64)
    return Table(
        name=name,
        numerical=x,
        categorical=np.zeros((len(x), 0), np.int32),
        numerical_names=tuple(str(n) for n in bunch.feature_names),
        categorical_names=(),
        categories=(),
        target=np.asarray(bunch.target, np.int32),
        target_name='target',
        classes=tuple(str(n) for n in bunch.target_names),
        rows_read=len(x),
    )


BUILTIN: dict[str, Callable[[], Table]] = {
    'fair': _load_fair,
    'anes96': _load_anes96,
    'breast_cancer': lambda: _sklearn_table('breast_cancer', 'load_breast_cancer'),
    'wine': lambda: _sklearn_table('wine', 'load_wine'),
}


def load_table(input_config: ml_collections.ConfigDict) -> Table:
    """The table `input.table` names: a built-in name or a CSV path (with input.target, categorical, ...)."""
    c = input_config
    if c.table in BUILTIN:
        return BUILTIN[c.table]()
    return read_csv(
        os.path.expanduser(c.table),
        target=c.target,
        categorical=c.categorical,
        drop_columns=c.drop_columns,
        delimiter=c.delimiter,
    )


def split_rows(num_rows: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Disjoint sorted row indices {'train', 'val', 'test'} covering all rows, from one permutation of `seed`."""
    order = np.random.default_rng(seed).permutation(num_rows)
    num_test, num_val = round(num_rows * test_fraction), round(num_rows * val_fraction)
    return {
        'test': np.sort(order[:num_test]),
        'val': np.sort(order[num_test : num_test + num_val]),
        'train': np.sort(order[num_test + num_val :]),
    }


def fit_minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, range) per column for (x - low) / range, as scikit-learn's MinMaxScaler: a constant column has range 1."""
    low, high = x.min(axis=0), x.max(axis=0)
    span = high - low
    return low, np.where(span > 0, span, 1.0)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A table ready for the model: model rows, splits, and what the tokenizer needs to know."""

    table: Table
    rows: np.ndarray  # (N, Dn + Dc) float32: scaled numerical, then category indices
    labels: np.ndarray  # (N,) int32 (zeros for an unlabelled table)
    splits: dict[str, np.ndarray]
    pretrain_rows: np.ndarray  # indices the model pretrains on

    @property
    def num_numerical(self) -> int:
        return len(self.table.numerical_names)


def prepare(table: Table, input_config: ml_collections.ConfigDict) -> Prepared:
    """Splits the rows and MinMax-scales the numerical features, fitted on the pretraining rows only.

    input.pretrain_rows 'train' pretrains (and fits the scaler) on the train split; 'all' on every row, as the
    T-JEPA reference does (its downstream test rows are then seen, unlabelled, during pretraining).
    """
    c = input_config
    splits = split_rows(table.num_rows, c.val_fraction, c.test_fraction, c.split_seed)
    pretrain = splits['train'] if c.pretrain_rows == 'train' else np.arange(table.num_rows)
    if len(pretrain) == 0:
        raise TableError(f'table {table.name} has no rows to pretrain on ({table.num_rows} rows in all)')
    numerical = table.numerical
    if numerical.shape[1]:
        low, span = fit_minmax(numerical[pretrain])
        numerical = (numerical - low) / span
    rows = np.concatenate([numerical, table.categorical.astype(np.float64)], axis=1).astype(np.float32)
    labels = table.target if table.target is not None else np.zeros(table.num_rows, np.int32)
    return Prepared(table, rows, labels, splits, pretrain)


class RowSource:
    """Grain random-access source over some rows of a prepared table: index -> {'row', 'label', 'index'}."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        self.rows, self.labels, self.indices = rows, labels, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        index = int(self.indices[position])
        return {'row': self.rows[index], 'label': np.int32(self.labels[index]), 'index': np.int32(index)}


def make_pretrain_dataset(
    source: RowSource,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    batch_transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None,
) -> grain.IterDataset:
    """Host-local batches of shuffled rows, repeated forever: {'row' (B_local, D), 'label', 'index', ...}.

    Every process builds the same global batch (the table is small and in memory) and keeps its slice of it, so the
    stream of global batches does not depend on the number of processes. `batch_transform(batch, rng)` runs on the
    whole global batch (T-JEPA draws its mask sizes once per batch there, as the reference's collator does).
    """
    if global_batch % process_count:
        raise ValueError(f'global batch {global_batch} is not divisible by {process_count} processes')
    if len(source) < global_batch:
        raise ValueError(f'{len(source)} rows are fewer than one global batch of {global_batch}')
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence([seed, 7]).generate_state(2))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat().batch(global_batch, drop_remainder=True)
    if batch_transform is not None:
        ds = ds.random_map(batch_transform, seed=map_seed)
    local = global_batch // process_count
    lo, hi = process_index * local, (process_index + 1) * local
    return ds.map(lambda batch: {k: v[lo:hi] for k, v in batch.items()}).to_iter_dataset()


def make_eval_dataset(
    source: RowSource, batch_size: int, max_rows: int = 0, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """One pass over the rows of `source` for evaluation: {'row' (B, 1, D) (one view), 'label', 'index', 'valid'}.

    `max_rows` > 0 takes that many evenly spaced rows. Each process reads every process_count-th row; the last batches
    are padded with `valid` 0 rows so that every process yields the same number of batches.
    """
    positions = np.arange(len(source))
    if 0 < max_rows < len(positions):
        positions = positions[np.linspace(0, len(positions) - 1, max_rows).astype(int)]
    mine = positions[process_index::process_count]
    per_process = math.ceil(len(positions) / process_count)
    total = math.ceil(per_process / batch_size) * batch_size

    def padded(i: int) -> dict[str, np.ndarray]:
        item = source[int(mine[min(i, len(mine) - 1)])] if len(mine) else source[0]
        valid = np.int32(i < len(mine))
        return {'row': item['row'][None], 'label': item['label'] * valid, 'index': item['index'], 'valid': valid}

    return grain.MapDataset.range(total).map(padded).batch(batch_size, drop_remainder=True).to_iter_dataset()


def add_input_config(config: ml_collections.ConfigDict, table: str = 'fair', global_batch: int = 512) -> None:
    """The `input` section of a tabular config."""
    c = config.input = ml_collections.ConfigDict()
    c.table = table  # a built-in table (fair, anes96, breast_cancer, wine) or a path to a CSV file
    c.target = ''  # CSV: the class column ('' = unlabelled: pretraining only, no probes); built-ins fix their own
    c.categorical = 'auto'  # CSV: 'auto' (mostly non-numeric columns), or comma-separated names ('' = none)
    c.drop_columns = ''  # CSV: comma-separated columns to ignore (ids, leaks)
    c.delimiter = ''  # CSV: '' sniffs , ; tab |
    c.val_fraction = 0.1
    c.test_fraction = 0.1
    c.split_seed = 0  # the train / val / test split; fixed apart from `seed` so runs with other seeds compare
    c.pretrain_rows = 'train'  # 'train', or 'all' rows as the reference (test rows seen unlabelled)
    c.global_batch = global_batch


def check_input_config(config: ml_collections.ConfigDict) -> None:
    """Checks the `input` fields that need no data (the table itself is read when the method starts)."""
    from jaxssl.config import ConfigError, check_choice, check_range

    c = config.input
    check_choice(config, 'input.pretrain_rows', ('train', 'all'))
    check_range(config, 'input.val_fraction', 0.0, 1.0)
    check_range(config, 'input.test_fraction', 0.0, 1.0)
    if c.val_fraction + c.test_fraction >= 1.0:
        raise ConfigError("'input.val_fraction' + 'input.test_fraction' must leave rows for training (sum < 1)")
    if c.table in BUILTIN:
        for key in ('target', 'drop_columns', 'delimiter'):
            if c[key]:
                raise ConfigError(f"'input.{key}' is for CSV tables; built-in table '{c.table}' fixes its columns")
        if c.categorical != 'auto':
            raise ConfigError(f"'input.categorical' is for CSV tables; built-in table '{c.table}' fixes its columns")
    elif not c.table.lower().endswith(('.csv', '.tsv', '.txt')):
        names = ', '.join(BUILTIN)
        raise ConfigError(f"bad value '{c.table}' for 'input.table': a built-in table ({names}) or a .csv/.tsv path")
    if c.global_batch < 1:
        raise ConfigError(f"bad value {c.global_batch} for 'input.global_batch': must be >= 1")
