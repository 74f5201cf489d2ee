"""The patch generator: git-style patches that GNU ``patch -p1`` and ``git apply`` both take.

Each case builds an OLD and a NEW tree, diffs them with :func:`diff_trees`, then
applies the patch to a copy of OLD with the real tools and compares the result
with NEW byte for byte (content, executable bit, symlink targets).  GNU patch is
the reference wherever it can read the patch; it cannot read git binary patches
nor turn a file into a directory (or back) in one patch, and there ``git apply``
alone is the reference.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_init.patch import generate
from guest_init.patch.generate import (
    MODE_EXEC,
    MODE_FILE,
    MODE_LINK,
    DiffError,
    TreeEntry,
    diff_entries,
    diff_files,
    diff_trees,
    git_blob_id,
    read_tree,
)

pytestmark = pytest.mark.unit

GIT = shutil.which("git")
PATCH = shutil.which("patch")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")
needs_patch = pytest.mark.skipif(PATCH is None, reason="GNU patch is not installed")


# ----------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    """Everything a patch can express about a tree: path -> (kind, content or target).

    Kind is ``"x"`` (executable file), ``"f"`` (file) or ``"l"`` (symlink).
    Directories are left out: neither format can carry an empty one.  Written
    independently of ``read_tree`` so the generator is not checked against itself.
    """
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("l", os.fsencode(os.readlink(full)))
            elif stat.S_ISREG(st_.st_mode):
                kind = "x" if st_.st_mode & stat.S_IXUSR else "f"
                out[rel] = (kind, Path(full).read_bytes())
    return out


def _tool_env() -> dict[str, str]:
    """Git that ignores the user's and system's config and never finds a repository."""
    env = dict(os.environ)
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C")
    return env


def git_apply(tree: Path, patch: bytes, *, reverse: bool = False, zero_context: bool = False) -> subprocess.CompletedProcess:
    """``git apply`` (outside any repository, so it acts on plain files) in ``tree``.

    ``--allow-empty`` because an empty patch (equal trees) is a valid answer;
    ``--unidiff-zero`` only for context-free patches, which git otherwise distrusts.
    """
    patch_file = tree.parent / f".{tree.name}.git.diff"
    patch_file.write_bytes(patch)
    env = _tool_env()
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    args = [GIT, "-C", str(tree), "apply", "--allow-empty",
            *(["-R"] if reverse else []), *(["--unidiff-zero"] if zero_context else []), str(patch_file)]
    return subprocess.run(args, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=120)


def gnu_patch(tree: Path, patch: bytes) -> subprocess.CompletedProcess:
    """GNU ``patch -p1`` in ``tree``, no backup files, never interactive.

    ``-f`` rather than ``--batch``: never guess that a hunk that fails is a
    reversed patch and apply it backwards.
    """
    patch_file = tree.parent / f".{tree.name}.gnu.diff"
    patch_file.write_bytes(patch)
    args = [PATCH, "-p1", "-f", "--no-backup-if-mismatch", "-d", str(tree), "-i", str(patch_file)]
    return subprocess.run(args, capture_output=True, env=_tool_env(), stdin=subprocess.DEVNULL, timeout=120)


def make_tree(root: Path, spec: dict[str, object]) -> Path:
    """Build a tree: ``bytes`` -> file, ``("x", bytes)`` -> executable, ``("l", target)`` -> symlink."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, what in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, bytes):
            path.write_bytes(what)
            path.chmod(0o644)
        elif what[0] == "x":
            path.write_bytes(what[1])
            path.chmod(0o755)
        elif what[0] == "l":
            os.symlink(what[1], path)
        else:  # pragma: no cover - a typo in a test
            raise ValueError(what)
    return root


def check_tools(tmp_path: Path, old: Path, new: Path, patch: bytes, *, gnu: bool = True, zero_context: bool = False) -> None:
    """Both tools, on a copy of ``old``, must produce exactly ``new``."""
    expected = snapshot(new)
    if GIT is not None:
        tree = tmp_path / "by-git"
        shutil.copytree(old, tree, symlinks=True)
        proc = git_apply(tree, patch, zero_context=zero_context)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert snapshot(tree) == expected
    if gnu and PATCH is not None:
        tree = tmp_path / "by-gnu"
        shutil.copytree(old, tree, symlinks=True)
        proc = gnu_patch(tree, patch)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")
        assert snapshot(tree) == expected


