"""Writing a file so that a crash, a second writer or a planted link never costs data."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def fresh_temporary(folder: str, name: str, mode: int | None = None):
    """Yields a new, uniquely named, exclusively created temporary file path in ``folder`` (hidden, named after
    ``name``), removed at the end unless the caller moved it away. ``mode``: the permissions it gets (mkstemp makes
    it private) once written, before the caller moves it into place. The one way this pack makes a file appear
    whole: write here, then move or link into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool, mode: int | None = None):
    """Yields a fresh, uniquely named temporary path in ``path``'s folder (created exclusively, so a pre-placed
    ``.tmp`` or link is never written through and two writers never share one); once the caller has written it,
    it takes ``path``'s place in one step. Without ``overwrite`` an existing file is kept: FileExistsError names it,
    also when the name appeared while the caller was writing."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting it (overwrite=True).")
    with fresh_temporary(os.path.dirname(os.path.abspath(path)), os.path.basename(path)) as tmp:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
