"""The ``hooks`` stage: post-processing scripts run chrooted in the target root.

The paper's in-guest path ran the file systems' "post processing" scripts from the
initrd's init, and found it unreliable ("the init process died and was respawned").
Here the agent is PID 1, so running a script must never endanger it:

- The script runs in a forked child that chroots into the target, changes to ``/``,
  starts a new session (its own process group, no controlling terminal) and execs the
  interpreter.  Every step in the child is inside ``try``; whatever fails, the child
  writes the reason to a close-on-exec error pipe and calls ``os._exit(127)``: it can
  never return into the agent's code path.  An error pipe that is still empty when
  it closes means the exec succeeded; otherwise the reason is in the result.
- Everything that can be checked before the fork is checked there, with a clear
  :class:`HookError`: the interpreter exists in the root, the script can be placed
  in the root, the environment is well formed.
- The agent's own environment is never inherited: the hook gets
  :data:`BASE_ENVIRONMENT` plus what the caller passes (``SUPERCHARGE_*``), nothing
  from the frozen bootloader (``LD_LIBRARY_PATH``, ``_PYI_*``, ``_MEI*``).
- Output (stdout and stderr on one pipe, interleaved as written) is read by a
  ``poll`` loop that also watches the child (a pidfd where the kernel has one), so
  reading never delays the timeout and a chatty hook costs at most ``output_limit``
  bytes of memory: only the tail is kept, behind a marker saying how much was cut.
- On timeout the whole process group gets SIGTERM, then SIGKILL after
  ``kill_grace`` seconds.  When the hook ends, by itself or not, whatever it left
  running is killed too: the members of its process group and every process whose
  root directory is the target (which also catches a daemon that called setsid).
  Nothing a hook started survives into the real system.
- Exactly the forked child is waited for (``waitpid(pid)``); as PID 1 the agent
  also inherits orphans, so afterwards a non-blocking ``waitpid(-1, WNOHANG)``
  sweep reaps those (by default only when the agent is PID 1, see ``reap_orphans``).

:func:`bind_api_mounts` makes /proc, /sys and /dev (recursive binds) and a fresh
tmpfs on /run available inside the root for the duration of the stage.

At boot the hooks are part of the plan's one transaction (:func:`run_hooks_staged`):
they run before the commit, chrooted in a :class:`StagedView`, an overlayfs view of
the target with the staged changes applied, whose upper layers are a tmpfs in the
initramfs.  When every hook succeeded, their upper layers are read back into the
transaction and committed with the plan's steps; when one fails or times out,
nothing is committed and the disks are as they were.  A view rather than a snapshot
of what a hook touches: nobody can say beforehand which files a hook will write, the
overlay catches every write whoever makes it, and the target's disks see nothing
until the commit, so a power cut while a hook runs costs nothing (docs/hooks.md).

Standard library only; this module is part of the frozen agent.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import sysc
from .ops import unique_tag
from .plan import HookStep
from .safepath import UnsafePath, resolve_in_root

#: What every hook's environment starts with (the caller's values are added on top).
BASE_ENVIRONMENT: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}

#: Set by :func:`run_hook` itself, whatever the caller passes.
STAGE_NAME = "hooks"

DEFAULT_OUTPUT_LIMIT = 64 * 1024
DEFAULT_KILL_GRACE = 5.0
#: After SIGKILL, how long to wait for the child to die before reporting it lost
#: (a process stuck in uninterruptible sleep, e.g. on a dead NFS server).
KILL_WAIT = 10.0
#: How long to keep reading output after the hook and its leftovers are gone.
DRAIN_WAIT = 1.0
#: Guest directories tried, in order, for the script file (the first writable wins).
SCRIPT_DIRS = ("/run", "/tmp")

_CHUNK = 64 * 1024
_MS_SLAVE = 1 << 19  # not in sysc (yet)
_FALLBACK_POLL = 0.02  # seconds between waitpid polls when there is no pidfd


class HookError(Exception):
    """A hook could not be run at all (missing interpreter, nowhere to put the script...).

    ``hook`` is the hook's name ("" for errors not about one hook, e.g. mounts).
    """

    def __init__(self, message: str, hook: str = "") -> None:
        super().__init__(message)
        self.hook = hook


class HookFailed(HookError):
    """A hook failed (non-zero exit, signal, timeout, could not start).

    ``results`` holds every hook run so far, the failed one last, so the boot report
    carries each hook's output; ``failed`` is that last result.
    """

    def __init__(self, results: list[HookResult]) -> None:
        self.results = list(results)
        self.failed = self.results[-1]
        super().__init__(f"hook {self.failed.name!r} failed: {self.failed.describe()}", self.failed.name)


@dataclass(frozen=True)
class HookResult:
    """How one hook ended.

    ``exit_code`` is set when the interpreter exited, ``signal`` when a signal killed
    it (both ``None`` when the status is unknown: never started, or would not die).
    ``timed_out`` says the agent killed it for running too long.  ``output`` is stdout
    and stderr interleaved, cut to the last ``output_limit`` bytes behind a marker;
    ``output_bytes`` is how much the hook wrote in all.  ``leftovers`` counts the
    processes it left running that were killed after it ended.  ``error`` says why a
    hook could not be started or waited for.
    """

    name: str
    exit_code: int | None
    signal: int | None
    timed_out: bool
    seconds: float
    output: str
    interpreter: str
    output_bytes: int = 0
    leftovers: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.signal is None and self.error is None

    @property
    def truncated(self) -> bool:
        return self.output.startswith(_MARKER_PREFIX)

    def describe(self) -> str:
        """One line: ``exit status 3``, ``timed out after 60 s (killed by SIGKILL)``..."""
        parts: list[str] = []
        if self.timed_out:
            parts.append(f"timed out after {self.seconds:.3g} s")
        if self.signal is not None:
            parts.append(f"killed by {_signal_name(self.signal)}")
        elif self.exit_code is not None and (self.exit_code != 0 or not parts):
            parts.append(f"exit status {self.exit_code}")
        if self.error:
            parts.append(self.error)
        text = parts[0] if parts else "status unknown"
        if len(parts) > 1:
            text += " (" + "; ".join(parts[1:]) + ")"
        if self.leftovers:
            text += f"; {self.leftovers} leftover process{'es' if self.leftovers != 1 else ''} killed"
        return text

    def to_record(self) -> dict:
        """The hook as it goes into the boot report's details (JSON-ready)."""
        return {
            "name": self.name,
            "status": "ok" if self.ok else "failed",
            "exit_code": self.exit_code,
            "signal": self.signal,
            "signal_name": _signal_name(self.signal) if self.signal is not None else None,
            "timed_out": self.timed_out,
            "seconds": round(self.seconds, 4),
            "interpreter": self.interpreter,
            "output": self.output,
            "output_bytes": self.output_bytes,
            "truncated": self.truncated,
            "leftovers": self.leftovers,
            "error": self.error,
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --------------------------------------------------------------------- environment


def hook_environment(plan: object) -> dict[str, str]:
    """The plan-derived variables for :func:`run_hook` / :func:`run_hooks`.

    ``SUPERCHARGE_DOMAIN`` (the plan's name), ``SUPERCHARGE_PLAN_DIGEST`` and
    ``SUPERCHARGE_MOUNTS``: space-separated ``TARGET:DEVICE`` pairs in mount order,
    e.g. ``/:LABEL=web1-root /usr:LABEL=usr``; a space inside a target is written
    ``\\040`` as in fstab.  ``plan`` is a :class:`guest_init.plan.Plan`.
    """
    mounts = plan.mount_order()  # type: ignore[attr-defined]
    pairs = [f"{m.target.replace(' ', chr(92) + '040')}:{m.device.describe()}" for m in mounts]
    return {
        "SUPERCHARGE_DOMAIN": str(plan.name),  # type: ignore[attr-defined]
        "SUPERCHARGE_PLAN_DIGEST": str(plan.digest),  # type: ignore[attr-defined]
        "SUPERCHARGE_MOUNTS": " ".join(pairs),
    }


def build_environment(env: Mapping[str, str], hook_name: str) -> dict[str, str]:
    """:data:`BASE_ENVIRONMENT`, then ``env``, then ``SUPERCHARGE_HOOK`` and ``SUPERCHARGE_STAGE``."""
    result = dict(BASE_ENVIRONMENT)
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise HookError(f"hook {hook_name}: environment entries must be strings, found {key!r}={value!r}",
                            hook_name)
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise HookError(f"hook {hook_name}: invalid environment entry {key!r}", hook_name)
        result[key] = value
    result["SUPERCHARGE_HOOK"] = hook_name
    result["SUPERCHARGE_STAGE"] = STAGE_NAME
    return result


# ----------------------------------------------------------------------- API mounts


def _mount_point(root: Path, guest: str) -> Path:
    """The directory ``guest`` inside ``root`` (symlinks resolved inside it), created if missing."""
    try:
        target = resolve_in_root(root, guest)
    except UnsafePath as exc:
        raise HookError(f"cannot mount {guest} in {root}: {exc}") from None
    if not target.is_dir():
        if os.path.lexists(target):
            raise HookError(f"cannot mount {guest} in {root}: {target} is not a directory")
        try:
            target.mkdir(mode=0o755)
        except OSError as exc:
            raise HookError(f"cannot mount {guest} in {root}: {target} is missing and cannot be created: "
                            f"{exc.strerror or exc}") from None
    return target


def _unmount_all(mounted: list[Path]) -> list[str]:
    """Lazily unmount ``mounted`` in reverse order; return the problems (never raises)."""
    problems: list[str] = []
    while mounted:
        target = mounted.pop()
        try:
            sysc.umount(str(target), sysc.MNT_DETACH)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: no longer a mount point (a hook unmounted it)
                problems.append(f"{target}: {exc.strerror or exc}")
    return problems


@contextmanager
def bind_api_mounts(root: Path, *, fresh_run: bool = True) -> Iterator[list[Path]]:
    """Make /proc, /sys and /dev (and a fresh /run) available inside ``root`` for a while.

    /proc, /sys and /dev are recursive bind mounts of the agent's own (so /dev/pts and
    friends come along), each made a slave mount right away, so that unmounting them
    can never propagate back to the agent's mounts.  /run (with ``fresh_run``) is a
    new, empty tmpfs (mode 0755, nosuid, nodev): a read-only root still gets a
    writable /run, the hook's script lives there instead of on the target's disk, and
    whatever a hook leaves in /run is gone afterwards, as on a real boot, where /run
    starts empty.  The agent's own /run is not exposed.

    Missing mount-point directories are created.  If any mount fails, those already
    made are undone and :class:`HookError` is raised.  On leaving, everything is
    unmounted (lazily, MNT_DETACH, so a process still using it cannot make it fail);
    an unmount problem raises :class:`HookError` unless an exception is already
    propagating.  Yields the host paths mounted.
    """
    root = Path(root)
    mounted: list[Path] = []
    try:
        for guest in ("/proc", "/sys", "/dev"):
            target = _mount_point(root, guest)
            try:
                sysc.mount(guest, str(target), None, sysc.MS_BIND | sysc.MS_REC)
            except OSError as exc:
                raise HookError(f"cannot bind-mount {guest} on {target}: {exc.strerror or exc}") from None
            mounted.append(target)
            try:
                sysc.mount("none", str(target), None, _MS_SLAVE | sysc.MS_REC)
            except OSError as exc:
                raise HookError(f"cannot make {target} a slave mount: {exc.strerror or exc}") from None
        if fresh_run:
            target = _mount_point(root, "/run")
            try:
                sysc.mount("tmpfs", str(target), "tmpfs", sysc.MS_NOSUID | sysc.MS_NODEV, "mode=0755")
            except OSError as exc:
                raise HookError(f"cannot mount a tmpfs on {target}: {exc.strerror or exc}") from None
            mounted.append(target)
    except BaseException:
        _unmount_all(mounted)
        raise
    try:
        yield list(mounted)
    finally:
        problems = _unmount_all(mounted)
    if problems:
        raise HookError("cannot unmount the API file systems from the root: " + "; ".join(problems))


# ------------------------------------------------------------------- running a hook


def _check_root(root: Path) -> Path:
    real = Path(os.path.realpath(root))
    if not real.is_dir():
        raise HookError(f"hook root {root} is not a directory")
    if str(real) == "/":
        # The leftover sweep kills every process whose root is the hook root.
        raise HookError("refusing to run hooks with / as their root: hooks run in the target, "
                        "never in the agent's own file system")
    return real


def _check_interpreter(root: Path, hook: HookStep) -> Path:
    interp = hook.interpreter
    if not interp.startswith("/"):
        raise HookError(f"hook {hook.name}: interpreter {interp} is not an absolute path", hook.name)
    try:
        host = resolve_in_root(root, interp)
    except UnsafePath as exc:
        raise HookError(f"hook {hook.name}: interpreter {interp}: {exc}", hook.name) from None
    if not host.is_file():
        raise HookError(f"hook {hook.name}: interpreter {interp} not found in the target root "
                        f"({root}); install it there or name another with 'interpreter PATH'",
                        hook.name)
    if not os.access(host, os.X_OK):
        raise HookError(f"hook {hook.name}: interpreter {interp} in the target root is not executable",
                        hook.name)
    return host


def _script_bytes(hook: HookStep, script_path: Path | None) -> bytes:
    if hook.script is not None:
        return bytes(hook.script)
    if script_path is None:
        what = hook.source.uri if hook.source is not None else "no script"
        raise HookError(f"hook {hook.name}: its script ({what}) was not fetched: no local file given",
                        hook.name)
    try:
        return Path(script_path).read_bytes()
    except OSError as exc:
        raise HookError(f"hook {hook.name}: cannot read its fetched script {script_path}: "
                        f"{exc.strerror or exc}", hook.name) from None


def _place_script(root: Path, hook: HookStep, data: bytes) -> tuple[Path, str]:
    """Write the script into the first writable directory of :data:`SCRIPT_DIRS` in root.

    Returns (host path, guest path).  The file name is unique (O_EXCL).
    """
    problems: list[str] = []
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in hook.name)[:40]
    for guest_dir in SCRIPT_DIRS:
        try:
            host_dir = resolve_in_root(root, guest_dir)
        except UnsafePath as exc:
            problems.append(f"{guest_dir}: {exc}")
            continue
        if not host_dir.is_dir():
            problems.append(f"{guest_dir}: missing")
            continue
        try:
            fd, host = _create_exclusive(host_dir, f".supercharge-hook-{safe}-")
        except OSError as exc:
            problems.append(f"{guest_dir}: {exc.strerror or exc}")
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(host, 0o700)
        except OSError as exc:
            _unlink(host)
            problems.append(f"{guest_dir}: {exc.strerror or exc}")
            continue
        guest = "/" + os.path.relpath(host, root)
        return host, guest
    raise HookError(f"hook {hook.name}: nowhere to put the script in the target root ({root}): "
                    + "; ".join(problems) + " (bind_api_mounts provides a writable /run)", hook.name)