def roundtrip(tmp_path: Path, old_spec: dict, new_spec: dict, *, gnu: bool = True, context: int = 3) -> bytes:
    old = make_tree(tmp_path / "old", old_spec)
    new = make_tree(tmp_path / "new", new_spec)
    patch = diff_trees(old, new, context=context)
    check_tools(tmp_path, old, new, patch, gnu=gnu, zero_context=context == 0)
    return patch


def lines(n: int, fmt: bytes = b"line %d\n") -> bytes:
    return b"".join(fmt % i for i in range(1, n + 1))


# ----------------------------------------------------------------- text changes


def test_identical_trees_give_an_empty_patch(tmp_path: Path) -> None:
    assert roundtrip(tmp_path, {"a": b"x\n", "d/l": ("l", "../a")}, {"a": b"x\n", "d/l": ("l", "../a")}) == b""


def test_one_line_change_exact_bytes(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"etc/hostname": b"base\n"}, {"etc/hostname": b"web1\n"})
    assert patch == (
        b"diff --git a/etc/hostname b/etc/hostname\n"
        b"index %s..%s 100644\n"
        b"--- a/etc/hostname\n"
        b"+++ b/etc/hostname\n"
        b"@@ -1 +1 @@\n"
        b"-base\n"
        b"+web1\n"
    ) % (git_blob_id(b"base\n"), git_blob_id(b"web1\n"))


def test_hunks_split_and_merge_by_context(tmp_path: Path) -> None:
    old = lines(40)
    new = old.replace(b"line 5\n", b"five\n").replace(b"line 11\n", b"eleven\n").replace(b"line 30\n", b"")
    patch = roundtrip(tmp_path, {"f": old}, {"f": new})
    headers = [ln for ln in patch.splitlines() if ln.startswith(b"@@")]
    # 5 and 11 are 5 unchanged lines apart (<= 2*3): one hunk; 30 is far: another.
    assert headers == [b"@@ -2,13 +2,13 @@", b"@@ -27,7 +27,6 @@"]


def test_zero_context(tmp_path: Path) -> None:
    old = lines(10)
    new = old.replace(b"line 4\n", b"line 4\nnew\n").replace(b"line 8\n", b"")
    patch = roundtrip(tmp_path, {"f": old}, {"f": new}, context=0)
    headers = [ln for ln in patch.splitlines() if ln.startswith(b"@@")]
    assert headers == [b"@@ -4,0 +5 @@", b"@@ -8 +8,0 @@"]


@pytest.mark.parametrize(
    "old,new",
    [
        (lines(8), lines(8).replace(b"line 3\n", b"three\n")),
        (lines(8), lines(8) + b"tail"),  # adds a line without a newline
        (lines(8) + b"tail", lines(8) + b"tail\n"),  # adds the missing newline
        (b"only\n", b""),
        (b"", b"a\nb\n"),
        (lines(20), lines(20).replace(lines(7)[7:], b"")),  # lines 2-7 go
    ],
)
def test_hunks_match_gnu_diff(tmp_path: Path, old: bytes, new: bytes) -> None:
    """Where the minimal edit is unambiguous, our hunks are GNU diff -u's, header conventions included."""
    diff = shutil.which("diff")
    if diff is None:
        pytest.skip("GNU diff is not installed")
    (tmp_path / "o").write_bytes(old)
    (tmp_path / "n").write_bytes(new)
    proc = subprocess.run([diff, "-u", str(tmp_path / "o"), str(tmp_path / "n")], capture_output=True)
    theirs = proc.stdout[proc.stdout.index(b"@@"):]
    ours = diff_files(old, new, "f")
    assert ours[ours.index(b"@@"):] == theirs


def test_no_newline_at_end_both_sides(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"f": b"a\nb"}, {"f": b"a\nc"})
    assert patch.endswith(b"-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n")


