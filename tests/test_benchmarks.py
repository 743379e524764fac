"""benchmarks/train_throughput.py at the tiniest shapes: it runs end to end (jaxssl v1 and V2, the PyTorch baseline)
and its record is complete and self-consistent. No timing is asserted: CI machines are shared."""

import importlib.util
import json
import os

import pytest

from jaxssl.config import load_config
from jaxssl.methods import videomae

REPO = os.path.join(os.path.dirname(__file__), '..')
# The tiniest clip: micro/8 on 4 frames x 16 px, a 2x2x2 token grid (one visible token per slice).
TINY = ['--tiny', '--frames', '4', '--image-size', '16', '--batch', '2', '--steps', '2', '--warmup', '0']
TINY += ['--matmul-size', '128', '--isolate', 'off', '--scan', 'off', '--cpu-threads', '1']


def load_script():
    spec = importlib.util.spec_from_file_location(
        'train_throughput', os.path.join(REPO, 'benchmarks', 'train_throughput.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flops_per_example(decoder_ratio, patch_embed='matmul'):
    overrides = [
        f'model.patch_embed_impl={patch_embed}',
        'model.variant=micro/8',
        'input.frames=4',
        'input.image_size=16',
        f'masking.decoder_ratio={decoder_ratio}',
    ]
    config = load_config(os.path.join(REPO, 'configs', 'videomae_v2.py'), overrides)
    return videomae.Method(config).flops_per_example()


def test_train_throughput_with_torch_baseline(tmp_path):
    out = tmp_path / 'results.json'
    result = load_script().main([*TINY, '--torch', '--out', str(out)])
    written = json.loads(out.read_text())
    assert written['runs'] == json.loads(json.dumps(result['runs']))
    assert {'device', 'host', 'command', 'spec_peak_flops', 'measured_peak_flops', 'ratios'} <= set(written)
    assert written['measured_peak_flops'] > 0
    runs = {run['role']: run for run in written['runs']}
    assert set(runs) == {'torch', 'jaxssl_v1', 'jaxssl_v2'}
    for run in runs.values():
        assert 'error' not in run, run.get('error')
        for key in ('steps_per_s', 'clips_per_s', 'flops_per_step', 'mfu_measured_peak', 'first_step_s', 'loss_last'):
            assert run[key] is not None, key
        assert run['global_batch'] == 2 and len(run['step_times_s']) == 2
        assert 'peak_memory_bytes' in run and 'mfu_spec' in run
    for role in ('jaxssl_v1', 'jaxssl_v2'):
        assert runs[role]['compile_s'] > 0 and runs[role]['compiled_memory_bytes'] > 0
        assert runs[role]['nonfinite_steps'] == 0
    # Analytic FLOPs: Method.flops_per_example x the global batch; torch is counted as jaxssl's v1 with every token
    # embedded (conv), as transformers does; jaxssl embeds the visible ones only.
    v1, v2 = flops_per_example(0), flops_per_example(0.5)
    assert runs['jaxssl_v1']['flops_per_step'] == pytest.approx(v1 * 2)
    assert runs['torch']['flops_per_step'] == pytest.approx(flops_per_example(0, 'conv') * 2)
    assert flops_per_example(0, 'conv') > v1
    assert runs['jaxssl_v2']['flops_per_step'] == pytest.approx(v2 * 2)
    assert v2 < v1
    (ratios,) = written['ratios']
    assert {'jaxssl_v1/torch', 'jaxssl_v2/jaxssl_v1', 'jaxssl_v2/torch'} <= set(ratios)


def test_fsdp_mesh_and_lever_table(tmp_path):
    """FSDP on 2 fake CPU devices (correctness, not speed) with a profile; a lever table with a skipped row."""
    script = load_script()
    result = script.main(
        [
            *TINY,
            '--modes',
            'v2',
            '--mesh',
            'fsdp',
            '--devices',
            '2',
            '--profile',
            '1',
            '--out',
            str(tmp_path / 'r.json'),
        ]
    )
    (run,) = result['runs']
    assert 'error' not in run, run.get('error')
    assert run['profile']['busy_ms_per_step'] > 0 and run['profile']['top']  # --profile: time by kind of work
    assert run['mesh_shape'] == {'data': 1, 'fsdp': 2} and run['global_batch'] == 4
    assert run['flops_per_step'] == pytest.approx(flops_per_example(0.5) * 4)
    text = script.table([run, dict(label='attention=cudnn', error='skipped: needs a GPU')])
    assert 'ERROR skipped: needs a GPU' in text and 'fsdp' not in text.splitlines()[0]


def test_lever_selection_combines_and_rejects_names():
    """--lever-names picks rows (baseline always first), 'a+b' merges two changes, explicit XLA flags are kept."""
    script = load_script()
    argv = [*TINY, '--lever-names', 'qkv=split,qkv=split+gelu=tanh', '--lever-xla-flags=--xla_foo=1']
    args = script.parse_args(argv)
    base = script.base_spec(args, 'micro/8')
    rows = dict(script.lever_specs(args, base, 'gpu', 1))
    assert list(rows) == ['baseline', 'qkv=split', 'qkv=split+gelu=tanh', 'XLA_FLAGS --xla_foo=1']
    assert rows['baseline']['split_qkv'] is False and rows['qkv=split']['split_qkv'] is True
    both = rows['qkv=split+gelu=tanh']
    assert both['split_qkv'] is True and both['approximate_gelu'] is True and both['label'] == 'qkv=split+gelu=tanh'
    assert rows['XLA_FLAGS --xla_foo=1']['xla_flags'] == '--xla_foo=1'
    with pytest.raises(SystemExit, match="unknown lever 'gelu=fast'"):
        script.lever_specs(script.parse_args([*TINY, '--lever-names', 'gelu=fast']), base, 'gpu', 1)
