"""Safe path resolution and the replace operation (atomic, nothing left on failure)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guest_init.ops import OP_APPLIERS, OpError, apply_replace, apply_step
from guest_init.plan import ReplaceStep
from guest_init.safepath import UnsafePath, resolve_in_root

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "usr" / "lib").mkdir(parents=True)
    return r


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------- safepath


def test_plain_paths(root: Path) -> None:
    assert resolve_in_root(root, "/etc/hostname") == root / "etc" / "hostname"
    assert resolve_in_root(root, "etc//./hostname") == root / "etc" / "hostname"
    assert resolve_in_root(root, "/") == root
    assert resolve_in_root(root, "/new/dir/file") == root / "new" / "dir" / "file"


@pytest.mark.parametrize("path", ["/../etc/passwd", "/etc/../../x", "..", "/etc/.."])
def test_dotdot_refused(root: Path, path: str) -> None:
    with pytest.raises(UnsafePath):
        resolve_in_root(root, path)


def test_nul_refused(root: Path) -> None:
    with pytest.raises(UnsafePath, match="NUL"):
        resolve_in_root(root, "/etc/a\0b")


def test_absolute_symlink_is_relative_to_root(root: Path) -> None:
    (root / "lib").symlink_to("/usr/lib")
    (root / "etc" / "resolv.conf").symlink_to("/run/resolvconf/resolv.conf")
    assert resolve_in_root(root, "/lib/libc.so") == root / "usr" / "lib" / "libc.so"
    # Dangling final symlink: its target inside root, even though it does not exist yet.
    assert resolve_in_root(root, "/etc/resolv.conf") == root / "run" / "resolvconf" / "resolv.conf"


def test_absolute_symlink_to_host_path_stays_inside(root: Path, tmp_path: Path) -> None:
    """A link to the host's real location of something still means root/<that>."""
    (root / "top").symlink_to("/")
    assert resolve_in_root(root, "/top/etc/passwd") == root / "etc" / "passwd"
    (root / "escape").symlink_to(str(tmp_path))
    assert resolve_in_root(root, "/escape/x") == root.joinpath(*tmp_path.parts[1:], "x")


def test_relative_symlink_inside_root_is_fine(root: Path) -> None:
    (root / "usr" / "lib64").symlink_to("lib")
    (root / "etc" / "alternatives").mkdir()
    (root / "etc" / "alternatives" / "editor").symlink_to("../../usr/lib/vi")
    assert resolve_in_root(root, "/usr/lib64/x") == root / "usr" / "lib" / "x"
    assert resolve_in_root(root, "/etc/alternatives/editor") == root / "usr" / "lib" / "vi"


@pytest.mark.parametrize("target", ["../../outside", "../../../../../../etc/passwd", "../.."])
def test_relative_symlink_escaping_refused(root: Path, target: str) -> None:
    (root / "etc" / "evil").symlink_to(target)
    with pytest.raises(UnsafePath, match="outside the root"):
        resolve_in_root(root, "/etc/evil/x")


def test_symlink_escaping_through_chain_refused(root: Path) -> None:
    (root / "a").symlink_to("etc/b")
    (root / "etc" / "b").symlink_to("../..")
    with pytest.raises(UnsafePath):
        resolve_in_root(root, "/a/x")


def test_symlink_loop_refused(root: Path) -> None:
    (root / "etc" / "a").symlink_to("b")
    (root / "etc" / "b").symlink_to("a")
    with pytest.raises(UnsafePath, match="too many levels"):
        resolve_in_root(root, "/etc/a")


# -------------------------------------------------------------------- replace


def test_replace_creates_file_and_parents(root: Path) -> None:
    old = os.umask(0o077)  # the modes must not depend on the umask
    try:
        details = apply_replace(root, ReplaceStep("/opt/app/conf/app.ini", b"x=1\n", 0o640, None, None))
    finally:
        os.umask(old)
    target = root / "opt" / "app" / "conf" / "app.ini"
    assert target.read_bytes() == b"x=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    for d in (root / "opt", root / "opt" / "app", root / "opt" / "app" / "conf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert details == {"op": "replace", "path": "/opt/app/conf/app.ini", "bytes": 4, "mode": "0640", "created": True}


