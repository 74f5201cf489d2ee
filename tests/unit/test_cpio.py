"""The newc writer against GNU cpio, the reader, and the kernel-compatible compressors."""
from __future__ import annotations

import io
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dom0.compress import (
    METHODS,
    compress,
    compress_segment,
    decompress,
    decompress_stream,
    sniff,
)
from dom0.cpio import CpioWriter, read_cpio, read_initrd
from dom0.errors import UserError

pytestmark = pytest.mark.unit

BINARY = bytes(range(256)) * 7 + b"\0\0tail"  # NULs, high bytes, odd length
FILES = {
    "etc/hostname": (b"web1\n", 0o644),
    "etc/empty": (b"", 0o600),
    "bin/tool": (BINARY, 0o755),
    "data/name with spaces.txt": (b"spaced out\n", 0o644),
}
DIRS = ["etc", "bin", "data", "dev", "lib64"]
SYMLINK = ("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
DEVICE = ("dev/urandom", "c", 1, 9, 0o666)


def build(mtime: int = 0) -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf, mtime=mtime) as w:
        w.add_dir("etc")
        for name, (data, mode) in FILES.items():
            w.add_file(name, data, mode)
        w.add_symlink(*SYMLINK)
        w.add_device(DEVICE[0], DEVICE[1], DEVICE[2], DEVICE[3], DEVICE[4])
    return buf.getvalue()


def expected_names() -> set[str]:
    return set(DIRS) | set(FILES) | {SYMLINK[0], DEVICE[0]}


def need_cpio() -> str:
    tool = shutil.which("cpio")
    if tool is None:
        pytest.skip("GNU cpio is not installed (apt-get install -y cpio)")
    return tool


def test_gnu_cpio_lists_exactly_our_entries(tmp_path: Path) -> None:
    cpio = need_cpio()
    archive = tmp_path / "a.cpio"
    archive.write_bytes(build())
    with archive.open("rb") as fh:
        out = subprocess.run([cpio, "-it", "--quiet"], stdin=fh, capture_output=True, check=True)
    assert set(out.stdout.decode().splitlines()) == expected_names()
    assert len(out.stdout.decode().splitlines()) == len(expected_names())


def test_gnu_cpio_extracts_identical_files(tmp_path: Path) -> None:
    cpio = need_cpio()
    archive = tmp_path / "a.cpio"
    archive.write_bytes(build())
    root = tmp_path / "root"
    root.mkdir()
    with archive.open("rb") as fh:
        subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"],
                       stdin=fh, cwd=root, check=True, capture_output=True)
    for name, (data, mode) in FILES.items():
        path = root / name
        assert path.read_bytes() == data, name
        assert stat.S_IMODE(path.stat().st_mode) == mode, name
    link = root / SYMLINK[0]
    assert link.is_symlink() and os.readlink(link) == SYMLINK[1]
    assert (root / "etc").is_dir()
    if os.geteuid() == 0:
        st = os.lstat(root / DEVICE[0])
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (DEVICE[2], DEVICE[3])


def test_read_back_and_fields() -> None:
    data = build(mtime=1234)
    entries = {e.name: e for e in read_cpio(data)}
    assert set(entries) == expected_names()
    for name, (payload, mode) in FILES.items():
        assert entries[name].data == payload
        assert entries[name].mode == stat.S_IFREG | mode
    assert entries[SYMLINK[0]].symlink_target == SYMLINK[1]
    dev = entries[DEVICE[0]]
    assert stat.S_ISCHR(dev.mode) and (dev.rdev_major, dev.rdev_minor) == (1, 9)
    assert entries["etc"].is_dir and entries["etc"].nlink == 2
    assert entries["etc/hostname"].nlink == 1
    assert all(e.mtime == 1234 and e.uid == 0 and e.gid == 0 for e in entries.values())
    inos = [e.ino for e in read_cpio(data)]
    assert inos == list(range(1, len(inos) + 1))


