"""The typed tree of a container file (see docs/container.md).

One frozen dataclass per expression kind, all deriving from :class:`Expr`, and
:class:`Container` for the whole file.  Every expression keeps where it was
written: ``pos`` (the ``[`` that opens it), ``span`` (character offsets of the
whole expression in the source, its ``[end]`` included) and ``positions`` (the
place of each argument or option value, by field name, so that the processor
can point at the URI that failed to fetch).

Values are already checked and converted by the parser: URIs are strings with
a scheme of file, http, https or ftp; guest paths are absolute and normalised;
sizes are bytes; modes are ints; owners are ``(user, group)`` strings.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

from dom0.xlcfg import Position, XlConfig

Owner = tuple[str, str]
"""``(user, group)``: names or decimal ids, as written (``("root", "0")``)."""


class Span(NamedTuple):
    """Character offsets ``[start, end)`` of an expression in the container's text."""

    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class Expr:
    """What every expression has: where it is, and whether it runs in the guest at boot."""

    kind: ClassVar[str] = ""

    pos: Position
    span: Span
    at_boot: bool = False
    #: ``devices allow``: device nodes in the archive this expression reads are accepted.
    allow_devices: bool = False
    positions: Mapping[str, Position] = field(default_factory=dict, compare=False, repr=False)

    def where(self, name: str) -> Position:
        """Where the value of field ``name`` was written (the expression's ``[`` if not known)."""
        return self.positions.get(name, self.pos)


@dataclass(frozen=True, kw_only=True)
class FileChange(Expr):
    """Shared by replace and copy: one file, and the file system it is changed in.

    In dom0 exactly one of ``archive`` (a URI) and ``image`` (a dom0 path) names
    the file system; at boot (``at_boot``) neither is set and ``path`` is in the
    guest's mounted root.
    """

    path: str
    archive: str | None = None
    image: str | None = None
    patch_out: str | None = None
    fork: str | None = None
    mode: int | None = None
    owner: Owner | None = None


@dataclass(frozen=True, kw_only=True)
class Replace(FileChange):
    """``[replace PATH`` options, blank line, body ``] [end]``: PATH gets exactly ``content``."""

    kind: ClassVar[str] = "replace"

    content: bytes


@dataclass(frozen=True, kw_only=True)
class Copy(FileChange):
    """``[copy PATH URI ...] [end]``: the whole file fetched from ``uri`` is written to PATH."""

    kind: ClassVar[str] = "copy"

    uri: str


@dataclass(frozen=True, kw_only=True)
class Create(Expr):
    """``[create SRC_DIR URI] [end]``: the dom0 tree SRC_DIR as a cpio newc archive stored at URI."""

    kind: ClassVar[str] = "create"

    src_dir: str
    uri: str


@dataclass(frozen=True, kw_only=True)
class Image(Expr):
    """``[image PATH SIZE LABEL] [end]``: a sparse file of ``size`` bytes, formatted, labelled.

    ``export`` (a vdev like ``xvdc``) asks for a disk line in the stripped config,
    attached ``access`` (``rw`` unless written ``access ro``).
    """

    kind: ClassVar[str] = "image"

    path: str
    size: int
    label: str
    fstype: str = "ext4"
    export: str | None = None
    access: Literal["ro", "rw"] = "rw"


@dataclass(frozen=True, kw_only=True)
class Export(Expr):
    """``[export PATH VDEV ro|rw|cow] [end]``: an existing image given to the domain as VDEV.

    ``ro`` shares the image read-only (any number of domains), ``rw`` gives it
    to this domain alone, ``cow`` gives the domain a copy-on-write view: a
    qcow2 overlay (``overlay``) over an image file, or an LVM snapshot
    (``snapshot``, ``snapshot_size``) when PATH is a ``/dev/`` logical volume.
    ``format`` is the image's own format; ``keep`` keeps an existing overlay
    or snapshot of the same base (``existing keep``, the default) instead of
    making a fresh one (``existing replace``).
    """

    kind: ClassVar[str] = "export"

    path: str
    vdev: str
    access: Literal["ro", "rw", "cow"]
    format: Literal["raw", "qcow2"] = "raw"
    overlay: str | None = None
    snapshot: str | None = None
    snapshot_size: int | None = None
    keep: bool = True

    @property
    def cow(self) -> Literal["qcow2", "lvm"] | None:
        """How the copy-on-write view is made, by what PATH names; None unless ``cow``."""
        if self.access != "cow":
            return None
        return "lvm" if self.path.startswith("/dev/") else "qcow2"


@dataclass(frozen=True, kw_only=True)
class Populate(Expr):
    """``[populate image IMAGE MOUNTPOINT URI] [end]``: the archive at URI expanded into IMAGE."""

    kind: ClassVar[str] = "populate"

    image: str
    mountpoint: str
    uri: str


