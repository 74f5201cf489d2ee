"""Where each hunk goes in a file, and the file that results: GNU patch 2.7.6's rules.

The point is byte-identical results to ``patch -p1 --fuzz 2`` on the same
input, including where a drifted file makes placement ambiguous, so this
follows GNU patch's algorithm step by step rather than inventing a nicer one:

* a hunk is first tried at the line it states, shifted by the offset the
  previous hunk of the same file needed (``in_offset``);
* then at offsets 1, 2, 3... from there, each offset first forward then
  backward, never before the last line an earlier hunk changed and never
  past the end of the file (``locate_hunk``);
* if it fits nowhere, again with fuzz 1, then 2 (at most the hunk's own
  context): fuzz N ignores up to N context lines at each end.  A hunk with
  less context at its start than at its end was made at the start of the
  file and may only match there (likewise at the end), until the fuzz
  exceeds the missing context;
* context lines are never rewritten: the file's own lines stay, only ``-``
  lines are dropped and ``+`` lines inserted (``apply_hunk``).

A hunk that fits nowhere is skipped and the next one placed as if it had not
been there, so every failed hunk of a file is reported, as GNU patch reports
them.  Pure functions of (lines, hunks): no file-system access here.
"""
from __future__ import annotations

from .model import Hunk, HunkResult, applied_hunk
from .parse import split_lines


