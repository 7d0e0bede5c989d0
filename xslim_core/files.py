"""Writing a file so that a crash, a second writer or a planted link never costs data."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool):
    """Yields a fresh, uniquely named temporary path in ``path``'s folder (created exclusively, so a pre-placed
    ``.tmp`` or link is never written through and two writers never share one); once the caller has written it,
    it takes ``path``'s place in one step. Without ``overwrite`` an existing file is kept: FileExistsError names it,
    also when the name appeared while the caller was writing."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting it (overwrite=True).")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
