"""Config loading: argument strings, locked ml_collections configs, overrides that fail with one clear line.

A config file is a Python module with `get_config(arg: str | None) -> ConfigDict`. Users name it as
`configs/videomae_v2.py:variant=L,runlocal` and override fields as `--config.input.global_batch=64`.
Every mistake (unknown argument, misspelt key, value of the wrong type, value outside a field's choices)
raises `ConfigError` whose message names the key and what is valid; `jaxssl.main` prints it as one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config mistake; the message is one line meant for the user."""


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return f'{hint}; valid: {", ".join(choices)}'


def _coerce(key: str, text: str, default: Any) -> Any:
    """Parses `text` into the type of `default`."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ('1', 'true', 'yes', ''):
            return True
        if lowered in ('0', 'false', 'no'):
            return False
        raise ConfigError(f"bad value '{text}' for '{key}': expected true or false")
    if isinstance(default, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value '{text}' for '{key}': expected a number")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"bad value '{text}' for '{key}': expected an integer")
        return type(default)(value)
    if isinstance(default, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"bad value '{text}' for '{key}': expected a tuple") from e
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(default)(value)
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config argument string such as 'variant=L,runlocal' against typed defaults.

    A bare name sets a boolean to True. Names not in `defaults` are errors that list the valid ones.
    """
    result = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        name, has_value, text = item.partition('=')
        name = name.strip()
        if name not in defaults:
            raise ConfigError(f"unknown config argument '{name}'{_suggest(name, defaults)}")
        if not has_value and not isinstance(defaults[name], bool):
            raise ConfigError(f"config argument '{name}' needs a value, e.g. {name}={defaults[name]}")
        result[name] = _coerce(name, text.strip(), defaults[name])
    return ml_collections.ConfigDict(result)


def _import_file(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found")
    name = 'jaxssl_config_' + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (e.g. Flax modules) defined in the file look their module up here
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f"config file '{path}' has no get_config(arg) function")
    return module


def available_methods() -> list[str]:
    import jaxssl.methods

    # base and _private modules hold shared plumbing, not methods.
    names = (m.name for m in pkgutil.iter_modules(jaxssl.methods.__path__))
    return sorted(name for name in names if name != 'base' and not name.startswith('_'))


