"""The apply stage's transaction: nothing changes until commit, and a crash anywhere converges."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_init import transaction as txn_mod
from guest_init.transaction import TXN_DIR, Transaction, TransactionError, recover

pytestmark = pytest.mark.unit


def _tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "hostname").write_bytes(b"old\n")
    (r / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    (r / "etc" / "gone").write_bytes(b"delete me\n")
    (r / "usr").mkdir()
    return r


def test_nothing_changes_before_commit_and_everything_after(root: Path) -> None:
    before = _tree(root)
    txn = Transaction(root)
    assert txn.write("/etc/hostname", b"web1\n") is False
    assert txn.write("/etc/new/deep/file", b"x", mode=0o600) is True
    txn.delete("/etc/gone")
    txn.symlink("/etc/link", "hostname")
    assert txn.read("/etc/hostname") == b"web1\n"
    assert txn.lookup("/etc/gone") is None
    assert _tree(root) == before

    result = txn.commit()

    assert result == {"files": 3, "dirs": 0, "deleted": 1, "file_systems": ["/"]}
    after = _tree(root)
    assert after["etc/hostname"] == b"web1\n"
    assert after["etc/new/deep/file"] == b"x"
    assert (root / "etc/new/deep/file").stat().st_mode & 0o777 == 0o600
    assert after["etc/link"] == "-> hostname"
    assert "etc/gone" not in after
    assert not (root / TXN_DIR).exists()


def test_failure_while_staging_leaves_target_untouched(root: Path, monkeypatch) -> None:
    before = _tree(root)
    txn = Transaction(root)
    txn.write("/etc/hostname", b"web1\n")
    txn.write("/etc/hosts", b"changed\n")
    real = txn_mod._write_json

    def crash(path, doc):
        if path.name == txn_mod.MARKER:
            raise OSError(28, "No space left on device")
        return real(path, doc)

    monkeypatch.setattr(txn_mod, "_write_json", crash)
    with pytest.raises(OSError):
        txn.commit()
    monkeypatch.undo()
    assert recover(root) == "rolled back"
    assert _tree(root) == before
    assert not (root / TXN_DIR).exists()


def test_crash_after_the_commit_point_rolls_forward(root: Path, monkeypatch) -> None:
    txn = Transaction(root)
    txn.write("/etc/hostname", b"web1\n")
    txn.write("/etc/hosts", b"changed\n")
    txn.delete("/etc/gone")
    calls = {"n": 0}
    real_replace = os.replace

    def power_cut(src, dst):
        # The first staged rename happens, then the "power" goes.
        if TXN_DIR in str(src) and not str(src).endswith(".tmp"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(txn_mod.os, "replace", power_cut)
    with pytest.raises(KeyboardInterrupt):
        txn.commit()
    monkeypatch.undo()
    half = _tree(root)
    assert half["etc/hostname"] == b"web1\n" and half["etc/hosts"] == b"127.0.0.1 localhost\n"

    assert recover(root) == "rolled forward"
    after = _tree(root)
    assert after["etc/hostname"] == b"web1\n"
    assert after["etc/hosts"] == b"changed\n"
    assert "etc/gone" not in after
    assert recover(root) is None


def test_several_file_systems_commit_together(root: Path) -> None:
    txn = Transaction(root, ["/", "/usr"])
    txn.write("/etc/hostname", b"a\n")
    txn.write("/usr/share/x", b"b\n")
    result = txn.commit()
    assert result["file_systems"] == ["/", "/usr"]
    assert (root / "usr/share/x").read_bytes() == b"b\n"
    assert not (root / "usr" / TXN_DIR).exists() and not (root / TXN_DIR).exists()


def test_paths_leaving_the_root_are_refused(root: Path) -> None:
    (root / "etc" / "escape").symlink_to("../../..")
    txn = Transaction(root)
    with pytest.raises(TransactionError):
        txn.write("/etc/escape/passwd", b"x")
    with pytest.raises(TransactionError):
        txn.write("/../etc/passwd", b"x")


def test_patch_style_round_trip_through_a_scratch_tree(root: Path, tmp_path: Path) -> None:
    txn = Transaction(root)
    txn.write("/etc/hostname", b"staged\n")
    scratch = tmp_path / "scratch"
    txn.materialize(["/etc/hostname", "/etc/hosts", "/etc/missing"], scratch)
    assert (scratch / "etc/hostname").read_bytes() == b"staged\n"
    (scratch / "etc/hosts").write_bytes(b"patched\n")
    (scratch / "etc/hostname").unlink()
    (scratch / "etc/missing").write_bytes(b"created\n")
    changed = txn.absorb(["/etc/hostname", "/etc/hosts", "/etc/missing"], scratch)
    assert sorted(changed) == ["/etc/hostname", "/etc/hosts", "/etc/missing"]
    txn.commit()
    assert not (root / "etc/hostname").exists()
    assert (root / "etc/hosts").read_bytes() == b"patched\n"
    assert (root / "etc/missing").read_bytes() == b"created\n"


# -- directories, whole trees, and a crash at every point of the commit ------------------------


class PowerCut(BaseException):
    """Raised by a checkpoint: the commit stops there, as at a power cut."""


def _full_tree(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` with its kind, mode and content (files) or target (symlinks)."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", oct(st.st_mode & 0o7777))
        else:
            out[rel] = ("file", oct(st.st_mode & 0o7777), path.read_bytes())
    return out


def _two_fs_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("etc/conf.d", "opt/old/deep", "opt/dir-to-file", "usr/share/doc", "usr/lib"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_bytes(b"old\n")
    (root / "etc/conf.d/a").write_bytes(b"a\n")
    (root / "opt/old/deep/f").write_bytes(b"f\n")
    (root / "opt/dir-to-file/x").write_bytes(b"x\n")
    (root / "opt/file-to-dir").write_bytes(b"was a file\n")
    (root / "usr/share/doc/readme").write_bytes(b"doc\n")
    (root / "usr/lib/gone").write_bytes(b"gone\n")
    return root


def _stage_everything(txn: Transaction) -> None:
    txn.write("/etc/hostname", b"web1\n")
    txn.write("/etc/new/file", b"new\n", mode=0o600)
    txn.mkdir("/etc/conf.d", 0o750, opaque=True)          # emptied, then one new entry
    txn.write("/etc/conf.d/b", b"b\n")
    txn.delete("/opt/old", tree=True)
    txn.changes[txn.guest("/opt/dir-to-file")] = txn_mod.Change("file", b"now a file\n", mode=0o644)
    txn.mkdir("/opt/file-to-dir", 0o755)
    txn.symlink("/opt/file-to-dir/link", "../../etc/hostname")
    txn.write("/usr/share/doc/readme", b"doc 2\n")
    txn.delete("/usr/lib/gone")
    txn.mkdir("/usr/lib", 0o700)                          # a mode change only


def _expected_after(before: dict) -> dict:
    after = {k: v for k, v in before.items()
             if not k.startswith(("opt/old", "opt/dir-to-file/", "etc/conf.d/")) and k != "usr/lib/gone"}
    after.update({
        "etc/hostname": ("file", "0o644", b"web1\n"),
        "etc/new": ("dir", "0o755"),
        "etc/new/file": ("file", "0o600", b"new\n"),
        "etc/conf.d": ("dir", "0o750"),
        "etc/conf.d/b": ("file", "0o644", b"b\n"),
        "opt/dir-to-file": ("file", "0o644", b"now a file\n"),
        "opt/file-to-dir": ("dir", "0o755"),
        "opt/file-to-dir/link": ("link", "../../etc/hostname"),
        "usr/share/doc/readme": ("file", "0o644", b"doc 2\n"),
        "usr/lib": ("dir", "0o700"),
    })
    return after


def test_directories_trees_and_replacements_commit(tmp_path: Path) -> None:
    root = _two_fs_root(tmp_path)
    before = _full_tree(root)
    txn = Transaction(root, ["/", "/usr"])
    _stage_everything(txn)
    assert txn.lookup("/opt/old/deep/f") is None            # hidden by the staged tree deletion
    assert txn.lookup("/etc/conf.d/a") is None              # hidden by the opaque directory
    assert txn.read("/etc/conf.d/b") == b"b\n"
    assert _full_tree(root) == before

    summary = txn.commit()

    assert summary == {"files": 6, "dirs": 3, "deleted": 2, "file_systems": ["/", "/usr"]}
    assert _full_tree(root) == _expected_after(before)


@pytest.mark.parametrize("point,calls,expected", [
    ("prepared", 1, "before"),
    ("marked", 1, "after"),
    ("renamed", 1, "after"),     # the first entry of the first file system in place
    ("renamed", 2, "after"),     # the first file system done, the second one started
])
def test_a_power_cut_at_any_point_converges(tmp_path: Path, point: str, calls: int, expected: str) -> None:
    root = _two_fs_root(tmp_path)
    before = _full_tree(root)
    after = _expected_after(before)
    seen: list[str] = []

    def checkpoint(name: str) -> None:
        seen.append(name)
        if name == point and seen.count(name) == calls:
            raise PowerCut(name)

    txn = Transaction(root, ["/", "/usr"], checkpoint=checkpoint)
    _stage_everything(txn)
    with pytest.raises(PowerCut):
        txn.commit()
    assert txn.marked is (expected == "after")

    assert recover(root, ["/", "/usr"]) == ("rolled back" if expected == "before" else "rolled forward")
    assert _full_tree(root) == (before if expected == "before" else after)
    assert recover(root, ["/", "/usr"]) is None


def test_a_power_cut_during_recovery_still_converges(tmp_path: Path) -> None:
    root = _two_fs_root(tmp_path)
    after = _expected_after(_full_tree(root))

    def cut_at_first_rename(name: str) -> None:
        if name == "renamed":
            raise PowerCut(name)

    txn = Transaction(root, ["/", "/usr"], checkpoint=cut_at_first_rename)
    _stage_everything(txn)
    with pytest.raises(PowerCut):
        txn.commit()
    # The next boot's recovery is cut too, after its own first entry ...
    with pytest.raises(PowerCut):
        txn_mod._roll_forward(root, cut_at_first_rename)
    # ... and the one after that finishes the job.
    assert recover(root, ["/", "/usr"]) == "rolled forward"
    assert _full_tree(root) == after


def test_checkpoints_come_in_commit_order(tmp_path: Path) -> None:
    root = _two_fs_root(tmp_path)
    seen: list[str] = []
    txn = Transaction(root, ["/", "/usr"], checkpoint=seen.append)
    _stage_everything(txn)
    txn.commit()
    assert seen == ["prepared", "marked", "renamed", "renamed"]


def test_deleting_a_directory_needs_tree_and_never_a_mount_point(root: Path) -> None:
    txn = Transaction(root, ["/", "/usr"])
    with pytest.raises(TransactionError, match="is a directory"):
        txn.delete("/etc")
    with pytest.raises(TransactionError, match="mounted"):
        txn.delete("/usr", tree=True)
    txn.write("/etc/sub/new", b"x")
    txn.delete("/etc", tree=True)
    assert txn.changes == {"/etc": txn_mod.Change("delete")}   # what was staged below went with it
