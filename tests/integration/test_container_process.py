"""Container processing in dom0 against real archives, images and loopback servers.

Every expression runs through ``supercharge container`` (in process, through
``dom0.cli.main``, so the exit codes and messages are the CLI's) on real
files: base archives are made by GNU cpio, results are read back both with
``guest_init.archive`` and with GNU cpio, images are made by mkfs and checked
by loop-mounting them read-only or with ``debugfs``, patches stored by
``patch-out`` are applied with GNU ``patch``.  Archives and patches are served
by the HTTP and FTP servers of conftest.py, on 127.0.0.1.

Loop mounts and owners need root: the module is skipped otherwise.
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dom0.cli import main as supercharge_main
from dom0.store import clear_fetch_cache
from dom0.xlcfg import parse_disk_spec, parse_xl_config
from guest_init.archive import extract_archive, list_archive
from guest_init.devices import read_fs_identity
from guest_init.plan import CopyStep, HookStep, PatchStep, ReplaceStep, load_plan

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts and file owners need root"),
]

for _tool in ("cpio", "mkfs.ext4", "debugfs", "patch"):
    if shutil.which(_tool) is None:  # pragma: no cover - depends on the machine
        pytestmark.append(pytest.mark.skip(reason=f"{_tool} not installed"))

MTIME = 1_600_000_000          # 2020-09-13: every file of the base tree has this mtime
FIDO_UID = 1000
SHADOW_GID = 42

PASSWD = (b"root:x:0:0:root:/root:/bin/bash\n"
          b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          b"fido:x:1000:1000:Fido:/home/fido:/bin/sh\n")
GROUP = b"root:x:0:\ndaemon:x:1:\nshadow:x:42:\nfido:x:1000:\n"

# Adds the account "web" to /etc/passwd and /etc/group of an /etc archive (paths a/passwd).
ACCOUNTS_PATCH = b"""\
--- a/passwd
+++ b/passwd
@@ -1,3 +1,4 @@
 root:x:0:0:root:/root:/bin/bash
 daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
 fido:x:1000:1000:Fido:/home/fido:/bin/sh
+web:x:1001:1001:Web:/srv/web:/bin/sh
--- a/group
+++ b/group
@@ -2,3 +2,4 @@
 daemon:x:1:
 shadow:x:42:
 fido:x:1000:
+web:x:1001:
"""
PASSWD_PATCHED = PASSWD + b"web:x:1001:1001:Web:/srv/web:/bin/sh\n"
GROUP_PATCHED = GROUP + b"web:x:1001:\n"

# A patch whose only hunk cannot fit: it removes a line the file does not have.
BAD_PATCH = b"""\
--- a/passwd
+++ b/passwd
@@ -1,3 +1,3 @@
 root:x:0:0:root:/root:/bin/bash
-nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
+web:x:1001:1001:Web:/srv/web:/bin/sh
 fido:x:1000:1000:Fido:/home/fido:/bin/sh
"""


@pytest.fixture(autouse=True)
def _fresh_fetch_cache() -> Iterator[None]:
    """Each test is one invocation: dom0.store's per-process cache starts empty."""
    clear_fetch_cache()
    yield
    clear_fetch_cache()


# -- building inputs -------------------------------------------------------------------


def make_etc(root: Path) -> Path:
    """An /etc-like tree with owners, modes, a private directory and symlinks."""
    files: dict[str, tuple[bytes, int, int, int]] = {
        "HOSTNAME": (b"oldname\n", 0o644, 0, 0),
        "hosts": (b"127.0.0.1\tlocalhost\n", 0o644, 0, 0),
        "passwd": (PASSWD, 0o644, 0, 0),
        "group": (GROUP, 0o644, 0, 0),
        "shadow": (b"root:*:19000:0:99999:7:::\n", 0o640, 0, SHADOW_GID),
        "motd": (b"Welcome\n", 0o644, 0, 0),
        "ssl/private/site.key": (b"-----BEGIN KEY-----\n", 0o600, 0, SHADOW_GID),
        "fido/notes.txt": (b"fido's file\n", 0o600, FIDO_UID, FIDO_UID),
        "init.d/rc": (b"#!/bin/sh\nexit 0\n", 0o755, 0, 0),
    }
    for rel, (data, mode, uid, gid) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    os.chown(root / "ssl" / "private", 0, SHADOW_GID)
    os.chmod(root / "ssl" / "private", 0o710)
    os.chown(root / "fido", FIDO_UID, FIDO_UID)
    os.chmod(root / "fido", 0o750)
    os.symlink("/usr/share/zoneinfo/UTC", root / "localtime")   # absolute, as in a real /etc
    os.symlink("init.d/rc", root / "rc.local")
    stamp_tree(root)
    return root


def stamp_tree(root: Path, mtime: int = MTIME) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def compress_by_suffix(data: bytes, name: str) -> bytes:
    if name.endswith(".gz"):
        return gzip.compress(data, mtime=0)
    if name.endswith(".xz"):
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def gnu_cpio(tree: Path, out: Path) -> Path:
    """``find . | cpio -o -H newc``, compressed as ``out``'s suffix says: a real-world archive."""
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=names,
                          capture_output=True, check=True).stdout
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(compress_by_suffix(data, out.name))
    return out


def decompress(data: bytes) -> bytes:
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def unpack(archive: Path, dest: Path) -> Path:
    """Read an archive back with guest_init.archive (owners kept)."""
    extract_archive(archive, dest, preserve_owner=True)
    return dest


def gnu_unpack(archive: Path, dest: Path) -> Path:
    """Read an archive back with GNU cpio (owners and mtimes kept, as root)."""
    dest.mkdir(parents=True)
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=dest,
                   input=decompress(archive.read_bytes()), check=True, capture_output=True)
    return dest


