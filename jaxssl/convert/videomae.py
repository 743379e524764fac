"""PyTorch VideoMAE state dicts <-> jaxssl VideoMAEPretrain params.

Two torch layouts are read:
- the reference's (OpenGVLab/VideoMAEv2): `encoder.blocks.N.attn.qkv.weight` fused [3D, D] plus `q_bias` /
  `v_bias`, `encoder.patch_embed.proj` Conv3d, `decoder.blocks.N...`, `decoder.norm`, `decoder.head`;
- transformers' `VideoMAEForPreTraining`: separate query / key / value Linears (`query.bias`, `value.bias` or
  `q_bias`, `v_bias`), `videomae.` prefix, `decoder.decoder_layers.N...`.
Wrappers from torch.compile (`_orig_mod.`) and DeepSpeed / DDP (`module.`) are stripped. Values may be numpy
arrays or torch tensors. The sinusoid position tables are not parameters on either side.

API: `from_torch_state_dict(state_dict, model)` -> params, `to_torch_state_dict(params)` -> reference layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxssl.models import vit
from jaxssl.models.videomae import VideoMAEPretrain

WRAPPER_PREFIXES = ('_orig_mod.', 'module.')


class ConversionError(ValueError):
    """A state dict that does not fit the model; the message lists every problem."""


# Reference-layout name -> (jaxssl parameter path, how the array is laid out).
# 'linear': torch [out, in] -> [in, out]; 'conv': torch [out, in, *kernel] -> [*kernel, in, out].
_TOP_LEVEL = {
    'encoder.patch_embed.proj.weight': ('patch_embed/proj/kernel', 'conv'),
    'encoder.patch_embed.proj.bias': ('patch_embed/proj/bias', 'copy'),
    'encoder.pos_embed': ('pos_embed/pos_embed', 'copy'),  # only for learned position tables
    'encoder.norm.weight': ('encoder/norm/scale', 'copy'),
    'encoder.norm.bias': ('encoder/norm/bias', 'copy'),
    'encoder_to_decoder.weight': ('encoder_to_decoder/kernel', 'linear'),
    'mask_token': ('mask_token', 'copy'),
    'decoder.norm.weight': ('decoder_norm/scale', 'copy'),
    'decoder.norm.bias': ('decoder_norm/bias', 'copy'),
    'decoder.head.weight': ('decoder_head/kernel', 'linear'),
    'decoder.head.bias': ('decoder_head/bias', 'copy'),
}
_IN_BLOCK = {
    'norm1.weight': ('norm1/scale', 'copy'),
    'norm1.bias': ('norm1/bias', 'copy'),
    'attn.qkv.weight': ('attn/qkv/kernel', 'linear'),
    'attn.q_bias': ('attn/q_bias', 'copy'),
    'attn.v_bias': ('attn/v_bias', 'copy'),
    'attn.proj.weight': ('attn/proj/kernel', 'linear'),
    'attn.proj.bias': ('attn/proj/bias', 'copy'),
    'norm2.weight': ('norm2/scale', 'copy'),
    'norm2.bias': ('norm2/bias', 'copy'),
    'mlp.fc1.weight': ('mlp/fc1/kernel', 'linear'),
    'mlp.fc1.bias': ('mlp/fc1/bias', 'copy'),
    'mlp.fc2.weight': ('mlp/fc2/kernel', 'linear'),
    'mlp.fc2.bias': ('mlp/fc2/bias', 'copy'),
    'gamma_1': ('gamma_1', 'copy'),
    'gamma_2': ('gamma_2', 'copy'),
}
_BLOCK_KEY = re.compile(r'^(encoder|decoder)\.blocks\.(\d+)\.(.+)$')
_BLOCK_PATH = re.compile(r'^(encoder|decoder)/block_(\d+)/(.+)$')

# transformers' per-layer names -> the reference's (q/k/v are fused separately).
_HF_IN_BLOCK = {
    'layernorm_before': 'norm1',
    'layernorm_after': 'norm2',
    'attention.output.dense': 'attn.proj',
    'intermediate.dense': 'mlp.fc1',
    'output.dense': 'mlp.fc2',
    'attention.attention.q_bias': 'attn.q_bias',
    'attention.attention.v_bias': 'attn.v_bias',
    'attention.attention.query.bias': 'attn.q_bias',
    'attention.attention.value.bias': 'attn.v_bias',
}
_HF_TOP = {
    'videomae.embeddings.patch_embeddings.projection': 'encoder.patch_embed.proj',
    'videomae.layernorm': 'encoder.norm',
}
_HF_LAYER = re.compile(r'^(videomae\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$')


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _from_transformers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames transformers' VideoMAE keys to the reference's, fusing query/key/value into qkv."""
    out, qkv = {}, {}
    for key, value in state.items():
        layer = _HF_LAYER.match(key)
        if layer:
            stack = 'encoder' if layer.group(1).startswith('videomae') else 'decoder'
            prefix, rest = f'{stack}.blocks.{layer.group(2)}.', layer.group(3)
            part = re.fullmatch(r'attention\.attention\.(query|key|value)\.weight', rest)
            if part:
                qkv.setdefault(prefix, {})[part.group(1)] = value
                continue
            name, _, leaf = rest.rpartition('.')
            if rest in _HF_IN_BLOCK:  # q_bias / v_bias / query.bias / value.bias
                out[prefix + _HF_IN_BLOCK[rest]] = value
            elif name in _HF_IN_BLOCK:
                out[f'{prefix}{_HF_IN_BLOCK[name]}.{leaf}'] = value
            else:
                out[key] = value  # unknown: reported as unexpected later
            continue
        name, _, leaf = key.rpartition('.')
        out[f'{_HF_TOP[name]}.{leaf}' if name in _HF_TOP else key] = value
    for prefix, parts in qkv.items():
        if set(parts) != {'query', 'key', 'value'}:
            missing = sorted({'query', 'key', 'value'} - set(parts))
            raise ConversionError(f'{prefix} has an incomplete attention projection: missing {missing}')
        out[prefix + 'attn.qkv.weight'] = np.concatenate([parts['query'], parts['key'], parts['value']], axis=0)
    return out


