"""Reading torch checkpoints without running their code, and writing params as PyTorch safetensors.

`.pth` / `.pt` / `.bin` / `.ckpt` files are pickles: unpickling an untrusted one can run arbitrary code. They are
read with `torch.load(weights_only=True)`, whose unpickler rebuilds only tensors, containers and plain Python
values and refuses every other global. One class is allowed on top: `argparse.Namespace`, because the
reference's training scripts store their `args` in every checkpoint; a Namespace only holds attributes, which
go through the same restricted unpickler. `.safetensors` files hold raw tensors only and are always safe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxssl.convert.videomae import ConversionError, to_torch_state_dict

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
# Where a training checkpoint keeps the model's weights (the reference: 'model', DeepSpeed: 'module').
STATE_DICT_KEYS = ('model', 'module', 'state_dict')


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint's weights as numpy arrays, and what else the file held."""

    state_dict: dict[str, np.ndarray]
    source_key: str | None  # 'model', 'module', 'state_dict', or None for a bare state dict
    ignored: list[str]  # other top-level entries (optimizer, epoch, args, ...) or non-tensor values


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, 'detach') and hasattr(value, 'numpy'))


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):  # safetensors gives bfloat16 arrays once ml_dtypes (jax) is imported
        return value.astype(np.float32) if value.dtype.name == 'bfloat16' else value
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16; float32 holds it exactly
        value = value.float()
    return value.numpy()


def _torch_load(path: str) -> Any:
    """torch.load restricted to tensors and plain data; a refused pickle becomes a one-line ConversionError."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f'{path}: reading .pth files needs PyTorch (pip install "jaxssl[torch]")') from None
    try:
        if hasattr(torch.serialization, 'safe_globals'):  # torch >= 2.5: allow the class for this call only
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location='cpu', weights_only=True)
        torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4: process-wide
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
        if found:
            raise ConversionError(
                f'{path}: refused: the file contains non-tensor objects ({found.group(1)}) that could run code when '
                'unpickled; re-save its state dict from a trusted environment (e.g. as .safetensors)'
            ) from None
        # Garbage and unsupported pickle opcodes land here too: nothing was run either way.
        detail = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(Check the documentation|$)', str(err), re.S)
        reason = ' '.join(detail.group(1).split()) if detail else _first_line(err)
        raise ConversionError(
            f'{path}: not a readable PyTorch checkpoint (the safe unpickler stopped: {reason})'
        ) from None
    except Exception as err:  # torch raises KeyError, EOFError, RuntimeError ... on damaged files
        raise ConversionError(f'{path}: not a readable PyTorch checkpoint: {_first_line(err)}') from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f'{type(err).__name__}: {text.splitlines()[0]}' if text else type(err).__name__


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # bfloat16, which numpy cannot hold: read through torch and widen to float32
        from safetensors.torch import load_file as load_torch_file

        return {k: _numpy(v) for k, v in load_torch_file(path).items()}
    except SafetensorError as err:
        raise ConversionError(f'{path}: not a readable safetensors file: {err}') from None


def _pick_state_dict(top: Any, path: str) -> LoadedCheckpoint:
    if not isinstance(top, Mapping):
        raise ConversionError(f'{path}: holds a {type(top).__name__}, not a state dict')
    source_key = next(
        (k for k in STATE_DICT_KEYS if isinstance(top.get(k), Mapping) and any(map(_is_tensor, top[k].values()))),
        None,
    )
    chosen = top[source_key] if source_key else top
    ignored = [str(k) for k in top if k != source_key] if source_key else []
    ignored += [str(k) for k, v in chosen.items() if not _is_tensor(v)]
    state = {str(k): _numpy(v) for k, v in chosen.items() if _is_tensor(v)}
    if not state:
        raise ConversionError(f'{path}: no tensors found under {", ".join(STATE_DICT_KEYS)} or at the top level')
    return LoadedCheckpoint(state, source_key, ignored)


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Reads a torch checkpoint safely and picks its state dict (under 'model', 'module', 'state_dict', or bare)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f'{path}: no such file')
    if path.endswith('.safetensors'):
        return _pick_state_dict(_load_safetensors(path), path)
    if path.endswith(TORCH_SUFFIXES):
        return _pick_state_dict(_torch_load(path), path)
    suffixes = ', '.join(TORCH_SUFFIXES)
    raise ConversionError(f'{path}: unknown checkpoint format; expected .safetensors or one of {suffixes}')


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Just the weights of `read_checkpoint`."""
    return read_checkpoint(path).state_dict


TRANSFORMERS_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def read_transformers_folder(directory: str, model_class: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, state dict) of a folder `save_pretrained` wrote (model.safetensors or pytorch_model.bin);
    FileNotFoundError names what is missing, `model_class` says what kind of folder was expected."""
    if not os.path.isfile(os.path.join(directory, 'config.json')):
        raise FileNotFoundError(f'{directory}: no config.json (a transformers {model_class} folder)')
    files = [
        os.path.join(directory, f) for f in TRANSFORMERS_WEIGHT_FILES if os.path.isfile(os.path.join(directory, f))
    ]
    if not files:
        raise FileNotFoundError(f'{directory}: none of {", ".join(TRANSFORMERS_WEIGHT_FILES)}')
    with open(os.path.join(directory, 'config.json')) as f:
        config = json.load(f)
    return config, read_state_dict(files[0])


def save_torch_safetensors(params: Mapping[str, Any], path: str | os.PathLike, layout: str = 'auto') -> None:
    """Writes jaxssl VideoMAE params as a safetensors file in the reference's state-dict layout.

    The reference loads it with `model.load_state_dict(safetensors.torch.load_file(path))` (pretraining or
    fine-tuning model, per `layout`; see to_torch_state_dict). Values are float32.
    """
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(v) for k, v in to_torch_state_dict(params, layout).items()}
    save_file(state, os.fspath(path), metadata={'format': 'pt'})  # 'pt' lets transformers' loaders accept it