class FilePlacer:
    """Applies the hunks of one file to its lines, keeping GNU patch's state.

    ``lines`` are the file's lines with their endings (``split_lines``).
    State mirrors GNU patch: ``last_frozen`` is the number of input lines
    already copied or deleted, ``in_offset``/``out_offset`` the shifts between
    the patch's line numbers and the input/output files.
    """

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.n = len(lines)
        self.out: list[bytes] = []
        self.last_frozen = 0
        self.after_newline = True
        self.in_offset = 0
        self.out_offset = 0

    # -- placement

    def matches(self, pos: int, hunk: Hunk, prefix_fuzz: int, suffix_fuzz: int) -> bool:
        """Does the old side, less the fuzzed context, equal the file at line ``pos``?"""
        lo = prefix_fuzz
        hi = len(hunk.old_lines) - suffix_fuzz
        if hi <= lo:
            return True
        s = pos - 1 + lo
        e = pos - 1 + hi
        if s < 0 or e > self.n:
            return False  # lines outside the file are empty: never equal to a patch line
        lines = self.lines
        pat = hunk.old_lines
        if lines[s] != pat[lo]:
            return False
        return lines[s:e] == pat[lo:hi]

    def locate(self, hunk: Hunk, fuzz: int) -> int:
        """GNU ``locate_hunk``: the 1-based line where the hunk fits, or 0."""
        first_guess = hunk.first + self.in_offset
        pat_lines = len(hunk.old_lines)
        prefix_context = hunk.prefix_context
        suffix_context = hunk.suffix_context
        context = max(prefix_context, suffix_context)
        prefix_fuzz = fuzz + prefix_context - context
        suffix_fuzz = fuzz + suffix_context - context
        max_where = self.n - (pat_lines - suffix_fuzz) + 1
        min_where = self.last_frozen + 1
        max_pos_offset = max_where - first_guess
        max_neg_offset = first_guess - min_where
        max_offset = max(max_pos_offset, max_neg_offset)

        if not pat_lines:  # an insertion without context fits where it says
            return first_guess
        if first_guess <= max_neg_offset:  # never before line 1
            max_neg_offset = first_guess - 1

        if prefix_fuzz < 0 and hunk.first <= 1:
            # Less context at the start than at the end: made at the start of the file.
            if suffix_fuzz < 0 and (pat_lines != self.n or prefix_context < self.last_frozen):
                return 0  # ... and at its end: only the whole file will do
            offset = 1 - first_guess
            if (self.last_frozen <= prefix_context and offset <= max_pos_offset
                    and self.matches(first_guess + offset, hunk, 0, suffix_fuzz)):
                self.in_offset += offset
                return first_guess + offset
            return 0
        if prefix_fuzz < 0:
            prefix_fuzz = 0

        if suffix_fuzz < 0:
            # Less context at the end: made at the end of the file, so only there.
            offset = first_guess - (self.n - pat_lines + 1)
            if offset <= max_neg_offset and self.matches(first_guess - offset, hunk, prefix_fuzz, 0):
                self.in_offset -= offset
                return first_guess - offset
            return 0

        if max_pos_offset < 0:
            min_offset = first_guess - max_where
        elif max_neg_offset < 0:
            min_offset = first_guess - min_where
        else:
            min_offset = 0
        matches = self.matches
        for offset in range(min_offset, max_offset + 1):
            if offset <= max_pos_offset and matches(first_guess + offset, hunk, prefix_fuzz, suffix_fuzz):
                self.in_offset += offset
                return first_guess + offset
            if offset <= max_neg_offset and matches(first_guess - offset, hunk, prefix_fuzz, suffix_fuzz):
                self.in_offset -= offset
                return first_guess - offset
        return 0

    # -- output

    def copy_till(self, lastline: int) -> bool:
        """Copy input lines up to ``lastline`` (1-based) to the output; False if already past it."""
        lf = self.last_frozen
        if lf > lastline:
            return False  # GNU: "misordered hunks! output would be garbled"
        if lf < lastline:
            hi = min(lastline, self.n)
            if lf < hi:
                if not self.after_newline:
                    self.out.append(b"\n")
                self.out.extend(self.lines[lf:hi])
                self.after_newline = self.lines[hi - 1].endswith(b"\n")
            self.last_frozen = lastline
        return True

    def apply_hunk(self, hunk: Hunk, where: int, fuzz: int = 0) -> bool:
        """GNU ``apply_hunk``: drop ``-`` lines, insert ``+`` lines, keep the file's context."""
        old_lines, new_lines = hunk.old_lines, hunk.new_lines
        if (fuzz == 0 and self.after_newline and (not old_lines or old_lines[-1].endswith(b"\n"))
                and (not new_lines or new_lines[-1].endswith(b"\n"))):
            # Every line of the old side matched, so the new side's context lines
            # are the file's own: the walk below comes down to this (same result).
            prefix, suffix = hunk.prefix_context, hunk.suffix_context
            if not self.copy_till(where - 1 + prefix):
                return False
            self.out.extend(new_lines[prefix:len(new_lines) - suffix])
            self.last_frozen = where - 1 + len(old_lines) - suffix
            self.out_offset += len(new_lines) - len(old_lines)
            return True
        old_kinds, new_kinds = hunk.old_kinds, hunk.new_kinds
        out = self.out
        base = where - 1
        n_old, n_new = len(old_kinds), len(new_kinds)
        old = new = 0
        while old < n_old:
            if old_kinds[old] == "-":
                if not self.copy_till(base + old):
                    return False
                self.last_frozen += 1
                old += 1
            elif new >= n_new:
                break
            elif new_kinds[new] == "+":
                if not self.copy_till(base + old):
                    return False
                line = new_lines[new]
                out.append(line)
                self.after_newline = line.endswith(b"\n")
                new += 1
            else:
                old += 1
                new += 1
        if new < n_new and new_kinds[new] == "+":
            if not self.copy_till(base + old):
                return False
            while new < n_new and new_kinds[new] == "+":
                if not self.after_newline:
                    out.append(b"\n")
                line = new_lines[new]
                out.append(line)
                self.after_newline = line.endswith(b"\n")
                new += 1
        self.out_offset += len(new_lines) - len(hunk.old_lines)
        return True

    def finish(self) -> bytes:
        """Copy the rest of the input and return the patched content."""
        self.copy_till(self.n)
        return b"".join(self.out)

    # -- one hunk, start to end

    def place_exact(self, hunk: Hunk, *, creating: bool = False, input_size: int = 0) -> HunkResult:
        """Apply ``hunk`` only if it fits at the line it states, without fuzz (no search)."""
        first_guess = hunk.first + self.in_offset
        pat_lines = len(hunk.old_lines)
        fits = first_guess > self.last_frozen and (
            not pat_lines or (first_guess <= self.n - pat_lines + 1
                              and self.matches(first_guess, hunk, 0, 0)))
        if fits and not (first_guess == 1 and creating and input_size):
            new_line = first_guess + self.out_offset
            if self.apply_hunk(hunk, first_guess, 0):
                return HunkResult(hunk.number, hunk.header, "applied", first_guess, new_line,
                                  self.in_offset, 0)
        return _not_at_stated_line(hunk, first_guess + self.out_offset, self.in_offset)

    def place(self, hunk: Hunk, max_fuzz: int, *, creating: bool = False,
              input_size: int = 0) -> HunkResult:
        """Locate and apply ``hunk`` (fuzz 0 up to ``max_fuzz``); the result either way."""
        context = max(hunk.prefix_context, hunk.suffix_context)
        limit = min(max_fuzz, context)
        where = 0
        fuzz = 0
        # The common case first: the hunk is exactly where it says.  This is the
        # first place locate() would try when the context is balanced and the
        # stated line is inside the search range, so the result is the same.
        first_guess = hunk.first + self.in_offset
        pat_lines = len(hunk.old_lines)
        if (pat_lines and hunk.prefix_context == hunk.suffix_context
                and self.last_frozen < first_guess <= self.n - pat_lines + 1
                and self.lines[first_guess - 1:first_guess - 1 + pat_lines] == hunk.old_lines):
            where = first_guess
        else:
            while True:
                where = self.locate(hunk, fuzz)
                if where or fuzz >= limit:
                    break
                fuzz += 1
        new_line = (where if where else hunk.first) + self.out_offset
        ok = bool(where)
        reason = None
        if ok and where == 1 and creating and input_size:
            ok, reason = False, "the file already exists and is not empty"
        elif ok and not self.apply_hunk(hunk, where, fuzz):
            ok, reason = False, "it would overlap a change made by an earlier hunk"
        if ok:
            return HunkResult(hunk.number, hunk.header, "applied", line=where, new_line=new_line,
                              offset=self.in_offset, fuzz=fuzz)
        pat_lines = len(hunk.old_lines)
        first_guess = hunk.first + self.in_offset
        lo = self.last_frozen + 1
        hi = max(lo, self.n - max(pat_lines - limit, 0) + 1)
        return HunkResult(
            hunk.number, hunk.header, "failed", line=None, new_line=new_line,
            offset=self.in_offset, fuzz=0,
            reason=reason or "its old lines are not in the file",
            tried={"line": first_guess, "from_line": lo, "to_line": hi, "max_fuzz": limit})


