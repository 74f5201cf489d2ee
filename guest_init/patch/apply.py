"""Apply a parsed patch to a tree: all files or none, GNU patch's placement, convergence.

The order of work is what makes the guarantees hold:

1. parse the whole patch (a malformed or unsafe patch is refused before any
   file is read);
2. compute every file's new content (:class:`~.tree.Tree`), placing hunks
   as GNU patch 2.7.6 does (:mod:`.place`), and write it to a temporary
   name beside its target at once (not in a dry run): only one file's old
   and new content is in memory at a time, unless the already-applied check
   below may need the old one again;
3. decide, file by file: a file whose hunks all fit exactly (stated line,
   no fuzz) takes the patch; for any other, the reverse is tried without
   fuzz, and a file it fits (exactly, or at all where the forward patch does
   not fit) already has the patch and is left alone.  So a second boot with
   the same patch converges, even after a power cut in the middle of a
   commit, instead of failing or applying twice;
4. commit all changes at once, or report the failure with a diagnosis for
   every hunk that did not fit, having changed nothing (the temporary files
   are removed).
"""
from __future__ import annotations

import gc
import os
from operator import attrgetter
from pathlib import Path

from ..safepath import UnsafePath
from .model import (
    MODE_SYMLINK,
    S_IFMT,
    FilePatch,
    FileResult,
    Hunk,
    PatchResult,
    UnsafePatchPath,
)
from .parse import parse_patch, split_lines
from .place import place_hunks, stands_at
from .tree import CommitError, Node, Tree

_OFFSET, _FUZZ, _OLD_LINES = attrgetter("offset"), attrgetter("fuzz"), attrgetter("old_lines")


def apply_patch(patch: bytes, root: Path, *, strip: int = 1, dry_run: bool = False, fuzz: int = 2,
                source: str = "<patch>", durable: bool = True) -> PatchResult:
    """Apply the unified diff ``patch`` to the tree at ``root``, completely or not at all.

    ``strip`` is ``patch -pN``; ``fuzz`` the most context lines ignored at each
    end of a hunk (GNU patch's ``--fuzz``, default 2); ``dry_run`` computes and
    reports without writing; ``source`` names the patch in messages;
    ``durable=False`` skips flushing to disk (scratch trees only).

    Returns a :class:`PatchResult` whose ``status`` is ``applied``,
    ``already-applied`` or ``failed`` (nothing changed).  Raises
    :class:`PatchParseError` for a malformed patch and its subclass
    :class:`UnsafePatchPath` for a path that would leave ``root`` (nothing is
    written in either case), ``NotADirectoryError`` if ``root`` is not a
    directory.
    """
    if fuzz < 0:
        raise ValueError("fuzz must be 0 or more")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(20, "not a directory", str(root))
    # A large patch allocates hundreds of thousands of small objects and no
    # reference cycles: the cyclic collector would only rescan them (~15% of
    # the run time), so it is paused for the call.
    collecting = gc.isenabled()
    gc.disable()
    trees: list[Tree] = []
    try:
        return _apply(patch, root, strip, dry_run, fuzz, source, durable, trees)
    finally:
        for tree in trees:
            tree.discard()  # files staged for a commit that did not happen
        if collecting:
            gc.enable()


