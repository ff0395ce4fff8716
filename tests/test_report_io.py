"""Reports are written whole or not at all, with the file mode a user expects (umask, existing mode, symlinks)."""

import os
import stat
from pathlib import Path

import pytest
from conftest import cannot_create_in

from attnkit.errors import UserError
from attnkit.common import io as report_io
from attnkit.common.io import check_writable, write_atomic, write_json


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_gets_the_umask_mode_like_open(tmp_path, umask, mask, expected):
    umask(mask)
    with open(tmp_path / "by_open.txt", "w") as f:  # what the user's shell or editor would give
        f.write("x")
    write_atomic(tmp_path / "report.json", "{}\n")
    assert _mode(tmp_path / "report.json") == expected == _mode(tmp_path / "by_open.txt")


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "report.html"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_atomic(target, "<p>new</p>")
    assert target.read_text() == "<p>new</p>"
    assert _mode(target) == 0o640


def test_symlink_is_written_through_and_stays_a_link(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "report.json"
    real.write_text("old")
    os.chmod(real, 0o604)
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    write_json({"a": 1}, str(link))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == '{\n  "a": 1\n}\n'
    assert _mode(real) == 0o604
    assert sorted(p.name for p in real_dir.iterdir()) == ["report.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old report")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_io.os, "fsync", broken_fsync)
    with pytest.raises(UserError, match="No space left on device"):
        write_atomic(target, "new report " * 1000)
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old report")
    monkeypatch.setattr(report_io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new report")
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_bytes_are_written_as_they_are(tmp_path):
    data = bytes(range(256))
    write_atomic(tmp_path / "grid.png", data)
    assert (tmp_path / "grid.png").read_bytes() == data


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a directory"),
    (lambda d: (d / "file.txt").write_text("x") and d / "file.txt" / "out.json", "is a file, not a directory"),
    (lambda d: d / "no" / "such" / "out.json", "does not exist"),
])
def test_unwritable_targets_are_refused_before_the_run(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        check_writable(make(tmp_path), "--json")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write read-only files")
def test_read_only_file_and_directory_are_refused(tmp_path):
    ro_file = tmp_path / "ro.json"
    ro_file.write_text("x")
    os.chmod(ro_file, 0o444)
    with pytest.raises(UserError, match="read-only"):
        check_writable(ro_file, "--json")
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    try:
        with pytest.raises(UserError, match="cannot be written"):
            check_writable(ro_dir / "out.json", "--json")
    finally:
        os.chmod(ro_dir, 0o755)


@pytest.mark.skipif(not (os.path.isdir("/sys") and cannot_create_in("/sys")), reason="needs a directory nobody may write (/sys)")
def test_a_directory_that_refuses_new_files_is_refused(tmp_path):
    # /sys refuses new files even to root (read-only or a pseudo filesystem): the probe must see it.
    with pytest.raises(UserError, match=r"--html /sys/report.html cannot be written"):
        check_writable("/sys/report.html", "--html")