def _create_exclusive(directory: Path, prefix: str) -> tuple[int, Path]:
    """A new file with a unique name (O_EXCL, mode 0700).

    Not tempfile (costly to import); the name's unique part is :func:`unique_tag`'s,
    and O_EXCL guarantees that nothing already there is used.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = directory / f"{prefix}{unique_tag()}"
        try:
            return os.open(path, flags, 0o700), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused file name in {directory}")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _high_fd(fd: int) -> int:
    """``fd`` moved to 3 or above (close-on-exec), so redirecting 0-2 cannot clobber it."""
    if fd >= 3:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _open_fds() -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        return list(range(256))


_RESET_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ", "SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP", "SIGTSTP",
                                 "SIGTTIN", "SIGTTOU", "SIGCHLD", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, n)
)


def _child(root: bytes, argv: list[bytes], env: dict[bytes, bytes], stdin_fd: int, out_fd: int,
           err_fd: int, close_fds: list[int]) -> NoReturn:
    """In the forked child: never returns, never raises (PID 1's code path is above us)."""
    step = "setsid"
    try:
        os.setsid()
        step = "redirect output"
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        step = "chroot " + root.decode(errors="replace")
        os.chroot(root)
        step = "chdir /"
        os.chdir("/")
        os.umask(0o022)
        step = "reset signals"
        for sig in _RESET_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        step = "exec " + argv[0].decode(errors="replace")
        os.execve(argv[0], argv, env)
    except BaseException as exc:  # noqa: BLE001 - the child must end here, whatever happened
        try:
            if isinstance(exc, OSError) and exc.strerror:
                text = f"{step}: {exc.strerror}"
                if exc.errno == errno.ENOENT and step.startswith("exec"):
                    text += " (the interpreter's ELF loader or a library it needs may be missing from the root)"
            else:
                text = f"{step}: {type(exc).__name__}: {exc}"
            os.write(err_fd, text.encode("utf-8", "replace")[:4000])
        except BaseException:  # noqa: BLE001, S110 - nothing more can be done; exit below
            pass
    finally:
        os._exit(127)
    os._exit(127)  # pragma: no cover - unreachable, keeps type checkers happy


_MARKER_PREFIX = "[supercharge: "


class _TailBuffer:
    """The last ``limit`` bytes written, and how many were written in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]

    def text(self) -> str:
        data = bytes(self.data)
        cut = self.total - len(data)
        if cut <= 0:
            return data.decode("utf-8", "replace")
        # Do not start in the middle of a UTF-8 sequence.
        skip = 0
        while skip < min(3, len(data)) and 0x80 <= data[skip] <= 0xBF:
            skip += 1
        marker = (f"{_MARKER_PREFIX}{cut + skip} bytes of earlier output cut ({self.total} in all); "
                  f"the last {len(data) - skip} follow]\n")
        return marker + data[skip:].decode("utf-8", "replace")


class _Run:
    """One forked hook: pumps its output, watches it, kills it and its leftovers."""

    def __init__(self, pid: int, out_fd: int, err_fd: int, root_real: str, limit: int,
                 reap_orphans: bool) -> None:
        self.pid = pid
        self.root_real = root_real
        self.reap_orphans = reap_orphans
        self.out = _TailBuffer(limit)
        self.err = bytearray()
        self.status: int | None = None
        self.lost: str | None = None  # why the status could not be collected
        self.fds = {out_fd: "out", err_fd: "err"}
        self.poller = select.poll()
        for fd in self.fds:
            self.poller.register(fd, select.POLLIN)
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
            self.poller.register(self.pidfd, select.POLLIN)
        except (AttributeError, OSError):
            self.pidfd = None

    # -- waiting and reading

    def _try_reap(self) -> None:
        if self.status is not None or self.lost is not None:
            return
        try:
            got, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.lost = "its exit status was lost (SIGCHLD ignored, or reaped elsewhere)"
            return
        except InterruptedError:
            return
        if got == self.pid:
            self.status = status

    @property
    def exited(self) -> bool:
        return self.status is not None or self.lost is not None

    def _poll_once(self, timeout: float) -> None:
        if self.pidfd is None and not self.exited:
            timeout = min(timeout, _FALLBACK_POLL)
        if not self.fds and (self.pidfd is None or self.exited):
            time.sleep(max(0.0, min(timeout, _FALLBACK_POLL)))
            self._try_reap()
            return
        try:
            events = self.poller.poll(max(0, int(timeout * 1000)))
        except InterruptedError:
            events = []
        for fd, _ in events:
            if fd == self.pidfd:
                self._try_reap()
                if self.exited:
                    self.poller.unregister(fd)
                continue
            kind = self.fds.get(fd)
            if kind is None:
                continue
            try:
                chunk = os.read(fd, _CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.poller.unregister(fd)
                del self.fds[fd]
                os.close(fd)
            elif kind == "out":
                self.out.add(chunk)
            elif len(self.err) < 8192:
                self.err += chunk
        if self.pidfd is None:
            self._try_reap()

    def wait_child(self, until: float) -> bool:
        """Pump output until the child has exited or ``until`` (monotonic); True if it exited."""
        while not self.exited:
            remaining = until - time.monotonic()
            if remaining <= 0:
                self._try_reap()
                break
            self._poll_once(remaining)
        return self.exited

    def drain(self, until: float) -> None:
        """Read what is left in the pipes, until EOF or ``until``."""
        while self.fds:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._poll_once(remaining)

    def close(self) -> None:
        for fd in list(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None

    # -- killing

    def survivors(self) -> list[int]:
        """Live processes of the hook: in its process group, or chrooted in its root."""
        found: list[int] = []
        me = os.getpid()
        try:
            names = os.listdir("/proc")
        except OSError:
            return found
        for name in names:
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in (me, 1):
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) < 3 or fields[0] in (b"Z", b"X"):
                continue
            if int(fields[2]) == self.pid:
                found.append(pid)
                continue
            try:
                proc_root = os.readlink(f"/proc/{name}/root")
            except OSError:
                continue
            if proc_root == self.root_real or proc_root.startswith(self.root_real + "/"):
                found.append(pid)
        return found

    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to the hook's group and to every survivor; returns how many got it."""
        if not self.exited:
            try:
                os.killpg(self.pid, sig)
            except OSError:
                try:
                    os.kill(self.pid, sig)  # killed before its setsid
                except OSError:
                    pass
        victims = self.survivors()
        for pid in victims:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        return len(victims)

    def wait_survivors_gone(self, until: float) -> list[int]:
        while True:
            self.sweep_orphans()
            left = self.survivors()
            if not left or time.monotonic() >= until:
                return left
            self._poll_once(min(0.02, max(0.0, until - time.monotonic())))

    def kill_leftovers(self, grace: float) -> int:
        """After the hook ended: TERM, then KILL after ``grace``, whatever it left running."""
        left = self.survivors()
        if not left:
            return 0
        count = len(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except OSError:
            pass
        left = self.wait_survivors_gone(time.monotonic() + grace)
        for _ in range(5):  # new ones may appear while we kill (a fork loop)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
            count = max(count, len(left))
            left = self.wait_survivors_gone(time.monotonic() + 2.0)
        return count

    def sweep_orphans(self) -> None:
        """Reap whatever zombie children we have (PID 1 inherits every orphan)."""
        if not self.reap_orphans:
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if pid == self.pid and self.status is None:
                self.status = status


def run_hook(
    root: Path,
    hook: HookStep,
    *,
    script_path: Path | None = None,
    env: Mapping[str, str],
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    kill_grace: float = DEFAULT_KILL_GRACE,
    reap_orphans: bool | None = None,
) -> HookResult:
    """Run one hook chrooted in ``root`` and return how it ended.

    ``hook`` is a :class:`guest_init.plan.HookStep`; its script is ``hook.script``, or
    for a fetched hook the local file ``script_path``.  ``env`` is added to
    :data:`BASE_ENVIRONMENT` (see :func:`build_environment`).  /proc, /sys and /dev are
    the caller's business (:func:`bind_api_mounts`).

    Raises :class:`HookError` only when the hook cannot be started at all and that is
    known before forking (bad root, interpreter missing from the root, no script, no
    writable place for it); everything after the fork ends in a :class:`HookResult`,
    including an exec that failed in the child (``error`` says why, exit code 127).
    ``reap_orphans`` (default: when this process is PID 1) enables the final
    ``waitpid(-1, WNOHANG)`` sweep; off elsewhere so as not to steal other children.
    """
    if output_limit < 0:
        raise ValueError("output_limit must be >= 0")
    root = Path(root)
    root_real = _check_root(root)
    full_env = build_environment(env, hook.name)
    _check_interpreter(root, hook)
    data = _script_bytes(hook, script_path)
    if reap_orphans is None:
        reap_orphans = os.getpid() == 1
    host_script, guest_script = _place_script(root, hook, data)
    try:
        return _fork_and_watch(root, str(root_real), hook, guest_script, full_env, output_limit,
                               kill_grace, reap_orphans)
    finally:
        _unlink(host_script)


def _fork_and_watch(root: Path, root_real: str, hook: HookStep, guest_script: str,
                    env: dict[str, str], output_limit: int, kill_grace: float,
                    reap_orphans: bool) -> HookResult:
    argv = [os.fsencode(hook.interpreter), os.fsencode(guest_script)]
    env_b = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    root_b = os.fsencode(str(root))

    opened: list[int] = []
    try:
        try:
            stdin_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /dev/null in the agent: an empty pipe reads as EOF too
            stdin_fd, w = os.pipe()
            os.close(w)
        stdin_fd = _high_fd(stdin_fd)
        opened.append(stdin_fd)
        out_r, out_w = os.pipe()
        out_r, out_w = _high_fd(out_r), _high_fd(out_w)
        opened += [out_r, out_w]
        err_r, err_w = os.pipe()
        err_r, err_w = _high_fd(err_r), _high_fd(err_w)
        opened += [err_r, err_w]
        close_fds = [fd for fd in _open_fds() if fd > 2 and fd != err_w]

        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; covered by every test, seen by none
            _child(root_b, argv, env_b, stdin_fd, out_w, err_w, close_fds)
    except BaseException:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass
        raise

    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    run = _Run(pid, out_r, err_r, root_real, output_limit, reap_orphans)
    timed_out = False
    try:
        if hook.timeout and hook.timeout > 0:
            deadline = started + hook.timeout
        else:
            deadline = float("inf")
        if not run.wait_child(deadline):
            timed_out = True
            run.signal_all(signal.SIGTERM)
            if not run.wait_child(time.monotonic() + kill_grace):
                run.signal_all(signal.SIGKILL)
                run.wait_child(time.monotonic() + KILL_WAIT)
        seconds = time.monotonic() - started
        leftovers = run.kill_leftovers(kill_grace)
        run.drain(time.monotonic() + DRAIN_WAIT)
        run.sweep_orphans()
    except BaseException:
        run.signal_all(signal.SIGKILL)  # interrupted (not in the agent): leave nothing running
        raise
    finally:
        run.close()

    exit_code = sig = None
    error = run.lost
    if run.status is not None:
        if os.WIFEXITED(run.status):
            exit_code = os.WEXITSTATUS(run.status)
        elif os.WIFSIGNALED(run.status):
            sig = os.WTERMSIG(run.status)
    elif error is None:
        error = "the hook would not die, even after SIGKILL"
    start_error = bytes(run.err).decode("utf-8", "replace").strip()
    output = run.out.text()
    if start_error:
        error = f"cannot start the hook: {start_error}"
        output += ("" if not output or output.endswith("\n") else "\n") + f"supercharge: {error}\n"
    return HookResult(
        name=hook.name,
        exit_code=exit_code,
        signal=sig,
        timed_out=timed_out,
        seconds=seconds,
        output=output,
        interpreter=hook.interpreter,
        output_bytes=run.out.total,
        leftovers=leftovers,
        error=error,
    )


def _lookup_script(hook: HookStep, script_paths: Mapping[object, Path] | None) -> Path | None:
    if not script_paths:
        return None
    for key in (hook.name, getattr(hook, "source", None), getattr(getattr(hook, "source", None), "uri", None)):
        if key is not None:
            try:
                if key in script_paths:
                    return Path(script_paths[key])
            except TypeError:  # unhashable
                continue
    return None


def run_hooks(
    root: Path,
    hooks: Iterable[HookStep],
    env: Mapping[str, str],
    script_paths: Mapping[object, Path] | None = None,
    *,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    kill_grace: float = DEFAULT_KILL_GRACE,
    reap_orphans: bool | None = None,
) -> list[HookResult]:
    """Run ``hooks`` in order; stop at the first failure with :class:`HookFailed`.

    A failure is a non-zero exit, a death by signal, a timeout, or a hook that could
    not be started (then its result has ``error`` set and no exit code).
    ``script_paths`` maps a fetched hook to its local file, keyed by the hook's name,
    its ``source`` Artifact or that artifact's URI.  Returns every result when all
    succeeded.
    """
    results: list[HookResult] = []
    for hook in hooks:
        try:
            result = run_hook(root, hook, script_path=_lookup_script(hook, script_paths), env=env,
                              output_limit=output_limit, kill_grace=kill_grace, reap_orphans=reap_orphans)
        except HookError as exc:
            result = HookResult(name=hook.name, exit_code=None, signal=None, timed_out=False, seconds=0.0,
                                output="", interpreter=hook.interpreter, error=str(exc))
        results.append(result)
        if not result.ok:
            raise HookFailed(results)
    return results



# ------------------------------------------------- hooks inside the transaction

#: Mount options that keep an upper layer readable as plain files: no redirects (a
#: renamed directory is copied up whole), no metadata-only copy-ups (every modified
#: file holds its data), no index (nothing refers to the lower layers' inodes).
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off"
#: The guest directories :func:`bind_api_mounts` mounts on.
API_MOUNT_POINTS = ("/proc", "/sys", "/dev", "/run")


def _overlay_escape(path: Path) -> str:
    """A path inside overlayfs's option string (``:`` separates layers, ``,`` options)."""
    return "".join("\\" + c if c in "\\:," else c for c in str(path))


@dataclass
class ViewLayer:
    """One file system of the view: its mount point (guest path) and overlay directories."""

    fs: str
    lower: Path       # the target's file system itself (mounted under the transaction's root)
    staged: Path      # the transaction's staged changes for it, as a lower layer
    upper: Path       # what the hooks change (tmpfs in the initramfs)
    work: Path        # overlayfs's work directory (same file system as upper)
    target: Path      # where the overlay is mounted inside the view
    read_only: bool


class StagedView:
    """The target as it will be after the commit, writable, without touching the target.

    One overlay per file system of the transaction (overlayfs does not look
    into the mounts of its lower layer, so ``/etc`` on its own VBD gets its
    own), mounted parents first under ``WORK/view``::

        lowerdir = WORK/staged/N : <root>/<mount point>     (the staged changes over the disk)
        upperdir = WORK/upper/N                               (what the hooks change)

    A file system that is mounted read-only in the target is read-only in the
    view too, so a hook gets EROFS exactly where it would on the real system.
    After the hooks, :meth:`absorb` takes each upper layer into the transaction.
    """

    def __init__(self, txn, work: Path) -> None:
        self.txn = txn
        self.work = Path(work)
        self.root = self.work / "view"
        self.layers: list[ViewLayer] = []
        self.mounted: list[Path] = []
        #: Guest paths of API mount points that did not exist and are created in the
        #: view (in an upper layer); :meth:`absorb` leaves them out.
        self.created_mount_points: frozenset[str] = frozenset()

    def mount(self) -> None:
        """Build the layers and mount the overlays (undone again if a mount fails)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for index, fs in enumerate(self.txn.file_systems()):
                layer = ViewLayer(fs=fs, lower=self.txn.host(fs), staged=self.work / "staged" / str(index),
                                  upper=self.work / "upper" / str(index), work=self.work / "work" / str(index),
                                  target=self.root / fs.lstrip("/") if fs != "/" else self.root,
                                  read_only=self.txn.read_only(fs))
                self.txn.export_layer(fs, layer.staged)
                for d in (layer.upper, layer.work):
                    d.mkdir(parents=True, exist_ok=True)
                st = layer.staged.stat()  # the merged root takes the upper's attributes: match the staged ones
                os.chown(layer.upper, st.st_uid, st.st_gid)
                os.chmod(layer.upper, st.st_mode & 0o7777)
                if not layer.target.is_dir():
                    raise HookError(f"cannot build the hooks' view: {fs} has no mount point in the view")
                data = (f"lowerdir={_overlay_escape(layer.staged)}:{_overlay_escape(layer.lower)},"
                        f"upperdir={_overlay_escape(layer.upper)},workdir={_overlay_escape(layer.work)},"
                        f"{OVERLAY_OPTIONS}")
                flags = sysc.MS_RDONLY if layer.read_only else 0
                try:
                    sysc.mount("supercharge-hooks", str(layer.target), "overlay", flags, data)
                except OSError as exc:
                    raise HookError(f"cannot mount the hooks' view of {fs} (overlayfs): "
                                    f"{exc.strerror or exc}") from None
                self.mounted.append(layer.target)
                self.layers.append(layer)
            created = set()
            for guest in API_MOUNT_POINTS:
                try:
                    host = resolve_in_root(self.root, guest)
                except UnsafePath:
                    continue
                if not os.path.lexists(host):
                    created.add("/" + os.path.relpath(host, self.root))
            self.created_mount_points = frozenset(created)
        except BaseException:
            self.unmount()
            raise

    def unmount(self) -> list[str]:
        """Unmount the overlays, children first; returns the problems (never raises)."""
        problems: list[str] = []
        while self.mounted:
            target = self.mounted.pop()
            try:
                sysc.umount(str(target))
            except OSError:
                try:
                    sysc.umount(str(target), sysc.MNT_DETACH)
                except OSError as exc:
                    problems.append(f"{target}: {exc.strerror or exc}")
        return problems

    def absorb(self) -> list[str]:
        """Take every upper layer into the transaction (after :meth:`unmount`); the guest paths staged.

        Raises :class:`HookError` when a hook left something a transaction cannot
        hold (a device node, a fifo, a socket).
        """
        from .transaction import TransactionError

        if self.mounted:
            raise HookError("the hooks' view is still mounted")
        changed: list[str] = []
        for layer in self.layers:
            try:
                changed += self.txn.absorb_layer(layer.fs, layer.upper,
                                                 ignore_empty=self.created_mount_points)
            except (TransactionError, OSError) as exc:
                raise HookError(f"cannot take the hooks' changes into the transaction: {exc}") from None
        return changed


@contextmanager
def staged_view(txn, work: Path) -> Iterator[StagedView]:
    """Mount a :class:`StagedView` of transaction ``txn`` under ``work`` for the block.

    ``txn`` is a :class:`guest_init.transaction.Transaction`.  The overlays are
    unmounted on the way out, the layers under ``work`` are kept: the upper
    layers hold the files :meth:`StagedView.absorb` stages by reference, so the
    caller removes ``work`` after the commit.
    """
    view = StagedView(txn, work)
    view.mount()
    try:
        yield view
    finally:
        problems = view.unmount()
    if problems:
        raise HookError("cannot unmount the hooks' view: " + "; ".join(problems))


def run_hooks_staged(
    txn,
    hooks: Iterable[HookStep],
    env: Mapping[str, str],
    script_paths: Mapping[object, Path] | None = None,
    *,
    work: Path,
    after_hooks=None,
    **options,
) -> tuple[list[HookResult], list[str]]:
    """Run ``hooks`` in a view of ``txn``'s staged target; take their changes into ``txn``.

    The all-or-nothing hooks: nothing reaches the target's disks here.  The hooks
    run chrooted in :class:`StagedView` (with :func:`bind_api_mounts`), in order,
    stopping at the first failure (:class:`HookFailed`, and ``txn`` is left as it
    was); when every hook succeeded, what they changed is staged in ``txn``, to be
    committed with the rest of the plan.  ``after_hooks`` (a callable, or None) is
    called once the hooks ran, while the view is still mounted (the agent's
    debugging pause).  ``options`` go to :func:`run_hooks`.  Returns the results
    and the guest paths the hooks changed.
    """
    hooks = list(hooks)
    with staged_view(txn, work) as view:
        with bind_api_mounts(view.root):
            results = run_hooks(view.root, hooks, env, script_paths, **options)
        if after_hooks is not None:
            after_hooks()
    return results, view.absorb()