def test_crlf_content_is_byte_exact(tmp_path: Path) -> None:
    old = b"[main]\r\nkey=1\r\nother=2\r\n"
    new = b"[main]\r\nkey=2\r\nother=2\r\nlast=3"
    patch = roundtrip(tmp_path, {"win.ini": old, "mixed": b"a\r\nb\nc\r\n"}, {"win.ini": new, "mixed": b"a\nb\r\nc\r\n"})
    assert b"-key=1\r\n+key=2\r\n" in patch


def test_lone_cr_is_not_a_line_end(tmp_path: Path) -> None:
    roundtrip(tmp_path, {"f": b"a\rb\nc\n"}, {"f": b"a\rB\nc\n"})


def test_empty_lines_and_repeated_lines(tmp_path: Path) -> None:
    old = b"\n\n}\n\n}\n\n" * 10
    new = old.replace(b"}\n\n}", b"}\n{\n\n}", 3) + b"\n"
    roundtrip(tmp_path, {"f": old}, {"f": new})


def test_file_emptied_but_kept(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"f": b"a\nb\n"}, {"f": b""})
    assert b"deleted file" not in patch and b"@@ -1,2 +0,0 @@" in patch


def test_empty_file_filled(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"f": b""}, {"f": b"a\n"})
    assert b"new file" not in patch and b"@@ -0,0 +1 @@" in patch


# ------------------------------------------------------- new, deleted, mode, names


def test_new_and_deleted_files(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"gone": b"bye\n", "keep": b"k\n"}, {"keep": b"k\n", "sub/dir/new": b"hi\n"})
    assert b"deleted file mode 100644\n" in patch
    assert b"new file mode 100644\n" in patch
    assert b"--- /dev/null\n+++ b/sub/dir/new\n@@ -0,0 +1 @@\n+hi\n" in patch
    assert b"--- a/gone\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n" in patch


def test_new_empty_file_is_only_a_header(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"a": b"a\n"}, {"a": b"a\n", "etc/empty": b""})
    assert patch == (
        b"diff --git a/etc/empty b/etc/empty\n"
        b"new file mode 100644\n"
        b"index 0000000000000000000000000000000000000000..e69de29bb2d1d6434b8b29ae775ad8c2e48c5391\n"
    )


def test_deleted_empty_file(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"a": b"a\n", "empty": b""}, {"a": b"a\n"})
    assert patch.startswith(b"diff --git a/empty b/empty\ndeleted file mode 100644\n")
    assert b"@@" not in patch


def test_mode_only_change(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"s": b"#!/bin/sh\n", "t": ("x", b"#!/bin/sh\n")},
                      {"s": ("x", b"#!/bin/sh\n"), "t": b"#!/bin/sh\n"})
    assert patch == (
        b"diff --git a/s b/s\nold mode 100644\nnew mode 100755\n"
        b"diff --git a/t b/t\nold mode 100755\nnew mode 100644\n"
    )


def test_mode_and_content_change(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"s": b"echo 1\n"}, {"s": ("x", b"echo 2\n")})
    assert b"old mode 100644\nnew mode 100755\nindex " in patch
    assert b"100755\n--- a/s" not in patch  # the index line carries no mode then


def test_new_executable(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {}, {"bin/run": ("x", b"#!/bin/sh\nexit 0\n")})
    assert b"new file mode 100755\n" in patch


def test_group_other_bits_are_not_a_mode_change(tmp_path: Path) -> None:
    old = make_tree(tmp_path / "old", {"shadow": b"root:*:1::::::\n"})
    new = make_tree(tmp_path / "new", {"shadow": b"root:*:1::::::\n"})
    (old / "shadow").chmod(0o600)
    (new / "shadow").chmod(0o640)
    assert diff_trees(old, new) == b""


def test_names_with_space_and_utf8(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"my file": b"1\n", "caf\u00e9": b"a\n", "d x/m y": b"m\n"},
                      {"my file": b"2\n", "caf\u00e9": b"b\n", "new one": b"n\n", "d x/m y": ("x", b"m\n"), "e f": b""})
    assert b'diff --git "a/my file" "b/my file"\n' in patch
    assert b'--- "a/my file"\n+++ "b/my file"\n' in patch
    assert b'diff --git "a/caf\\303\\251" "b/caf\\303\\251"\n' in patch
    # Sections without ---/+++ lines: GNU patch finds the file only because the name is quoted.
    assert b'diff --git "a/d x/m y" "b/d x/m y"\nold mode 100644\nnew mode 100755\n' in patch
    assert b'diff --git "a/e f" "b/e f"\nnew file mode 100644\n' in patch


