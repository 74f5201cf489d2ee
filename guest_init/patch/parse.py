"""Read unified diffs as ``diff -u``, ``diff -urN`` and ``git diff`` write them.

One pass over the patch's lines, bytes throughout (file content is never
decoded, so CRLF, non-UTF-8 text and missing final newlines survive).  Text
that is neither a file header nor a hunk (mail headers, ``Only in ...``,
commit messages, ``diffstat`` output) is skipped, as GNU patch skips it.  Inside
a hunk the line counts of the ``@@`` header are authoritative: a hunk that
ends early, or a line that is not `` ``, ``-``, ``+`` or ``\\``, is a
:class:`PatchParseError` naming the patch line, never a guess.

Hunk lines follow GNU patch 2.7.6's reading: an empty line (or one starting
with a tab) inside a hunk is a context line whose leading space was eaten by
a mailer, and ``\\ No newline at end of file`` removes the line ending of the
line before it.

Paths are stripped (``-pN``) and refused here if they could leave the target
root (absolute after stripping, or containing ``..``): the applier then never
sees an unsafe name.
"""
from __future__ import annotations

import os
import re
from itertools import compress
from operator import itemgetter

from .model import (
    MODE_GITLINK,
    S_IFMT,
    BinaryHunk,
    HUNK_HEADER,
    FilePatch,
    Hunk,
    PatchParseError,
    UnsafePatchPath,
    new_hunk,
    quote_found,
)

_LINES = re.compile(rb"[^\n]*\n|[^\n]+")
_HUNK = HUNK_HEADER
#: The header as diff writes it nearly always, with both counts: the same match as
#: :data:`_HUNK` where it matches, and a quarter cheaper without the optional parts.
_HUNK_USUAL = re.compile(rb"@@ -(\d+),(\d+) \+(\d+),(\d+) @@")
#: Hunk line counts as written (a missing count is 1): a dictionary lookup costs
#: half of ``int()``, and a large patch has two counts per hunk.
_COUNTS: dict[bytes | None, int] = {None: 1, **{b"%d" % k: k for k in range(1000)}}
_ISO_TIME = re.compile(
    rb"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.\d+)?(?: ?([+-])(\d\d):?(\d\d))?\s*$")
_CTIME = re.compile(rb"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\s*$")
_NAME_AND_TIME = re.compile(
    rb"(.*?)\s+(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?(?: ?[+-]\d\d:?\d\d)?"
    rb"|\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\s*$")
_GIT_HEADERS = (
    b"old mode ", b"new mode ", b"deleted file mode ", b"new file mode ", b"copy from ",
    b"copy to ", b"rename from ", b"rename to ", b"rename old ", b"rename new ",
    b"similarity index ", b"dissimilarity index ", b"index ",
)
_C_ESCAPES = {ord("a"): 7, ord("b"): 8, ord("t"): 9, ord("n"): 10, ord("v"): 11, ord("f"): 12,
              ord("r"): 13, ord('"'): 34, ord("\\"): 92}
_SP, _MINUS, _PLUS, _BSLASH, _NL, _TAB, _AT = 32, 45, 43, 92, 10, 9, 64
#: A line's first byte, and the line without it (C-level callables for map()).
_FIRST = itemgetter(0)
_AFTER_FIRST = itemgetter(slice(1, None))
#: bytes.translate tables turning the lines' first bytes into masks for itertools.compress:
#: a hunk's old side is its lines but "+" lines, its new side its lines but "-" lines, and
#: ``@@`` lines are on neither (see :meth:`_Parser._side_at`).
_OLD_LINES = bytes(0 if c in (_PLUS, _AT) else 1 for c in range(256))
_NEW_LINES = bytes(0 if c in (_MINUS, _AT) else 1 for c in range(256))


def _shape(kinds: bytes) -> tuple[int, int, bool, int, int]:
    """What the parser needs to know of a hunk body's line kinds (its lines' first bytes):
    how many ``+`` and ``-`` lines, whether there is nothing else (no ``\\``, no
    mailer-eaten space), and the context lines before the first change and after the last.

    Asked once per distinct body shape and then looked up: most hunks of a patch
    share a handful of shapes ("3 context, 1 -, 1 +, 3 context"), and five
    calls per hunk were a sixth of the time to read a large patch.
    """
    return (kinds.count(b"+"), kinds.count(b"-"), not kinds.strip(b" +-"),
            len(kinds) - len(kinds.lstrip(b" ")), len(kinds) - len(kinds.rstrip(b" ")))


