"""PID 1 of the initramfs: run the stages, report each, never exit.

Whatever fails is reported over the console and then the plan's failure
policy is followed.  The default, ``halt``, fails closed: no switch into a
half-customised system, the agent waits with the report on the console.
Returning from :func:`main` (or raising out of it) would panic the kernel, so
every path ends in an ``exec`` of the real init, a power-off or a wait.
"""
from __future__ import annotations

import os
import sys
import time

from . import stages
from .report import Reporter

#: Seconds since boot when the agent's code began to run (after Python's start-up
#: and these imports): the early record reports it, so the cost of starting a
#: frozen Python as PID 1 is visible in every boot report.
AGENT_STARTED = time.clock_gettime(time.CLOCK_BOOTTIME)

POLICIES = ("halt", "continue", "poweroff", "rescue")
RESCUE_SHELL = "/bin/sh"   # in the initramfs, from prepare-initrd --rescue-shell

STAGE_ORDER = (
    ("early", stages.early),
    ("modules", stages.modules),
    ("network", stages.network),
    ("devices", stages.devices),
    ("mount", stages.mount),
    ("fetch", stages.fetch),
    ("apply", stages.apply),
    ("hooks", stages.hooks),
    ("commit", stages.commit),
)

#: Test aid: ``supercharge.pause=POINT[:SECONDS][,POINT[:SECONDS]...]`` on the kernel command
#: line makes the agent report a ``pause`` record and sleep when it reaches POINT, so a
#: power-cut test can kill the guest exactly there.  Points, in boot order: ``staged``
#: (every step staged), ``hooks`` (the hooks ran in their view, nothing on disk yet),
#: ``prepared`` (every file system's journal written, no commit marker), ``marked`` (the
#: marker written: from here the change rolls forward), ``renamed`` (the first entry of a
#: file system put in place), ``committed`` (the commit finished, before the switch).
PAUSE_ARGUMENT = "supercharge.pause="
PAUSE_DEFAULT = 600.0


