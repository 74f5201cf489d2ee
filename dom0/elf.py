"""The shared libraries a frozen (PyInstaller one-dir) tree needs from the host system.

Why: PyInstaller bundles the libraries of Python and its extensions, but not glibc,
and the initramfs has no other libraries. A missing one is a kernel panic at boot
(PID 1 cannot start), so dom0 computes the closure the way the dynamic loader
will search at run time (initramfs-notes.md, pitfalls 1-2):

- The executable (the bootloader) runs *before* its bundle is on the library
  path: its DT_NEEDED come from its RUNPATH/RPATH and the system dirs only, so
  e.g. ``libz.so.1`` is copied in even when ``_internal/`` has one.
- ELF files inside the tree (``_internal/``: Python, extension modules, bundled
  .so) run with ``LD_LIBRARY_PATH=_internal``: a soname is looked for in the
  file's own directory and the top bundle dir first, then its RUNPATH/RPATH, then
  the system dirs.
- Whatever comes from the system dirs is copied to the same path inside the
  initramfs, and its own DT_NEEDED are followed in turn.
- The loader named by PT_INTERP is shipped at that exact path; it also satisfies
  DT_NEEDED entries for its soname (the loader matches already-loaded objects by
  soname, so no second copy is needed).
- Libraries opened with dlopen() do not appear in DT_NEEDED: the caller passes
  them as ``extra_sonames`` and they are copied from the system dirs.
"""
from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dom0.errors import UserError

ELF_MAGIC = b"\x7fELF"