@dataclass(frozen=True, kw_only=True)
class Patch(Expr):
    """``[patch TARGET PATCH_URI [FORK_URI]] [end]``: a unified diff applied to a file system.

    In dom0 ``target`` is a URI (``file:///`` image or archive, or a remote
    archive); at boot it is a directory of the guest's mounted root (``/etc``)
    that the patch's paths are relative to.
    """

    kind: ClassVar[str] = "patch"

    target: str
    patch: str
    fork: str | None = None
    patch_out: str | None = None
    strip: int | None = None


@dataclass(frozen=True, kw_only=True)
class Hook(Expr):
    """``[hook NAME`` options, blank line, the script ``] [end]``: run chrooted in the guest at boot."""

    kind: ClassVar[str] = "hook"

    at_boot: bool = True
    name: str
    script: str
    timeout: int | None = None
    interpreter: str | None = None


@dataclass(frozen=True, kw_only=True)
class Mount(Expr):
    """``[mount LABEL TARGET ro|rw|cow] [end]``: the file system labelled LABEL at TARGET in the guest.

    ``cow`` mounts it read-only under an overlay whose writable layer is the
    file system labelled ``upper`` (the domain's own disk), or a tmpfs when
    there is none: many domains share one image, each keeping its changes.
    """

    kind: ClassVar[str] = "mount"

    at_boot: bool = True
    label: str
    target: str
    access: Literal["ro", "rw", "cow"]
    fstype: str | None = None
    upper: str | None = None


@dataclass(frozen=True, kw_only=True)
class NfsExport(Expr):
    """``[nfs DIR TARGET ro|rw server ADDR] [end]``: dom0's DIR over NFSv4 at TARGET in the guest.

    dom0 gets the export (a ganesha configuration and an /etc/exports line
    beside the stripped config); the plan gets the mount, and a network.
    ``pseudo`` is the path the guest mounts (ganesha's pseudo file system;
    the kernel server exports DIR by its own name, so it defaults to DIR).
    """

    kind: ClassVar[str] = "nfs"

    at_boot: bool = True
    path: str
    target: str
    access: Literal["ro", "rw"]
    server: str
    port: int = 2049
    pseudo: str | None = None
    squash: str = "root_squash"


@dataclass
class Container:
    """A parsed container file: its xl settings and its expressions, in file order."""

    path: str
    text: str
    settings: XlConfig
    expressions: list[Expr]

    def boot_expressions(self) -> list[Expr]:
        """The expressions that go into the boot plan (run in the guest), in order."""
        return [expr for expr in self.expressions if expr.at_boot]

    def dom0_expressions(self) -> list[Expr]:
        """The expressions processed in dom0, in order."""
        return [expr for expr in self.expressions if not expr.at_boot]

    def stripped_text(self) -> str:
        """The source with every expression removed: a plain xl.cfg(5) file.

        Statements, comments and their order are kept as written.  A line that
        held only an expression disappears with it, and where that would leave
        two blank lines in a row (or blank lines at the start or end of the
        file) the extra ones go too.
        """
        text = self.text
        out = ""
        pos = 0
        removed_at_end = False
        for expr in self.expressions:
            start, end = expr.span
            before = out + text[pos:start]
            line_prefix = before[before.rfind("\n") + 1:]
            whole_start = line_prefix.strip(" \t") == ""
            out = before[:len(before) - len(line_prefix)] if whole_start else before.rstrip(" \t")
            line_end = text.find("\n", end)
            if line_end < 0:
                line_end = len(text)
            whole_end = text[end:line_end].strip(" \t") == ""
            if whole_start and whole_end:
                pos = min(line_end + 1, len(text))
                if out == "" or _ends_with_blank_line(out):
                    pos = _skip_blank_lines(text, pos)
            elif whole_end:
                pos = line_end
            else:
                pos = end
                while pos < len(text) and text[pos] in " \t":
                    pos += 1
            removed_at_end = pos >= len(text)
        out += text[pos:]
        if removed_at_end and out.strip(" \t\n"):
            out = out.rstrip(" \t\n") + "\n"
        elif removed_at_end:
            out = ""
        return out


def _ends_with_blank_line(text: str) -> bool:
    """Whether the last complete line of ``text`` (which ends with a newline) is blank."""
    if not text.endswith("\n"):
        return False
    previous = text.rfind("\n", 0, len(text) - 1)
    return text[previous + 1:-1].strip(" \t") == ""


def _skip_blank_lines(text: str, pos: int) -> int:
    """The start of the first non-blank line at or after ``pos`` (a line start)."""
    while pos < len(text):
        line_end = text.find("\n", pos)
        line = text[pos:] if line_end < 0 else text[pos:line_end]
        if line.strip(" \t"):
            return pos
        pos = len(text) if line_end < 0 else line_end + 1
    return pos
