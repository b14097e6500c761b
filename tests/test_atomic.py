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
