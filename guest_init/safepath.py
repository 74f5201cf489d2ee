"""Map a guest path to a host path inside a root, never leaving the root.

The agent (and dom0, on unpacked images) writes into a tree mounted at ``root``
that is not the running system's ``/``.  A symlink in that tree means what it
would mean inside a chroot: ``/etc/x -> /run/x`` points at ``root/run/x``, not at
the agent's own ``/run``.  Resolving each component by hand is the only way to get
that meaning without chroot(2) (which would also change the agent's own view), and
it lets us refuse, rather than silently clamp, a path that tries to climb out.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

#: Same limit as Linux (MAXSYMLINKS): more symlinks than this is a loop.
MAX_SYMLINKS = 40


class UnsafePath(ValueError):
    """A guest path that would resolve outside the root, or cannot be resolved."""


def resolve_in_root(root: Path, path: str) -> Path:
    """The host path of guest path ``path`` inside ``root``, symlinks resolved.

    ``path`` is taken relative to the guest's ``/`` whether or not it starts with
    ``/``.  Refused (:class:`UnsafePath`): a ``..`` component in ``path`` itself,
    a symlink whose target climbs above the root with ``..``, more than
    :data:`MAX_SYMLINKS` symlinks, a NUL character.  Absolute symlink targets are
    taken relative to ``root``, relative ones to the symlink's directory.  Every
    symlink is followed, the final component's too (writing through a symlink
    writes its target, as a shell redirection in the guest would); components
    that do not exist yet are kept as given, so the result may not exist.
    """
    if "\0" in path:
        raise UnsafePath(f"{path!r}: contains a NUL character")
    pending = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in pending:
        raise UnsafePath(f"{path}: '..' is not allowed")
    root = Path(root)
    # Components are joined as strings (pathlib's joinpath per component was most
    # of the cost of resolving the paths of a large patch).
    base = os.fspath(root).rstrip("/") + "/"
    pending.reverse()  # a stack: the next component is pending[-1]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":  # only ever from a symlink target
            if not resolved:
                raise UnsafePath(f"{path}: a symlink leads outside the root")
            resolved.pop()
            continue
        candidate = base + "/".join(resolved) + "/" + part if resolved else base + part
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            # Does not exist (yet); the rest cannot be symlinks either.
            resolved.append(part)
            continue
        except OSError as exc:
            raise UnsafePath(f"{path}: cannot examine {candidate}: {exc.strerror or exc}") from None
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise UnsafePath(f"{path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed(target.split("/")))
    return root.joinpath(*resolved)
