"""Run a job inside a real Xen dom0, under qemu (TCG), and read its results back.

Why a job disk instead of baking the project into dom0: the cached dom0 image
changes only when Debian's packages or the kernel do, while the project's code
changes with every edit.  Each run gets a fresh ext4 image (``mkfs.ext4 -d``,
no mount) with the project's source, the Python packages dom0's side needs,
the cached guest kernel, base initrd and frozen agent (so ``prepare-initrd``
in dom0 takes the warm path), the job's inputs and its script.  The job
writes into ``/job/out``; after qemu exits the host copies that out with
``debugfs -R rdump`` (again no mount).

qemu's flags follow xen-notes.md: TCG with a 256 MiB translation cache, ``+npt``
for PVH guests, one CPU, 1 GiB, ``-no-reboot`` so that a crash ends the run;
and every run has a timeout, after which qemu's process group is killed.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dom0.cache import cache_dir
from dom0.errors import UserError
from dom0.kernel import KernelRef, fetch_kernel
from dom0.qemu import QemuSettings, qemu_escape, run_qemu

from .hypervisor import fetch_hypervisor
from .image import Dom0Image, build_dom0
from .jobdisk import make_job_image, read_results, stage_job
from .scripts import JOB_EXIT_PREFIX, READY_LINE

# Xen's command line (xen-notes.md); ``noreboot`` is left out on purpose, so a
# dom0 crash ends qemu (-no-reboot) instead of hanging.
XEN_ARGS = ("dom0_mem=384M,max:384M dom0_max_vcpus=1 console=com1 com1=115200,8n1 "
            "loglvl=all guest_loglvl=all")
# dom0's kernel arguments travel inside qemu's -initrd list, where a comma
# separates multiboot modules: they must not contain one.
DOM0_ARGS = "console=hvc0 loglevel=5"
QEMU_CPU = "qemu64,+npt"
QEMU_MEMORY_MIB = 1024


@dataclass
class JobResult:
    """How a job ended and where its outputs are on the host."""

    returncode: int | None        # the job script's exit status in dom0; None if never reported
    files_dir: Path               # the job's /job/out, copied out
    serial_log: Path              # Xen, dom0 and the job's output, the whole run
    seconds: float                # qemu's wall time
    timed_out: bool = False
    dom0_ready_seconds: float | None = None   # dom0's uptime when Xen's daemons were up
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        state = "timed out" if self.timed_out else f"job exit {self.returncode}"
        return (f"{state} after {self.seconds:.1f} s; outputs in {self.files_dir}; "
                f"serial log {self.serial_log}")


class XenLab:
    """Real Xen 4.17 and a Debian dom0 under qemu, cached under ``cache_dir``."""

    def __init__(self, cache: Path | None = None, kernel: KernelRef | None = None,
                 log: Callable[[str], object] = print) -> None:
        self.cache = Path(cache) if cache else cache_dir("xenlab")
        self._kernel = kernel
        self.log = log
        self._built: tuple[Path, Dom0Image] | None = None

    @property
    def kernel(self) -> KernelRef:
        if self._kernel is None:
            self._kernel, _ = fetch_kernel()
        return self._kernel

    def build(self) -> tuple[Path, Dom0Image]:
        """The hypervisor and dom0, from the cache or built now (looked up once per lab)."""
        if self._built is None:
            xen = fetch_hypervisor(self.cache)
            self._built = xen, build_dom0(self.cache, self.kernel, log=self.log)
        return self._built

    def qemu_command(self, xen: Path, dom0: Dom0Image, job_image: Path, serial: Path) -> list[str]:
        modules = f"{qemu_escape(str(dom0.kernel))} {DOM0_ARGS},{qemu_escape(str(dom0.initramfs))}"
        qemu = QemuSettings(accel="tcg", cpu=QEMU_CPU)
        return [qemu.binary, "-machine", qemu.machine, *qemu.accel_args(),
                "-cpu", qemu.cpu, "-smp", "1", "-m", str(QEMU_MEMORY_MIB),
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-chardev", f"file,id=serial0,path={qemu_escape(str(serial))}",
                "-serial", "chardev:serial0",
                "-kernel", str(xen), "-append", XEN_ARGS, "-initrd", modules,
                "-drive", (f"file={qemu_escape(str(dom0.root_image))},format=raw,if=virtio,"
                           "cache=unsafe,snapshot=on"),
                "-drive", f"file={qemu_escape(str(job_image))},format=raw,if=virtio,cache=unsafe"]

    def run_job(self, job_dir: Path | None, script: str, timeout: float = 600.0, *,
                results: Path | None = None, warm_trust: Sequence[Sequence[Path]] = (),
                extra_mib: int = 256) -> JobResult:
        """Boot Xen, run ``script`` (bash) in dom0 with ``job_dir`` at /job/in, and return its results.

        ``warm_trust`` lists the ``--trust`` key sets the job's prepare-initrd
        calls use; their base initrds are built here (once) and go on the job
        disk, so dom0 never freezes the agent.  ``results`` is where the
        outputs, the serial log and the job disk go (a new temporary
        directory by default).
        """
        if job_dir is not None and not Path(job_dir).is_dir():
            raise UserError(f"{job_dir}: job directory not found")
        if timeout <= 0:
            raise UserError(f"timeout {timeout}: expected a positive number of seconds")
        started = time.monotonic()
        xen, dom0 = self.build()
        built = time.monotonic()
        results = Path(results) if results else Path(tempfile.mkdtemp(prefix="xenlab-run-"))
        results.mkdir(parents=True, exist_ok=True)
        staging = results / "job-staging"
        # In-dom0 time limit: what is left of ours once Xen and dom0 are up (~30 s).
        inner = max(30.0, timeout - 60.0)
        stage_job(staging, script, job_dir, self.kernel, warm_trust, inner)
        job_image = make_job_image(staging, results / "job.img", extra_mib)
        shutil.rmtree(staging)
        staged = time.monotonic()
        serial = results / "serial.log"
        self.log(f"xenlab: booting Xen (timeout {timeout:g} s); serial log {serial}")
        run = run_qemu(self.qemu_command(xen, dom0, job_image, serial), serial, timeout=timeout)
        files = results / "out"
        read_results(job_image, files)
        text = serial.read_bytes().decode("utf-8", "replace")
        code = _job_code(files, text)
        return JobResult(returncode=code, files_dir=files, serial_log=serial,
                         seconds=round(run.duration, 1), timed_out=run.timed_out,
                         dom0_ready_seconds=_ready_uptime(text),
                         timings={"build": round(built - started, 1),
                                  "stage": round(staged - built, 1),
                                  "qemu": round(run.duration, 1)})


def _job_code(files: Path, serial: str) -> int | None:
    try:
        return int((files / "returncode").read_text().strip())
    except (OSError, ValueError):
        pass
    for line in serial.splitlines():
        if line.startswith(JOB_EXIT_PREFIX):
            try:
                return int(line[len(JOB_EXIT_PREFIX):].strip())
            except ValueError:
                return None
    return None


def _ready_uptime(serial: str) -> float | None:
    for line in serial.splitlines():
        if READY_LINE in line and "uptime " in line:
            try:
                return float(line.split("uptime ", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None