def method_module(config: ml_collections.ConfigDict):
    """Imports the method named by `config.method`: 'videomae' -> jaxssl.methods.videomae. Any other importable
    module name ('mylab.methods.foo') is imported as it is, so methods can live outside this package."""
    name = config.get('method')
    if name in available_methods():
        return importlib.import_module(f'jaxssl.methods.{name}')
    if isinstance(name, str) and name and importlib.util.find_spec(name.split('.')[0]) is not None:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"cannot import method module '{name}' for 'method': {e}") from None
    raise ConfigError(f"unknown method '{name}' for 'method'{_suggest(str(name), available_methods())}")


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    """Sets `config.<dotted_key>` from a command-line string, keeping the field's type."""
    *parents, leaf = dotted_key.split('.')
    node, walked = config, []
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = '.'.join(walked) or 'the config'
            raise ConfigError(f"unknown config key '{dotted_key}': no '{part}' in {where}{_suggest(part, node)}")
        node, walked = node[part], [*walked, part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        where = '.'.join(walked) or 'the config'
        raise ConfigError(f"unknown config key '{dotted_key}' in {where}{_suggest(leaf, node)}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"'{dotted_key}' is a group; set one of its keys: {', '.join(current)}")
    with node.unlocked():
        node[leaf] = text if current is None else _coerce(dotted_key, text, current)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads 'path.py[:arg]', applies 'key=value' overrides, validates through the method, and locks.

    Raises ConfigError with a one-line message on any mistake.
    """
    path, _, arg = spec.partition(':')
    module = _import_file(path)
    config = module.get_config(arg or None)
    for item in overrides:
        key, has_value, text = item.partition('=')
        if not has_value:
            raise ConfigError(f"override '{item}' needs a value: --config.{key}=VALUE")
        apply_override(config, key, text)
    check = getattr(method_module(config), 'check_config', None)
    if check is not None:
        check(config)
    if 'train' in config:
        check_trainer_config(config)
    config.lock()
    return config


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[Any]) -> None:
    """Fails with a ConfigError naming `key` when its value is not one of `choices`."""
    value = config
    for part in key.split('.'):
        value = value[part]
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"bad value '{value}' for '{key}'{_suggest(str(value), map(str, choices))}")


def check_range(config: ml_collections.ConfigDict, key: str, low: float, high: float) -> None:
    """Fails with a ConfigError naming `key` when its value is outside [low, high)."""
    value = config
    for part in key.split('.'):
        value = value[part]
    if not low <= value < high:
        raise ConfigError(f"bad value {value} for '{key}': must be in [{low}, {high})")


def add_backbone_config(config: ml_collections.ConfigDict, variant: str, runlocal: bool) -> bool:
    """config.model's backbone keys for the image methods that take a ViT or a ResNet: `variant` (a ViT size, or
    'micro/4' under runlocal; a ResNet name kept as given) and the ResNet keys (width 16 and the CIFAR stem under
    runlocal). Returns whether `variant` is a ResNet, so a config can switch to the ResNet recipe."""
    from jaxssl.models.resnet import is_resnet  # models import flax: only the configs that need it pay for it

    resnet = is_resnet(variant)
    config.model.variant = 'micro/4' if runlocal and not resnet else variant
    config.model.resnet_width = 16 if runlocal else 64  # ResNets only: the first stage's channels (torchvision: 64)
    config.model.resnet_small_stem = runlocal  # ResNets only: the CIFAR stem (3x3 stride 1, no max pool)
    return resnet


def fixed_lr(config: ml_collections.ConfigDict, lr: float) -> ml_collections.FieldReference:
    """An `optim.base_lr` that makes the trainer's lr (base_lr x input.global_batch / 256) equal `lr` whatever the
    batch (set input.global_batch first). A float reference, so --config.optim.base_lr=... still overrides it."""
    return ml_collections.FieldReference(float(lr) * 256) / config.input.get_ref('global_batch')


def add_trainer_defaults(config: ml_collections.ConfigDict, runlocal: bool = False) -> ml_collections.ConfigDict:
    """Adds the sections every method's config shares: train loop, checkpoints, mesh, sharding, debug hooks."""
    c = config
    if 'seed' not in c:
        c.seed = 0
    c.init_from = ''  # a jaxssl params directory (python -m jaxssl.convert ...) or a training workdir to start from
    c.init_from_select = ('.*',)  # regexes of the param names taken from init_from; '.*': all, exact fit
    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # 0: optim.epochs x examples per epoch / global batch
    c.train.log_every = 1 if runlocal else 50
    c.train.grad_accum = 1  # micro-batches per step
    c.train.lookahead_steps = 0  # FST's virtual updates before each real one (jaxssl.train.make_train_step)
    c.train.nonfinite = 'stop'  # on a NaN/Inf loss or gradient: 'stop' (at the next log) or 'skip' the update
    c.train.preemption_check_every = 10  # steps between multi-process agreement on SIGTERM
    c.train.tensorboard = True
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between online evaluations (Method.evaluate); 0: only at the end if eval.at_end
    c.eval.at_end = False
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 20 if runlocal else 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ()  # ((regex, partition spec tuple), ...) tried before the FSDP default
    c.sharding.min_size = 2**14  # smaller leaves stay replicated
    c.debug = ml_collections.ConfigDict()
    c.debug.sigterm_at_step = -1  # fault injection for preemption tests
    c.debug.sigkill_at_step = -1
    if 'optim' in c:  # the lr schedule's keys (jaxssl/optim.py), so any config can select any schedule
        from jaxssl import optim

        optim.add_schedule_defaults(c.optim)
    return c


def check_trainer_config(config: ml_collections.ConfigDict) -> None:
    check_choice(config, 'train.nonfinite', ('stop', 'skip'))
    if 'optim' in config:
        from jaxssl import optim

        optim.check_schedule_config(config)
    for key in ('train.log_every', 'checkpoint.every', 'checkpoint.keep', 'train.preemption_check_every'):
        value = config
        for part in key.split('.'):
            value = value[part]
        if value < 1:
            raise ConfigError(f"bad value {value} for '{key}': must be >= 1")
