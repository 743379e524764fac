"""PyTorch MAE state dicts <-> jaxssl MAEPretrain params.

Layouts read (values may be numpy arrays or torch tensors; `module.` / `_orig_mod.` wrappers are stripped):
- the reference's (facebookresearch/mae models_mae.py, timm blocks): `patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.N.attn.qkv` fused [3D, D] with a fused bias, `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`,
  `decoder_blocks.N...`, `decoder_norm`, `decoder_pred`. The released `mae_pretrain_vit_*.pth` hold the encoder only
  (read with `allow_missing=True`), `*_full.pth` / `mae_visualize_*.pth` the decoder too;
- transformers' `ViTMAEForPreTraining` / `ViTMAEModel`: `vit.embeddings...`, `vit.layers.N.attention.{q,k,v,o}_proj`
  (transformers 5) or `vit.encoder.layer.N.attention.attention.{query,key,value}` (transformers 4),
  `decoder.decoder_layers.N...`.

Two differences in parameters, none in outputs:
- the attention key bias is dropped: it adds q . b_k to all logits of a query row, which softmax cancels
  (`to_torch_state_dict` writes zeros for it);
- the fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`) are constants in jaxssl, not parameters: when a
  checkpoint has them they are compared with jaxssl's tables (a layout or size mismatch is an error) and dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jaxssl.convert.videomae import ConversionError, _strip_wrappers, _to_numpy
from jaxssl.models import mae as mae_model
from jaxssl.models import vit

# Reference name -> (jaxssl path, layout). 'linear': torch [out, in] -> [in, out]; 'conv': [out, in, kh, kw] ->
# [kh, kw, in, out]; 'copy': as is.
_TOP_LEVEL = {
    'cls_token': ('cls_token', 'copy'),
    'patch_embed.proj.weight': ('patch_embed/proj/kernel', 'conv'),
    'patch_embed.proj.bias': ('patch_embed/proj/bias', 'copy'),
    'norm.weight': ('encoder/norm/scale', 'copy'),
    'norm.bias': ('encoder/norm/bias', 'copy'),
    'decoder_embed.weight': ('decoder_embed/kernel', 'linear'),
    'decoder_embed.bias': ('decoder_embed/bias', 'copy'),
    'mask_token': ('mask_token', 'copy'),
    'decoder_norm.weight': ('decoder/norm/scale', 'copy'),
    'decoder_norm.bias': ('decoder/norm/bias', 'copy'),
    'decoder_pred.weight': ('decoder_pred/kernel', 'linear'),
    'decoder_pred.bias': ('decoder_pred/bias', 'copy'),
}
_IN_BLOCK = {
    'norm1.weight': ('norm1/scale', 'copy'),
    'norm1.bias': ('norm1/bias', 'copy'),
    'attn.qkv.weight': ('attn/qkv/kernel', 'linear'),
    'attn.proj.weight': ('attn/proj/kernel', 'linear'),
    'attn.proj.bias': ('attn/proj/bias', 'copy'),
    'norm2.weight': ('norm2/scale', 'copy'),
    'norm2.bias': ('norm2/bias', 'copy'),
    'mlp.fc1.weight': ('mlp/fc1/kernel', 'linear'),
    'mlp.fc1.bias': ('mlp/fc1/bias', 'copy'),
    'mlp.fc2.weight': ('mlp/fc2/kernel', 'linear'),
    'mlp.fc2.bias': ('mlp/fc2/bias', 'copy'),
}
_STACKS = {'blocks': 'encoder', 'decoder_blocks': 'decoder'}
_BLOCK_KEY = re.compile(r'^(blocks|decoder_blocks)\.(\d+)\.(.+)$')
_BLOCK_PATH = re.compile(r'^(encoder|decoder)/block_(\d+)/(.+)$')
POSITION_TABLES = {'pos_embed': 'width', 'decoder_pos_embed': 'dec_width'}
ENCODER_PREFIXES = ('cls_token', 'patch_embed/', 'encoder/')

# transformers -> reference names.
_HF_TOP = {
    'vit.embeddings.cls_token': 'cls_token',
    'vit.embeddings.position_embeddings': 'pos_embed',
    'vit.embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'vit.embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'vit.layernorm.weight': 'norm.weight',
    'vit.layernorm.bias': 'norm.bias',
    'decoder.mask_token': 'mask_token',
    'decoder.decoder_pos_embed': 'decoder_pos_embed',
}
_HF_DECODER_TOP = re.compile(r'^decoder\.(decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)$')
_HF_LAYER = re.compile(r'^(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$')
_HF_IN_LAYER = {
    'layernorm_before': 'norm1',
    'layernorm_after': 'norm2',
    'attention.o_proj': 'attn.proj',  # transformers 5
    'mlp.fc1': 'mlp.fc1',
    'mlp.fc2': 'mlp.fc2',
    'attention.output.dense': 'attn.proj',  # transformers 4
    'intermediate.dense': 'mlp.fc1',
    'output.dense': 'mlp.fc2',
}
_HF_QKV = re.compile(r'^attention\.(?:(q|k|v)_proj|attention\.(query|key|value))\.(weight|bias)$')
_HF_BARE = ('embeddings.', 'layers.', 'encoder.layer.', 'layernorm.')  # ViTMAEModel keys have no `vit.` prefix


def _from_transformers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames transformers' ViTMAE keys to the reference's, fusing q / k / v weights and biases into qkv."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if key.startswith(_HF_BARE):
            key = 'vit.' + key
        layer = _HF_LAYER.match(key)
        if layer:
            stack = 'decoder_blocks' if layer.group(1).startswith('decoder') else 'blocks'
            prefix, rest = f'{stack}.{layer.group(2)}.', layer.group(3)
            part = _HF_QKV.match(rest)
            if part:
                which = (part.group(1) or part.group(2))[0]  # q / k / v
                qkv.setdefault(prefix, {})[f'{which}.{part.group(3)}'] = value
                continue
            name, _, leaf = rest.rpartition('.')
            out[f'{prefix}{_HF_IN_LAYER[name]}.{leaf}' if name in _HF_IN_LAYER else key] = value
            continue
        decoder_top = _HF_DECODER_TOP.match(key)
        if decoder_top:
            out[f'{decoder_top.group(1)}.{decoder_top.group(2)}'] = value
        else:
            out[_HF_TOP.get(key, key)] = value  # an unknown key is reported as unexpected later
    for prefix, parts in qkv.items():
        for leaf in ('weight', 'bias'):
            present = [p for p in 'qkv' if f'{p}.{leaf}' in parts]
            if present and len(present) < 3:
                missing = sorted(set('qkv') - set(present))
                raise ConversionError(f'{prefix}attention has an incomplete {leaf}: missing {missing} projections')
            if present:
                out[f'{prefix}attn.qkv.{leaf}'] = np.concatenate([parts[f'{p}.{leaf}'] for p in 'qkv'], axis=0)
    return out


def canonical_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Any supported torch layout -> the reference layout with numpy values and no wrapper prefixes."""
    state = {_strip_wrappers(k): _to_numpy(v) for k, v in state_dict.items()}
    if any(k.startswith(('vit.', 'decoder.decoder_', 'decoder.mask_token', *_HF_BARE)) for k in state):
        state = _from_transformers(state)
    return state


