"""Why a hunk did not fit, and the human rendering of a patch result.

A failed hunk is only useful to an admin with the evidence next to it: what
the patch expected, where it looked, and what the file holds at the place
that comes closest.  The closest place is found by letting every file line
that equals an expected line vote for the start position that would align
them (cheap, even for large files), then scoring the few best candidates
with :mod:`difflib` (which, unlike aligned counting, forgives a line
inserted or removed inside the hunk).  Only run for hunks that failed, so a
successful boot never imports difflib.
"""
from __future__ import annotations

from .model import FileResult, Hunk, HunkResult, PatchResult, show

#: Candidates (by aligned votes) scored with difflib.
_CANDIDATES = 5
#: Width of each column of the side-by-side rendering.
_COLUMN = 44


def diagnose_hunk(lines: list[bytes], hunk: Hunk, result: HunkResult) -> None:
    """Fill ``result.expected`` and ``result.best`` for a hunk that did not fit ``lines``."""
    pattern = hunk.old_lines
    result.expected = [(hunk.first + k, line) for k, line in enumerate(pattern)]
    if not pattern or not lines:
        result.best = {"line": None, "similarity": 0.0, "matching_lines": 0, "found": []}
        return
    guess = (result.tried or {}).get("line", hunk.first) - 1
    m, n = len(pattern), len(lines)
    where_in_pattern: dict[bytes, list[int]] = {}
    for k, line in enumerate(pattern):
        where_in_pattern.setdefault(line, []).append(k)
    votes: dict[int, int] = {}
    for idx, line in enumerate(lines):
        ks = where_in_pattern.get(line)
        if ks:
            for k in ks:
                start = idx - k
                votes[start] = votes.get(start, 0) + 1
    if not votes:
        votes[max(0, min(guess, n - 1))] = 0
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], abs(kv[0] - guess), kv[0]))[:_CANDIDATES]

    from difflib import SequenceMatcher

    best = None
    for start, count in ranked:
        lo, hi = max(start, 0), min(start + m, n)
        window = lines[lo:hi]
        ratio = SequenceMatcher(None, pattern, window, autojunk=False).ratio()
        key = (round(ratio, 6), count, -abs(start - guess))
        if best is None or key > best[0]:
            best = (key, lo, hi, count, ratio)
    assert best is not None
    _, lo, hi, count, ratio = best
    result.best = {
        "line": lo + 1,
        "similarity": round(ratio, 3),
        "matching_lines": count,
        "found": [(lo + 1 + k, line) for k, line in enumerate(lines[lo:hi])],
    }


# --------------------------------------------------------------------------- rendering


def _cell(text: str, width: int) -> str:
    text = text.expandtabs(4)
    if len(text) > width:
        return text[: width - 1] + "…"
    return text.ljust(width)


def render_hunk(hunk: HunkResult, indent: str = "    ") -> list[str]:
    """The lines describing one failed hunk: where it was tried, the best place, side by side."""
    out = [f"{indent}hunk #{hunk.number} {hunk.header}: FAILED ({hunk.reason})"]
    tried = hunk.tried or {}
    if tried:
        out.append(f"{indent}  expected at line {tried.get('line')}; searched lines "
                   f"{tried.get('from_line')}-{tried.get('to_line')} with fuzz up to {tried.get('max_fuzz')}")
    best = hunk.best
    expected = hunk.expected or []
    if best and best.get("line") is not None:
        shift = best["line"] - tried.get("line", best["line"])
        out.append(f"{indent}  closest place: line {best['line']} ({shift:+d} lines), "
                   f"{best['similarity'] * 100:.0f}% similar, {best['matching_lines']} of "
                   f"{len(expected)} lines in place")
    elif expected:
        out.append(f"{indent}  closest place: none (the file is empty or shares no line with the hunk)")
    found = best["found"] if best else []
    if expected or found:
        num = max([len(str(n)) for n, _ in expected + found] + [4])
        width = _COLUMN
        out.append(f"{indent}  {'line'.rjust(num)}  {_cell('expected (patch, old side)', width)}   "
                   f"{'line'.rjust(num)}  found (file)")
        for k in range(max(len(expected), len(found))):
            e = expected[k] if k < len(expected) else None
            f = found[k] if k < len(found) else None
            mark = "=" if e and f and e[1] == f[1] else "!" if e and f else " "
            left = f"{str(e[0]).rjust(num)}  {_cell(show(e[1]), width)}" if e else " " * (num + 2 + width)
            right = f"{str(f[0]).rjust(num)}  {show(f[1])}" if f else ""
            out.append(f"{indent}  {left} {mark} {right}".rstrip())
    return out


def _describe_file(f: FileResult, hypothetical: bool) -> str:
    verbs = {"modify": "modified", "create": "created", "delete": "deleted", "rename": "renamed",
             "copy": "copied"}
    what = verbs.get(f.action, f.action)
    if hypothetical:
        what = f"would be {what}"
    name = f.path
    if f.action in ("rename", "copy"):
        name = f"{f.old_path} -> {f.new_path}"
    notes = []
    if f.kind != "file":
        notes.append(f.kind)
    if f.old_mode != f.new_mode and f.new_mode and f.old_mode:
        notes.append(f"mode {f.old_mode} -> {f.new_mode}")
    shifted = [h for h in f.hunks if h.status == "applied" and (h.offset or h.fuzz)]
    for h in shifted:
        bits = []
        if h.offset:
            bits.append(f"offset {h.offset:+d}")
        if h.fuzz:
            bits.append(f"fuzz {h.fuzz}")
        notes.append(f"hunk #{h.number} at line {h.new_line} ({', '.join(bits)})")
    if f.hunks:
        notes.insert(0, f"{len(f.hunks)} hunk{'s' if len(f.hunks) != 1 else ''}")
    if f.status == "unchanged":
        what = "unchanged (already as the patch makes it)"
    elif f.status == "already-applied":
        what = "already applied"
    return f"  {name}: {what}" + (f" ({'; '.join(notes)})" if notes else "")


def render_result(result: PatchResult) -> str:
    """The human rendering of a whole patch result (``supercharge patch apply``)."""
    lines: list[str] = []
    if result.status == "applied":
        head = "would apply cleanly (dry run, nothing written)" if result.dry_run else "applied"
    elif result.status == "already-applied":
        head = "already applied: the tree already has every change, nothing to do"
    else:
        head = "FAILED: nothing was changed"
    lines.append(f"{result.source}: {head}")
    if result.message:
        lines.append(f"  {result.message}")
    for f in result.files:
        if f.status != "failed":
            if result.status != "already-applied":
                lines.append(_describe_file(f, result.dry_run or result.status == "failed"))
            continue
        lines.append(f"  {f.path}: FAILED ({f.reason}): {f.message}")
        for h in f.hunks:
            if h.status != "applied":
                lines += render_hunk(h)
    if result.status == "already-applied":
        lines.append(f"  {len(result.files)} file{'s' if len(result.files) != 1 else ''} checked")
    return "\n".join(lines)
