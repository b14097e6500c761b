"""fastbert.atomic: the whole file or directory or the old one, never half; the permissions of an ordinary new one."""

from __future__ import annotations

import os
import stat

import pytest

from fastbert.atomic import open_atomic, replace_directory, write_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "f.bin", b"data")
        with open(tmp_path / "plain.bin", "wb") as f:  # what an ordinary write gives
            f.write(b"data")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "f.bin").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.json"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_a_streamed_write_appears_whole_at_the_end_or_not_at_all(tmp_path):
    target = tmp_path / "ids.txt"
    with open_atomic(target, "w", encoding="utf-8") as f:
        f.write("1 2 3\n")
        assert not target.exists()  # nothing under the name until the block ends
        f.write("4 5\n")
    assert target.read_text() == "1 2 3\n4 5\n"
    with pytest.raises(RuntimeError, match="stop"), open_atomic(target) as f:
        f.write(b"half")
        raise RuntimeError("stop")
    assert target.read_text() == "1 2 3\n4 5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]


def test_replace_directory_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "shards"
    target.mkdir()
    (target / "old-0.npy").write_bytes(b"old")
    new = tmp_path / ".shards.partial"
    new.mkdir(mode=0o700)
    (new / "new-0.npy").write_bytes(b"new")
    replace_directory(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["new-0.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # the old one is gone, nothing left aside
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask


def _directory(path, content: bytes):
    path.mkdir()
    (path / "MANIFEST.json").write_bytes(content)
    return path


def test_replace_directory_with_aside_always_leaves_a_whole_copy_where_a_reader_looks(tmp_path, monkeypatch):
    """With ``aside`` (finetune's OUT/.state-old): a crash between the two renames leaves the old directory whole
    at ``aside``; a later swap that crashes before its rename keeps it there, and one that succeeds removes it.
    ``finetune.find_state`` finds whichever copy is left."""
    import fastbert.atomic
    from fastbert.train.finetune import find_state

    target, aside = tmp_path / "state", tmp_path / ".state-old"
    _directory(target, b"old")
    real_replace, calls = os.replace, []

    def crash_at(n):
        def replace(src, dst):
            calls.append((src, dst))
            if len(calls) == n:
                raise OSError("crash")
            real_replace(src, dst)

        calls.clear()
        monkeypatch.setattr(fastbert.atomic.os, "replace", replace)

    crash_at(2)  # the old one has moved aside; the new one never arrives
    with pytest.raises(OSError, match="crash"):
        replace_directory(_directory(tmp_path / "new1", b"new1"), target, aside=aside)
    assert not target.exists() and (aside / "MANIFEST.json").read_bytes() == b"old"
    assert find_state(tmp_path) == aside
    crash_at(1)  # nothing to move aside: the only whole copy stays where it is until the new one is in
    with pytest.raises(OSError, match="crash"):
        replace_directory(_directory(tmp_path / "new2", b"new2"), target, aside=aside)
    assert (aside / "MANIFEST.json").read_bytes() == b"old" and find_state(tmp_path) == aside
    monkeypatch.setattr(fastbert.atomic.os, "replace", real_replace)
    replace_directory(_directory(tmp_path / "new3", b"new3"), target, aside=aside)
    assert (target / "MANIFEST.json").read_bytes() == b"new3" and not aside.exists()
    assert find_state(tmp_path) == target
    replace_directory(_directory(tmp_path / "new4", b"new4"), target, aside=aside)  # the old one goes through aside
    assert (target / "MANIFEST.json").read_bytes() == b"new4" and not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new1", "new2", "state"]  # the two that never went in
