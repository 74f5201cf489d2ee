"""Superblock reading against images made by the real mkfs tools, and device waiting.

Image files stand in for block devices: read_fs_identity reads a regular file the
same way, and wait_for_devices is pointed at a fake /sys/class/block + /dev in
tmp_path whose "nodes" are those files, so neither root nor loop devices are needed.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from guest_init.devices import (
    AmbiguousDevice,
    DeviceTimeout,
    FsIdentity,
    list_block_devices,
    read_fs_identity,
    wait_for_devices,
)
from guest_init.plan import DeviceRef

pytestmark = pytest.mark.integration

UUID_A = "0b9f5c1e-1111-2222-3333-444455556666"
UUID_B = "7d3c2a10-aaaa-4bbb-8ccc-dddddddddddd"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def make_ext(path: Path, kind: str = "ext4", label: str = "", uuid: str = "", *extra: str) -> Path:
    need(f"mkfs.{kind}")
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    args = [f"mkfs.{kind}", "-q", "-F"]
    if label:
        args += ["-L", label]
    if uuid:
        args += ["-U", uuid]
    subprocess.run([*args, *extra, str(path)], check=True, capture_output=True)
    return path


def blkid(path: Path) -> dict[str, str] | None:
    """util-linux's view, when it is installed, as the reference to agree with."""
    if shutil.which("blkid") is None:
        return None
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def agrees_with_blkid(path: Path, ident: FsIdentity) -> None:
    ref = blkid(path)
    if ref is None:
        return
    assert ref.get("TYPE") == ident.fstype
    assert ref.get("LABEL") == ident.label
    assert ref.get("UUID") == ident.uuid


# ---------------------------------------------------------------- superblocks


@pytest.mark.parametrize("kind", ["ext2", "ext3", "ext4"])
def test_ext_label_uuid_and_kind(tmp_path: Path, kind: str) -> None:
    img = make_ext(tmp_path / f"{kind}.img", kind, "web1-root", UUID_A.upper())
    ident = read_fs_identity(img)
    assert ident == FsIdentity(kind, "web1-root", UUID_A)
    agrees_with_blkid(img, ident)


def test_ext4_without_journal_is_still_ext4(tmp_path: Path) -> None:
    img = make_ext(tmp_path / "nj.img", "ext4", "nj", UUID_B, "-O", "^has_journal")
    assert read_fs_identity(img) == FsIdentity("ext4", "nj", UUID_B)


def test_ext_without_label(tmp_path: Path) -> None:
    img = make_ext(tmp_path / "nl.img", "ext4", "", UUID_B)
    assert read_fs_identity(img) == FsIdentity("ext4", None, UUID_B)


def test_ext_sixteen_byte_label(tmp_path: Path) -> None:
    img = make_ext(tmp_path / "l16.img", "ext4", "abcdefghijklmnop", UUID_A)
    assert read_fs_identity(img).label == "abcdefghijklmnop"  # type: ignore[union-attr]


