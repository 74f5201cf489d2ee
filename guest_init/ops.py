"""Apply plan operations to a root tree: the one engine used by dom0 and the agent.

Every applier writes through :func:`guest_init.safepath.resolve_in_root`, so no
plan can write outside the root, and replaces files atomically (temporary file
beside the target, fsync, rename, fsync the directory), so a power cut leaves
either the old file or the new one, never a mix.  Failures raise :class:`OpError`
with the guest path, and leave nothing behind: no temporary file, no directory
that the applier created.
"""
from __future__ import annotations

import os
import stat
import time
from itertools import count
from pathlib import Path
from typing import Any, Callable

from .plan import ReplaceStep, Step
from .safepath import UnsafePath, resolve_in_root


class OpError(Exception):
    """An operation could not be applied; ``path`` is the guest path it was about."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing ancestors with mode 0755; return those created.

    By hand rather than ``os.makedirs``: the mode must not depend on the umask,
    and the caller needs the list to remove them again if the write fails.
    """
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            created.append(d)
            os.chmod(d, 0o755)
    except OSError:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_names = count()
_tag_prefix = ""


def _new_tag_prefix() -> None:
    global _tag_prefix
    _tag_prefix = f"{os.getpid():x}{time.monotonic_ns() & 0xFFFFFFFF:08x}"


os.register_at_fork(after_in_child=_new_tag_prefix)


def unique_tag() -> str:
    """A name part for temporary files that no other call makes: this process's id and
    start (taken once, and again in a forked child), and a counter.

    Not ``os.urandom``: getrandom(2) may block early in boot, where the agent
    writes, and a large patch asks for hundreds of names.  Uniqueness is all
    that is needed: the files are created with O_EXCL (or linked, which fails
    the same way), and a name taken by anything else only means the next one.
    """
    if not _tag_prefix:
        _new_tag_prefix()
    return f"{_tag_prefix}{next(_names):x}"


def _open_temp(directory: str | os.PathLike[str], name: str) -> tuple[int, str]:
    """A new file beside the target; O_EXCL|O_NOFOLLOW so nothing pre-planted is reused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{unique_tag()}.supercharge-tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def write_file_atomically(
    target: Path, content: bytes, mode: int, uid: int | None, gid: int | None
) -> bool:
    """Replace ``target`` (a host path already checked) with ``content``; return created?

    ``uid``/``gid`` of ``None`` keep the existing file's owner (or the creator's for a
    new file).  Raises ``OSError``; on failure nothing is left behind.  Shared by the
    operations that produce whole files (replace now; copy and patch later).
    """
    try:
        old = os.lstat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(21, "is a directory", str(target))
    created_dirs = _make_parents(target.parent) if old is None else []
    tmp: str | None = None
    try:
        fd, tmp = _open_temp(target.parent, target.name)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            want_uid = uid if uid is not None else (old.st_uid if old is not None else -1)
            want_gid = gid if gid is not None else (old.st_gid if old is not None else -1)
            st = os.fstat(fd)
            if (want_uid not in (-1, st.st_uid)) or (want_gid not in (-1, st.st_gid)):
                os.fchown(fd, want_uid, want_gid)
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        tmp = None
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        _remove_dirs(created_dirs)
        raise
    _fsync_dir(target.parent)
    return old is None


def apply_replace(root: Path, step: ReplaceStep) -> dict[str, Any]:
    """Replace ``step.path`` under ``root`` with the step's content, atomically.

    Returns the report details ``{"op", "path", "bytes", "mode", "created"}``.
    """
    try:
        target = resolve_in_root(Path(root), step.path)
        created = write_file_atomically(target, step.content, step.mode, step.uid, step.gid)
    except UnsafePath as exc:
        raise OpError(step.path, f"unsafe path: {exc}") from exc
    except IsADirectoryError as exc:
        raise OpError(step.path, "is a directory; replace only replaces files") from exc
    except OSError as exc:
        raise OpError(step.path, f"cannot replace: {exc.strerror or exc}") from exc
    return {
        "op": step.op,
        "path": step.path,
        "bytes": len(step.content),
        "mode": f"{step.mode:04o}",
        "created": created,
    }


#: Applier for each operation name: ``applier(root, step) -> report details``.
#: The agent dispatches ``OP_APPLIERS[step.op](root, step)``.
OP_APPLIERS: dict[str, Callable[[Path, Any], dict[str, Any]]] = {
    ReplaceStep.op: apply_replace,
}


def apply_step(root: Path, step: Step) -> dict[str, Any]:
    """Apply any step through :data:`OP_APPLIERS` (raises :class:`OpError`)."""
    applier = OP_APPLIERS.get(step.op)
    if applier is None:
        raise OpError(getattr(step, "path", "?"), f"no applier for operation {step.op!r}")
    return applier(root, step)
