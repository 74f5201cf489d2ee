"""Property tests of the patch engine: random trees, random edits, three appliers.

Hypothesis draws an OLD tree (nested directories; text files with repeated and
empty lines, CRLF lines, a missing final newline; a few binary files; executable
bits; symlinks with relative targets inside the tree) and a NEW tree made from it
by random edits (change, insert and delete lines, add, delete and rename files,
chmod, binary changes, symlink retargets, file <-> symlink and file <-> directory
swaps).  Then, for the patch ``diff_trees(OLD, NEW)``:

* our ``apply_patch(..., strip=1)`` on a copy of OLD rebuilds NEW byte for byte;
* ``git apply`` on a copy of OLD produces the identical tree;
* GNU ``patch -p1`` does too, for the patches it can read (no git binary
  patches, no path that is a file on one side and a directory on the other);
* a dry run changes nothing, and applying the patch again to NEW (a second
  boot) converges instead of failing.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from guest_init.patch.generate import diff_trees
from tests.unit.test_patch_generate import GIT, PATCH, git_apply, gnu_patch, snapshot

pytestmark = pytest.mark.integration

try:
    from guest_init.patch import apply_patch
except ImportError as exc:  # the apply side is written in parallel; see the skip below
    apply_patch = None
    _APPLY_IMPORT_ERROR = str(exc)
else:
    _APPLY_IMPORT_ERROR = ""

#: Examples per property: the whole file stays well under a minute on two busy cores.
EXAMPLES = 150

SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A tree model: relative path -> (kind, data).  Kind "f" file, "x" executable
# file, "l" symlink (data: target).  Directories are implied by the paths.
Model = dict[str, tuple[str, bytes]]

NAMES = ["a", "b", "etc", "conf.d", "f.txt", "Z", "x y", "caf\u00e9", "a.b"]
POOL = [b"", b"}", b"{", b"# comment", b"key = value", b"root:x:0:0:root:/root:/bin/bash",
        b"    indented", b"\tTAB", b"same", b"same", b"-minus", b"+plus", b" space", b"@@ -1 +1 @@",
        b"\\ backslash", b"diff --git a/x b/x", b"--- a/x"]
TEXT_CHARS = st.characters(codec="utf-8", exclude_characters="\n\r\0")

line_bodies = st.one_of(st.sampled_from(POOL), st.text(TEXT_CHARS, max_size=12).map(str.encode),
                        st.just(b"mid\rcr"))


@st.composite
def text_content(draw: st.DrawFn) -> bytes:
    """Lines from a small pool (so diffs have repeats to get wrong), LF or CRLF, maybe no final newline."""
    bodies = draw(st.lists(line_bodies, max_size=14))
    out = b"".join(body + draw(st.sampled_from([b"\n", b"\n", b"\n", b"\r\n"])) for body in bodies)
    if bodies and draw(st.integers(0, 4)) == 0:
        out = out[:-2] if out.endswith(b"\r\n") and draw(st.booleans()) else out[:-1]
    return out


binary_content = st.binary(max_size=300).map(lambda b: b + b"\0" + b[:7])


def _dirs(model: Model) -> set[str]:
    out = set()
    for path in model:
        parts = path.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _fits(model: Model, path: str) -> bool:
    """``path`` can be a new non-directory in ``model``: not taken, no file above it, nothing below it."""
    if path in model or path in _dirs(model):
        return False
    parts = path.split("/")
    return not any("/".join(parts[:i]) in model for i in range(1, len(parts)))


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


def _link_target(draw: st.DrawFn, model: Model, link: str) -> bytes:
    """A relative target inside the tree (a file, directory or another link), seen from ``link``."""
    candidates = sorted(set(model) | _dirs(model) | {"missing"})
    target = draw(st.sampled_from(candidates))
    rel = posixpath.relpath(target, posixpath.dirname(link) or ".")
    return rel.encode()


@st.composite
def entry(draw: st.DrawFn, model: Model, path: str) -> tuple[str, bytes]:
    kind = draw(st.sampled_from("fffffxbl"))
    if kind == "l":
        return "l", _link_target(draw, model, path)
    if kind == "b":
        return draw(st.sampled_from("fx")), draw(binary_content)
    return kind, draw(text_content())


@st.composite
def trees(draw: st.DrawFn) -> Model:
    model: Model = {}
    for path in draw(st.lists(paths, min_size=1, max_size=12)):
        if _fits(model, path):
            model[path] = draw(entry(model, path))
    return model


def _edit_lines(draw: st.DrawFn, data: bytes) -> bytes:
    lines = _split(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["change", "insert", "delete", "eol", "crlf"]))
        i = draw(st.integers(0, len(lines))) if lines else 0
        end = draw(st.sampled_from([b"\n", b"\r\n"]))
        if op == "insert" or not lines:
            lines.insert(i, draw(line_bodies) + end)
            continue
        i = min(i, len(lines) - 1)
        if op == "change":
            lines[i] = draw(line_bodies) + end
        elif op == "delete":
            del lines[i]
        elif op == "eol":  # toggle the final newline
            last = lines[-1]
            lines[-1] = last.rstrip(b"\r\n") if last.endswith(b"\n") else last + b"\n"
        else:  # toggle CRLF on one line
            line = lines[i]
            if line.endswith(b"\r\n"):
                lines[i] = line[:-2] + b"\n"
            elif line.endswith(b"\n"):
                lines[i] = line[:-1] + b"\r\n"
    return b"".join(lines)


def _split(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


EDITS = ["modify"] * 5 + ["add", "delete", "rename", "chmod", "binary", "retarget", "typechange", "swap", "empty"]


@st.composite
def edited(draw: st.DrawFn, old: Model) -> Model:
    """NEW: OLD after one to six random edits."""
    new = dict(old)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(EDITS))
        files = sorted(p for p, (k, _) in new.items() if k in "fx")
        links = sorted(p for p, (k, _) in new.items() if k == "l")
        if op == "modify" and files:
            p = draw(st.sampled_from(files))
            kind, data = new[p]
            if b"\0" not in data:
                new[p] = (kind, _edit_lines(draw, data))
        elif op == "add" or not new:
            p = draw(paths)
            if _fits(new, p):
                new[p] = draw(entry(new, p))
        elif op == "delete":
            del new[draw(st.sampled_from(sorted(new)))]
        elif op == "rename":
            src = draw(st.sampled_from(sorted(new)))
            value = new.pop(src)
            dst = draw(paths)
            if not _fits(new, dst):
                dst = src
            if value[0] == "l":  # a relative target means something else elsewhere
                value = ("l", _link_target(draw, new, dst))
            new[dst] = value
        elif op == "chmod" and files:
            p = draw(st.sampled_from(files))
            kind, data = new[p]
            new[p] = ("x" if kind == "f" else "f", data)
        elif op == "binary" and files:
            p = draw(st.sampled_from(files))
            new[p] = (new[p][0], draw(binary_content))
        elif op == "retarget" and links:
            p = draw(st.sampled_from(links))
            new[p] = ("l", _link_target(draw, new, p))
        elif op == "typechange":
            p = draw(st.sampled_from(sorted(new)))
            if new[p][0] == "l":
                new[p] = ("f", draw(text_content()))
            else:
                new[p] = ("l", _link_target(draw, new, p))
        elif op == "swap":
            dirs = sorted(_dirs(new))
            if dirs and draw(st.booleans()):  # a directory becomes a file
                d = draw(st.sampled_from(dirs))
                for p in [p for p in new if p.startswith(d + "/")]:
                    del new[p]
                new[d] = ("f", draw(text_content()))
            else:  # a file becomes a directory
                p = draw(st.sampled_from(sorted(new)))
                del new[p]
                new[p + "/inner"] = ("f", draw(text_content()))
        elif op == "empty" and files:
            p = draw(st.sampled_from(files))
            new[p] = (new[p][0], b"")
    return new


@st.composite
def tree_pairs(draw: st.DrawFn) -> tuple[Model, Model]:
    old = draw(trees())
    return old, draw(edited(old))


def materialize(model: Model, root: Path) -> Path:
    root.mkdir(parents=True)
    for rel, (kind, data) in model.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "l":
            os.symlink(data, path)
        else:
            path.write_bytes(data)
            path.chmod(0o755 if kind == "x" else 0o644)
    return root


def gnu_can_read(old: Model, new: Model) -> bool:
    """What GNU patch 2.7 can take: no git binary patch, no file <-> directory swap."""
    changed = [p for p in set(old) | set(new) if old.get(p) != new.get(p)]
    if any(b"\0" in m[p][1] for p in changed for m in (old, new) if p in m):
        return False
    return not (set(old) & _dirs(new) or set(new) & _dirs(old))


FEATURES = [
    (b"GIT binary patch", "binary"), (b"120000", "symlink"), (b"No newline", "no final newline"),
    (b"\r\n", "CRLF"), (b"old mode", "mode change"), (b"deleted file", "deletion"),
    (b"new file", "creation"), (b"\n@@ ", "hunk"), (b'"a/', "quoted name"), (b"/inner", "file->dir"),
]


class Case:
    """OLD and NEW on disk under a fresh temporary directory, and the patch between them."""

    def __init__(self, old: Model, new: Model, *, in_hypothesis: bool = True) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="patchprop-")
        self.base = Path(self._tmp.name)
        self.old = materialize(old, self.base / "old")
        self.new = materialize(new, self.base / "new")
        self.patch = diff_trees(self.old, self.new)
        self.expected = snapshot(self.new)
        assert self.expected == new  # the trees on disk are the models
        for marker, name in FEATURES:
            if in_hypothesis and marker in self.patch:
                event(name)  # shown by --hypothesis-show-statistics: is the mix still varied?

    def copy_of_old(self, name: str) -> Path:
        tree = self.base / name
        shutil.copytree(self.old, tree, symlinks=True)
        return tree

    def __enter__(self) -> "Case":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def _show(case: Case) -> str:
    return "patch was:\n" + case.patch.decode("utf-8", "backslashreplace")


@pytest.mark.skipif(apply_patch is None, reason=f"guest_init.patch.apply_patch not importable: {_APPLY_IMPORT_ERROR}")
@SETTINGS
@given(tree_pairs())
def test_our_apply_rebuilds_new(pair: tuple[Model, Model]) -> None:
    old, new = pair
    with Case(old, new) as case:
        assume(case.patch)
        tree = case.copy_of_old("ours")
        result = apply_patch(case.patch, tree, strip=1)
        assert result.status == "applied", result.render() + "\n" + _show(case)
        assert snapshot(tree) == case.expected, _show(case)


@pytest.mark.skipif(GIT is None, reason="git is not installed")
@SETTINGS
@given(tree_pairs())
def test_git_apply_builds_the_same_tree(pair: tuple[Model, Model]) -> None:
    old, new = pair
    with Case(old, new) as case:
        tree = case.copy_of_old("git")
        proc = git_apply(tree, case.patch)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace") + _show(case)
        assert snapshot(tree) == case.expected, _show(case)


@pytest.mark.skipif(PATCH is None, reason="GNU patch is not installed")
@SETTINGS
@given(tree_pairs())
def test_gnu_patch_builds_the_same_tree(pair: tuple[Model, Model]) -> None:
    old, new = pair
    assume(gnu_can_read(old, new))
    with Case(old, new) as case:
        assume(case.patch)
        tree = case.copy_of_old("gnu")
        proc = gnu_patch(tree, case.patch)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace") + _show(case)
        assert snapshot(tree) == case.expected, _show(case)


@pytest.mark.skipif(apply_patch is None, reason=f"guest_init.patch.apply_patch not importable: {_APPLY_IMPORT_ERROR}")
@SETTINGS
@given(tree_pairs())
def test_our_dry_run_and_second_application(pair: tuple[Model, Model]) -> None:
    """A dry run changes nothing; applying again (a second boot) never fails or damages NEW.

    On NEW the reverse of the patch fits exactly, so the engine must call it
    already applied and leave NEW alone, unless the forward patch happens to
    fit NEW too (duplicated lines), which GNU patch would also apply.
    """
    old, new = pair
    with Case(old, new) as case:
        assume(case.patch)
        tree = case.copy_of_old("dry")
        before = snapshot(tree)
        result = apply_patch(case.patch, tree, strip=1, dry_run=True)
        assert result.status == "applied", result.render() + "\n" + _show(case)
        assert snapshot(tree) == before
        again = apply_patch(case.patch, case.new, strip=1)
        assert again.status in ("applied", "already-applied"), again.render() + "\n" + _show(case)
        if again.status == "already-applied":
            assert snapshot(case.new) == case.expected, _show(case)
        event(f"second application: {again.status}")


# Found by the properties above with more examples than the suite runs; kept as
# fixed cases.  Strict: once the apply side handles them, these turn red so the
# marker is removed.
SECOND_APPLICATION_THROUGH_NEW_SYMLINK = [
    pytest.param({"a/d/f": ("f", b"f\n"), "c/d/f": ("f", b"hi\n")},
                 {"a/d/f": ("f", b"f\n"), "c": ("l", b"a")}, True, id="dir-became-symlink-to-dir"),
    # git apply -R itself stops here ("a/a/a: Too many levels of symbolic links").
    pytest.param({"a/a/a": ("f", b""), "b": ("f", b"")},
                 {"b": ("f", b""), "a": ("l", b"a")}, False, id="dir-became-self-symlink"),
]


@pytest.mark.skipif(apply_patch is None, reason=f"guest_init.patch.apply_patch not importable: {_APPLY_IMPORT_ERROR}")
@pytest.mark.parametrize("old,new,git_reverse_fits", SECOND_APPLICATION_THROUGH_NEW_SYMLINK)
def test_second_application_after_directory_became_symlink(old: Model, new: Model, git_reverse_fits: bool) -> None:
    """On NEW the patch is already there; our engine must say already-applied and change nothing."""
    with Case(old, new, in_hypothesis=False) as case:
        if GIT is not None and git_reverse_fits:
            probe = case.base / "git-reverse"
            shutil.copytree(case.new, probe, symlinks=True)
            assert git_apply(probe, case.patch, reverse=True).returncode == 0
            assert snapshot(probe) == snapshot(case.old)
        again = apply_patch(case.patch, case.new, strip=1)
        assert again.status == "already-applied", again.render() + "\n" + _show(case)
        assert snapshot(case.new) == case.expected
