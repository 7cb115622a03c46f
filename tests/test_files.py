"""Atomic writes: a file appears whole, with the umask's permissions, or not at all."""
import os
import stat

import pytest

from robust_resnets.files import atomic_path, write_text


def test_write_text_replaces_whole_files_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text('first', tmp_path / 'sub' / 'result.json')
        assert path.read_text() == 'first'
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's owner-only 0o600
        write_text('second', path)
        assert path.read_text() == 'second'
    finally:
        os.umask(old)
    assert sorted(p.name for p in path.parent.iterdir()) == ['result.json']  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = write_text('kept', tmp_path / 'result.json')
    with pytest.raises(RuntimeError, match='disk full'):
        with atomic_path(path) as tmp:
            tmp.write_text('half')
            raise RuntimeError('disk full')
    assert path.read_text() == 'kept'
    assert [p.name for p in tmp_path.iterdir()] == ['result.json']


def test_temporaries_keep_the_suffix_and_a_killed_writers_leftovers_go(tmp_path):
    import numpy as np

    leftover = tmp_path / '.cache.npz.k1ll3d.tmp.npz'  # what a writer killed mid-save leaves
    leftover.write_bytes(b'partial')
    with atomic_path(tmp_path / 'cache.npz') as tmp:
        np.savez(tmp, a=np.arange(3))  # numpy adds .npz to a path that lacks it
    assert np.load(tmp_path / 'cache.npz')['a'].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, 'cache.npz']  # another writer's, maybe
    with atomic_path(tmp_path / 'cache.npz', sole_writer=True) as tmp:
        np.savez(tmp, a=np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ['cache.npz']
