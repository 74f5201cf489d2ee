"""The target tree as the patch sees it: safe paths, an in-memory overlay, one commit.

Applying a patch changes nothing in the tree while it computes.  Every file
it touches is read once into :class:`Tree` and changed there (a later file of
the same patch sees the earlier changes); only when every file has been
computed does :meth:`Tree.commit` put the changes in place:

1. stage each new file beside its target (a temporary name in the same
   directory, so the final rename cannot cross a file system), write it,
   set owner and mode, and flush it to disk (one ``syncfs`` per file system
   for all of them, or ``fsync`` on each where libc has no syncfs); a hard
   link keeps each file about to be replaced or deleted reachable under a
   backup name.  With :meth:`Tree.stage_early` a file is staged as soon as
   it is computed, so that a large patch holds one file's contents in
   memory at a time, not all of them; :meth:`Tree.discard` removes what was
   staged for a commit that does not happen;
2. remove deleted files, then rename every staged file over its target;
3. flush the directories the same way, drop the backups, remove
   directories that deletions left empty.

A failure in 1 or 2 undoes what was done (renames reversed from the backups,
temporary files and created directories removed), so the tree is as before
and nothing temporary is left.  Paths are resolved with
:func:`guest_init.safepath.resolve_in_root`: symlinks in the tree are followed
as they would be inside the guest, and any that lead outside the root are
refused.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..ops import _fsync_dir, _make_parents, _open_temp, unique_tag
from ..safepath import UnsafePath, resolve_in_root

BACKUP_SUFFIX = ".supercharge-old"
_syncfs = None  # libc's syncfs(2) once looked up; False where there is none


def _get_syncfs():  # type: ignore[no-untyped-def]
    """libc's syncfs through :mod:`guest_init.sysc` (ctypes, imported on first commit), or None."""
    global _syncfs
    if _syncfs is None:
        try:
            from ..sysc import libc

            _syncfs = libc().syncfs
        except Exception:
            _syncfs = False
    return _syncfs or None


def _sync_filesystems(paths: list[str]) -> bool:
    """Flush the file systems holding ``paths`` with one syncfs(2) each; False if unavailable.

    One journal commit per file system instead of one per file and directory:
    the same guarantee as fsync on each (the data is on disk when it returns),
    at a fraction of the cost even for two or three files.
    """
    syncfs = _get_syncfs()
    if syncfs is None:
        return False
    seen: dict[int, str] = {}
    for path in paths:
        try:
            seen.setdefault(os.stat(path).st_dev, path)
        except OSError:
            continue
    for path in seen.values():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if syncfs(fd) != 0:
                import ctypes  # already loaded by guest_init.sysc

                raise OSError(ctypes.get_errno() or errno.EIO, "syncfs failed", str(path))
        finally:
            os.close(fd)
    return True


@dataclass
class Node:
    """One path's state: ``kind`` is file, symlink, dir or other (device, fifo...)."""

    kind: str
    content: bytes = b""  # file content, or a symlink's target
    mode: int = 0o644  # permission bits (st_mode & 0o7777)
    uid: int | None = None
    gid: int | None = None
    #: ``content`` split into lines, kept once computed (the reverse check reuses it).
    lines: list[bytes] | None = field(default=None, compare=False, repr=False)
    #: Where ``content`` can be read again once it has been let go (``content`` is
    #: None then): the file on disk, or the temporary file it was staged in.
    reload_from: str | None = field(default=None, compare=False, repr=False)
    #: The temporary file holding this content, once written out ahead of the commit.
    staged: str | None = field(default=None, compare=False, repr=False)

    def same(self, other: Node | None) -> bool:
        if other is None or self.kind != other.kind:
            return False
        if self.staged is not None or other.staged is not None:
            return False  # written out because it differed from what was there
        return ((self.kind == "symlink" or self.mode == other.mode)
                and self.content == other.content)


