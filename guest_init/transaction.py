"""All or nothing: stage every change to the target, then commit with a roll-forward journal.

A personality applied halfway (a cloned hostname with the old address) is
worse than none, so the apply stage never writes into the target directly.
Steps change a :class:`Transaction`: a view of the target plus pending
changes.  :meth:`Transaction.commit` then, per file system:

1. writes every new file into ``<mount point>/.supercharge-txn/`` (same file
   system as its destination, so the final rename is atomic), fsyncs it, and
   writes ``prepared.json`` listing the renames, links and deletions;
2. writes the commit marker ``committed.json`` on the first file system
   (atomically, by rename): this is the moment the change happens;
3. performs the renames and deletions, then removes the journals, marker last.

:func:`recover` runs before the next apply: a marker means "roll forward"
(finish the renames, each idempotent), no marker means "roll back" (delete
the staged files; the target was never touched).  A power cut at any point
therefore leaves either the old state or the new one.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .safepath import UnsafePath, resolve_in_root

TXN_DIR = ".supercharge-txn"
PREPARED = "prepared.json"
MARKER = "committed.json"


class TransactionError(Exception):
    """A change cannot be staged (read-only file system, path outside the root, ...)."""


@dataclass
class Change:
    """The pending state of one path: a file (bytes or a staged file), a symlink, or absent."""

    kind: str                      # "file", "symlink", "delete"
    content: bytes | None = None   # file content, or the symlink target
    source: Path | None = None     # a file in the initramfs holding the content (large files)
    mode: int = 0o644
    uid: int | None = None
    gid: int | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, doc: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        json.dump(doc, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Transaction:
    """Pending changes to the tree at ``root`` whose mount points (guest paths) are ``mounts``."""

    def __init__(self, root: Path, mounts: list[str] | tuple[str, ...] = ("/",)) -> None:
        self.root = Path(root)
        self.mounts = sorted(set(mounts) | {"/"}, key=lambda m: (-len(m), m))
        self.changes: dict[str, Change] = {}

    # -- the staged view ------------------------------------------------------------------

    def guest(self, path: str, *, follow: bool = True) -> str:
        """The canonical guest path of ``path``, symlinks resolved inside the root.

        ``follow=False`` leaves a final symlink alone (deleting or replacing a
        link acts on the link); writes follow it, as a shell redirection would.
        """
        try:
            if follow:
                host = resolve_in_root(self.root, path)
            else:
                parent, _, name = path.rstrip("/").rpartition("/")
                host = resolve_in_root(self.root, parent or "/") / name
        except UnsafePath as exc:
            raise TransactionError(str(exc)) from None
        rel = host.relative_to(self.root).as_posix()
        return "/" if rel == "." else "/" + rel

    def host(self, guest: str) -> Path:
        return self.root / guest.lstrip("/")

    def lookup(self, path: str, *, follow: bool = True) -> Change | None:
        """What ``path`` holds in the staged view (None: it does not exist)."""
        guest = self.guest(path, follow=follow)
        if guest in self.changes:
            change = self.changes[guest]
            return None if change.kind == "delete" else change
        host = self.host(guest)
        try:
            st = host.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return Change("symlink", os.readlink(host).encode(), mode=0o777, uid=st.st_uid, gid=st.st_gid)
        if stat.S_ISREG(st.st_mode):
            return Change("file", None, source=host, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
        return Change("dir", None, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)

    def read(self, path: str) -> bytes | None:
        change = self.lookup(path)
        if change is None or change.kind != "file":
            return None
        return change.content if change.content is not None else change.source.read_bytes()

    def write(self, path: str, content: bytes | None = None, *, source: Path | None = None,
              mode: int | None = None, uid: int | None = None, gid: int | None = None) -> bool:
        """Stage a file; returns True when it is new. Owner/mode default to the current file's."""
        guest = self.guest(path)
        current = self.lookup(guest)
        if current is not None and current.kind == "dir":
            raise TransactionError(f"{guest}: is a directory")
        self.changes[guest] = Change(
            "file", content, source=source,
            mode=mode if mode is not None else (current.mode if current else 0o644),
            uid=uid if uid is not None else (current.uid if current else None),
            gid=gid if gid is not None else (current.gid if current else None))
        return current is None

    def symlink(self, path: str, target: str) -> None:
        self.changes[self.guest(path, follow=False)] = Change("symlink", target.encode(), mode=0o777)

    def delete(self, path: str) -> None:
        guest = self.guest(path, follow=False)
        current = self.lookup(guest, follow=False)
        if current is not None and current.kind == "dir":
            raise TransactionError(f"{guest}: is a directory; only files are deleted")
        self.changes[guest] = Change("delete")

    # -- scratch trees for engines that work on directories (the patch engine) --------------

    def materialize(self, paths: list[str], scratch: Path, base: str = "/") -> None:
        """Copy the staged view of ``paths`` (guest paths under ``base``) into ``scratch``."""
        for path in paths:
            change = self.lookup(path, follow=False)
            if change is None or change.kind == "dir":
                continue
            rel = Path(path).relative_to(base)
            dest = scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if change.kind == "symlink":
                dest.symlink_to(change.content.decode())
            else:
                dest.write_bytes(change.content if change.content is not None else change.source.read_bytes())
                os.chmod(dest, change.mode)

    def absorb(self, paths: list[str], scratch: Path, base: str = "/") -> list[str]:
        """Take back what an engine did to ``paths`` in ``scratch``; returns the changed paths."""
        changed = []
        for path in paths:
            rel = Path(path).relative_to(base)
            src = scratch / rel
            before = self.lookup(path, follow=False)
            if not os.path.lexists(src):
                if before is not None:
                    self.delete(path)
                    changed.append(path)
                continue
            st = src.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(src)
                if before is None or before.kind != "symlink" or before.content != target.encode():
                    self.symlink(path, target)
                    changed.append(path)
                continue
            data = src.read_bytes()
            mode = stat.S_IMODE(st.st_mode)
            old = None
            if before is not None and before.kind == "file":
                old = before.content if before.content is not None else before.source.read_bytes()
            if old is None or mode != before.mode or data != old:
                keep = before if before is not None and before.kind == "file" else None
                self.changes[self.guest(path, follow=False)] = Change(
                    "file", data, mode=mode, uid=keep.uid if keep else None, gid=keep.gid if keep else None)
                changed.append(path)
        return changed

    # -- commit -------------------------------------------------------------------------------

    def mount_of(self, guest: str) -> str:
        for mount in self.mounts:
            if mount == "/" or guest == mount or guest.startswith(mount + "/"):
                return mount
        return "/"

    def commit(self) -> dict:
        """Make every staged change at once (see the module doc); returns counts for the report."""
        if not self.changes:
            return {"files": 0, "deleted": 0, "file_systems": []}
        by_fs: dict[str, list[tuple[str, Change]]] = {}
        for guest, change in sorted(self.changes.items()):
            by_fs.setdefault(self.mount_of(guest), []).append((guest, change))
        file_systems = sorted(by_fs)
        master = file_systems[0]
        for fs in file_systems:
            self._prepare(fs, by_fs[fs], master, file_systems)
        _write_json(self._txn(master) / MARKER, {"file_systems": file_systems})
        for fs in file_systems:
            _roll_forward(self.host(fs))
        _finish(self.host(master))
        written = sum(1 for c in self.changes.values() if c.kind != "delete")
        return {"files": written, "deleted": len(self.changes) - written, "file_systems": file_systems}

    def _txn(self, fs: str) -> Path:
        return self.host(fs) / TXN_DIR

    def _prepare(self, fs: str, changes: list[tuple[str, Change]], master: str, all_fs: list[str]) -> None:
        txn = self._txn(fs)
        try:
            txn.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise TransactionError(f"cannot stage changes on the file system mounted at {fs}: "
                                   f"{exc.strerror}") from None
        entries = []
        for index, (guest, change) in enumerate(changes):
            rel = guest[len(fs):].lstrip("/") if fs != "/" else guest.lstrip("/")
            entry = {"dest": rel, "kind": change.kind}
            if change.kind != "delete":
                staged = txn / f"{index}"
                if change.kind == "symlink":
                    staged.unlink(missing_ok=True)
                    os.symlink(change.content.decode(), staged)
                    if change.uid is not None or change.gid is not None:
                        os.lchown(staged, -1 if change.uid is None else change.uid,
                                  -1 if change.gid is None else change.gid)
                else:
                    data = change.content if change.content is not None else change.source.read_bytes()
                    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        if change.uid is not None or change.gid is not None:
                            os.fchown(fd, -1 if change.uid is None else change.uid,
                                      -1 if change.gid is None else change.gid)
                        os.fchmod(fd, change.mode)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                entry["staged"] = staged.name
            entries.append(entry)
        _fsync_dir(txn)
        _write_json(txn / PREPARED, {"master": master == fs, "file_systems": all_fs, "entries": entries})


