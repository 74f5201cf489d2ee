"""Generate git-style unified patches from two trees (or two versions of one file).

The personality of a domain is stored as a patch against a shared image, so the
patch we write must be taken by every tool an admin might reach for, not only by
our own engine: GNU ``patch -p1`` and ``git apply`` both have to reproduce the new
tree from it.  That fixes the format to git's extended unified diff:

* one ``diff --git a/P b/P`` section per path, sorted by path bytewise, so the
  same two trees always give the same bytes (plans are signed and cached by hash);
  names with odd bytes or spaces are C-quoted (``"a/x y"``), which both tools read;
* ``new file mode`` / ``deleted file mode`` / ``old mode`` + ``new mode`` carry
  what plain ``diff -urN`` cannot: creation of empty files, deletion, the
  executable bit;
* symlinks are mode ``120000`` entries whose "content" is the link target with no
  trailing newline, as git stores them;
* files with a NUL byte are ``GIT binary patch`` sections with a forward and a
  reverse ``literal`` block (zlib, then git's base85 line format), and every
  section carries a full ``index <old-blob>..<new-blob>`` line because
  ``git apply`` refuses binary patches without the full blob names;
* hunks follow GNU diff's conventions (``@@ -l,s +l,s @@``, ``,s`` left out when
  it is 1, ``l`` the line before when ``s`` is 0), ``\\ No newline at end of
  file`` markers, and content handled as bytes so CRLF lines survive exactly.

A directory cannot be expressed in this format, only the files in it: empty
directories are not part of the patch.  A path that is a file in one tree and a
directory (or a symlink) in the other becomes a deletion and a creation; a
deletion that clears a directory which becomes a file is placed before that
file's creation so that tools applying sections in order (GNU patch) succeed.

Pure standard library and no import-time work: this module runs inside the frozen
PID 1 as well as in dom0.
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat
import zlib
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

__all__ = [
    "MODE_EXEC",
    "MODE_FILE",
    "MODE_LINK",
    "DiffError",
    "TreeEntry",
    "diff_entries",
    "diff_files",
    "diff_trees",
    "git_blob_id",
    "git_mode",
    "is_binary",
    "read_tree",
]

#: Git's three modes for the things a patch can carry.  Git keeps only the
#: owner's executable bit; a 0600 file is ``100644`` as far as any patch goes.
MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODE_LINK = 0o120000

#: The all-zero blob name git writes for "no file on this side".
NULL_ID = b"0" * 40

#: Above this many edit steps (after the common head and tail are cut) the
#: exact O(ND) diff gives up (at a cost of about a second) and the file is
#: diffed between anchors instead (see :func:`_anchored_matches`).  Real
#: configuration edits are far below it; a rewritten file is not.
MAX_MYERS_D = 1000

#: The same limit for one region between anchors, kept small because a file
#: can have many such regions.
MAX_REGION_D = 200


class DiffError(ValueError):
    """A tree cannot be diffed: not a directory, unreadable, or holds a thing a patch cannot carry."""


class TreeEntry(NamedTuple):
    """One non-directory in a tree, as a patch sees it.

    ``mode`` is one of :data:`MODE_FILE`, :data:`MODE_EXEC`, :data:`MODE_LINK`;
    ``data`` is the file content, or the symlink target for :data:`MODE_LINK`.
    """

    mode: int
    data: bytes


# ------------------------------------------------------------------ small helpers


def git_mode(mode: int) -> int:
    """The git mode for an ``st_mode`` (or bare permission bits, taken as a file).

    Git records only "symlink", "executable file" and "file"; normalising here is
    what makes a diff of a 0600 ``/etc/shadow`` not a mode change.
    """
    if stat.S_ISLNK(mode):
        return MODE_LINK
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise DiffError(f"mode {mode:o} is neither a file nor a symlink")
    return MODE_EXEC if mode & stat.S_IXUSR else MODE_FILE


def git_blob_id(data: bytes) -> bytes:
    """Git's object name of a blob (hex, as bytes): what the ``index`` line names."""
    h = hashlib.sha1(b"blob %d\0" % len(data), usedforsecurity=False)
    h.update(data)
    return h.hexdigest().encode("ascii")


