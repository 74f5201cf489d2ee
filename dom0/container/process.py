"""Process a container file: one pass over its expressions, in the order written.

dom0-time expressions (create, image, populate, and replace/copy/patch on an
archive or image) are carried out now, through the same operation code the
guest agent uses; boot-time ones (``at boot``, hooks, mounts) are compiled into
the domain's plan, every fetched artifact pinned by the SHA-256 computed here.

Archives are fetched and expanded once per :class:`Workspace` (one invocation,
however many containers it processes).  Each container changes its own working
copy, made of hard links to the expanded base: every operation replaces files
by writing a new file and renaming it, so a shared inode is never changed in
place and a new domain costs only the files it changes.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from guest_init.ops import OpError, apply_replace
from guest_init.plan import PlanError, ReplaceStep, validate_plan

from ..cpio import CpioWriter
from ..compress import compress
from ..errors import EXIT_FAILED, UserError
from ..xlcfg import write_xl_config
from .model import (Container, Copy, Create, Export, Expr, FileChange, Hook, Image, Mount, NfsExport, Patch,
                    Populate, Replace)

STATE = ".supercharge"


def _suffix_compression(uri: str) -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    for suffix, method in ((".zst", "zstd"), (".zstd", "zstd"), (".xz", "xz"), (".gz", "gzip"),
                           (".cpio", "none")):
        if path.endswith(suffix):
            return method
    return "gzip"


def local_path(uri: str) -> Path | None:
    """The dom0 path of a ``file://`` URI (or a plain path), else None."""
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


def _set_dir_meta(path: str, st: os.stat_result, as_root: bool) -> None:
    if as_root:
        os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _clone_entry(src: str, st: os.stat_result, dest: str, as_root: bool,
                 dirs: list[tuple[str, os.stat_result]]) -> None:
    """Clone one entry of a tree: a directory (recursively), a symlink, or a hard link."""
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dest, 0o700)
        with os.scandir(src) as entries:
            for entry in entries:
                _clone_entry(entry.path, entry.stat(follow_symlinks=False),
                             os.path.join(dest, entry.name), as_root, dirs)
        dirs.append((dest, st))          # its metadata once it is filled: children first
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
        if as_root:
            os.lchown(dest, st.st_uid, st.st_gid)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    else:
        os.link(src, dest, follow_symlinks=False)


def hardlink_clone(src: Path, dest: Path) -> None:
    """A copy of ``src`` made of hard links (directories and symlinks are real copies).

    Directories and symlinks keep their owner (when root), mode and mtime, so a
    fork of an unchanged part of the tree archives exactly as the base did.
    Directory metadata is set children first, after the directory is filled
    (filling it would otherwise move its mtime to now).
    """
    as_root = os.geteuid() == 0
    dirs: list[tuple[str, os.stat_result]] = []
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as entries:
        for entry in entries:
            _clone_entry(entry.path, entry.stat(follow_symlinks=False),
                         os.path.join(dest, entry.name), as_root, dirs)
    dirs.append((str(dest), os.lstat(src)))
    for path, st in dirs:
        _set_dir_meta(path, st, as_root)


def reset_clone(src: Path, dest: Path) -> None:
    """Make ``dest``, a :func:`hardlink_clone` of ``src`` changed since, a fresh clone again.

    Only what differs is redone: a file is kept when it is still the base's inode
    (every change writes a new file and renames it, so a shared inode is never
    changed), a symlink when its target, owner and mtime are the base's; what a
    container added is removed, what it replaced or removed is linked again.
    Reusing a finished container's working copy this way costs a walk of the
    tree instead of removing it and cloning anew (removing directories is the
    slow part on ext4).
    """
    as_root = os.geteuid() == 0
    dirs: list[tuple[str, os.stat_result]] = []

    def sync(s_dir: str, d_dir: str) -> None:
        with os.scandir(s_dir) as entries:
            base = {e.name: e for e in entries}
        with os.scandir(d_dir) as entries:
            mine = {e.name: e for e in entries}
        for name, entry in mine.items():
            if name not in base:
                _remove_entry(entry)
        for name, entry in base.items():
            bst = entry.stat(follow_symlinks=False)
            d = os.path.join(d_dir, name)
            have = mine.get(name)
            if have is not None:
                wst = have.stat(follow_symlinks=False)
                if stat.S_IFMT(wst.st_mode) == stat.S_IFMT(bst.st_mode):
                    if stat.S_ISDIR(bst.st_mode):
                        sync(entry.path, d)
                        dirs.append((d, bst))
                        continue
                    if stat.S_ISLNK(bst.st_mode):
                        if ((wst.st_uid, wst.st_gid, wst.st_mtime_ns) == (bst.st_uid, bst.st_gid, bst.st_mtime_ns)
                                and os.readlink(d) == os.readlink(entry.path)):
                            continue
                    elif (wst.st_dev, wst.st_ino) == (bst.st_dev, bst.st_ino):
                        continue
                _remove_entry(have)
            _clone_entry(entry.path, bst, d, as_root, dirs)

    sync(str(src), str(dest))
    dirs.append((str(dest), os.lstat(src)))
    for path, st in dirs:
        now = os.lstat(path)
        if (stat.S_IMODE(now.st_mode), now.st_uid, now.st_gid, now.st_mtime_ns) != (
                stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns):
            _set_dir_meta(path, st, as_root)