def place_hunks(content: bytes, hunks: list[Hunk], max_fuzz: int, *, lines: list[bytes] | None = None,
                creating: bool = False, input_size: int = 0, stop_on_failure: bool = False,
                exact_only: bool = False, plain_lines: bool = False) -> tuple[bytes, list[HunkResult]]:
    """Apply ``hunks`` to ``content`` as GNU patch would; the output and one result per hunk.

    The output is meaningful only if every hunk applied.  ``lines`` is
    ``split_lines(content)`` if the caller already has it; ``stop_on_failure``
    returns at the first hunk that does not fit (a yes/no question, such as
    "is the reverse applied?", needs no more); ``exact_only`` tries each hunk
    only at the line it states (shifted by earlier hunks), without fuzz;
    ``plain_lines`` says that every line of every hunk ends with a newline
    (:attr:`FilePatch.plain_lines`), which then is not checked hunk by hunk.

    Most hunks of a large patch fit exactly where they say.  Those are matched
    and copied as byte ranges of ``content``, so a file is not cut into
    hundreds of thousands of line objects only to be joined again; the first
    hunk that needs more (an offset, fuzz, a missing newline) has the file
    split once, and GNU's line-based placement goes on from the same state.
    """
    results: list[HunkResult] = []
    out: list[bytes] = []
    frozen = pos = out_offset = in_offset = taken = 0
    # A hunk's trailing context is copied out with it and passed over in the input (``lag``
    # lines beyond ``frozen``, GNU's last_frozen_line, which does not include them): the next
    # hunk is searched for after it.  Where GNU's search could still find that hunk inside
    # those lines (overlapping hunks), or another way of placing it follows, they are taken
    # back first (_take_back): then input and output stand exactly at ``frozen`` again.
    lag = 0
    if lines is None:
        avg = _average_line(content)
        find, count, startswith = content.find, content.count, content.startswith
        append, extend = out.append, out.extend
        # The file's text between hunks goes out as views: copied once, by the final join.
        view = memoryview(content)
        record, applied = results.append, applied_hunk
        for h in hunks:
            old_lines, new_lines = h.old_lines, h.new_lines
            if not old_lines or not (plain_lines or (old_lines[-1][-1:] == b"\n" and (
                    not new_lines or new_lines[-1][-1:] == b"\n"))):
                break
            prefix, suffix, first = h.prefix_context, h.suffix_context, h.first
            first_guess = first + in_offset
            old = b"".join(old_lines)
            if exact_only:
                # Only the stated line counts: walk to it, compare, no search (the
                # already-applied check asks this of text that is usually not there).
                start = _line_start(content, pos, first_guess - 1 - frozen, avg)
                if start < 0 or not startswith(old, start):
                    if stop_on_failure:  # a yes/no question: no need to split the file to answer it
                        results.append(_not_at_stated_line(h, first_guess + out_offset, in_offset))
                        return b"", results
                    break
                where = first_guess
            elif prefix == suffix or (prefix < suffix and first > 1):
                # GNU's offset search without fuzz: the nearest line-aligned place of
                # the old side (each of its lines ending in a newline, as the file's
                # must), offset 0 first, then forward before backward.  Found by a
                # substring search and one newline count over the gap, where walking
                # to the stated line first would count the same bytes and more.
                needle = old[:_NEEDLE]
                start = find(needle, pos, pos + _WINDOW)
                tries = 8  # then the text is common here: the search in GNU's order decides
                while start >= 0 and not startswith(old, start):
                    tries -= 1
                    start = find(needle, start + 1, pos + _WINDOW) if tries else -1
                if (start >= 0 and (start == 0 or content[start - 1] == 10)
                        and (where := frozen + lag + 1 + count(b"\n", pos, start)) >= first_guess
                        and (not lag or 2 * first_guess - where >= frozen + lag)):
                    # The first place from here: the stated line, or past it, and no place
                    # GNU tries before it lies in the previous hunk's trailing context.
                    pass
                else:
                    if lag:
                        pos -= _take_back(out, lag)
                        lag = 0
                    # One before the stated line (or none nearby): the search in GNU's order.
                    found = _nearest(content, old, pos, frozen + 1, first_guess)
                    if found is _TOO_COMMON:
                        # Very common text: only the stated line is checked here; the
                        # line-based search decides the rest.
                        start = _line_start(content, pos, first_guess - 1 - frozen, avg)
                        found = (first_guess, start) if start >= 0 and startswith(old, start) else None
                    if found is None:
                        break
                    where, start = found
                in_offset = where - first  # GNU's offsets add up, found or not taken
                if creating and where == 1 and input_size:
                    break
                # The old side matched byte for byte, so the file's text there is the new
                # side's context: out go the file up to the match and the whole new side,
                # its trailing context too (the file's own text; see lag).
                if pos < start:
                    append(view[pos:start])
                extend(new_lines)
                pos = start + len(old)
                frozen = where - 1 + len(old_lines) - suffix
                lag = suffix
                record(applied((h.number, h.header_line, where, where + out_offset, in_offset)))
                out_offset += len(new_lines) - len(old_lines)
                taken += 1
                continue
            else:
                if lag:
                    pos -= _take_back(out, lag)
                    lag = 0
                if prefix < suffix:
                    # Less context before than after: made at the start of the file, fits only there.
                    if frozen or not startswith(old):
                        break
                    where, start = 1, 0
                else:
                    # Less context after: made at the end of the file, fits only there.
                    start = len(content) - len(old)
                    if start < pos or (start and content[start - 1] != 10) or not content.endswith(old):
                        break
                    where = frozen + 1 + count(b"\n", pos, start)
            in_offset = where - first
            if creating and where == 1 and input_size:
                break
            # Out go the file up to the match and the new side without its trailing
            # context, which is left in the input (the next hunk may match it).
            if pos < start:
                append(view[pos:start])
            if suffix:
                extend(new_lines[:len(new_lines) - suffix])
                pos = start + len(old) - sum(map(len, old_lines[len(old_lines) - suffix:]))
            else:
                extend(new_lines)
                pos = start + len(old)
            frozen = where - 1 + len(old_lines) - suffix
            record(applied((h.number, h.header_line, where, where + out_offset, in_offset)))
            out_offset += len(new_lines) - len(old_lines)
            taken += 1
        else:
            out.append(view[pos:])
            return b"".join(out), results
        if lag:
            _take_back(out, lag)
        lines = split_lines(content)
    placer = FilePlacer(lines)
    placer.out = out
    placer.last_frozen = frozen
    placer.out_offset = out_offset
    placer.in_offset = in_offset
    n = len(lines)
    for h in hunks[taken:] if taken else hunks:
        # Inline fast path: a balanced hunk that fits exactly where it says, all
        # lines ending in a newline.  Same state changes as place() -> locate()
        # -> apply_hunk() take for it.
        old_lines, new_lines = h.old_lines, h.new_lines
        first_guess = h.first + placer.in_offset
        pat_lines = len(old_lines)
        prefix = h.prefix_context
        if (pat_lines and prefix == h.suffix_context and placer.after_newline
                and placer.last_frozen < first_guess <= n - pat_lines + 1
                and lines[first_guess - 1:first_guess - 1 + pat_lines] == old_lines
                and old_lines[-1][-1:] == b"\n" and (not new_lines or new_lines[-1][-1:] == b"\n")
                and not (creating and first_guess == 1 and input_size)):
            new_line = first_guess + placer.out_offset
            lf = placer.last_frozen
            hi = first_guess - 1 + prefix
            if lf < hi:
                out.extend(lines[lf:hi])
            out.extend(new_lines[prefix:len(new_lines) - prefix])
            placer.last_frozen = first_guess - 1 + pat_lines - prefix
            placer.out_offset += len(new_lines) - pat_lines
            results.append(applied_hunk((h.number, h.header_line, first_guess, new_line, placer.in_offset)))
            continue
        if exact_only:
            result = placer.place_exact(h, creating=creating, input_size=input_size)
        else:
            result = placer.place(h, max_fuzz, creating=creating, input_size=input_size)
        results.append(result)
        if stop_on_failure and result.status != "applied":
            return b"", results
    return placer.finish(), results