def test_parents_added_once_and_first() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("/usr/lib/x86_64-linux-gnu/libc.so.6", b"x")
    w.add_file("usr/lib/x86_64-linux-gnu/libm.so.6", b"y")
    w.add_dir("usr")  # already there implicitly with the same mode: no-op
    w.close()
    names = [e.name for e in read_cpio(buf.getvalue())]
    assert names == ["usr", "usr/lib", "usr/lib/x86_64-linux-gnu",
                     "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libm.so.6"]
    assert w.files == 5 and w.bytes_in == 2


def test_padding_to_512_and_trailer() -> None:
    data = build()
    assert len(data) % 512 == 0
    assert b"TRAILER!!!\0" in data
    empty = io.BytesIO()
    CpioWriter(empty).close()
    assert len(empty.getvalue()) == 512 and read_cpio(empty.getvalue()) == []


def test_deterministic() -> None:
    assert build() == build()
    assert build(mtime=5) != build(mtime=6)


def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("a", b"1")
    assert read_cpio(buf.getvalue())[0].mtime == 1700000000


@pytest.mark.parametrize("second", ["file", "dir", "symlink", "device"])
def test_duplicate_path_rejected(second: str) -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("etc/hostname", b"a")
    with pytest.raises(ValueError, match="twice"):
        if second == "file":
            w.add_file("/etc/hostname", b"b")
        elif second == "dir":
            w.add_dir("etc//hostname")
        elif second == "symlink":
            w.add_symlink("./etc/hostname", "x")
        else:
            w.add_device("etc/hostname", "c", 1, 3)
    w.add_dir("d")
    with pytest.raises(ValueError):
        w.add_dir("d")


def test_bad_paths_rejected() -> None:
    w = CpioWriter(io.BytesIO())
    for bad in ("", "/", "a/../b", "TRAILER!!!"):
        with pytest.raises(ValueError):
            w.add_file(bad, b"")
    with pytest.raises(ValueError):
        w.add_device("dev/x", "p", 1, 1)


def test_concatenated_archives_round_trip() -> None:
    first = io.BytesIO()
    with CpioWriter(first) as w:
        w.add_file("init", b"\x7fELF...", 0o755)
    second = io.BytesIO()
    with CpioWriter(second) as w:
        w.add_file("etc/supercharge/plan.json", b"{}")
    entries = read_cpio(first.getvalue() + second.getvalue())
    assert [e.name for e in entries] == ["init", "etc", "etc/supercharge", "etc/supercharge/plan.json"]
    # extra zero padding between them, as the kernel allows
    assert len(read_cpio(first.getvalue() + b"\0" * 1024 + second.getvalue())) == 4
    with pytest.raises(ValueError):
        read_cpio(first.getvalue() + b"garbage")


def test_read_initrd_mixed_segments() -> None:
    base = io.BytesIO()
    with CpioWriter(base) as w:
        w.add_file("init", b"agent", 0o755)
    tail = io.BytesIO()
    with CpioWriter(tail) as w:
        w.add_file("plan.json", b"{}")
    for method in METHODS:
        segment = compress_segment(base.getvalue(), method)
        assert len(segment) % 512 == 0
        initrd = segment + tail.getvalue() + compress_segment(tail.getvalue(), "xz")
        assert [e.name for e in read_initrd(initrd)] == ["init", "plan.json", "plan.json"], method


def test_read_initrd_rejects_unaligned_plain_segment() -> None:
    """The kernel only looks for a plain archive at a 4-byte aligned offset."""
    base = io.BytesIO()
    with CpioWriter(base) as w:
        w.add_file("init", b"agent", 0o755)
    packed = compress(base.getvalue(), "gzip")
    lead = 1 if (len(packed) + 1) % 4 else 2  # leading zeros are skipped; they shift the offset
    initrd = b"\0" * lead + packed + base.getvalue()
    with pytest.raises(ValueError, match="4-byte aligned"):
        read_initrd(initrd)
    assert len(read_initrd(compress_segment(base.getvalue(), "gzip") + base.getvalue())) == 2