def _remove_entry(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)


#: Compression levels for the archives the processor makes (create, fork): the standard
#: tools' own defaults (``gzip``, ``zstd``, ``xz`` with no option), not the initramfs
#: maximums of dom0.compress (gzip -9, zstd -19), which cost 2x (gzip) to 100x (zstd) the
#: time for a fraction of a percent (gzip) of size on an /etc: forks are made per domain.
ARCHIVE_LEVELS = {"gzip": 6, "zstd": 3, "xz": 6}


def archive_tree(tree: Path, uri: str, out: Path) -> int:
    """Write ``tree`` as a cpio newc archive, compressed as the URI's suffix says."""
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    # A file system's archive keeps owners and mtimes; the image's lost+found is not content.
    try:
        writer.add_tree(tree, preserve=True, exclude=("lost+found",))
    except ValueError as exc:  # a FIFO or socket (the writer's message names it)
        raise UserError(f"cannot archive {tree} for {uri}: {exc}") from None
    writer.close()
    method = _suffix_compression(uri)
    raw = buf.getvalue()
    if method == "gzip" and len(raw) > PARALLEL_GZIP_MIN:
        data = _parallel_gzip(raw, ARCHIVE_LEVELS["gzip"])
    else:
        data = compress(raw, method, ARCHIVE_LEVELS.get(method))
    out.write_bytes(data)
    return len(data)


PARALLEL_GZIP_MIN = 1 << 20


def _parallel_gzip(data: bytes, level: int, parts: int | None = None) -> bytes:
    """gzip in pieces on every core, as pigz does: concatenated gzip members are one
    valid .gz stream (RFC 1952), read whole by gunzip, cpio tools and our reader.
    zlib releases the GIL, so threads are enough."""
    import gzip
    from concurrent.futures import ThreadPoolExecutor

    parts = parts or max(1, min(os.cpu_count() or 1, 8))
    size = -(-len(data) // parts)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    with ThreadPoolExecutor(len(chunks)) as pool:
        return b"".join(pool.map(lambda c: gzip.compress(c, compresslevel=level, mtime=0), chunks))


@dataclass
class LogEntry:
    where: str
    kind: str
    summary: str
    action: str
    seconds: float
    bytes: int = 0

    def line(self) -> str:
        return (f"{self.where}: {self.kind} {self.summary}: {self.action} "
                f"({self.seconds:.3f} s, {self.bytes} bytes)")


@dataclass
class ContainerResult:
    container: Container
    stripped: str
    plan: dict | None
    log: list[LogEntry] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)
    #: dom0 directories the domain mounts over NFS (``[nfs]``): dom0.nfs.Export objects
    nfs_exports: list = field(default_factory=list)


