"""Writing safetensors files so that a crash, a second writer or a planted link never costs data."""

from __future__ import annotations

import os
import tempfile

from safetensors.torch import save_file


def save_atomic(tensors: dict, path: str, metadata: dict | None = None, overwrite: bool = True) -> None:
    """Write ``path`` through a fresh, uniquely named temporary file in the same folder (created exclusively,
    so a pre-placed ``.tmp`` or link is never written through, and two writers never share one), then move it
    into place in one step. Without ``overwrite`` an existing file is kept and FileExistsError names it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting it.")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # refuses a name that appeared meanwhile
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
