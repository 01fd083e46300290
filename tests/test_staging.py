"""Transactional output folders (ant_dist/runtime/staging.py): the swap, its two-rename fallback and the
recovery from a crash between those renames, and the lock that follows the swap."""

import os

import pytest

from ant_dist.runtime import staging
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock


def _tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.mark.parametrize("atomic", [True, False])
def test_commit_replaces_the_folder_whole_and_keeps_it_locked(tmp_path, monkeypatch, atomic):
    if not atomic:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    with exclusive_dir_lock(final, "writer"):
        (final / "old-only").write_bytes(b"1")
        (final / "both").write_bytes(b"old")
        work = staging.begin(final)
        (work / "both").write_bytes(b"new")
        assert _tree(final) == {"old-only": b"1", "both": b"old"}  # untouched until the commit
        staging.commit(final, work)
        assert _tree(final) == {"both": b"new"}
        # whoever opens the folder's lock now meets the one still held
        with pytest.raises(LockedError):
            exclusive_dir_lock(final, "second").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with exclusive_dir_lock(final, "third"):
        pass


def test_a_crash_between_the_fallback_renames_is_undone_by_the_next_begin(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "good").write_bytes(b"good")
    os.rename(final, tmp_path / ".out.old")  # the first rename happened, then the crash
    with exclusive_dir_lock(final, "writer"):
        work = staging.begin(final)
        assert _tree(final) == {"good": b"good"}
        staging.abort(work)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
