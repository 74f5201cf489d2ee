"""``supercharge boot``: start a domain under qemu and collect its boot report.

The console capture is watched while the guest runs: a report whose outcome
says the agent halted or powered off ends qemu at once (nothing more will
come), and with ``--after stop`` so does a successful switch.  The exit code
is 0 only when the agent handed over to the real init.

:func:`report_stopper` and :func:`finish_boot` are shared with the Xen backend
(:mod:`dom0.xen`), so both end a guest at the same point and report alike.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from guest_init.report import MARKER, parse_console

from .cache import state_root
from .collect import render_report, write_report
from .errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, UserError
from .qemu import QemuSettings, qemu_command, run_qemu
from .xlcfg import load_domain_config

_OUTCOME_HINT = b'"stage":"outcome"'


def report_stopper(after: str):
    """Decide from the capture so far whether the guest has nothing more to say.

    Shared by every backend (qemu here, Xen in :mod:`dom0.xen`), so that they
    end a guest at the same point of its boot report.
    """
    marker = MARKER.encode()

    def should_stop(capture: bytes) -> bool:
        if marker not in capture or _OUTCOME_HINT not in capture:
            return False
        outcome = parse_console(capture).get("outcome")
        if not outcome:
            return False
        return outcome.get("outcome") != "switched" or after == "stop"

    return should_stop


def domain_state_dir(name: str, state_dir: Path | None) -> Path:
    path = (state_dir or state_root() / "domains") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def boot_domain(config: Path, *, accel: str | None = None, timeout: float = 300.0,
                after: str = "wait", state_dir: Path | None = None, as_json: bool = False,
                quiet: bool = False) -> int:
    domain = load_domain_config(config)
    state = domain_state_dir(domain.name, state_dir)
    console = state / "console.log"
    settings = QemuSettings(accel=accel) if accel else QemuSettings()
    cmd = qemu_command(domain, console, settings)   # validates disks before the old capture goes
    run = run_qemu(cmd, console, timeout=timeout, should_stop=report_stopper(after))
    hypervisor = {"backend": "qemu", "accel": settings.accel, "timed_out": run.timed_out,
                  "stopped": run.stopped, "returncode": run.returncode,
                  "seconds": round(run.duration, 2)}
    return finish_boot(domain.name, state, console, hypervisor, timeout=timeout,
                       as_json=as_json, quiet=quiet, ended="qemu was ended")


def finish_boot(name: str, state: Path, console: Path, hypervisor: dict, *, timeout: float,
                as_json: bool, quiet: bool, ended: str) -> int:
    """Report, summary and exit code of a boot, the same for every backend.

    ``hypervisor`` (backend, timed_out, ...) goes into the report as is;
    ``ended`` says in the timeout message what was done to the guest.
    """
    report = parse_console(console.read_bytes())
    report["console"] = str(console)
    report["domain"] = name
    report["hypervisor"] = hypervisor
    write_report(report, state / "report.json")
    outcome = (report.get("outcome") or {}).get("outcome")
    if not quiet:
        if as_json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            print(render_report(report))
            print(f"console: {console}\nreport:  {state / 'report.json'}")
    timed_out = bool(hypervisor.get("timed_out"))
    if timed_out:
        what = ("the guest was still running" if outcome == "switched"
                else "the guest had not finished its boot report")
        print(f"supercharge: timeout after {timeout:g} s: {what}; {ended}", file=sys.stderr)
    if outcome == "switched":
        return EXIT_OK
    if outcome is None and timed_out:
        return EXIT_TIMEOUT
    return EXIT_FAILED


#: A backend's boot: ``boot(config, timeout=, after=, state_dir=, as_json=, quiet=) -> exit code``.
BootFunction = Callable[..., int]


def boot_function(hypervisor: str, accel: str | None) -> BootFunction:
    """The backend that starts a domain and collects its report: qemu (with ``accel``) or xl.

    ``supercharge boot`` and ``supercharge deploy`` both start domains through it.
    """
    if hypervisor == "xen":
        if accel:
            raise UserError(f"--accel {accel}: expected no --accel with --hypervisor xen "
                            "(it chooses qemu's accelerator)")
        from .xen import boot_domain_xen

        return boot_domain_xen

    def boot(config: Path, **kwargs) -> int:
        return boot_domain(config, accel=accel, **kwargs)

    return boot
