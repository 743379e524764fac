"""`python -m jaxssl.convert` end to end on tiny checkpoints, and jaxssl.params_io underneath it."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from jaxssl import params_io
from jaxssl.convert import __main__ as cli
from jaxssl.convert import videomae as convert
from jaxssl.models import videomae as model_lib

VIDEO = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)


def random_params(model, *inputs, seed=0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def same(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a, b))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A reference fine-tuning checkpoint (micro, 3 classes) as the reference's training script saves it, and a
    DeepSpeed-wrapped torch.compile'd pretraining checkpoint."""
    root = tmp_path_factory.mktemp('checkpoints')
    classifier = convert.to_torch_state_dict(random_params(model_lib.make_classifier('micro', 3), VIDEO))
    idx = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    pretrain = convert.to_torch_state_dict(random_params(model_lib.make_pretrain_model('micro'), VIDEO, idx, idx))
    as_torch = lambda state, prefix='': {
        prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()
    }
    args = argparse.Namespace(model='vit_micro', nb_classes=3)
    torch.save({'model': as_torch(classifier), 'epoch': 9, 'args': args}, root / 'finetuned.pth')
    torch.save({'module': as_torch(pretrain, '_orig_mod.')}, root / 'pretrained.pt')
    (root / 'broken.pth').write_bytes(b'\x80\x02not really a pickle')
    return dict(root=root, classifier=classifier, pretrain=pretrain)


def test_classifier_checkpoint_end_to_end(tmp_path, checkpoints, capsys):
    out, exported = tmp_path / 'params', tmp_path / 'again.safetensors'
    argv = [str(checkpoints['root'] / 'finetuned.pth'), str(out), '--frames', '2', '--image-size', '32']
    assert cli.main([*argv, '--export-safetensors', str(exported)]) == 0
    summary = capsys.readouterr().out
    for needle in (
        'classifier VideoMAE micro',
        '3 classes',
        "under 'model'",
        'Ignored non-weight entries: epoch, args',
    ):
        assert needle in summary
    assert summary.count('\n') == 1  # one paragraph
    model = model_lib.make_classifier('micro', 3)
    params, metadata = params_io.load_params(out)
    assert same(params, convert.from_torch_state_dict(checkpoints['classifier'], model))
    assert {k: metadata[k] for k in ('kind', 'variant', 'patch', 'tubelet', 'frames', 'image_size')} == dict(
        kind='classifier', variant='micro', patch=16, tubelet=2, frames=2, image_size=32
    )
    assert metadata['source'].endswith('finetuned.pth') and metadata['model']['num_classes'] == 3
    # The trainer's path: restore straight into the model's (here scanned) parameter structure.
    scanned = dataclasses.replace(model, scan_layers=True)
    restored, _ = params_io.load_params(out, jax.eval_shape(scanned.init, jax.random.key(0), VIDEO)['params'])
    logits, _ = scanned.apply({'params': restored}, np.ones((1, 2, 32, 32, 3), np.float32))
    want, _ = model.apply({'params': params}, np.ones((1, 2, 32, 32, 3), np.float32))
    np.testing.assert_allclose(logits, want, atol=1e-5)
    # Exported weights and the inverse command both give back the reference layout bit for bit.
    assert cli.main(['--to-torch', str(out), str(tmp_path / 'inverse.safetensors')]) == 0
    for path in (exported, tmp_path / 'inverse.safetensors'):
        back = safetensors.numpy.load_file(str(path))
        assert back.keys() == checkpoints['classifier'].keys()
        assert all(back[k].tobytes() == np.ascontiguousarray(v).tobytes() for k, v in checkpoints['classifier'].items())


def test_pretrain_and_encoder_kinds(tmp_path, checkpoints, capsys):
    source = str(checkpoints['root'] / 'pretrained.pt')
    assert cli.main([source, str(tmp_path / 'pretrain')]) == 0
    assert 'pretrain VideoMAE micro' in capsys.readouterr().out
    params, metadata = params_io.load_params(tmp_path / 'pretrain')
    assert metadata['model']['dec_width'] == 32 and 'decoder' in params
    assert cli.main([source, str(tmp_path / 'encoder'), '--kind', 'encoder', '--variant', 'micro']) == 0
    assert 'Skipped 19 checkpoint keys: decoder.* (17 keys), encoder_to_decoder.weight, mask_token' in (
        capsys.readouterr().out
    )
    params, metadata = params_io.load_params(tmp_path / 'encoder')
    assert metadata['kind'] == 'encoder' and set(params) == {'patch_embed', 'encoder'}


def test_errors_are_one_line(tmp_path, checkpoints, capsys):
    source = str(checkpoints['root'] / 'finetuned.pth')
    assert cli.main([source, str(tmp_path / 'out'), '--variant', 'L']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: variant 'L' does not fit the checkpoint") and err.count('\n') == 1
    assert not (tmp_path / 'out').exists()
    assert cli.main([source, str(tmp_path / 'out')]) == 0
    assert cli.main([source, str(tmp_path / 'out')]) == 2  # never overwrites
    assert 'already exists' in capsys.readouterr().err


def test_subprocess_exit_code_on_a_bad_file(tmp_path, checkpoints):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    command = [sys.executable, '-m', 'jaxssl.convert', str(checkpoints['root'] / 'broken.pth'), str(tmp_path / 'o')]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ''
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'not a readable PyTorch checkpoint' in lines[0]


def test_params_io_checks_the_target(tmp_path):
    model = model_lib.make_classifier('micro', 3)
    params = random_params(model, VIDEO)
    params_io.save_params(tmp_path / 'p', params, {'kind': 'classifier', 'variant': 'micro'})
    with open(tmp_path / 'p' / params_io.METADATA_FILE) as f:
        assert json.load(f)['num_params'] == model_lib.count_params(params)
    other = jax.eval_shape(model_lib.make_classifier('micro', 4).init, jax.random.key(0), VIDEO)['params']
    with pytest.raises(ValueError, match=r'shape mismatch 2: head/bias: stored \(3,\), wanted \(4,\)'):
        params_io.load_params(tmp_path / 'p', other)
    del other['fc_norm']
    with pytest.raises(ValueError, match='not in the target 2: fc_norm/bias, fc_norm/scale'):
        params_io.load_params(tmp_path / 'p', other)
    with pytest.raises(FileNotFoundError, match='not a jaxssl params directory'):
        params_io.load_params(tmp_path)