class Workspace:
    """What one invocation shares between containers: fetched files and expanded archives."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE
        self.fetch_dir = self.state / "fetch"
        self.expand_dir = self.state / "expanded"
        self.work_dir = self.state / "work"
        for d in (self.fetch_dir, self.expand_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._expanded: dict[str, Path] = {}
        self._fetched: dict[str, tuple[Path, str, int]] = {}
        self._spares: dict[Path, list[Path]] = {}     # expanded base -> finished working copies
        self._spare_dir: Path | None = None

    def working_copy(self, base: Path, dest: Path) -> None:
        """Make ``dest`` a working copy of the expanded archive ``base``: a finished
        container's copy, reset (:func:`reset_clone`), when there is one, else a new clone."""
        spares = self._spares.get(base)
        if spares:
            os.rename(spares.pop(), dest)
            reset_clone(base, dest)
        else:
            hardlink_clone(base, dest)

    def give_back(self, base: Path, tree: Path) -> None:
        """Keep a finished container's working copy of ``base`` for the next container.

        The spares are removed when the workspace goes (at the latest when the process exits).
        """
        if self._spare_dir is None:
            self._spare_dir = Path(tempfile.mkdtemp(prefix="spare-", dir=self.work_dir))
            weakref.finalize(self, shutil.rmtree, str(self._spare_dir), True)
        spare = Path(tempfile.mkdtemp(dir=self._spare_dir))
        os.rename(tree, spare / "tree")
        self._spares.setdefault(base, []).append(spare / "tree")

    #: Signature policy, set by the CLI: keys to verify fetched artifacts with,
    #: whether an unsigned artifact is refused, and the key that signs what we store.
    trust_keys: list | None = None
    require_signatures: bool = False
    signer: object | None = None

    def fetch(self, uri: str) -> tuple[Path, str, int]:
        """(path, sha256, size) of ``uri``'s content, fetched once (and verified, with --trust)."""
        hit = self._fetched.get(uri)
        if hit is None:
            from ..store import fetch_to_cache_result

            result = fetch_to_cache_result(uri, self.fetch_dir)
            hit = (result.path, result.sha256, result.size)
            self.check_signature(uri, result.path)
            self._fetched[uri] = hit
        return hit

    def check_signature(self, uri: str, path: Path) -> str | None:
        """Verify ``URI.minisig`` against the trusted keys; returns the signer's key id."""
        if not self.trust_keys and not self.require_signatures:
            return None
        from guest_init.trust import TrustError, verify_file

        from ..store import fetch_to_cache

        try:
            sig = fetch_to_cache(uri + ".minisig", self.fetch_dir, progress=False, retries=1)
        except UserError:
            if self.require_signatures:
                raise UserError(f"{uri}: no signature ({uri}.minisig), and --require-signatures is set",
                                EXIT_FAILED) from None
            return None
        try:
            return verify_file(path, sig, self.trust_keys or []).key_id
        except TrustError as exc:
            raise UserError(f"{uri}: {exc}", EXIT_FAILED) from None

    def sign_stored(self, data_path: Path, uri: str) -> None:
        """With --sign-key, store ``URI.minisig`` beside what was stored at ``uri``."""
        if self.signer is None:
            return
        from ..keys import sign_file
        from ..store import store

        sig = data_path.with_name(data_path.name + ".minisig")
        sig.write_text(sign_file(data_path, self.signer, trusted_comment=f"file:{uri.rsplit('/', 1)[-1]}"))
        try:
            store(sig, uri + ".minisig")
        finally:
            sig.unlink(missing_ok=True)

    def forget(self, uri: str) -> None:
        """This invocation stored something at ``uri``: later readers fetch what was stored
        (as dom0.store's own cache does), instead of the copy fetched before."""
        self._fetched.pop(uri, None)
        self._expanded.pop(uri, None)
        self._expanded.pop(uri + "\0devices", None)

    def expanded(self, uri: str, allow_devices: bool = False) -> Path:
        """The archive at ``uri``, expanded once; never changed (containers clone it).

        Device nodes are refused unless the expression says ``devices allow``; an
        expansion that allowed them is kept apart from one that did not.
        """
        hit = self._expanded.get(uri) if not allow_devices else self._expanded.get(uri + "\0devices")
        if hit is not None:
            return hit
        from guest_init.archive import ArchiveError, extract_archive

        path, digest, _ = self.fetch(uri)
        dest = self.expand_dir / (digest[:32] + ("-devices" if allow_devices else ""))
        if not dest.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".expand-", dir=self.expand_dir))
            try:
                extract_archive(path, tmp / "tree", preserve_owner=os.geteuid() == 0,
                                allow_devices=allow_devices)
            except ArchiveError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"{uri}: {exc}") from None
            os.replace(tmp / "tree", dest)
            tmp.rmdir()
        self._expanded[uri + ("\0devices" if allow_devices else "")] = dest
        return dest


