"""Writing safetensors files so that a crash, a second writer or a planted link never costs data."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from xslim_core.files import atomic_path


def save_atomic(tensors: dict, path: str, metadata: dict | None = None, overwrite: bool = True) -> None:
    """Write a safetensors file through ``xslim_core.files.atomic_path`` (a fresh exclusive temporary file moved
    into place; an existing file kept unless ``overwrite``), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, overwrite) as tmp:
        save_file(tensors, tmp, metadata=metadata)
