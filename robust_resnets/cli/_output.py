"""Checks shared by the subcommands that write an ``--out`` file (not a subcommand itself)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ['check_out']


def check_out(out: Optional[str], *, overwrite: bool, example: str = 'results.json') -> None:
    """Refuses an --out that cannot take the output: a directory, an existing file (unless overwrite), a bad folder.

    Args:
        out: The --out value (None: nothing is written).
        overwrite: Whether --overwrite was given.
        example: File name suggested when ``out`` is a directory.

    Raises:
        ValueError: ``out`` cannot be written; the message says what to pass instead.
    """
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ValueError(f'--out {out} is a directory; give the file to write, e.g. --out {path / example}.')
    if path.exists() and not overwrite:
        raise ValueError(f'{out} already exists; pass --overwrite or choose another --out.')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'Cannot create the folder of --out {out} ({e.strerror}); choose another --out.') from None