def is_binary(data: bytes) -> bool:
    """Whether ``data`` must travel as a git binary patch.

    A NUL byte is git's own test (it looks only at the first 8000 bytes; we look
    at all of them, so a late NUL never reaches a tool as a "text" line).  Every
    other byte value, CR included, survives a unified diff intact.
    """
    return b"\0" in data


def _split_lines(data: bytes) -> list[bytes]:
    """Lines of ``data`` with their ``\\n`` kept; the last one may have none.

    Only ``\\n`` ends a line (``bytes.splitlines`` would also split at ``\\r``,
    which would mangle CRLF files).
    """
    if not data:
        return []
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _quote_name(name: bytes) -> bytes:
    """A path as it goes into headers: C-quoted if it has odd bytes or a space.

    Git's rule (``core.quotePath``, its default) quotes control bytes, DEL,
    ``"``, ``\\`` and anything above 0x7f; we also quote a space, which git
    leaves bare.  Bare, ``diff --git a/x y b/x y`` is ambiguous, and GNU patch
    cannot find the file of a section that has no ``---``/``+++`` lines (a
    mode change, an empty new file); quoted, both GNU patch and ``git apply``
    read it.
    """
    if not any(c <= 0x20 or c >= 0x7F or c in (0x22, 0x5C) for c in name):
        return name
    out = bytearray(b'"')
    for c in name:
        if c in _C_ESCAPES:
            out += _C_ESCAPES[c]
        elif c < 0x20 or c >= 0x7F:
            out += b"\\%03o" % c
        else:
            out.append(c)
    out += b'"'
    return bytes(out)


_C_ESCAPES = {
    0x07: b"\\a", 0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0B: b"\\v",
    0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\",
}


def _to_bytes_path(path: str | bytes | os.PathLike) -> bytes:
    """A relative patch path as bytes, without leading ``./`` or ``/``; refuses ``..``.

    A patch we write must never name a path outside the tree it is applied to.
    """
    raw = os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if not parts:
        raise DiffError(f"{path!r}: empty path")
    if b".." in parts:
        raise DiffError(f"{path!r}: '..' is not allowed in a patch path")
    if any(b"\0" in p for p in parts):
        raise DiffError(f"{path!r}: contains a NUL byte")
    return b"/".join(parts)


# ------------------------------------------------------------------------ the diff


