"""Workdirs on object storage: `gs://` paths go through etils.epath (jaxssl.paths). No network: an in-memory fsspec
filesystem is registered for the gs:// protocol, so epath's fsspec backend (what gcsfs plugs into) writes to memory."""

import json
import os
import sys

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from jaxssl import checkpoint, metrics, paths


class FakeGCS(MemoryFileSystem):
    """gcsfs stand-in: same protocol names, in memory, accepts gcsfs's constructor argument."""

    protocol = ('gs', 'gcs')
    store = {}  # noqa: RUF012 (fsspec's class-level storage)
    pseudo_dirs = ['']  # noqa: RUF012

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    registry = sys.modules['fsspec.registry']._registry  # `fsspec.registry` is a read-only view
    saved = {name: registry.get(name) for name in ('gs', 'gcs')}
    for name in ('gs', 'gcs'):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # never the tf.io.gfile backend (real GCS)
    monkeypatch.setattr(metrics, '_importable', lambda module: False)  # never tensorboardX's real GCS writer
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # where TensorBoard events fall back to
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = ['']
    yield FakeGCS.store
    FakeGCS.store.clear()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    for name, cls in saved.items():
        if cls is None:
            registry.pop(name, None)
        else:
            registry[name] = cls


def test_paths_keep_remote_urls_and_make_local_ones_absolute(tmp_path, monkeypatch):
    assert paths.is_remote('gs://bucket/run') and not paths.is_remote('runs/x')
    assert paths.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
    monkeypatch.chdir(tmp_path)
    assert paths.join('runs/x', 'checkpoints') == str(tmp_path / 'runs' / 'x' / 'checkpoints')
    with pytest.raises(ValueError, match="unsupported path scheme 'ftp://'"):
        paths.join('ftp://host/run')


def test_checkpointer_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint.Checkpointer('runs/x', keep=1, async_save=False)
    assert ckpt.directory == str(tmp_path / 'runs' / 'x' / 'checkpoints')  # a str: summary.json stores it
    assert ckpt.latest_step() is None
    ckpt.close()


def test_local_write_text_is_atomic(tmp_path):
    target = tmp_path / 'new' / 'dir' / 'summary.json'
    paths.write_text(str(target), '{"a": 1}')
    paths.write_text(str(target), '{"a": 2}')
    assert json.loads(target.read_text()) == {'a': 2}
    assert os.listdir(target.parent) == ['summary.json']  # no temporary file left


def test_remote_metric_writer_rewrites_the_object_and_resumes(fake_gcs, capsys):
    workdir = 'gs://bucket/run'
    writer = metrics.MetricWriter(workdir, tensorboard=True, sync_seconds=3600)
    assert 'TensorBoard events for gs://bucket/run are written locally' in capsys.readouterr().out
    writer.write(1, {'loss': 1.0})  # the first row is uploaded at once
    rows = lambda: [json.loads(line) for line in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows()] == [1]
    writer.write(2, {'loss': 0.5})  # within sync_seconds: kept until the next sync
    assert [r['step'] for r in rows()] == [1]
    writer.close()
    assert [r['step'] for r in rows()] == [1, 2]
    local_events = os.path.expanduser('~/.cache/jaxssl/tensorboard/gs/bucket/run/tensorboard')
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(local_events))

    resumed = metrics.MetricWriter(workdir, tensorboard=False, sync_seconds=0)
    resumed.write(3, {'loss': 0.25})
    resumed.close()
    assert [(r['step'], r['loss']) for r in rows()] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_training_into_a_gs_workdir(fake_gcs, tmp_path, monkeypatch):
    """config.json, metrics.jsonl and summary.json land in the bucket. Orbax's arrays go through TensorStore's own
    GCS driver (not fsspec), so the checkpoints are redirected to a local folder here."""
    import ema_toy_method

    from jaxssl import train

    local = tmp_path / 'ckpt'

    class LocalCheckpointer(checkpoint.Checkpointer):
        def __init__(self, workdir, keep, async_save=True):
            assert workdir == 'gs://bucket/run'
            super().__init__(str(local), keep, async_save)

    monkeypatch.setattr(checkpoint, 'Checkpointer', LocalCheckpointer)
    config = ema_toy_method.get_config()
    config.train.steps = 2
    config.train.tensorboard = False
    config.mesh.data = 1  # one device compiles faster
    summary, _ = train.train(config, 'gs://bucket/run')
    run = epath.Path('gs://bucket/run')
    assert json.loads((run / 'config.json').read_text())['method'] == 'ema_toy_method'
    assert json.loads((run / 'summary.json').read_text())['final_step'] == summary['final_step'] == 2
    assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
    assert not os.path.exists('gs:') and not os.path.exists(os.path.join('runs', 'gs:'))  # nothing local by mistake