def split_lines(data: bytes) -> list[bytes]:
    """``data`` cut after each ``\\n`` (endings kept); the last line may lack one.

    Only ``\\n`` ends a line (as for GNU patch): ``bytes.splitlines`` also
    splits at a lone ``\\r``, so it is used only when there is none (it is
    several times faster than the regular expression).
    """
    if b"\r" not in data:
        return data.splitlines(True)
    return _LINES.findall(data)


def parse_patch(data: bytes, *, strip: int = 1, source: str = "<patch>") -> list[FilePatch]:
    """Every file change in ``data``, in patch order (raises :class:`PatchParseError`).

    ``strip`` is ``patch -pN``: how many leading path components to drop from
    the names in ``---``/``+++`` and ``diff --git`` lines.
    """
    if strip < 0:
        raise ValueError("strip must be 0 or more")
    return _Parser(data, strip, source).parse()


class _Parser:
    def __init__(self, data: bytes, strip: int, source: str) -> None:
        self.lines = split_lines(data)
        self.n = len(self.lines)
        #: The first byte of every line: lets hunk bodies be measured with C-speed counts.
        self.heads = bytes(map(_FIRST, self.lines))
        #: Every line that could be on a hunk's old side (all but ``+`` and ``@@`` lines) and
        #: on its new side, without its first byte; made on demand (see :meth:`_side_at`).
        self._olds: list[bytes] | None = None
        self._news: list[bytes] | None = None
        #: The hunk bodies' shapes met so far (see :func:`_shape`): a patch has few.
        self._shapes: dict[bytes, tuple[int, int, bool, int, int]] = {}
        #: A patch line and how many entries of ``_olds``/``_news`` come before it.
        self._side_anchor = (0, 0, 0)
        self.strip = strip
        self.source = source
        #: Whether the last hunk read (:meth:`hunks`) had only lines ending in a newline.
        self.plain_lines = False
        self._unterminated = not data.endswith(b"\n")

    # -- errors

    def error(self, index: int, expected: str, found: str | None = None) -> PatchParseError:
        if found is None:
            found = quote_found(self.lines[index]) if index < self.n else "the end of the patch"
        return PatchParseError(self.source, min(index, self.n) + 1, expected, found)

    def unsafe(self, index: int, expected: str, found: str) -> UnsafePatchPath:
        return UnsafePatchPath(self.source, index + 1, expected, found)

    # -- driver

    def parse(self) -> list[FilePatch]:
        files: list[FilePatch] = []
        lines, n = self.lines, self.n
        i = 0
        while i < n:
            line = lines[i]
            if line.startswith(b"diff --git "):
                fp, i = self.git_file(i)
                if fp is not None:
                    files.append(fp)
            elif (line.startswith(b"--- ") and i + 1 < n and lines[i + 1].startswith(b"+++ ")):
                fp, i = self.plain_file(i)
                files.append(fp)
            else:
                i += 1
        if not files:
            raise PatchParseError(self.source, 1, "a unified diff ('--- '/'+++ ' lines or 'diff --git')",
                                  "none" if n else "an empty patch")
        return files

    # -- plain unified diffs (diff -u, diff -urN)

    def plain_file(self, i: int) -> tuple[FilePatch, int]:
        start = i
        old_raw, old_time = self.header_name(i, 4)
        new_raw, new_time = self.header_name(i + 1, 4)
        i += 2
        if i >= self.n or not self.lines[i].startswith(b"@@ -"):
            raise self.error(i, "a hunk header '@@ -START,COUNT +START,COUNT @@'")
        hunks, i = self.hunks(i)
        old_gone = old_raw == b"/dev/null" or _is_epoch(old_time)
        new_gone = new_raw == b"/dev/null" or _is_epoch(new_time)
        old_path = None if old_raw == b"/dev/null" else self.path(old_raw, self.strip, start)
        new_path = None if new_raw == b"/dev/null" else self.path(new_raw, self.strip, start + 1)
        if old_gone and new_gone:
            raise self.error(start, "an existing file on at least one side", "both sides nonexistent")
        if old_gone:
            fp = FilePatch(None, new_path if new_path is not None else old_path, "create", start + 1)
        elif new_gone:
            fp = FilePatch(old_path, None, "delete", start + 1)
        else:
            alternatives = tuple(dict.fromkeys(p for p in (old_path, new_path) if p is not None))
            fp = FilePatch(old_path, new_path, "modify", start + 1, alternatives=alternatives)
        fp.hunks = hunks
        fp.plain_lines = self.plain_lines
        return fp, i

    def header_name(self, i: int, skip: int) -> tuple[bytes, bytes]:
        """Name and timestamp text of a ``---``/``+++`` line (git quoting understood)."""
        rest = self.lines[i][skip:].rstrip(b"\n")
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest.startswith(b'"'):
            name, end = self.unquote(rest, 0, i)
            return name, rest[end:].strip()
        if b"\t" in rest:
            name, _, when = rest.partition(b"\t")
            return name, when.strip()
        m = _NAME_AND_TIME.match(rest)
        if m:
            return m.group(1), m.group(2)
        return rest.rstrip(), b""

    def unquote(self, text: bytes, pos: int, index: int) -> tuple[bytes, int]:
        """Decode git's C-style quoted name starting at ``text[pos] == '"'``."""
        out = bytearray()
        j = pos + 1
        while j < len(text):
            c = text[j]
            if c == 34:  # closing quote
                return bytes(out), j + 1
            if c == 92:
                j += 1
                if j >= len(text):
                    break
                e = text[j]
                if 48 <= e <= 55:
                    digits = text[j:j + 3]
                    if len(digits) != 3 or any(not 48 <= d <= 55 for d in digits):
                        raise self.error(index, "a three-digit octal escape in a quoted name")
                    out.append(int(digits, 8) & 0xFF)
                    j += 3
                    continue
                if e not in _C_ESCAPES:
                    raise self.error(index, "a C escape (\\t, \\n, \\\", \\\\, \\NNN) in a quoted name")
                out.append(_C_ESCAPES[e])
                j += 1
                continue
            out.append(c)
            j += 1
        raise self.error(index, "a closing '\"' for the quoted file name")

    def path(self, raw: bytes, strip: int, index: int) -> str:
        """``raw`` with ``strip`` leading components removed, checked to stay relative."""
        name = os.fsdecode(raw)
        pos = 0
        for _ in range(strip):
            j = name.find("/", pos)
            if j < 0:
                raise self.error(index, f"a path with {strip} leading component(s) to strip (-p{strip})",
                                 repr(name))
            while j + 1 < len(name) and name[j + 1] == "/":
                j += 1
            pos = j + 1
        rest = name[pos:]
        if rest.startswith("/"):
            raise self.unsafe(index, "a relative path inside the tree", f"absolute path {rest!r}")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.unsafe(index, "a path inside the tree", f"{rest!r} (contains '..')")
        if not parts:
            raise self.error(index, "a file name", repr(name))
        if "\0" in rest:
            raise self.unsafe(index, "a file name without NUL characters", repr(name))
        return "/".join(parts)

    # -- git diffs

    def git_file(self, i: int) -> tuple[FilePatch | None, int]:
        lines, n = self.lines, self.n
        start = i
        names = self.git_names(i)
        fp = FilePatch(None, None, "modify", start + 1, git=True)
        rename_from = rename_to = copy_from = copy_to = None
        new_file = deleted = saw_old_mode = saw_new_mode = False
        i += 1
        while i < n:
            line = lines[i]
            if not line.startswith(_GIT_HEADERS):
                break
            if line.startswith(b"old mode "):
                fp.old_mode = self.mode(line[9:], i)
                saw_old_mode = True
            elif line.startswith(b"new mode "):
                fp.new_mode = self.mode(line[9:], i)
                saw_new_mode = True
            elif line.startswith(b"deleted file mode "):
                deleted = True
                fp.old_mode = self.mode(line[18:], i)
            elif line.startswith(b"new file mode "):
                new_file = True
                fp.new_mode = self.mode(line[14:], i)
            elif line.startswith(b"rename from "):
                rename_from = self.git_header_path(line[12:], i)
            elif line.startswith(b"rename old "):  # git before 1.5
                rename_from = self.git_header_path(line[11:], i)
            elif line.startswith(b"rename to "):
                rename_to = self.git_header_path(line[10:], i)
            elif line.startswith(b"rename new "):
                rename_to = self.git_header_path(line[11:], i)
            elif line.startswith(b"copy from "):
                copy_from = self.git_header_path(line[10:], i)
            elif line.startswith(b"copy to "):
                copy_to = self.git_header_path(line[8:], i)
            elif line.startswith(b"similarity index "):
                digits = line[17:].strip().rstrip(b"%")
                fp.similarity = int(digits) if digits.isdigit() else None
            elif line.startswith(b"index "):
                self.index_line(fp, line[6:], i)
            i += 1

        old_raw = new_raw = None
        has_text = False
        if i + 1 < n and lines[i].startswith(b"--- ") and lines[i + 1].startswith(b"+++ "):
            old_raw, _ = self.header_name(i, 4)
            new_raw, _ = self.header_name(i + 1, 4)
            header_at = i
            i += 2
            if i >= n or not lines[i].startswith(b"@@ -"):
                raise self.error(i, "a hunk header '@@ -START,COUNT +START,COUNT @@'")
            fp.hunks, i = self.hunks(i)
            fp.plain_lines = self.plain_lines
            has_text = True
            old_path = None if old_raw == b"/dev/null" else self.path(old_raw, self.strip, header_at)
            new_path = None if new_raw == b"/dev/null" else self.path(new_raw, self.strip, header_at + 1)
        else:
            old_path = new_path = None
            if names is not None:
                old_path = self.path(names[0], self.strip, start)
                new_path = self.path(names[1], self.strip, start)
            if i < n and lines[i].startswith(b"GIT binary patch"):
                i = self.binary(fp, i)
            elif i < n and lines[i].startswith(b"Binary files "):
                fp.binary_problem = ("the patch only says 'Binary files differ' and carries no data "
                                     "(make it with 'git diff --binary')")
                i += 1

        # Names: the ---/+++ lines, else the diff --git line, else rename/copy lines.
        if old_path is None and not new_file and not has_text:
            old_path = rename_from or copy_from
        if new_path is None and not deleted and not has_text:
            new_path = rename_to or copy_to
        if rename_from is not None or rename_to is not None:
            fp.action = "rename"
            old_path = old_path or rename_from
            new_path = new_path or rename_to
        elif copy_from is not None or copy_to is not None:
            fp.action = "copy"
            old_path = old_path or copy_from
            new_path = new_path or copy_to
        if new_file or (has_text and old_raw == b"/dev/null"):
            fp.action = "create"
            new_path = new_path or old_path
            old_path = None
        elif deleted or (has_text and new_raw == b"/dev/null"):
            fp.action = "delete"
            old_path = old_path or new_path
            new_path = None
        elif fp.action == "modify":
            old_path = old_path or new_path
            new_path = new_path or old_path
        if old_path is None and new_path is None:
            raise self.error(start, "file names in the 'diff --git' line or '---'/'+++' lines")
        if fp.action in ("rename", "copy") and (old_path is None or new_path is None):
            raise self.error(start, f"both names of a git {fp.action}")
        fp.old_path, fp.new_path = old_path, new_path
        fp.mode_changed = saw_old_mode and saw_new_mode and fp.old_mode != fp.new_mode
        if any(m is not None and m & S_IFMT == MODE_GITLINK for m in (fp.old_mode, fp.new_mode)):
            fp.binary_problem = "a git submodule (mode 160000) is not a file"
        if (not fp.hunks and fp.binary is None and fp.binary_problem is None and fp.action == "modify"
                and not fp.mode_changed):
            return None, i  # nothing to do for this file (e.g. an index line only)
        return fp, i

    def git_names(self, i: int) -> tuple[bytes, bytes] | None:
        """The two names of ``diff --git a/X b/Y``, or None if ambiguous (spaces, renames)."""
        rest = self.lines[i][11:].rstrip(b"\n")
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest.startswith(b'"'):
            first, end = self.unquote(rest, 0, i)
            second = rest[end:].lstrip(b" ")
            if second.startswith(b'"'):
                second, _ = self.unquote(second, 0, i)
            return first, second
        if rest.endswith(b'"') and b' "' in rest:
            k = rest.index(b' "')
            second, _ = self.unquote(rest, k + 1, i)
            return rest[:k], second
        spaces = [k for k, c in enumerate(rest) if c == 32]
        if len(spaces) == 1:
            k = spaces[0]
            return rest[:k], rest[k + 1:]
        for k in spaces:  # names with spaces: the split where both sides name the same file
            left, right = rest[:k], rest[k + 1:]
            if left.partition(b"/")[2] == right.partition(b"/")[2] and b"/" in left:
                return left, right
        return None

    def git_header_path(self, raw: bytes, i: int) -> str:
        """A ``rename from``/``copy to`` name: git writes it without the a/ b/ prefix."""
        raw = raw.rstrip(b"\n")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.startswith(b'"'):
            raw, _ = self.unquote(raw, 0, i)
        return self.path(raw, max(self.strip - 1, 0), i)

    def mode(self, text: bytes, i: int) -> int:
        text = text.strip()
        if not text or any(c not in b"01234567" for c in text):
            raise self.error(i, "an octal file mode such as 100644")
        return int(text, 8)

    def index_line(self, fp: FilePatch, text: bytes, i: int) -> None:
        """``index OLD..NEW [MODE]``: hashes (binary checks) and the unchanged mode."""
        parts = text.split()
        if not parts or b".." not in parts[0]:
            raise self.error(i, "'index OLDHASH..NEWHASH [MODE]'")
        old, _, new = parts[0].partition(b"..")
        fp.old_hash, fp.new_hash = old.decode("ascii", "replace"), new.decode("ascii", "replace")
        if len(parts) > 1:
            mode = self.mode(parts[1], i)
            if fp.old_mode is None:
                fp.old_mode = mode
            if fp.new_mode is None:
                fp.new_mode = mode

    def binary(self, fp: FilePatch, i: int) -> int:
        """``GIT binary patch``: the forward hunk, then (optionally) the reverse one."""
        i += 1
        fp.binary, i = self.binary_hunk(i)
        while i < self.n and self.lines[i] in (b"\n", b"\r\n"):
            i += 1
        if i < self.n and self.lines[i].startswith((b"literal ", b"delta ")):
            fp.binary_reverse, i = self.binary_hunk(i)
        return i

    def binary_hunk(self, i: int) -> tuple[BinaryHunk, int]:
        import zlib

        from .binary import decode_base85_line

        if i >= self.n:
            raise self.error(i, "'literal SIZE' or 'delta SIZE'")
        head = self.lines[i].split()
        if len(head) != 2 or head[0] not in (b"literal", b"delta") or not head[1].isdigit():
            raise self.error(i, "'literal SIZE' or 'delta SIZE'")
        method, size = head[0].decode(), int(head[1])
        start = i
        i += 1
        chunks: list[bytes] = []
        while i < self.n and self.lines[i] not in (b"\n", b"\r\n"):
            try:
                chunks.append(decode_base85_line(self.lines[i].rstrip(b"\r\n")))
            except ValueError as exc:
                raise self.error(i, f"a base85 line of a git binary patch ({exc})") from None
            i += 1
        try:
            data = zlib.decompress(b"".join(chunks))
        except zlib.error as exc:
            raise self.error(start, "zlib-compressed data in the git binary patch", f"corrupt data ({exc})")
        if len(data) != size:
            raise self.error(start, f"{size} bytes of binary {method} data", f"{len(data)} bytes")
        return BinaryHunk(method, size, data), i

    # -- hunks

    def hunks(self, i: int) -> tuple[list[Hunk], int]:
        """Consecutive hunks starting at the ``@@`` line ``i``.

        The common hunk (only `` ``, ``-``, ``+`` lines, no ``\\`` marker) is
        read here without a step per line: its body's length follows from the
        header's counts with ``bytes.count`` over the lines' first bytes, and
        its two sides are picked out with ``itertools.compress``; a large patch
        has ten thousand hunks, so this loop is kept free of calls.  Anything
        unusual goes to :meth:`hunk`, which reads line by line and reports
        errors precisely.
        """
        out: list[Hunk] = []
        lines, heads, n = self.lines, self.heads, self.n
        if self._olds is None:
            bodies = list(map(_AFTER_FIRST, lines))
            self._olds = list(compress(bodies, heads.translate(_OLD_LINES)))
            self._news = list(compress(bodies, heads.translate(_NEW_LINES)))
            del bodies
        olds, news = self._olds, self._news
        o = k = -1  # where the next common hunk's sides start in olds/news; -1: look it up
        match, usual, counts = _HUNK.match, _HUNK_USUAL.match, _COUNTS
        shapes = self._shapes
        number = 0
        plain = True  # every hunk read by the common path (lines ending in a newline)
        append = out.append
        while i < n and heads[i] == _AT:
            m = usual(lines[i]) or match(lines[i])
            if m is None:
                if lines[i].startswith(b"@@ -"):
                    raise self.error(i, "a hunk header '@@ -START,COUNT +START,COUNT @@'")
                break
            number += 1
            a, b, c, d = m.groups()
            try:
                old_count = counts[b]
                new_count = counts[d]
            except KeyError:
                old_count = int(b) if b is not None else 1
                new_count = int(d) if d is not None else 1
            start = i + 1
            # Most hunks have diff's usual three lines of context at each end, so a
            # body of old + new - 6 lines: one check settles that.  Else the length
            # grows from the larger count (the counts are met at the true length only).
            length = old_count + new_count - 6
            seg = heads[start:start + length]
            shape = shapes.get(seg) or shapes.setdefault(seg, _shape(seg))
            if not (length > 0 and start + length <= n and length - shape[0] == old_count
                    and length - shape[1] == new_count):
                length = old_count if old_count > new_count else new_count
                while True:
                    if start + length > n:
                        seg = None
                        break
                    seg = heads[start:start + length]
                    shape = shapes.get(seg) or shapes.setdefault(seg, _shape(seg))
                    got_old = length - shape[0]
                    got_new = length - shape[1]
                    if got_old == old_count and got_new == new_count:
                        break
                    if got_old > old_count or got_new > new_count:
                        seg = None
                        break
                    if got_old == old_count:
                        length += new_count - got_new
                    elif got_new == new_count:
                        length += old_count - got_old
                    else:
                        length += min(old_count - got_old, new_count - got_new)
            end = start + length
            if seg is None or not shape[2] or (end < n and heads[end] == _BSLASH):
                hunk, i = self.hunk(i, number, m)
                append(hunk)
                o, plain = -1, False
                continue
            if shape[3] == length:
                raise self.error(i, f"at least one '-' or '+' line in hunk #{number}", "context lines only")
            old_start = int(a)
            if o < 0:
                o, k = self._side_at(start)
            o2, k2 = o + old_count, k + new_count
            append(new_hunk((number, old_start, old_count, int(c), new_count, lines[i],
                             start, seg, shape[3], shape[4],
                             old_start if old_count else old_start + 1, olds[o:o2], news[k:k2])))
            o, k = o2, k2
            i = end
        if o >= 0:
            self._side_anchor = (i, o, k)
        # The patch's last line may lack its newline, and a common hunk may end there.
        self.plain_lines = plain and not (self._unterminated and i >= n)
        return out, i

    def _side_at(self, line: int) -> tuple[int, int]:
        """Where the sides of a common hunk whose body starts at patch line ``line`` begin in
        ``_olds`` and ``_news``.

        Counted from the last place known (the patch is read forward), once per run of
        common hunks: within a run, each hunk's sides follow the previous one's.
        """
        at, o, k = self._side_anchor
        heads = self.heads[at:line]
        o += len(heads) - heads.count(b"+") - heads.count(b"@")
        k += len(heads) - heads.count(b"-") - heads.count(b"@")
        self._side_anchor = (line, o, k)
        return o, k

    def hunk(self, i: int, number: int, m: re.Match[bytes]) -> tuple[Hunk, int]:
        """One hunk read line by line (``m`` is its header's match): the unusual and the malformed."""
        lines, n = self.lines, self.n
        a, b, c, d = m.groups()
        old_start = int(a)
        old_count = int(b) if b is not None else 1
        new_start = int(c)
        new_count = int(d) if d is not None else 1
        header = m.group(0).decode("ascii")
        at = i
        old_lines: list[bytes] = []
        new_lines: list[bytes] = []
        kinds = bytearray()
        old_left, new_left = old_count, new_count
        context = 0
        prefix = -1
        last = 0  # kind of the previous line: 0 none, 1 context, 2 minus, 3 plus
        i += 1
        while old_left > 0 or new_left > 0:
            if i >= n:
                raise self.error(i, f"{old_left} more old and {new_left} more new line(s) in hunk "
                                    f"#{number} ({header})")
            line = lines[i]
            c = line[0]
            if c == _SP or c == _NL or c == _TAB:
                text = line[1:] if c == _SP else line
                if old_left <= 0 or new_left <= 0:
                    raise self.error(i, self.hunk_expectation(old_left, new_left, number))
                old_lines.append(text)
                new_lines.append(text)
                kinds.append(_SP)
                old_left -= 1
                new_left -= 1
                context += 1
                last = 1
            elif c == _MINUS:
                if old_left <= 0:
                    raise self.error(i, self.hunk_expectation(old_left, new_left, number))
                old_lines.append(line[1:])
                kinds.append(_MINUS)
                old_left -= 1
                if prefix < 0:
                    prefix = context
                context = 0
                last = 2
            elif c == _PLUS:
                if new_left <= 0:
                    raise self.error(i, self.hunk_expectation(old_left, new_left, number))
                new_lines.append(line[1:])
                kinds.append(_PLUS)
                new_left -= 1
                if prefix < 0:
                    prefix = context
                context = 0
                last = 3
            elif c == _BSLASH:
                self.no_newline(i, last, old_lines, new_lines, old_left, new_left)
                last = 0
            else:
                raise self.error(i, self.hunk_expectation(old_left, new_left, number))
            i += 1
        if i < n and lines[i][:1] == b"\\":
            self.no_newline(i, last, old_lines, new_lines, old_left, new_left)
            i += 1
        if prefix < 0:
            raise self.error(at, f"at least one '-' or '+' line in hunk #{number}", "context lines only")
        return Hunk(number, old_start, old_count, new_start, new_count, lines[at], at + 1, bytes(kinds),
                    prefix, context, old_start if old_count else old_start + 1, old_lines, new_lines), i

    @staticmethod
    def hunk_expectation(old_left: int, new_left: int, number: int) -> str:
        if old_left > 0 and new_left > 0:
            return f"a hunk line (' ', '-', '+' or '\\') in hunk #{number}"
        if old_left > 0:
            return f"{old_left} more '-' line(s) in hunk #{number} (its new side is complete)"
        return f"{new_left} more '+' line(s) in hunk #{number} (its old side is complete)"

    def no_newline(self, i: int, last: int, old_lines: list[bytes], new_lines: list[bytes],
                   old_left: int, new_left: int) -> None:
        """``\\ No newline at end of file``: the previous line has no line ending."""
        ok = ((last == 1 and old_left == 0 and new_left == 0) or (last == 2 and old_left == 0)
              or (last == 3 and new_left == 0))
        if not ok:
            raise self.error(i, "'\\ No newline at end of file' only after the last line of a side")
        if last in (1, 2):
            old_lines[-1] = old_lines[-1][:-1] if old_lines[-1].endswith(b"\n") else old_lines[-1]
        if last in (1, 3):
            new_lines[-1] = new_lines[-1][:-1] if new_lines[-1].endswith(b"\n") else new_lines[-1]


def _is_epoch(when: bytes) -> bool:
    """True for a ``diff -N`` timestamp meaning "this file does not exist" (the Unix epoch).

    diff writes the epoch in its own time zone (``1969-12-31 19:00:00 -0500``),
    so the offset is applied before comparing, as GNU patch does.
    """
    if not when:
        return False
    if when[:1].isdigit() and when[:7] not in (b"1969-12", b"1970-01"):
        return False  # a date far from the epoch (even 99 hours of offset away): most files
    m = _ISO_TIME.match(when)
    if m:
        y, mo, d, hh, mm, ss = (int(g) for g in m.groups()[:6])
        days = _days_from_civil(y, mo, d)
        seconds = days * 86400 + hh * 3600 + mm * 60 + ss
        if m.group(7):
            offset = int(m.group(8)) * 3600 + int(m.group(9)) * 60
            seconds -= offset if m.group(7) == b"+" else -offset
        return seconds == 0
    if _CTIME.match(when):
        return when.split()[1:5:3] == [b"Jan", b"1970"] and b" 1 00:00:00 " in when
    return False


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (no datetime import needed)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
