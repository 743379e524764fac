"""Tabular data for T-JEPA: the CSV reader (bad rows counted, not fatal), built-in tables, splits, MinMax scaling,
and the Grain pipelines (process slicing, one padded evaluation pass)."""

import itertools
import re

import ml_collections
import numpy as np
import pytest

from jaxssl.config import ConfigError
from jaxssl.data import tabular

CSV = """id,age,colour,income,label
1,30,red,1000.5,yes
2,40,blue,2000,no
3,50,red,,yes
4,60,green,4000,no,extra
5,70,blue,5000,no
6,abc,red,6000,yes
7,20,green,3000,yes

8,25,red,1500,NA
"""


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / 'people.csv'
    path.write_text(CSV)
    return str(path)


def input_config(**overrides):
    config = ml_collections.ConfigDict()
    tabular.add_input_config(config)
    for key, value in overrides.items():
        config.input[key] = value
    return config


def test_read_csv_counts_and_reports_bad_rows(csv_path):
    table = tabular.read_csv(csv_path, target='label', drop_columns='id')
    # Lines 4 (empty income), 5 (6 fields), 7 ('abc' age) and 10 (NA label) are left out; the blank line is no row.
    assert (table.rows_read, table.bad_rows, table.num_rows) == (8, 4, 4)
    assert table.bad_examples == (
        'line 4: missing income',
        'line 5: expected 5 fields, got 6',
        "line 7: age='abc' is not a number",
        'line 10: missing label',
    )
    assert table.numerical_names == ('age', 'income') and table.categorical_names == ('colour',)
    np.testing.assert_allclose(table.numerical, [[30, 1000.5], [40, 2000], [70, 5000], [20, 3000]])
    assert table.categories == (('blue', 'green', 'red'),)
    np.testing.assert_array_equal(table.categorical[:, 0], [2, 0, 0, 1])
    assert table.classes == ('no', 'yes')
    np.testing.assert_array_equal(table.target, [1, 0, 0, 1])
    report = table.report()
    assert 'left out 4 of 8 rows' in report and 'line 4: missing income' in report


def test_read_csv_explicit_columns_and_errors(csv_path, tmp_path):
    table = tabular.read_csv(csv_path, target='', categorical='colour,age', drop_columns='id,label')
    assert table.categorical_names == ('colour', 'age') and table.target is None
    # Categories in numeric order when all values are numbers, else in string order.
    assert table.categories[1] == ('20', '25', '30', '40', '70', 'abc')
    assert tabular._sorted_values(['10', '9', '2.5']) == ('2.5', '9', '10')
    with pytest.raises(tabular.TableError, match='no column'):
        tabular.read_csv(csv_path, target='salary')
    with pytest.raises(tabular.TableError, match='not found'):
        tabular.read_csv(str(tmp_path / 'missing.csv'))
    bad = tmp_path / 'bad.csv'
    bad.write_text('a;b\nx;y\n')
    with pytest.raises(tabular.TableError, match='no usable rows'):
        tabular.read_csv(str(bad), target='b', categorical='')


def test_builtin_fair_table():
    table = tabular.BUILTIN['fair']()
    assert table.num_rows == 6366 and table.bad_rows == 0
    assert table.numerical_names == ('age', 'yrs_married', 'children', 'educ')
    assert table.cardinalities == (5, 4, 6, 6)
    assert table.classes == ('any', 'none') and 0.3 < np.mean(table.target == 0) < 0.35


def test_splits_and_minmax_scaling():
    table = tabular.BUILTIN['fair']()
    data = tabular.prepare(table, input_config().input)
    splits = data.splits
    assert sum(len(s) for s in splits.values()) == table.num_rows
    assert len(np.intersect1d(splits['train'], splits['test'])) == 0
    assert len(np.intersect1d(splits['val'], splits['test'])) == 0
    assert len(splits['test']) == len(splits['val']) == 637
    again = tabular.split_rows(table.num_rows, 0.1, 0.1, 0)
    other = tabular.split_rows(table.num_rows, 0.1, 0.1, 1)
    assert np.array_equal(again['test'], splits['test']) and not np.array_equal(other['test'], splits['test'])
    # MinMax fitted on the train rows: exactly [0, 1] there; category indices pass through unchanged.
    train_num = data.rows[splits['train'], :4]
    np.testing.assert_allclose(train_num.min(0), 0)
    np.testing.assert_allclose(train_num.max(0), 1)
    np.testing.assert_array_equal(data.rows[:, 4:], table.categorical)
    low, span = tabular.fit_minmax(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(low, [1, 5])
    np.testing.assert_allclose(span, [2, 1])  # a constant column gets range 1
    everything = tabular.prepare(table, input_config(pretrain_rows='all').input)
    assert len(everything.pretrain_rows) == table.num_rows


def test_pretrain_batches_are_sliced_per_process():
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    source = tabular.RowSource(rows, np.zeros(20, np.int32), np.arange(20))
    add = lambda batch, rng: {**batch, 'noise': rng.random(len(batch['row']))}
    whole = tabular.make_pretrain_dataset(source, 8, seed=3, batch_transform=add)
    parts = [tabular.make_pretrain_dataset(source, 8, 3, p, 2, batch_transform=add) for p in range(2)]
    epoch = []
    for full, *halves in itertools.islice(zip(whole, *parts, strict=True), 5):
        for key in ('row', 'noise'):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
        assert halves[0]['row'].shape == (4, 2)
        epoch += list(full['index'])
    assert len(set(epoch[:16])) == 16  # batches of one epoch hold distinct rows


def test_eval_pass_sees_every_row_once_with_padding():
    rows = np.arange(22, dtype=np.float32).reshape(11, 2)
    source = tabular.RowSource(rows, np.arange(11, dtype=np.int32), np.arange(11))
    seen, counts = [], []
    for process in range(3):
        batches = list(tabular.make_eval_dataset(source, 2, process_index=process, process_count=3))
        counts.append(len(batches))
        for batch in batches:
            assert batch['row'].shape == (2, 1, 2)
            seen += [int(i) for i, v in zip(batch['index'], batch['valid'], strict=True) if v]
    assert sorted(seen) == list(range(11)) and counts == [2, 2, 2]


@pytest.mark.parametrize(
    ('overrides', 'key'),
    [
        (dict(pretrain_rows='some'), "'input.pretrain_rows'"),
        (dict(table='fair', target='affairs'), "'input.target'"),
        (dict(table='adult'), "'input.table'"),
        (dict(val_fraction=0.5, test_fraction=0.5), "'input.val_fraction'"),
    ],
)
def test_input_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        tabular.check_input_config(input_config(**overrides))
