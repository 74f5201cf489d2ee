"""dom0 for the lab: a Debian minbase root with Xen's tools, and a tiny initramfs to mount it.

Why this shape (xen-notes.md): dom0's root (about 270 MB of files) does not fit
as an initramfs in dom0's 384 MB, so it is an ext4 image on a virtio disk that
qemu opens with ``snapshot=on`` (every run starts from the same bytes and the
cached image is never written).  The kernel is the cached guest kernel, which
has virtio_blk and ext4 as modules: a busybox initramfs loads them and
switches to the root.  Xen's dom0 modules (evtchn, xenfs, privcmd, gntdev,
gntalloc, blkback, loop) are copied into the root from the same kernel.

Everything is built once per set of inputs (package versions, kernel, the
two init scripts, busybox) and kept under ``<cache>/xenlab/dom0-KEY/``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dom0.atomic import write_atomically
from dom0.cache import digest_of
from dom0.cpio import CpioWriter
from dom0.errors import EnvironmentProblem
from dom0.kernel import KernelRef
from dom0.kmod import resolve_modules

from dom0.rootfs import make_ext4_image
from dom0.tools import run_tool

from .hypervisor import candidate_version
from .scripts import DOM0_INIT, INITRAMFS_INIT, ROOT_LABEL

IMAGE_FORMAT = "1"   # bump when the layout below changes
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("xen-utils-4.17", "kmod", "procps", "python3", "e2fsprogs", "lvm2")
# Loaded by dom0's init (modprobe): Xen's device back ends, the loop driver
# that the block hotplug script attaches raw image files with, and
# device-mapper's snapshots for LVM copy-on-write exports.
DOM0_MODULES = ("xen-evtchn", "xenfs", "xen-privcmd", "xen-gntdev", "xen-gntalloc",
                "xen-blkback", "loop", "virtio_pci", "virtio_blk", "ext4", "dm-snapshot")
# Loaded by the initramfs (insmod, in dependency order) to reach the root disk.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
BUSYBOX = Path("/bin/busybox")
# Files that nothing in the lab reads: left out to keep the image small.
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
         "var/cache/apt/archives", "var/lib/apt/lists")


@dataclass(frozen=True)
class Dom0Image:
    """The cached parts of dom0: its kernel, initramfs and root image."""

    directory: Path
    key: str
    kernel: Path
    initramfs: Path
    root_image: Path
    cached: bool
    seconds: float


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here for the release (reachable when apt is).

    Reads one-line ``deb URI SUITE`` entries and deb822 ``URIs:``/``Suites:``
    stanzas; a security or updates-only entry is not a mirror of the release.
    """
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list")),
             *sorted((sources / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"(?m)^([A-Za-z-]+):\s*(.*)$", stanza))
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "deb" in fields.get("Types", "").split():
                    return fields.get("URIs", "").split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


def image_key(kernel: KernelRef, mirror: str) -> str:
    """What the image is made of: a change to any of it gives a new cache entry."""
    versions = [f"{pkg}={candidate_version(pkg)}" for pkg in ("xen-utils-4.17", "python3.11")]
    busybox = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest() if BUSYBOX.is_file() else ""
    return digest_of(IMAGE_FORMAT, SUITE, mirror, ",".join(PACKAGES), *versions, kernel.version,
                     (kernel.modules_dir / "modules.dep").read_bytes(), DOM0_INIT, INITRAMFS_INIT,
                     ",".join(DOM0_MODULES), ",".join(INITRAMFS_MODULES), busybox)


