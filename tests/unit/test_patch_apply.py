"""Applying patches: placement, every file operation, all-or-nothing, safety, diagnosis, CLI."""
from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dom0.errors import UserError
from guest_init.patch import PatchParseError, PatchResult, UnsafePatchPath, apply_patch
from guest_init.patch.binary import blob_hash

pytestmark = pytest.mark.unit


def make(root: Path, files: dict[str, bytes | str]) -> Path:
    """Files (bytes) and symlinks (str targets) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            os.symlink(value, path)
        else:
            path.write_bytes(value)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Type, content or target, mode, inode of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_ino)
    return out


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if "supercharge" in p.name]


def lines(n: int, fmt: str = "line {}\n") -> bytes:
    return "".join(fmt.format(i) for i in range(1, n + 1)).encode()


def udiff(name: str, hunks: str) -> bytes:
    return f"--- a/{name}\n+++ b/{name}\n{hunks}".encode()


# ------------------------------------------------------------------ basics


def test_modify_and_report(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"etc/hosts": b"127.0.0.1 localhost\n127.0.1.1 old\n::1 localhost\n"})
    patch = udiff("etc/hosts", "@@ -1,3 +1,3 @@\n 127.0.0.1 localhost\n-127.0.1.1 old\n+127.0.1.1 web1\n"
                               " ::1 localhost\n")
    result = apply_patch(patch, root, source="web1.diff")
    assert isinstance(result, PatchResult)
    assert result.status == "applied" and result.ok
    assert (root / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n127.0.1.1 web1\n::1 localhost\n"
    (f,) = result.files
    assert (f.path, f.action, f.status, f.kind) == ("etc/hosts", "modify", "applied", "file")
    (h,) = f.hunks
    assert (h.number, h.header, h.status, h.line, h.offset, h.fuzz) == (1, "@@ -1,3 +1,3 @@", "applied", 1, 0, 0)
    assert "etc/hosts: modified" in result.render()
    doc = result.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["format"] == "supercharge-patch-result/1" and doc["status"] == "applied"
    assert no_temporaries(root)


def test_mode_and_owner_of_a_patched_file_are_kept(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"etc/shadow": b"root:*:1:\nweb:!:1:\n"})
    os.chmod(root / "etc/shadow", 0o640)
    patch = (b"diff --git a/etc/shadow b/etc/shadow\nindex 1111111..2222222 100644\n"
             + udiff("etc/shadow", "@@ -1,2 +1,2 @@\n root:*:1:\n-web:!:1:\n+web:$6$x:1:\n"))
    assert apply_patch(patch, root).status == "applied"
    assert stat.S_IMODE(os.stat(root / "etc/shadow").st_mode) == 0o640  # the index line's mode is not applied


def test_offset_is_found_and_reported(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"f": b"new 1\nnew 2\nnew 3\n" + lines(20)})
    patch = udiff("f", "@@ -9,7 +9,7 @@\n line 9\n line 10\n line 11\n-line 12\n+LINE 12\n line 13\n"
                       " line 14\n line 15\n@@ -16,3 +16,3 @@\n line 16\n-line 17\n+LINE 17\n line 18\n")
    result = apply_patch(patch, root)
    assert result.status == "applied"
    h1, h2 = result.files[0].hunks
    assert (h1.line, h1.offset, h1.fuzz) == (12, 3, 0)
    assert (h2.line, h2.offset) == (19, 3)  # the second hunk starts from the first one's offset
    data = (root / "f").read_bytes()
    assert b"LINE 12\n" in data and b"LINE 17\n" in data and b"line 12\n" not in data
    assert "offset +3" in result.render()


def test_fuzz_ignores_changed_context_and_keeps_the_files_lines(tmp_path: Path) -> None:
    original = lines(10).replace(b"line 3\n", b"line 3 changed locally\n")
    root = make(tmp_path / "r", {"f": original})
    patch = udiff("f", "@@ -3,7 +3,7 @@\n line 3\n line 4\n line 5\n-line 6\n+LINE 6\n line 7\n line 8\n"
                       " line 9\n")
    result = apply_patch(patch, root)
    assert result.status == "applied"
    assert result.files[0].hunks[0].fuzz == 1
    assert (root / "f").read_bytes() == original.replace(b"line 6\n", b"LINE 6\n")
    assert "fuzz 1" in result.render()


def test_fuzz_zero_refuses_what_fuzz_one_accepts(tmp_path: Path) -> None:
    original = lines(10).replace(b"line 3\n", b"line 3 changed locally\n")
    root = make(tmp_path / "r", {"f": original})
    patch = udiff("f", "@@ -3,7 +3,7 @@\n line 3\n line 4\n line 5\n-line 6\n+LINE 6\n line 7\n line 8\n"
                       " line 9\n")
    assert apply_patch(patch, root, fuzz=0).status == "failed"
    assert (root / "f").read_bytes() == original


def test_hunk_made_at_the_end_of_a_file_only_fits_there(tmp_path: Path) -> None:
    """Less context after the change than before it: GNU patch matches it only at the end."""
    root = make(tmp_path / "r", {"f": lines(6) + b"extra\n"})
    patch = udiff("f", "@@ -4,3 +4,4 @@\n line 4\n line 5\n line 6\n+appended\n")
    result = apply_patch(patch, root)
    assert result.status == "failed"  # GNU patch: "Hunk #1 FAILED at 4."


def test_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"win.ini": b"[a]\r\nx=1\r\ny=2", "unix": b"a\nb"})
    patch = (udiff("win.ini", "@@ -1,3 +1,3 @@\n [a]\r\n-x=1\r\n+x=2\r\n y=2\n\\ No newline at end of file\n")
             + udiff("unix", "@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n"))
    assert apply_patch(patch, root).status == "applied"
    assert (root / "win.ini").read_bytes() == b"[a]\r\nx=2\r\ny=2"
    assert (root / "unix").read_bytes() == b"a\nc\n"


def test_new_file_in_new_directories_and_deletion_of_a_directorys_last_file(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"etc/old.d/only.conf": b"x\n", "etc/keep": b"k\n"})
    patch = (b"--- /dev/null\n+++ b/etc/new/sub/app.conf\n@@ -0,0 +1,2 @@\n+a=1\n+b=2\n"
             b"--- a/etc/old.d/only.conf\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n")
    result = apply_patch(patch, root)
    assert result.status == "applied"
    assert (root / "etc/new/sub/app.conf").read_bytes() == b"a=1\nb=2\n"
    assert stat.S_IMODE(os.stat(root / "etc/new/sub/app.conf").st_mode) == 0o644
    assert not (root / "etc/old.d").exists()  # emptied directory removed, as GNU patch does
    assert [f.action for f in result.files] == ["create", "delete"]


def test_deleting_a_file_that_holds_more_than_the_patch_removes_fails(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"f": b"x\ny\n"})
    result = apply_patch(b"--- a/f\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n", root)
    assert result.status == "failed" and result.files[0].reason == "content-differs"
    assert (root / "f").read_bytes() == b"x\ny\n"


def test_creating_over_an_existing_file_fails_like_gnu_patch(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"f": b"other\n"})
    result = apply_patch(b"--- /dev/null\n+++ b/f\n@@ -0,0 +1 @@\n+new\n", root)
    assert result.status == "failed" and result.files[0].reason == "exists"
    assert result.files[0].failed_hunks == [1]


def test_missing_file_to_modify(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {})
    result = apply_patch(udiff("etc/nope", "@@ -1 +1 @@\n-a\n+b\n"), root)
    assert result.status == "failed" and result.files[0].reason == "missing"
    assert "does not exist" in result.render()


def test_plain_diff_between_differently_named_files(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"conf": b"a\n"})
    patch = b"--- conf.orig\n+++ conf\n@@ -1 +1 @@\n-a\n+b\n"
    assert apply_patch(patch, root, strip=0).status == "applied"
    assert (root / "conf").read_bytes() == b"b\n"


# ------------------------------------------------------------------------ git


def test_git_rename_copy_and_mode(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a.conf": b"1\n2\n3\n", "tool": b"#!/bin/sh\n", "src": b"s\n"})
    patch = (b"diff --git a/a.conf b/conf.d/b.conf\nsimilarity index 66%\nrename from a.conf\n"
             b"rename to conf.d/b.conf\n--- a/a.conf\n+++ b/conf.d/b.conf\n@@ -1,3 +1,3 @@\n 1\n-2\n+two\n 3\n"
             b"diff --git a/tool b/tool\nold mode 100644\nnew mode 100755\n"
             b"diff --git a/src b/dst\nsimilarity index 100%\ncopy from src\ncopy to dst\n")
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert not (root / "a.conf").exists()
    assert (root / "conf.d/b.conf").read_bytes() == b"1\ntwo\n3\n"
    assert stat.S_IMODE(os.stat(root / "tool").st_mode) == 0o755
    assert (root / "src").read_bytes() == (root / "dst").read_bytes() == b"s\n"
    assert [f.action for f in result.files] == ["rename", "modify", "copy"]


def test_git_symlinks_created_retargeted_deleted(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"usr/share/zoneinfo/UTC": b"tz", "etc/old": "x", "etc/gone": "y"})
    patch = (b"diff --git a/etc/localtime b/etc/localtime\nnew file mode 120000\nindex 0000000..1111111\n"
             b"--- /dev/null\n+++ b/etc/localtime\n@@ -0,0 +1 @@\n+/usr/share/zoneinfo/UTC\n"
             b"\\ No newline at end of file\n"
             b"diff --git a/etc/old b/etc/old\nindex 1..2 120000\n--- a/etc/old\n+++ b/etc/old\n"
             b"@@ -1 +1 @@\n-x\n\\ No newline at end of file\n+../usr\n\\ No newline at end of file\n"
             b"diff --git a/etc/gone b/etc/gone\ndeleted file mode 120000\nindex 1..0000000\n"
             b"--- a/etc/gone\n+++ /dev/null\n@@ -1 +0,0 @@\n-y\n\\ No newline at end of file\n")
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(root / "etc/old") == "../usr"
    assert not os.path.lexists(root / "etc/gone")
    assert [f.kind for f in result.files] == ["symlink"] * 3


def test_git_empty_files(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"old-empty": b""})
    patch = (b"diff --git a/new-empty b/new-empty\nnew file mode 100644\nindex 0000000..e69de29\n"
             b"diff --git a/old-empty b/old-empty\ndeleted file mode 100644\nindex e69de29..0000000\n")
    assert apply_patch(patch, root).status == "applied"
    assert (root / "new-empty").read_bytes() == b"" and not (root / "old-empty").exists()
    assert apply_patch(patch, root).status == "already-applied"


def test_file_becomes_directory_and_directory_becomes_file(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a/x": b"1\n", "b": b"2\n"})
    patch = (b"diff --git a/a/x b/a/x\ndeleted file mode 100644\n--- a/a/x\n+++ /dev/null\n@@ -1 +0,0 @@\n-1\n"
             b"diff --git a/a b/a\nnew file mode 100644\n--- /dev/null\n+++ b/a\n@@ -0,0 +1 @@\n+file a\n"
             b"diff --git a/b b/b\ndeleted file mode 100644\n--- a/b\n+++ /dev/null\n@@ -1 +0,0 @@\n-2\n"
             b"diff --git a/b/y b/b/y\nnew file mode 100644\n--- /dev/null\n+++ b/b/y\n@@ -0,0 +1 @@\n+in b\n")
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert (root / "a").read_bytes() == b"file a\n" and (root / "b/y").read_bytes() == b"in b\n"
    assert no_temporaries(root)


@pytest.mark.parametrize("deletion_first", [True, False])
def test_symlink_deleted_and_directory_created_in_its_place(tmp_path: Path, deletion_first: bool) -> None:
    """The new files go under the new directory, not where the deleted symlink pointed, in
    either order (a file under the symlink that is still there waits for the commit)."""
    root = make(tmp_path / "r", {"a": b"", "b": "elsewhere", "elsewhere/x": b"keep\n"})
    delete = (b"diff --git a/b b/b\ndeleted file mode 120000\n--- a/b\n+++ /dev/null\n@@ -1 +0,0 @@\n"
              b"-elsewhere\n\\ No newline at end of file\n")
    create = (b"diff --git a/b/a b/b/a\nnew file mode 120000\n--- /dev/null\n+++ b/b/a\n@@ -0,0 +1 @@\n"
              b"+../a\n\\ No newline at end of file\n"
              b"diff --git a/b/f b/b/f\nnew file mode 100644\n--- /dev/null\n+++ b/b/f\n@@ -0,0 +1 @@\n+f\n")
    result = apply_patch(delete + create if deletion_first else create + delete, root)
    assert result.status == "applied", result.render()
    assert (root / "b").is_dir() and not (root / "b").is_symlink()
    assert os.readlink(root / "b/a") == "../a" and (root / "b/f").read_bytes() == b"f\n"
    assert sorted(p.name for p in (root / "elsewhere").iterdir()) == ["x"] and no_temporaries(root)


def test_a_symlink_appearing_before_the_commit_is_refused(tmp_path: Path) -> None:
    from guest_init.patch.tree import CommitError, Node, Tree

    root = make(tmp_path / "r", {"d/f": b"1\n"})
    make(tmp_path, {"outside/f": b"1\n"})
    tree = Tree(root)
    key = tree.key("d/f", follow=True)
    tree.get(key)
    tree.set(key, Node("file", b"2\n", 0o644))
    (root / "d/f").unlink()
    (root / "d").rmdir()
    os.symlink(tmp_path / "outside", root / "d")  # swapped in after the patch was computed
    with pytest.raises(CommitError):
        tree.commit()
    assert (tmp_path / "outside/f").read_bytes() == b"1\n"
    assert not [p for p in (tmp_path / "outside").iterdir() if p.name != "f"]


def test_directory_not_emptied_by_the_patch_cannot_become_a_file(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a/x": b"1\n"})
    before = snapshot(root)
    result = apply_patch(b"diff --git a/a b/a\nnew file mode 100644\n--- /dev/null\n+++ b/a\n"
                         b"@@ -0,0 +1 @@\n+file\n", root)
    assert result.status == "failed" and result.files[0].reason == "conflict"
    assert snapshot(root) == before


def _literal(data: bytes) -> bytes:
    z = zlib.compress(data)
    out = [b"literal %d\n" % len(data)]
    for k in range(0, len(z), 52):
        chunk = z[k:k + 52]
        n = len(chunk)
        out.append((bytes([n + 64]) if n <= 26 else bytes([n - 26 + 96]))
                   + base64.b85encode(chunk.ljust((n + 3) // 4 * 4, b"\0")) + b"\n")
    return b"".join(out) + b"\n"


def _binary_patch(name: str, old: bytes | None, new: bytes | None, forward: bytes | None = None) -> bytes:
    zero = "0" * 40
    head = f"diff --git a/{name} b/{name}\n"
    if old is None:
        head += "new file mode 100644\n"
    elif new is None:
        head += "deleted file mode 100644\n"
    head += f"index {blob_hash(old) if old is not None else zero}..{blob_hash(new) if new is not None else zero}"
    head += " 100644\n" if old is not None and new is not None else "\n"
    body = forward if forward is not None else _literal(new or b"")
    return head.encode() + b"GIT binary patch\n" + body + _literal(old or b"")


def test_git_binary_literal_create_modify_delete(tmp_path: Path) -> None:
    old, new = b"\x89PNG\0\1\2" * 50, b"\0\xff" * 300
    root = make(tmp_path / "r", {"img.png": old, "gone.bin": b"\0bye"})
    patch = (_binary_patch("img.png", old, new) + _binary_patch("new.bin", None, b"\0hello")
             + _binary_patch("gone.bin", b"\0bye", None))
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert (root / "img.png").read_bytes() == new and (root / "new.bin").read_bytes() == b"\0hello"
    assert not (root / "gone.bin").exists()
    assert apply_patch(patch, root).status == "already-applied"


def test_git_binary_against_the_wrong_file_fails(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"img.png": b"\0something else"})
    result = apply_patch(_binary_patch("img.png", b"\0original", b"\0new"), root)
    assert result.status == "failed" and result.files[0].reason == "binary-mismatch"
    assert (root / "img.png").read_bytes() == b"\0something else"


def test_git_binary_delta_is_applied(tmp_path: Path) -> None:
    old = b"\0abcdefgh"
    new = old + b"XY"
    delta = bytes([len(old), len(new), 0x91, 0, len(old), 2]) + b"XY"
    root = make(tmp_path / "r", {"d.bin": old})
    patch = _binary_patch("d.bin", old, new, forward=_literal(delta).replace(b"literal", b"delta", 1))
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert (root / "d.bin").read_bytes() == new


def test_binary_files_differ_is_reported_not_guessed(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"b": b"\0"})
    result = apply_patch(b"diff --git a/b b/b\nindex 1..2 100644\nBinary files a/b and b/b differ\n", root)
    assert result.status == "failed" and result.files[0].reason == "binary-unsupported"
    assert "git diff --binary" in result.render()


# ------------------------------------------------------- all or nothing


def test_a_failing_hunk_changes_nothing_anywhere(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a": lines(10), "b": lines(10)})
    before = snapshot(root)
    patch = (udiff("a", "@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n")
             + b"--- /dev/null\n+++ b/c/new\n@@ -0,0 +1 @@\n+n\n"
             + udiff("b", "@@ -5,3 +5,3 @@\n other\n-stuff\n+STUFF\n here\n"))
    result = apply_patch(patch, root)
    assert result.status == "failed" and not result.ok
    assert [f.status for f in result.files] == ["applied", "applied", "failed"]
    assert snapshot(root) == before
    assert no_temporaries(root)
    assert "nothing was changed" in result.render()


def test_an_unsafe_file_late_in_the_patch_leaves_no_temporary_file(tmp_path: Path) -> None:
    # The files before it are written to temporary names as they are computed.
    root = make(tmp_path / "r", {"a": lines(10), "d/b": lines(10)})
    before = snapshot(root)
    patch = (udiff("a", "@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n")
             + udiff("d/b", "@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n")
             + b"diff --git a/d/l b/d/l\nnew file mode 120000\n--- /dev/null\n+++ b/d/l\n"
               b"@@ -0,0 +1 @@\n+../../../etc/shadow\n\\ No newline at end of file\n")
    with pytest.raises(UnsafePatchPath):
        apply_patch(patch, root)
    assert snapshot(root) == before
    assert no_temporaries(root)


def test_two_changes_to_one_file_in_one_patch_build_on_each_other(tmp_path: Path) -> None:
    # The second section (directly, or through a symlink) reads what the first made.
    root = make(tmp_path / "r", {"a": lines(20), "link": "a"})
    patch = (udiff("a", "@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n")
             + udiff("a", "@@ -9,3 +9,3 @@\n line 9\n-line 10\n+LINE 10\n line 11\n")
             + udiff("link", "@@ -17,3 +17,3 @@\n line 17\n-line 18\n+LINE 18\n line 19\n"))
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    expected = lines(20).replace(b"line 2\n", b"LINE 2\n").replace(b"line 10\n", b"LINE 10\n")
    assert (root / "a").read_bytes() == expected.replace(b"line 18\n", b"LINE 18\n")
    assert os.readlink(root / "link") == "a"
    assert no_temporaries(root)
    # Applied again: the same three sections are recognised, nothing is written twice.
    assert apply_patch(patch, root).status == "already-applied"
    assert (root / "a").read_bytes() == expected.replace(b"line 18\n", b"LINE 18\n")


def test_a_drifted_file_patched_under_two_names_is_checked_as_one(tmp_path: Path) -> None:
    # Through the symlink, both sections (each at an offset) patch one file: each section
    # alone would be asked at once whether its file has the patch, but the two are one file,
    # which only shows once the names are resolved (then they are asked in order, at the end).
    text = b"local 1\nlocal 2\n" + lines(30)
    root = make(tmp_path / "r", {"a": text, "link": "a"})
    patch = (udiff("a", "@@ -4,3 +4,3 @@\n line 4\n-line 5\n+LINE 5\n line 6\n")
             + udiff("link", "@@ -20,3 +20,3 @@\n line 20\n-line 21\n+LINE 21\n line 22\n"))
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert [h.offset for f in result.files for h in f.hunks] == [2, 2]
    expected = text.replace(b"line 5\n", b"LINE 5\n").replace(b"line 21\n", b"LINE 21\n")
    assert (root / "a").read_bytes() == expected and no_temporaries(root)
    again = apply_patch(patch, root)
    assert again.status == "already-applied", again.render()
    assert (root / "a").read_bytes() == expected


def test_drifted_files_already_patched_or_not_are_told_apart(tmp_path: Path) -> None:
    # GNU patch recognises a reversed patch at an offset too: so does the check, asked for
    # each of these independent files as soon as it is computed.
    old = b"local\n" + lines(30)
    new = old.replace(b"line 10\n", b"LINE 10\n")
    root = make(tmp_path / "r", {"a": new, "b": old, "c": old})
    hunk = "@@ -9,3 +9,3 @@\n line 9\n-line 10\n+LINE 10\n line 11\n"
    patch = udiff("a", hunk) + udiff("b", hunk) + udiff("c", hunk)
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert [f.status for f in result.files] == ["already-applied", "applied", "applied"]
    assert all((root / n).read_bytes() == new for n in "abc") and no_temporaries(root)
    assert apply_patch(patch, root).status == "already-applied"


def test_an_insertion_made_before_is_recognised_where_its_context_recurs(tmp_path: Path) -> None:
    # In "a" the line was inserted before, and its context recurs further on: the patch
    # fits there too (at an offset), but its reverse fits exactly where the patch says,
    # so "a" has it.  In "b" (drifted, not patched) the reverse's first hunk is not at
    # its stated line: the quick answer (no) is the right one, and "b" is patched.
    body = lines(12) + b"line 1\nline 2\nline 3\nline 4\n" + lines(8, "tail {}\n")
    done = body.replace(b"line 2\nline 3\n", b"line 2\nNEW\nline 3\n", 1)
    drifted = b"local\n" + body
    root = make(tmp_path / "r", {"a": done, "b": drifted})
    hunk = "@@ -1,4 +1,5 @@\n line 1\n line 2\n+NEW\n line 3\n line 4\n"
    patch = udiff("a", hunk) + udiff("b", hunk)
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert [f.status for f in result.files] == ["already-applied", "applied"]
    assert (root / "a").read_bytes() == done
    assert (root / "b").read_bytes() == drifted.replace(b"line 2\nline 3\n", b"line 2\nNEW\nline 3\n", 1)
    assert no_temporaries(root)


@settings(max_examples=300, deadline=None)
@given(file_lines=st.lists(st.sampled_from([b"a\n", b"b\n", b"\n", b"a b\n", b"b", b"a\r\n"]), max_size=40),
       side=st.lists(st.sampled_from([b"a\n", b"b\n", b"\n", b"b"]), min_size=1, max_size=4),
       line=st.integers(min_value=1, max_value=45))
def test_the_quick_stated_line_check_answers_as_the_exact_placement(
        file_lines: list[bytes], side: list[bytes], line: int) -> None:
    # stands_at (the already-applied check's quick question) against placing a hunk whose
    # old side is ``side`` at ``line``, exactly, as the full check would.
    from guest_init.patch.model import Hunk
    from guest_init.patch.place import place_hunks, stands_at

    content = b"".join(file_lines)
    answer = stands_at(content, side, line)
    kinds = b"-" * len(side)
    hunk = Hunk(1, line, len(side), line, 0, b"@@ -1 +0,0 @@\n", 1, kinds, 0, 0, line, side, [])
    _, results = place_hunks(content, [hunk], 0, stop_on_failure=True, exact_only=True)
    placed = results[0].status == "applied"
    if answer is None:
        assert side[-1][-1:] != b"\n"
    else:
        assert answer == placed


def test_diagnosis_names_the_hunk_and_the_best_place(tmp_path: Path) -> None:
    text = lines(40).replace(b"line 27\n", b"line 27 edited locally\n")
    root = make(tmp_path / "r", {"etc/app.conf": text})
    patch = udiff("etc/app.conf", "@@ -2,3 +2,3 @@\n line 2\n-line 3\n+LINE 3\n line 4\n"
                                  "@@ -24,7 +24,7 @@\n line 24\n line 25\n line 26\n-line 27\n+LINE 27\n"
                                  " line 28\n line 29\n line 30\n")
    result = apply_patch(patch, root, source="app.diff")
    assert result.status == "failed"
    (f,) = result.files
    assert (f.reason, f.failed_hunks) == ("hunk-failed", [2])
    h = f.hunks[1]
    assert h.header == "@@ -24,7 +24,7 @@"
    assert h.expected[0] == (24, b"line 24\n") and h.expected[3] == (27, b"line 27\n")
    assert h.tried == {"line": 24, "from_line": 4, "to_line": 36, "max_fuzz": 2}
    assert h.best["line"] == 24 and h.best["matching_lines"] == 6
    assert 0.8 < h.best["similarity"] < 1
    assert h.best["found"][3] == (27, b"line 27 edited locally\n")
    doc = result.to_json()
    hunk = doc["files"][0]["hunks"][1]
    assert hunk["best"]["line"] == 24 and hunk["expected"][3] == {"line": 27, "text": "line 27"}
    assert json.loads(json.dumps(doc)) == doc
    text_out = result.render()
    assert "app.diff: FAILED: nothing was changed" in text_out
    assert "hunk #2 @@ -24,7 +24,7 @@: FAILED" in text_out
    assert "closest place: line 24" in text_out
    row = next(line for line in text_out.splitlines() if "line 27 edited locally" in line)
    assert "27  line 27" in row and " ! " in row  # expected and found side by side, marked different
    assert (root / "etc/app.conf").read_bytes() == text


def test_diagnosis_finds_a_moved_block(tmp_path: Path) -> None:
    body = lines(60)
    moved = body.replace(b"line 10\nline 11\nline 12\nline 13\n", b"") + b"line 10\nline 11\nline 12 X\nline 13\n"
    root = make(tmp_path / "r", {"f": moved})
    patch = udiff("f", "@@ -10,4 +10,4 @@\n line 10\n-line 11\n+LINE 11\n line 12\n line 13\n")
    result = apply_patch(patch, root, fuzz=0)
    h = result.files[0].hunks[0]
    assert h.status == "failed" and h.best["line"] == 57 and h.best["matching_lines"] == 3


def test_commit_failure_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make(tmp_path / "r", {"a": b"1\n", "b": b"2\n", "gone": b"3\n"})
    before = snapshot(root)
    patch = (udiff("a", "@@ -1 +1 @@\n-1\n+one\n") + udiff("b", "@@ -1 +1 @@\n-2\n+two\n")
             + b"--- /dev/null\n+++ b/new/c\n@@ -0,0 +1 @@\n+c\n"
             + b"--- a/gone\n+++ /dev/null\n@@ -1 +0,0 @@\n-3\n")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst, *a, **kw):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    result = apply_patch(patch, root)
    monkeypatch.undo()
    assert result.status == "failed"
    assert "No space left on device" in result.message
    assert snapshot(root) == before
    assert no_temporaries(root)


def test_a_write_error_is_a_failed_patch_not_an_exception(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk while a file is written (as soon as it is computed, and again at the commit).
    root = make(tmp_path / "r", {"a": b"1\n", "b": b"2\n", "c": b"3\n"})
    before = snapshot(root)
    patch = (udiff("a", "@@ -1 +1 @@\n-1\n+one\n") + udiff("b", "@@ -1 +1 @@\n-2\n+two\n")
             + udiff("c", "@@ -1 +1 @@\n-3\n+three\n"))
    real_write = os.write

    def full_disk(fd, data):
        if bytes(data) == b"two\n":
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    result = apply_patch(patch, root)
    monkeypatch.undo()
    assert result.status == "failed" and "No space left on device" in result.message
    assert snapshot(root) == before
    assert no_temporaries(root)


def test_commit_flushes_to_disk_before_and_after_the_renames(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import guest_init.patch.tree as tree_module

    root = make(tmp_path / "r", {"a": b"1\n", "d/b": b"2\n"})
    patch = udiff("a", "@@ -1 +1 @@\n-1\n+one\n") + udiff("d/b", "@@ -1 +1 @@\n-2\n+two\n")
    synced: list[int] = []
    monkeypatch.setattr(tree_module, "_syncfs", lambda fd: synced.append(fd) or 0)
    assert apply_patch(patch, root).status == "applied"
    assert len(synced) == 2  # one syncfs after staging, one after the renames (one file system)

    # Without syncfs in libc: fsync on every staged file and every directory.
    root2 = make(tmp_path / "r2", {"a": b"1\n", "d/b": b"2\n"})
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(tree_module, "_syncfs", False)
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    assert apply_patch(patch, root2).status == "applied"
    assert len(fsynced) == 4  # two files, two directories
    assert (root2 / "d/b").read_bytes() == b"two\n"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a": b"1\n"})
    before = snapshot(root)
    patch = udiff("a", "@@ -1 +1 @@\n-1\n+2\n") + b"--- /dev/null\n+++ b/d/new\n@@ -0,0 +1 @@\n+x\n"
    result = apply_patch(patch, root, dry_run=True)
    assert result.status == "applied" and result.dry_run
    assert snapshot(root) == before and no_temporaries(root)
    assert "dry run" in result.render() and "would be modified" in result.render()


# ----------------------------------------------------------- convergence


def test_already_applied_patch_is_detected_and_left_alone(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"etc/passwd": lines(30, "user{}:x:{}:\n".replace("{}:x:{}", "{0}:x:{0}")),
                                 "etc/old": b"o\n", "etc/r1": b"r\n"})
    patch = (udiff("etc/passwd", "@@ -28,3 +28,4 @@\n user28:x:28:\n user29:x:29:\n user30:x:30:\n"
                                 "+web:x:1000:\n")
             + b"--- /dev/null\n+++ b/etc/hostname\n@@ -0,0 +1 @@\n+web1\n"
             + b"--- a/etc/old\n+++ /dev/null\n@@ -1 +0,0 @@\n-o\n"
             + b"diff --git a/etc/r1 b/etc/r2\nsimilarity index 100%\nrename from etc/r1\nrename to etc/r2\n")
    assert apply_patch(patch, root).status == "applied"
    after = snapshot(root)
    second = apply_patch(patch, root)
    assert second.status == "already-applied" and second.ok
    assert [f.status for f in second.files] == ["already-applied"] * 4
    assert snapshot(root) == after  # same inodes: nothing rewritten
    assert "already applied" in second.render()


def test_pure_addition_applied_twice_is_not_duplicated(tmp_path: Path) -> None:
    """The context of an addition (blank lines, braces) often recurs; fuzz must not re-add it."""
    block = b"server {\n    listen 80;\n}\n\n"
    root = make(tmp_path / "r", {"nginx.conf": block * 6})
    patch = udiff("nginx.conf", "@@ -5,6 +5,7 @@\n server {\n     listen 80;\n }\n+include extra;\n \n"
                                " server {\n     listen 80;\n")
    assert apply_patch(patch, root).status == "applied"
    once = (root / "nginx.conf").read_bytes()
    assert apply_patch(patch, root).status == "already-applied"
    assert (root / "nginx.conf").read_bytes() == once and once.count(b"include extra;") == 1


def test_partly_applied_tree_converges(tmp_path: Path) -> None:
    """Some files already patched (a commit cut short by a power cut): the rest is applied."""
    root = make(tmp_path / "r", {"a": b"1\n", "b": b"2\n", "c": b"x\n"})
    patch = (udiff("a", "@@ -1 +1 @@\n-1\n+one\n") + udiff("b", "@@ -1 +1 @@\n-2\n+two\n")
             + b"--- a/c\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n")
    (root / "a").write_bytes(b"one\n")
    (root / "c").unlink()
    result = apply_patch(patch, root)
    assert result.status == "applied", result.render()
    assert [f.status for f in result.files] == ["already-applied", "applied", "already-applied"]
    assert (root / "a").read_bytes() == b"one\n" and (root / "b").read_bytes() == b"two\n"
    assert apply_patch(patch, root).status == "already-applied"


@pytest.mark.parametrize("renames_done", [0, 1, 2])
def test_a_second_run_converges_after_a_crash_in_the_middle_of_a_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames_done: int) -> None:
    import guest_init.patch.tree as tree_module

    base = {"etc/hostname": b"base\n", "etc/hosts": lines(8), "etc/motd": b"hello\n", "etc/old": b"x\n"}
    root = make(tmp_path / "r", base)
    expected_root = make(tmp_path / "expected", base)
    patch = (udiff("etc/hostname", "@@ -1 +1 @@\n-base\n+web1\n")
             + udiff("etc/hosts", "@@ -3,3 +3,3 @@\n line 3\n-line 4\n+10.0.0.1 web1\n line 5\n")
             + b"--- /dev/null\n+++ b/etc/new/app.conf\n@@ -0,0 +1 @@\n+port=80\n"
             + b"--- a/etc/old\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n")
    assert apply_patch(patch, expected_root).status == "applied"
    real_replace = os.replace
    calls = []

    def crash(src, dst, *a, **kw):  # the power goes off after N renames
        calls.append(dst)
        if len(calls) > renames_done:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(tree_module.Tree, "_rollback", lambda self, *a: None)  # nothing undone
    monkeypatch.setattr(os, "replace", crash)
    assert apply_patch(patch, root).status == "failed"
    monkeypatch.undo()
    second = apply_patch(patch, root)
    assert second.status in ("applied", "already-applied"), second.render()
    ours = {k: v[:2] for k, v in snapshot(root).items() if "supercharge" not in k}
    assert ours == {k: v[:2] for k, v in snapshot(expected_root).items()}
    assert apply_patch(patch, root).status == "already-applied"


def test_a_file_neither_patched_nor_patchable_fails_the_whole_patch(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a": b"1\n", "b": b"2\n"})
    patch = udiff("a", "@@ -1 +1 @@\n-1\n+one\n") + udiff("b", "@@ -1 +1 @@\n-2\n+two\n")
    (root / "a").write_bytes(b"something else\n")
    before = snapshot(root)
    result = apply_patch(patch, root)
    assert result.status == "failed" and result.files[0].failed_hunks == [1]
    assert snapshot(root) == before


def test_reversed_hunks_can_be_handed_on_part_way() -> None:
    # Placement copies the first hunk as bytes, then hands the rest (a slice of the hunks) to
    # the line-based placer: here because the last hunk ends without a newline.
    from guest_init.patch.apply import _ReversedHunks
    from guest_init.patch.parse import parse_patch
    from guest_init.patch.place import place_hunks

    old = lines(30) + b"last"
    new = old.replace(b"line 5\n", b"LINE 5\n").replace(b"last", b"LAST")
    patch = udiff("f", "@@ -2,7 +2,7 @@\n line 2\n line 3\n line 4\n-line 5\n+LINE 5\n line 6\n"
                       " line 7\n line 8\n@@ -28,4 +28,4 @@\n line 28\n line 29\n line 30\n-last\n"
                       "\\\\ No newline at end of file\n+LAST\n\\\\ No newline at end of file\n")
    (fp,) = parse_patch(patch)
    undone, results = place_hunks(new, _ReversedHunks(fp.hunks), 0, exact_only=True)
    assert [r.status for r in results] == ["applied", "applied"] and undone == old


def test_mode_only_patch_twice(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"run": b"x\n"})
    patch = b"diff --git a/run b/run\nold mode 100644\nnew mode 100755\n"
    assert apply_patch(patch, root).status == "applied"
    result = apply_patch(patch, root)
    assert result.status == "already-applied" and result.files[0].status == "unchanged"


# ----------------------------------------------------------------- safety


def test_dotdot_and_absolute_paths_write_nothing(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a": b"1\n"})
    make(tmp_path, {"outside": b"1\n"})
    for patch, strip in [(b"--- a/../outside\n+++ b/../outside\n@@ -1 +1 @@\n-1\n+pwned\n", 1),
                         (f"--- {tmp_path}/outside\n+++ {tmp_path}/outside\n@@ -1 +1 @@\n-1\n+pwned\n".encode(), 0)]:
        with pytest.raises(UnsafePatchPath):
            apply_patch(patch, root, strip=strip)
    assert (tmp_path / "outside").read_bytes() == b"1\n"


def test_symlink_in_the_tree_leading_outside_is_refused(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"etc/ok": b"1\n", "etc/evil": "../../outside", "sub": "../.."})
    make(tmp_path, {"outside": b"1\n"})
    for name in ("etc/evil", "sub/outside", "sub/new-file"):
        patch = udiff(name, "@@ -1 +1 @@\n-1\n+pwned\n") if "new" not in name else \
            f"--- /dev/null\n+++ b/{name}\n@@ -0,0 +1 @@\n+pwned\n".encode()
        with pytest.raises(UnsafePatchPath) as err:
            apply_patch(udiff("etc/ok", "@@ -1 +1 @@\n-1\n+2\n") + patch, root, source="evil.diff")
        assert str(err.value).startswith("evil.diff:")
    assert (tmp_path / "outside").read_bytes() == b"1\n"
    assert (root / "etc/ok").read_bytes() == b"1\n"  # the safe file before it was not written either


def test_absolute_symlink_in_the_tree_stays_inside_the_root(tmp_path: Path) -> None:
    """``/etc/x -> /srv/x`` means ROOT/srv/x in the guest, never the host's /srv/x."""
    root = make(tmp_path / "r", {"srv/resolv.conf": b"nameserver 1\n", "etc/resolv.conf": "/srv/resolv.conf"})
    result = apply_patch(udiff("etc/resolv.conf", "@@ -1 +1 @@\n-nameserver 1\n+nameserver 2\n"), root)
    assert result.status == "applied"
    assert (root / "srv/resolv.conf").read_bytes() == b"nameserver 2\n"
    assert os.readlink(root / "etc/resolv.conf") == "/srv/resolv.conf"  # the link itself is kept


