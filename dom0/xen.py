"""``supercharge boot --hypervisor xen``: start a domain with ``xl`` in a Xen dom0 and collect its report.

The same contract as :func:`dom0.boot.boot_domain` (exit codes, report, state
directory); only the way the guest is run differs:

1. the config is loaded and checked like for qemu, then written back with
   absolute paths (``DomainConfig.to_xl``) beside the report, so ``xl`` reads
   exactly what was checked, from any working directory;
2. ``xl create -p`` builds the domain paused;
3. ``xl console NAME`` runs under ``script`` (xl wants a terminal) in the
   background and writes the console capture; only then ``xl unpause``, so
   nothing a fast guest prints is lost (xen-notes.md);
4. the capture is watched with the same stopper as qemu's, and the domain is
   destroyed when the report says nothing more will come (or with ``--after
   stop`` after a switch), on timeout, and on every way out.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomically
from .boot import domain_state_dir, finish_boot, report_stopper
from .errors import EnvironmentProblem, UserError
from .qemu import ConsoleWatcher, terminate_group
from .xlcfg import DomainConfig, load_domain_config, write_xl_config

XL = "xl"
XL_PACKAGE = "xen-utils-4.17"
# How long ``xl console`` gets to attach before the domain is unpaused.
ATTACH_SECONDS = 1.5
# How often (seconds) to ask xl whether the domain still exists.
LIVENESS_EVERY = 3.0


@dataclass
class XenRun:
    """How a Xen boot ended."""

    domid: int | None
    timed_out: bool
    stopped: bool
    ended: bool          # the domain went away on its own (powered off, crashed)
    destroyed: bool      # we destroyed it
    duration: float
    create_seconds: float


def find_tool(name: str, package: str, why: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise EnvironmentProblem(f"{name} not found on PATH: {why} (Debian package {package})")
    return found


def find_xl() -> str:
    """``xl``, or the one-line error saying this backend needs a Xen dom0."""
    return find_tool(XL, XL_PACKAGE, "--hypervisor xen runs in a Xen dom0 with Xen's tools; "
                                     "use --hypervisor qemu elsewhere")


def _check_files(domain: DomainConfig) -> None:
    """What xl would fail on later with a long message: say it now, naming the config."""
    for what, path in (("kernel", domain.kernel), ("ramdisk", domain.ramdisk)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{domain.path}: {what} {path} does not exist")
    for disk in domain.disks:
        if disk.target and not disk.script and not disk.is_empty and not Path(disk.target).exists():
            raise UserError(f"{domain.path}: disk target {disk.target} does not exist")


def _xl(xl: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([xl, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([xl, *args], 124, "", f"xl {args[0]} timed out")


def domid_of(xl: str, name: str) -> int | None:
    """The domain's id, or None when no domain has that name."""
    proc = _xl(xl, "domid", name, timeout=60)
    try:
        return int(proc.stdout.strip()) if proc.returncode == 0 else None
    except ValueError:
        return None


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
    return lines[-1]


def boot_domain_xen(config: Path, *, timeout: float = 300.0, after: str = "wait",
                    state_dir: Path | None = None, as_json: bool = False,
                    quiet: bool = False) -> int:
    """Boot ``config`` with xl and collect its boot report; exit codes as for qemu."""
    xl = find_xl()
    script = find_tool("script", "bsdutils", "it gives 'xl console' the terminal it needs")
    domain = load_domain_config(config)
    _check_files(domain)
    if domid_of(xl, domain.name) is not None:
        raise UserError(f"{config}: a domain named {domain.name!r} is already running; expected "
                        f"a free name (xl destroy {domain.name}, or rename it)")
    state = domain_state_dir(domain.name, state_dir)
    console = state / "console.log"
    resolved = state / "domain.cfg"
    write_atomically(resolved, [write_xl_config(domain.to_xl()).encode()])
    run = _run(xl, script, domain.name, resolved, console, state / "xl.log", timeout, after)
    hypervisor = {"backend": "xen", "type": domain.type, "domid": run.domid,
                  "timed_out": run.timed_out, "stopped": run.stopped, "ended": run.ended,
                  "destroyed": run.destroyed, "seconds": round(run.duration, 2),
                  "create_seconds": round(run.create_seconds, 2), "config": str(resolved)}
    return finish_boot(domain.name, state, console, hypervisor, timeout=timeout, as_json=as_json,
                       quiet=quiet, ended="the domain was destroyed")