def _apply(patch: bytes, root: Path, strip: int, dry_run: bool, fuzz: int, source: str,
           durable: bool, trees: list[Tree]) -> PatchResult:
    files = parse_patch(patch, strip=strip, source=source)

    def result(status: str, results: list[FileResult], message: str | None = None) -> PatchResult:
        return PatchResult(status, results, source=source, root=str(root), dry_run=dry_run,
                           strip=strip, fuzz=fuzz, message=message)

    def forward_tree(files: list[FilePatch], disk: dict | None = None) -> Tree:
        tree = _tree(root, files, disk)
        if not dry_run:
            # Each new file goes to its temporary name as soon as it is computed, and a file
            # that fits exactly lets go of its old content: one file in memory at a time.
            tree.stage_early(durable)
            trees.append(tree)
        return tree

    tree = forward_tree(files)
    # Files that no other part of the patch touches are asked whether they already have
    # the patch (below) as soon as they are computed, while their old content is at hand;
    # then it is let go too.
    early: dict[int, bool] | None = {} if not dry_run and _independent(files) else None
    back = _tree(root, [], tree.disk) if early is not None else None
    forward: list[FileResult] = []
    conclusive: list[bool] = []
    for k, fp in enumerate(files):
        f = _apply_file(fp, tree, fuzz, source)
        forward.append(f)
        conclusive.append(f.status != "failed" and _conclusive(fp, f))
        if conclusive[k] and not dry_run and fp.old_path is not None:
            # Not patched yet, so the already-applied check will not ask for the old content.
            tree.let_go(tree.key(fp.old_path, follow=_follows_source(fp)))
        if early is not None and f.status != "failed" and not conclusive[k]:
            key = tree.key(fp.old_path, follow=True)  # type: ignore[arg-type]
            old = tree.disk.get(key)
            if old is not None and old.content is not None and _not_applied_yet(fp, old.content):
                early[k] = False
            else:
                early[k] = _holds_patch(fp, f, back, root, source, tree.disk)  # type: ignore[arg-type]
            tree.let_go(key)
    if early is not None and len(tree.current) != len(files):
        early = None  # two names for one file (through a symlink): asked in order below
    forward_ok = all(f.status != "failed" for f in forward)
    if forward_ok and not tree.changes():
        for f in forward:
            f.status = "unchanged"
        return result("already-applied", forward, "every file is already as the patch makes it")
    if not all(conclusive):
        already = _already_applied(files, forward, conclusive, root, source, tree.disk, early)
        if all(already):
            for f in forward:
                _mark_already(f)
            return result("already-applied", forward,
                          "the reverse of the patch fits without fuzz: it was applied before")
        if any(already):
            # Some files have the patch, the others not (a commit cut short by a power
            # cut, or changes made by hand): apply it to the others, so the tree converges.
            tree.discard()
            tree = forward_tree([fp for fp, done in zip(files, already) if not done], tree.disk)
            forward = []
            for fp, done in zip(files, already):
                if done:
                    forward.append(_mark_already(_file_result(fp)))
                else:
                    forward.append(_apply_file(fp, tree, fuzz, source))
            forward_ok = all(f.status != "failed" for f in forward)
    if not forward_ok:
        failed = sum(f.status == "failed" for f in forward)
        return result("failed", forward, f"{failed} of {len(forward)} file(s) did not fit; "
                                         "nothing was changed")
    if not tree.changes():
        return result("already-applied", forward, "every file is already as the patch makes it")
    conflicts = tree.conflicts()
    if conflicts:
        for key, problem in conflicts:
            for f in forward:
                if key in (f.path, f.new_path, f.old_path):
                    f.status, f.reason, f.message = "failed", "conflict", f"{key}: {problem}"
        return result("failed", forward, "; ".join(f"{k}: {p}" for k, p in conflicts)
                      + "; nothing was changed")
    if not dry_run:
        try:
            tree.commit(durable)
        except CommitError as exc:
            for f in forward:
                if exc.path in (f.path, f.new_path, f.old_path):
                    f.status, f.reason, f.message = "failed", "write-error", exc.problem
            return result("failed", forward, f"writing {exc.path} failed ({exc.problem}); "
                                             "nothing was changed")
    return result("applied", forward)


def _tree(root: Path, files: list[FilePatch], disk: dict | None = None) -> Tree:
    """A view of ``root`` for ``files``: paths below what they delete or create are literal.

    A patch's paths describe the tree before it; below a path the patch
    deletes (a symlink turning into a directory) or creates (a directory
    turning into a symlink, already done by an earlier run), the disk's
    symlinks are not what the patch means, so they are not followed.
    """
    tree = Tree(root, disk)
    tree.vanishing = ({fp.old_path for fp in files if fp.action in ("delete", "rename") and fp.old_path}
                      | {fp.new_path for fp in files
                         if fp.action in ("create", "rename", "copy") and fp.new_path})
    return tree


def _already_applied(files: list[FilePatch], forward: list[FileResult], conclusive: list[bool],
                     root: Path, source: str, disk: dict, known: dict[int, bool] | None = None) -> list[bool]:
    """Which files already hold the patch's result: their reverse fits without fuzz.

    Where the forward patch fits (only with an offset or fuzz), the reverse
    must fit exactly at the stated lines to win: that is the tree a previous
    application leaves, and a merely similar place must not stop a patch that
    GNU patch would apply.  Where the forward patch does not fit at all, the
    reverse may fit at an offset.  ``known``: the answers already found for
    files independent of the others (see :func:`_independent`).
    """
    back = _tree(root, [_reversed(fp, hunks=False) for fp in files], disk)
    out = [False] * len(files)
    for i in reversed(range(len(files))):
        if conclusive[i]:
            continue
        if known is not None and i in known:
            out[i] = known[i]
            continue
        # (also keeps ``back`` in step for the files before: the reverse goes in reverse order)
        out[i] = _holds_patch(files[i], forward[i], back, root, source, disk)
    return out


