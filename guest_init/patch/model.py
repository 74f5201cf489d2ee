"""What a parsed patch is made of, and the structured result of applying one.

The parser produces :class:`FilePatch` objects holding :class:`Hunk` objects;
the applier turns them into :class:`FileResult`/:class:`HunkResult` records
collected in a :class:`PatchResult`.  The results are plain data on purpose:
the boot report carries them to dom0 as JSON (``to_json``), and ``diagnose``
renders them for an admin (``render``), so a failed hunk can be understood
without logging into the guest.

Everything here works on ``bytes`` for file content: a patch must reproduce a
file byte for byte (CRLF, missing final newline, non-UTF-8 text), so nothing is
ever decoded except for display.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

#: Identifies the JSON layout of :meth:`PatchResult.to_json` (docs/patch.md).
RESULT_FORMAT = "supercharge-patch-result/1"

#: Git's file modes (octal), as they appear in ``new file mode 100644``.
MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODE_SYMLINK = 0o120000
MODE_GITLINK = 0o160000
S_IFMT = 0o170000


class PatchParseError(ValueError):
    """A malformed or unsafe patch: one line, ``SOURCE:LINE: expected ..., found ...``.

    A ``ValueError`` so callers that validate input generically catch it; the
    CLI turns it into exit code 2 (bad input) and the agent into a failed
    ``apply`` stage, both quoting ``str(exc)`` as it is.
    """

    def __init__(self, source: str, line: int, expected: str, found: str) -> None:
        self.source = source
        self.line = line
        self.expected = expected
        self.found = found
        super().__init__(f"{source}:{line}: expected {expected}, found {found}")


class UnsafePatchPath(PatchParseError):
    """A path in the patch that would leave the target root (``..``, absolute, symlinks)."""


def show(line: bytes, limit: int = 200) -> str:
    """A patch or file line as readable text for messages: one line, no newline."""
    if line.endswith(b"\n"):
        line = line[:-1]
    text = line.decode("utf-8", "backslashreplace")
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def quote_found(line: bytes) -> str:
    """``found`` part of a parse error: the offending line quoted, or end of patch."""
    return repr(show(line, 80))


# --------------------------------------------------------------------------- the patch


_SWAP_SIDES = bytes.maketrans(b"+-", b"-+")
#: A hunk's ``@@`` header, as GNU patch reads it (the parser's test for a hunk line).
HUNK_HEADER = re.compile(rb"@@ -(\d+)(?:,(\d+))? ?\+(\d+)(?:,(\d+))? ?@@")


def header_text(line: bytes) -> str:
    """The ``@@ -a,b +c,d @@`` part of a hunk's header line, as reported.

    Taken out of the line only when a result is shown: a large patch has ten
    thousand hunks, and most reports never show theirs.
    """
    m = HUNK_HEADER.match(line)
    return m.group(0).decode("ascii") if m else line.rstrip(b"\r\n").decode("ascii", "replace")


class Hunk(NamedTuple):
    """One ``@@ -a,b +c,d @@`` hunk, split into GNU patch's two sides.

    ``old_lines`` (context and ``-`` lines, the "pattern") and ``new_lines``
    (context and ``+`` lines, the "replacement") hold the file lines with
    their line endings, exactly as they must appear in the file;
    ``kinds`` says which lines are context (``" "``) and which are changes
    (``"-"``/``"+"``).  ``prefix_context``/``suffix_context`` count the context
    lines before the first and after the last change; GNU patch's placement
    rules (start/end of file, fuzz) depend on them.

    A tuple, not a dataclass: a hunk never changes once read, and the parser
    makes the ten thousand hunks of a large patch with one C call each
    (:data:`new_hunk`), where a class's ``__init__`` is a Python call per hunk.
    """

    number: int
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    header_line: bytes  # the ``@@`` line as in the patch (see :attr:`header`)
    line: int  # where the ``@@`` line is in the patch (1-based)
    #: The body's line kinds in patch order (``b" "``, ``b"-"``, ``b"+"``): one
    #: bytes object instead of two strings, since most hunks never need them.
    kinds: bytes
    prefix_context: int
    suffix_context: int
    #: GNU patch's ``pch_first``: the old-side line, one later for a pure insertion
    #: (where the placement starts; kept, not derived, as it is read for every hunk).
    first: int
    old_lines: list[bytes]
    new_lines: list[bytes]

    @property
    def header(self) -> str:
        """``@@ -a,b +c,d @@``, as results and messages name the hunk."""
        return header_text(self.header_line)

    @property
    def old_kinds(self) -> str:
        """The old side's kinds, one character per line of ``old_lines``."""
        return self.kinds.translate(None, b"+").decode("ascii")

    @property
    def new_kinds(self) -> str:
        """The new side's kinds, one character per line of ``new_lines``."""
        return self.kinds.translate(None, b"-").decode("ascii")

    @property
    def new_first(self) -> int:
        return self.new_start if self.new_count else self.new_start + 1

    def reversed(self) -> Hunk:
        """The hunk that undoes this one (``patch -R``)."""
        return Hunk(
            number=self.number, old_start=self.new_start, old_count=self.new_count,
            new_start=self.old_start, new_count=self.old_count, header_line=self.header_line,
            line=self.line, kinds=self.kinds.translate(_SWAP_SIDES),
            prefix_context=self.prefix_context, suffix_context=self.suffix_context, first=self.new_first,
            old_lines=self.new_lines, new_lines=self.old_lines)