def meta(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` (lost+found aside) and its content; symlinks as '-> target'."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (dirpath == str(root) and d == "lost+found")]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            out[rel] = (b"-> " + os.readlink(path).encode()) if path.is_symlink() else path.read_bytes()
    return out


def debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return proc.stdout


@contextmanager
def mounted_ro(image: Path) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="ct-test-"))
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        mnt.rmdir()


def ext_image(path: Path, label: str, tree: Path | None = None, size: str = "32M") -> Path:
    """An ext4 image made outside the processor (``-d``: it already holds data)."""
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label]
    if tree is not None:
        cmd += ["-d", str(tree)]
    subprocess.run(cmd + [str(path)], check=True, capture_output=True)
    return path


def snapshot(root: Path, skip: Path) -> set[str]:
    """Every path below ``root`` except those below ``skip``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            out.add(os.path.join(dirpath, name))
    return out


# -- running ---------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str
    stripped: Path
    plan: Path
    log: Path
    workdir: Path

    @property
    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def process(capsys, tmp_path: Path, text: str, *, name: str = "d.ct", plan: bool = False,
            more: tuple[str, ...] = ()) -> Run:
    """Write a container file and run ``supercharge container`` on it (one invocation)."""
    ct = tmp_path / name
    ct.write_text(text)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    stripped, plan_path = out / f"{ct.stem}.cfg", out / f"{ct.stem}.plan.json"
    log, workdir = out / "log", tmp_path / "work"
    argv = ["container", str(ct), *more, "--stripped", str(stripped), "--log", str(log), "--dir", str(workdir)]
    if plan:
        argv += ["--plan", str(plan_path)]
    capsys.readouterr()
    code = supercharge_main(argv)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err, stripped, plan_path, log, workdir)


def ok(run: Run) -> Run:
    assert run.code == 0, run.err
    assert run.err == ""
    return run


def uri(path: Path) -> str:
    return f"file://{path}"


@pytest.fixture
def etc(tmp_path) -> Path:
    return make_etc(tmp_path / "src" / "etc")


@pytest.fixture
def base(etc, tmp_path) -> Path:
    """The canonical /etc archive, made by GNU cpio: members are passwd, group, ... at the root."""
    return gnu_cpio(etc, tmp_path / "images" / "etc.cpio.gz")


@pytest.fixture
def web(http_server, tmp_path):
    return http_server(tmp_path / "www")


# == create ============================================================================

MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "xz": b"\xfd7zXZ\x00", "none": b"070701"}


def check_archive_of_etc(archive: Path, etc: Path, tmp_path: Path) -> None:
    """Both readers see the tree of ``etc`` with its owners, modes and mtimes."""
    ours = unpack(archive, tmp_path / "read-ours")
    gnu = gnu_unpack(archive, tmp_path / "read-gnu")
    expected = files_of(etc)
    assert files_of(ours) == expected
    assert files_of(gnu) == expected
    for rel in ("shadow", "ssl/private/site.key", "fido/notes.txt", "init.d/rc", "passwd"):
        assert meta(ours / rel) == meta(etc / rel), rel
        assert meta(gnu / rel) == meta(etc / rel), rel
        assert int((ours / rel).stat().st_mtime) == MTIME
        assert int((gnu / rel).stat().st_mtime) == MTIME
    for rel in ("ssl/private", "fido"):          # directories keep owner, mode and mtime too
        assert meta(ours / rel) == meta(etc / rel), rel
        assert int((ours / rel).stat().st_mtime) == MTIME
    members = {m.name: m for m in list_archive(archive)}
    assert members["fido/notes.txt"].uid == FIDO_UID and members["fido"].mode & 0o7777 == 0o750
    assert members["localtime"].kind == "symlink" and members["localtime"].linkname == "/usr/share/zoneinfo/UTC"
    assert all(m.mtime == MTIME for m in members.values())


@pytest.mark.parametrize("name, method", [
    ("etc.cpio.gz", "gzip"), ("etc.cpio.zst", "zstd"), ("etc.cpio.xz", "xz"), ("etc.cpio", "none"),
])
def test_create_on_file_uri_compresses_by_suffix_and_keeps_metadata(capsys, tmp_path, etc, name, method):
    target = tmp_path / "store" / "new" / name
    run = ok(process(capsys, tmp_path, f"[create\n {etc}/\n {uri(target)}\n ][end]\n"))
    data = target.read_bytes()
    assert data.startswith(MAGIC[method])
    check_archive_of_etc(target, etc, tmp_path)
    assert len(run.log_lines) == 1 and f"({method})" in run.log_lines[0]
    assert f"{len(data)} bytes" in run.log_lines[0]


def test_create_on_ftp(capsys, tmp_path, etc, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    run = ok(process(capsys, tmp_path, f"[create\n {etc}/\n {ftp}images/etc.cpio.gz\n ][end]\n"))
    stored = ftp.root / "images" / "etc.cpio.gz"
    assert stored.read_bytes().startswith(MAGIC["gzip"])
    check_archive_of_etc(stored, etc, tmp_path)
    assert [c for c, _ in ftp.log if c == "STOR"] == ["STOR"]
    assert not [p for p in ftp.root.rglob("*") if p.name.endswith(".part")]
    assert run.log_lines[0].startswith(f"{tmp_path / 'd.ct'}:1:1: create ")


def test_create_relative_source_is_relative_to_the_container(capsys, tmp_path, etc):
    run = ok(process(capsys, tmp_path, f"[create src/etc {uri(tmp_path / 'rel.cpio')}] [end]\n"))
    assert files_of(unpack(tmp_path / "rel.cpio", tmp_path / "r")) == files_of(etc)
    assert len(run.log_lines) == 1


def test_create_of_a_tree_holding_a_fifo_is_one_line(capsys, tmp_path, etc):
    os.mkfifo(etc / "initctl")
    target = tmp_path / "x.cpio.gz"
    run = process(capsys, tmp_path, f"[create {etc} {uri(target)}] [end]\n")
    assert run.code == 2 and "Traceback" not in run.err
    assert len(run.err.strip().splitlines()) == 1 and "initctl" in run.err
    assert not target.exists()


# == image =============================================================================


@pytest.mark.parametrize("fstype", ["ext4", "ext3"])
def test_image_is_sparse_and_labelled(capsys, tmp_path, fstype):
    image = tmp_path / "images" / "fido-etc"
    option = "" if fstype == "ext4" else f"\n fstype {fstype}"
    run = ok(process(capsys, tmp_path, f"[image {image}\n 50MB\n fido_etc{option}] [end]\n"))
    st = image.stat()
    assert st.st_size == 50 * 1024 * 1024
    assert st.st_blocks * 512 < st.st_size // 4      # sparse: only the metadata mkfs wrote
    ident = read_fs_identity(image)
    assert ident is not None and (ident.fstype, ident.label) == (fstype, "fido_etc")
    assert f"created {fstype}, label fido_etc" in run.log_lines[0]
    with mounted_ro(image) as mnt:
        assert sorted(os.listdir(mnt)) == ["lost+found"]


def test_image_export_adds_a_disk_line_the_xl_parser_reads(capsys, tmp_path):
    image = tmp_path / "images" / "web1-etc.img"
    text = f"""\
# web1
name = "web1"
memory = 256
disk = [ "format=raw, vdev=xvda, access=ro, target=/var/images/root.img" ]

[image {image} 16M web1_etc
 export xvdc
 access ro
] [end]
vcpus = 2
"""
    run = ok(process(capsys, tmp_path, text))
    stripped = run.stripped.read_text()
    assert stripped.startswith("# web1\nname = \"web1\"\nmemory = 256\ndisk = [")
    config = parse_xl_config(stripped, str(run.stripped))
    assert config["vcpus"] == 2 and config["name"] == "web1"
    disks = [parse_disk_spec(d) for d in config["disk"]]
    assert [(d.vdev, d.readonly, d.target) for d in disks] == [
        ("xvda", True, "/var/images/root.img"), ("xvdc", True, str(image))]


def test_image_export_without_a_disk_setting(capsys, tmp_path):
    image = tmp_path / "a.img"
    run = ok(process(capsys, tmp_path, f'name = "a"\n[image {image} 8M a_etc export xvdb] [end]\n'))
    config = parse_xl_config(run.stripped.read_text())
    (spec,) = config["disk"]
    disk = parse_disk_spec(spec)
    assert (disk.vdev, disk.readonly, disk.target) == ("xvdb", False, str(image))


# == populate ==========================================================================


def test_populate_fresh_image_without_mounting(capsys, tmp_path, base, etc, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    shutil.copy(base, ftp.root / "etc.cpio.gz")
    image = tmp_path / "images" / "fido-etc"
    text = f"""\
[image {image} 32M fido_etc] [end]
[populate image
 {image}
 /mnt/
 {ftp}etc.cpio.gz
 ][end]
"""
    run = ok(process(capsys, tmp_path, text))
    assert "populated by mkfs -d" in run.log_lines[1]
    assert debugfs_cat(image, "/passwd") == PASSWD
    assert read_fs_identity(image).label == "fido_etc"
    with mounted_ro(image) as mnt:
        assert files_of(mnt) == files_of(etc)
        for rel in ("shadow", "fido", "fido/notes.txt", "ssl/private"):
            assert meta(mnt / rel) == meta(etc / rel), rel


def test_populate_image_that_holds_data_uses_a_loop_mount(capsys, tmp_path, base, etc):
    keep = tmp_path / "keep"
    (keep / "var").mkdir(parents=True)
    (keep / "kept.txt").write_bytes(b"was here before\n")
    (keep / "HOSTNAME").write_bytes(b"replaced by the archive\n")
    image = ext_image(tmp_path / "data.img", "data", keep)
    run = ok(process(capsys, tmp_path, f"[populate image {image} /mnt/ {uri(base)}][end]\n"))
    assert "populated by loop mount" in run.log_lines[0]
    assert debugfs_cat(image, "/kept.txt") == b"was here before\n"
    assert debugfs_cat(image, "/HOSTNAME") == b"oldname\n"
    with mounted_ro(image) as mnt:
        for rel, data in files_of(etc).items():
            assert files_of(mnt)[rel] == data
        assert meta(mnt / "shadow") == (0o640, 0, SHADOW_GID)


# == replace ===========================================================================

FIGURE_1_BODY = "\nFCDOBBS\n\n"


def test_replace_figure_1_in_an_archive_from_http(capsys, tmp_path, base, web):
    shutil.copy(base, web.root / "etc.cpio.gz")
    fork = tmp_path / "out" / "fido-etc.cpio.gz"
    text = f"""\
[replace /etc/HOSTNAME
archive {web}etc.cpio.gz
fork {uri(fork)}
{FIGURE_1_BODY}] [end]
"""
    run = ok(process(capsys, tmp_path, text))
    tree = unpack(fork, tmp_path / "forked")
    assert (tree / "HOSTNAME").read_bytes() == b"FCDOBBS\n"
    assert not (tree / "etc").exists()          # /etc/HOSTNAME is HOSTNAME in an /etc archive
    assert meta(tree / "HOSTNAME") == (0o644, 0, 0)
    assert "replaced" in run.log_lines[0] and "forked to" in run.log_lines[0]
    assert web.hits("/etc.cpio.gz") == 1
    assert base.read_bytes() == (web.root / "etc.cpio.gz").read_bytes()   # the source is untouched


def test_replace_creates_a_missing_file_with_mode_and_owner_by_name(capsys, tmp_path, base):
    fork = tmp_path / "fork.cpio.zst"
    text = f"""\
[replace /etc/fido/new/dir/config.ini
archive {uri(base)}
mode 0600
owner fido:shadow
fork {uri(fork)}

[global]
name = fido
] [end]
"""
    run = ok(process(capsys, tmp_path, text))
    assert fork.read_bytes().startswith(MAGIC["zstd"])
    tree = unpack(fork, tmp_path / "forked")
    target = tree / "fido" / "new" / "dir" / "config.ini"
    assert target.read_bytes() == b"[global]\nname = fido\n"
    assert meta(target) == (0o600, FIDO_UID, SHADOW_GID)
    assert "created" in run.log_lines[0]


def test_replace_keeps_owner_of_an_existing_file_and_takes_numeric_owner(capsys, tmp_path, base):
    fork1, fork2 = tmp_path / "f1.cpio.gz", tmp_path / "f2.cpio.gz"
    text = f"""\
[replace /etc/shadow archive {uri(base)} mode 0640 fork {uri(fork1)}

root:!:19000:0:99999:7:::
] [end]
[replace /etc/motd archive {uri(base)} owner 123:456 mode 0444 fork {uri(fork2)}

Managed by supercharge
] [end]
"""
    ok(process(capsys, tmp_path, text))
    one = unpack(fork1, tmp_path / "one")
    assert (one / "shadow").read_bytes() == b"root:!:19000:0:99999:7:::\n"
    assert meta(one / "shadow") == (0o640, 0, SHADOW_GID)
    two = unpack(fork2, tmp_path / "two")
    # The second replace works on the same working copy: it sees the first one's change.
    assert (two / "shadow").read_bytes() == b"root:!:19000:0:99999:7:::\n"
    assert (two / "motd").read_bytes() == b"Managed by supercharge\n"
    assert meta(two / "motd") == (0o444, 123, 456)


def test_replace_in_a_whole_root_archive_keeps_the_etc_prefix(capsys, tmp_path, etc):
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    shutil.copytree(etc, root / "etc", symlinks=True)
    archive = gnu_cpio(root, tmp_path / "root.cpio.gz")
    fork = tmp_path / "root2.cpio.gz"
    ok(process(capsys, tmp_path, f"[replace /etc/HOSTNAME archive {uri(archive)} fork {uri(fork)}\n"
                                 f"{FIGURE_1_BODY}] [end]\n"))
    tree = unpack(fork, tmp_path / "t")
    assert (tree / "etc" / "HOSTNAME").read_bytes() == b"FCDOBBS\n"
    assert not (tree / "HOSTNAME").exists()


def test_replace_in_an_image(capsys, tmp_path, base, etc):
    image = tmp_path / "fido-etc.img"
    text = f"""\
[image {image} 32M fido_etc] [end]
[populate image {image} /mnt/ {uri(base)}][end]
[replace /etc/HOSTNAME
image {image}
mode 0640
owner root:shadow
patch-out file://{tmp_path}/hostname.patch
fork file://{tmp_path}/fork.cpio.gz
{FIGURE_1_BODY}] [end]
"""
    run = ok(process(capsys, tmp_path, text))
    assert "populated by mkfs -d" in run.log_lines[1]
    assert debugfs_cat(image, "/HOSTNAME") == b"FCDOBBS\n"
    forked = unpack(tmp_path / "fork.cpio.gz", tmp_path / "forked")
    assert files_of(forked) == files_of(etc) | {"HOSTNAME": b"FCDOBBS\n"}
    assert meta(forked / "HOSTNAME") == (0o640, 0, SHADOW_GID)
    original = gnu_unpack(base, tmp_path / "orig")
    gnu_patch(original, tmp_path / "hostname.patch")
    assert (original / "HOSTNAME").read_bytes() == b"FCDOBBS\n"
    with mounted_ro(image) as mnt:
        assert meta(mnt / "HOSTNAME") == (0o640, 0, SHADOW_GID)
        assert (mnt / "passwd").read_bytes() == PASSWD
        assert not (mnt / "etc").exists()
        assert not [p for p in os.listdir(mnt) if "supercharge" in p]


def test_replace_in_a_missing_image_names_the_image(capsys, tmp_path):
    run = process(capsys, tmp_path, f"[replace /etc/x\nimage {tmp_path}/nope.img\n\nx\n] [end]\n")
    assert run.code == 2
    assert run.err.startswith(f"supercharge: {tmp_path / 'd.ct'}:2:7: image ")
    assert "nope.img not found" in run.err
    assert not run.stripped.exists()


# == copy ==============================================================================


def test_copy_from_http_into_an_archive(capsys, tmp_path, base, web):
    conf = os.urandom(2000) + b"\nend\n"
    (web.root / "sites").mkdir()
    (web.root / "sites" / "web1.conf").write_bytes(conf)
    fork = tmp_path / "web1-etc.cpio.gz"
    text = f"""\
[copy /etc/apache2/sites-available/web1.conf {web}sites/web1.conf
 archive {uri(base)}
 mode 0640
 owner root:shadow
 fork {uri(fork)}
] [end]
"""
    run = ok(process(capsys, tmp_path, text))
    tree = unpack(fork, tmp_path / "t")
    target = tree / "apache2" / "sites-available" / "web1.conf"
    assert target.read_bytes() == conf
    assert meta(target) == (0o640, 0, SHADOW_GID)
    assert web.hits("/sites/web1.conf") == 1
    assert "created" in run.log_lines[0]


def test_copy_over_an_existing_file_in_an_image(capsys, tmp_path, etc, web):
    (web.root / "motd").write_bytes(b"from the web\n")
    image = ext_image(tmp_path / "etc.img", "etc", etc)
    run = ok(process(capsys, tmp_path, f"[copy /etc/motd {web}motd image {image}] [end]\n"))
    assert debugfs_cat(image, "/motd") == b"from the web\n"
    assert "replaced" in run.log_lines[0]


def test_copy_of_a_missing_file_names_the_uri(capsys, tmp_path, base, web):
    run = process(capsys, tmp_path, f"[copy /etc/motd {web}nothing archive {uri(base)}] [end]\n")
    assert run.code == 2
    assert f"{web}nothing" in run.err and "404" in run.err
    assert len(run.err.strip().splitlines()) == 1 and "Traceback" not in run.err


# == patch =============================================================================


def test_patch_an_image_and_fork_it_to_a_new_archive(capsys, tmp_path, base, etc, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    (ftp.root / "fido-etc.patch1").write_bytes(ACCOUNTS_PATCH)
    image = tmp_path / "images" / "fido-etc"
    fork = tmp_path / "images" / "fido-etc-patched"
    text = f"""\
[image {image} 32M fido_etc] [end]
[populate image {image} /mnt/ {uri(base)}][end]
[patch
file://{image}
{ftp}fido-etc.patch1
file://{fork}
][end]
"""
    run = ok(process(capsys, tmp_path, text))
    assert "applied, forked to" in run.log_lines[2]
    assert debugfs_cat(image, "/passwd") == PASSWD_PATCHED
    assert debugfs_cat(image, "/group") == GROUP_PATCHED
    assert fork.read_bytes().startswith(MAGIC["gzip"])      # no suffix: gzip, as the paper's archives
    tree = unpack(fork, tmp_path / "t")
    expected = files_of(etc) | {"passwd": PASSWD_PATCHED, "group": GROUP_PATCHED}
    assert files_of(tree) == expected
    assert not (tree / "lost+found").exists()
    assert meta(tree / "shadow") == (0o640, 0, SHADOW_GID)
    assert meta(tree / "ssl" / "private") == (0o710, 0, SHADOW_GID)


def test_patch_an_archive_and_fork(capsys, tmp_path, base, etc, web):
    shutil.copy(base, web.root / "etc.cpio.gz")
    (web.root / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    fork = tmp_path / "web1-etc.cpio.xz"
    text = f"[patch {web}etc.cpio.gz {web}accounts.patch\n fork {uri(fork)}\n strip 1\n][end]\n"
    run = ok(process(capsys, tmp_path, text))
    assert fork.read_bytes().startswith(MAGIC["xz"])
    tree = gnu_unpack(fork, tmp_path / "t")
    assert files_of(tree) == files_of(etc) | {"passwd": PASSWD_PATCHED, "group": GROUP_PATCHED}
    assert meta(tree / "fido" / "notes.txt") == (0o600, FIDO_UID, FIDO_UID)
    assert "applied" in run.log_lines[0]


def test_patch_already_applied_is_recognised(capsys, tmp_path, etc):
    (etc / "passwd").write_bytes(PASSWD_PATCHED)
    (etc / "group").write_bytes(GROUP_PATCHED)
    image = ext_image(tmp_path / "etc.img", "etc", etc)
    (tmp_path / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    run = ok(process(capsys, tmp_path, f"[patch file://{image} file://{tmp_path}/accounts.patch] [end]\n"))
    assert "already applied" in run.log_lines[0]
    assert debugfs_cat(image, "/passwd") == PASSWD_PATCHED


def test_patch_that_does_not_apply_changes_nothing(capsys, tmp_path, base, etc):
    image = ext_image(tmp_path / "etc.img", "etc", etc)
    (tmp_path / "bad.patch").write_bytes(BAD_PATCH)
    fork = tmp_path / "never.cpio.gz"
    text = f"""\
name = "x"
[replace /etc/motd image {image}

changed first
] [end]
[patch file://{image}
 file://{tmp_path}/bad.patch
 file://{fork}
][end]
"""
    run = process(capsys, tmp_path, text)
    assert run.code == 1
    assert run.err.startswith(f"supercharge: {tmp_path / 'd.ct'}:6:1: patch file://{tmp_path}/bad.patch "
                              f"does not apply to file://{image} (nothing changed)")
    assert "hunk #1" in run.err and "passwd" in run.err
    assert "nobody:x:65534" in run.err            # the line it expected
    assert "Traceback" not in run.err
    assert debugfs_cat(image, "/passwd") == PASSWD
    assert debugfs_cat(image, "/motd") == b"changed first\n"   # the earlier expression did run
    assert not fork.exists() and not run.stripped.exists()
    # The log says what was done, then what failed.
    done, failed = run.log_lines
    assert done.startswith(f"{tmp_path / 'd.ct'}:2:1: replace /etc/motd in {image}: replaced")
    assert failed.startswith(f"{tmp_path / 'd.ct'}:6:1: patch ") and failed.endswith("(FAILED, exit code 1)")
    # An archive target is not changed either, and nothing is stored.
    run = process(capsys, tmp_path, f"[patch {uri(base)} file://{tmp_path}/bad.patch file://{fork}][end]\n")
    assert run.code == 1 and "hunk #1" in run.err
    assert not fork.exists()
    # No working copy is left behind by the failed container; the expanded base is intact.
    assert list((run.workdir / ".supercharge" / "work").iterdir()) == []
    (expanded,) = [p for p in (run.workdir / ".supercharge" / "expanded").iterdir()]
    assert (expanded / "passwd").read_bytes() == PASSWD


def test_malformed_patch_is_bad_input(capsys, tmp_path, base):
    (tmp_path / "junk.patch").write_bytes(b"--- a/passwd\n+++ b/passwd\n@@ -1,x +1 @@\n")
    run = process(capsys, tmp_path, f"[patch {uri(base)}\n file://{tmp_path}/junk.patch] [end]\n")
    assert run.code == 2
    assert run.err.startswith(f"supercharge: {tmp_path / 'd.ct'}:2:2: file://{tmp_path}/junk.patch")
    assert "Traceback" not in run.err


# == patch-out =========================================================================


def gnu_patch(tree: Path, patch: Path) -> None:
    proc = subprocess.run(["patch", "-p1", "--batch", "--forward", "-i", str(patch)], cwd=tree,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_patch_out_of_a_replace_reproduces_the_change_with_gnu_patch(capsys, tmp_path, base, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    fork = tmp_path / "fork.cpio.gz"
    text = f"""\
[replace /etc/hosts archive {uri(base)}
patch-out {ftp}patches/hosts.patch
fork {uri(fork)}

127.0.0.1\tlocalhost
10.0.0.5\tfido.example.org fido
] [end]
[replace /etc/hostname archive {uri(base)}
patch-out file://{tmp_path}/patches/hostname.patch

fido
] [end]
"""
    run = ok(process(capsys, tmp_path, text))
    assert "patch stored at" in run.log_lines[0]
    original = gnu_unpack(base, tmp_path / "orig")
    gnu_patch(original, ftp.root / "patches" / "hosts.patch")
    assert (original / "hosts").read_bytes() == b"127.0.0.1\tlocalhost\n10.0.0.5\tfido.example.org fido\n"
    gnu_patch(original, tmp_path / "patches" / "hostname.patch")           # a new file
    assert (original / "hostname").read_bytes() == b"fido\n"
    assert files_of(original) == files_of(unpack(fork, tmp_path / "f")) | {"hostname": b"fido\n"}


def test_patch_out_of_a_patch_and_a_copy(capsys, tmp_path, base, web):
    (web.root / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    (web.root / "motd").write_bytes(b"Hello from the web\n")
    fork = tmp_path / "fork.cpio"
    text = f"""\
[copy /etc/motd {web}motd archive {uri(base)} patch-out file://{tmp_path}/motd.patch] [end]
[patch {uri(base)} {web}accounts.patch
 patch-out file://{tmp_path}/accounts-out.patch
 fork {uri(fork)}
][end]
"""
    ok(process(capsys, tmp_path, text))
    forked = files_of(unpack(fork, tmp_path / "f"))
    # patch-out of the patch isolates that expression's change only (not the copy before it).
    original = gnu_unpack(base, tmp_path / "orig")
    gnu_patch(original, tmp_path / "accounts-out.patch")
    assert (original / "passwd").read_bytes() == PASSWD_PATCHED
    assert (original / "motd").read_bytes() == b"Welcome\n"
    gnu_patch(original, tmp_path / "motd.patch")
    assert files_of(original) == forked


def test_patch_out_of_a_patch_on_a_root_image_with_device_nodes(capsys, tmp_path, etc):
    root = tmp_path / "rootfs"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev" / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    shutil.copytree(etc, root / "etc", symlinks=True)
    image = ext_image(tmp_path / "root.img", "root", root, size="64M")
    (tmp_path / "accounts.patch").write_bytes(ACCOUNTS_PATCH.replace(b"a/", b"a/etc/").replace(b"b/", b"b/etc/"))
    text = (f"[patch file://{image} file://{tmp_path}/accounts.patch\n"
            f" patch-out file://{tmp_path}/out.patch\n fork file://{tmp_path}/root.cpio.gz\n][end]\n")
    run = ok(process(capsys, tmp_path, text))
    assert "patch stored at" in run.log_lines[0]
    assert debugfs_cat(image, "/etc/passwd") == PASSWD_PATCHED
    original = gnu_unpack(gnu_cpio(etc, tmp_path / "etc-only.cpio"), tmp_path / "orig" / "etc")
    gnu_patch(original.parent, tmp_path / "out.patch")
    assert files_of(original) == files_of(etc) | {"passwd": PASSWD_PATCHED, "group": GROUP_PATCHED}
    members = {m.name: m for m in list_archive(tmp_path / "root.cpio.gz")}
    assert (members["dev/zero"].kind, members["dev/zero"].devmajor, members["dev/zero"].devminor) == (
        "chardev", 1, 5)


# == fork ==============================================================================


def test_fork_keeps_untouched_files_and_directories_as_they_were(capsys, tmp_path, base, etc):
    fork = tmp_path / "forks" / "fido-etc.cpio.gz"
    run = ok(process(capsys, tmp_path, f"[replace /etc/motd archive {uri(base)} fork {uri(fork)}\n\nHi\n] [end]\n"))
    assert "forked to" in run.log_lines[0]
    before = base.read_bytes()
    members = {m.name: m for m in list_archive(fork)}
    original = {m.name: m for m in list_archive(base) if m.name != "."}
    assert set(members) == set(original)
    for name, m in original.items():
        got = members[name]
        assert (got.kind, got.mode & 0o7777, got.uid, got.gid) == (m.kind, m.mode & 0o7777, m.uid, m.gid), name
        if name != "motd" and m.kind != "dir":
            assert got.mtime == m.mtime, name
        if m.kind == "dir":
            assert got.mtime == m.mtime, f"{name}: directory mtime not kept"
    gnu = gnu_unpack(fork, tmp_path / "g")
    assert files_of(gnu) == files_of(etc) | {"motd": b"Hi\n"}
    assert base.read_bytes() == before


def test_fork_to_ftp_and_http_put(capsys, tmp_path, base, web, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    text = f"""\
[replace /etc/HOSTNAME archive {uri(base)} fork {ftp}forks/a.cpio.gz
{FIGURE_1_BODY}] [end]
[replace /etc/HOSTNAME archive {uri(base)} fork {web}forks/b.cpio.zst

second
] [end]
"""
    ok(process(capsys, tmp_path, text))
    a = unpack(ftp.root / "forks" / "a.cpio.gz", tmp_path / "a")
    b = unpack(web.root / "forks" / "b.cpio.zst", tmp_path / "b")
    assert (a / "HOSTNAME").read_bytes() == b"FCDOBBS\n"
    assert (b / "HOSTNAME").read_bytes() == b"second\n"
    assert web.hits("/forks/b.cpio.zst", "PUT") == 1


# == the paper's whole flow ============================================================


def test_the_papers_flow_in_one_container(capsys, tmp_path, etc, ftp_server):
    ftp = ftp_server(tmp_path / "ftp")
    (ftp.root / "images").mkdir()
    (ftp.root / "images" / "fido-etc.patch1").write_bytes(ACCOUNTS_PATCH)
    images = tmp_path / "var" / "images"
    text = f"""\
# The paper's domain container: /etc archived, made an image, populated, personalised, forked.
name = "fido"
memory = 256

[create
 {etc}/
 {ftp}images/etc.cpio.gz
 ][end]

[image {images}/fido-etc
 50MB
 fido_etc
 fstype ext3] [end]

[populate image
 {images}/fido-etc
 /mnt/
 {ftp}images/etc.cpio.gz
 ][end]

[replace /etc/HOSTNAME
image {images}/fido-etc

FCDOBBS

] [end]

[patch
file://{images}/fido-etc
{ftp}images/fido-etc.patch1
file://{images}/fido-etc-patched
][end]
vcpus = 1
"""
    run = ok(process(capsys, tmp_path, text))
    assert [line.split(": ", 1)[1].split()[0] for line in run.log_lines] == [
        "create", "image", "populate", "replace", "patch"]
    assert run.stripped.read_text() == ("# The paper's domain container: /etc archived, made an image, "
                                        "populated, personalised, forked.\nname = \"fido\"\nmemory = 256\n"
                                        "\nvcpus = 1\n")
    # The archive on the FTP server is the tree as created.
    check_archive_of_etc(ftp.root / "images" / "etc.cpio.gz", etc, tmp_path / "ftp-read")
    # The image: ext3, labelled, holding the personalised /etc.
    image = images / "fido-etc"
    assert read_fs_identity(image).fstype == "ext3"
    assert debugfs_cat(image, "/HOSTNAME") == b"FCDOBBS\n"
    # The fork: the whole personality, and nothing else changed.
    forked = unpack(images / "fido-etc-patched", tmp_path / "forked")
    assert files_of(forked) == files_of(etc) | {
        "HOSTNAME": b"FCDOBBS\n", "passwd": PASSWD_PATCHED, "group": GROUP_PATCHED}
    assert meta(forked / "shadow") == (0o640, 0, SHADOW_GID)
    assert meta(forked / "fido" / "notes.txt") == (0o600, FIDO_UID, FIDO_UID)
    # The archive was fetched once although populate follows create.
    assert sum(1 for c, a in ftp.log if c == "RETR" and a.endswith("etc.cpio.gz")) == 1
    assert sum(1 for c, a in ftp.log if c == "RETR" and a.endswith("fido-etc.patch1")) == 1


# == boot-time operations: the plan =====================================================


def test_boot_time_operations_make_a_plan_pinned_to_the_artifacts(capsys, tmp_path, web):
    conf = b"<VirtualHost *:80>\n  ServerName web1\n</VirtualHost>\n"
    (web.root / "sites").mkdir()
    (web.root / "sites" / "web1.conf").write_bytes(conf)
    (web.root / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    text = f"""\
name = "web1"
memory = 512

[mount web1_root / ro] [end]
[mount web1_etc /etc rw fstype ext3] [end]

[replace /etc/hostname at boot
mode 0600
owner 0:42

web1
] [end]

[copy /etc/apache2/sites-available/web1.conf {web}sites/web1.conf
 at boot
 mode 0644
 owner root:root
] [end]

[patch /etc {web}accounts.patch at boot] [end]

[hook enable-site
timeout 30

ln -sf ../sites-available/web1.conf /etc/apache2/sites-enabled/web1.conf
] [end]
"""
    run = ok(process(capsys, tmp_path, text, plan=True))
    assert len(run.log_lines) == 6
    plan = load_plan(run.plan)
    assert plan.name == "web1"
    assert [(m.device.label, m.target, m.fstype, m.options) for m in plan.mounts] == [
        ("web1_root", "/", "ext4", ("ro",)), ("web1_etc", "/etc", "ext3", ("rw",))]
    replace, copy, patch, hook = plan.steps
    assert isinstance(replace, ReplaceStep)
    assert (replace.path, replace.content, replace.mode, replace.uid, replace.gid) == (
        "/etc/hostname", b"web1\n", 0o600, 0, 42)
    assert isinstance(copy, CopyStep)
    assert copy.path == "/etc/apache2/sites-available/web1.conf"
    assert copy.source.uri == f"{web}sites/web1.conf"
    assert copy.source.sha256 == hashlib.sha256(conf).hexdigest()
    assert (copy.mode, copy.uid, copy.gid) == (0o644, 0, 0)
    assert isinstance(patch, PatchStep)
    assert (patch.dir, patch.strip) == ("/etc", 1)
    assert patch.source.sha256 == hashlib.sha256(ACCOUNTS_PATCH).hexdigest()
    assert isinstance(hook, HookStep)
    assert hook.name == "enable-site" and hook.timeout == 30
    assert hook.script == b"ln -sf ../sites-available/web1.conf /etc/apache2/sites-enabled/web1.conf\n"
    assert web.hits("/sites/web1.conf") == 1 and web.hits("/accounts.patch") == 1
    assert run.stripped.read_text() == 'name = "web1"\nmemory = 512\n'


@pytest.mark.parametrize("text, message", [
    ("[replace /etc/x archive {base}\nowner nosuch:root\n\nx\n] [end]\n",
     "2:7: owner: no user 'nosuch' in the target's /etc/passwd; use a number"),
    ("[mount r / rw] [end]\n[replace /etc/x at boot owner www-data:0\n\nx\n] [end]\n",
     "2:31: owner: the user 'www-data' cannot be looked up at boot"),
])
def test_owner_names_that_cannot_be_resolved(capsys, tmp_path, base, text, message):
    run = process(capsys, tmp_path, text.format(base=uri(base)), plan=True)
    assert run.code == 2
    assert run.err.startswith(f"supercharge: {tmp_path / 'd.ct'}:{message}")
    assert not run.plan.exists() and not run.stripped.exists()


def test_plan_goes_beside_the_stripped_config_by_default(capsys, tmp_path):
    text = "[mount r / rw] [end]\n[replace /etc/motd at boot\n\nhi\n] [end]\n"
    run = ok(process(capsys, tmp_path, text))
    default = run.stripped.with_name(run.stripped.name + ".plan.json")
    assert load_plan(default).steps[0].content == b"hi\n"
    assert f"plan: {default}" in run.out


def test_no_plan_without_boot_time_operations(capsys, tmp_path, base):
    text = f'name = "x"\n[replace /etc/motd archive {uri(base)}\n\nhi\n] [end]\n'
    run = ok(process(capsys, tmp_path, text, plan=True))
    assert not run.plan.exists()
    assert not list(run.stripped.parent.glob("*.plan.json"))
    assert "plan:" not in run.out


def test_boot_time_operations_need_a_root_mount(capsys, tmp_path):
    run = process(capsys, tmp_path, "[mount e /etc rw] [end]\n[hook h\n\ntrue\n] [end]\n", plan=True)
    assert run.code == 2 and "[mount LABEL / rw]" in run.err
    assert not run.plan.exists()


# == once per invocation; working copies ===============================================


def test_each_archive_is_fetched_and_expanded_once_per_invocation(capsys, tmp_path, base, etc, web,
                                                                  ftp_server, monkeypatch):
    import guest_init.archive as archive_module

    ftp = ftp_server(tmp_path / "ftp")
    shutil.copy(base, web.root / "etc.cpio.gz")
    shutil.copy(base, ftp.root / "etc.cpio.gz")
    (web.root / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    (web.root / "motd").write_bytes(b"shared motd\n")
    expanded: list[str] = []
    real = archive_module.extract_archive

    def counting(archive, dest, **kw):
        expanded.append(str(archive))
        return real(archive, dest, **kw)

    monkeypatch.setattr(archive_module, "extract_archive", counting)
    cts = []
    for name in ("a", "b", "c"):
        text = f"""\
name = "{name}"
[replace /etc/HOSTNAME archive {web}etc.cpio.gz

{name}
] [end]
[copy /etc/motd {web}motd archive {web}etc.cpio.gz] [end]
[patch {web}etc.cpio.gz {web}accounts.patch fork file://{tmp_path}/forks/{name}.cpio.gz] [end]
[replace /etc/hosts archive {ftp}etc.cpio.gz fork file://{tmp_path}/forks/{name}-ftp.cpio.gz

10.0.0.1 {name}
] [end]
"""
        cts.append(tmp_path / f"{name}.ct")
        cts[-1].write_text(text)
    outdir = tmp_path / "cfg"
    capsys.readouterr()
    code = supercharge_main(["container", *map(str, cts), "--stripped", str(outdir),
                             "--dir", str(tmp_path / "work"), "--json"])
    assert code == 0, capsys.readouterr().err
    assert web.hits("/etc.cpio.gz") == 1
    assert web.hits("/accounts.patch") == 1 and web.hits("/motd") == 1
    assert sum(1 for c, a in ftp.log if c == "RETR") == 1
    assert len(expanded) == 1     # the HTTP and FTP archives have the same content: one expansion
    for name in ("a", "b", "c"):
        assert parse_xl_config((outdir / f"{name}.cfg").read_text())["name"] == name
        tree = unpack(tmp_path / "forks" / f"{name}.cpio.gz", tmp_path / "read" / name)
        assert files_of(tree) == files_of(etc) | {
            "HOSTNAME": f"{name}\n".encode(), "motd": b"shared motd\n",
            "passwd": PASSWD_PATCHED, "group": GROUP_PATCHED}
        ftp_tree = unpack(tmp_path / "forks" / f"{name}-ftp.cpio.gz", tmp_path / "read" / f"{name}-ftp")
        assert files_of(ftp_tree) == files_of(etc) | {"hosts": f"10.0.0.1 {name}\n".encode()}


def test_containers_do_not_see_each_others_changes_and_the_base_stays_intact(capsys, tmp_path, base, etc):
    a = tmp_path / "a.ct"
    b = tmp_path / "b.ct"
    (tmp_path / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    a.write_text(f"""\
[replace /etc/HOSTNAME archive {uri(base)} mode 0600 owner 7:7

a-host
] [end]
[patch {uri(base)} file://{tmp_path}/accounts.patch] [end]
[replace /etc/only-a archive {uri(base)} fork file://{tmp_path}/a.cpio.gz

a
] [end]
""")
    b.write_text(f"[replace /etc/motd archive {uri(base)} fork file://{tmp_path}/b.cpio.gz\n\nb\n] [end]\n")
    workdir = tmp_path / "work"
    capsys.readouterr()
    assert supercharge_main(["container", str(a), str(b), "--stripped", str(tmp_path / "cfg"),
                             "--dir", str(workdir)]) == 0, capsys.readouterr().err
    tree_a = unpack(tmp_path / "a.cpio.gz", tmp_path / "ra")
    tree_b = unpack(tmp_path / "b.cpio.gz", tmp_path / "rb")
    original = files_of(etc)
    assert files_of(tree_a) == original | {"HOSTNAME": b"a-host\n", "passwd": PASSWD_PATCHED,
                                           "group": GROUP_PATCHED, "only-a": b"a\n"}
    assert meta(tree_a / "HOSTNAME") == (0o600, 7, 7)
    assert files_of(tree_b) == original | {"motd": b"b\n"}
    assert meta(tree_b / "HOSTNAME") == meta(etc / "HOSTNAME")
    # The expanded base: one tree, every inode still holding the original content and metadata.
    (expanded,) = [p for p in (workdir / ".supercharge" / "expanded").iterdir() if not p.name.startswith(".")]
    assert files_of(expanded) == original
    for rel in original:
        assert meta(expanded / rel) == meta(etc / rel), rel
        if not (expanded / rel).is_symlink():
            assert (expanded / rel).stat().st_nlink == 1, f"{rel}: a working copy still links it"
            assert int((expanded / rel).stat().st_mtime) == MTIME
    # Working copies are removed after each container.
    assert list((workdir / ".supercharge" / "work").iterdir()) == []


def test_what_an_invocation_stores_at_a_uri_is_what_later_expressions_read(capsys, tmp_path, etc):
    archive = gnu_cpio(etc, tmp_path / "etc.cpio.gz")
    a, b = tmp_path / "a.ct", tmp_path / "b.ct"
    # a updates the canonical archive in place; b, after it, derives from the updated one.
    a.write_text(f"[replace /etc/motd archive {uri(archive)} fork {uri(archive)}\n\nfrom a\n] [end]\n")
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "y").write_bytes(b"other tree\n")
    b.write_text(f"""\
[replace /etc/hosts archive {uri(archive)} fork file://{tmp_path}/b1.cpio.gz

from b
] [end]
[create {other} {uri(archive)}] [end]
[replace /etc/hosts archive {uri(archive)} fork file://{tmp_path}/b2.cpio.gz

from b again
] [end]
""")
    capsys.readouterr()
    assert supercharge_main(["container", str(a), str(b), "--stripped", str(tmp_path / "cfg"),
                             "--dir", str(tmp_path / "work")]) == 0, capsys.readouterr().err
    b1 = files_of(unpack(tmp_path / "b1.cpio.gz", tmp_path / "r1"))
    assert b1 == files_of(etc) | {"motd": b"from a\n", "hosts": b"from b\n"}
    b2 = files_of(unpack(tmp_path / "b2.cpio.gz", tmp_path / "r2"))
    assert b2 == {"x/y": b"other tree\n", "hosts": b"from b again\n"}


def clone_state(root: Path) -> dict[str, tuple]:
    """Everything a working copy is: per path, type, mode, owner, mtime (not for files: they
    are the base's inodes), content and, for files, which inode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([""] if dirpath == str(root) else []):
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            extra = (st.st_ino,) if stat.S_ISREG(st.st_mode) else (
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else "", st.st_mtime_ns)
            out[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, *extra)
    return out


def test_a_reset_working_copy_is_a_fresh_clone(tmp_path, etc):
    from dom0.container.process import hardlink_clone, reset_clone

    base = tmp_path / "base"
    shutil.copytree(etc, base, symlinks=True)
    stamp_tree(base)
    fresh, work = tmp_path / "fresh", tmp_path / "work"
    hardlink_clone(base, fresh)
    hardlink_clone(base, work)
    assert clone_state(work) == clone_state(fresh)
    # A container's worth of changes, and then some.
    (work / "HOSTNAME").unlink()
    (work / "HOSTNAME").write_bytes(b"new\n")                     # replaced: a new inode
    (work / "motd").unlink()                                       # removed
    shutil.rmtree(work / "init.d")                                 # a directory removed
    (work / "added" / "deep").mkdir(parents=True)                  # added
    (work / "added" / "deep" / "f").write_bytes(b"x")
    (work / "ssl" / "private" / "new.key").write_bytes(b"k")       # added in a kept directory
    os.chmod(work / "ssl" / "private", 0o755)                      # directory metadata changed
    os.chown(work / "fido", 0, 0)
    (work / "localtime").unlink()
    os.symlink("/usr/share/zoneinfo/Europe/Paris", work / "localtime")   # symlink retargeted
    (work / "rc.local").unlink()
    (work / "rc.local").mkdir()                                    # a symlink became a directory
    shutil.rmtree(work / "fido")
    (work / "fido").write_bytes(b"a file now")                     # a directory became a file
    reset_clone(base, work)
    assert clone_state(work) == clone_state(fresh)
    assert files_of(work) == files_of(base)


def test_a_second_invocation_sees_a_changed_base(capsys, tmp_path, etc):
    archive = gnu_cpio(etc, tmp_path / "etc.cpio.gz")
    fork = tmp_path / "fork.cpio.gz"
    text = f"[replace /etc/motd archive {uri(archive)} fork {uri(fork)}\n\nx\n] [end]\n"
    ok(process(capsys, tmp_path, text))
    (etc / "hosts").write_bytes(b"changed base\n")
    gnu_cpio(etc, archive)
    clear_fetch_cache()
    ok(process(capsys, tmp_path, text))
    assert (unpack(fork, tmp_path / "r") / "hosts").read_bytes() == b"changed base\n"


# == hostile archives ==================================================================


def newc(entries: list[tuple[str, int, bytes]] , *, devices: dict[str, tuple[int, int]] | None = None) -> bytes:
    """A raw cpio newc archive, names exactly as given (no normalisation): (name, mode, data)."""
    out = bytearray()
    devices = devices or {}
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        major, minor = devices.get(name, (0, 0))
        fields = [ino if name != "TRAILER!!!" else 0, mode, 0, 0, 1, MTIME, len(data), 0, 0, major, minor,
                  len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * ((-len(out)) % 4)
        out += data
        out += b"\0" * ((-len(out)) % 4)
    out += b"\0" * ((-len(out)) % 512)
    return bytes(out)


def huge_tar() -> bytes:
    import tarfile

    info = tarfile.TarInfo("etc/huge.img")
    info.size = 5 << 30                     # declared 5 GiB: over the limit, refused before writing
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024


REG, DIR, LNK, CHR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o600

HOSTILE = {
    "absolute-path": (lambda out: newc([("etc", DIR, b""), ("/tmp/ct-evil-absolute", REG, b"pwned\n")]),
                      "/tmp/ct-evil-absolute"),
    "dot-dot": (lambda out: newc([("etc", DIR, b""), ("etc/../../../escaped.txt", REG, b"pwned\n")]),
                "etc/../../../escaped.txt"),
    "symlink-escape": (lambda out: newc([("etc", DIR, b""), ("etc/up", LNK, b"../../../.."),
                                         ("etc/up/escaped.txt", REG, b"pwned\n")]),
                       "etc/up"),
    "device-node": (lambda out: newc([("etc", DIR, b""), ("etc/kmem", CHR, b"")],
                                     devices={"etc/kmem": (1, 2)}),
                    "etc/kmem"),
    "oversize": (lambda out: gzip.compress(huge_tar()), "etc/huge.img"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_naming_the_member(capsys, tmp_path, kind):
    make, member = HOSTILE[kind]
    evil = tmp_path / "srv" / "evil.cpio.gz"
    evil.parent.mkdir()
    data = make(evil)
    evil.write_bytes(data if data.startswith(b"\x1f\x8b") else gzip.compress(data))
    before = snapshot(tmp_path, tmp_path / "work")
    fork = tmp_path / "fork.cpio.gz"
    run = process(capsys, tmp_path, f"[replace /etc/motd archive {uri(evil)} fork {uri(fork)}\n\nx\n] [end]\n")
    assert run.code == 2, run.err
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.err
    assert lines[0].startswith("supercharge: ") and repr(member) in lines[0]
    assert uri(evil) in lines[0]
    after = snapshot(tmp_path, tmp_path / "work")
    made = {str(tmp_path / n) for n in ("d.ct", "out", "out/log", "work")}
    assert after - before - made == set()                   # nothing outside --dir
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["log"]     # no config, no plan
    (logged,) = run.log_lines
    assert logged.startswith(f"{uri(evil)}: ") and logged.endswith("(FAILED, exit code 2)")
    assert not Path("/tmp/ct-evil-absolute").exists()
    expanded = tmp_path / "work" / ".supercharge" / "expanded"
    assert not [p for p in expanded.iterdir()]               # no partial expansion left behind


def test_devices_allow_accepts_device_nodes(capsys, tmp_path):
    """The same archive refused above is taken with 'devices allow', its node kept in the fork."""
    archive = tmp_path / "srv" / "dev.cpio.gz"
    archive.parent.mkdir()
    archive.write_bytes(gzip.compress(newc([("etc", DIR, b""), ("etc/kmem", CHR, b"")],
                                           devices={"etc/kmem": (1, 2)})))
    fork = tmp_path / "fork.cpio"
    run = process(capsys, tmp_path, f"[replace /etc/motd archive {uri(archive)} fork {uri(fork)} "
                                    f"devices allow\n\nx\n] [end]\n")
    assert run.code == 0, run.err
    members = {m.name: m for m in list_archive(fork)}
    kmem = members["etc/kmem"]
    assert (kmem.kind, kmem.devmajor, kmem.devminor) == ("chardev", 1, 2)


# == malformed container files through the CLI =========================================

MALFORMED = {
    "unterminated": ("name = 'a'\n[replace /etc/x\narchive http://h/a\n\nbody\n",
                     "2:1: expected ']' and '[end]' to close this replace expression"),
    "unknown-expression": ("[replce /etc/x archive http://h/a] [end]\n",
                           "1:2: expected an expression name after '['"),
    "wrong-argument-count": ("[image /var/images/a 50MB] [end]\n",
                             "1:26: expected the LABEL argument of [image PATH SIZE LABEL], found ']'"),
    "bad-uri": ("[create /etc/ sftp://foo.org/x] [end]\n",
                "1:15: expected a URI scheme file, http, https or ftp, found 'sftp'"),
    "bad-size": ("[image /var/images/a 50 lbl] [end]\n",
                 "1:22: expected a size like 50MB"),
    "duplicate-xl-key": ("name = 'a'\nmemory = 5\nname = 'b'\n",
                         "3:1: expected each setting once"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_container_file_is_one_line_with_its_position(tmp_path, kind):
    text, message = MALFORMED[kind]
    ct = tmp_path / "bad.ct"
    ct.write_text(text)
    out = tmp_path / "bad.cfg"
    proc = subprocess.run([sys.executable, "-m", "dom0", "container", str(ct), "--stripped", str(out),
                           "--dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"supercharge: {ct}:{message}"), lines[0]
    assert proc.stdout == ""
    assert not out.exists() and not (tmp_path / "work").exists()


def test_one_malformed_file_among_several_stops_before_anything_runs(capsys, tmp_path, etc):
    good = tmp_path / "good.ct"
    target = tmp_path / "made.cpio.gz"
    good.write_text(f"[create {etc} {uri(target)}] [end]\n")
    bad = tmp_path / "bad.ct"
    bad.write_text("[image /a 50MB] [end]\n")
    capsys.readouterr()
    code = supercharge_main(["container", str(good), str(bad), "--stripped", str(tmp_path / "cfg")])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"supercharge: {bad}:1:15: expected the LABEL")
    assert not target.exists()


# --- [nfs]: the plan's NFS mount and network, dom0's export files --------------------------


def test_nfs_export_gives_the_plan_a_mount_and_a_network_and_dom0_its_exports(capsys, tmp_path):
    import json

    from dom0.nfs import ganesha_config_text  # noqa: F401  (the files come from this module)

    (tmp_path / "exports" / "opt").mkdir(parents=True)
    run = ok(process(capsys, tmp_path, 'name = "web1"\nvif = ["mac=52:54:00:AB:CD:01", "bridge=xenbr1"]\n'
                     "[mount web1_root / rw] [end]\n"
                     "[nfs exports/opt /opt ro server 10.0.2.2 pseudo /web1/opt] [end]\n", plan=True))
    plan = json.loads(run.plan.read_text())
    assert plan["mounts"][1] == {"nfs": {"server": "10.0.2.2", "path": "/web1/opt"}, "target": "/opt",
                                 "fstype": "nfs4", "options": ["ro"]}
    assert plan["network"] == {"interfaces": [{"match": {"mac": "52:54:00:ab:cd:01"}, "dhcp": True},
                                              {"match": {"name": "eth1"}, "dhcp": True}]}
    ganesha = run.stripped.with_name(run.stripped.name + ".ganesha.conf").read_text()
    assert f'Path = "{tmp_path / "exports" / "opt"}";' in ganesha and 'Pseudo = "/web1/opt";' in ganesha
    assert "Access_Type = RO;" in ganesha and "Protocols = 4;" in ganesha
    exports = run.stripped.with_name(run.stripped.name + ".exports").read_text()
    assert f"{tmp_path / 'exports' / 'opt'} *(ro,root_squash" in exports


def test_an_nfs_mount_without_a_vif_line_is_an_error(capsys, tmp_path):
    (tmp_path / "opt").mkdir()
    run = process(capsys, tmp_path, 'name = "web1"\n[mount web1_root / rw] [end]\n'
                  "[nfs opt /opt ro server 10.0.2.2] [end]\n")
    assert run.code == 2
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supercharge: ") and lines[0].endswith(
        "d.ct:3:1: expected a vif line, since this nfs needs the guest's network at boot "
        "(vif = ['mac=52:54:00:12:34:56']), found none")
    assert not run.plan.exists() and not run.stripped.exists()


def test_a_cow_mount_is_an_overlay_in_the_plan(capsys, tmp_path):
    import json

    run = ok(process(capsys, tmp_path, 'name = "web1"\n[mount shared / cow upper web1-upper] [end]\n'
                     "[mount shared-usr /usr cow] [end]\n", plan=True))
    mounts = json.loads(run.plan.read_text())["mounts"]
    assert mounts == [{"target": "/", "overlay": {"lower": [{"label": "shared"}], "upper": {"label": "web1-upper"}}},
                      {"target": "/usr", "overlay": {"lower": [{"label": "shared-usr"}], "upper": "tmpfs"}}]
