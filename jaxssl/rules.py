"""Regex rules over parameter names: one mechanism for weight-decay masks, lr multipliers and sharding.

A parameter's name is its pytree path joined by '/', e.g. 'encoder/block_03/attn/qkv/kernel'. A rule list is
a sequence of (regex, value); the first regex that fully matches a name gives the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

Rules = Sequence[tuple[str, Any]]


def path_name(path: tuple) -> str:
    """'a/b/0/c' from a jax tree path."""
    parts = []
    for entry in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return '/'.join(parts)


def first_match(rules: Rules, name: str, default: Any = None) -> Any:
    for pattern, value in rules:
        if re.fullmatch(pattern, name):
            return value
    return default


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Maps fn(name, leaf) over a pytree."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_name(path), leaf), tree)


def is_scanned(name: str) -> bool:
    """Parameters of scanned layer stacks carry a leading layer axis (see jaxssl.models.vit.Transformer)."""
    return '/blocks/' in f'/{name}/'