def test_name_needing_escapes(tmp_path: Path) -> None:
    roundtrip(tmp_path, {"q\"uote": b"1\n", "back\\slash": b"1\n"}, {"q\"uote": b"2\n", "back\\slash": b"2\n", "tab\there": b"t\n"})


def test_order_is_bytewise_and_deterministic(tmp_path: Path) -> None:
    names = ["b", "a.txt", "a/x", "A", "a-b", "\u00e9", "a/b/c"]
    old = make_tree(tmp_path / "old", {})
    new_spec = {n: n.encode() + b"\n" for n in names}
    new1 = make_tree(tmp_path / "new1", new_spec)
    new2 = make_tree(tmp_path / "new2", dict(reversed(list(new_spec.items()))))
    patch = diff_trees(old, new1)
    assert patch == diff_trees(old, new2)
    order = [ln.split(b" ")[2] for ln in patch.splitlines() if ln.startswith(b"diff --git")]
    assert order == [b"a/A", b"a/a-b", b"a/a.txt", b"a/a/b/c", b"a/a/x", b"a/b", b'"a/\\303\\251"']


# --------------------------------------------------------------------- symlinks


def test_new_symlink(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"etc/a": b"a\n"}, {"etc/a": b"a\n", "etc/l": ("l", "a")})
    assert b"new file mode 120000\n" in patch
    assert b"+++ b/etc/l\n@@ -0,0 +1 @@\n+a\n\\ No newline at end of file\n" in patch


def test_symlink_retarget_and_delete(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"l": ("l", "one"), "m": ("l", "d/x"), "d/x": b"x\n"},
                      {"l": ("l", "two"), "d/x": b"x\n"})
    assert b"index " in patch and b" 120000\n--- a/l\n" in patch
    assert b"deleted file mode 120000\n" in patch


def test_dangling_and_directory_symlinks(tmp_path: Path) -> None:
    roundtrip(tmp_path, {"d/f": b"1\n", "to-d": ("l", "d")}, {"d/f": b"1\n", "to-d": ("l", "d/f"), "dang": ("l", "nowhere/x")})


def test_symlink_becomes_file_and_back(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"a": ("l", "b"), "b": b"b\n"}, {"a": b"now a file\n", "b": ("l", "a")})
    sections = [ln for ln in patch.splitlines() if ln.startswith((b"diff --git", b"new file", b"deleted file"))]
    assert sections == [
        b"diff --git a/a b/a", b"deleted file mode 120000",
        b"diff --git a/a b/a", b"new file mode 100644",
        b"diff --git a/b b/b", b"deleted file mode 100644",
        b"diff --git a/b b/b", b"new file mode 120000",
    ]


# ---------------------------------------------------------------------- binary


def _binary_roundtrip(tmp_path: Path, old_spec: dict, new_spec: dict) -> bytes:
    """Binary patches: git apply forward on OLD and backward (-R) on NEW; GNU patch cannot."""
    patch = roundtrip(tmp_path, old_spec, new_spec, gnu=False)
    if GIT is not None:
        tree = tmp_path / "by-git-reverse"
        shutil.copytree(tmp_path / "new", tree, symlinks=True)
        proc = git_apply(tree, patch, reverse=True)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert snapshot(tree) == snapshot(tmp_path / "old")
    return patch


def test_new_binary_file(tmp_path: Path) -> None:
    patch = _binary_roundtrip(tmp_path, {}, {"blob": bytes(range(256)) * 3})
    assert b"GIT binary patch\nliteral 768\n" in patch
    assert b"\n\nliteral 0\n" in patch  # the reverse block


def test_changed_and_deleted_binary_files(tmp_path: Path) -> None:
    rnd = bytes((i * 7919 + 13) % 251 for i in range(5000))
    _binary_roundtrip(tmp_path, {"a.bin": b"\0" + rnd, "gone.bin": b"x\0y", "t": b"text\n"},
                      {"a.bin": b"\0" + rnd[::-1], "t": b"t\0now binary"})


