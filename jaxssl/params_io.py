"""Params on disk: an Orbax checkpoint of the params pytree plus a JSON file that says what model they belong to.

Layout of a params directory:
    DIR/params/               Orbax (StandardCheckpointer) checkpoint of the params pytree
    DIR/jaxssl_params.json    metadata: kind ('pretrain' / 'classifier' / 'encoder'), variant, patch, tubelet,
                              frames, image_size, source file, ... plus 'format' and 'num_params'

`load_params(DIR, target_shapes)` restores onto the shapes, dtypes and shardings of `target_shapes` (what
`jax.eval_shape` of the model's init gives, with shardings attached) and converts between the unscanned
(`block_00`, `block_01`, ...) and scanned (`blocks`, stacked) transformer layouts when the two differ, so params
converted once serve models built either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

PARAMS_SUBDIR = 'params'
METADATA_FILE = 'jaxssl_params.json'
FORMAT = 'jaxssl-params/1'
_BLOCK = re.compile(r'^(.+?)/block_(\d+)/(.+)$')


def _relayout(
    flat: Mapping[str, Any],
    want: set[str],
    stack: Callable[[list[Any]], Any],
    take: Callable[[Any, int], Any],
    length: Callable[[Any], int],
) -> dict[str, Any]:
    """Stacks `X/block_NN/...` into `X/blocks/...` where `want` scans X; unstacks where `want` does not."""
    scanned = {p.split('/blocks/')[0] for p in want if '/blocks/' in p}
    unscanned = {m.group(1) for p in want if (m := _BLOCK.match(p))}
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for path, value in flat.items():
        block = _BLOCK.match(path)
        prefix, _, rest = path.partition('/blocks/')
        if block and block.group(1) in scanned:
            groups.setdefault(f'{block.group(1)}/blocks/{block.group(3)}', {})[int(block.group(2))] = value
        elif rest and prefix in unscanned:
            for i in range(length(value)):
                out[f'{prefix}/block_{i:02d}/{rest}'] = take(value, i)
        else:
            out[path] = value
    for path, items in groups.items():
        out[path] = stack([items[i] for i in sorted(items)])
    return out


def _shape_relayout(flat: Mapping[str, tuple[int, ...]], want: set[str]) -> dict[str, tuple[int, ...]]:
    return _relayout(flat, want, lambda xs: (len(xs), *xs[0]), lambda s, i: s[1:], lambda s: s[0])


def _check_fit(stored: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]], directory: str) -> None:
    missing = sorted(set(target) - set(stored))
    extra = sorted(set(stored) - set(target))
    common = sorted(set(stored) & set(target))
    mismatched = [f'{p}: stored {stored[p]}, wanted {target[p]}' for p in common if stored[p] != target[p]]
    problems = []
    for name, items in (('missing', missing), ('not in the target', extra), ('shape mismatch', mismatched)):
        if items:
            shown = ', '.join(items[:8]) + (f', ... ({len(items) - 8} more)' if len(items) > 8 else '')
            problems.append(f'{name} {len(items)}: {shown}')
    if problems:
        raise ValueError(f'params in {directory} do not fit the target: ' + ' | '.join(problems))


def save_params(directory: str | os.PathLike, params: Mapping[str, Any], metadata: dict) -> None:
    """Writes `params` (a nested dict of numpy or jax arrays) and `metadata` (JSON-serialisable) to `directory`.

    Refuses to overwrite an existing params checkpoint. Under multi-process JAX every process must call it
    (Orbax writes the shards each one holds); process 0 writes the metadata file.
    """
    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, PARAMS_SUBDIR)
    if os.path.exists(target):
        raise FileExistsError(f'{target} already exists; remove it or choose another directory')
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    text = json.dumps({**metadata, 'format': FORMAT, 'num_params': num_params}, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, dict(params))
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        temporary = os.path.join(directory, METADATA_FILE + '.tmp')
        with open(temporary, 'w') as f:
            f.write(text + '\n')
        os.replace(temporary, os.path.join(directory, METADATA_FILE))  # readers never see half a file


def read_metadata(directory: str | os.PathLike) -> dict:
    """The metadata that `save_params` wrote, without touching the arrays."""
    path = os.path.join(os.fspath(directory), METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{directory} is not a jaxssl params directory (no {METADATA_FILE})')
    with open(path) as f:
        return json.load(f)


def _restore_numpy(path: str, paths: list[str]) -> dict[str, Any]:
    """The stored params as host numpy arrays, wherever and on however many devices they were saved."""
    restore_args = traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths}, sep='/')
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_params(directory: str | os.PathLike, target_shapes: Any = None) -> tuple[dict[str, Any], dict]:
    """Restores params and metadata written by `save_params`.

    Without `target_shapes` the params come back as they were stored, as host numpy arrays. With a pytree of
    `jax.ShapeDtypeStruct` (or arrays) they come back in its structure, dtypes and, where given, shardings
    (scanned / unscanned layouts are converted); a tree that does not fit raises ValueError listing every
    missing, extra and mis-shaped parameter.
    """
    directory = os.path.abspath(os.fspath(directory))
    metadata = read_metadata(directory)
    path = os.path.join(directory, PARAMS_SUBDIR)
    with ocp.StandardCheckpointer() as checkpointer:
        info = checkpointer.metadata(path)
    info = getattr(getattr(info, 'item_metadata', info), 'tree', info)  # orbax 0.12 wraps the tree
    stored = {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(info, sep='/').items()}
    if target_shapes is None:
        return _restore_numpy(path, list(stored)), metadata
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target_shapes)
    names = ['/'.join(str(getattr(k, 'key', k)) for k in keys) for keys, _ in leaves]
    target = {n: leaf for n, (_, leaf) in zip(names, leaves, strict=True)}
    relaid = _shape_relayout(stored, set(target))
    _check_fit(relaid, {n: tuple(x.shape) for n, x in target.items()}, path)
    if relaid.keys() == stored.keys():
        with ocp.StandardCheckpointer() as checkpointer:  # same layout: straight onto the target's shardings
            return checkpointer.restore(path, target_shapes), metadata
    flat = _relayout(
        traverse_util.flatten_dict(_restore_numpy(path, list(stored)), sep='/'),
        set(target),
        np.stack,
        lambda x, i: x[i],
        len,
    )

    def place(name: str) -> Any:
        value = np.asarray(flat[name], dtype=target[name].dtype)
        sharding = getattr(target[name], 'sharding', None)
        return jax.device_put(value, sharding) if sharding is not None else value

    return jax.tree_util.tree_unflatten(treedef, [place(n) for n in names]), metadata


# ---- Partial loading for `init_from`: a params directory or a training workdir --------------------------------


def _tree_metadata(path: str) -> Any:
    with ocp.StandardCheckpointer() as checkpointer:
        info = checkpointer.metadata(path)
    return getattr(getattr(info, 'item_metadata', info), 'tree', info)  # orbax 0.12 wraps the tree


def stored_shapes(source: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict]:
    """({name: shape} of the params stored in a params directory or a workdir's latest checkpoint, metadata)."""
    path, prefix, metadata = _locate(os.fspath(source))
    info = _tree_metadata(path)
    for key in prefix:
        info = info[key]
    return {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(info, sep='/').items()}, metadata


def _locate(source: str, tree: str = 'params') -> tuple[str, tuple[str, ...], dict]:
    """(Orbax tree path, key path of the params (or with `tree='extra'`, of a workdir's method state) inside it,
    metadata) of a params directory or a workdir."""
    from etils import epath

    root = epath.Path(source)
    if (root / METADATA_FILE).exists():
        if tree != 'params':
            raise ValueError(f'{source} is a params directory: it holds params, not {tree}')
        return os.fspath(root / PARAMS_SUBDIR), (), read_metadata(source)
    if (root / 'checkpoints').is_dir():
        with ocp.CheckpointManager(os.fspath(root / 'checkpoints')) as manager:
            step = manager.latest_step()
        if step is None:
            raise ValueError(f'{source} is a training workdir without a finished checkpoint')
        return os.fspath(root / 'checkpoints' / str(step) / 'state'), (tree,), {'source': f'{source} step {step}'}
    raise ValueError(f'{source} is neither a params directory (no {METADATA_FILE}) nor a workdir (no checkpoints/)')


def _token_grids(stored: int, wanted: int, metadata: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(source, target) (T, H, W) grids of two learned position tables: square frames, the stored grid from the
    metadata when it says (frames / tubelet, image_size / patch), else the same number of temporal slices on both
    sides (8 first: the reference's 16 frames), else the same frame size."""
    import math

    def squares(n: int) -> dict[int, int]:  # temporal slices -> side
        return {t: s for t in range(1, n + 1) if n % t == 0 and (s := math.isqrt(n // t)) ** 2 * t == n}

    src, dst = squares(stored), squares(wanted)
    meta = [metadata.get(k) for k in ('frames', 'tubelet', 'image_size', 'patch')]
    if all(isinstance(v, int) and v > 0 for v in meta) and (meta[0] // meta[1]) in src:
        src = {meta[0] // meta[1]: src[meta[0] // meta[1]]}
    for t in sorted(set(src) & set(dst), key=lambda t: (t != 8, -t)):
        return (t, src[t], src[t]), (t, dst[t], dst[t])
    for t_src, side in src.items():
        for t_dst, side_dst in dst.items():
            if side == side_dst:
                return (t_src, side, side), (t_dst, side, side)
    raise ValueError(f'cannot tell the token grids of a {stored} -> {wanted} token position table')


def load_selected(
    source: str | os.PathLike, target_shapes: Any, select: tuple[str, ...] = ('.*',), tree: str = 'params'
) -> tuple[dict[str, Any], dict, list[str]]:
    """Restores the params of `target_shapes` whose names match a `select` regex from a params directory
    (`save_params`, python -m jaxssl.convert) or a training workdir (its latest Orbax checkpoint's params).

    Returns ({name: array} for the selected names, in the target's dtypes and shardings; metadata; notes). Scanned /
    unscanned layouts are converted; a learned position table ('.../pos_embed') of another token count is resampled
    (jaxssl.convert.videomae.resample_pos_embed). Stored params that are not selected are ignored, unless `select` is
    the default ('.*',), which asks for an exact fit. Raises ValueError listing every selected param that is missing
    or mis-shaped (and, for the exact fit, every stored param the target lacks). `tree='extra'` reads a workdir's
    method state (e.g. a codebook kept outside the params) instead.
    """
    path, prefix, metadata = _locate(os.fspath(source), tree)
    info = _tree_metadata(path)
    for key in prefix:
        info = info[key]
    stored = {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(info, sep='/').items()}
    leaves, _ = jax.tree_util.tree_flatten_with_path(target_shapes)
    target = {'/'.join(str(getattr(k, 'key', k)) for k in keys): leaf for keys, leaf in leaves}
    patterns = [re.compile(p) for p in select]
    chosen = [n for n in target if any(p.fullmatch(n) for p in patterns)]
    relaid = _shape_relayout(stored, set(target))
    exact = tuple(select) == ('.*',)
    missing = [n for n in chosen if n not in relaid]
    extra = sorted(set(relaid) - set(target)) if exact else []
    resample, mismatched = {}, []
    for name in chosen:
        have, want = relaid.get(name), tuple(target[name].shape)
        if have is None or have == want:
            continue
        if name.endswith('pos_embed') and len(have) == len(want) == 3 and have[::2] == want[::2]:
            try:
                resample[name] = _token_grids(have[1], want[1], metadata)
                continue
            except ValueError:
                pass
        mismatched.append(f'{name}: stored {have}, wanted {want}')
    problems = []
    for label, items in (('missing', missing), ('not in the target', extra), ('shape mismatch', mismatched)):
        if items:
            shown = ', '.join(items[:8]) + (f', ... ({len(items) - 8} more)' if len(items) > 8 else '')
            problems.append(f'{label} {len(items)}: {shown}')
    if problems:
        raise ValueError(f'params in {source} do not fit the selected target params: ' + ' | '.join(problems))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), info)
    for key in reversed(prefix):
        restore_args = {key: restore_args}
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            path, args=ocp.args.PyTreeRestore(item=restore_args, restore_args=restore_args, partial_restore=True)
        )
    for key in prefix:
        restored = restored[key]
    flat = _relayout(traverse_util.flatten_dict(restored, sep='/'), set(target), np.stack, lambda x, i: x[i], len)
    notes, out = [], {}
    for name in chosen:
        value = np.asarray(flat[name])
        if name in resample:
            from jaxssl.convert.videomae import resample_pos_embed

            value = resample_pos_embed(value, *resample[name])
            notes.append(f'{name} resampled from a {resample[name][0]} to a {resample[name][1]} token grid')
        value = value.astype(target[name].dtype)
        sharding = getattr(target[name], 'sharding', None)
        out[name] = jax.device_put(value, sharding) if sharding is not None else value
    return out, metadata, notes