def _holds_patch(fp: FilePatch, forward: FileResult, back: Tree, root: Path, source: str,
                 disk: dict) -> bool:
    """Does the file of ``fp`` already hold the patch (see :func:`_already_applied`)?"""
    fits_forward = forward.status != "failed"
    r = _apply_file(_reversed(fp), back, 0, source, quick=True, exact_only=fits_forward,
                    round_trip=fp.hunks)
    verdict = _hash_verdict(fp, root, disk)
    if verdict is not None:  # git's blob hashes settle it where the file matches one side
        return verdict
    if fp.action != "delete" and _has_hashes(fp) and any(not h.new_lines for h in fp.hunks):
        # A reversed hunk without old lines fits anywhere in a file that stays;
        # drifted from both sides of a hashed patch, such a file is not patched.
        return False
    return r.status != "failed" and (_exact(r) or not fits_forward)


def _not_applied_yet(fp: FilePatch, content: bytes) -> bool:
    """True if ``content`` surely lacks the patch: its first hunk's new side is not at the line it states.

    For a file whose hunks fit (with an offset or fuzz), :func:`_holds_patch`
    asks the whole reverse to fit exactly at the stated lines, starting with
    the first hunk; where that one does not, the answer is no.  Asked
    directly, without setting up the reverse patch and a second view of the
    file: a tree that drifted from the patch's base (every hunk at an offset)
    asks this of every file.  False means "ask :func:`_holds_patch`": a hunk
    without new lines fits anywhere, and git's blob hashes may overrule the
    lines.
    """
    if _has_hashes(fp) or not fp.hunks or not fp.hunks[0].new_lines:
        return False
    first = fp.hunks[0]
    there = stands_at(content, first.new_lines, first.new_start)
    if there is None:  # a line without a newline: as the placement itself decides
        _, results = place_hunks(content, [first.reversed()], 0, stop_on_failure=True, exact_only=True)
        there = results[0].status == "applied"
    return not there


def _independent(files: list[FilePatch]) -> bool:
    """Does each file patch change its own regular file's content, touched by no other?

    Then whether one file already has the patch does not depend on the
    others, and can be asked as soon as the file is computed.  (Two names for
    one file through a symlink are only seen once the names are resolved.)
    """
    seen: set[str | None] = set()
    for fp in files:
        if (fp.action != "modify" or fp.old_path != fp.new_path or len(fp.alternatives) > 1
                or fp.binary is not None or fp.binary_problem is not None or fp.old_path in seen
                or _is_link_mode(fp.old_mode) or _is_link_mode(fp.new_mode)):
            return False
        seen.add(fp.old_path)
    return True


def _has_hashes(fp: FilePatch) -> bool:
    return bool(fp.old_hash and fp.new_hash and len(fp.old_hash) >= 7 and len(fp.new_hash) >= 7)


def _hash_verdict(fp: FilePatch, root: Path, disk: dict) -> bool | None:
    """True if the file is the patch's new version by git blob hash, False if the old one, else None.

    Only for git patches (their ``index`` line) changing a file's content in
    place; the file is read again (it is small next to the patch it came with).
    """
    if not _has_hashes(fp) or fp.action not in ("modify", "create") or fp.new_path is None:
        return None
    from .binary import blob_hash

    tree = Tree(root, disk)
    try:
        node = tree.get(tree.key(fp.new_path, follow=not fp.is_symlink))
    except (UnsafePath, OSError):
        return None
    if node is None or node.kind not in ("file", "symlink"):
        return None
    digest = blob_hash(node.content)
    new_ok = digest.startswith(fp.new_hash)  # type: ignore[arg-type]
    old_ok = digest.startswith(fp.old_hash) if fp.action != "create" else False  # type: ignore[arg-type]
    if new_ok == old_ok:
        return None
    if new_ok and fp.mode_changed and node.kind == "file" and fp.new_mode is not None:
        return bool(node.mode & 0o111) == bool(fp.new_mode & 0o111)
    return new_ok


