"""The class-folder layout every modality's folder source reads: root/<class>/.../<file>."""

from __future__ import annotations

import os


def class_folder_files(root: str, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[str, int]]]:
    """(the sorted class names (root's sub-folders), [(path, label)] of the files whose names end in one of
    `extensions`, any case). Nested folders are walked in sorted order, so the index is deterministic; labels
    index the class names."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()  # os.walk order is filesystem order
            files += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(extensions)]
    return classes, files