def _pause_points(cmdline: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for word in cmdline.split():
        if not word.startswith(PAUSE_ARGUMENT):
            continue
        for item in word[len(PAUSE_ARGUMENT):].split(","):
            name, _, seconds = item.partition(":")
            try:
                points[name] = float(seconds) if seconds else PAUSE_DEFAULT
            except ValueError:
                points[name] = PAUSE_DEFAULT
    return points


def _pauser(reporter: Reporter):
    """The checkpoint callback of the apply, hooks and commit stages (see :data:`PAUSE_ARGUMENT`)."""
    state: dict[str, float] = {}
    loaded: list[bool] = []

    def checkpoint(point: str) -> None:
        if not loaded:
            loaded.append(True)
            try:
                with open("/proc/cmdline") as f:
                    state.update(_pause_points(f.read()))
            except OSError:
                pass
        seconds = state.pop(point, None)   # each point pauses once
        if seconds is None:
            return
        reporter.stage("pause", "ok", 0.0, {"point": point, "seconds": seconds,
                                            "why": f"{PAUSE_ARGUMENT} on the kernel command line (a test aid)"})
        time.sleep(seconds)

    return checkpoint


def _run_stage(reporter: Reporter, name: str, func, ctx: stages.BootContext) -> bool:
    started = time.monotonic()
    try:
        details = func(ctx)
    except stages.StageFailed as exc:
        details = dict(exc.details)
        details["error"] = str(exc)
        reporter.stage(name, "failed", time.monotonic() - started, details)
        return False
    except Exception as exc:  # noqa: BLE001 - PID 1 must survive anything a stage does
        reporter.stage(name, "failed", time.monotonic() - started,
                       {"error": f"{type(exc).__name__}: {exc}"})
        return False
    reporter.stage(name, "ok", time.monotonic() - started, details or {})
    return True


def _persist_report(reporter: Reporter) -> str | None:
    """Write the records so far into the target, so the guest keeps its own boot history."""
    import json

    target = stages.SYSROOT / "var/log/supercharge"
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / ".boot-report.json.tmp"
        tmp.write_text(json.dumps(reporter.to_report(), indent=1, sort_keys=True))
        os.replace(tmp, target / "boot-report.json")
        return "/var/log/supercharge/boot-report.json"
    except OSError:
        return None  # a read-only root is allowed; the console copy is the primary one


def _switch(reporter: Reporter, ctx: stages.BootContext, modified: bool) -> None:
    """Hand over to the real init; only returns if that failed."""
    from . import switch

    plan = ctx.plan
    init = plan.init if plan is not None else "/sbin/init"
    started = time.monotonic()
    try:
        switch.init_in_root(stages.SYSROOT, init)
    except OSError as exc:
        reporter.stage("switch", "failed", time.monotonic() - started, {"error": str(exc), "init": init})
        return
    stages.cleanup_run()
    saved = _persist_report(reporter) if modified else None
    env = switch.clean_environment(dict(os.environ))
    args = [init, *ctx.argv]
    try:
        switch.switch_root(stages.SYSROOT)
    except OSError as exc:
        reporter.stage("switch", "failed", time.monotonic() - started, {"error": str(exc)})
        return
    reporter.stage("switch", "ok", time.monotonic() - started,
                   {"init": init, "args": ctx.argv, "report_saved": saved})
    reporter.outcome("switched", ctx.policy, {"init": init, "modified": modified,
                                              "unsigned_plans_allowed": ctx.unsigned_allowed})
    try:
        sys.stdout.flush()
        os.execve(init, args, env)
    except OSError as exc:
        reporter.stage("exec", "failed", 0.0, {"error": str(exc), "init": init})


def _halt_forever() -> None:
    while True:
        try:
            time.sleep(3600)
        except BaseException:  # noqa: BLE001 - not even Ctrl-C may end PID 1
            pass


def _rescue_shell(failed_stage: str) -> None:
    """A shell on the console for the admin; PID 1 stays the agent and starts it again on exit.

    The system was not switched into: the target is mounted under /sysroot, the
    report is on the console above, and nothing of the personality was committed
    unless the report says so.
    """
    import fcntl
    import termios

    banner = (f"\r\nsupercharge: the {failed_stage} stage failed; rescue shell on the console "
              "(the target is under /sysroot; exit to get a new shell)\r\n")
    while True:
        try:
            fd = os.open("/dev/console", os.O_RDWR)
            os.write(fd, banner.encode())
            os.close(fd)
        except OSError:
            pass
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                fd = os.open("/dev/console", os.O_RDWR)
                fcntl.ioctl(fd, termios.TIOCSCTTY, 1)
                for target in (0, 1, 2):
                    os.dup2(fd, target)
                os.execve(RESCUE_SHELL, [RESCUE_SHELL, "-i"],
                          {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/", "TERM": "linux",
                           "PS1": "(supercharge rescue) # "})
            finally:
                os._exit(127)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        time.sleep(1)


def _follow_policy(reporter: Reporter, ctx: stages.BootContext, failed_stage: str) -> None:
    policy = ctx.policy if ctx.policy in POLICIES else "halt"
    # Hooks run in a view of the staged target and change nothing on disk until the
    # commit, so only a commit that reached its commit point rules out "unmodified".
    changed = ctx.committed
    if policy == "continue" and ctx.root_mounted and not changed:
        reporter.stage("policy", "ok", 0.0, {"policy": policy, "failed_stage": failed_stage,
                                             "action": "booting the system unmodified"})
        _switch(reporter, ctx, modified=False)
        policy = "halt"  # the switch failed; fall through to halting
    elif policy == "continue":
        reason = ("the root file system is not mounted" if not ctx.root_mounted
                  else "the personality was committed")
        reporter.stage("policy", "failed", 0.0, {"policy": policy, "action": "halt",
                                                 "reason": f"cannot continue unmodified: {reason}"})
        policy = "halt"
    if policy == "rescue" and not os.path.exists(RESCUE_SHELL):
        reporter.stage("policy", "failed", 0.0, {"policy": policy, "action": "halt",
                                                 "reason": "this initrd has no rescue shell "
                                                           "(build it with --rescue-shell)"})
        policy = "halt"
    if policy == "rescue":
        reporter.outcome("rescue", policy, {"failed_stage": failed_stage, "shell": RESCUE_SHELL,
                                            "unsigned_plans_allowed": ctx.unsigned_allowed})
        _rescue_shell(failed_stage)
    elif policy == "poweroff":
        reporter.outcome("poweroff", policy, {"failed_stage": failed_stage,
                                              "unsigned_plans_allowed": ctx.unsigned_allowed})
        from . import sysc

        try:
            sysc.reboot(sysc.RB_POWER_OFF)
        except Exception:  # noqa: BLE001 - if the power-off fails, waiting is all that is left
            pass
    else:
        reporter.outcome("halted", policy, {"failed_stage": failed_stage,
                                            "unsigned_plans_allowed": ctx.unsigned_allowed})
    _halt_forever()


def run(argv: list[str]) -> None:
    reporter = Reporter()
    ctx = stages.BootContext(argv=argv, agent_started=round(AGENT_STARTED, 3))
    ctx.checkpoint = _pauser(reporter)
    for name, func in STAGE_ORDER:
        if not _run_stage(reporter, name, func, ctx):
            _follow_policy(reporter, ctx, name)
            return
    _switch(reporter, ctx, modified=True)
    _follow_policy(reporter, ctx, "switch")


def main() -> None:
    try:
        run(sys.argv[1:])
    except BaseException as exc:  # noqa: BLE001 - last line of defence for PID 1
        try:
            sys.stderr.write(f"supercharge agent: unexpected {type(exc).__name__}: {exc}\n")
        except Exception:  # noqa: BLE001
            pass
    _halt_forever()