def _run(xl: str, script: str, name: str, config: Path, console: Path, log: Path,
         timeout: float, after: str) -> XenRun:
    console.write_bytes(b"")
    started = time.monotonic()
    watcher: subprocess.Popen[bytes] | None = None
    domid: int | None = None
    timed_out = stopped = ended = destroyed = False
    create_seconds = 0.0
    with open(log, "w") as log_file:
        try:
            create = _xl(xl, "create", "-p", str(config), timeout=max(timeout, 60.0))
            create_seconds = time.monotonic() - started
            log_file.write(f"$ xl create -p {config}\n{create.stdout}{create.stderr}")
            log_file.flush()
            domid = domid_of(xl, name)
            if create.returncode != 0 or domid is None:
                raise EnvironmentProblem(f"xl create -p {config} failed: {_last_line(create)} "
                                         f"(xl's output: {log})")
            watcher = subprocess.Popen(
                [script, "-q", "-f", "-c", f"{shlex.quote(xl)} console {shlex.quote(name)}",
                 str(console)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_file,
                start_new_session=True)
            _wait_attached(watcher, console)
            unpause = _xl(xl, "unpause", name)
            log_file.write(f"$ xl unpause {name}\n{unpause.stdout}{unpause.stderr}")
            log_file.flush()
            if unpause.returncode != 0:
                raise EnvironmentProblem(f"xl unpause {name} failed: {_last_line(unpause)}")
            timed_out, stopped, ended = _watch(xl, name, watcher, console, started, timeout, after)
        finally:
            if domid is not None and domid_of(xl, name) is not None:
                gone = _xl(xl, "destroy", name)
                log_file.write(f"$ xl destroy {name}\n{gone.stdout}{gone.stderr}")
                destroyed = gone.returncode == 0
            if watcher is not None:
                _stop_console(watcher)
    return XenRun(domid=domid, timed_out=timed_out, stopped=stopped, ended=ended,
                  destroyed=destroyed, duration=time.monotonic() - started,
                  create_seconds=create_seconds)


def _wait_attached(watcher: subprocess.Popen[bytes], console: Path) -> None:
    """Give ``xl console`` time to connect: the capture file exists, then a short grace."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and watcher.poll() is None:
        if console.exists():
            break
        time.sleep(0.1)
    time.sleep(ATTACH_SECONDS)


def _watch(xl: str, name: str, watcher: subprocess.Popen[bytes], console: Path, started: float,
           timeout: float, after: str) -> tuple[bool, bool, bool]:
    """Poll the capture until the report says stop, the domain goes away, or time runs out."""
    capture = ConsoleWatcher(console)
    should_stop = report_stopper(after)
    next_check = time.monotonic() + LIVENESS_EVERY
    console_open = True
    while True:
        if capture.read_new() and should_stop(capture.data()):
            return False, True, False
        now = time.monotonic()
        if console_open and watcher.poll() is not None:
            console_open = False           # xl console ended: most likely the domain did
            next_check = now
        if now >= next_check:
            if domid_of(xl, name) is None:
                time.sleep(0.3)            # the last bytes ``script`` wrote
                capture.read_new()
                return False, should_stop(capture.data()), True
            next_check = now + LIVENESS_EVERY
        if now - started >= timeout:
            return True, False, False
        time.sleep(0.2)


def _stop_console(watcher: subprocess.Popen[bytes]) -> None:
    """End ``script`` and ``xl console`` (its own process group), never leaving them behind."""
    terminate_group(watcher, 5.0)
    if watcher.stdin:
        watcher.stdin.close()
