"""VideoMAE V2 pretraining beats its random init on built-in data: on the zoomed, blurred moving digits
(input.moving_digits_scale=2, input.moving_digits_blur=8), where a hidden tube's normalised pixels are predictable,
a short runlocal pretraining (micro/8, the paper's tube ratio 0.9, 300 steps) makes the frozen features' kNN read
the motion direction better than the same encoder at its random initialisation.
Measured gains and the benchmark command:
docs/methods.md, VideoMAE V2, "Evaluation of the pretrained encoder and the evidence so far"."""

import importlib.util
import os

import pytest

REPO = os.path.join(os.path.dirname(__file__), '..')


def load_script():
    spec = importlib.util.spec_from_file_location(
        'pretrain_probe', os.path.join(REPO, 'benchmarks', 'pretrain_probe.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretraining_beats_random_init_on_motion(tmp_path):
    overrides = [
        f'input.cache_dir={tmp_path / "cache"}',
        'input.moving_digits_scale=2.0',
        'input.moving_digits_blur=8.0',
        "eval.probes=('knn',)",
        "eval.label_keys=('direction',)",
    ]
    run = load_script().compare('configs/videomae_v2.py:runlocal', 300, 0, str(tmp_path / 'run'), overrides)
    trivial = run['trivial_losses']
    # The data has structure a model can use (the visible neighbours' average beats the mean target), and the
    # pretraining used it: its loss ends far below both (measured here: mean 0.987, neighbours 0.891, final 0.632).
    assert trivial['neighbours'] < trivial['mean'] - 0.05
    assert run['final_loss'] < trivial['neighbours'] - 0.1
    # Direction kNN on mean-pooled features, 500 val clips: measured random init 0.716, pretrained 0.822 with these
    # 300 steps (0.718 / 0.902 and 0.722 / 0.918 with 450, docs/methods.md). The threshold is half the measured gain.
    random_init, pretrained = run['random_init'], run['pretrained']
    gain = pretrained['direction/mean_pool/knn'] - random_init['direction/mean_pool/knn']
    assert gain > 0.05, (random_init, pretrained)