def _make_dirs(top: Path, rel_dir: Path) -> None:
    current = top
    for part in rel_dir.parts:
        current = current / part
        if not current.exists():
            current.mkdir(mode=0o755)
            os.chmod(current, 0o755)


def _roll_forward(fs_root: Path) -> None:
    """Finish a committed transaction on one file system; every step may run twice."""
    txn = fs_root / TXN_DIR
    prepared = txn / PREPARED
    if not prepared.exists():
        return
    doc = json.loads(prepared.read_text())
    touched_dirs: set[Path] = set()
    for entry in doc["entries"]:
        dest = fs_root / entry["dest"]
        if entry["kind"] == "delete":
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass
            touched_dirs.add(dest.parent)
            continue
        staged = txn / entry["staged"]
        if not os.path.lexists(staged):
            continue   # already renamed by an earlier, interrupted roll-forward
        _make_dirs(fs_root, Path(entry["dest"]).parent)
        os.replace(staged, dest)
        touched_dirs.add(dest.parent)
    for directory in touched_dirs:
        _fsync_dir(directory)
    prepared.unlink()
    if not doc.get("master"):
        _remove_txn(txn)


def _remove_txn(txn: Path) -> None:
    for child in txn.iterdir():
        if child.name != MARKER:
            child.unlink()
    if not (txn / MARKER).exists():
        txn.rmdir()
        _fsync_dir(txn.parent)


def _finish(master_root: Path) -> None:
    txn = master_root / TXN_DIR
    (txn / MARKER).unlink(missing_ok=True)
    _remove_txn(txn)


def recover(root: Path, mounts: list[str] | tuple[str, ...] = ("/",)) -> str | None:
    """Complete or undo a transaction a crash interrupted; returns what was done, or None."""
    root = Path(root)
    found = [m for m in sorted(set(mounts) | {"/"}) if (root / m.lstrip("/") / TXN_DIR).is_dir()]
    if not found:
        return None
    master = next((m for m in found if (root / m.lstrip("/") / TXN_DIR / MARKER).exists()), None)
    if master is not None:
        marker = json.loads((root / master.lstrip("/") / TXN_DIR / MARKER).read_text())
        for fs in marker.get("file_systems", found):
            _roll_forward(root / fs.lstrip("/"))
        _finish(root / master.lstrip("/"))
        return "rolled forward"
    for fs in found:
        txn = root / fs.lstrip("/") / TXN_DIR
        for child in txn.iterdir():
            child.unlink()
        txn.rmdir()
    return "rolled back"
