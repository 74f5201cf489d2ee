"""guest_init.archive: one test per class of hostile archive, for cpio and tar, and
round trips of benign archives made by GNU cpio and GNU tar.

Hostile archives are built here: cpio "newc" headers by hand (dom0.cpio.CpioWriter
refuses the names we need), tar with tarfile's ``addfile`` (which writes names as
given).  Escapes aim at ``tmp_path/outside``, never at the real /etc: these tests may
run as root, and a bug must not be able to damage the machine.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from guest_init.archive import (
    ArchiveTooLarge,
    CorruptArchive,
    ExtractResult,
    UnsafeArchive,
    UnsupportedArchive,
    archive_format,
    extract_archive,
    list_archive,
)

pytestmark = pytest.mark.unit

IS_ROOT = os.geteuid() == 0
MTIME = 1_600_000_000


# -- builders --------------------------------------------------------------------------


def newc_entry(name: str, mode: int, data: bytes = b"", *, ino: int = 0, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), size: int | None = None, check: int = 0,
               magic: bytes = b"070701") -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, MTIME, len(data) if size is None else size, 0, 0,
              rdev[0], rdev[1], len(encoded), check]
    out = magic + b"".join(b"%08X" % f for f in fields) + encoded
    out += b"\0" * ((-len(out)) % 4)
    return out + data + b"\0" * ((-len(data)) % 4)


def newc(*entries: bytes, trailer: bool = True) -> bytes:
    return b"".join(entries) + (newc_entry("TRAILER!!!", 0) if trailer else b"")


REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


def cfile(name: str, data: bytes = b"x", mode: int = 0o644, **kw) -> bytes:
    return newc_entry(name, REG | mode, data, **kw)


def cdir(name: str, mode: int = 0o755) -> bytes:
    return newc_entry(name, DIR | mode)


def clink(name: str, target: str) -> bytes:
    return newc_entry(name, LNK | 0o777, target.encode())


def tinfo(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
          mode: int = 0o644, dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    ti.linkname = linkname
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.devmajor, ti.devminor = dev
    return ti, data


def tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def tfile(name: str, data: bytes = b"x", mode: int = 0o644):
    return tinfo(name, tarfile.REGTYPE, data, mode=mode)


def tdir(name: str):
    return tinfo(name, tarfile.DIRTYPE, mode=0o755)


def tsym(name: str, target: str):
    return tinfo(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def thard(name: str, target: str):
    return tinfo(name, tarfile.LNKTYPE, linkname=target)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory next to the destination that hostile archives try to reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"keep me")
    return path


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "dest"


def untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["secret"] and \
        (outside / "secret").read_bytes() == b"keep me"


def nothing_left(tmp_path: Path) -> bool:
    """All or nothing: no destination and no staging directory after a refusal."""
    return sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


def refused(archive: bytes, dest: Path, member: str, exc: type = UnsafeArchive, **kw) -> str:
    with pytest.raises(exc) as info:
        extract_archive(archive, dest, **kw)
    assert info.value.member == member, str(info.value)
    assert repr(member) in str(info.value)
    return str(info.value)


# -- hostile classes -------------------------------------------------------------------


def test_absolute_path_cpio(dest, outside, tmp_path):
    msg = refused(newc(cfile("ok"), cfile(f"{outside}/planted")), dest, f"{outside}/planted")
    assert "absolute" in msg
    assert untouched(outside) and nothing_left(tmp_path)


def test_absolute_path_tar(dest, outside, tmp_path):
    refused(tar(tfile("ok"), tfile(f"{outside}/planted")), dest, f"{outside}/planted")
    # Missing parents of the destination are removed again too.
    refused(tar(tfile("ok"), tfile(f"{outside}/planted")), tmp_path / "new" / "deep" / "dest",
            f"{outside}/planted")
    assert untouched(outside) and nothing_left(tmp_path)


@pytest.mark.parametrize("name", ["../outside/planted", "a/../../outside/planted", "./../x"])
def test_dotdot_cpio_and_tar(name, dest, outside, tmp_path):
    assert "'..'" in refused(newc(cdir("a"), cfile(name)), dest, name)
    assert "'..'" in refused(tar(tdir("a"), tfile(name)), dest, name)
    assert untouched(outside) and nothing_left(tmp_path)


@pytest.mark.parametrize("target", ["../outside", "a/../../outside", "../../../../../../etc"])
def test_symlink_escape_relative(target, dest, outside, tmp_path):
    for archive in (newc(cdir("a"), clink("l", target)), tar(tdir("a"), tsym("l", target))):
        assert "leads outside" in refused(archive, dest, "l")
    assert untouched(outside) and nothing_left(tmp_path)


def test_symlink_escape_relative_from_subdirectory(dest, outside, tmp_path):
    # From a/b/, "../../.." climbs one level above the destination.
    refused(newc(clink("a/b/l", "../../..")), dest, "a/b/l")
    refused(tar(tsym("a/b/l", "../../..")), dest, "a/b/l")
    assert nothing_left(tmp_path)


def test_symlink_escape_absolute_with_dotdot(dest, outside, tmp_path):
    refused(newc(clink("l", "/../../outside")), dest, "l")
    refused(tar(tsym("l", "/../outside")), dest, "l")
    assert nothing_left(tmp_path)


def test_absolute_symlink_is_kept_as_in_a_chroot(dest, outside):
    """/etc/localtime -> /usr/share/... is normal in a root tree: kept as is."""
    target = str(outside / "secret")
    extract_archive(newc(clink("etc/localtime", target)), dest)
    assert os.readlink(dest / "etc" / "localtime") == target


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_write_through_symlink(fmt, dest, outside, tmp_path):
    """a -> OUTSIDE, then a/planted: refused, nothing written anywhere."""
    if fmt == "cpio":
        archive = newc(clink("a", str(outside)), cfile("a/planted", b"evil"))
    else:
        archive = tar(tsym("a", str(outside)), tfile("a/planted", b"evil"))
    msg = refused(archive, dest, "a/planted")
    assert "write through symlink 'a'" in msg
    assert untouched(outside) and nothing_left(tmp_path)


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_write_through_chained_symlinks(fmt, dest, outside, tmp_path):
    """b -> a (relative, inside), a -> OUTSIDE (absolute): b/x is refused too."""
    if fmt == "cpio":
        archive = newc(clink("a", str(outside)), clink("b", "a"), cfile("b/x"))
    else:
        archive = tar(tsym("a", str(outside)), tsym("b", "a"), tfile("b/x"))
    refused(archive, dest, "b/x")
    assert untouched(outside) and nothing_left(tmp_path)


def test_member_replaces_symlink_instead_of_writing_through(dest, outside):
    """A later member with a symlink's name replaces the symlink, never its target."""
    target = str(outside / "secret")
    extract_archive(tar(tsym("f", target), tfile("f", b"new")), dest)
    assert (dest / "f").read_bytes() == b"new" and not (dest / "f").is_symlink()
    extract_archive(newc(clink("g", target), cfile("g", b"new")), dest)
    assert (dest / "g").read_bytes() == b"new"
    assert untouched(outside)


