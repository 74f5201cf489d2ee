"""VBD exports with the real tools: qcow2 overlays made by qemu-img and written through with
qemu-io, LVM snapshots on a loop device, the qemu backend's view of overlays, and container
files whose [export ...] expressions give the stripped config its disk lines."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dom0 import exports
from dom0.errors import EnvironmentProblem, UserError
from dom0.qemu import QemuSettings, qemu_command
from dom0.rootfs import make_ext4_image
from dom0.xlcfg import DiskSpec, load_domain_config, parse_disk_spec, parse_xl_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                       reason="needs qemu-img and qemu-io (Debian's qemu-utils)"),
]

MIB = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_io(image: Path, command: str, fmt: str = "qcow2") -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(image)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A shared ext4 image with real files in it, in ``tmp_path/images``."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("shared\n")
    (tree / "usr" / "share").mkdir(parents=True)
    (tree / "usr" / "share" / "blob").write_bytes(os.urandom(2 * MIB))
    (tmp_path / "images").mkdir()
    return make_ext4_image(tree, tmp_path / "images" / "base.img", "sc-shared", size_mib=16)


# --- qcow2 overlays -------------------------------------------------------------------


def test_writes_through_an_overlay_leave_the_base_unchanged(base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    overlay = tmp_path / "web1-xvda.qcow2"
    action, allocated = exports.create_overlay(base, overlay)
    assert action == "overlay created"
    header = exports.read_qcow2_header(overlay)
    assert header is not None and header.size == base.stat().st_size
    assert exports.backing_path(overlay, header) == base
    assert header.backing_format == "raw"
    assert 0 < allocated < base.stat().st_size // 20

    wrote = qemu_io(overlay, "write -P 0x5a 0 1M")
    assert wrote.returncode == 0, wrote.stderr
    assert qemu_io(overlay, "read -P 0x5a 0 1M").returncode == 0
    assert sha256(base) == before                                  # the base was not written
    assert exports.allocated_bytes(overlay) >= MIB                 # the write landed in the overlay

    # Everything not written reads as the base.
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    with open(flat, "rb") as merged, open(base, "rb") as original:
        assert merged.read(MIB) == b"\x5a" * MIB
        original.seek(MIB)
        assert merged.read() == original.read()
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_two_overlays_over_one_base_are_independent(base: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    exports.create_overlay(base, a)
    exports.create_overlay(base, b)
    assert qemu_io(a, "write -P 0x11 4M 64k").returncode == 0
    assert qemu_io(b, "write -P 0x22 4M 64k").returncode == 0
    assert qemu_io(a, "read -P 0x11 4M 64k").returncode == 0
    assert qemu_io(b, "read -P 0x22 4M 64k").returncode == 0
    with open(base, "rb") as original:
        original.seek(4 * MIB)
        expected = original.read(64 * 1024)
    # b's view of a's region is still the base's bytes (compare through qemu-img).
    flat = tmp_path / "b.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(a), str(flat)], check=True)
    with open(flat, "rb") as merged:
        merged.seek(8 * MIB)
        with open(base, "rb") as original:
            original.seek(8 * MIB)
            assert merged.read(MIB) == original.read(MIB)
    assert expected != b"\x11" * len(expected)


def test_an_existing_overlay_is_kept_or_replaced_never_clobbered(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "o.qcow2"
    exports.create_overlay(base, overlay)
    assert qemu_io(overlay, "write -P 0x33 0 64k").returncode == 0
    action, _ = exports.create_overlay(base, overlay)
    assert action.startswith("overlay kept")
    assert qemu_io(overlay, "read -P 0x33 0 64k").returncode == 0          # the domain's data
    action, _ = exports.create_overlay(base, overlay, keep=False)
    assert action == "overlay created"
    assert qemu_io(overlay, "read -P 0x33 0 64k").returncode != 0          # fresh again

    other = make_ext4_image(tmp_path / "tree", tmp_path / "other.img", "sc-other", size_mib=16)
    with pytest.raises(UserError, match=f"is an overlay of {base}, not of {other}; it is left alone"):
        exports.create_overlay(other, overlay)
    precious = tmp_path / "precious.qcow2"
    precious.write_bytes(b"not an overlay")
    with pytest.raises(UserError, match="exists and is not a qcow2 overlay; it is left alone"):
        exports.create_overlay(base, precious)
    assert precious.read_bytes() == b"not an overlay"


def test_overlay_errors_leave_nothing_behind(base: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="x.ct:3:9: image .*/missing.img not found"):
        exports.create_overlay(tmp_path / "missing.img", tmp_path / "m.qcow2", where="x.ct:3:9")
    with pytest.raises(UserError, match="expected a qcow2 image \\(format qcow2\\), found a raw image"):
        exports.create_overlay(base, tmp_path / "q.qcow2", "qcow2")
    with pytest.raises(UserError, match="the overlay's directory does not exist"):
        exports.create_overlay(base, tmp_path / "nowhere" / "o.qcow2")
    with pytest.raises(UserError, match="is the base image itself"):
        exports.create_overlay(base, base)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".qcow2" or p.suffix == ".tmp") == []


def test_overlay_of_a_qcow2_base(base: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(base), str(golden)], check=True)
    overlay = tmp_path / "chained.qcow2"
    exports.create_overlay(golden, overlay, "qcow2")
    header = exports.read_qcow2_header(overlay)
    assert header is not None and header.backing_format == "qcow2"
    assert exports.image_format(golden) == "qcow2" and exports.image_format(base) == "raw"


def test_missing_qemu_img_names_the_package(base: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EnvironmentProblem) as info:
        exports.create_overlay(base, tmp_path / "o.qcow2")
    assert str(info.value) == ("'qemu-img' not found: install Debian's qemu-utils package "
                               "(apt-get install qemu-utils)")
    assert info.value.exit_code == 3


def test_disk_specs_for_each_kind() -> None:
    assert exports.disk_spec("/i/usr.img", "xvdb", "ro").to_spec() == \
        "format=raw, vdev=xvdb, access=ro, target=/i/usr.img"
    assert exports.disk_spec("/i/w.qcow2", "xvda", "rw", "qcow2") == DiskSpec(
        target="/i/w.qcow2", vdev="xvda", format="qcow2", access="rw", backendtype="qdisk")
    assert exports.disk_spec("/dev/vg0/w-var", "xvdc", "rw").backendtype == "phy"


# --- the qemu backend boots overlays --------------------------------------------------


def test_qemu_drive_for_an_overlay_and_a_missing_base(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "o.qcow2"
    exports.create_overlay(base, overlay)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    cfg = tmp_path / "d.cfg"
    cfg.write_text(f"name = 'd'\nkernel = 'vmlinuz'\n"
                   f"disk = ['format=qcow2, vdev=xvda, access=rw, backendtype=qdisk, target={overlay}',\n"
                   f"        'format=raw, vdev=xvdb, access=ro, target={base}']\n")
    drives = [arg for arg in qemu_command(load_domain_config(cfg), tmp_path / "c.log",
                                          QemuSettings(accel="tcg")) if arg.startswith("file=")]
    assert drives == [f"file={overlay},format=qcow2,if=virtio,cache=unsafe,readonly=off",
                      f"file={base},format=raw,if=virtio,cache=unsafe,readonly=on"]


def test_qemu_refuses_an_overlay_whose_base_is_gone(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "o.qcow2"
    exports.create_overlay(base, overlay)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    cfg = tmp_path / "d.cfg"
    cfg.write_text(f"name = 'd'\nkernel = 'vmlinuz'\ndisk = ['{overlay},qcow2,xvda,w']\n")
    base.unlink()
    with pytest.raises(UserError) as info:
        qemu_command(load_domain_config(cfg), tmp_path / "c.log", QemuSettings(accel="tcg"))
    assert str(info.value) == (f"{cfg}: disk xvda: {overlay} is an overlay of {base}, which does not "
                               "exist (the shared base image was moved or removed)")


# --- LVM snapshots on a loop device ---------------------------------------------------


def _device_mapper_refused() -> str | None:
    """Why LVM cannot run here, or None."""
    if os.geteuid() != 0:
        return "LVM needs root"
    if shutil.which("lvcreate") is None:
        return "lvm2 is not installed (./run installs it)"
    subprocess.run(["modprobe", "dm_mod"], capture_output=True)
    proc = subprocess.run(["dmsetup", "version"], capture_output=True, text=True)
    if proc.returncode != 0 or not Path("/dev/mapper/control").exists():
        return ("the kernel refuses device-mapper here (no /dev/mapper/control; dm_mod is not "
                "built in and cannot be loaded), so no logical volume can be activated")
    return None


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


@pytest.fixture
def volume_group(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A VG on a loop device with one 32 MiB LV holding ext4; removed even when the test fails."""
    reason = _device_mapper_refused()
    if reason:
        pytest.skip(reason)
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as handle:
        handle.truncate(96 * MIB)
    vg = f"scvg{uuid.uuid4().hex[:8]}"
    loop = ""
    try:
        loop = _run("losetup", "--find", "--show", str(backing)).strip()
        _run("pvcreate", "-q", loop)
        _run("vgcreate", "-q", vg, loop)
        _run("lvcreate", "-q", "-y", "-L", "32m", "-n", "base", vg)
        origin = Path("/dev") / vg / "base"
        _run("mkfs.ext4", "-q", "-L", "sc-lv-base", str(origin))
        yield vg, origin
    finally:
        subprocess.run(["vgchange", "-q", "-an", vg], capture_output=True)
        subprocess.run(["vgremove", "-q", "-f", vg], capture_output=True)
        if loop:
            subprocess.run(["pvremove", "-q", "-ff", "-y", loop], capture_output=True)
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_lvm_snapshot_of_a_logical_volume(volume_group: tuple[str, Path]) -> None:
    vg, origin = volume_group
    before = sha256(origin)
    snap, action = exports.lvm_snapshot(origin, "web1-xvdc", 8 * MIB)
    assert (snap, action) == (Path("/dev") / vg / "web1-xvdc", "snapshot created")
    info = exports.logical_volume(snap)
    assert info is not None and info.origin == "base"
    with open(snap, "r+b") as handle:          # the domain writes to its snapshot
        handle.write(b"\xab" * 65536)
        handle.flush()
        os.fsync(handle.fileno())
    assert sha256(origin) == before
    assert exports.lvm_snapshot(origin, "web1-xvdc")[1].startswith("snapshot kept")
    assert exports.lvm_snapshot(origin, "web1-xvdc", keep=False)[1] == "snapshot created"
    with pytest.raises(UserError, match="is not a snapshot of"):
        exports.lvm_snapshot(Path("/dev") / vg / "web1-xvdc", "base")