def _to_jax_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'linear':
        return value.T
    if kind == 'conv':
        return value.transpose(2, 3, 1, 0)
    return value


def _to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'linear':
        return value.T
    if kind == 'conv':
        return value.transpose(3, 2, 0, 1)
    return value


def _jaxssl_path(key: str) -> tuple[str, str] | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    block = _BLOCK_KEY.match(key)
    if block and block.group(3) in _IN_BLOCK:
        path, kind = _IN_BLOCK[block.group(3)]
        return f'{_STACKS[block.group(1)]}/block_{int(block.group(2)):02d}/{path}', kind
    return None


def _check_position_table(key: str, table: np.ndarray, model: mae_model.MAEPretrain, problems: list[str]) -> None:
    """A checkpoint's fixed table must be jaxssl's (cls row of zeros, then the 2-D sin-cos grid)."""
    width = getattr(model, POSITION_TABLES[key])
    table = table.reshape(-1, table.shape[-1])
    side = round((len(table) - 1) ** 0.5)
    if table.shape[-1] != width or side * side != len(table) - 1:
        problems.append(f'{key}: shape {table.shape} is not (1 + n * n, {width})')
        return
    want = np.concatenate([np.zeros((1, width), np.float32), mae_model.sincos_2d_table(side, side, width)])
    error = float(np.abs(table - want).max())
    if error > 1e-4:
        problems.append(f'{key}: differs from the 2-D sin-cos table by {error:.3g} (another layout?)')