def test_relative_symlink_inside_may_be_written_through(dest):
    extract_archive(tar(tdir("usr/lib"), tsym("lib", "usr/lib"), tfile("lib/libx.so", b"L")), dest)
    assert (dest / "usr" / "lib" / "libx.so").read_bytes() == b"L"
    assert os.readlink(dest / "lib") == "usr/lib"


@pytest.mark.parametrize("linkname", ["../outside/secret", "/etc/passwd", "a/../../outside/secret"])
def test_hardlink_outside_tar(linkname, dest, outside, tmp_path):
    msg = refused(tar(tfile("a"), thard("h", linkname)), dest, "h")
    assert "hard link" in msg
    assert untouched(outside) and nothing_left(tmp_path)


def test_hardlink_to_later_member_tar(dest, tmp_path, outside):
    assert "not an earlier" in refused(tar(thard("h", "later"), tfile("later")), dest, "h")
    # Nor to a symlink or a directory.
    refused(tar(tsym("s", "x"), thard("h", "s")), dest, "h")
    refused(tar(tdir("d"), thard("h", "d")), dest, "h")
    assert nothing_left(tmp_path)


def test_hardlink_through_replaced_file_tar(dest, outside):
    """h links to the file 'a' as extracted; after 'a' is replaced by a symlink, refused."""
    refused(tar(tfile("a"), tsym("a", str(outside / "secret")), thard("h", "a")), dest, "h")
    assert untouched(outside)


