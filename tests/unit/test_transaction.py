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

    assert result == {"files": 3, "deleted": 1, "file_systems": ["/"]}
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