def test_binary_with_mode_change(tmp_path: Path) -> None:
    patch = _binary_roundtrip(tmp_path, {"prog": b"\x7fELF\0\0\1"}, {"prog": ("x", b"\x7fELF\0\0\2")})
    assert b"old mode 100644\nnew mode 100755\nindex " in patch


def test_binary_literal_line_format() -> None:
    """Length characters A-Z/a-z, 52 bytes per full line, base85 of git's alphabet."""
    import base64
    import zlib

    data = bytes(range(256)) * 40 + b"\0"
    patch = diff_files(None, data, "b")
    body = patch.split(b"GIT binary patch\n", 1)[1]
    block = body.split(b"\n\n", 1)[0].split(b"\n")
    assert block[0] == b"literal %d" % len(data)
    deflated = b""
    for line in block[1:]:
        n = line[0] - ord("A") + 1 if line[0] <= ord("Z") else line[0] - ord("a") + 27
        assert len(line) - 1 == (n + 3) // 4 * 5
        deflated += base64.b85decode(line[1:])[:n]
        if line is not block[-1]:
            assert n == 52
    assert zlib.decompress(deflated) == data


@needs_git
def test_git_apply_checks_binary_preimage(tmp_path: Path) -> None:
    """The full index line is what lets git refuse a binary patch on the wrong file."""
    old = make_tree(tmp_path / "old", {"b": b"one\0"})
    new = make_tree(tmp_path / "new", {"b": b"two\0"})
    patch = diff_trees(old, new)
    (old / "b").write_bytes(b"drifted\0")
    assert git_apply(old, patch).returncode != 0
    assert (old / "b").read_bytes() == b"drifted\0"


# --------------------------------------------------------- files vs directories


def test_directory_becomes_file(tmp_path: Path) -> None:
    patch = roundtrip(tmp_path, {"x/y/z": b"z\n", "x/w": b"w\n", "x.txt": b"t\n"}, {"x": b"now a file\n", "x.txt": b"t2\n"}, gnu=False)
    order = [ln for ln in patch.splitlines() if ln.startswith(b"diff --git")]
    # The directory's files go first, so in-order appliers never meet a directory at x.
    assert order == [b"diff --git a/x/w b/x/w", b"diff --git a/x/y/z b/x/y/z", b"diff --git a/x b/x", b"diff --git a/x.txt b/x.txt"]


def test_file_becomes_directory(tmp_path: Path) -> None:
    roundtrip(tmp_path, {"x": b"file\n"}, {"x/inner": b"inner\n"}, gnu=False)


@needs_patch
def test_gnu_patch_cannot_swap_file_and_directory(tmp_path: Path) -> None:
    """Documented limitation of GNU patch 2.7: it deletes files only at the end of a run."""
    old = make_tree(tmp_path / "old", {"x": b"file\n"})
    new = make_tree(tmp_path / "new", {"x/inner": b"inner\n"})
    proc = gnu_patch(old, diff_trees(old, new))
    assert proc.returncode != 0


# --------------------------------------------------------------------- the API


def test_diff_files_single_file() -> None:
    assert diff_files(b"a\n", b"a\n", "etc/x") == b""
    change = diff_files(b"a\n", b"b\n", "/etc/x")
    assert change.startswith(b"diff --git a/etc/x b/etc/x\nindex ")
    create = diff_files(None, b"b\n", "etc/x", new_mode=0o755)
    assert b"new file mode 100755\n" in create
    delete = diff_files(b"a\n", None, "etc/x")
    assert b"deleted file mode 100644\n" in delete
    link = diff_files(None, b"../target", "etc/l", new_mode=stat.S_IFLNK | 0o777)
    assert b"new file mode 120000\n" in link and b"+../target\n\\ No newline at end of file\n" in link
    mode = diff_files(b"a\n", b"a\n", "x", old_mode=0o100600, new_mode=0o100700)
    assert mode == b"diff --git a/x b/x\nold mode 100644\nnew mode 100755\n"
    assert diff_files(b"a\n", b"a\n", "x", old_mode=0o600, new_mode=0o644) == b""


def test_diff_files_refuses_unsafe_paths() -> None:
    for bad in ("../etc/passwd", "a/../../b", "", "/"):
        with pytest.raises(DiffError):
            diff_files(b"", b"x", bad)