def stands_at(content: bytes, side: list[bytes], line: int) -> bool | None:
    """Do the lines ``side`` stand in ``content`` from line ``line`` (1-based) on?

    What an exact-only placement of one hunk whose old side is ``side``
    answers (see ``exact_only``), without setting it up; None where that
    placement would have to split the file (a line without a newline).
    """
    if not side or side[-1][-1:] != b"\n":
        return None
    start = _line_start(content, 0, line - 1, _average_line(content))
    return start >= 0 and content.startswith(b"".join(side), start)


def _average_line(content: bytes) -> int:
    """The average line length, for :func:`_line_start`'s first window: from the first
    4 KiB (the windows adapt as they go; counting newlines is ~1 ns a byte, so a
    larger sample costs more than the better guess saves)."""
    sample = content.count(b"\n", 0, 4096)
    return max(1, min(len(content), 4096) // sample) if sample else 80


def _take_back(out: list[bytes], lines: int) -> int:
    """Remove the last ``lines`` pieces of ``out`` (a hunk's trailing context); their size in bytes."""
    tail = out[-lines:]
    del out[-lines:]
    return sum(map(len, tail))


def _not_at_stated_line(hunk: Hunk, new_line: int, offset: int) -> HunkResult:
    """The result of an exact-only check that failed (see ``exact_only``)."""
    return HunkResult(hunk.number, hunk.header, "failed", None, new_line, offset, 0,
                      reason="its old lines are not at the stated line")


def _line_start(data: bytes, pos: int, k: int, avg: int) -> int:
    """The offset of the line ``k`` lines after the one starting at ``pos``; -1 past the end,
    and -1 for a negative ``k`` (a line already behind ``pos``).

    One count of newlines over a window sized from the average line length
    (a little more than needed), then a few steps back to the exact one:
    a handful of C-speed calls per hunk instead of one Python step per line.
    """
    if k < 0:
        return -1
    if k <= 3:
        for _ in range(k):
            pos = data.find(b"\n", pos) + 1
            if not pos:
                return -1
        return pos
    size = len(data)
    while True:
        window = (k + 2) * avg
        c = data.count(b"\n", pos, pos + window)
        if c < k:
            if pos + window >= size:
                return -1
            pos += window
            k -= c
            avg += avg >> 1   # longer lines than guessed
            continue
        if c - k > 8 and avg > 1:
            avg = max(1, avg * k // c)  # shorter lines than guessed: a tighter window
            continue
        p = pos + window
        for _ in range(c - k + 1):
            p = data.rfind(b"\n", pos, p)
        return p + 1



#: The stretch of a file searched at a time (see :func:`_nearest`).
_WINDOW = 24000
#: How much of a hunk's old side the common search looks for (then compared whole).
#: CPython's search skips ahead on bytes the needle lacks, so a short needle scans
#: faster; a needle this long rarely matches elsewhere first.
_NEEDLE = 48
#: What :func:`_nearest` returns for text found too often to search for this way.
_TOO_COMMON = (0, -1)


def _nearest(data: bytes, old: bytes, pos: int, line: int, first_guess: int) -> tuple[int, int] | None:
    """Where GNU's offset search (fuzz 0) puts ``old``: (line, offset), or None if nowhere.

    ``pos`` is the start of line ``line``, the first the hunk may use.  The
    search order is offset 0, +1, -1, +2, -2...: so the nearest line-aligned
    occurrence wins, the later one on a tie.  :data:`_TOO_COMMON` when the text
    occurs so often before the stated line that the line-based search is the
    better tool.
    """
    best: tuple[int, int, int] | None = None  # (distance, line, offset)
    counted = pos
    # CPython searches with a two-way algorithm, whose set-up costs more than a
    # hunk's search, once the needle reaches 100 bytes or the haystack 30,000:
    # so the first 99 bytes are searched for in windows, and the rest compared.
    needle = old[:99]
    size = len(data)
    end = min(size, pos + _WINDOW)
    at = data.find(needle, pos, end)
    seen = 0
    while True:
        if at < 0:
            if end >= size:
                break
            at = data.find(needle, end - len(needle) + 1, min(size, end + _WINDOW))
            end = min(size, end + _WINDOW)
            continue
        seen += 1
        if seen > 64:
            return _TOO_COMMON
        if (at == 0 or data[at - 1] == 10) and data.startswith(old, at):
            line += data.count(b"\n", counted, at)
            counted = at
            delta = line - first_guess
            distance = 2 * abs(delta) - (delta > 0)
            if best is None or distance < best[0]:
                best = (distance, line, at)
            if delta >= 0:
                break  # every later place is farther
        at = data.find(needle, at + 1, end)
    return None if best is None else (best[1], best[2])
