"""PyTorch VideoMAE state dicts <-> jaxssl VideoMAEPretrain / VideoMAEClassifier params.

Two torch layouts are read:
- the reference's (OpenGVLab/VideoMAEv2): `encoder.blocks.N.attn.qkv.weight` fused [3D, D] plus `q_bias` /
  `v_bias`, `encoder.patch_embed.proj` Conv3d, `decoder.blocks.N...`, `decoder.norm`, `decoder.head`;
- transformers' `VideoMAEForPreTraining`: separate query / key / value Linears (`query.bias`, `value.bias` or
  `q_bias`, `v_bias`), `videomae.` prefix, `decoder.decoder_layers.N...`.
Wrappers from torch.compile (`_orig_mod.`) and DeepSpeed / DDP (`module.`) are stripped. Values may be numpy
arrays or torch tensors. The sinusoid position tables are not parameters on either side.

Fine-tuning checkpoints (the reference's models/modeling_finetune.py) have no `encoder.` prefix:
`patch_embed.proj`, `blocks.N...`, `fc_norm`, `head` (and `norm` without mean pooling); the prefixes `encoder.`
and `backbone.` are stripped as the reference's run_class_finetuning.py does, and a `model.` prefix on every
key (HF-hosted VideoMAEv2 copies) too. transformers' `VideoMAEForVideoClassification` (`videomae.encoder.layer.N`,
`fc_norm`, `classifier`) and bare `VideoMAEModel` keys are read as well.

API: `from_torch_state_dict(state_dict, model)` -> params (pretraining or classifier model),
`convert_state_dict(state_dict, model, kind)` -> Conversion (also 'encoder': a backbone without decoder / head),
`convert_checkpoint(state_dict, kind, variant)` -> Conversion with the model inferred from the weights,
`to_torch_state_dict(params)` -> reference layout, `resample_pos_embed` for learned position tables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxssl.models import vit
from jaxssl.models.videomae import VARIANTS, VideoMAEClassifier, VideoMAEPretrain, decode_variant, token_grid

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


# The reference fine-tuning model's names (no `encoder.` prefix) -> jaxssl VideoMAEClassifier paths. `norm` is the
# encoder's final norm, present only without mean pooling (and in pretraining encoders read as 'encoder').
_FT_TOP = {
    'patch_embed.proj.weight': ('patch_embed/proj/kernel', 'conv'),
    'patch_embed.proj.bias': ('patch_embed/proj/bias', 'copy'),
    'pos_embed': ('pos_embed/pos_embed', 'copy'),  # only for learned position tables
    'norm.weight': ('encoder/norm/scale', 'copy'),
    'norm.bias': ('encoder/norm/bias', 'copy'),
    'fc_norm.weight': ('fc_norm/scale', 'copy'),
    'fc_norm.bias': ('fc_norm/bias', 'copy'),
    'head.weight': ('head/kernel', 'linear'),
    'head.bias': ('head/bias', 'copy'),
}
_FT_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.(.+)$')
_FT_BLOCK_PATH = re.compile(r'^encoder/block_(\d+)/(.+)$')
# Prefixes the reference's fine-tuning loader strips from pretrained checkpoints (one of them, once).
FINETUNE_PREFIXES = ('backbone.', 'encoder.')
# transformers' VideoMAEModel keys carry no `videomae.` prefix.
_HF_BARE = ('embeddings.patch_embeddings.', 'encoder.layer.', 'layernorm.')


def _strip_finetune_prefix(key: str) -> str:
    for prefix in FINETUNE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def canonical_finetune_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Any supported torch layout -> the reference fine-tuning layout (`patch_embed.*`, `blocks.N.*`, `fc_norm.*`,
    `head.*`), numpy values. Pretraining checkpoints keep their decoder keys (`decoder.*`, `encoder_to_decoder.*`,
    `mask_token`) so callers can tell them apart."""
    state = {_strip_wrappers(k): _to_numpy(v) for k, v in state_dict.items()}
    if state and all(k.startswith('model.') for k in state):  # HF-hosted VideoMAEv2 copies wrap the ViT as `model`
        state = {k[len('model.') :]: v for k, v in state.items()}
    if any(k.startswith(_HF_BARE[:2]) for k in state):
        state = {('videomae.' + k if k.startswith(_HF_BARE) else k): v for k, v in state.items()}
    if any(k.startswith('videomae.') for k in state):
        state = _from_transformers(state)
        state = {('head.' + k[len('classifier.') :] if k.startswith('classifier.') else k): v for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        short = _strip_finetune_prefix(key)
        if short in out:
            raise ConversionError(f'two keys map to {short} once the encoder./backbone. prefix is stripped')
        out[short] = value
    return out


def _ft_jaxssl_path(key: str) -> tuple[str, str] | None:
    if key in _FT_TOP:
        return _FT_TOP[key]
    block = _FT_BLOCK_KEY.match(key)
    if block and block.group(2) in _IN_BLOCK:
        path, kind = _IN_BLOCK[block.group(2)]
        return f'encoder/block_{int(block.group(1)):02d}/{path}', kind
    return None


def _ft_torch_key(path: str) -> tuple[str, str] | None:
    for key, (target, kind) in _FT_TOP.items():
        if target == path:
            return key, kind
    block = _FT_BLOCK_PATH.match(path)
    if block:
        for key, (target, kind) in _IN_BLOCK.items():
            if target == block.group(2):
                return f'blocks.{int(block.group(1))}.{key}', kind
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


Model = VideoMAEPretrain | VideoMAEClassifier
KINDS = ('pretrain', 'classifier', 'encoder')
# Checkpoint keys (fine-tuning layout) that are not part of an encoder: dropped, and listed, by kind='encoder'.
_NOT_ENCODER = ('decoder.', 'encoder_to_decoder.', 'mask_token', 'head.')
_POOLING_NORMS = ('encoder/norm/scale', 'encoder/norm/bias', 'fc_norm/scale', 'fc_norm/bias')


def expected_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/c' -> shape of the model's parameters in the unscanned layout, without allocating.

    A learned position table comes out for a 1 x 2 x 2 token grid: its real size depends on the clip.
    """
    model = dataclasses.replace(model, scan_layers=False)
    tokens_per_frame = 4  # any even grid works: parameter shapes do not depend on the clip size
    side = 2 * model.patch
    video = jax.ShapeDtypeStruct((1, model.tubelet, side, side, model.channels), np.float32)
    if isinstance(model, VideoMAEClassifier):
        variables = jax.eval_shape(model.init, jax.random.key(0), video)
    else:
        idx = jax.ShapeDtypeStruct((1, tokens_per_frame // 2), np.int32)
        variables = jax.eval_shape(model.init, jax.random.key(0), video, idx, idx)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()}


# ---- Learned position tables of another clip size ------------------------------------------------------------


def _resize_matrix(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """(size_out, size_in) weights of torch's F.interpolate along one axis, align_corners=False.

    'linear': source x = (i + .5) * in / out - .5 clamped at 0, neighbours x0, min(x0 + 1, in - 1).
    'cubic': the same source x (not clamped), Keys' kernel with A = -0.75, taps x0 - 1 .. x0 + 2 clamped to the edge.
    """
    out = np.zeros((size_out, size_in), np.float64)
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    rows = np.arange(size_out)
    if mode == 'linear':
        src = np.maximum(src, 0.0)
        x0 = np.floor(src).astype(np.int64)
        frac = src - x0
        np.add.at(out, (rows, x0), 1.0 - frac)
        np.add.at(out, (rows, np.minimum(x0 + 1, size_in - 1)), frac)
        return out
    a = -0.75
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    x0 = np.floor(src).astype(np.int64)
    t = src - x0
    for offset, weight in ((-1, far(t + 1)), (0, near(t)), (1, near(1 - t)), (2, far(2 - t))):
        np.add.at(out, (rows, np.clip(x0 + offset, 0, size_in - 1)), weight)
    return out


def resample_pos_embed(
    table: np.ndarray, source_grid: tuple[int, int, int], target_grid: tuple[int, int, int]
) -> np.ndarray:
    """A learned (1, T*H*W, D) position table on another (T', H', W') token grid.

    Space: bicubic per temporal slice, as the reference's run_class_finetuning.py does (torch's kernel,
    align_corners=False; numerically the same to ~1e-6). Time: linear, as the reference does for its sinusoid
    table; the reference itself never resamples a learned table over time (it fails on a size mismatch).
    """
    table = np.asarray(table)
    width = table.shape[-1]
    grid = table.astype(np.float64).reshape(*source_grid, width)
    for axis, mode in ((0, 'linear'), (1, 'cubic'), (2, 'cubic')):
        if source_grid[axis] != target_grid[axis]:
            matrix = _resize_matrix(source_grid[axis], target_grid[axis], mode)
            grid = np.moveaxis(np.tensordot(matrix, grid, axes=(1, axis)), 0, axis)
    return grid.reshape(1, -1, width).astype(table.dtype)


def source_grid(num_tokens: int, target_grid: tuple[int, int, int], tubelet: int = 2) -> tuple[int, int, int]:
    """The (T, H, W) grid of a stored table with `num_tokens`: square frames, and the target's number of temporal
    slices if that divides (the reference's assumption), else the reference's 16 frames."""
    for slices in dict.fromkeys((target_grid[0], 16 // tubelet)):
        side = math.isqrt(num_tokens // slices) if slices and num_tokens % slices == 0 else 0
        if side and slices * side * side == num_tokens:
            return slices, side, side
    raise ConversionError(
        f'cannot tell the token grid of a {num_tokens}-token pos_embed (square frames with {target_grid[0]} or '
        f'{16 // tubelet} temporal slices expected); resample it with resample_pos_embed'
    )


def _fit_pos_embed(
    state: dict[str, np.ndarray],
    key: str,
    model: Model,
    expected: dict[str, tuple[int, ...]],
    grid: tuple[int, int, int] | None,
    skipped: list[str],
    notes: list[str],
) -> None:
    """Drops a stored copy of the fixed sinusoid, or fits a learned table to the clip grid (in place)."""
    path, value = 'pos_embed/pos_embed', state.get(key)
    if model.pos_embedding != 'learned':
        if value is None:
            return
        tokens, width = value.shape[-2:]
        if value.size == tokens * width and np.allclose(
            value.reshape(tokens, width), vit.sinusoid_table(tokens, width), atol=1e-3
        ):
            del state[key]
            skipped.append(f'{key} (a copy of the fixed sinusoid, which is regenerated)')
            return
        raise ConversionError(f"{key} is a learned position table: use a model with pos_embedding='learned'")
    if path not in expected:
        return
    tokens = math.prod(grid) if grid else (value.shape[-2] if value is not None and value.ndim == 3 else None)
    if tokens is not None:
        expected[path] = (1, tokens, model.width)
    if value is None or grid is None or value.ndim != 3 or value.shape[1] == tokens or value.shape[2] != model.width:
        return  # anything odd is reported as a shape mismatch below
    source = source_grid(value.shape[1], grid, model.tubelet)
    state[key] = resample_pos_embed(value, source, grid)
    notes.append(f'{key} resampled from a {source} to a {grid} token grid')


# ---- State dict -> params ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conversion:
    """A converted checkpoint: params (unscanned unless the model scans) and what happened on the way."""

    params: dict[str, Any]
    kind: str  # 'pretrain', 'classifier' or 'encoder' (a classifier's parameters less its head)
    model: Model
    variant: str | None = None  # e.g. 'B' or 'B/8'; None when the sizes match no named variant
    skipped: list[str] = dataclasses.field(default_factory=list)  # checkpoint keys deliberately left out
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. position-table resampling


def _fill(
    state: Mapping[str, np.ndarray],
    to_path: Callable[[str], tuple[str, str] | None],
    to_key: Callable[[str], tuple[str, str] | None],
    expected: Mapping[str, tuple[int, ...]],
    allow_missing: bool,
    optional: frozenset[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """Maps canonical torch keys onto flat jaxssl paths; one ConversionError lists every problem."""
    params, unexpected, mismatched, seen = {}, [], [], set()
    for key, value in state.items():
        target = to_path(key)
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
    missing = [] if allow_missing else sorted(set(expected) - seen - optional)
    problems = []
    if missing:
        problems.append(f'missing {len(missing)}: ' + ', '.join(to_key(p)[0] for p in missing))
    if unexpected:
        problems.append(f'unexpected {len(unexpected)}: ' + ', '.join(sorted(unexpected)))
    if mismatched:
        problems.append(f'shape mismatch {len(mismatched)}: ' + '; '.join(mismatched))
    if problems:
        raise ConversionError('state dict does not fit the model: ' + ' | '.join(problems))
    return params


def _stack_if_scanned(tree: dict[str, Any], model: Model) -> dict[str, Any]:
    if not model.scan_layers:
        return tree
    stacks = [('encoder', model.depth)] + ([('decoder', model.dec_depth)] if 'decoder' in tree else [])
    for stack, depth in stacks:
        if not all(f'block_{i:02d}' in tree.get(stack, {}) for i in range(depth)):
            raise ConversionError(f'{stack} blocks are incomplete: convert with scan_layers=False')
        tree[stack] = vit.stack_blocks(tree[stack], depth)
    return tree


def _detect_kind(finetune_state: Mapping[str, Any]) -> str:
    if any(k.startswith(_NOT_ENCODER[:3]) for k in finetune_state):
        return 'pretrain'
    return 'classifier' if 'head.weight' in finetune_state else 'encoder'


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model: Model,
    kind: str = 'auto',
    *,
    allow_missing: bool = False,
    frames: int | None = None,
    image_size: int | None = None,
) -> Conversion:
    """Converts a torch VideoMAE state dict (any supported layout) into params for `model`.

    kind: 'pretrain' (needs a VideoMAEPretrain), 'classifier' (a VideoMAEClassifier), 'encoder' (patch_embed,
    learned pos_embed, encoder blocks and whichever pooling norm the checkpoint has; decoder / head keys are
    skipped and listed), or 'auto' (from the model type and, for classifiers, whether the checkpoint has a head).
    frames / image_size give the clip a learned pos_embed is resampled to; without them its stored size is kept.
    Raises ConversionError listing every missing key (unless allow_missing), unexpected key and shape mismatch.
    """
    finetune_state = canonical_finetune_state_dict(state_dict)
    if kind == 'auto':
        is_pretrain = isinstance(model, VideoMAEPretrain)
        kind = 'pretrain' if is_pretrain else 'classifier' if 'head.weight' in finetune_state else 'encoder'
    if kind not in KINDS:
        raise ConversionError(f"unknown kind '{kind}'; valid: auto, {', '.join(KINDS)}")
    if (kind == 'pretrain') != isinstance(model, VideoMAEPretrain) and kind != 'encoder':
        wanted = 'VideoMAEPretrain' if kind == 'pretrain' else 'VideoMAEClassifier'
        raise ConversionError(f'kind {kind} needs a {wanted}, not a {type(model).__name__}')
    if (frames is None) != (image_size is None):
        raise ConversionError('frames and image_size go together')
    grid = token_grid(frames, image_size, model.patch, model.tubelet) if frames else None
    expected, skipped, notes = expected_shapes(model), [], []
    optional: frozenset[str] = frozenset()
    if kind == 'pretrain':
        state, pos_key = canonical_state_dict(state_dict), 'encoder.pos_embed'
        to_path, to_key = _jaxssl_path, _torch_key
    else:
        state, pos_key, to_path, to_key = finetune_state, 'pos_embed', _ft_jaxssl_path, _ft_torch_key
    if kind == 'encoder':
        expected = {p: s for p, s in expected.items() if p.split('/')[0] in ('patch_embed', 'pos_embed', 'encoder')}
        expected.update({p: (model.width,) for p in _POOLING_NORMS})
        optional = frozenset(_POOLING_NORMS)  # kept when the checkpoint has them, never required
        skipped += sorted(k for k in state if k.startswith(_NOT_ENCODER))
        state = {k: v for k, v in state.items() if not k.startswith(_NOT_ENCODER)}
    _fit_pos_embed(state, pos_key, model, expected, grid, skipped, notes)
    params = _fill(state, to_path, to_key, expected, allow_missing, optional)
    tree = _stack_if_scanned(traverse_util.unflatten_dict(params, sep='/'), model)
    return Conversion(params=tree, kind=kind, model=model, skipped=skipped, notes=notes)


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    model: Model,
    allow_missing: bool = False,
    *,
    frames: int | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Converts a torch VideoMAE pretraining (VideoMAEPretrain) or fine-tuning (VideoMAEClassifier) state dict.

    Raises ConversionError listing every missing key, unexpected key and shape mismatch (missing keys are
    allowed only with `allow_missing`, leaving those parameters out of the result). See convert_state_dict.
    """
    kind = 'pretrain' if isinstance(model, VideoMAEPretrain) else 'classifier'
    conversion = convert_state_dict(
        state_dict, model, kind, allow_missing=allow_missing, frames=frames, image_size=image_size
    )
    return conversion.params


# ---- Sizes read off the weights -------------------------------------------------------------------------------


def _count_blocks(state: Mapping[str, Any], pattern: re.Pattern) -> int:
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def inspect_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint's weights say about its model: kind, sizes, patch / tubelet, pooling, position table."""
    state = canonical_finetune_state_dict(state_dict)
    proj = state.get('patch_embed.proj.weight')
    if proj is None or proj.ndim != 5 or proj.shape[3] != proj.shape[4]:
        found = ', '.join(sorted(state)[:5]) or 'nothing'
        raise ConversionError(f'no VideoMAE tubelet embedding (patch_embed.proj.weight [D, C, t, p, p]); keys: {found}')
    width, channels, tubelet, patch, _ = proj.shape
    depth = _count_blocks(state, _FT_BLOCK_KEY)
    fc1 = state.get('blocks.0.mlp.fc1.weight')
    spec: dict[str, Any] = dict(
        kind=_detect_kind(state),
        width=width,
        depth=depth,
        mlp_hidden=None if fc1 is None else fc1.shape[0],
        patch=patch,
        tubelet=tubelet,
        channels=channels,
        layer_scale_init=0.1 if 'blocks.0.gamma_1' in state else 0.0,  # any > 0: the stored gammas replace it
        pos_embedding='sincos',
        num_classes=state['head.weight'].shape[0] if 'head.weight' in state else None,
        # Only a classifier with `norm` and no `fc_norm` pools token 0; pretrained encoders fine-tune with mean pooling.
        use_mean_pooling='fc_norm.weight' in state or 'head.weight' not in state or 'norm.weight' not in state,
    )
    if 'pos_embed' in state:
        table = state['pos_embed']
        tokens = table.shape[-2]
        sincos = vit.sinusoid_table(tokens, table.shape[-1])
        spec['pos_embedding'] = 'sincos' if np.allclose(table.reshape(sincos.shape), sincos, atol=1e-3) else 'learned'
    if spec['kind'] == 'pretrain':
        dec_fc1 = state.get('decoder.blocks.0.mlp.fc1.weight')
        spec.update(
            dec_width=state['encoder_to_decoder.weight'].shape[0] if 'encoder_to_decoder.weight' in state else None,
            dec_depth=_count_blocks(state, re.compile(r'^decoder\.blocks\.(\d+)\.')),
            dec_mlp_hidden=None if dec_fc1 is None else dec_fc1.shape[0],
        )
    return spec


def match_variant(spec: Mapping[str, Any]) -> str | None:
    """The named variant ('B', 'g', 'B/8', ...) whose encoder has these sizes, or None."""
    for name in VARIANTS:
        sizes = decode_variant(name)
        if all(sizes[k] == spec[k] for k in ('width', 'depth', 'mlp_hidden')):
            return name if sizes['patch'] == spec['patch'] else f'{name}/{spec["patch"]}'
    return None


def _check_variant(variant: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    try:
        sizes = decode_variant(variant)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    fields = ('width', 'depth', 'mlp_hidden') + (('patch',) if '/' in variant else ())
    diffs = [f'{k} {spec[k]} (not {sizes[k]})' for k in fields if sizes[k] != spec[k]]
    if diffs:
        guess = match_variant(spec)
        looks = f"it looks like '{guess}'" if guess else 'it matches no named variant'
        raise ConversionError(f"variant '{variant}' does not fit the checkpoint: it has {', '.join(diffs)}; {looks}")
    return sizes


def convert_checkpoint(
    state_dict: Mapping[str, Any],
    kind: str = 'auto',
    variant: str | None = None,
    *,
    frames: int = 16,
    image_size: int = 224,
    allow_missing: bool = False,
) -> Conversion:
    """Builds the model the weights describe (checked against `variant` when given) and converts into it.

    kind 'auto' reads the checkpoint: a decoder makes it 'pretrain', a head 'classifier', else 'encoder'.
    frames / image_size are the clip the params are for (they size a learned position table).
    """
    spec = inspect_state_dict(state_dict)
    kind = spec['kind'] if kind == 'auto' else kind
    if kind not in KINDS:
        raise ConversionError(f"unknown kind '{kind}'; valid: auto, {', '.join(KINDS)}")
    if variant is None:
        variant = match_variant(spec)
        if variant is None:
            raise ConversionError(
                f'width {spec["width"]}, depth {spec["depth"]}, MLP {spec["mlp_hidden"]} match no named variant '
                f'({", ".join(VARIANTS)}): build the model yourself and call convert_state_dict'
            )
    sizes = _check_variant(variant, spec)
    variant = match_variant(spec) or variant  # canonical spelling, with the checkpoint's patch
    common = dict(
        width=sizes['width'],
        depth=sizes['depth'],
        heads=sizes['heads'],
        mlp_hidden=sizes['mlp_hidden'],
        patch=spec['patch'],
        tubelet=spec['tubelet'],
        channels=spec['channels'],
        layer_scale_init=spec['layer_scale_init'],
        pos_embedding=spec['pos_embedding'],
    )
    if kind == 'pretrain':
        if spec['kind'] == 'pretrain':
            got = {k: spec[k] for k in ('dec_width', 'dec_depth', 'dec_mlp_hidden')}
            want = {k: sizes[k] for k in got}
            if got != want:
                raise ConversionError(
                    f'the decoder ({got}) is not the {variant} table decoder ({want}): its heads are unknown, '
                    'so build VideoMAEPretrain yourself and call convert_state_dict'
                )
        dec = {k: sizes[k] for k in ('dec_width', 'dec_depth', 'dec_heads', 'dec_mlp_hidden')}
        model: Model = VideoMAEPretrain(**common, **dec)
    else:
        classes = spec['num_classes'] or 1  # an encoder's model only supplies shapes; its head is never read
        model = VideoMAEClassifier(**common, num_classes=classes, use_mean_pooling=spec['use_mean_pooling'])
    conversion = convert_state_dict(
        state_dict, model, kind, allow_missing=allow_missing, frames=frames, image_size=image_size
    )
    conversion.variant = variant
    return conversion


# ---- Params -> state dict --------------------------------------------------------------------------------------


def to_torch_state_dict(params: Mapping[str, Any], layout: str = 'auto') -> dict[str, np.ndarray]:
    """jaxssl params -> the reference's state-dict layout (numpy arrays).

    layout 'pretrain' gives modeling_pretrain.py names (`encoder.blocks.N...`), 'finetune' modeling_finetune.py
    names (`blocks.N...`, `fc_norm`, `head`); 'auto' picks 'finetune' when the params have a head or fc_norm.
    Scanned (`blocks`) params are unstacked first.
    """
    params = dict(params)
    for stack in ('encoder', 'decoder'):
        if 'blocks' in params.get(stack, {}):
            params[stack] = vit.unstack_blocks(params[stack])
    if layout == 'auto':
        layout = 'finetune' if ('head' in params or 'fc_norm' in params) else 'pretrain'
    if layout not in ('pretrain', 'finetune'):
        raise ConversionError(f"unknown layout '{layout}'; valid: auto, pretrain, finetune")
    to_key = _torch_key if layout == 'pretrain' else _ft_torch_key
    state = {}
    for path, value in traverse_util.flatten_dict(params, sep='/').items():
        target = to_key(path)
        if target is None:
            raise ConversionError(f'no torch name for parameter {path} in the {layout} layout')
        key, kind = target
        state[key] = _to_torch_layout(np.asarray(value, dtype=np.float32), kind)
    return state
