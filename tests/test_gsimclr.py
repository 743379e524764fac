"""G-SimCLR: k-means known answers, the distinct-pseudo-label batches (a property over random label sets, and in
the real pipeline), the autoencoder's loss, and the two stages through the trainer: a 2-step autoencoder run, its
pseudo labels by the CLI, and a 2-step G-SimCLR run on one device and sharded over 8 fake CPU devices with equal
losses and parameters."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import kmeans, pseudo_labels, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import distinct_batches
from jaxssl.data.transforms import normalize
from jaxssl.methods import gsimclr, gsimclr_dae
from jaxssl.models import dae

DAE = 'configs/gsimclr_dae.py:runlocal'
GSIMCLR = 'configs/gsimclr.py:runlocal'
QUIET = ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.at_end=false']


def test_kmeans_recovers_separable_blobs():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    truth = np.repeat(np.arange(4), [30, 50, 20, 40])
    x = means[truth] + rng.normal(scale=0.5, size=(len(truth), 3))
    labels, centres, inertia = kmeans.kmeans(x, 4, seed=1)
    # The same partition up to renaming: each true blob maps to one label and no two blobs share one.
    mapping = {t: set(labels[truth == t]) for t in range(4)}
    assert all(len(v) == 1 for v in mapping.values()) and len(set.union(*mapping.values())) == 4
    for t in range(4):
        np.testing.assert_allclose(centres[labels[truth == t][0]], x[truth == t].mean(0), rtol=1e-10, atol=1e-10)
    want = sum(((x[truth == t] - x[truth == t].mean(0)) ** 2).sum() for t in range(4))
    np.testing.assert_allclose(inertia, want, rtol=1e-8)
    np.testing.assert_array_equal(kmeans.kmeans(x, 4, seed=1)[0], labels)  # deterministic per seed


def test_kmeans_in_chunks_equals_kmeans_at_once(monkeypatch):
    x = np.random.default_rng(0).normal(size=(300, 5))
    want = kmeans.kmeans(x, 7, seed=2)
    monkeypatch.setattr(kmeans, 'CHUNK_DISTANCES', 7 * 16)  # 16 rows at a time
    got = kmeans.kmeans(x, 7, seed=2)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-12)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match='k=5'):
        kmeans.kmeans(np.zeros((4, 2)), 5)


def most_batches(counts, batch):
    """The largest m with sum(min(c, m)) >= m * batch: at most m draws from each cluster, batch per batch."""
    return max(m for m in range(sum(counts) // batch + 1) if np.minimum(counts, m).sum() >= m * batch)


@pytest.mark.parametrize('seed', range(12))
def test_batches_never_hold_one_pseudo_label_twice(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 9))
    clusters = batch + int(rng.integers(0, 6))
    labels = rng.integers(0, clusters, size=int(rng.integers(clusters, 120)))
    if len(np.unique(labels)) < batch:
        with pytest.raises(ValueError, match='distinct'):
            distinct_batches.distinct_label_batches(labels, batch, rng)
        return
    batches = distinct_batches.distinct_label_batches(labels * 7 + 3, batch, rng)  # any integer labels
    assert batches.shape[1] == batch
    for b in batches:
        assert len(set(labels[b])) == batch
    assert len(set(batches.ravel())) == batches.size  # no example twice in an epoch
    # As many batches as any arrangement could make, the same count every epoch.
    assert len(batches) == most_batches(np.bincount(labels)[np.bincount(labels) > 0], batch)
    assert len(batches) == distinct_batches.num_batches(labels, batch)


def test_order_splits_each_global_batch_over_processes_and_epochs_differ():
    labels = np.arange(40) % 10
    hosts = [
        distinct_batches.distinct_label_order(labels, 8, seed=3, process_index=p, process_count=2) for p in range(2)
    ]
    (first, per_epoch), (second, _) = hosts
    assert per_epoch == 40  # 10 clusters of 4: 5 batches of 8 distinct ones use every example
    for b in range(10):  # two epochs of 5 global batches, each the two hosts' slices
        global_batch = [first[i] for i in range(4 * b, 4 * b + 4)] + [second[i] for i in range(4 * b, 4 * b + 4)]
        assert len(set(labels[global_batch])) == 8
    assert [first[i] for i in range(20)] != [first[i] for i in range(20, 40)]


def test_autoencoder_loss_and_input_range():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)
    unit = np.asarray(gsimclr_dae.to_unit_range(jnp.asarray(normalize(images))))
    np.testing.assert_allclose(unit, images / 255.0, atol=1e-5)
    reconstruction = np.random.default_rng(1).uniform(size=unit.shape).astype(np.float32)
    np.testing.assert_allclose(dae.dae_loss(reconstruction, unit), ((reconstruction - unit) ** 2).mean(), rtol=1e-6)
    model = dae.DenoisingAutoencoder(widths=(4, 8))
    variables = jax.jit(model.init)(jax.random.key(0), unit)
    out, inter = jax.jit(model.apply)(variables, unit)
    assert out.shape == unit.shape and inter['latent'].shape == (2, 8)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # the sigmoid output


@pytest.mark.parametrize(
    'spec, override, key',
    [
        (DAE, 'input.image_size=36', "'input.image_size'"),
        (DAE, 'model.widths=()', "'model.widths'"),
        (DAE, 'model.noise_std=-1.0', "'model.noise_std'"),
        (GSIMCLR, 'loss.temperature=0.0', "'loss.temperature'"),
    ],
)
def test_config_errors_name_the_key(spec, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(spec, [override])


def run(spec, workdir, *overrides):
    config = load_config(spec, [*QUIET, *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def stage_one(tmp_path_factory):
    """A 2-step autoencoder run and 16 pseudo labels of its latents, written by the CLI."""
    workdir = tmp_path_factory.mktemp('gsimclr') / 'dae'
    summary, _, rows = run(DAE, workdir, 'mesh.data=1', 'input.global_batch=16', 'model.widths=(4, 8)')
    out = str(workdir / 'labels.npy')
    assert pseudo_labels.main([f'--workdir={workdir}', '--clusters=16', f'--out={out}', '--batch_size=500']) == 0
    return summary, rows, np.load(out)


@pytest.fixture(scope='module')
def stage_two_one_device(stage_one, tmp_path_factory):
    labels = tmp_path_factory.getbasetemp() / 'labels.npy'
    np.save(labels, stage_one[2])
    workdir = tmp_path_factory.mktemp('gsimclr') / 'one'
    return str(labels), run(GSIMCLR, workdir, 'mesh.data=1', 'input.global_batch=16', f'input.pseudo_labels={labels}')


def test_stage_one_trains_and_labels_every_image(stage_one):
    summary, rows, labels = stage_one
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(0.0 < r['loss'] < 1.0 for r in rows)
    assert labels.shape == (4000,) and labels.dtype == np.int32 and set(labels) == set(range(16))


def test_pipeline_batches_hold_distinct_pseudo_labels(stage_two_one_device):
    path, _ = stage_two_one_device
    labels = np.load(path)
    config = load_config(GSIMCLR, ['input.global_batch=16', f'input.pseudo_labels={path}'])
    method = gsimclr.Method(config)
    dataset, per_epoch = method.dataset(seed=0, process_index=0, process_count=1)
    assert per_epoch % 16 == 0 and 0 < per_epoch <= 4000
    batch = next(iter(dataset))
    assert batch['image'].shape == (32, 32, 32, 3)
    # The source's true digit labels travel with the views; the pseudo labels of the batch's images are distinct:
    # recover each image's source index from its (distinct) digit label is impossible, so check the order directly.
    order, _ = distinct_batches.distinct_label_order(labels, 16, seed=0)
    assert len(set(labels[[order[i] for i in range(16)]])) == 16
    np.testing.assert_array_equal(batch['label'][0::2], batch['label'][1::2])


def test_missing_pseudo_labels_name_the_key(tmp_path):
    config = load_config(GSIMCLR, [*QUIET, 'input.global_batch=16'])
    with pytest.raises(ConfigError, match=re.escape('input.pseudo_labels')):
        train.train(config, str(tmp_path))
    np.save(tmp_path / 'few.npy', np.arange(4000) % 8)
    config = load_config(GSIMCLR, [*QUIET, 'input.global_batch=16', f'input.pseudo_labels={tmp_path / "few.npy"}'])
    with pytest.raises(ConfigError, match=re.escape("'input.global_batch'")):
        train.train(config, str(tmp_path / 'run'))


def test_stage_two_sharded_matches_one_device(stage_two_one_device, tmp_path):
    path, (_, want_state, want_rows) = stage_two_one_device
    summary, state, rows = run(
        GSIMCLR, tmp_path, 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', 'input.global_batch=16',
        f'input.pseudo_labels={path}',
    )  # fmt: skip
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
