"""Config system: argument strings, locking, and one-line errors that name the key."""

import glob
import subprocess
import sys

import ml_collections
import pytest

from jaxssl.config import ConfigError, load_config, parse_arg
from jaxssl.methods import videomae

CONFIG = 'configs/videomae_v2.py'


def test_parse_arg_types_and_flags():
    arg = parse_arg('variant=L,runlocal,decoder_ratio=0', variant='B', runlocal=False, decoder_ratio=0.5)
    assert (arg.variant, arg.runlocal, arg.decoder_ratio) == ('L', True, 0.0)
    assert parse_arg(None, variant='B').variant == 'B'


@pytest.mark.parametrize('path', sorted(glob.glob('configs/*.py')))
def test_every_config_loads_and_locks(path):
    for arg in ('', ':runlocal'):
        config = load_config(path + arg)
        assert config.is_locked
        with pytest.raises(AttributeError):
            config.not_a_field = 1


def test_variant_and_overrides():
    config = load_config(f'{CONFIG}:variant=g', ['input.global_batch=64', 'model.remat=false'])
    assert config.model.variant == 'g' and config.optim.base_lr == 6e-4 and config.optim.clip_grad == 0.02
    assert config.input.global_batch == 64 and config.model.remat is False
    assert load_config(f'{CONFIG}:decoder_ratio=0').masking.decoder_ratio == 0.0


@pytest.mark.parametrize(
    ('spec', 'overrides', 'needles'),
    [
        (f'{CONFIG}:varant=L', [], ["'varant'", "did you mean 'variant'", 'runlocal']),
        (f'{CONFIG}:variant', [], ["'variant' needs a value"]),
        (f'{CONFIG}:variant=Q', [], ["'model.variant'", 'S, B, L, H, g']),
        (CONFIG, ['model.varaint=B'], ["'model.varaint'", "did you mean 'variant'"]),
        (CONFIG, ['modle.variant=B'], ["'modle.variant'", "did you mean 'model'"]),
        (CONFIG, ['input.global_batch=1.5'], ["'input.global_batch'", 'integer']),
        (CONFIG, ['model.scan_layers=maybe'], ["'model.scan_layers'", 'true or false']),
        (CONFIG, ['model.scan_unroll=-1'], ["'model.scan_unroll'", '>= 0']),
        (CONFIG, ['model.dtype=float16'], ["'model.dtype'", 'bfloat16, float32']),
        (CONFIG, ['masking.decoder_ratio=0.1'], ["'masking.decoder_ratio'", '0.25']),
        (CONFIG, ['masking.encoder_ratio=1.0'], ["'masking.encoder_ratio'"]),
        (CONFIG, ['input.image_size=200'], ["'input.image_size'"]),
        (CONFIG, ['model=3'], ["'model' is a group"]),
        (CONFIG, ['method=simclrr'], ["'method'", 'videomae']),
        ('configs/nope.py', [], ['not found']),
    ],
)
def test_config_errors_name_the_key(spec, overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(spec, overrides)
    message = str(err.value)
    assert '\n' not in message
    for needle in needles:
        assert needle in message


def test_check_config_accepts_the_reference_shapes():
    for variant in ('S', 'B', 'L', 'H', 'g', 'B/16'):
        videomae.check_config(load_config(f'{CONFIG}:variant={variant}'))
    assert isinstance(load_config(CONFIG), ml_collections.ConfigDict)


def test_cli_prints_one_line_for_a_typo():
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'jaxssl.main',
            f'--config={CONFIG}:runlocal',
            '--config.model.varaint=B',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0, result.stderr
    assert "unknown config key 'model.varaint'" in result.stderr and 'Traceback' not in result.stderr


def test_readme_methods_table_matches_docs():
    """The README repeats docs/methods.md's table of methods; keep them equal."""

    def first_table(text):
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith('| '))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith('| ')), len(lines))
        return lines[start:end]

    with open('README.md') as f:
        readme = first_table(f.read().split('## Methods', 1)[1])
    with open('docs/methods.md') as f:
        assert readme == first_table(f.read())