class ContainerRun:
    """One container's pass: its working trees, fresh images, plan and log.

    With ``dry_run`` nothing outside the workspace is changed: dom0-time
    expressions are checked and logged as what they would do, exports give
    their disk lines without creating overlays or snapshots, and boot-time
    artifacts are fetched into the workspace to pin them in the plan.
    """

    def __init__(self, workspace: Workspace, container: Container, dry_run: bool = False) -> None:
        self.ws = workspace
        self.c = container
        self.dry_run = dry_run
        self.base_dir = Path(container.path).resolve().parent if container.path else Path.cwd()
        stem = Path(container.path).name if container.path else "container"
        self.work = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=workspace.work_dir))
        self.trees: dict[str, Path] = {}
        self.allow_devices = False   # the current expression's 'devices allow'

        self.bases: dict[str, Path] = {}   # the expanded archive each working copy was made from
        self.fresh_images: set[Path] = set()
        self.disks: list[str] = []
        self.mounts: list[dict] = []
        self.steps: list[dict] = []
        self.nfs_exports: list = []
        self.network_reason: Expr | None = None   # the first boot-time expression that needs a network
        self.log: list[LogEntry] = []

    # -- helpers -------------------------------------------------------------------

    def where(self, expr: Expr) -> str:
        return str(expr.pos)

    def fail(self, expr: Expr, message: str, field_name: str | None = None) -> UserError:
        pos = expr.where(field_name) if field_name else expr.pos
        return UserError(f"{pos}: {message}")

    def dom0_path(self, text: str) -> Path:
        path = Path(text)
        return path if path.is_absolute() else self.base_dir / path

    def uri(self, text: str) -> str:
        """Relative file:// paths are relative to the container's directory."""
        if text.startswith("file://"):
            return "file://" + str(self.dom0_path(unquote(urlsplit(text).path)))
        return text

    def tree(self, uri: str) -> Path:
        """This container's working copy of an archive (a hard-link clone of the base)."""
        uri = self.uri(uri)
        hit = self.trees.get(uri)
        if hit is None:
            base = self.ws.expanded(uri, self.allow_devices)
            hit = self.work / hashlib.sha256(uri.encode()).hexdigest()[:16]
            self.ws.working_copy(base, hit)
            self.trees[uri] = hit
            self.bases[uri] = base
        return hit

    def is_image(self, path: Path) -> bool:
        from guest_init.devices import read_fs_identity

        try:
            return path.is_file() and read_fs_identity(path) is not None
        except OSError:
            return False

    def store_file(self, expr: Expr, data_path: Path, uri: str, tree: Path | None = None) -> int:
        """Store a file at ``uri``; ``tree`` is the working copy it was archived from, if any."""
        from ..store import store

        uri = self.uri(uri)
        size = store(data_path, uri).size
        self.ws.sign_stored(data_path, uri)
        self.ws.forget(uri)
        if self.trees.get(uri) not in (None, tree):
            # This container's copy of what was there before is stale.
            shutil.rmtree(self.trees.pop(uri))
        return size

    def fork(self, expr: Expr, tree: Path, uri: str) -> int:
        out = self.work / f".fork-{os.getpid()}-{len(self.log)}"
        try:
            size = archive_tree(tree, uri, out)
            self.store_file(expr, out, uri, tree)
        finally:
            out.unlink(missing_ok=True)
        return size

    def patch_out(self, expr: Expr, patch: bytes, uri: str) -> int:
        out = self.work / f".patch-out-{len(self.log)}"
        out.write_bytes(patch)
        try:
            self.store_file(expr, out, uri)
        finally:
            out.unlink(missing_ok=True)
        return len(patch)

    # -- file-system targets -----------------------------------------------------------

    def open_target(self, expr: FileChange):
        """A context manager yielding the root of the file system ``expr`` changes."""
        from contextlib import nullcontext

        if expr.archive:
            return nullcontext(self.tree(expr.archive))
        image = self.dom0_path(expr.image)
        if not image.is_file():
            raise self.fail(expr, f"image {image} not found", "image")
        from ..images import mounted_image

        self.fresh_images.discard(image)
        return mounted_image(image)

    @staticmethod
    def in_tree(tree: Path, guest_path: str) -> str:
        """Where a guest path lies in a file system that may hold one directory's contents.

        A tree that has the path's top directory (``etc/``) is a whole root.
        Otherwise it is that directory's file system, as the paper's /etc
        archive is: ``/etc/HOSTNAME`` is ``HOSTNAME`` in it.
        """
        parts = [p for p in guest_path.split("/") if p]
        if len(parts) > 1 and not (tree / parts[0]).is_dir():
            parts = parts[1:]
        return "/" + "/".join(parts)

    def owner_ids(self, expr: FileChange, tree: Path) -> tuple[int | None, int | None]:
        if expr.owner is None:
            return None, None
        user, group = expr.owner
        return (self._lookup_id(expr, tree, "passwd", user), self._lookup_id(expr, tree, "group", group))

    def _lookup_id(self, expr: Expr, tree: Path | None, table: str, name: str) -> int:
        if name.isdigit():
            return int(name)
        if name == "root":
            return 0
        if tree is not None:
            for candidate in (tree / "etc" / table, tree / table):
                if candidate.is_file():
                    for line in candidate.read_text(errors="replace").splitlines():
                        fields = line.split(":")
                        if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                            return int(fields[2])
        what = "user" if table == "passwd" else "group"
        if tree is None:
            raise self.fail(expr, f"owner: the {what} '{name}' cannot be looked up at boot (the plan "
                            f"carries numeric ids; dom0 cannot read the guest's /etc/{table}); use a "
                            "number, or root", "owner")
        raise self.fail(expr, f"owner: no {what} '{name}' in the target's /etc/{table}; use a number",
                        "owner")

    # -- the expressions -----------------------------------------------------------------

    def run(self) -> ContainerResult:
        handlers = {"create": self.do_create, "image": self.do_image, "populate": self.do_populate,
                    "replace": self.do_change, "copy": self.do_change, "patch": self.do_patch,
                    "hook": self.do_hook, "mount": self.do_mount, "export": self.do_export,
                    "nfs": self.do_nfs}
        try:
            for expr in self.c.expressions:
                started = time.monotonic()
                self.allow_devices = expr.allow_devices
                if self.dry_run and not expr.at_boot and expr.kind not in ("export", "image"):
                    summary, action, moved = self.dry(expr)
                else:
                    summary, action, moved = handlers[expr.kind](expr)
                self.log.append(LogEntry(self.where(expr), expr.kind, summary, action,
                                         time.monotonic() - started, moved))
            plan = self.build_plan()
            stripped = self.stripped()
        except UserError as exc:
            exc.log = self.log  # type: ignore[attr-defined]  # what was done before it, for --log
            raise
        else:
            for uri, tree in self.trees.items():      # reused, reset, by the next container
                self.ws.give_back(self.bases[uri], tree)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)   # nothing else of this container is kept
        return ContainerResult(self.c, stripped, plan, self.log, self.disks, self.nfs_exports)

    def do_create(self, expr: Create) -> tuple[str, str, int]:
        src = self.dom0_path(expr.src_dir)
        if not src.is_dir():
            raise self.fail(expr, f"{src}: directory not found", "src_dir")
        out = self.work / f".create-{len(self.log)}"
        try:
            size = archive_tree(src, expr.uri, out)
            self.store_file(expr, out, expr.uri)
        finally:
            out.unlink(missing_ok=True)
        return f"{expr.src_dir} {expr.uri}", f"archived and stored ({_suffix_compression(expr.uri)})", size

    def dry(self, expr: Expr) -> tuple[str, str, int]:
        """A dom0-time expression in a dry run: what it would do, nothing done."""
        summary = {"create": lambda e: f"{e.src_dir} {e.uri}",
                   "populate": lambda e: f"{e.image} {e.uri}",
                   "patch": lambda e: f"{e.target} {e.patch}"}.get(
            expr.kind, lambda e: f"{e.path} in {e.archive or e.image}")(expr)
        return summary, "not run (dry run)", 0

    def do_image(self, expr: Image) -> tuple[str, str, int]:
        path = self.dom0_path(expr.path)
        action = f"created {expr.fstype}, label {expr.label}"
        if self.dry_run:
            action = "not created (dry run)"
        else:
            from ..images import create_image

            create_image(path, expr.size, expr.label, expr.fstype)
            self.fresh_images.add(path)
        if expr.export:
            self.disks.append(f"format=raw, vdev={expr.export}, access={expr.access}, target={path}")
            action += f", exported as {expr.export} ({expr.access})"
        return f"{expr.path} {expr.size}", action, 0

    def domain_name(self) -> str:
        name = self.c.settings.get("name")
        return str(name) if isinstance(name, str) and name else Path(self.c.path or "domain").stem

    def do_export(self, expr: Export) -> tuple[str, str, int]:
        """An existing image given to the domain: shared, its own, or copy-on-write."""
        from .. import exports

        path = self.dom0_path(expr.path)
        where = str(expr.where("path"))
        summary = f"{expr.path} {expr.vdev} {expr.access}"
        if expr.cow == "lvm":
            name = expr.snapshot or exports.default_snapshot_name(self.domain_name(), expr.vdev)
            snap = exports.snapshot_path(path, name)
            if self.dry_run:
                action = f"snapshot {snap} not created (dry run)"
            else:
                snap, action = exports.lvm_snapshot(path, name, expr.snapshot_size, keep=expr.keep,
                                                    where=where)
            disk = exports.disk_spec(snap, expr.vdev, "rw")
            moved = 0
        elif expr.cow == "qcow2":
            overlay = (self.dom0_path(expr.overlay) if expr.overlay
                       else exports.default_overlay(path, self.domain_name(), expr.vdev))
            if self.dry_run:
                exports.check_base(path, expr.format, where)
                action, moved = f"overlay {overlay} not created (dry run)", 0
            else:
                action, moved = exports.create_overlay(path, overlay, expr.format, keep=expr.keep,
                                                       where=where)
                action += f": {overlay}"
            disk = exports.disk_spec(overlay, expr.vdev, "rw", "qcow2")
        else:
            if exports.is_block_path(path):
                if not self.dry_run and not path.exists():
                    raise self.fail(expr, f"{path}: block device not found", "path")
            else:
                exports.check_base(path, expr.format, where)
            access: Literal["ro", "rw"] = "ro" if expr.access == "ro" else "rw"
            disk = exports.disk_spec(path, expr.vdev, access, expr.format)
            action = "shared read-only" if access == "ro" else "exported read-write"
            moved = 0
        self.disks.append(disk.to_spec())
        return summary, f"{action}, disk {expr.vdev}", moved

    def do_populate(self, expr: Populate) -> tuple[str, str, int]:
        from ..images import populate_image

        image = self.dom0_path(expr.image)
        if not image.is_file():
            raise self.fail(expr, f"image {image} not found", "image")
        uri = self.uri(expr.uri)
        tree = self.trees.get(uri) or self.ws.expanded(uri, self.allow_devices)
        how = populate_image(image, tree, fresh=image in self.fresh_images)
        self.fresh_images.discard(image)
        size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        return f"{expr.image} {expr.uri}", f"populated by {how}", size

    def content_of(self, expr: FileChange) -> tuple[bytes, str | None]:
        """The new content (and for a boot-time copy, its pin)."""
        if isinstance(expr, Replace):
            return expr.content, None
        path, digest, _ = self.ws.fetch(self.uri(expr.uri))
        return path.read_bytes(), digest

    def do_change(self, expr: FileChange) -> tuple[str, str, int]:
        mode = expr.mode if expr.mode is not None else 0o644
        if expr.at_boot:
            return self.boot_change(expr, mode)
        content, _ = self.content_of(expr)
        moved = len(content)
        with self.open_target(expr) as root:
            root = Path(root)
            rel = self.in_tree(root, expr.path)
            uid, gid = self.owner_ids(expr, root)
            old = _read_if_file(root, rel)
            try:
                result = apply_replace(root, ReplaceStep(path=rel, content=content, mode=mode, uid=uid, gid=gid))
            except OpError as exc:
                raise self.fail(expr, str(exc), "path") from None
            action = "created" if result.get("created") else "replaced"
            if expr.patch_out:
                from guest_init.patch.generate import diff_files

                patch = diff_files(old[0] if old else None, content, rel.lstrip("/"),
                                   old_mode=old[1] if old else None, new_mode=stat.S_IFREG | mode)
                moved += self.patch_out(expr, patch, expr.patch_out)
                action += f", patch stored at {expr.patch_out}"
            if expr.fork:
                moved += self.fork(expr, root, expr.fork)
                action += f", forked to {expr.fork}"
        target = expr.archive or expr.image
        return f"{expr.path} in {target}", action, moved

    def boot_change(self, expr: FileChange, mode: int) -> tuple[str, str, int]:
        uid, gid = self.owner_ids(expr, None)
        step: dict = {"op": expr.kind, "path": expr.path, "mode": f"{mode:04o}"}
        if uid is not None:
            step.update(uid=uid, gid=gid)
        if isinstance(expr, Replace):
            try:
                step["content"] = expr.content.decode("utf-8")
            except UnicodeDecodeError:
                import base64

                step["content_base64"] = base64.b64encode(expr.content).decode()
            moved = len(expr.content)
        else:
            _, digest, size = self.ws.fetch(self.uri(expr.uri))
            step.update(uri=expr.uri, sha256=digest)
            moved = size
        self.steps.append(step)
        return expr.path, "compiled into the plan (at boot)", moved

    def do_patch(self, expr: Patch) -> tuple[str, str, int]:
        from guest_init.patch import PatchParseError, apply_patch, parse_patch

        path, digest, size = self.ws.fetch(self.uri(expr.patch))
        if expr.at_boot:
            step = {"op": "patch", "uri": expr.patch, "sha256": digest, "dir": expr.target,
                    "strip": expr.strip if expr.strip is not None else 1}
            self.steps.append(step)
            return f"{expr.target} {expr.patch}", "compiled into the plan (at boot)", size
        patch = path.read_bytes()
        target = self.uri(expr.target)
        local = local_path(target)
        if local is not None and self.is_image(local):
            from ..images import mounted_image

            self.fresh_images.discard(local)
            ctx = mounted_image(local)
        else:
            from contextlib import nullcontext

            ctx = nullcontext(self.tree(target))
        # A working copy of an archive is scratch: flushing it to disk buys nothing.
        durable = local is not None and self.is_image(local)
        moved = size
        with ctx as root:
            root = Path(root)
            strip = expr.strip if expr.strip is not None else 1
            touched: set[str] | None = None
            try:
                if expr.patch_out:
                    # Only what the patch names can change: snapshot those paths, not the
                    # whole file system (an image may be large, and hold device nodes).
                    touched = {p for fp in parse_patch(patch, strip=strip, source=expr.patch)
                               for p in (fp.old_path, fp.new_path, *fp.alternatives) if p}
                    before = _patch_view(root, touched)
                result = apply_patch(patch, root, strip=strip, source=expr.patch, durable=durable)
            except PatchParseError as exc:
                raise self.fail(expr, str(exc), "patch") from None
            if result.status == "failed":
                raise UserError(f"{expr.pos}: patch {expr.patch} does not apply to {expr.target} "
                                f"(nothing changed):\n{result.render()}", EXIT_FAILED)
            action = "applied" if result.status == "applied" else "already applied"
            if touched is not None:
                from guest_init.patch.generate import diff_entries

                out = diff_entries(before, _patch_view(root, touched))
                moved += self.patch_out(expr, out, expr.patch_out)
                action += f", patch stored at {expr.patch_out}"
            if expr.fork:
                moved += self.fork(expr, root, expr.fork)
                action += f", forked to {expr.fork}"
        return f"{expr.target} {expr.patch}", action, moved

    def do_hook(self, expr: Hook) -> tuple[str, str, int]:
        step: dict = {"op": "hook", "name": expr.name, "script": expr.script}
        if expr.timeout is not None:
            step["timeout"] = expr.timeout
        if expr.interpreter:
            step["interpreter"] = expr.interpreter
        self.steps.append(step)
        return expr.name, "compiled into the plan (at boot)", len(expr.script.encode())

    def do_mount(self, expr: Mount) -> tuple[str, str, int]:
        if expr.access == "cow":
            upper: dict | str = {"label": expr.upper} if expr.upper else "tmpfs"
            overlay: dict = {"lower": [{"label": expr.label}], "upper": upper}
            if expr.fstype:
                overlay["fstype"] = expr.fstype
            self.mounts.append({"target": expr.target, "overlay": overlay})
            layer = f"upper {expr.upper}" if expr.upper else "changes in a tmpfs"
            return f"{expr.label} {expr.target}", f"copy-on-write overlay ({layer}) in the plan", 0
        self.mounts.append({"device": {"label": expr.label}, "target": expr.target,
                            "fstype": expr.fstype or "ext4", "options": [expr.access]})
        return f"{expr.label} {expr.target}", f"mount {expr.access} in the plan", 0

    def do_nfs(self, expr: NfsExport) -> tuple[str, str, int]:
        from ..nfs import Export as NfsExportSpec

        path = self.dom0_path(expr.path)
        if not self.dry_run and not path.is_dir():
            raise self.fail(expr, f"{path}: expected a directory to export over NFS, found "
                            f"{'a file' if path.exists() else 'nothing'}", "path")
        pseudo = expr.pseudo or str(path.absolute())
        self.nfs_exports.append(NfsExportSpec(path=path.absolute(), pseudo=pseudo,
                                              access=expr.access.upper(), squash=expr.squash))
        nfs = {"server": expr.server, "path": pseudo}
        if expr.port != 2049:
            nfs["port"] = expr.port
        self.mounts.append({"nfs": nfs, "target": expr.target, "fstype": "nfs4", "options": [expr.access]})
        self.network_reason = self.network_reason or expr
        return f"{expr.path} {expr.target}", f"NFSv4 export {expr.server}:{pseudo} mounted {expr.access}", 0

    def network(self) -> dict | None:
        """The plan's network, from the domain's vif lines, when a boot-time expression needs one.

        Each vif is found by its MAC (the stable handle under Xen and qemu
        alike), else by its position (eth0, eth1...), and asks DHCP: a
        container says what the domain needs, and addresses are the network's
        business (a static address goes in a plan written by hand).
        """
        reason = self.network_reason
        fetches = any(isinstance(uri, str) and uri.split(":", 1)[0].lower() in ("http", "https", "ftp")
                      for expr in self.c.boot_expressions()
                      for uri in (getattr(expr, "uri", None), getattr(expr, "patch", None)))
        if reason is None and not fetches:
            return None
        from ..xlcfg import parse_vif_spec

        vifs = self.c.settings.get("vif")
        if not isinstance(vifs, list) or not vifs:
            if reason is None:
                # The paper's containers fetch at boot without a vif line: they keep
                # working as written (the guest's own network set-up is then in charge).
                return None
            raise self.fail(reason, f"expected a vif line, since this {reason.kind} needs the guest's "
                            "network at boot (vif = ['mac=52:54:00:12:34:56']), found none")
        interfaces = []
        for index, spec in enumerate(vifs):
            vif = parse_vif_spec(str(spec), self.c.settings.where("vif", index))
            match = {"mac": vif["mac"].lower()} if vif.get("mac") else {"name": f"eth{index}"}
            interfaces.append({"match": match, "dhcp": True})
        return {"interfaces": interfaces}

    # -- outputs -------------------------------------------------------------------------

    def build_plan(self) -> dict | None:
        if not self.steps and not self.mounts:
            return None
        if not any(m["target"] == "/" for m in self.mounts):
            first = next((e for e in self.c.expressions if e.at_boot), self.c.expressions[0])
            raise UserError(f"{first.pos}: boot-time operations need a [mount LABEL / rw] expression "
                            "saying which file system is the guest's root")
        name = self.c.settings.get("name")
        plan = {"version": 1, "name": str(name) if name else Path(self.c.path or "domain").stem,
                "init": "/sbin/init", "failure_policy": "halt", "mounts": self.mounts, "steps": self.steps}
        network = self.network()
        if network is not None:
            plan["network"] = network
        try:
            validate_plan(plan, source=f"{self.c.path} (plan)")
        except PlanError as exc:
            raise UserError(str(exc)) from None
        return plan

    def stripped(self) -> str:
        text = self.c.stripped_text()
        if self.disks:
            if not text.endswith("\n"):
                text += "\n"
            key = "disk +=" if "disk" in self.c.settings else "disk ="
            listing = write_xl_config({"disk": self.disks}).split("=", 1)[1].strip()
            text += f"# exported by container expressions\n{key} {listing}\n"
        return text