def test_lvm_snapshot_of_something_else_is_refused(tmp_path: Path) -> None:
    if shutil.which("lvs") is None:
        pytest.skip("lvm2 is not installed (./run installs it)")
    with pytest.raises(UserError, match="expected a logical volume"):
        exports.lvm_snapshot(tmp_path / "not-a-volume", "snap")
    with pytest.raises(UserError, match="snapshot name '-x'"):
        exports.lvm_snapshot(tmp_path / "not-a-volume", "-x")


# --- container files giving disk lines ---------------------------------------------------


def supercharge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dom0", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_container_exports_give_disk_lines_and_overlays(base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    images = base.parent
    own = images / "db.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(own), "16M"], check=True)
    container = tmp_path / "web1.ct"
    container.write_text(f"""\
name = "web1"
kernel = "/boot/vmlinuz"
disk = [ "format=raw, vdev=xvdz, access=ro, target=/srv/other.img" ]

# The shared root, copy-on-write, with the overlay named; /usr shared read-only.
[export {base} xvda cow
 overlay overlays/web1-root.qcow2
] [end]
[export {base} xvdb ro] [end]
[export images/db.qcow2 xvdc rw format qcow2] [end]
# A second cow view with the default overlay name, beside the base.
[export {base} xvdd cow existing replace] [end]
""")
    (tmp_path / "overlays").mkdir()
    proc = supercharge("container", str(container), "--stripped", str(tmp_path / "web1.cfg"),
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stripped = (tmp_path / "web1.cfg").read_text()
    assert "disk += [" in stripped and "[export" not in stripped
    disks = [parse_disk_spec(d) for d in parse_xl_config(stripped)["disk"]]
    overlay = tmp_path / "overlays" / "web1-root.qcow2"
    default = images / "web1-xvdd.qcow2"
    assert disks[1:] == [
        DiskSpec(target=str(overlay), vdev="xvda", format="qcow2", access="rw", backendtype="qdisk"),
        DiskSpec(target=str(base), vdev="xvdb", format="raw", access="ro"),
        DiskSpec(target=str(own), vdev="xvdc", format="qcow2", access="rw", backendtype="qdisk"),
        DiskSpec(target=str(default), vdev="xvdd", format="qcow2", access="rw", backendtype="qdisk"),
    ]
    for made in (overlay, default):
        header = exports.read_qcow2_header(made)
        assert header is not None and exports.backing_path(made, header) == base
    assert "overlay created" in proc.stdout and "shared read-only, disk xvdb" in proc.stdout
    assert sha256(base) == before

    # A second run keeps the named overlay (the domain's data) and replaces the other.
    assert qemu_io(overlay, "write -P 0x44 0 64k").returncode == 0
    again = supercharge("container", str(container), "--stripped", str(tmp_path / "web1.cfg"),
                        cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "overlay kept" in again.stdout
    assert qemu_io(overlay, "read -P 0x44 0 64k").returncode == 0


@pytest.mark.parametrize("body, message", [
    ("[export {base} xvda cow format qcow2] [end]",
     "{ct}:1:9: image {base}: expected a qcow2 image (format qcow2), found a raw image "
     "(write 'format raw')"),
    ("[export missing.img xvda ro] [end]", "{ct}:1:9: image {tmp}/missing.img not found"),
    ("[export {base} xvda cow overlay {base}] [end]",
     "{ct}:1:9: the overlay {base} is the base image itself"),
    ("[export {base} xvda rw snapshot x] [end]",
     "{ct}:1:{col}: expected 'snapshot' only with access cow (it says how the copy-on-write view "
     "is made), found 'snapshot' with access rw"),
    ("[export {base} xvda cow\n overlay o.qcow2\n] [end]\n[export {base} sda9x ro] [end]",
     "{ct}:4:{col2}: expected a guest disk name like xvdb (xvd, sd, hd or vd, then letters, then "
     "an optional partition number), found 'sda9x'"),
])
def test_container_export_errors(base: Path, tmp_path: Path, body: str, message: str) -> None:
    """One line, FILE:LINE:COL, exit code 2; a parse error makes nothing (no overlay, no config)."""
    container = tmp_path / "web1.ct"
    text = body.format(base=base)
    container.write_text(text)
    proc = supercharge("container", str(container), "--stripped", str(tmp_path / "web1.cfg"),
                       cwd=tmp_path)
    col = text.find("snapshot") + 1
    col2 = len(f"[export {base} ") + 1
    expected = message.format(ct=container, base=base, tmp=tmp_path, col=col, col2=col2)
    assert (proc.returncode, proc.stderr) == (2, f"supercharge: {expected}\n")
    assert not (tmp_path / "web1.cfg").exists()
    assert not list(tmp_path.glob("*.qcow2")) and not list(base.parent.glob("*.qcow2"))
