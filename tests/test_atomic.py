import os
import stat

import pytest

from cmboost.files.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def _usual_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_atomic_path_replaces_target_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # the folder does not exist yet
    with atomic_path(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".png") and tmp.is_file()
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == _usual_mode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


@pytest.mark.parametrize("helper", ["path", "open"])
def test_exception_keeps_old_target_and_leaves_no_temp(tmp_path, helper):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        if helper == "path":
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise RuntimeError("boom")
        else:
            with atomic_open(target, "w") as fh:
                fh.write("half")
                raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_open_closes_before_rename(tmp_path):
    with atomic_open(tmp_path / "a.bin") as fh:
        fh.write(b"\x00\x01")
    assert fh.closed
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "b.bin", "rb"):
            pass
    assert not (tmp_path / "b.bin").exists()


def test_text_and_bytes_round_trip(tmp_path):
    text = "ünïcode\nline 2\n"
    data = bytes(range(256))
    assert atomic_write_text(tmp_path / "t.txt", text) == tmp_path / "t.txt"
    atomic_write_bytes(tmp_path / "b.bin", data)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == text
    assert (tmp_path / "b.bin").read_bytes() == data
    atomic_write_text(tmp_path / "t.txt", "replaced")  # overwrites an existing file
    assert (tmp_path / "t.txt").read_text() == "replaced"