def _mark_already(f: FileResult) -> FileResult:
    """Report ``f`` as already applied (its hunks were not placed: nothing to say about them)."""
    f.status, f.reason, f.message, f.hunks = "already-applied", None, None, []
    return f


def _file_result(fp: FilePatch) -> FileResult:
    symlink = _is_link_mode(fp.old_mode) or _is_link_mode(fp.new_mode)
    return FileResult(path=fp.path, action=fp.action, status="applied", old_path=fp.old_path,
                      new_path=fp.new_path, old_mode=_mode_text(fp.old_mode),
                      new_mode=_mode_text(fp.new_mode),
                      kind="binary" if fp.binary is not None or fp.binary_problem else
                      "symlink" if symlink else "file")


def _exact(f: FileResult) -> bool:
    """True if every hunk fit at the line it states, without fuzz (C-level maps: a large
    patch has ten thousand hunks)."""
    return not any(map(_OFFSET, f.hunks)) and not any(map(_FUZZ, f.hunks))


def _conclusive(fp: FilePatch, f: FileResult) -> bool:
    """Does ``f`` (not failed) show that the file is not patched yet?

    A file whose hunks all fit exactly where they say, each with old lines to
    match, is not patched yet.  Anything less (an offset, fuzz, or a hunk
    without old lines, which fits anywhere and twice) could also mean a
    patched file: the reverse decides.
    """
    return _exact(f) and all(map(_OLD_LINES, fp.hunks))


def _reversed(fp: FilePatch, hunks: bool = True) -> FilePatch:
    """The file patch that undoes ``fp`` (to recognise a tree that already has it).

    ``hunks=False`` leaves the hunks out (only the paths are needed).
    """
    action = {"create": "delete", "delete": "create"}.get(fp.action, fp.action)
    old_path, new_path = fp.new_path, fp.old_path
    if fp.action == "copy":  # undoing a copy is checking the copy; the source is untouched
        action, old_path = "modify", fp.new_path
        new_path = fp.new_path
    return FilePatch(
        old_path=old_path, new_path=new_path, action=action, line=fp.line, git=fp.git,
        old_mode=fp.new_mode, new_mode=fp.old_mode,
        hunks=_ReversedHunks(fp.hunks) if hunks else [],  # type: ignore[arg-type]
        similarity=fp.similarity, mode_changed=fp.mode_changed, old_hash=fp.new_hash,
        new_hash=fp.old_hash, binary=fp.binary_reverse, binary_reverse=fp.binary,
        binary_problem=fp.binary_problem, alternatives=fp.alternatives)


class _ReversedHunks:
    """``[h.reversed() for h in hunks]``, made one hunk at a time as they are used.

    The already-applied check usually stops at a file's first hunk; reversing
    the ten thousand hunks of a large patch up front would cost more than it.
    """

    def __init__(self, hunks: list[Hunk]) -> None:
        self._hunks = hunks
        self._done: dict[int, Hunk] = {}

    def __len__(self) -> int:
        return len(self._hunks)

    def __bool__(self) -> bool:
        return bool(self._hunks)

    def __getitem__(self, k: int | slice) -> Hunk | list[Hunk]:  # type: ignore[override]
        if isinstance(k, slice):  # placement hands the rest of a file's hunks on as a slice
            return [self[i] for i in range(*k.indices(len(self._hunks)))]  # type: ignore[misc]
        if k not in self._done:
            self._done[k] = self._hunks[k].reversed()
        return self._done[k]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[k] for k in range(len(self._hunks)))


def _mode_text(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:06o}"


def _is_link_mode(mode: int | None) -> bool:
    return mode is not None and mode & S_IFMT == MODE_SYMLINK


def _link_escapes(key: str, target: bytes) -> bool:
    """Does symlink ``key -> target`` climb above the root (judged from the text alone)?

    Absolute targets mean the guest's ``/``, i.e. the root, so only ``..``
    beyond the top counts; symlinks met on the way are checked again by
    :func:`resolve_in_root` whenever a path is resolved through the link.
    """
    text = os.fsdecode(target)
    parts = [] if text.startswith("/") else key.split("/")[:-1]
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return True
            parts.pop()
        else:
            parts.append(part)
    return False