def _myers_matches(a: Sequence[int], b: Sequence[int], max_d: int) -> list[tuple[int, int]] | None:
    """Matched index pairs of a shortest edit script of ``a`` into ``b`` (Myers 1986).

    The greedy O((N+M)D) algorithm, keeping each round's frontier so the path
    can be traced back.  Returns ``None`` once more than ``max_d`` edits would be
    needed, leaving very different inputs to a cheaper, non-minimal method.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    limit = min(n + m, max_d)
    off = limit + 1
    v = [0] * (2 * limit + 3)
    trace: list[list[int]] = []
    for d in range(limit + 1):
        # Frontier before round d, covering diagonals -d-1 .. d+1.
        trace.append(v[off - d - 1 : off + d + 2])
        for k in range(-d, d + 1, 2):
            if k == -d or (k != d and v[off + k - 1] < v[off + k + 1]):
                x = v[off + k + 1]  # down: insert b[y-1]
            else:
                x = v[off + k - 1] + 1  # right: delete a[x-1]
            y = x - k
            while x < n and y < m and a[x] == b[y]:
                x += 1
                y += 1
            v[off + k] = x
            if x >= n and y >= m:
                return _myers_backtrack(trace, d, n, m)
    return None


def _myers_backtrack(trace: list[list[int]], d: int, n: int, m: int) -> list[tuple[int, int]]:
    """Walk the recorded frontiers back from (n, m) and collect the diagonal steps."""
    matches: list[tuple[int, int]] = []
    x, y = n, m
    for dd in range(d, 0, -1):
        front = trace[dd]
        base = dd + 1  # index of diagonal 0 in this frontier
        k = x - y
        if k == -dd or (k != dd and front[base + k - 1] < front[base + k + 1]):
            pk = k + 1
        else:
            pk = k - 1
        px = front[base + pk]
        py = px - pk
        while x > px and y > py:
            x -= 1
            y -= 1
            matches.append((x, y))
        x, y = px, py
    while x > 0 and y > 0:
        x -= 1
        y -= 1
        matches.append((x, y))
    matches.reverse()
    return matches


def _unique_anchors(a: Sequence[int], a0: int, a1: int, b: Sequence[int], b0: int, b1: int) -> list[tuple[int, int]]:
    """The longest in-order run of lines that occur exactly once on each side (patience diff).

    Such lines are almost always the real landmarks of a file (a key, a
    section header), so matching them first and diffing between them gives a
    readable diff in O(n log n) where an exact diff would be too slow.
    """
    import bisect

    count_a: dict[int, int] = {}
    for i in range(a0, a1):
        count_a[a[i]] = count_a.get(a[i], 0) + 1
    count_b: dict[int, int] = {}
    where_b: dict[int, int] = {}
    for j in range(b0, b1):
        count_b[b[j]] = count_b.get(b[j], 0) + 1
        where_b[b[j]] = j
    pairs = [(i, where_b[a[i]]) for i in range(a0, a1) if count_a[a[i]] == 1 and count_b.get(a[i]) == 1]
    # Longest increasing subsequence of the b positions (pairs are in a order).
    tails: list[int] = []  # b position ending the best run of each length
    tail_idx: list[int] = []  # index into pairs of that run's end
    prev: list[int] = [-1] * len(pairs)
    for n, (_, j) in enumerate(pairs):
        k = bisect.bisect_left(tails, j)
        if k == len(tails):
            tails.append(j)
            tail_idx.append(n)
        else:
            tails[k] = j
            tail_idx[k] = n
        prev[n] = tail_idx[k - 1] if k else -1
    run: list[tuple[int, int]] = []
    n = tail_idx[-1] if tail_idx else -1
    while n >= 0:
        run.append(pairs[n])
        n = prev[n]
    run.reverse()
    return run


def _anchored_matches(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
    """Matched index pairs for inputs too different for an exact diff to be cheap.

    Unique lines anchor the two sides; the regions between anchors get their
    common head and tail matched, then new anchors (lines unique within the
    region), then an exact diff if it stays within :data:`MAX_REGION_D`; a
    region with none of these is replaced wholesale.  Not minimal, always
    correct, and bounded: a file of alternating identical lines costs no more
    than a file of distinct ones.
    """
    result: list[tuple[int, int]] = []
    stack = [(0, len(a), 0, len(b))]
    while stack:
        a0, a1, b0, b1 = stack.pop()
        while a0 < a1 and b0 < b1 and a[a0] == b[b0]:
            result.append((a0, b0))
            a0 += 1
            b0 += 1
        while a1 > a0 and b1 > b0 and a[a1 - 1] == b[b1 - 1]:
            a1 -= 1
            b1 -= 1
            result.append((a1, b1))
        if a0 == a1 or b0 == b1:
            continue
        anchors = _unique_anchors(a, a0, a1, b, b0, b1)
        if not anchors:
            exact = _myers_matches(a[a0:a1], b[b0:b1], MAX_REGION_D)
            result.extend((a0 + x, b0 + y) for x, y in exact or ())
            continue
        pa, pb = a0, b0
        for x, y in anchors:
            result.append((x, y))
            stack.append((pa, x, pb, y))
            pa, pb = x + 1, y + 1
        stack.append((pa, a1, pb, b1))
    result.sort()
    return result


def _change_blocks(a: Sequence[bytes], b: Sequence[bytes]) -> list[tuple[int, int, int, int]]:
    """The changes turning line list ``a`` into ``b``: ``(i1, i2, j1, j2)``, in order.

    ``a[i1:i2]`` is replaced by ``b[j1:j2]``; consecutive blocks are separated by
    at least one unchanged line.  The common head and tail are cut first and
    lines are interned to ints, which is what keeps /etc-sized trees fast.
    """
    n, m = len(a), len(b)
    lo = 0
    while lo < n and lo < m and a[lo] == b[lo]:
        lo += 1
    hi_a, hi_b = n, m
    while hi_a > lo and hi_b > lo and a[hi_a - 1] == b[hi_b - 1]:
        hi_a -= 1
        hi_b -= 1
    if lo == hi_a and lo == hi_b:
        return []
    ids: dict[bytes, int] = {}
    ia = [ids.setdefault(line, len(ids)) for line in a[lo:hi_a]]
    ib = [ids.setdefault(line, len(ids)) for line in b[lo:hi_b]]
    matches = _myers_matches(ia, ib, MAX_MYERS_D)
    if matches is None:
        matches = _anchored_matches(ia, ib)
    blocks: list[tuple[int, int, int, int]] = []
    px = py = 0
    for x, y in [*matches, (len(ia), len(ib))]:
        if x > px or y > py:
            blocks.append((lo + px, lo + x, lo + py, lo + y))
        px, py = x + 1, y + 1
    return blocks


def _range(start: int, count: int) -> bytes:
    """One side of a hunk header the way GNU diff writes it."""
    if count == 0:
        return b"%d,0" % start  # the line before the empty range
    if count == 1:
        return b"%d" % (start + 1)
    return b"%d,%d" % (start + 1, count)


def _emit_line(out: list[bytes], prefix: bytes, line: bytes) -> None:
    out.append(prefix + line)
    if not line.endswith(b"\n"):
        out.append(b"\n\\ No newline at end of file\n")


def _text_hunks(old: bytes, new: bytes, context: int) -> list[bytes]:
    """The ``@@`` hunks turning ``old`` into ``new``, as output chunks.

    Changes closer than ``2 * context`` unchanged lines share a hunk, as in GNU
    diff, so no context line is ever claimed by two hunks.
    """
    a = _split_lines(old)
    b = _split_lines(new)
    blocks = _change_blocks(a, b)
    out: list[bytes] = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1][0] - blocks[j][1] <= 2 * context:
            j += 1
        first, last = blocks[i], blocks[j]
        a_start = max(0, first[0] - context)
        a_end = min(len(a), last[1] + context)
        b_start = first[2] - (first[0] - a_start)
        b_end = last[3] + (a_end - last[1])
        out.append(b"@@ -%s +%s @@\n" % (_range(a_start, a_end - a_start), _range(b_start, b_end - b_start)))
        pos = a_start
        for i1, i2, j1, j2 in blocks[i : j + 1]:
            for line in a[pos:i1]:
                _emit_line(out, b" ", line)
            for line in a[i1:i2]:
                _emit_line(out, b"-", line)
            for line in b[j1:j2]:
                _emit_line(out, b"+", line)
            pos = i2
        for line in a[pos:a_end]:
            _emit_line(out, b" ", line)
        i = j + 1
    return out


def _binary_literal(data: bytes) -> list[bytes]:
    """One ``literal N`` block: zlib-deflated ``data`` in git's base85 line format.

    Each line carries up to 52 bytes of the deflated stream: a length character
    (``A``-``Z`` for 1-26, ``a``-``z`` for 27-52) then the bytes in base85, the
    last group zero-padded.  Python's b85 alphabet is git's, and 52 being a
    multiple of 4 lets one encoding of the whole stream be cut into lines.
    """
    deflated = zlib.compress(data, 9)
    encoded = base64.b85encode(deflated, pad=True)
    out = [b"literal %d\n" % len(data)]
    for pos in range(0, len(deflated), 52):
        size = min(52, len(deflated) - pos)
        length_char = (ord("A") + size - 1) if size <= 26 else (ord("a") + size - 27)
        start = pos // 4 * 5
        out.append(bytes([length_char]) + encoded[start : start + (size + 3) // 4 * 5] + b"\n")
    out.append(b"\n")
    return out


def _section(path: bytes, old: TreeEntry | None, new: TreeEntry | None, context: int) -> list[bytes]:
    """One ``diff --git`` section for ``path``, or nothing when both sides agree.

    ``old``/``new`` of ``None`` mean "absent on that side".  A symlink on one
    side and a file on the other is not a single section (git splits such a
    type change the same way); callers use :func:`_sections` for that.
    """
    if old == new:
        return []
    a_name = _quote_name(b"a/" + path)
    b_name = _quote_name(b"b/" + path)
    out = [b"diff --git %s %s\n" % (a_name, b_name)]
    old_data = old.data if old is not None else b""
    new_data = new.data if new is not None else b""
    old_id = git_blob_id(old_data) if old is not None else NULL_ID
    new_id = git_blob_id(new_data) if new is not None else NULL_ID
    if old is None:
        assert new is not None
        out.append(b"new file mode %06o\n" % new.mode)
        out.append(b"index %s..%s\n" % (old_id, new_id))
    elif new is None:
        out.append(b"deleted file mode %06o\n" % old.mode)
        out.append(b"index %s..%s\n" % (old_id, new_id))
    else:
        if old.mode != new.mode:
            out.append(b"old mode %06o\n" % old.mode)
            out.append(b"new mode %06o\n" % new.mode)
        if old_data != new_data:
            if old.mode == new.mode:
                out.append(b"index %s..%s %06o\n" % (old_id, new_id, new.mode))
            else:
                out.append(b"index %s..%s\n" % (old_id, new_id))
    if old_data == new_data:
        # Mode-only change, or a new or deleted empty file: the header says it all.
        return out
    if is_binary(old_data) or is_binary(new_data):
        out.append(b"GIT binary patch\n")
        out += _binary_literal(new_data)
        out += _binary_literal(old_data)  # the reverse, so `git apply -R` works
        return out
    out.append(b"--- %s\n" % a_name if old is not None else b"--- /dev/null\n")
    out.append(b"+++ %s\n" % b_name if new is not None else b"+++ /dev/null\n")
    out += _text_hunks(old_data, new_data, context)
    return out


def _sections(path: bytes, old: TreeEntry | None, new: TreeEntry | None, context: int) -> tuple[list[bytes], list[bytes]]:
    """``(deletion part, rest)`` for one path; a symlink/file type change is split in two."""
    if old is not None and new is not None and (old.mode == MODE_LINK) != (new.mode == MODE_LINK):
        return _section(path, old, None, context), _section(path, None, new, context)
    return [], _section(path, old, new, context)


def _check_entry(path: bytes, entry: TreeEntry) -> None:
    if entry.mode not in (MODE_FILE, MODE_EXEC, MODE_LINK):
        raise DiffError(f"{os.fsdecode(path)}: mode {entry.mode:o} is not one git can carry")
    if entry.mode == MODE_LINK and (not entry.data or b"\0" in entry.data):
        raise DiffError(f"{os.fsdecode(path)}: symlink target is empty or has a NUL byte")


def diff_entries(old: Mapping[bytes, TreeEntry], new: Mapping[bytes, TreeEntry], *, context: int = 3) -> bytes:
    """One git-style patch turning tree ``old`` into tree ``new`` (path -> entry maps).

    Paths are relative, ``/``-separated bytes, as :func:`read_tree` returns
    them.  Sections come sorted by path bytewise, with one exception made for
    tools that apply sections in order: when a path becomes a file (or symlink)
    where a directory was, the deletions of that directory's files come just
    before the new file, not after it.
    """
    if context < 0:
        raise DiffError(f"context must be >= 0, not {context}")
    keyed: list[tuple[tuple[bytes, int, bytes, int], list[bytes]]] = []
    for path in set(old) | set(new):
        o, n = old.get(path), new.get(path)
        for entry in (o, n):
            if entry is not None:
                _check_entry(path, entry)
        deletion, rest = _sections(path, o, n, context)
        if n is None and o is not None:
            deletion, rest = rest, deletion
        if deletion:
            anchor = path
            parts = path.split(b"/")
            for depth in range(1, len(parts)):
                ancestor = b"/".join(parts[:depth])
                if ancestor in new:
                    anchor = ancestor
                    break
            phase = 0 if anchor != path else 1
            keyed.append(((anchor, phase, path, 0), deletion))
        if rest:
            keyed.append(((path, 1, path, 1), rest))
    keyed.sort(key=lambda item: item[0])
    return b"".join(chunk for _, chunks in keyed for chunk in chunks)


def diff_files(
    old: bytes | None,
    new: bytes | None,
    path: str | bytes,
    *,
    old_mode: int | None = None,
    new_mode: int | None = None,
    context: int = 3,
) -> bytes:
    """A git-style patch for one path: ``old`` content to ``new`` content.

    ``None`` content means the file does not exist on that side (creation or
    deletion).  Modes are ``st_mode`` values or git modes (default: a plain
    file); for a symlink pass ``stat.S_IFLNK`` (or :data:`MODE_LINK`) and its
    target as the content.  Returns ``b""`` when nothing differs.  This is the
    container language's patch-out: it writes one file's change without
    building two trees.
    """
    rel = _to_bytes_path(path)
    old_entry = None if old is None else TreeEntry(git_mode(old_mode if old_mode is not None else MODE_FILE), old)
    new_entry = None if new is None else TreeEntry(git_mode(new_mode if new_mode is not None else MODE_FILE), new)
    return diff_entries({rel: old_entry} if old_entry else {}, {rel: new_entry} if new_entry else {}, context=context)


def read_tree(root: Path | str) -> dict[bytes, TreeEntry]:
    """Every file and symlink under ``root``, keyed by relative bytes path.

    Symlinks are recorded, never followed (a link to a directory is a link, as
    in git).  Directories themselves are not entries.  Anything a patch cannot
    carry (device, FIFO, socket) is refused with the path named, rather than
    silently left out of a personality.
    """
    root_b = os.fsencode(root)
    try:
        st = os.stat(root_b)
    except OSError as exc:
        raise DiffError(f"{os.fsdecode(root_b)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DiffError(f"{os.fsdecode(root_b)}: not a directory")
    entries: dict[bytes, TreeEntry] = {}
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        here = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            with os.scandir(here) as it:
                items = list(it)
        except OSError as exc:
            raise DiffError(f"{os.fsdecode(here)}: {exc.strerror}") from None
        for item in items:
            rel = rel_dir + b"/" + item.name if rel_dir else item.name
            try:
                est = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    stack.append(rel)
                elif stat.S_ISLNK(est.st_mode):
                    entries[rel] = TreeEntry(MODE_LINK, os.readlink(item.path))
                elif stat.S_ISREG(est.st_mode):
                    with open(item.path, "rb") as fh:
                        entries[rel] = TreeEntry(git_mode(est.st_mode), fh.read())
                else:
                    raise DiffError(
                        f"{os.fsdecode(item.path)}: a {_kind(est.st_mode)} cannot be carried in a patch"
                    )
            except OSError as exc:
                raise DiffError(f"{os.fsdecode(item.path)}: {exc.strerror}") from None
    return entries


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return f"file of mode {mode:o}"


def diff_trees(old: Path | str, new: Path | str, *, context: int = 3) -> bytes:
    """One git-style unified patch that turns tree ``old`` into tree ``new``.

    Both ``patch -p1`` and ``git apply`` run inside a copy of ``old`` reproduce
    ``new`` from it (binary files excepted for GNU patch, which cannot read
    git binary patches).  Empty output means the trees are equal as far as a
    patch can tell (file contents, the executable bit, symlink targets).
    With ``context=0`` git needs ``git apply --unidiff-zero``, as for any
    context-free diff.
    """
    return diff_entries(read_tree(old), read_tree(new), context=context)
