"""benchmarks/pretrain_probe.py's comparison table: pretrained vs random init, and vs the raw features that T-JEPA's
evaluation probes beside its representations (no pretraining here: the table of given results)."""

import importlib.util
import os

REPO = os.path.join(os.path.dirname(__file__), '..')


def load_script():
    spec = importlib.util.spec_from_file_location(
        'pretrain_probe', os.path.join(REPO, 'benchmarks', 'pretrain_probe.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_key_and_table_known_answer():
    script = load_script()
    assert script.raw_key('label/flatten/linear') == 'label/raw/linear'
    assert script.raw_key('label/raw/knn') is None and script.raw_key('accuracy') is None
    runs = [
        dict(
            random_init={'y/flatten/knn': 0.60, 'y/raw/knn': 0.70},
            pretrained={'y/flatten/knn': 0.80, 'y/raw/knn': 0.70},
        ),
        dict(
            random_init={'y/flatten/knn': 0.64, 'y/raw/knn': 0.70},
            pretrained={'y/flatten/knn': 0.76, 'y/raw/knn': 0.70},
        ),
    ]
    lines = script.table(runs).splitlines()
    assert lines[0].split() == ['probe', 'random', 'init', 'pretrained', 'gain', 'vs', 'raw']
    # Means and standard deviations over the two seeds: random 0.62±0.02, pretrained 0.78±0.02, gain 0.16±0.04,
    # pretrained - raw 0.08±0.02; the raw row itself has no 'vs raw' cell.
    assert lines[1].split() == ['y/flatten/knn', '0.620±0.020', '0.780±0.020', '0.160±0.040', '0.080±0.020']
    assert lines[2].split() == ['y/raw/knn', '0.700±0.000', '0.700±0.000', '0.000±0.000']
    single = script.table(runs[:1]).splitlines()
    assert single[1].split() == ['y/flatten/knn', '0.600', '0.800', '0.200', '0.100']