def build_dom0(cache: Path, kernel: KernelRef, *,
               log: Callable[[str], object] = print) -> Dom0Image:
    """dom0's kernel, initramfs and root image, from the cache or built now (about a minute)."""
    started = time.monotonic()
    if os.geteuid() != 0:
        raise EnvironmentProblem("building the Xen lab's dom0 needs root (debootstrap, mkfs.ext4 -d "
                                 "with owners kept)")
    if not BUSYBOX.is_file():
        raise EnvironmentProblem(f"{BUSYBOX} not found: install Debian's busybox-static package")
    mirror = debian_mirror()
    key = image_key(kernel, mirror)
    final = cache / f"dom0-{key}"
    parts = Dom0Image(final, key, final / "vmlinuz", final / "initramfs.cpio", final / "dom0.img",
                      cached=True, seconds=0.0)
    if (final / "info.json").is_file():
        return _with_time(parts, started)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dom0-build-", dir=cache))
    try:
        root = work / "root"
        log(f"xenlab: debootstrap {SUITE} from {mirror} (about a minute)")
        run_tool(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  SUITE, str(root), mirror], "debootstrap dom0's root", timeout=1800)
        _add_modules(root, kernel, DOM0_MODULES)
        _install_init(root)
        for rel in PRUNE:
            target = root / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        out = work / "out"
        out.mkdir()
        log("xenlab: packing dom0's root image")
        _ext4_image(root, out / "dom0.img", ROOT_LABEL)
        write_atomically(out / "initramfs.cpio", [_initramfs(kernel)])
        shutil.copyfile(kernel.vmlinuz, out / "vmlinuz")
        (out / "info.json").write_text(json.dumps({
            "key": key, "kernel": kernel.version, "mirror": mirror, "packages": list(PACKAGES),
            "xen_utils": candidate_version("xen-utils-4.17"),
            "built_seconds": round(time.monotonic() - started, 1)}, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
        _prune(cache, keep=final)
    finally:
        _remove_build_tree(work)
    return _with_time(Dom0Image(**{**parts.__dict__, "cached": False}), started)


def _prune(cache: Path, keep: Path) -> None:
    """Drop older dom0 images (800 MB each): a new key means their inputs are gone."""
    for old in cache.glob("dom0-*"):
        if old != keep and (old / "info.json").is_file():
            shutil.rmtree(old, ignore_errors=True)


def _with_time(image: Dom0Image, started: float) -> Dom0Image:
    return Dom0Image(**{**image.__dict__, "seconds": round(time.monotonic() - started, 1)})


def _add_modules(root: Path, kernel: KernelRef, names: tuple[str, ...]) -> None:
    """Copy ``names`` and their dependencies from the guest kernel, then depmod the root."""
    plan = resolve_modules(kernel.modules_dir, names)
    target = root / "usr" / "lib" / "modules" / kernel.version
    for module in plan.order:
        dest = target / module.relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module.path, dest)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules_dir / name).is_file():
            shutil.copy2(kernel.modules_dir / name, target / name)
    run_tool(["depmod", "-b", str(root), kernel.version], "depmod dom0's modules")


def _install_init(root: Path) -> None:
    init = root / "sbin" / "xenlab-init"
    init.write_text(DOM0_INIT)
    init.chmod(0o755)
    (root / "etc" / "hostname").write_text("xenlab-dom0\n")


def _ext4_image(tree: Path, image: Path, label: str) -> None:
    """An ext4 image of ``tree`` with room to spare (dom0 writes logs and xl state)."""
    used = int(run_tool(["du", "-s", "-B1M", str(tree)], "measure dom0's root").split()[0])
    make_ext4_image(tree, image, label, max(768, int(used * 1.6) + 128))


def _initramfs(kernel: KernelRef) -> bytes:
    """busybox-static, the modules to reach an ext4 virtio disk, and INITRAMFS_INIT."""
    plan = resolve_modules(kernel.modules_dir, INITRAMFS_MODULES)
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    for d in ("bin", "dev", "proc", "sys", "newroot"):
        writer.add_dir(d)
    writer.add_device("dev/console", "c", 5, 1, 0o600)
    writer.add_file("bin/busybox", BUSYBOX, 0o755)
    writer.add_symlink("bin/sh", "busybox")
    order = []
    for module in plan.order:
        rel = f"lib/modules/{kernel.version}/{module.relpath}"
        writer.add_file(rel, module.path, 0o644)
        order.append(rel)
    writer.add_file("modules.order", ("\n".join(order) + "\n").encode(), 0o644)
    writer.add_file("init", INITRAMFS_INIT.encode(), 0o755)
    writer.close()
    return buf.getvalue()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as handle:
        points = [line.split()[1].replace("\\040", " ") for line in handle]
    return [p for p in points if p.startswith(prefix)]


def _remove_build_tree(work: Path) -> None:
    """Remove a build tree, first undoing mounts a failed debootstrap may have left in it."""
    if not work.exists():
        return
    for point in sorted(_mounts_under(work), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if _mounts_under(work):
        raise EnvironmentProblem(f"{work}: still has mounts inside; unmount them and remove it")
    shutil.rmtree(work)