def test_hardlinks_cpio_by_inode(dest):
    """GNU cpio's layout: data on the last link only; all names share one inode."""
    archive = newc(cfile("a", b"", ino=7, nlink=3), cfile("b", b"", ino=7, nlink=3),
                   cfile("c", b"shared", ino=7, nlink=3), cfile("d", b"other", ino=8))
    res = extract_archive(archive, dest)
    inodes = {os.stat(dest / n).st_ino for n in "abc"}
    assert len(inodes) == 1 and (dest / "a").read_bytes() == b"shared"
    assert (res.files, res.hardlinks) == (2, 2)


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_device_node_refused(fmt, dest, tmp_path, outside):
    if fmt == "cpio":
        archive = newc(newc_entry("dev/mem", stat.S_IFCHR | 0o600, rdev=(1, 1)))
    else:
        archive = tar(tinfo("dev/mem", tarfile.CHRTYPE, mode=0o600, dev=(1, 1)))
    assert "character device 1,1" in refused(archive, dest, "dev/mem")
    fifo = newc(newc_entry("p", stat.S_IFIFO | 0o644)) if fmt == "cpio" else \
        tar(tinfo("p", tarfile.FIFOTYPE))
    refused(fifo, dest, "p")
    assert nothing_left(tmp_path)


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_device_node_allowed(fmt, dest):
    if fmt == "cpio":
        archive = newc(newc_entry("p", stat.S_IFIFO | 0o640),
                       newc_entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    else:
        archive = tar(tinfo("p", tarfile.FIFOTYPE, mode=0o640),
                      tinfo("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)))
    if not IS_ROOT:
        archive = newc(newc_entry("p", stat.S_IFIFO | 0o640)) if fmt == "cpio" else \
            tar(tinfo("p", tarfile.FIFOTYPE, mode=0o640))
    res = extract_archive(archive, dest, allow_devices=True)
    assert stat.S_ISFIFO(os.lstat(dest / "p").st_mode)
    assert stat.S_IMODE(os.lstat(dest / "p").st_mode) == 0o640
    if IS_ROOT:
        st = os.lstat(dest / "dev" / "null")
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
        assert res.specials == 2


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_setid_bits_stripped_unless_allowed(fmt, tmp_path):
    archive = newc(cfile("su", b"#!", mode=0o4755), cdir("g", 0o2775)) if fmt == "cpio" else \
        tar(tfile("su", b"#!", mode=0o4755), tinfo("g", tarfile.DIRTYPE, mode=0o2775))
    extract_archive(archive, tmp_path / "a")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "g").st_mode) == 0o775
    extract_archive(archive, tmp_path / "b", allow_setid=True)
    assert stat.S_IMODE(os.stat(tmp_path / "b" / "su").st_mode) == 0o4755


def test_size_limit_declared_cpio(dest, tmp_path, outside):
    # Declares 1 GiB and carries 3 bytes: refused for its size, before any data is read.
    archive = newc(cfile("big", b"abc", size=1 << 30), trailer=False)
    assert "declares 1073741824 bytes" in refused(archive, dest, "big", ArchiveTooLarge,
                                                  max_member=1 << 20)
    refused(archive, dest, "big", ArchiveTooLarge, max_total=1 << 20)
    # The total counts across members.
    many = newc(*(cfile(f"f{i}", b"y" * 400) for i in range(5)))
    refused(many, dest, "f2", ArchiveTooLarge, max_total=1000)
    assert nothing_left(tmp_path)


def test_size_limit_declared_tar(dest, tmp_path, outside):
    ti, _ = tfile("big")
    ti.size = 1 << 30
    header = ti.tobuf(tarfile.GNU_FORMAT)  # a header declaring 1 GiB, no data after it
    refused(header + b"abc", dest, "big", ArchiveTooLarge, max_member=1 << 20)
    refused(tar(tfile("a", b"1" * 600), tfile("b", b"2" * 600)), dest, "b", ArchiveTooLarge,
            max_total=1000)
    assert nothing_left(tmp_path)


def test_size_limit_on_a_decompression_bomb(dest, tmp_path, outside):
    """16 MiB of zeros compress to almost nothing; refused before being inflated."""
    bomb = gzip.compress(newc(cfile("zeros", b"\0" * (16 << 20))), compresslevel=1)
    assert len(bomb) < 1 << 20
    refused(bomb, dest, "zeros", ArchiveTooLarge, max_total=1 << 20)
    assert nothing_left(tmp_path)


def test_member_count_limit(dest, tmp_path, outside):
    cp = newc(*(cfile(f"f{i}") for i in range(10)))
    assert "more than 5 members" in refused(cp, dest, "f5", ArchiveTooLarge, max_members=5)
    tr = tar(*(tfile(f"f{i}") for i in range(10)))
    refused(tr, dest, "f5", ArchiveTooLarge, max_members=5)
    assert nothing_left(tmp_path)


def test_truncated_cpio(dest, tmp_path, outside):
    full = newc(cfile("a", b"A" * 1000), cfile("b", b"B" * 1000))
    with pytest.raises(CorruptArchive, match="truncated"):
        extract_archive(full[:600], dest)  # inside a's data
    with pytest.raises(CorruptArchive, match="truncated"):
        extract_archive(full[:1150], dest)  # inside b's header
    with pytest.raises(CorruptArchive, match="TRAILER"):
        extract_archive(newc(cfile("a"), trailer=False), dest)  # no trailer
    with pytest.raises(CorruptArchive, match="truncated"):
        extract_archive(gzip.compress(full)[:-12], dest)  # compressed stream cut short
    assert nothing_left(tmp_path)


def test_truncated_tar(dest, tmp_path, outside):
    full = tar(tfile("a", b"A" * 1000), tfile("b", b"B" * 1000))
    with pytest.raises(CorruptArchive):
        extract_archive(full[:800], dest)  # inside a's data
    with pytest.raises(CorruptArchive, match="truncated tar header"):
        extract_archive(full[:1536 + 100], dest)  # inside b's header
    garbled = bytearray(full)
    garbled[1536:1546] = b"garbage!!!"
    with pytest.raises(CorruptArchive, match="invalid tar header"):
        extract_archive(bytes(garbled), dest)
    with pytest.raises(CorruptArchive):
        extract_archive(lzma.compress(full)[:-30], dest)
    assert nothing_left(tmp_path)


def test_crc_checksum_verified(dest, tmp_path, outside):
    good = newc_entry("a", REG | 0o644, b"abc", check=sum(b"abc"), magic=b"070702")
    extract_archive(newc(good), dest)
    assert (dest / "a").read_bytes() == b"abc"
    bad = newc_entry("a", REG | 0o644, b"abc", check=1, magic=b"070702")
    with pytest.raises(CorruptArchive, match="checksum"):
        extract_archive(newc(bad), tmp_path / "d2")


def test_unsupported_and_garbage(dest, tmp_path):
    with pytest.raises(UnsupportedArchive, match="not a cpio or tar"):
        extract_archive(b"PK\x03\x04 a zip file" + b"\0" * 600, dest)
    with pytest.raises(UnsupportedArchive, match="lz4"):
        extract_archive(b"\x04\x22\x4d\x18" + b"\0" * 100, dest)
    with pytest.raises(CorruptArchive, match="empty"):
        extract_archive(b"", dest)
    with pytest.raises(CorruptArchive, match="bad cpio header magic"):
        extract_archive(newc(cfile("a"), trailer=False) + b"123456" + b"\0" * 200, dest)
    with pytest.raises(CorruptArchive, match="malformed cpio header"):
        extract_archive(newc(cfile("a"), trailer=False) + b"070701XYZ" + b"\0" * 200, dest)
    assert not dest.exists()


def test_zstd_without_the_module_names_it(dest, monkeypatch):
    zstd = pytest.importorskip("zstandard")
    data = zstd.ZstdCompressor().compress(newc(cfile("a")))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(UnsupportedArchive, match="'zstandard'"):
        extract_archive(data, dest)


def test_directory_not_replaced_by_file(dest):
    refused(tar(tdir("d"), tfile("d/x"), tfile("d")), dest, "d")
    refused(tar(tfile("f"), tfile("f/x")), dest, "f/x")  # a file is not a directory


# -- existing destinations -------------------------------------------------------------


def test_merge_into_existing_destination(tmp_path):
    dest = tmp_path / "etc"
    dest.mkdir()
    (dest / "keep").write_bytes(b"old")
    (dest / "hostname").write_bytes(b"old")
    (dest / "sub").mkdir(mode=0o700)
    res = extract_archive(tar(tfile("hostname", b"web1\n"), tdir("sub"), tfile("sub/new", b"n"),
                              tdir("newdir"), tfile("newdir/f", b"f")), dest)
    assert (dest / "keep").read_bytes() == b"old"
    assert (dest / "hostname").read_bytes() == b"web1\n"
    assert (dest / "sub" / "new").read_bytes() == b"n" and (dest / "newdir" / "f").read_bytes() == b"f"
    assert stat.S_IMODE(os.stat(dest / "sub").st_mode) == 0o700  # existing dirs keep theirs
    assert not [p for p in dest.iterdir() if p.name.startswith(".supercharge-extract-")]
    assert res.files == 3


def test_refusal_leaves_existing_destination_unchanged(tmp_path, outside):
    dest = tmp_path / "etc"
    dest.mkdir()
    (dest / "hostname").write_bytes(b"old")
    with pytest.raises(UnsafeArchive):
        extract_archive(tar(tfile("hostname", b"new"), tfile("../outside/x")), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["hostname"]
    assert (dest / "hostname").read_bytes() == b"old"
    assert untouched(outside)


def test_merge_does_not_follow_absolute_symlinks_in_destination(tmp_path, outside):
    dest = tmp_path / "root"
    dest.mkdir()
    os.symlink(str(outside), dest / "etc")
    with pytest.raises(UnsafeArchive):
        extract_archive(tar(tdir("etc"), tfile("etc/passwd", b"evil")), dest)
    assert untouched(outside)


# -- benign round trips ----------------------------------------------------------------


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc" / "ssh").mkdir(parents=True)
    (root / "etc" / "hostname").write_bytes(b"web1\n")
    (root / "etc" / "shadow").write_bytes(b"root:*:1:0:99999:7:::\n")
    os.chmod(root / "etc" / "shadow", 0o640)
    (root / "etc" / "ssh" / "key").write_bytes(bytes(range(256)) * 300)
    (root / "empty").mkdir(mode=0o700)
    os.chmod(root / "empty", 0o700)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-alias")
    os.symlink("tool", root / "bin" / "link")
    os.symlink("/usr/share/zoneinfo/UTC", root / "etc" / "localtime")
    (root / "ro").mkdir()
    (root / "ro" / "f").write_bytes(b"")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("long-name-" * 12)).write_bytes(b"pax or gnu long names")
    os.chmod(root / "ro", 0o555)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames + ["."]:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            if name == "." and Path(dirpath) != root:
                continue
            rel = str(path.relative_to(root)) if name != "." else "."
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), int(st.st_mtime))
            elif stat.S_ISREG(st.st_mode):
                first = inodes.setdefault(st.st_ino, rel)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime),
                            path.read_bytes(), first if first != rel else None)
            else:
                out[rel] = ("special", st.st_mode, st.st_rdev)
    return out


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "src"
    make_tree(root)
    return root