def test_unknown_and_short_content(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    assert read_fs_identity(zeros) is None
    short = tmp_path / "short.img"
    short.write_bytes(b"XFSB")
    assert read_fs_identity(short) is None
    empty = tmp_path / "empty.img"
    empty.touch()
    assert read_fs_identity(empty) is None


def test_unreadable_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_fs_identity(tmp_path / "absent.img")


def sized(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_xfs(tmp_path: Path) -> None:
    need("mkfs.xfs")
    img = sized(tmp_path / "xfs.img", 300 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-L", "xlabel", "-m", f"uuid={UUID_A}", str(img)], check=True, capture_output=True)
    ident = read_fs_identity(img)
    assert ident == FsIdentity("xfs", "xlabel", UUID_A)
    agrees_with_blkid(img, ident)


def test_btrfs(tmp_path: Path) -> None:
    need("mkfs.btrfs")
    img = sized(tmp_path / "btrfs.img", 128 << 20)
    fresh = str(uuid.uuid4())  # mkfs.btrfs refuses a UUID it has seen on this machine
    subprocess.run(["mkfs.btrfs", "-q", "-L", "blabel", "-U", fresh, str(img)], check=True, capture_output=True)
    ident = read_fs_identity(img)
    assert ident == FsIdentity("btrfs", "blabel", fresh)
    agrees_with_blkid(img, ident)


@pytest.mark.parametrize("fat,size", [("32", 40 << 20), ("16", 16 << 20)])
def test_vfat(tmp_path: Path, fat: str, size: int) -> None:
    need("mkfs.vfat")
    img = sized(tmp_path / f"fat{fat}.img", size)
    subprocess.run(["mkfs.vfat", "-F", fat, "-n", "BOOT", "-i", "abcd1234", str(img)], check=True, capture_output=True)
    ident = read_fs_identity(img)
    assert ident == FsIdentity("vfat", "BOOT", "ABCD-1234")
    agrees_with_blkid(img, ident)
    assert ident.matches(DeviceRef(uuid="abcd-1234"))


def test_swap(tmp_path: Path) -> None:
    need("mkswap")
    img = sized(tmp_path / "swap.img", 8 << 20)
    img.chmod(0o600)
    subprocess.run(["mkswap", "-L", "swaplabel", "-U", UUID_B, str(img)], check=True, capture_output=True)
    ident = read_fs_identity(img)
    assert ident == FsIdentity("swap", "swaplabel", UUID_B)
    agrees_with_blkid(img, ident)


# --------------------------------------------------------- fake sysfs and /dev


class FakeMachine:
    """A /sys/class/block and /dev in tmp_path whose nodes are image files."""

    def __init__(self, base: Path) -> None:
        self.sys_block = base / "sys" / "class" / "block"
        self.dev_dir = base / "dev"
        self.sys_block.mkdir(parents=True)
        self.dev_dir.mkdir()

    def add(self, name: str, image: Path | None, size: int | None = None, node: bool = True) -> Path:
        entry = self.sys_block / name
        entry.mkdir()
        if size is None:
            size = image.stat().st_size // 512 if image is not None else 0
        (entry / "size").write_text(f"{size}\n")
        path = self.dev_dir / name
        if node:
            if image is not None:
                path.symlink_to(image)
            else:
                path.write_bytes(b"")
        return path

    def wait(self, refs: list[DeviceRef], timeout: float) -> dict[str, Path]:
        return wait_for_devices(refs, timeout, sys_block=self.sys_block, dev_dir=self.dev_dir, poll_interval=0.01)


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path / "m")


def test_list_block_devices(machine: FakeMachine, tmp_path: Path) -> None:
    img = sized(tmp_path / "blank.img", 1 << 20)
    machine.add("vda", img)
    machine.add("vda1", img)
    machine.add("ram0", img)
    machine.add("loop0", None, size=0)
    machine.add("loop1", img)
    machine.add("sr0", None, size=0)
    machine.add("vdb", img, node=False)  # devtmpfs has no node (yet)
    names = [p.name for p in list_block_devices(machine.sys_block, machine.dev_dir)]
    assert names == ["loop1", "vda", "vda1"]
    assert list_block_devices(machine.sys_block / "absent", machine.dev_dir) == []


def test_wait_finds_by_label_and_uuid(machine: FakeMachine, tmp_path: Path) -> None:
    root = make_ext(tmp_path / "root.img", "ext4", "web1-root", UUID_A)
    usr = make_ext(tmp_path / "usr.img", "ext4", "web1-usr", UUID_B)
    machine.add("vda", sized(tmp_path / "blank.img", 1 << 20))  # no file system
    machine.add("vdb", root)
    machine.add("vdc", usr)
    refs = [DeviceRef(label="web1-root"), DeviceRef(uuid=UUID_B)]
    found = machine.wait(refs, 1.0)
    assert found == {"LABEL=web1-root": machine.dev_dir / "vdb", f"UUID={UUID_B}": machine.dev_dir / "vdc"}


def test_wait_for_nothing_returns_at_once(machine: FakeMachine) -> None:
    assert machine.wait([], 0) == {}


def test_wait_sees_late_device(machine: FakeMachine, tmp_path: Path) -> None:
    """Virtual disks show up after the agent starts: polling must pick them up."""
    img = make_ext(tmp_path / "late.img", "ext4", "late", UUID_A)
    timer = threading.Timer(0.2, machine.add, ("xvdb", img))
    timer.start()
    try:
        started = time.monotonic()
        found = machine.wait([DeviceRef(label="late")], 10.0)
    finally:
        timer.join()
    assert found == {"LABEL=late": machine.dev_dir / "xvdb"}
    assert time.monotonic() - started < 5


def test_wait_timeout_reports_what_it_saw(machine: FakeMachine, tmp_path: Path) -> None:
    machine.add("vda", make_ext(tmp_path / "other.img", "ext4", "other", UUID_A))
    machine.add("vdb", sized(tmp_path / "blank.img", 1 << 20))
    refs = [DeviceRef(label="web1-root"), DeviceRef(uuid=UUID_A), DeviceRef(uuid=UUID_B)]
    started = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        machine.wait(refs, 0.2)
    assert 0.2 <= time.monotonic() - started < 3
    err = info.value
    assert err.missing == ["LABEL=web1-root", f"UUID={UUID_B}"]
    vda, vdb = str(machine.dev_dir / "vda"), str(machine.dev_dir / "vdb")
    assert err.seen == [
        {"device": vda, "fstype": "ext4", "label": "other", "uuid": UUID_A},
        {"device": vdb, "fstype": None, "label": None, "uuid": None},
    ]
    assert str(err) == (
        f"no block device with LABEL=web1-root, UUID={UUID_B} after 0.2 s "
        f"(seen: {vda} ext4 LABEL=other UUID={UUID_A}, {vdb} no file system)"
    )


def test_wait_timeout_with_no_devices(machine: FakeMachine) -> None:
    with pytest.raises(DeviceTimeout, match=r"after 0\.0 s \(seen: no block devices\)") as info:
        machine.wait([DeviceRef(label="x")], 0)
    assert info.value.seen == []


def test_wait_ambiguous_label(machine: FakeMachine, tmp_path: Path) -> None:
    machine.add("vda", make_ext(tmp_path / "a.img", "ext4", "web1-root", UUID_A))
    machine.add("vdb", make_ext(tmp_path / "b.img", "ext3", "web1-root", UUID_B))
    with pytest.raises(AmbiguousDevice) as info:
        machine.wait([DeviceRef(label="web1-root")], 5.0)
    a, b = machine.dev_dir / "vda", machine.dev_dir / "vdb"
    assert info.value.devices == [a, b]
    assert f"LABEL=web1-root is ambiguous: found on {a} and {b}" in str(info.value)
    # The other one is unambiguous by UUID.
    assert machine.wait([DeviceRef(uuid=UUID_B)], 1.0) == {f"UUID={UUID_B}": b}


def test_wait_reads_each_device_once(
    machine: FakeMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import guest_init.devices as devices

    machine.add("vda", make_ext(tmp_path / "a.img", "ext4", "a", UUID_A))
    reads: list[Path] = []
    real = devices.read_fs_identity

    def counting(path: Path) -> FsIdentity | None:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(devices, "read_fs_identity", counting)
    with pytest.raises(DeviceTimeout):
        machine.wait([DeviceRef(label="never")], 0.15)
    assert reads == [machine.dev_dir / "vda"]