def expected_shapes(model: mae_model.MAEPretrain, image_size: int = 224) -> dict[str, tuple[int, ...]]:
    """jaxssl parameter path -> shape for `model` (unscanned layout); the shapes do not depend on `image_size`."""
    import jax
    import jax.numpy as jnp

    tokens = (image_size // model.patch) ** 2
    args = (
        jax.ShapeDtypeStruct((1, image_size, image_size, model.channels), jnp.float32),
        jax.ShapeDtypeStruct((1, 1), jnp.int32),
        jax.ShapeDtypeStruct((1, tokens), jnp.int32),
    )
    unscanned = dataclasses.replace(model, scan_layers=False, remat=False)
    shapes = jax.eval_shape(lambda *a: unscanned.init(jax.random.key(0), *a)['params'], *args)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: mae_model.MAEPretrain, allow_missing: bool = False
) -> dict[str, Any]:
    """Converts a torch MAE state dict (any supported layout) into params for `model` (scanned if it scans).

    Raises ConversionError listing every missing key (allowed with `allow_missing`, e.g. for the released encoder-only
    checkpoints: the result then lacks those params), unexpected key, shape mismatch and position-table mismatch.
    """
    state = canonical_state_dict(state_dict)
    expected = expected_shapes(model)
    params: dict[str, np.ndarray] = {}
    unexpected, mismatched, problems = [], [], []
    mismatched_paths = set()  # reported as mismatched, not also as missing
    for key, value in state.items():
        if key in POSITION_TABLES:
            _check_position_table(key, value, model, problems)
            continue
        block = _BLOCK_KEY.match(key)
        if block and block.group(3) == 'attn.qkv.bias':
            # Fused [q; k; v] bias: q and v become q_bias / v_bias; k is dropped (softmax cancels it).
            base = f'{_STACKS[block.group(1)]}/block_{int(block.group(2)):02d}/attn/'
            q_bias, _, v_bias = np.split(value, 3) if value.shape[0] % 3 == 0 else (None, None, None)
            for name, part in (('q_bias', q_bias), ('v_bias', v_bias)):
                want = expected.get(base + name)
                if want is None:
                    unexpected.append(key)
                    break
                if part is None or part.shape != want:
                    mismatched.append(f'{key} {value.shape} (expected 3 x {want})')
                    mismatched_paths.update({base + 'q_bias', base + 'v_bias'})
                    break
                params[base + name] = part
            continue
        target = _jaxssl_path(key)
        if target is None or target[0] not in expected:
            unexpected.append(key)
            continue
        path, kind = target
        converted = _to_jax_layout(value, kind)
        if converted.shape != expected[path]:
            mismatched.append(f'{key} {value.shape} -> {path} {converted.shape} (expected {expected[path]})')
            mismatched_paths.add(path)
            continue
        params[path] = converted.astype(np.float32)
    missing = sorted(set(expected) - set(params) - mismatched_paths)
    if missing and not allow_missing:
        problems.append(f'missing {len(missing)}: {", ".join(missing)}')
    if unexpected:
        problems.append(f'unexpected {len(unexpected)}: {", ".join(sorted(unexpected))}')
    if mismatched:
        problems.append(f'shape mismatch {len(mismatched)}: {"; ".join(mismatched)}')
    if problems:
        raise ConversionError('state dict does not fit the MAE model: ' + ' | '.join(problems))
    tree = traverse_util.unflatten_dict(params, sep='/')
    if model.scan_layers:
        for stack, depth in (('encoder', model.depth), ('decoder', model.dec_depth)):
            if stack in tree and all(f'block_{i:02d}' in tree[stack] for i in range(depth)):
                tree[stack] = vit.stack_blocks(tree[stack], depth)
    return tree


def _torch_key(path: str) -> tuple[str, str] | None:
    for key, (target, kind) in _TOP_LEVEL.items():
        if target == path:
            return key, kind
    block = _BLOCK_PATH.match(path)
    if block:
        stack = 'blocks' if block.group(1) == 'encoder' else 'decoder_blocks'
        for key, (target, kind) in _IN_BLOCK.items():
            if target == block.group(3):
                return f'{stack}.{int(block.group(2))}.{key}', kind
    return None


def to_torch_state_dict(params: Mapping[str, Any], image_size: int | None = None) -> dict[str, np.ndarray]:
    """jaxssl MAE params (scanned or not) -> the reference layout; the attention key bias is written as zeros.

    With `image_size`, the fixed `pos_embed` / `decoder_pos_embed` tables are written too (the reference keeps them in
    its state dict).
    """
    tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in params.items()}
    for stack in ('encoder', 'decoder'):
        if stack in tree and 'blocks' in tree[stack]:
            tree[stack] = vit.unstack_blocks(tree[stack])
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        if path.endswith(('attn/q_bias', 'attn/v_bias')):
            continue  # fused below
        target = _torch_key(path)
        if target is None:
            raise ConversionError(f"no reference name for jaxssl parameter '{path}'")
        key, kind = target
        out[key] = _to_torch_layout(value, kind)
        if path.endswith('attn/qkv/kernel'):
            base = path.rsplit('/', 3)[0]  # encoder/block_00
            q_bias, v_bias = flat[f'{base}/attn/q_bias'], flat[f'{base}/attn/v_bias']
            out[key.replace('.weight', '.bias')] = np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])
    if image_size is not None:
        side = image_size // out['patch_embed.proj.weight'].shape[-1]
        for key, width_key in (('pos_embed', 'cls_token'), ('decoder_pos_embed', 'mask_token')):
            if width_key in out:
                width = out[width_key].shape[-1]
                table = np.concatenate([np.zeros((1, width), np.float32), mae_model.sincos_2d_table(side, side, width)])
                out[key] = table[None]
    return out