def _choose_plain_name(fp: FilePatch, tree: Tree, source: str) -> str:
    """GNU patch's choice between differing ``---``/``+++`` names: the existing one,
    preferring fewer path components, then the shorter base name, then the shorter name."""
    existing = []
    for name in fp.alternatives:
        try:
            key = tree.key(name, follow=True)
        except UnsafePath:
            continue
        if tree.get(key) is not None:
            existing.append(name)
    if not existing:
        return fp.alternatives[0]
    return min(existing, key=lambda p: (p.count("/"), len(p.rpartition("/")[2]), len(p)))


def _apply_file(fp: FilePatch, tree: Tree, max_fuzz: int, source: str, *,
                quick: bool = False, exact_only: bool = False,
                round_trip: list[Hunk] | None = None) -> FileResult:
    """Compute one file's change into ``tree``; the result says how (or why not).

    ``quick``: stop at the first hunk that does not fit and skip the diagnosis
    (for the already-applied check, which only needs a yes or no);
    ``exact_only``: hunks may only fit at the lines they state, without fuzz;
    ``round_trip``: the hunks that undo ``fp``'s; they must turn the result back
    into the content exactly, else ``fp`` does not count as fitting (a hunk
    without old lines fits anywhere, so fitting alone proves nothing); they
    are held to the same rule as ``fp`` (``exact_only``, else offsets too).
    """
    symlink = _is_link_mode(fp.old_mode) or _is_link_mode(fp.new_mode)
    res = _file_result(fp)

    def fail(reason: str, message: str) -> FileResult:
        res.status, res.reason, res.message = "failed", reason, message
        return res

    if fp.binary_problem:
        return fail("binary-unsupported", fp.binary_problem)
    if fp.action == "modify" and len(fp.alternatives) > 1:
        chosen = _choose_plain_name(fp, tree, source)
        fp.old_path = fp.new_path = chosen
        res.path = res.old_path = res.new_path = chosen

    # Where the file is: a regular-file change follows a symlink in the tree
    # (as the shell would); removing or renaming acts on the link itself.
    follow_src = _follows_source(fp)
    follow_dst = not symlink and fp.action == "modify"
    try:
        src = tree.key(fp.old_path, follow=follow_src) if fp.old_path is not None else None
        if fp.new_path is None:
            dst = None
        elif fp.new_path == fp.old_path and follow_dst == follow_src:
            dst = src
        else:
            dst = tree.key(fp.new_path, follow=follow_dst)
    except UnsafePath as exc:
        raise UnsafePatchPath(source, fp.line, "a path that stays inside the tree",
                              f"{fp.path!r} ({exc})") from None

    creating = fp.action == "create"
    if creating:
        existing = tree.get(dst)  # type: ignore[arg-type]
        if existing is not None and existing.kind == "dir":
            existing = None  # a directory the patch empties first (checked before commit)
        if existing is not None and (existing.kind != "file" or fp.binary is not None
                                     or not fp.hunks):
            return fail("exists", f"the patch creates {fp.path}, but it already exists")
        before = existing
        content = existing.content if existing is not None else b""
    else:
        before = tree.get(src)  # type: ignore[arg-type]
        if before is None:
            if fp.action == "modify" and fp.hunks and all(h.old_count == 0 for h in fp.hunks):
                creating = True  # GNU patch: an addition-only patch creates a missing file
                content = b""
            else:
                return fail("missing", f"{fp.old_path} does not exist in the tree")
        elif before.kind in ("dir", "other"):
            return fail("not-a-file", f"{fp.old_path} is a {'directory' if before.kind == 'dir' else 'special file'}")
        elif before.kind == "symlink" and not symlink:
            return fail("not-a-file", f"{fp.old_path} is a symbolic link in the tree; "
                                      "the patch changes a regular file")
        elif before.kind == "file" and _is_link_mode(fp.old_mode):
            return fail("not-a-file", f"{fp.old_path} is a regular file; the patch changes a symbolic link")
        else:
            content = before.content
    taken = tree.get(dst) if fp.action in ("rename", "copy") and dst != src else None  # type: ignore[arg-type]
    if taken is not None and taken.kind != "dir":
        return fail("exists", f"the patch {'renames' if fp.action == 'rename' else 'copies'} "
                              f"{fp.old_path} to {fp.new_path}, which already exists")

    if quick and fp.mode_changed and before is not None and before.kind == "file" \
            and fp.old_mode is not None and bool(before.mode & 0o111) != bool(fp.old_mode & 0o111):
        return fail("mode-differs", f"{fp.old_path} does not have mode {fp.old_mode:06o}")

    # The new content.
    if fp.binary is not None:
        problem, output = _apply_binary(fp, content if before is not None else None)
        if problem:
            return fail("binary-mismatch", problem)
    elif fp.hunks:
        own = before is not None and before.content is content  # the file's own content, not b""
        cached = before.lines if own else None  # type: ignore[union-attr]
        output, res.hunks = place_hunks(content, fp.hunks, max_fuzz, lines=cached, creating=creating,
                                        input_size=len(content), stop_on_failure=quick,
                                        exact_only=exact_only, plain_lines=fp.plain_lines)
        bad = [h for h in res.hunks if h.status != "applied"]
        if bad and quick:
            return fail("hunk-failed", f"hunk #{bad[0].number} does not fit")
        if round_trip is not None:
            back, undone = place_hunks(output, round_trip, 0, stop_on_failure=True,
                                       exact_only=exact_only, creating=fp.action == "delete")
            if back != content or any(h.status != "applied" for h in undone):
                return fail("hunk-failed", "the hunks fit, but undoing them does not give the file back")
        if bad:
            from .diagnose import diagnose_hunk

            lines = cached if cached is not None else split_lines(content)
            if own:
                before.lines = lines  # type: ignore[union-attr]  # the reverse check may need them again
            for h in bad:
                diagnose_hunk(lines, fp.hunks[h.number - 1], h)
            numbers = ", ".join(f"#{h.number}" for h in bad)
            if creating and before is not None and before.content:
                return fail("exists", f"the patch creates {fp.path}, but it already exists "
                                      f"with other content (hunk {numbers})")
            return fail("hunk-failed", f"hunk{'s' if len(bad) > 1 else ''} {numbers} of "
                                       f"{len(fp.hunks)} did not fit")
    else:
        output = content

    # The end state.
    if fp.action == "delete":
        if output:
            return fail("content-differs", f"the patch deletes {fp.old_path}, but the file holds "
                                           "more than the patch removes")
        tree.set(src, None)  # type: ignore[arg-type]
        return res
    kind = "symlink" if _is_link_mode(fp.new_mode) or (fp.new_mode is None and symlink) else "file"
    if fp.mode_changed or (creating and fp.new_mode is not None):
        mode = (fp.new_mode or 0o100644) & 0o7777
    elif before is not None and before.kind == "file":
        mode = before.mode
    else:
        mode = 0o644
    if kind == "symlink":
        if not output or b"\0" in output:
            return fail("bad-symlink", f"{fp.path}: a symbolic link needs a target without NUL bytes")
        if _link_escapes(dst, output):  # type: ignore[arg-type]
            raise UnsafePatchPath(source, fp.line, "a symbolic link that stays inside the tree",
                                  f"{fp.path} -> {os.fsdecode(output)!r}")
    node = Node(kind, output, mode,
                before.uid if before is not None else None, before.gid if before is not None else None)
    if fp.action == "rename" and dst != src:
        tree.set(src, None)  # type: ignore[arg-type]
    elif fp.action == "modify" and node.same(before):
        res.status = "unchanged"
    tree.set(dst, node)  # type: ignore[arg-type]
    return res


