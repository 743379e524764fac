"""Workdir paths that may be local or on object storage (`gs://bucket/run`), through etils.epath.

Local paths are made absolute. Remote paths keep their scheme and go through epath's backends: fsspec (gcsfs for
`gs://`, from the `gcs` extra: `pip install "jaxssl[gcs]"`) or, when TensorFlow is installed, tf.io.gfile. Orbax
uses the same paths for its metadata and TensorStore (built in, no extra needed) for array data.
"""

from __future__ import annotations

import os

from etils import epath

# The schemes etils.epath knows; anything else with '://' is refused with a clear message.
REMOTE_SCHEMES = ('gs', 's3', 'az', 'hf')


def is_remote(path: str | os.PathLike) -> bool:
    """True for `gs://...` and the other object-store URLs epath supports; ValueError for unknown schemes."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition('://')
    if not sep:
        return False
    if scheme not in REMOTE_SCHEMES:
        known = ', '.join(f'{s}://' for s in REMOTE_SCHEMES)
        raise ValueError(f"unsupported path scheme '{scheme}://' in {text} (local paths or {known})")
    return True


def resolve(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: remote URLs as they are, local paths expanded (~) and made absolute."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: str | os.PathLike, *parts: str) -> str:
    """`path/part/...` as a string (`gs://bucket/run/checkpoints`, or an absolute local path)."""
    return os.fspath(resolve(path).joinpath(*parts))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a whole file, local or remote, creating its folder. Local files are replaced atomically."""
    target = resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)  # an object upload: readers see the old or the new object, never a partial one
        return
    temporary = target.parent / f'.{target.name}.tmp'
    temporary.write_text(text)
    os.replace(temporary, target)


def read_text(path: str | os.PathLike) -> str | None:
    """The file's text, or None if it does not exist."""
    target = resolve(path)
    return target.read_text() if target.exists() else None
