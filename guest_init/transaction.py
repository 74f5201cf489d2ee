"""All or nothing: stage every change to the target, then commit with a roll-forward journal.

A personality applied halfway (a cloned hostname with the old address) is
worse than none, so neither the apply stage nor the hooks ever write into the
target directly.  Steps change a :class:`Transaction`: a view of the target
plus pending changes (files, symlinks, directories, deletions).  The hooks
stage runs the hooks in an overlay view of that staged state and takes what
they changed back into the same transaction (:meth:`Transaction.export_layer`,
:meth:`Transaction.absorb_layer`).  :meth:`Transaction.commit` then, per file
system:

1. writes every new file into ``<mount point>/.supercharge-txn/`` (same file
   system as its destination, so the final rename is atomic), fsyncs it, and
   writes ``prepared.json`` listing the renames, directories and deletions;
2. writes the commit marker ``committed.json`` on the first file system
   (atomically, by rename): this is the moment the change happens;
3. performs the renames, directory changes and deletions, then removes the
   journals, marker last.

A deletion (and a file or directory that replaces a directory) moves the old
entry into the journal directory as ``trash-N`` rather than removing it in
place: one rename whatever the size of the tree, and the ``trash-N`` name
doubles as the record that entry N was done, so repeating the roll-forward
after a crash never removes what an earlier pass already put in place.

:func:`recover` runs before the next apply: a marker means "roll forward"
(finish the entries, each idempotent), no marker means "roll back" (delete
the staged files; the target was never touched).  A power cut at any point
therefore leaves either the old state or the new one.
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .safepath import UnsafePath, resolve_in_root

TXN_DIR = ".supercharge-txn"
PREPARED = "prepared.json"
MARKER = "committed.json"
#: The extended attribute overlayfs puts on an opaque directory (one that hides the lower layers' entries).
OPAQUE_XATTR = "trusted.overlay.opaque"

#: Called with the name of a point in :meth:`Transaction.commit` when it is reached:
#: ``prepared`` (every file system's journal written, no marker yet), ``marked`` (the
#: commit marker written, nothing renamed yet), ``renamed`` (after the first entry of a
#: file system was put in place).  The agent uses it for a debugging pause; tests use it
#: to stop a commit at an exact point.
Checkpoint = Callable[[str], None]


def _no_checkpoint(point: str) -> None:
    """The default checkpoint: nothing happens at any point."""


class TransactionError(Exception):
    """A change cannot be staged (read-only file system, path outside the root, ...)."""


@dataclass
class Change:
    """The pending state of one path: a file (bytes or a staged file), a symlink, a directory, or absent.

    ``delete`` removes whatever is there, a whole directory tree included.  ``dir``
    makes sure a directory with this mode and owner is there; ``opaque`` means the
    directory's old entries are gone (it replaces the old directory instead of
    merging with it, as an overlayfs opaque directory does).
    """

    kind: str                      # "file", "symlink", "dir", "delete"
    content: bytes | None = None   # file content, or the symlink target
    source: Path | None = None     # a file in the initramfs holding the content (large files)
    mode: int = 0o644
    uid: int | None = None
    gid: int | None = None
    opaque: bool = False


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


def _within(guest: str, prefix: str) -> bool:
    """Whether guest path ``guest`` is ``prefix`` or below it."""
    return prefix == "/" or guest == prefix or guest.startswith(prefix + "/")


def _join(base: str, rel: str) -> str:
    rel = rel.strip("/")
    if not rel:
        return base
    return "/" + rel if base == "/" else f"{base}/{rel}"


def _content(change: Change) -> bytes:
    if change.content is not None:
        return change.content
    assert change.source is not None, "a staged file has its content or a source"
    return change.source.read_bytes()


class Transaction:
    """Pending changes to the tree at ``root`` whose mount points (guest paths) are ``mounts``."""

    def __init__(self, root: Path, mounts: list[str] | tuple[str, ...] = ("/",),
                 checkpoint: Checkpoint = _no_checkpoint) -> None:
        self.root = Path(root)
        self.mounts = sorted(set(mounts) | {"/"}, key=lambda m: (-len(m), m))
        self.changes: dict[str, Change] = {}
        self.checkpoint = checkpoint
        #: True once the commit marker is on disk: from then on the change happens,
        #: now or (after a crash) at the next :func:`recover`.
        self.marked = False

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

    def _hidden(self, guest: str) -> bool:
        """Whether a staged change to an ancestor hides what the disk has at ``guest``.

        A deleted directory, a file or symlink that replaces a directory, or an
        opaque directory: the disk's entries below it are gone in the staged view.
        """
        parent = guest
        while parent != "/":
            parent = parent.rpartition("/")[0] or "/"
            change = self.changes.get(parent)
            if change is not None and (change.kind != "dir" or change.opaque):
                return True
        return False

    def lookup(self, path: str, *, follow: bool = True) -> Change | None:
        """What ``path`` holds in the staged view (None: it does not exist)."""
        return self._lookup(self.guest(path, follow=follow))

    def _lookup(self, guest: str) -> Change | None:
        """:meth:`lookup` of a canonical guest path (no symlink resolution)."""
        if guest in self.changes:
            change = self.changes[guest]
            return None if change.kind == "delete" else change
        if self._hidden(guest):
            return None
        host = self.host(guest)
        try:
            st = host.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return Change("symlink", os.readlink(host).encode(), mode=0o777, uid=st.st_uid, gid=st.st_gid)
        if stat.S_ISREG(st.st_mode):
            return Change("file", None, source=host, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
        if stat.S_ISDIR(st.st_mode):
            return Change("dir", None, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
        return Change("special", None, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)

    def read(self, path: str) -> bytes | None:
        change = self.lookup(path)
        if change is None or change.kind != "file":
            return None
        return _content(change)

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

    def symlink(self, path: str, target: str, *, uid: int | None = None, gid: int | None = None) -> None:
        guest = self.guest(path, follow=False)
        current = self.lookup(guest, follow=False)
        if current is not None and current.kind == "dir":
            raise TransactionError(f"{guest}: is a directory")
        self.changes[guest] = Change("symlink", target.encode(), mode=0o777, uid=uid, gid=gid)

    def mkdir(self, path: str, mode: int = 0o755, *, uid: int | None = None, gid: int | None = None,
              opaque: bool = False) -> None:
        """Stage a directory with ``mode`` and owner (None: the agent's).

        Whatever else is at ``path`` (a file, a symlink) is replaced; an existing
        directory keeps its entries unless ``opaque``, which empties it first.
        """
        self._mkdir(self.guest(path, follow=False), mode, uid, gid, opaque)

    def _mkdir(self, guest: str, mode: int, uid: int | None, gid: int | None, opaque: bool) -> None:
        current = self._lookup(guest)
        if current is not None and current.kind != "dir":
            opaque = True      # replaces a file or symlink: nothing of the old entry shows through
        if opaque:
            self._forget_below(guest)
        self.changes[guest] = Change("dir", None, mode=mode, uid=uid, gid=gid, opaque=opaque)

    def delete(self, path: str, *, tree: bool = False) -> None:
        """Stage the removal of a file or symlink; of a directory and all below it with ``tree``."""
        self._delete(self.guest(path, follow=False), tree)

    def _delete(self, guest: str, tree: bool) -> None:
        current = self._lookup(guest)
        if current is not None and current.kind == "dir":
            if not tree:
                raise TransactionError(f"{guest}: is a directory; only files are deleted")
            if any(_within(m, guest) for m in self.mounts if m != "/"):
                raise TransactionError(f"{guest}: a file system is mounted at or below it")
        self._forget_below(guest)
        self.changes[guest] = Change("delete")

    def _forget_below(self, guest: str) -> None:
        """Drop every staged change strictly below ``guest`` (it is being replaced as a whole)."""
        prefix = guest.rstrip("/") + "/"
        for key in [k for k in self.changes if k.startswith(prefix)]:
            del self.changes[key]

    # -- scratch trees for engines that work on directories (the patch engine) --------------

    def materialize(self, paths: list[str], scratch: Path, base: str = "/") -> None:
        """Copy the staged view of ``paths`` (guest paths under ``base``) into ``scratch``."""
        for path in paths:
            change = self.lookup(path, follow=False)
            if change is None or change.kind not in ("file", "symlink"):
                continue
            rel = Path(path).relative_to(base)
            dest = scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if change.kind == "symlink":
                dest.symlink_to(change.content.decode())
            else:
                dest.write_bytes(_content(change))
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
                old = _content(before)
            if old is None or mode != before.mode or data != old:
                keep = before if before is not None and before.kind == "file" else None
                self.changes[self.guest(path, follow=False)] = Change(
                    "file", data, mode=mode, uid=keep.uid if keep else None, gid=keep.gid if keep else None)
                changed.append(path)
        return changed

    # -- overlayfs layers (the hooks' view of the staged target) ------------------------------

    def file_systems(self) -> list[str]:
        """The mount points (guest paths), parents first."""
        return sorted(self.mounts, key=lambda m: (0 if m == "/" else m.count("/"), m))

    def read_only(self, fs: str) -> bool:
        """Is file system ``fs`` (a mount point) mounted read-only?"""
        try:
            return bool(os.statvfs(self.host(fs)).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def export_layer(self, fs: str, layer: Path) -> None:
        """Write the staged changes of file system ``fs`` into ``layer`` as an overlayfs layer.

        Stacked above the file system itself (``lowerdir=LAYER:MOUNT``), the
        overlay shows the target as it will be after the commit: staged files and
        symlinks are copied in with their mode and owner, deletions become
        whiteouts (character devices 0:0, hence root), opaque directories get
        overlayfs's opaque attribute.  Directories that only lead to a change
        are created with the mode and owner of the target's directory, because
        overlayfs shows a merged directory with the attributes of its top layer.
        ``layer`` is created, and the file system's root directory attributes are
        copied onto it for the same reason.
        """
        fs_host = self.host(fs)
        layer.mkdir(parents=True, exist_ok=True)
        top = self.changes.get(fs)
        if top is not None and top.kind == "dir":
            _set_owner_mode(layer, top)
        else:
            _copy_dir_attrs(fs_host, layer)
        for guest, change in sorted(self.changes.items()):
            if self.mount_of(guest) != fs or guest == fs:
                continue
            rel = guest[len(fs):].lstrip("/") if fs != "/" else guest.lstrip("/")
            dest = layer / rel
            _layer_parents(fs_host, layer, Path(rel).parent)
            if change.kind == "delete":
                os.mknod(dest, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            elif change.kind == "dir":
                if not dest.is_dir():
                    os.mkdir(dest, 0o700)
                _set_owner_mode(dest, change)
                if change.opaque:
                    os.setxattr(dest, OPAQUE_XATTR, b"y")
            else:
                _write_change(dest, change, replace=False, fsync=False)

    def absorb_layer(self, fs: str, upper: Path, *, ignore_empty: frozenset[str] = frozenset()) -> list[str]:
        """Take an overlayfs upper layer of file system ``fs`` into the transaction.

        ``upper`` is what a writer (a hook) changed on top of the staged view
        (:meth:`export_layer` below it): new and modified files with their mode
        and owner, symlinks, directories (new, or with a new mode or owner),
        whiteouts (deletions, directories included) and opaque directories.
        Files are staged by reference (``source``), so ``upper`` must stay until
        the commit.  Entries identical to the staged view (a ``touch``, a file
        opened for writing and left as it was) are not staged.  The guest paths
        in ``ignore_empty`` are skipped when they are empty directories (mount
        points the caller had to create).  Anything overlayfs cannot express in a
        transaction (a device node, a fifo, a socket) raises
        :class:`TransactionError`: dropping it silently would half-apply the
        writer's work.  Returns the guest paths staged.
        """
        changed: list[str] = []
        root_st = upper.lstat()
        before = self._lookup(fs)
        if before is not None and before.kind == "dir" and not _same_attrs(before, root_st):
            self._mkdir(fs, stat.S_IMODE(root_st.st_mode), root_st.st_uid, root_st.st_gid, False)
            changed.append(fs)
        self._absorb_dir(fs, upper, changed, ignore_empty)
        return changed

    def _absorb_dir(self, guest_dir: str, host_dir: Path, changed: list[str],
                    ignore_empty: frozenset[str]) -> None:
        with os.scandir(host_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            guest = _join(guest_dir, entry.name)
            path = Path(entry.path)
            st = entry.stat(follow_symlinks=False)
            before = self._lookup(guest)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:        # a whiteout: deleted
                if before is not None:
                    self._delete(guest, True)
                    changed.append(guest)
            elif stat.S_ISDIR(st.st_mode):
                opaque = _xattr(path, OPAQUE_XATTR) == b"y"
                if guest in ignore_empty and not opaque and not any(path.iterdir()):
                    continue
                if before is None or before.kind != "dir" or opaque or not _same_attrs(before, st):
                    self._mkdir(guest, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, opaque)
                    changed.append(guest)
                self._absorb_dir(guest, path, changed, ignore_empty)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path).encode()
                if (before is None or before.kind != "symlink" or before.content != target
                        or not _same_owner(before, st)):
                    self._forget_below(guest)
                    self.changes[guest] = Change("symlink", target, mode=0o777, uid=st.st_uid, gid=st.st_gid)
                    changed.append(guest)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size == 0 and _xattr(path, "trusted.overlay.metacopy") is not None:
                    raise TransactionError(f"{guest}: a metadata-only copy-up (mount the overlay with "
                                           "metacopy=off)")
                if not (before is not None and before.kind == "file" and _same_attrs(before, st)
                        and _same_content(before, path, st.st_size)):
                    self._forget_below(guest)
                    self.changes[guest] = Change("file", None, source=path, mode=stat.S_IMODE(st.st_mode),
                                                 uid=st.st_uid, gid=st.st_gid)
                    changed.append(guest)
            else:
                kind = ("a fifo" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                        else "a device node")
                raise TransactionError(f"{guest}: {kind} cannot be committed (only files, symlinks and "
                                       "directories are)")

    # -- commit -------------------------------------------------------------------------------

    def mount_of(self, guest: str) -> str:
        for mount in self.mounts:
            if mount == "/" or guest == mount or guest.startswith(mount + "/"):
                return mount
        return "/"

    def commit(self) -> dict:
        """Make every staged change at once (see the module doc); returns counts for the report."""
        counts = {kind: sum(1 for c in self.changes.values() if c.kind == kind)
                  for kind in ("file", "symlink", "dir", "delete")}
        summary = {"files": counts["file"] + counts["symlink"], "dirs": counts["dir"],
                   "deleted": counts["delete"], "file_systems": []}
        if not self.changes:
            return summary
        by_fs: dict[str, list[tuple[str, Change]]] = {}
        for guest, change in sorted(self.changes.items()):
            by_fs.setdefault(self.mount_of(guest), []).append((guest, change))
        file_systems = sorted(by_fs)
        master = file_systems[0]
        for fs in file_systems:
            self._prepare(fs, by_fs[fs], master, file_systems)
        self.checkpoint("prepared")
        _write_json(self._txn(master) / MARKER, {"file_systems": file_systems})
        self.marked = True
        self.checkpoint("marked")
        for fs in file_systems:
            _roll_forward(self.host(fs), self.checkpoint)
        _finish(self.host(master))
        summary["file_systems"] = file_systems
        return summary

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
            entry: dict = {"dest": rel, "kind": change.kind}
            if change.kind == "dir":
                entry.update(mode=change.mode, uid=change.uid, gid=change.gid, opaque=change.opaque)
            elif change.kind != "delete":
                staged = txn / f"{index}"
                _write_change(staged, change, replace=True, fsync=True)
                entry["staged"] = staged.name
            entries.append(entry)
        _fsync_dir(txn)
        _write_json(txn / PREPARED, {"master": master == fs, "file_systems": all_fs, "entries": entries})


def _write_all(fd: int, change: Change) -> None:
    if change.content is not None:
        view = memoryview(change.content)
        while view:
            view = view[os.write(fd, view):]
        return
    assert change.source is not None, "a staged file has its content or a source"
    with open(change.source, "rb") as src:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                return
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]


def _write_change(dest: Path, change: Change, *, replace: bool, fsync: bool) -> None:
    """Write a file or symlink change at ``dest`` with its mode and owner.

    ``replace`` lets it take the place of what is there (a staged copy from an
    interrupted run); else ``dest`` must be new.
    """
    if change.kind == "symlink":
        if replace:
            dest.unlink(missing_ok=True)
        os.symlink(bytes(change.content or b"").decode(), dest)
        _set_owner_mode(dest, change, symlink=True)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(dest, flags, 0o600)
    try:
        _write_all(fd, change)
        _fset_owner_mode(fd, change)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _owner_ids(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """chown's arguments for an owner where None means "keep": None when both are kept."""
    if uid is None and gid is None:
        return None
    return (-1 if uid is None else uid, -1 if gid is None else gid)


def _fset_owner_mode(fd: int, change: Change) -> None:
    ids = _owner_ids(change.uid, change.gid)
    if ids is not None:
        os.fchown(fd, *ids)
    os.fchmod(fd, change.mode)


def _set_owner_mode(path: Path, change: Change, *, symlink: bool = False) -> None:
    ids = _owner_ids(change.uid, change.gid)
    if ids is not None:
        os.lchown(path, *ids)
    if not symlink:
        os.chmod(path, change.mode)


def _same_owner(before: Change, st: os.stat_result) -> bool:
    me = os.geteuid(), os.getegid()
    return ((before.uid if before.uid is not None else me[0]) == st.st_uid
            and (before.gid if before.gid is not None else me[1]) == st.st_gid)


def _same_attrs(before: Change, st: os.stat_result) -> bool:
    return before.mode == stat.S_IMODE(st.st_mode) and _same_owner(before, st)


def _same_content(before: Change, path: Path, size: int) -> bool:
    if before.content is not None:
        return len(before.content) == size and path.read_bytes() == before.content
    if before.source is None:
        return False
    try:
        if before.source.stat().st_size != size:
            return False
        return before.source.read_bytes() == path.read_bytes()
    except OSError:
        return False


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _copy_dir_attrs(source: Path | None, dest: Path) -> None:
    """Give directory ``dest`` the mode and owner of directory ``source``.

    0755 and the agent's own when ``source`` is None or not a directory: what
    the commit gives a directory it has to create (:func:`_make_dirs`).
    """
    mode, uid, gid = 0o755, -1, -1
    if source is not None:
        try:
            st = os.lstat(source)
            if stat.S_ISDIR(st.st_mode):
                mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        except OSError:
            pass
    os.chown(dest, uid, gid)
    os.chmod(dest, mode)


def _layer_parents(fs_host: Path, layer: Path, rel_dir: Path) -> None:
    """Create the layer's directories leading to ``rel_dir``, with the target's attributes."""
    current = layer
    original: Path | None = fs_host
    for part in rel_dir.parts:
        current = current / part
        original = original / part if original is not None else None
        if not current.is_dir():
            os.mkdir(current, 0o700)
            _copy_dir_attrs(original, current)


def _make_dirs(top: Path, rel_dir: Path) -> None:
    current = top
    for part in rel_dir.parts:
        current = current / part
        if not current.exists():
            current.mkdir(mode=0o755)
            os.chmod(current, 0o755)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _roll_forward(fs_root: Path, checkpoint: Checkpoint = _no_checkpoint) -> None:
    """Finish a committed transaction on one file system; every step may run twice."""
    txn = fs_root / TXN_DIR
    prepared = txn / PREPARED
    if not prepared.exists():
        return
    doc = json.loads(prepared.read_text())
    touched_dirs: set[Path] = set()
    done_one = False
    for index, entry in enumerate(doc["entries"]):
        dest = fs_root / entry["dest"] if entry["dest"] else fs_root
        trash = txn / f"trash-{index}"
        kind = entry["kind"]
        if kind == "delete":
            if not os.path.lexists(trash) and os.path.lexists(dest):
                os.rename(dest, trash)
        elif kind == "dir":
            if (dest != fs_root and not os.path.lexists(trash) and os.path.lexists(dest)
                    and (entry.get("opaque") or not _is_dir(dest))):
                os.rename(dest, trash)
            _make_dirs(fs_root, Path(entry["dest"]).parent)
            try:
                os.mkdir(dest, 0o700)
            except FileExistsError:
                pass
            ids = _owner_ids(entry.get("uid"), entry.get("gid"))
            if ids is not None:
                os.lchown(dest, *ids)
            os.chmod(dest, entry["mode"])
        else:
            staged = txn / entry["staged"]
            if not os.path.lexists(staged):
                continue   # already renamed by an earlier, interrupted roll-forward
            _make_dirs(fs_root, Path(entry["dest"]).parent)
            if _is_dir(dest):
                os.rename(dest, trash)     # a file or symlink replaces a directory
            os.replace(staged, dest)
        touched_dirs.add(dest.parent)
        if not done_one:
            done_one = True
            checkpoint("renamed")
    for directory in touched_dirs:
        if directory.is_dir():
            _fsync_dir(directory)
    prepared.unlink()
    if not doc.get("master"):
        _remove_txn(txn)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, never crossing into another file system."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    pending = [path]
    order: list[Path] = []
    while pending:
        directory = pending.pop()
        order.append(directory)
        with os.scandir(directory) as it:
            for child in it:
                child_path = Path(child.path)
                cst = child.stat(follow_symlinks=False)
                if stat.S_ISDIR(cst.st_mode):
                    if cst.st_dev != st.st_dev:
                        raise OSError(16, f"{child_path}: another file system is mounted there")
                    pending.append(child_path)
                else:
                    os.unlink(child_path)
    for directory in reversed(order):
        os.rmdir(directory)


def _remove_txn(txn: Path) -> None:
    for child in txn.iterdir():
        if child.name != MARKER:
            _remove_tree(child)
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
        _remove_tree(txn)
        _fsync_dir(txn.parent)
    return "rolled back"