def _patch_view(root: Path, paths: set[str]) -> dict:
    """What a patch sees of ``paths`` under ``root``: files and symlinks (not followed)."""
    from guest_init.patch.generate import MODE_LINK, TreeEntry, git_mode

    entries = {}
    for rel in paths:
        path = root / rel
        try:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[os.fsencode(rel)] = TreeEntry(MODE_LINK, os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                entries[os.fsencode(rel)] = TreeEntry(git_mode(st.st_mode), path.read_bytes())
        except OSError:
            continue
    return entries


def _read_if_file(root: Path, rel: str) -> tuple[bytes, int] | None:
    from guest_init.safepath import UnsafePath, resolve_in_root

    try:
        path = resolve_in_root(root, rel)
    except UnsafePath:
        return None
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return path.read_bytes(), st.st_mode


def process_container(container: Container, workspace: Workspace, *,
                      dry_run: bool = False) -> ContainerResult:
    return ContainerRun(workspace, container, dry_run).run()


def write_nfs_exports(result: ContainerResult, cfg_path: Path) -> list[Path]:
    """The domain's NFS exports beside its stripped config: CFG.ganesha.conf and CFG.exports.

    The first is a complete nfs-ganesha configuration (NFSv4 only, so no
    rpcbind): run it as is (``ganesha.nfsd -f``) or copy its EXPORT blocks
    into the host's; the second holds the lines for /etc/exports where the
    kernel's server is used (then ``exportfs -ra``).
    """
    if not result.nfs_exports:
        return []
    from ..atomic import write_atomically
    from ..nfs import GaneshaConfig, exports_line, write_ganesha_config

    ganesha = cfg_path.with_name(cfg_path.name + ".ganesha.conf")
    kernel = cfg_path.with_name(cfg_path.name + ".exports")
    write_ganesha_config(ganesha, GaneshaConfig(exports=tuple(result.nfs_exports)))
    lines = "".join(exports_line(export) + "\n" for export in result.nfs_exports)
    write_atomically(kernel, [("# for /etc/exports (kernel NFS server), then: exportfs -ra\n" + lines).encode()])
    return [ganesha, kernel]