def test_add_tree_keeps_modes_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "_internal" / "sub").mkdir(parents=True)
    (src / "init").write_bytes(b"exe")
    (src / "init").chmod(0o755)
    (src / "_internal" / "sub" / "mod.so").write_bytes(b"so")
    (src / "_internal" / "libz.so.1").symlink_to("sub/mod.so")
    (src / "_internal" / "private").mkdir(mode=0o700)
    (src / "_internal" / "private").chmod(0o700)
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_dir("opt")
        w.add_tree(src, prefix="opt/agent")
    entries = {e.name: e for e in read_cpio(buf.getvalue())}
    assert list(entries) == [
        "opt", "opt/agent", "opt/agent/_internal", "opt/agent/_internal/libz.so.1",
        "opt/agent/_internal/private", "opt/agent/_internal/sub",
        "opt/agent/_internal/sub/mod.so", "opt/agent/init",
    ]
    assert stat.S_IMODE(entries["opt/agent/init"].mode) == 0o755
    assert stat.S_IMODE(entries["opt/agent/_internal/private"].mode) == 0o700
    assert entries["opt/agent/_internal/libz.so.1"].symlink_target == "sub/mod.so"
    assert entries["opt/agent/_internal/sub/mod.so"].data == b"so"


def test_add_tree_merges_existing_dirs(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "motd").write_text("hi")
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_device("dev/null", "c", 1, 3, 0o666)
        w.add_tree(tmp_path)
    assert sorted(e.name for e in read_cpio(buf.getvalue())) == ["dev", "dev/null", "etc", "etc/motd"]


def test_add_file_from_path_keeps_mode(tmp_path: Path) -> None:
    exe = tmp_path / "ld.so"
    exe.write_bytes(b"loader")
    exe.chmod(0o755)
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_file("lib64/ld.so", exe)
        w.add_file("lib64/copy", exe, 0o644)
        w.add_file("lib64/bytes", b"x")
    entries = {e.name: e for e in read_cpio(buf.getvalue())}
    assert stat.S_IMODE(entries["lib64/ld.so"].mode) == 0o755
    assert entries["lib64/ld.so"].data == b"loader"
    assert stat.S_IMODE(entries["lib64/copy"].mode) == 0o644
    assert stat.S_IMODE(entries["lib64/bytes"].mode) == 0o644


# -- compression -------------------------------------------------------------

PAYLOAD = build() * 20


@pytest.mark.parametrize("method", METHODS)
def test_compress_round_trip(method: str) -> None:
    packed = compress(PAYLOAD, method)
    assert decompress(packed) == PAYLOAD
    assert sniff(packed) == method
    out, used = decompress_stream(packed + b"\0" * 8)
    if method != "none":
        assert out == PAYLOAD and used == len(packed)
    assert compress(PAYLOAD, method) == packed  # deterministic


@pytest.mark.parametrize("method, tool", [("zstd", "zstd"), ("gzip", "gzip"), ("xz", "xz")])
def test_command_line_tools_accept_output(method: str, tool: str, tmp_path: Path) -> None:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed")
    out = subprocess.run([exe, "-d", "-c"], input=compress(PAYLOAD, method), capture_output=True, check=True)
    assert out.stdout == PAYLOAD


def test_zstd_frame_is_kernel_friendly() -> None:
    zstandard = pytest.importorskip("zstandard")
    packed = compress(PAYLOAD, "zstd")
    params = zstandard.get_frame_parameters(packed)
    assert params.content_size == len(PAYLOAD)
    assert params.dict_id == 0
    assert zstandard.frame_header_size(packed) > 0
    # exactly one frame: decompressing the first frame consumes everything
    assert decompress_stream(packed)[1] == len(packed)


def test_xz_uses_crc32() -> None:
    packed = compress(PAYLOAD, "xz")
    # stream flags (bytes 6-7 of the header): check type 0x01 = CRC32
    assert packed[6:8] == b"\x00\x01"
    assert lzma.decompress(packed) == PAYLOAD


def test_gzip_has_no_timestamp() -> None:
    assert compress(b"x", "gzip")[4:8] == b"\0\0\0\0"


def test_unknown_method() -> None:
    with pytest.raises(UserError, match="lz4.*zstd, gzip, xz, none"):
        compress(b"", "lz4")


def test_corrupt_input() -> None:
    with pytest.raises(UserError, match="truncated|corrupt"):
        decompress(compress(PAYLOAD, "xz")[:100])