def test_git_rename_to_outside_is_refused(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"x": b"1\n"})
    with pytest.raises(UnsafePatchPath):
        apply_patch(b"diff --git a/x b/../x\nsimilarity index 100%\nrename from x\nrename to ../x\n", root)
    assert (root / "x").exists() and not (tmp_path / "x").exists()


def test_new_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {})
    patch = (b"diff --git a/etc/l b/etc/l\nnew file mode 120000\n--- /dev/null\n+++ b/etc/l\n"
             b"@@ -0,0 +1 @@\n+../../etc/shadow\n\\ No newline at end of file\n")
    with pytest.raises(UnsafePatchPath, match="symbolic link that stays inside the tree"):
        apply_patch(patch, root)
    assert not os.path.lexists(root / "etc/l")


def test_parse_error_is_raised_before_anything_is_read(tmp_path: Path) -> None:
    root = make(tmp_path / "r", {"a": b"1\n"})
    with pytest.raises(PatchParseError) as err:
        apply_patch(udiff("a", "@@ -1 +1 @@\n-1\n") + b"garbage", root, source="bad.diff")
    assert str(err.value).startswith("bad.diff:5: expected 1 more '+' line(s)")


# -------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    from dom0.patch_cli import add_parsers

    parser = argparse.ArgumentParser(prog="supercharge")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_apply_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make(tmp_path / "r", {"a": b"1\n"})
    good = tmp_path / "good.diff"
    good.write_bytes(udiff("a", "@@ -1 +1 @@\n-1\n+2\n"))
    assert run_cli(["patch", "apply", str(good), "--dir", str(root), "--dry-run"]) == 0
    assert (root / "a").read_bytes() == b"1\n"
    assert run_cli(["patch", "apply", str(good), "--dir", str(root)]) == 0
    assert "applied" in capsys.readouterr().out
    assert run_cli(["patch", "apply", str(good), "--dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "already-applied"
    bad = tmp_path / "bad.diff"
    bad.write_bytes(udiff("a", "@@ -1 +1 @@\n-zzz\n+3\n"))
    assert run_cli(["patch", "apply", str(bad), "--dir", str(root), "-p", "1", "--fuzz", "0"]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail, message", [
    (["missing.diff", "--dir", "{root}"], "no such patch file"),
    (["{bad}", "--dir", "{root}"], "bad.diff:3: expected"),
    (["{good}", "--dir", "{root}/nope"], "does not exist"),
    (["{evil}", "--dir", "{root}"], "inside the tree"),
])
def test_cli_bad_input_is_a_user_error(tmp_path: Path, argv_tail: list[str], message: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = make(tmp_path / "r", {"a": b"1\n"})
    (tmp_path / "good.diff").write_bytes(udiff("a", "@@ -1 +1 @@\n-1\n+2\n"))
    (tmp_path / "bad.diff").write_bytes(b"--- a/a\n+++ b/a\n@@ nonsense\n")
    (tmp_path / "evil.diff").write_bytes(udiff("../a", "@@ -1 +1 @@\n-1\n+2\n"))
    names = {"root": str(root), "good": str(tmp_path / "good.diff"), "bad": str(tmp_path / "bad.diff"),
             "evil": str(tmp_path / "evil.diff")}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        run_cli(["patch", "apply"] + [a.format(**names) for a in argv_tail])
    assert err.value.exit_code == 2 and message in str(err.value)


# -- placement by byte ranges (the large-patch path) agrees with line placement


@pytest.mark.unit
@pytest.mark.parametrize("line_len", [1, 3, 40, 400])
def test_line_start_finds_every_line_or_reports_the_end(line_len):
    from guest_init.patch.place import _line_start

    lines = [b"%0*d\n" % (line_len, i) if i % 3 else b"\n" for i in range(300)]
    data = b"".join(lines)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for start in (0, 7, 150):
        for k in (0, 1, 15, 17, 60, 299 - start):
            assert _line_start(data, offsets[start], k, 40) == offsets[start + k]
    assert _line_start(data, 0, 301, 40) == -1
    assert _line_start(data, offsets[290], 20, 40) == -1


@pytest.mark.unit
def test_byte_placement_and_line_placement_give_the_same_result():
    from guest_init.patch.parse import parse_patch, split_lines
    from guest_init.patch.place import place_hunks

    old = b"".join(b"line %d\n" % i for i in range(1, 400))
    lines = old.split(b"\n")[:-1]
    new_lines = list(lines)
    new_lines[100] = b"changed 101"
    new_lines.insert(300, b"added")
    new = b"\n".join(new_lines) + b"\n"
    import difflib

    diff = "".join(difflib.unified_diff(old.decode().splitlines(True), new.decode().splitlines(True),
                                        "a/f", "b/f")).encode()
    hunks = parse_patch(diff)[0].hunks
    drifted = b"top\n" * 5 + old  # every hunk needs an offset: the line-based path takes over
    for content in (old, drifted):
        by_bytes = place_hunks(content, hunks, 2)
        by_lines = place_hunks(content, hunks, 2, lines=split_lines(content))
        assert by_bytes[0] == by_lines[0] == (new if content is old else b"top\n" * 5 + new)
        assert [(h.line, h.new_line, h.offset) for h in by_bytes[1]] == \
               [(h.line, h.new_line, h.offset) for h in by_lines[1]]


@pytest.mark.unit
@pytest.mark.parametrize("drift", [0, 3, -2])
def test_byte_placement_of_text_found_everywhere_agrees_with_line_placement(drift):
    """A hunk whose old side occurs hundreds of times before its line (blank-ish, repeated
    text): the substring search gives up and the stated line, or the line-based search,
    decides; either way the result is the line-based placement's."""
    from guest_init.patch.parse import parse_patch, split_lines
    from guest_init.patch.place import place_hunks

    old = b"a\n" * 300 + b"end\n"
    new = b"a\n" * 150 + b"b\n" + b"a\n" * 149 + b"end\n"
    import difflib

    diff = "".join(difflib.unified_diff(old.decode().splitlines(True), new.decode().splitlines(True),
                                        "a/f", "b/f")).encode()
    hunks = parse_patch(diff)[0].hunks
    content = b"top\n" * drift + old if drift >= 0 else old[2 * -drift:]
    by_bytes = place_hunks(content, hunks, 2)
    by_lines = place_hunks(content, hunks, 2, lines=split_lines(content))
    assert by_bytes[0] == by_lines[0]
    assert [(h.status, h.line, h.new_line, h.offset, h.fuzz) for h in by_bytes[1]] == \
           [(h.status, h.line, h.new_line, h.offset, h.fuzz) for h in by_lines[1]]
    assert all(h.status == "applied" for h in by_bytes[1])
    for text in (content, content.replace(b"a\n", b"c\n", 200)):  # the stated line holds it / not
        exact = place_hunks(text, hunks, 0, exact_only=True, stop_on_failure=True)[1]
        exact_lines = place_hunks(text, hunks, 0, lines=split_lines(text), exact_only=True,
                                  stop_on_failure=True)[1]
        assert [h.status for h in exact] == [h.status for h in exact_lines] == \
               ["applied" if text is content else "failed"]


@pytest.mark.unit
@pytest.mark.parametrize("at_line", [0, 5, 599, 600, 601, 1199, 1200, 1201, 2990])
def test_nearest_finds_the_place_gnu_would_across_search_windows(at_line):
    """The offset search without fuzz looks in windows of the file: a match that straddles a
    window's end, or lies several windows on, is found, and the nearest one wins."""
    from guest_init.patch.place import _nearest

    lines = [b"%039d\n" % i for i in range(3000)]  # 40 bytes a line: windows end mid-file
    old = b"".join(b"unique %d %s\n" % (k, b"x" * 60) for k in range(3))  # longer than the needle
    data_lines = list(lines)
    data_lines[at_line:at_line] = [old]  # the old side, starting at line at_line + 1
    data = b"".join(data_lines)
    for first_guess in (1, at_line + 1, at_line + 40, 2000):
        assert _nearest(data, old, 0, 1, first_guess) == (at_line + 1, sum(map(len, lines[:at_line])))
    assert _nearest(data, old + b"not there\n", 0, 1, 10) is None
    twice = data + old  # a second, later copy: the nearer one wins
    assert _nearest(twice, old, 0, 1, at_line + 1)[0] == at_line + 1
