"""Writing files whole or not at all: results, checkpoints, caches and weights never appear half-written."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ['atomic_path', 'write_text', 'give_umask_permissions']

PathLike = Union[str, os.PathLike]


def give_umask_permissions(path: PathLike) -> None:
    """Sets the permissions an ordinary ``open(path, 'w')`` would give (``0o666`` less the umask).

    Temporary files (and safetensors' own output) are created owner-only; a result, a checkpoint or a
    weights file is meant to be read like any other file the process creates.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, sole_writer: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the whole file to; it replaces ``path`` when the block ends.

    On success the file is flushed to disk, given the umask's permissions and renamed over ``path``
    (an atomic step: readers see the old file or the new one). On an exception the temporary file is
    removed and ``path`` stays as it was. The folder is created if needed. The temporary name ends
    with ``path``'s suffix, for writers that add one (``np.savez``).

    Args:
        path: The file to write.
        sole_writer: No other process writes ``path``: temporaries that killed writers left beside it
            (e.g. a checkpoint-sized one) are removed after the rename.

    Example::

        with atomic_path('out/result.json') as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f'.{path.name}.', f'.tmp{path.suffix}'
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        give_umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    if sole_writer:
        for stale in path.parent.glob(f'{glob.escape(prefix)}*{glob.escape(suffix)}'):
            stale.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(text: str, path: PathLike) -> Path:
    """Writes a UTF-8 text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')
    return Path(path)