def _follows_source(fp: FilePatch) -> bool:
    """Is a symlink at the file's old name followed (a regular-file change, as the shell
    would), or acted on itself (removing, renaming, a change to the link)?"""
    return not (_is_link_mode(fp.old_mode) or _is_link_mode(fp.new_mode)) and fp.action in ("modify", "copy")


def _apply_binary(fp: FilePatch, content: bytes | None) -> tuple[str | None, bytes]:
    """A git binary patch's new content, checked against the index hashes when given."""
    from .binary import apply_delta, blob_hash, full_hash

    old_hash, new_hash = full_hash(fp.old_hash), full_hash(fp.new_hash)
    if content is not None and old_hash and old_hash != "0" * 40 and blob_hash(content) != old_hash:
        return f"{fp.path} is not the file the binary patch was made from (git blob {old_hash[:12]})", b""
    hunk = fp.binary
    assert hunk is not None
    if hunk.method == "literal":
        output = hunk.data
    else:
        try:
            output = apply_delta(content or b"", hunk.data)
        except ValueError as exc:
            return f"the binary delta does not fit {fp.path}: {exc}", b""
    if new_hash and new_hash != "0" * 40 and blob_hash(output) != new_hash:
        return f"the binary patch for {fp.path} does not produce git blob {new_hash[:12]}", b""
    return None, output