#: ``new_hunk(fields)``: a :class:`Hunk` from an iterable of its fields in order, in C
#: (``Hunk(...)`` and ``Hunk._make`` are Python functions).
new_hunk = partial(tuple.__new__, Hunk)


@dataclass
class BinaryHunk:
    """One half of a ``GIT binary patch``: ``literal`` (whole content) or ``delta``."""

    method: str  # "literal" | "delta"
    size: int  # the declared size of the inflated data
    data: bytes  # inflated: the content (literal) or the delta instructions


@dataclass
class FilePatch:
    """Everything a patch says about one file.

    Paths are already stripped (``-pN``) and checked to be relative paths
    without ``..``; ``None`` stands for ``/dev/null`` (the file does not exist
    on that side).  ``action`` is one of ``modify``, ``create``, ``delete``,
    ``rename`` and ``copy``; a git mode change alone is a ``modify`` without
    hunks.  ``binary`` is set for git binary patches; ``binary_problem``
    explains a binary change the patch cannot carry (``Binary files differ``).
    """

    old_path: str | None
    new_path: str | None
    action: str
    line: int  # first line of this file's header in the patch
    git: bool = False
    old_mode: int | None = None
    new_mode: int | None = None
    hunks: list[Hunk] = field(default_factory=list)
    similarity: int | None = None
    #: True when the patch changes the mode ("old mode"/"new mode"); the mode
    #: on git's "index" line only describes the file and is never applied.
    mode_changed: bool = False
    old_hash: str | None = None
    new_hash: str | None = None
    binary: BinaryHunk | None = None
    binary_reverse: BinaryHunk | None = None
    binary_problem: str | None = None
    #: GNU patch's names as candidates, for plain diffs naming two different files.
    alternatives: tuple[str, ...] = ()
    #: True when every line of every hunk's two sides ends with a newline (the
    #: parser knows it for free; placement then need not look at each hunk).
    plain_lines: bool = False

    @property
    def path(self) -> str:
        """The file this patch is about, as reported: the new name unless deleted."""
        return self.new_path if self.new_path is not None else self.old_path  # type: ignore[return-value]

    @property
    def is_symlink(self) -> bool:
        mode = self.new_mode if self.new_mode is not None else self.old_mode
        return mode is not None and mode & S_IFMT == MODE_SYMLINK


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class HunkResult:
    """Where one hunk went, or why it did not fit.

    For an applied hunk: ``line`` is where its old side starts in the file as
    it was, ``new_line`` where it lands in the result (what GNU patch prints),
    ``offset`` the total shift from the line the patch states (GNU's
    "offset N lines", accumulated from earlier hunks) and ``fuzz`` how many
    context lines had to be ignored at each end.  For a failed one, the
    diagnosis: ``expected`` (the old side, numbered as the patch states it),
    ``tried`` (the guessed line, the range searched and the fuzz allowed) and
    ``best`` (the closest place, its similarity and the lines found there).
    """

    number: int
    header: str
    status: str  # "applied" | "failed"
    line: int | None = None
    new_line: int | None = None
    offset: int = 0
    fuzz: int = 0
    reason: str | None = None
    expected: list[tuple[int, bytes]] | None = None
    tried: dict | None = None
    best: dict | None = None  # {"line", "similarity", "matching_lines", "found": [(n, bytes)]}

    def to_json(self) -> dict:
        doc: dict = {"number": self.number, "header": self.header, "status": self.status,
                     "line": self.line, "new_line": self.new_line, "offset": self.offset,
                     "fuzz": self.fuzz}
        if self.status != "applied":
            doc["reason"] = self.reason
            doc["expected"] = [{"line": n, "text": show(t, 10_000)} for n, t in self.expected or []]
            doc["tried"] = self.tried
            if self.best is None:
                doc["best"] = None
            else:
                doc["best"] = {
                    "line": self.best["line"],
                    "similarity": self.best["similarity"],
                    "matching_lines": self.best["matching_lines"],
                    "found": [{"line": n, "text": show(t, 10_000)} for n, t in self.best["found"]],
                }
        return doc


