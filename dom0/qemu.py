"""Run a domain under qemu-system-x86_64 where there is no Xen, with its console captured.

Why qemu at all: the boot tier and most users have no Xen host, yet the same xl
config must boot.  The mapping is deliberately small: direct kernel boot, the
xl disks as virtio disks (the guest finds file systems by label, so xvda/vda
names never matter), user networking only when the config has vifs, and the
serial console written to a file that :func:`run_qemu` watches for the boot
report.

:func:`qemu_command` is pure apart from checking that the files it names exist,
so the mapping is unit-tested without starting anything; :func:`run_qemu` owns
the process and never leaves one behind.

qcow2 overlays boot as they are: qemu reads qcow2 natively and opens an
overlay's backing file (the shared base) read-only, so writes land in the
overlay; :func:`check_qcow2_chain` makes sure the base is there first.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dom0.errors import EnvironmentProblem, UserError
from dom0.xlcfg import DiskSpec, DomainConfig

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
ACCELERATORS = ("tcg", "kvm")
# The CPU per accelerator.  RDRAND lets the kernel seed its RNG at once, so a
# Python /init does not wait about 1.2 s for entropy (initramfs-notes.md).
DEFAULT_CPU = {"tcg": "qemu64,+rdrand", "kvm": "host"}
# qemu's names for xl's disk formats ("vpc" is qemu's name for VHD).
QEMU_FORMATS = {"raw": "raw", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vpc", "qed": "qed"}
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# How long a terminated qemu gets to exit before SIGKILL.
TERM_GRACE = 5.0


@dataclass
class QemuSettings:
    """How to run qemu, independent of the domain.

    ``accel`` defaults to ``$SUPERCHARGE_ACCEL`` or "tcg" (KVM does not work on
    every host; xen-notes.md).  ``tb_size`` caps TCG's translation cache in MiB:
    its default of 1 GiB dominates qemu's memory use otherwise.
    """

    accel: str = field(default_factory=lambda: os.environ.get("SUPERCHARGE_ACCEL", "tcg"))
    cpu: str | None = None
    machine: str = "pc"
    tb_size: int = 256
    binary: str = QEMU_BINARY
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise UserError(f"accelerator {self.accel!r} (from --accel or SUPERCHARGE_ACCEL): "
                            f"expected one of {', '.join(ACCELERATORS)}")
        if self.cpu is None:
            self.cpu = DEFAULT_CPU[self.accel]

    def accel_args(self) -> list[str]:
        if self.accel == "tcg":
            return ["-accel", f"tcg,tb-size={self.tb_size}"]
        return ["-accel", "kvm"]


@dataclass
class QemuRun:
    """How a qemu run ended: on its own, stopped by ``should_stop``, or timed out."""

    returncode: int | None
    timed_out: bool
    stopped: bool
    duration: float
    console: Path
    log: Path
    pid: int = 0
    command: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The command line


def qemu_command(domain: DomainConfig, console: Path, settings: QemuSettings) -> list[str]:
    """The qemu command line that boots ``domain`` with its console written to ``console``."""
    _require_file(domain.kernel, "kernel", domain)
    if domain.ramdisk is not None:
        _require_file(domain.ramdisk, "ramdisk", domain)
    cmd = [settings.binary, "-machine", settings.machine, *settings.accel_args(),
           "-cpu", str(settings.cpu), "-m", str(domain.memory), "-smp", str(domain.vcpus),
           "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
           "-chardev", f"file,id=console0,path={qemu_escape(str(console))}",
           "-serial", "chardev:console0", "-no-reboot",
           "-device", "virtio-rng-pci",
           "-kernel", str(domain.kernel)]
    if domain.ramdisk is not None:
        cmd += ["-initrd", str(domain.ramdisk)]
    cmd += ["-append", guest_cmdline(domain.cmdline)]
    for disk in domain.disks:
        cmd += drive_args(disk, domain)
    for index, vif in enumerate(domain.vifs):
        cmd += nic_args(index, vif, domain)
    return cmd + list(settings.extra_args)


def guest_cmdline(cmdline: str) -> str:
    """The kernel command line under qemu: console on the serial port, panic ends the run.

    ``console=ttyS0`` goes first when there is no ``console=``; a Xen console
    (``console=hvc0``, normal in a PV config) becomes ttyS0, because under qemu
    hvc0 does not exist and the boot report would vanish.  ``panic=-1`` makes a
    panicking kernel reboot at once, which ``-no-reboot`` turns into qemu exiting.
    """
    words = [re.sub(r"^console=hvc\d+", "console=ttyS0", word) for word in cmdline.split()]
    if not any(word.startswith("console=") for word in words):
        words.insert(0, "console=ttyS0")
    if not any(word.startswith("panic=") for word in words):
        words.append("panic=-1")
    return " ".join(words)


def drive_args(disk: DiskSpec, domain: DomainConfig) -> list[str]:
    """``-drive`` for one xl disk; an empty cdrom drive yields nothing."""
    if disk.is_empty:
        return []
    if disk.script:
        raise UserError(f"{domain.path}: disk {disk.spec!r} uses script={disk.script}, which "
                        "only a Xen host can run; expected a file or block device target")
    _require_file(Path(disk.target), "disk target", domain)
    if disk.format == "qcow2":
        check_qcow2_chain(Path(disk.target), disk, domain)
    readonly = "on" if disk.readonly or disk.is_cdrom else "off"
    options = [f"file={qemu_escape(disk.target)}", f"format={QEMU_FORMATS[disk.format]}",
               "if=virtio", "cache=unsafe", f"readonly={readonly}"]
    return ["-drive", ",".join(options)]


MAX_BACKING_CHAIN = 16


def check_qcow2_chain(path: Path, disk: DiskSpec, domain: DomainConfig) -> None:
    """Every image a qcow2 overlay is built on must exist.

    qemu opens an overlay's backing files read-only by itself, so a shared base
    is never written; but a missing or moved base would only show up as a qemu
    error in qemu.log after the console was reset, so it is checked here.  (A
    file that is not qcow2 at all is left for qemu to report.)
    """
    from .exports import backing_path, read_qcow2_header

    seen: list[Path] = []
    current = path
    while True:
        header = read_qcow2_header(current)
        if header is None:
            return
        backing = backing_path(current, header)
        if backing is None:
            return
        if not backing.exists():
            raise UserError(f"{domain.path}: disk {disk.vdev}: {current} is an overlay of {backing}, "
                            "which does not exist (the shared base image was moved or removed)")
        seen.append(current)
        if len(seen) > MAX_BACKING_CHAIN or backing in seen:
            raise UserError(f"{domain.path}: disk {disk.vdev}: the backing chain of {path} is longer "
                            f"than {MAX_BACKING_CHAIN} or loops")
        current = backing


def nic_args(index: int, vif: dict[str, str], domain: DomainConfig) -> list[str]:
    """User-mode networking for one vif (the guest reaches dom0 as 10.0.2.2)."""
    netdev = f"net{index}"
    device = f"virtio-net-pci,netdev={netdev}"
    mac = vif.get("mac")
    if mac:
        if not _MAC_RE.fullmatch(mac):
            raise UserError(f"{domain.path}: vif mac {mac!r}: expected six hex pairs like "
                            "00:16:3e:12:34:56")
        device += f",mac={mac}"
    return ["-netdev", f"user,id={netdev}", "-device", device]


def qemu_escape(value: str) -> str:
    """A value inside a qemu option list: commas are doubled."""
    return value.replace(",", ",,")


def _require_file(path: Path, what: str, domain: DomainConfig) -> None:
    if not path.exists():
        raise UserError(f"{domain.path}: {what} {path} does not exist")


# ---------------------------------------------------------------------------
# Running


def find_qemu(binary: str = QEMU_BINARY) -> str:
    """The path of the qemu binary, or an error naming the Debian package to install."""
    found = shutil.which(binary)
    if found is None:
        raise EnvironmentProblem(f"{binary} not found on PATH: install the Debian package "
                                 f"{QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})")
    return found


def run_qemu(cmd: list[str], console: Path, *, timeout: float,
             should_stop: Callable[[bytes], bool] | None = None, poll: float = 0.2,
             term_grace: float = TERM_GRACE) -> QemuRun:
    """Run ``cmd`` until it exits, ``should_stop(console bytes)`` is true, or ``timeout`` passes.

    qemu's stdout and stderr go to ``qemu.log`` beside the console file.  The
    console is emptied first so an old capture cannot satisfy ``should_stop``.
    qemu runs in its own process group (Ctrl-C reaches only us) and is
    terminated in ``finally``, so no path out of here leaves it running.
    """
    argv = [find_qemu(cmd[0]), *cmd[1:]]
    console = Path(console)
    console.parent.mkdir(parents=True, exist_ok=True)
    console.write_bytes(b"")
    log = console.parent / "qemu.log"
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = _start(argv, log_file)
    watcher = ConsoleWatcher(console)
    stopped = timed_out = False
    try:
        while proc.poll() is None:
            if watcher.read_new() and should_stop is not None and should_stop(watcher.data()):
                stopped = True
                break
            if time.monotonic() - started >= timeout:
                timed_out = True
                break
            _wait(proc, poll)
    finally:
        terminate_group(proc, term_grace)
    return QemuRun(returncode=proc.returncode, timed_out=timed_out, stopped=stopped,
                   duration=time.monotonic() - started, console=console, log=log,
                   pid=proc.pid, command=list(cmd))


def _start(argv: list[str], log_file: BinaryIO) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot start {argv[0]}: {exc.strerror}; install the Debian "
                                 f"package {QEMU_PACKAGE}") from None


def _wait(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when the process exits."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def terminate_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds; then clear the rest of its process group.

    ``proc`` leads its own process group (started with ``start_new_session``).
    """
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ConsoleWatcher:
    """Reads what was appended to the console file since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffer = bytearray()

    def read_new(self) -> bool:
        """Append new bytes to the buffer; True if there were any."""
        try:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < len(self._buffer):
                    self._buffer.clear()  # truncated (qemu opens the file with O_TRUNC)
                handle.seek(len(self._buffer))
                chunk = handle.read()
        except FileNotFoundError:
            return False
        self._buffer += chunk
        return bool(chunk)

    def data(self) -> bytes:
        return bytes(self._buffer)
