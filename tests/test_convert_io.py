"""Safe checkpoint reading (a booby-trapped pickle is refused and never runs); reference-layout safetensors export."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from jaxssl.convert import io
from jaxssl.convert import videomae as convert
from jaxssl.models import videomae as model_lib


def leave_marker(path):
    """What the booby-trapped pickle calls when unpickled: proof that code ran."""
    with open(path, 'w') as f:
        f.write('code ran')
    return 0


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_marker, (self.marker,)


def random_params(model, *inputs, seed=0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def reference_dicts():
    """Reference-layout state dicts of a micro pretraining model and a micro classifier (random values)."""
    video = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)
    idx = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    pretrain = convert.to_torch_state_dict(random_params(model_lib.make_pretrain_model('micro'), video, idx, idx))
    classifier = convert.to_torch_state_dict(random_params(model_lib.make_classifier('micro', 3), video, seed=1))
    return dict(pretrain=pretrain, classifier=classifier)


def as_torch(state):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def test_the_payload_is_live(tmp_path):
    """Control: an unrestricted torch.load of the same kind of file does run the payload."""
    marker = tmp_path / 'ran'
    torch.save({'model': {'w': torch.zeros(1)}, 'extra': Payload(str(marker))}, tmp_path / 'evil.pth')
    torch.load(tmp_path / 'evil.pth', weights_only=False)
    assert marker.exists()


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'extra': Payload(str(marker))}, path)
    with pytest.raises(io.ConversionError) as err:
        io.read_checkpoint(path)
    message = str(err.value)
    assert 'refused' in message and 'non-tensor objects' in message and 'leave_marker' in message
    assert '\n' not in message
    assert not marker.exists()


def test_reference_training_checkpoint_with_args_and_optimizer(tmp_path, reference_dicts):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], betas=(0.9, 0.95))
    parameter.grad = torch.ones(2)
    optimizer.step()  # real optimizer state: tensors, numbers, dicts
    args = argparse.Namespace(model='vit_micro', lr=1e-3, window_size=(8, 14, 14), finetune='', opt_betas=[0.9, 0.95])
    checkpoint = {'model': as_torch(reference_dicts['classifier']), 'optimizer': optimizer.state_dict(), 'epoch': 3}
    torch.save({**checkpoint, 'scaler': {'scale': 65536.0}, 'args': args}, tmp_path / 'checkpoint-3.pth')
    loaded = io.read_checkpoint(tmp_path / 'checkpoint-3.pth')
    assert loaded.source_key == 'model' and loaded.ignored == ['optimizer', 'epoch', 'scaler', 'args']
    assert loaded.state_dict.keys() == reference_dicts['classifier'].keys()


@pytest.mark.parametrize('wrapper', ['module', 'state_dict', None])
def test_state_dict_is_found_under_any_key(tmp_path, reference_dicts, wrapper):
    state = {f'_orig_mod.{k}': v for k, v in as_torch(reference_dicts['pretrain']).items()}
    top = {wrapper: state, 'global_steps': 10} if wrapper else {**state, 'note': 'bare'}
    torch.save(top, tmp_path / 'mp_rank_00_model_states.pt')
    loaded = io.read_checkpoint(tmp_path / 'mp_rank_00_model_states.pt')
    assert loaded.source_key == wrapper and loaded.ignored == ['global_steps' if wrapper else 'note']
    params = convert.from_torch_state_dict(loaded.state_dict, model_lib.make_pretrain_model('micro'))
    back = convert.to_torch_state_dict(params)
    assert all((back[k] == reference_dicts['pretrain'][k]).all() for k in back)


def test_damaged_and_unknown_files_are_one_line_errors(tmp_path):
    (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
    (tmp_path / 'weights.h5').write_bytes(b'')
    for name, needle in (('bad.pth', 'not a readable PyTorch checkpoint'), ('weights.h5', 'unknown checkpoint format'),
                         ('absent.pth', 'no such file')):  # fmt: skip
        with pytest.raises(io.ConversionError, match=needle):
            io.read_checkpoint(tmp_path / name)


def test_bfloat16_safetensors_are_widened(tmp_path):
    from safetensors.torch import save_file

    save_file({'w': torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}, str(tmp_path / 'w.safetensors'))
    state = io.read_state_dict(tmp_path / 'w.safetensors')
    assert state['w'].dtype == np.float32 and state['w'].tolist() == [1.5, -2.0]


@pytest.mark.parametrize('kind', ['pretrain', 'classifier'])
def test_safetensors_round_trip_is_bitwise(tmp_path, reference_dicts, kind):
    ref = reference_dicts[kind]
    model = model_lib.make_pretrain_model('micro') if kind == 'pretrain' else model_lib.make_classifier('micro', 3)
    params = convert.from_torch_state_dict(ref, model)
    io.save_torch_safetensors(params, tmp_path / 'out.safetensors')
    back = safetensors.numpy.load_file(str(tmp_path / 'out.safetensors'))
    assert back.keys() == ref.keys()
    for key in ref:
        assert back[key].dtype == np.float32 and back[key].tobytes() == np.ascontiguousarray(ref[key]).tobytes(), key
    # ... and the file reads back through the safe loader into the same params.
    again = convert.from_torch_state_dict(io.read_state_dict(tmp_path / 'out.safetensors'), model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, params))
    assert os.path.getsize(tmp_path / 'out.safetensors') > 4 * model_lib.count_params(params)