def _backup_names(where: str, name: str) -> Iterator[str]:
    """Unused backup names for ``name`` in ``where``; FileExistsError after 100 of them."""
    for _ in range(100):
        yield os.path.join(where, f".{name}.{unique_tag()}{BACKUP_SUFFIX}")
    raise FileExistsError(errno.EEXIST, "no free temporary name", where)


#: Linux reads at most this much at a time (MAX_RW_COUNT).
_MAX_READ = 0x7FFFF000


def _read_file(path: str, size: int = -1) -> bytes:
    """The content of the regular file ``path``; ``size`` is its size if known (from lstat).

    One read of the known size (and a byte more, to see a file that grew) in
    place of ``open().read()``'s stat, seek and extra reads: a large patch
    reads hundreds of files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if size < 0:
            size = os.fstat(fd).st_size
        data = os.read(fd, min(size + 1, _MAX_READ))
        if len(data) <= size < _MAX_READ:
            return data  # a regular file's read is short only at its end
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _unlink_quietly(paths: Iterable[str]) -> None:
    """Remove temporary files and backups; one already gone is no error."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


#: Stands for "not in the overlay" where None already means "deleted".
_NOT_SEEN = Node("not-seen")


class CommitError(Exception):
    """Writing the result failed; the tree was restored (``path`` is the guest path)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class Tree:
    """A root directory plus the changes a patch makes to it, kept in memory until commit."""

    def __init__(self, root: Path, disk: dict[str, Node | None] | None = None) -> None:
        self.root = Path(root)
        text = str(self.root)
        self._prefix = text if text.endswith("/") else text + "/"
        #: What was read from the disk, shareable between views of the same tree
        #: within one call (the disk does not change until the commit).
        self.disk: dict[str, Node | None] = {} if disk is None else disk
        self.original: dict[str, Node | None] = {}
        self.current: dict[str, Node | None] = {}
        #: Patch paths the patch deletes, renames away or creates, whatever the order of
        #: its files: paths below them are taken literally (see :meth:`key`).
        self.vanishing: set[str] = set()
        #: Host paths of directories already resolved, and directories known to be real
        #: (no symlink on the way): looked up once per directory, not once per file.
        self._resolved: dict[str, str] = {}
        self._real: dict[str, bool] = {}
        #: Write each new file to its temporary name as soon as it is computed
        #: (see :meth:`stage_early`); ``None`` until asked for.
        self._early: dict[str, str] | None = None
        self._early_fsync = False
        #: A target's directory -> where its temporary file goes (see :meth:`_stage`), and
        #: the directories found real for staging ahead of the commit.
        self._stage_dirs: dict[str, str] = {}
        self._verified: set[str] = set()
        self._real_root: str | None = None
        #: The last lstat made by :meth:`key` (host path, result): :meth:`_read` usually
        #: wants the same one next.
        self._last_lstat: tuple[str, os.stat_result | None] = ("", None)

    # -- paths

    def key(self, rel: str, *, follow: bool) -> str:
        """The resolved guest path (relative, no symlinks left) of patch path ``rel``.

        Directories on the way are resolved inside the root; the last
        component is followed only if ``follow`` (a regular-file change made
        through a symlink changes the file it points to, as the shell would).
        Raises :class:`UnsafePath` if the path leads outside the root.
        """
        if rel in self.current:
            return rel  # already decided earlier in this patch (possibly created by it)
        parts = rel.split("/")
        for k in range(1, len(parts)):
            above = "/".join(parts[:k])
            node = self.current.get(above, _NOT_SEEN)
            if above in self.vanishing or node is None or (node is not _NOT_SEEN and node.kind != "dir"):
                # Below a path this patch deletes or replaces (a symlink becoming a
                # directory...): what the disk has there is gone by then, nothing to
                # follow.  commit() checks again that no symlink is left on the way.
                return rel
        parent, _, name = rel.rpartition("/")
        host_parent = self._resolved.get(parent)
        if host_parent is None:  # each directory once: the disk does not change until the commit
            host_parent = self._resolved[parent] = str(resolve_in_root(self.root, parent) if parent else self.root)
        text = host_parent + "/" + name if host_parent != "/" else "/" + name
        if follow:
            try:
                st = os.lstat(text)
            except OSError:
                st = None
            self._last_lstat = (text, st)
            if st is not None and stat.S_ISLNK(st.st_mode):
                text = str(resolve_in_root(self.root, rel))
        prefix = self._prefix
        if not text.startswith(prefix) or len(text) == len(prefix):
            raise UnsafePath(f"{rel}: resolves to the root itself or outside it")
        return text[len(prefix):]

    def host(self, key: str) -> str:
        """The host path of ``key`` (a string: the commit builds hundreds of them)."""
        return self._prefix + key

    # -- state

    def get(self, key: str) -> Node | None:
        """The current state of ``key``: the overlay, else the disk (read once)."""
        if key in self.current:
            node = self.current[key]
        else:
            if key in self.disk:
                node = self.disk[key]
            else:
                node = self.disk[key] = self._read(key)
            self.original[key] = node
            self.current[key] = node
        if node is not None and node.content is None:
            node.content = _read_file(node.reload_from)  # type: ignore[arg-type]  # let go earlier
        return node

    def set(self, key: str, node: Node | None) -> None:
        if key not in self.original:
            self.get(key)
        previous = self.current.get(key)
        if self._early is not None:
            if previous is not None and previous.staged is not None:
                _unlink_quietly([previous.staged])  # superseded by a later change in the patch
                self._early.pop(key, None)
            if (node is not None and node.kind == "file" and node.staged is None
                    and not node.same(self.original.get(key))):
                self._stage_now(key, node)
        self.current[key] = node

    # -- writing ahead of the commit

    def stage_early(self, durable: bool) -> None:
        """From now on, write each new file to its temporary name as soon as it is set.

        A large patch then holds one file's old and new content at a time
        instead of all of them (see :meth:`let_go`): less memory, and the
        memory of one file is reused for the next.  The commit renames what
        is staged; :meth:`discard` removes it when the patch does not go in.
        """
        self._early = {}
        self._early_fsync = durable and _get_syncfs() is None

    def _stage_now(self, key: str, node: Node) -> None:
        """Write ``node`` to its temporary name now, if nothing is in doubt; else the commit will.

        A symlink on the way that the patch itself removes later, or an error
        writing, is left to the commit: it knows the whole patch by then, and
        reports a write error as a failed patch with the tree restored.
        """
        try:
            self._check_real_dirs(key, self._root_real(), self._verified)
            tmp = self._stage(self.host(key), self.original.get(key), node, self._early_fsync,
                              self._stage_dirs)
        except OSError:
            return
        self._early[key] = tmp  # type: ignore[index]
        node.staged = node.reload_from = tmp
        node.content, node.lines = None, None  # type: ignore[assignment]

    def let_go(self, key: str) -> None:
        """Free the disk content read for ``key`` (it is read again if asked for)."""
        node = self.disk.get(key)
        after = self.current.get(key)
        if after is not None and after.staged is None:
            return  # not written out (unchanged...): comparing it with the result still needs it
        if node is not None and node.kind == "file" and node.content is not None:
            node.reload_from = self.host(key)
            node.content, node.lines = None, None  # type: ignore[assignment]

    def discard(self) -> None:
        """Remove the files staged ahead of a commit that is not going to happen."""
        if self._early:
            _unlink_quietly(self._early.values())
            self._early.clear()

    def _read(self, key: str) -> Node | None:
        path = self.host(key)
        if "/" in key and not self._real_dirs(key.rpartition("/")[0]):
            return None  # under a symlink or a file: in the patch's view nothing is there
        seen, st = self._last_lstat
        if seen != path or st is None:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            return Node("file", _read_file(path, st.st_size), mode, st.st_uid, st.st_gid)
        if stat.S_ISLNK(st.st_mode):
            return Node("symlink", os.readlink(os.fsencode(path)), mode, st.st_uid, st.st_gid)
        if stat.S_ISDIR(st.st_mode):
            return Node("dir", b"", mode, st.st_uid, st.st_gid)
        return Node("other", b"", mode, st.st_uid, st.st_gid)

    def _real_dirs(self, rel_dir: str) -> bool:
        """Is every component of ``rel_dir`` that exists a real directory (no symlink, no file)?

        Keys below a path the patch deletes or creates are taken literally
        (see :meth:`key`); reading them must not follow a symlink that the
        operating system would otherwise follow silently.  Each directory is
        looked at once (the disk does not change until the commit).
        """
        known = self._real.get(rel_dir)
        if known is None:
            known = self._real[rel_dir] = self._look_real(rel_dir)
        return known

    def _look_real(self, rel_dir: str) -> bool:
        current = str(self.root)
        for part in rel_dir.split("/"):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return True  # the rest does not exist either
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def changes(self) -> list[tuple[str, Node | None, Node | None]]:
        """(key, before, after) for every path whose state differs from the disk."""
        out = []
        for key, after in self.current.items():
            before = self.original.get(key)
            if after is None and before is None:
                continue
            if after is not None and after.same(before):
                continue
            out.append((key, before, after))
        return out

    def conflicts(self) -> list[tuple[str, str]]:
        """(key, problem) for writes the final state does not allow.

        A file may replace a directory only if the patch deletes everything
        in it, and may only be written below directories (existing, or to be
        created in place of a file the patch deletes).
        """
        problems = []
        for key, before, after in self.changes():
            if after is None:
                continue
            if before is not None and before.kind == "other":
                problems.append((key, "is a special file"))
                continue
            if before is not None and before.kind == "dir":
                left = self._remaining_below(key)
                if left:
                    problems.append((key, f"is a directory, and the patch leaves {left} in it"))
                    continue
            parts = key.split("/")
            for k in range(1, len(parts)):
                ancestor = "/".join(parts[:k])
                if ancestor in self.current:
                    node = self.current[ancestor]
                    if node is not None and node.kind != "dir":
                        problems.append((key, f"{ancestor} is not a directory"))
                        break
                    continue
                try:
                    st = os.lstat(self.host(ancestor))
                except (FileNotFoundError, NotADirectoryError):
                    break
                if not stat.S_ISDIR(st.st_mode):
                    problems.append((key, f"{ancestor} is not a directory"))
                    break
        return problems

    def _remaining_below(self, key: str) -> str | None:
        """A path under directory ``key`` that the patch does not delete, if any."""
        top = self.host(key)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                if not (rel in self.current and self.current[rel] is None):
                    return rel
        return None

    # -- commit

    def commit(self, durable: bool = True) -> None:
        """Write every change all at once, or none (raises :class:`CommitError`).

        ``durable=False`` skips the flushes, for scratch trees whose loss on a
        power cut does not matter (dom0's per-domain working copies).  Host
        paths are plain strings here: a large patch commits hundreds of files,
        and building pathlib objects for each step was a tenth of the commit.
        """
        changes = self.changes()
        if not changes:
            return
        prefix = self._prefix
        staged: list[tuple[str, str, str]] = []  # (temporary, target, key)
        backups: dict[str, str | None] = {}  # key -> hard link keeping the old file
        done: list[tuple[str, str, int]] = []  # what to undo: (action, path, mode)
        dirs: set[str] = set()
        aside_dirs: dict[str, str] = {}
        current_key = ""
        # Durability: one syncfs per file system after staging and after the renames
        # where libc has it, else fsync on every file and directory.
        each = durable and _get_syncfs() is None
        try:
            # 1. Stage every new file and back up every file about to go (above any
            #    directory that will be removed, so the backup does not keep it busy).
            doomed = [k + "/" for k, b, a in changes if b is not None and b.kind == "dir" and a is not None]
            real_root = self._root_real()
            verified: set[str] = set()  # directories checked in this phase (one check each)
            for key, before, after in changes:
                current_key = key
                target = prefix + key
                self._check_real_dirs(key, real_root, verified)  # nothing changed since the patch was computed
                if before is not None and before.kind in ("file", "symlink"):
                    tops = [d for d in doomed if key.startswith(d)]
                    aside_dirs[key] = os.path.dirname(prefix + min(tops, key=len)[:-1] if tops else target)
                    backups[key] = self._backup(target, aside_dirs[key])
                if after is not None:
                    tmp = after.staged or self._stage(target, before, after, each, self._stage_dirs)
                    staged.append((tmp, target, key))
            if durable and not each and staged:
                _sync_filesystems([os.path.dirname(tmp) for tmp, _, _ in staged])
            # 2. Deletions, and directories that files replace (emptied by the deletions).
            for key, before, after in changes:
                if before is None or before.kind not in ("file", "symlink") or after is not None:
                    continue
                current_key = key
                target = prefix + key
                if backups.get(key) is not None:
                    os.unlink(target)  # the backup link keeps it for a rollback
                else:
                    aside = self._free_name(aside_dirs[key], os.path.basename(target))
                    os.rename(target, aside)
                    backups[key] = aside
                done.append(("delete", target, 0))
                dirs.add(os.path.dirname(target))
            for key, before, after in changes:
                if before is not None and before.kind == "dir" and after is not None:
                    current_key = key
                    self._remove_tree_dirs(prefix + key, done)
            # 3. Parents, then every staged file into place (through real directories
            #    only: a symlink on the way now would take the file elsewhere).
            verified = set()
            ready: set[str] = set()  # directories made or found in this phase
            for tmp, target, key in staged:
                current_key = key
                parent = os.path.dirname(target)
                if parent not in ready:
                    for d in _make_parents(Path(parent)):
                        done.append(("mkdir", str(d), 0))
                        dirs.add(str(d.parent))
                    ready.add(parent)
                self._check_real_dirs(key, real_root, verified)
                os.replace(tmp, target)
                done.append(("replace", target, 0))
                dirs.add(parent)
            existing = [d for d in dirs if os.path.isdir(d)]
            if durable and (each or not _sync_filesystems(existing)):
                for d in existing:
                    _fsync_dir(d)
        except OSError as exc:
            self._rollback(staged, backups, done)
            raise CommitError(current_key, exc.strerror or str(exc)) from exc
        if self._early is not None:
            self._early.clear()
            for after in self.current.values():
                if after is not None and after.staged is not None:
                    after.staged = None  # in place now: the name is gone
        _unlink_quietly(link for link in backups.values() if link is not None)
        self._remove_emptied_dirs([k for k, _, a in changes if a is None])

    def _goes(self, key: str) -> bool:
        """Does the commit remove what is at ``key`` now (deleted, or replaced by a non-directory)?"""
        if key not in self.current:
            return False
        node = self.current[key]
        return node is None or node.kind != "dir"

    def _check_real_dirs(self, key: str, real_root: str, verified: set[str]) -> None:
        """Raise if a directory on the way to ``key`` (as far as it exists) is now a symlink.

        ``verified`` holds the directories already found real in this phase of
        the commit: a large patch changes many files per directory, and
        resolving the same directory again per file was a tenth of the
        commit's time.  A directory enters it only once it passed.
        """
        parent = key.rpartition("/")[0]
        if parent in verified:
            return
        above = parent
        while above and (not os.path.lexists(self._prefix + above) or self._goes(above)):
            above = above.rpartition("/")[0]
        here = self._prefix + above if above else str(self.root)
        if os.path.realpath(here) != os.path.normpath(os.path.join(real_root, above)):
            raise OSError(errno.ELOOP, "a symbolic link is in the way", here)
        verified.add(parent)

    def _root_real(self) -> str:
        """The root with its symlinks resolved (looked up once: the root does not move)."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        return self._real_root

    @staticmethod
    def _remove_tree_dirs(top: str, done: list[tuple[str, str, int]]) -> None:
        """Remove the (by now empty) directory ``top`` and the empty directories in it."""
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            mode = stat.S_IMODE(os.lstat(dirpath).st_mode)
            os.rmdir(dirpath)
            done.append(("rmdir", dirpath, mode))

    def _stage(self, target: str, before: Node | None, after: Node, fsync: bool,
               stage_dirs: dict[str, str]) -> str:
        """Write ``after`` under a temporary name; return that name.

        Beside ``target`` when its directory exists, else in the nearest
        existing directory above it (the directory is created, or takes the
        place of a file, only at commit), so the final rename stays on one
        file system and the tree is untouched until then.  ``stage_dirs``
        remembers that choice per directory (nothing else changes them while
        staging).
        """
        parent = os.path.dirname(target)
        where = stage_dirs.get(parent)
        if where is None:
            where, root = parent, str(self.root)
            while not os.path.isdir(where) or os.path.islink(where):
                up = os.path.dirname(where)
                if where == root or up == where:
                    break
                where = up
            stage_dirs[parent] = where
        name = os.path.basename(target)
        if after.kind == "symlink":
            for _ in range(100):
                tmp = os.path.join(where, f".{name}.{unique_tag()}.supercharge-tmp")
                try:
                    os.symlink(after.content, tmp)
                    return tmp
                except FileExistsError:
                    continue
            raise FileExistsError(errno.EEXIST, "no free temporary name", where)
        fd, tmp = _open_temp(where, name)
        try:
            view = memoryview(after.content)
            while view:
                view = view[os.write(fd, view):]
            if before is not None and before.kind == "file":
                st = os.fstat(fd)
                uid = before.uid if before.uid is not None else -1
                gid = before.gid if before.gid is not None else -1
                if uid not in (-1, st.st_uid) or gid not in (-1, st.st_gid):
                    try:
                        os.fchown(fd, uid, gid)
                    except PermissionError:
                        pass  # not root: the owner cannot be kept, as with any editor
            os.fchmod(fd, after.mode)  # after chown, which clears set-id bits
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _backup(self, target: str, where: str) -> str | None:
        """A hard link to ``target`` under a free name, so a failed commit can restore it.

        None where the file system has no hard links (vfat...): the commit
        still works, only an error half way could then not restore that file.
        """
        for link in _backup_names(where, os.path.basename(target)):
            try:
                os.link(target, link, follow_symlinks=False)
                return link
            except FileExistsError:
                continue  # the link itself says whether the name is free: no separate check
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    return None
                raise
        raise AssertionError("unreachable")  # _backup_names raises when it runs out

    @staticmethod
    def _free_name(where: str, name: str) -> str:
        """A backup name not taken yet (rename(2) would replace a file already there)."""
        return next(path for path in _backup_names(where, name) if not os.path.lexists(path))

    def _rollback(self, staged: list[tuple[str, str, str]], backups: dict[str, str | None],
                  done: list[tuple[str, str, int]]) -> None:
        """Undo a commit that failed half way: the tree ends as it was before it."""
        by_target = {self._prefix + k: k for k in backups}
        for action, path, mode in reversed(done):
            try:
                if action in ("replace", "delete"):
                    key = by_target.get(path)
                    link = backups.pop(key, None) if key is not None else None
                    if link is not None:
                        os.replace(link, path)
                    elif action == "replace":
                        os.unlink(path)
                elif action == "mkdir":
                    os.rmdir(path)
                elif action == "rmdir":
                    os.mkdir(path, mode)
                    os.chmod(path, mode)
            except OSError:
                pass
        _unlink_quietly(tmp for tmp, _, _ in staged)
        _unlink_quietly(link for link in backups.values() if link is not None)

    def _remove_emptied_dirs(self, removed: list[str]) -> None:
        """Remove directories left empty by deletions, up to (not including) the root.

        GNU patch and git apply both do this, so a patch that deletes a
        directory's last file leaves no empty directory behind.
        """
        for key in removed:
            parts = key.split("/")[:-1]
            while parts:
                try:
                    os.rmdir(self.host("/".join(parts)))
                except OSError:
                    break
                parts.pop()
