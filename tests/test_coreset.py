"""SimCore: the greedy rounds by hand and against a transcription of the reference's greedy, the stopping rule and
budget, the selection on separable blobs, and the command line from a trained run to a pretraining source."""

import json
import os
from collections import deque

import numpy as np
import pytest

from jaxssl import coreset, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import images as image_data
from jaxssl.methods import simclr


def reference_greedy(sim, sampling_nums, stop, patience, stop_thresh):
    """util/sampling.py greedy (sungnyun/openssl-simcore@97b4c9e) with `args` as parameters: sim (N, K)."""
    k = sim.shape[1]
    queue_list = [deque(np.argsort(-sim[:, c], kind='stable')) for c in range(k)]
    indices, tmp = set(), set()
    flag, threshold = 1, 0
    while len(indices) < sampling_nums:
        func_value = 0
        for q, queue in enumerate(queue_list):
            while True:
                i = queue.popleft()
                if i not in indices:
                    break
            tmp.update({i})
            if stop:
                func_value += sim[i, q] / k
        if flag == patience:
            threshold = func_value * stop_thresh
        flag += 1
        if stop and func_value < threshold:
            break
        if len(indices) + len(tmp) > sampling_nums:
            return None  # a random part of the round: compared by size only
        indices.update(tmp)
        tmp = set()
    return sorted(int(i) for i in indices)


def test_rounds_by_hand():
    """Two centroids over five samples. Round 1: both take sample 0 (a set: one sample). Round 2: centroid 0 takes
    1, centroid 1 skips the taken 0 and takes 4. Round 3 (patience 2 set the threshold 0.9 x round 2's 0.75): both
    reach 2 and 3 with utility (0.2 + 0.3) / 2 = 0.25 < 0.675, so the round is dropped."""
    sim = np.array([[1.0, 0.9, 0.2, 0.1, 0.0], [0.9, 0.0, 0.1, 0.3, 0.6]])
    selected, info = coreset.greedy_rounds(sim, budget=5, stop=True, patience=2, stop_thresh=0.9)
    assert selected.tolist() == [0, 1, 4] and info['rounds'] == 2 and info['reason'] == 'stopped'
    np.testing.assert_allclose(info['utilities'], [0.95, 0.75, 0.25])
    # Without the rule the budget ends it: round 3 would add 2 and 3 (or 3 and 2) to a budget of 4, so one of them.
    selected, info = coreset.greedy_rounds(sim, budget=4, stop=False)
    assert len(selected) == 4 and {0, 1, 4} <= set(selected.tolist()) and info['reason'] == 'budget'
    selected, info = coreset.greedy_rounds(sim, budget=10, stop=False)
    assert selected.tolist() == [0, 1, 2, 3, 4] and info['reason'] == 'exhausted'  # every open-set sample taken


@pytest.mark.parametrize('seed', range(6))
def test_rounds_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    sim = rng.uniform(-1, 1, size=(7, 300)) + rng.uniform(0, 1, size=(1, 300))
    for budget, stop, patience in ((300, True, 5), (300, True, 20), (42, False, 20), (63, False, 20)):
        want = reference_greedy(sim.T, budget, stop, patience, 0.95)
        got, info = coreset.greedy_rounds(sim, budget, stop, patience, 0.95)
        if want is None:
            assert len(got) == budget and info['reason'] == 'budget'
        else:
            assert got.tolist() == want


def test_selection_finds_the_target_like_open_set():
    """Target: 2 Gaussian clusters. Open set: 20 clusters, 2 of them at the target's centres. The coreset comes from
    those 2, and the stopping rule fires long before the 50 |X| budget."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16)) * 3
    target = np.concatenate([centres[i] + rng.normal(size=(40, 16)) * 0.3 for i in (0, 1)])
    pool = np.concatenate([centres[i] + rng.normal(size=(100, 16)) * 0.3 for i in range(20)])
    like = np.arange(len(pool)) < 200  # clusters 0 and 1
    selected, info = coreset.simcore_select(target, pool, clusters=10, patience=5)
    assert info['reason'] == 'stopped' and info['budget'] == 4000 and 20 <= len(selected) <= 200
    assert like[selected].mean() > 0.95
    # With K >= |X| every target feature is a centroid.
    np.testing.assert_allclose(coreset.target_centroids(target[:5], 8), coreset.normalize(target[:5]))
    with pytest.raises(ValueError, match='same D'):
        coreset.simcore_select(target, pool[:, :3])


@pytest.fixture(scope='module')
def digit_folders(tmp_path_factory):
    """The built-in digits written as an open set of class folders (PNG), 60 per class."""
    from PIL import Image

    root = tmp_path_factory.mktemp('open')
    source = image_data.DigitsSource('train')
    counts = {}
    for i in range(len(source)):
        record = source[i]
        label = record['label']
        if counts.get(label, 0) >= 60:
            continue
        counts[label] = counts.get(label, 0) + 1
        os.makedirs(root / 'train' / f'digit_{label}', exist_ok=True)
        Image.fromarray(record['image']).save(root / 'train' / f'digit_{label}' / f'{i:05d}.png')
    return root


@pytest.mark.slow
def test_command_line_selects_and_pretraining_reads_the_coreset(tmp_path, digit_folders):
    """A SimCLR run on the digits 0 and 1 selects from all ten digits; the selection names the files, and a run
    with input.coreset trains on the target images followed by the selected ones."""
    overrides = ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.at_end=false',
                 'input.classes=(0, 1)']  # fmt: skip
    config = load_config('configs/simclr.py:runlocal', overrides)
    train.train(config, str(tmp_path / 'run'))
    out = tmp_path / 'coreset.json'
    args = [f'--workdir={tmp_path / "run"}', f'--open_root={digit_folders}', f'--out={out}', '--clusters=8']
    assert coreset.main([*args, '--patience=3']) == 0
    selection = json.loads(out.read_text())
    assert selection['indices'] == sorted(selection['indices']) and len(selection['indices']) >= 8
    assert all(name.endswith('.png') for name in selection['names'])
    target = len(image_data.make_image_source(config))
    assert selection['info']['target_images'] == target and selection['info']['open_images'] == 600
    config = load_config('configs/simclr.py:runlocal', [*overrides, f'input.coreset={out}'])
    source = image_data.make_image_source(config)
    assert len(source) == target + len(selection['indices']) and source.label_keys == ()
    assert source[target]['name'] == selection['names'][0]
    batch = next(iter(simclr.Method(config).dataset(0, 0, 1)[0]))  # the pretraining pipeline reads both parts
    assert len(batch['image']) == 2 * config.input.global_batch  # SimCLR's two views per image
    with pytest.raises(ConfigError, match=r'input\.coreset'):
        image_data.check_image_input_config(load_config('configs/simclr.py:runlocal', ['input.coreset=/none.json']))
    (digit_folders / 'train' / 'digit_0' / '0.png').write_bytes(b'')  # sorts first: the open set changed since
    with pytest.raises(ValueError, match='changed'):
        image_data.make_image_source(config)
    os.remove(digit_folders / 'train' / 'digit_0' / '0.png')