def gnu_cpio(tree: Path, fmt: str = "newc") -> bytes:
    need("cpio")
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    return subprocess.run(["cpio", "-o", "--quiet", "-H", fmt], cwd=tree, input=names,
                          capture_output=True, check=True).stdout


def gnu_tar(tree: Path, fmt: str = "gnu") -> bytes:
    need("tar")
    return subprocess.run(["tar", "-C", str(tree), f"--format={fmt}", "-cf", "-", "."],
                          capture_output=True, check=True).stdout


def zstd_compress(data: bytes) -> bytes:
    zstd = pytest.importorskip("zstandard")
    return zstd.ZstdCompressor(level=3).compress(data)


COMPRESSORS = {
    "none": lambda d: d,
    "gzip": lambda d: gzip.compress(d, 6),
    "xz": lambda d: lzma.compress(d),
    "bzip2": lambda d: bz2.compress(d),
    "zstd": zstd_compress,
}


@pytest.mark.parametrize("compression", list(COMPRESSORS))
@pytest.mark.parametrize("maker", ["cpio-newc", "cpio-crc", "cpio-odc", "tar-gnu", "tar-pax"])
def test_round_trip(maker, compression, tree, tmp_path):
    kind, fmt = maker.split("-")
    if kind == "cpio":
        plain = gnu_cpio(tree, fmt)
    else:
        plain = gnu_tar(tree, fmt)
    data = COMPRESSORS[compression](plain)
    src = tmp_path / "archive"
    src.write_bytes(data)
    assert archive_format(src) == ("tar" if kind == "tar" else f"cpio-{fmt}", compression)
    dest = tmp_path / "out"
    res = extract_archive(src, dest)
    assert isinstance(res, ExtractResult)
    assert snapshot(dest) == snapshot(tree)
    assert res.symlinks == 2 and res.hardlinks == 1
    assert res.format == ("tar" if kind == "tar" else f"cpio-{fmt}")