def test_diff_entries_in_memory() -> None:
    old = {b"a": TreeEntry(MODE_FILE, b"1\n")}
    new = {b"a": TreeEntry(MODE_EXEC, b"1\n"), b"l": TreeEntry(MODE_LINK, b"a")}
    patch = diff_entries(old, new)
    assert patch.startswith(b"diff --git a/a b/a\nold mode 100644\nnew mode 100755\ndiff --git a/l b/l\n")
    with pytest.raises(DiffError):
        diff_entries({}, {b"x": TreeEntry(0o100600, b"")})


def test_read_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", {"a": b"1", "d/e/f": ("x", b"2"), "l": ("l", "d")})
    (root / "emptydir").mkdir()
    assert read_tree(root) == {
        b"a": TreeEntry(MODE_FILE, b"1"),
        b"d/e/f": TreeEntry(MODE_EXEC, b"2"),
        b"l": TreeEntry(MODE_LINK, b"d"),
    }


def test_read_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(DiffError, match="not a directory"):
        read_tree(make_tree(tmp_path / "t", {"f": b""}) / "f")
    with pytest.raises(DiffError):
        read_tree(tmp_path / "missing")
    os.mkfifo(tmp_path / "t" / "fifo")
    with pytest.raises(DiffError, match="FIFO"):
        read_tree(tmp_path / "t")


def test_negative_context_refused(tmp_path: Path) -> None:
    with pytest.raises(DiffError):
        diff_trees(tmp_path, tmp_path, context=-1)


@pytest.mark.parametrize("region_d", [0, 2, 200])
def test_anchored_fallback_still_correct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, region_d: int) -> None:
    """Past the exact diff's budget the diff is no longer minimal, but still right."""
    monkeypatch.setattr(generate, "MAX_MYERS_D", 3)
    monkeypatch.setattr(generate, "MAX_REGION_D", region_d)
    old = lines(60, b"%d\n") + b"}\n\n" * 10
    new = b"".join(b"%d\n" % i for i in range(1, 61) if i % 3) + b"x\n" * 5 + b"}\n\n}\n" * 6
    roundtrip(tmp_path, {"f": old, "g": b"\n" * 30}, {"f": new, "g": b"\n}\n" * 15})


def test_repetitive_lines_do_not_blow_up(tmp_path: Path) -> None:
    """Two-valued files defeat both the exact diff and unique anchors: still a correct patch."""
    old = b"".join(b"x\n" if i % 2 else b"y\n" for i in range(4000))
    new = b"".join(b"x\n" if i % 3 else b"y\n" for i in range(4000))
    roundtrip(tmp_path, {"f": old}, {"f": new})


def test_large_rewrite(tmp_path: Path) -> None:
    """A file rewritten wholesale (beyond the Myers budget) still diffs and applies."""
    old = lines(3000, b"old %d\n")
    new = lines(3000, b"new %d\n")
    patch = roundtrip(tmp_path, {"big": old}, {"big": new})
    assert patch.count(b"\n-old ") == 3000 and patch.count(b"\n+new ") == 3000


# --------------------------------------------- the line diff itself (no tools)


def _lcs(a: list[bytes], b: list[bytes]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([b"a\n", b"b\n", b"c\n", b"\n"]), max_size=25),
       st.lists(st.sampled_from([b"a\n", b"b\n", b"c\n", b"\n"]), max_size=25))
def test_change_blocks_are_a_minimal_edit(a: list[bytes], b: list[bytes]) -> None:
    blocks = generate._change_blocks(a, b)
    rebuilt: list[bytes] = []
    pos = 0
    for i1, i2, j1, j2 in blocks:
        assert i1 >= pos
        rebuilt += a[pos:i1] + b[j1:j2]
        pos = i2
    rebuilt += a[pos:]
    assert rebuilt == b
    edits = sum((i2 - i1) + (j2 - j1) for i1, i2, j1, j2 in blocks)
    assert edits == len(a) + len(b) - 2 * _lcs(a, b)
    for (_, i2, _, j2), (i1, _, j1, _) in zip(blocks, blocks[1:]):
        assert i1 > i2 and j1 > j2  # separated by at least one unchanged line