# The directories Debian's loader searches with no ld.so.cache (the initramfs has
# none); /lib64 is not among them: the loader itself is placed by PT_INTERP.
DEFAULT_SYSTEM_DIRS: tuple[Path, ...] = (
    Path("/lib/x86_64-linux-gnu"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/lib"),
    Path("/usr/lib"),
)

EXTRA_LABEL = "extra_sonames"


@dataclass
class Library:
    """A library to copy into the initramfs.

    ``source``: the real file on this host (symlinks resolved). ``dest``: the
    absolute path inside the initramfs where the loader will look (the directory
    where it was found, as spelled in the search list, plus the soname).
    ``needed_by``: who asked for it: paths relative to the tree for files in it,
    ``dest`` paths for other copied libraries, ``"extra_sonames"``, or
    ``"<exe> (PT_INTERP)"`` for the loader.
    """

    soname: str
    source: Path
    dest: str
    needed_by: list[str] = field(default_factory=list)


@dataclass
class LibraryPlan:
    """The result of :func:`library_closure`.

    ``libraries`` is sorted by ``dest``; ``interpreter`` is the executable's
    PT_INTERP path ("" for a static executable; the loader is also one of the
    ``libraries``); ``missing`` holds one ``(soname, needed_by)`` pair per
    unsatisfied request, sorted: the caller decides whether to fail.
    """

    libraries: list[Library] = field(default_factory=list)
    interpreter: str = ""
    missing: list[tuple[str, str]] = field(default_factory=list)

    def dests(self) -> list[str]:
        return [lib.dest for lib in self.libraries]

    def sonames(self) -> set[str]:
        return {lib.soname for lib in self.libraries}


@dataclass(frozen=True)
class ElfInfo:
    """What the loader reads from one ELF file."""

    ident: tuple[int, int, int]  # (EI_CLASS, EI_DATA, e_machine): must match to be loadable
    needed: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()
    interp: str | None = None
    soname: str | None = None


def elf_ident(path: Path) -> tuple[int, int, int] | None:
    """(class, byte order, machine) of an ELF file, or None if ``path`` is not ELF.

    Why: the loader skips a same-named library of another architecture, so the
    search must too (e.g. a 32-bit library in /usr/lib).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or not head.startswith(ELF_MAGIC):
        return None
    order = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(order + "H", head[18:20])
    return head[4], head[5], machine


def read_elf(path: Path) -> ElfInfo | None:
    """Parse DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_SONAME and PT_INTERP with pyelftools.

    Returns None for non-ELF files and for files pyelftools cannot parse (a
    damaged or exotic file in a bundle must not stop the build; it is simply
    not followed).
    """
    ident = elf_ident(path)
    if ident is None:
        return None
    from elftools.elf.elffile import ELFFile  # lazy: only the initrd builder needs it

    try:
        with open(path, "rb") as fh:
            return _parse(ELFFile(fh), ident)
    except Exception:  # noqa: BLE001 - pyelftools raises many kinds of errors on bad input
        return None


def _split_paths(value: str) -> tuple[str, ...]:
    return tuple(p for p in value.split(":") if p)


def _parse(elf: object, ident: tuple[int, int, int]) -> ElfInfo:
    needed: list[str] = []
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()
    interp = soname = None
    for segment in elf.iter_segments():  # type: ignore[attr-defined]
        kind = segment["p_type"]
        if kind == "PT_INTERP":
            interp = segment.get_interp_name()
        elif kind == "PT_DYNAMIC":
            for tag in segment.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RPATH":
                    rpath = _split_paths(tag.rpath)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath = _split_paths(tag.runpath)
                elif tag.entry.d_tag == "DT_SONAME":
                    soname = tag.soname
    return ElfInfo(ident, tuple(needed), rpath, runpath, interp, soname)


def _expand_origin(entries: Iterable[str], origin: Path) -> list[Path]:
    """RUNPATH/RPATH entries with $ORIGIN replaced; entries with other tokens
    ($LIB, $PLATFORM) or relative ones (relative to the cwd at run time) are
    dropped, since they cannot be resolved here reliably."""
    dirs: list[Path] = []
    for entry in entries:
        text = entry.replace("${ORIGIN}", str(origin)).replace("$ORIGIN", str(origin))
        if "$" in text or not text.startswith("/"):
            continue
        dirs.append(Path(os.path.normpath(text)))
    return dirs


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


class _Closure:
    """The working state of one :func:`library_closure` call."""

    def __init__(self, tree: Path, system_dirs: Sequence[Path]) -> None:
        self.tree = tree.resolve()
        internal = self.tree / "_internal"
        self.bundle_dir = internal if internal.is_dir() else self.tree
        self.system_dirs = [Path(d) for d in system_dirs if Path(d).is_dir()]
        self.libraries: dict[str, Library] = {}  # dest -> library
        self.interp_sonames: dict[str, Library] = {}
        self.missing: set[tuple[str, str]] = set()
        self.queue: deque[tuple[str, ElfInfo, Path]] = deque()  # (label, info, real dir on host)

    def label(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.tree).as_posix()
        except ValueError:
            return path.name

    def add_interpreter(self, interp: str, label: str) -> None:
        """Ship the PT_INTERP loader at its exact path."""
        host = Path(interp)
        if not host.is_file():
            self.missing.add((host.name, f"{label} (PT_INTERP)"))
            return
        lib = self._add_system(host.name, host, interp, f"{label} (PT_INTERP)")
        self.interp_sonames[host.name] = lib
        info = read_elf(host.resolve())
        if info is not None and info.soname:
            self.interp_sonames[info.soname] = lib

    def _add_system(self, soname: str, found: Path, dest: str, requester: str) -> Library:
        lib = self.libraries.get(dest)
        if lib is None:
            lib = Library(soname, found.resolve(), dest, [])
            self.libraries[dest] = lib
            info = read_elf(lib.source)
            if info is not None:
                self.queue.append((dest, info, found.parent))
        if requester not in lib.needed_by:
            lib.needed_by.append(requester)
        return lib

    def resolve(self, soname: str, requester: str, ident: tuple[int, int, int],
                search: Sequence[tuple[Path, bool]]) -> None:
        """Satisfy one DT_NEEDED entry: in the tree (nothing to copy), from the
        system (copy), through the loader itself, or record it as missing."""
        if soname in self.interp_sonames:
            lib = self.interp_sonames[soname]
            if requester not in lib.needed_by:
                lib.needed_by.append(requester)
            return
        if "/" in soname:  # a path, used as is by the loader
            search = [(Path(soname).parent, False)] if soname.startswith("/") else []
            soname = Path(soname).name
        for directory, in_tree in search:
            candidate = directory / soname
            if candidate.is_file() and elf_ident(candidate) == ident:
                if not in_tree:
                    self._add_system(soname, candidate, f"{directory.as_posix()}/{soname}", requester)
                return
        self.missing.add((soname, requester))

    def system_search(self, info: ElfInfo, origin: Path) -> list[tuple[Path, bool]]:
        """RUNPATH (or RPATH when there is no RUNPATH), then the system dirs."""
        paths = _expand_origin(info.runpath or info.rpath, origin)
        search = [(d, _within(d, self.tree)) for d in paths]
        return search + [(d, False) for d in self.system_dirs]

    def tree_search(self, info: ElfInfo, real: Path) -> list[tuple[Path, bool]]:
        """The file's directory and the bundle dir (LD_LIBRARY_PATH), then as above."""
        search: list[tuple[Path, bool]] = []
        for d in (real.parent, self.bundle_dir):
            if (d, True) not in search:
                search.append((d, True))
        return search + self.system_search(info, real.parent)

    def drain(self) -> None:
        """Follow the DT_NEEDED entries of every library copied from the system."""
        while self.queue:
            label, info, origin = self.queue.popleft()
            for soname in info.needed:
                self.resolve(soname, label, info.ident, self.system_search(info, origin))


def _tree_elf_files(tree: Path, skip: Path) -> list[Path]:
    """Regular ELF files under ``tree`` in sorted order (symlinks are not followed:
    their targets are in the tree too, or they are not ours to scan)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or path.resolve() == skip:
                continue
            if elf_ident(path) is not None:
                found.append(path)
    return found


def library_closure(
    tree: Path,
    executable: Path,
    *,
    extra_sonames: Iterable[str] = (),
    system_dirs: Sequence[Path] = DEFAULT_SYSTEM_DIRS,
) -> LibraryPlan:
    """The system libraries to copy so that ``executable`` and every ELF file in ``tree`` load.

    ``system_dirs`` that do not exist are ignored. Deterministic: the same tree
    and host give the same plan.
    """
    tree = Path(tree)
    executable = Path(executable)
    if not tree.is_dir():
        raise UserError(f"frozen tree {tree} is not a directory")
    exe_info = read_elf(executable)
    if exe_info is None:
        raise UserError(f"{executable} is not an ELF executable that can be read")
    state = _Closure(tree, system_dirs)
    exe_label = state.label(executable)
    if exe_info.interp:
        state.add_interpreter(exe_info.interp, exe_label)
    exe_real = executable.resolve()
    for soname in exe_info.needed:
        state.resolve(soname, exe_label, exe_info.ident, state.system_search(exe_info, exe_real.parent))
    for path in _tree_elf_files(state.tree, exe_real):
        info = read_elf(path)
        if info is None or info.ident != exe_info.ident:
            continue  # unparsable, or another architecture: not loadable by our loader anyway
        label = state.label(path)
        real = path.resolve()
        for soname in info.needed:
            state.resolve(soname, label, info.ident, state.tree_search(info, real))
    for soname in extra_sonames:
        state.resolve(soname, EXTRA_LABEL, exe_info.ident, [(d, False) for d in state.system_dirs])
    state.drain()
    libraries = sorted(state.libraries.values(), key=lambda lib: lib.dest)
    for lib in libraries:
        lib.needed_by.sort()
    return LibraryPlan(libraries, exe_info.interp or "", sorted(state.missing))