def test_round_trip_devices_as_root(tmp_path):
    if not IS_ROOT:
        pytest.skip("creating device nodes needs root")
    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    os.mknod(src / "dev" / "console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(src / "dev" / "vda", stat.S_IFBLK | 0o660, os.makedev(254, 0))
    os.mkfifo(src / "dev" / "fifo", 0o644)
    for maker in (gnu_cpio, gnu_tar):
        dest = tmp_path / f"out-{maker.__name__}"
        extract_archive(maker(src), dest, allow_devices=True)
        for name in ("console", "vda", "fifo"):
            a, b = os.lstat(src / "dev" / name), os.lstat(dest / "dev" / name)
            assert (a.st_mode, a.st_rdev) == (b.st_mode, b.st_rdev)


def test_ustar_written_by_tarfile(dest):
    extract_archive(tar(tdir("etc"), tfile("etc/hostname", b"h\n"), fmt=tarfile.USTAR_FORMAT), dest)
    assert (dest / "etc" / "hostname").read_bytes() == b"h\n"


def test_concatenated_cpio_archives(dest):
    extract_archive(newc(cfile("a", b"1")) + b"\0" * 512 + newc(cfile("b", b"2")), dest)
    assert (dest / "a").read_bytes() == b"1" and (dest / "b").read_bytes() == b"2"


def test_ownership_only_when_asked(tmp_path):
    if not IS_ROOT:
        pytest.skip("chown needs root")
    ti, data = tfile("f")
    ti.uid, ti.gid = 1234, 5678
    extract_archive(tar((ti, data)), tmp_path / "a")
    assert os.stat(tmp_path / "a" / "f").st_uid == 0
    extract_archive(tar((ti, data)), tmp_path / "b", preserve_owner=True)
    st = os.stat(tmp_path / "b" / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_list_archive(tree):
    members = {m.name: m for m in list_archive(gnu_tar(tree))}
    assert members["./bin/link"].kind == "symlink" and members["./bin/link"].linkname == "tool"
    assert members["./etc/shadow"].mode == 0o640 and members["./etc/shadow"].kind == "file"
    assert {m.kind for m in members.values()} == {"dir", "file", "symlink", "hardlink"}
    cpio_members = {m.name: m for m in list_archive(gnu_cpio(tree))}
    assert cpio_members["etc/hostname"].size == 5
    # Listing does not judge safety: a hostile name is listed as stored.
    assert [m.name for m in list_archive(tar(tfile("/abs")))] == ["/abs"]