def canonical_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Any supported torch layout -> the reference layout with numpy values and no wrapper prefixes."""
    state = {_strip_wrappers(k): _to_numpy(v) for k, v in state_dict.items()}
    if any(k.startswith(('videomae.', 'decoder.decoder_layers.')) for k in state):
        state = _from_transformers(state)
    return state


def _jaxssl_path(key: str) -> tuple[str, str] | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    block = _BLOCK_KEY.match(key)
    if block and block.group(3) in _IN_BLOCK:
        path, kind = _IN_BLOCK[block.group(3)]
        return f'{block.group(1)}/block_{int(block.group(2)):02d}/{path}', kind
    return None


def _torch_key(path: str) -> tuple[str, str] | None:
    for key, (target, kind) in _TOP_LEVEL.items():
        if target == path:
            return key, kind
    block = _BLOCK_PATH.match(path)
    if block:
        for key, (target, kind) in _IN_BLOCK.items():
            if target == block.group(3):
                return f'{block.group(1)}.blocks.{int(block.group(2))}.{key}', kind
    return None


def _to_jax_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'linear':
        return value.T
    if kind == 'conv':
        return value.transpose(*range(2, value.ndim), 1, 0)
    return value


def _to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'linear':
        return value.T
    if kind == 'conv':
        return value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
    return value


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f'{prefix}{key}/'))
        else:
            flat[prefix + key] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def expected_shapes(model: VideoMAEPretrain) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/c' -> shape of the model's parameters in the unscanned layout, without allocating."""
    model = dataclasses.replace(model, scan_layers=False)
    tokens_per_frame = 4  # any even grid works: parameter shapes do not depend on the clip size
    side = 2 * model.patch
    video = jax.ShapeDtypeStruct((1, model.tubelet, side, side, model.channels), np.float32)
    idx = jax.ShapeDtypeStruct((1, tokens_per_frame // 2), np.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), video, idx, idx)
    return {k: tuple(v.shape) for k, v in _flatten(variables['params']).items()}


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: VideoMAEPretrain, allow_missing: bool = False
) -> dict[str, Any]:
    """Converts a torch VideoMAE pretraining state dict into params for `model`.

    Raises ConversionError listing every missing key, unexpected key and shape mismatch (missing keys are
    allowed only with `allow_missing`, leaving those parameters out of the result).
    """
    expected = expected_shapes(model)
    params, unexpected, mismatched, seen = {}, [], [], set()
    for key, value in canonical_state_dict(state_dict).items():
        target = _jaxssl_path(key)
        if target is None or target[0] not in expected:
            unexpected.append(key)
            continue
        path, kind = target
        seen.add(path)
        value = _to_jax_layout(value, kind)
        if value.shape != expected[path]:
            mismatched.append(f'{key}: got {value.shape}, model wants {expected[path]} (as {path})')
            continue
        params[path] = np.asarray(value, dtype=np.float32)
    missing = [] if allow_missing else sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(f'missing {len(missing)}: ' + ', '.join(_torch_key(p)[0] for p in missing))
    if unexpected:
        problems.append(f'unexpected {len(unexpected)}: ' + ', '.join(sorted(unexpected)))
    if mismatched:
        problems.append(f'shape mismatch {len(mismatched)}: ' + '; '.join(mismatched))
    if problems:
        raise ConversionError('state dict does not fit the model: ' + ' | '.join(problems))
    tree = _unflatten(params)
    if model.scan_layers:
        for stack, depth in (('encoder', model.depth), ('decoder', model.dec_depth)):
            tree[stack] = vit.stack_blocks(tree[stack], depth)
    return tree


def to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """jaxssl VideoMAEPretrain params -> the reference's state-dict layout (numpy arrays)."""
    params = dict(params)
    for stack in ('encoder', 'decoder'):
        if 'blocks' in params.get(stack, {}):
            params[stack] = vit.unstack_blocks(params[stack])
    state = {}
    for path, value in _flatten(params).items():
        target = _torch_key(path)
        if target is None:
            raise ConversionError(f'no torch name for parameter {path}')
        key, kind = target
        state[key] = _to_torch_layout(np.asarray(value, dtype=np.float32), kind)
    return state