def test_replace_existing_file(root: Path) -> None:
    target = root / "etc" / "hostname"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    inode = target.stat().st_ino
    details = apply_replace(root, ReplaceStep("/etc/hostname", b"web1\n", 0o644, None, None))
    assert target.read_text() == "web1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.stat().st_ino != inode  # renamed into place, not rewritten
    assert details["created"] is False and details["bytes"] == 5
    assert listing(root / "etc") == ["hostname"]


def test_replace_binary_content_and_setid_mode(root: Path) -> None:
    data = bytes(range(256)) * 1000
    apply_replace(root, ReplaceStep("/usr/lib/blob", data, 0o4755, None, None))
    target = root / "usr" / "lib" / "blob"
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o4755


def test_replace_ownership(root: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    apply_replace(root, ReplaceStep("/etc/owned", b"x", 0o644, uid, gid))
    st = (root / "etc" / "owned").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_replace_chown_and_keep_owner(root: Path) -> None:
    apply_replace(root, ReplaceStep("/etc/shadow", b"a", 0o640, 0, 42))
    target = root / "etc" / "shadow"
    assert (target.stat().st_uid, target.stat().st_gid) == (0, 42)
    os.chown(target, 7, 8)
    apply_replace(root, ReplaceStep("/etc/shadow", b"b", 0o640, None, None))
    assert (target.stat().st_uid, target.stat().st_gid) == (7, 8)  # None: keep
    apply_replace(root, ReplaceStep("/etc/shadow", b"c", 0o640, None, 9))
    assert (target.stat().st_uid, target.stat().st_gid) == (7, 9)


def test_replace_through_symlink_writes_inside_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host file\n")
    (root / "etc" / "resolv.conf").symlink_to(str(outside))  # absolute: means root/<outside>
    apply_replace(root, ReplaceStep("/etc/resolv.conf", b"nameserver 10.0.2.3\n", 0o644, None, None))
    assert outside.read_text() == "host file\n"
    assert root.joinpath(*outside.parts[1:]).read_text() == "nameserver 10.0.2.3\n"
    assert (root / "etc" / "resolv.conf").is_symlink()


def test_replace_escaping_symlink_is_op_error(root: Path, tmp_path: Path) -> None:
    (root / "etc" / "evil").symlink_to("../../")
    with pytest.raises(OpError, match=r"^/etc/evil/x: unsafe path") as info:
        apply_replace(root, ReplaceStep("/etc/evil/x", b"x", 0o644, None, None))
    assert info.value.path == "/etc/evil/x"
    assert not (tmp_path / "x").exists()


def test_replace_directory_target_fails_cleanly(root: Path) -> None:
    (root / "etc" / "conf.d").mkdir()
    with pytest.raises(OpError, match="is a directory"):
        apply_replace(root, ReplaceStep("/etc/conf.d", b"x", 0o644, None, None))
    assert listing(root / "etc") == ["conf.d"]
    assert listing(root / "etc" / "conf.d") == []


def test_replace_failure_leaves_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the temporary file exists removes it and the parents it made."""
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OpError, match="Input/output error"):
        apply_replace(root, ReplaceStep("/srv/www/index.html", b"x", 0o644, None, None))
    assert listing(root) == ["etc", "usr"]
    (root / "etc" / "hosts").write_text("old\n")
    with pytest.raises(OpError):
        apply_replace(root, ReplaceStep("/etc/hosts", b"new\n", 0o644, None, None))
    assert listing(root / "etc") == ["hosts"]
    assert (root / "etc" / "hosts").read_text() == "old\n"


def test_replace_parent_is_a_file(root: Path) -> None:
    (root / "etc" / "hostname").write_text("x")
    with pytest.raises(OpError, match="^/etc/hostname/sub: cannot replace"):
        apply_replace(root, ReplaceStep("/etc/hostname/sub", b"x", 0o644, None, None))
    assert listing(root / "etc") == ["hostname"]


def test_dispatch_through_registry(root: Path) -> None:
    step = ReplaceStep("/etc/hostname", b"h\n", 0o644, None, None)
    assert OP_APPLIERS[step.op] is apply_replace
    assert apply_step(root, step)["path"] == "/etc/hostname"
    assert (root / "etc" / "hostname").read_bytes() == b"h\n"