class AppliedHunk(NamedTuple):
    """A :class:`HunkResult` for a hunk that fit without fuzz, as a tuple.

    The same fields and methods as a ``HunkResult`` of status ``applied``
    (the others are constants here), made by :data:`applied_hunk` in C: the
    placement makes one per hunk, ten thousand for a large patch, where a
    dataclass's ``__init__`` is a Python call each.  Read-only: only failed
    results are filled in later (by the diagnosis), and those are
    ``HunkResult``.
    """

    number: int
    header_line: bytes  # the hunk's ``@@`` line (see :attr:`header`)
    line: int
    new_line: int
    offset: int
    status = "applied"
    fuzz = 0
    reason = None
    expected = None
    tried = None
    best = None

    @property
    def header(self) -> str:
        return header_text(self.header_line)

    to_json = HunkResult.to_json


#: ``applied_hunk((number, header_line, line, new_line, offset))``: an :class:`AppliedHunk`, in C.
applied_hunk = partial(tuple.__new__, AppliedHunk)


@dataclass
class FileResult:
    """The outcome for one file of the patch.

    ``status``: ``applied`` (would change or changed the file),
    ``already-applied`` (the file already has the patch's result),
    ``unchanged`` (applied, but the result equals what is there) or
    ``failed``; ``reason`` is a short code for a failure (``hunk-failed``,
    ``missing``, ``exists``, ``content-differs``, ``not-a-file``,
    ``binary-unsupported``, ``binary-mismatch``, ``conflict``, ``write-error``)
    and ``message`` says it in words.
    """

    path: str
    action: str
    status: str
    old_path: str | None = None
    new_path: str | None = None
    old_mode: str | None = None
    new_mode: str | None = None
    kind: str = "file"  # "file" | "symlink" | "binary"
    reason: str | None = None
    message: str | None = None
    hunks: list[HunkResult] = field(default_factory=list)

    @property
    def failed_hunks(self) -> list[int]:
        return [h.number for h in self.hunks if h.status != "applied"]

    def to_json(self) -> dict:
        return {
            "path": self.path, "action": self.action, "status": self.status, "kind": self.kind,
            "old_path": self.old_path, "new_path": self.new_path,
            "old_mode": self.old_mode, "new_mode": self.new_mode,
            "reason": self.reason, "message": self.message,
            "hunks": [h.to_json() for h in self.hunks],
        }


@dataclass
class PatchResult:
    """The outcome of :func:`guest_init.patch.apply_patch` for a whole patch.

    ``status`` is ``applied`` (every file changed, or would be in a dry run),
    ``already-applied`` (the tree already holds the patched state; nothing
    was changed) or ``failed`` (nothing was changed; see the files' reasons).
    """

    status: str
    files: list[FileResult]
    source: str = "<patch>"
    root: str = ""
    dry_run: bool = False
    strip: int = 1
    fuzz: int = 2
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict:
        """The result as JSON-serialisable data (layout: docs/patch.md)."""
        return {
            "format": RESULT_FORMAT, "status": self.status, "source": self.source,
            "root": self.root, "dry_run": self.dry_run, "strip": self.strip, "fuzz": self.fuzz,
            "message": self.message, "files": [f.to_json() for f in self.files],
        }

    def render(self) -> str:
        """A human rendering: one line per file, failed hunks side by side."""
        from .diagnose import render_result

        return render_result(self)
