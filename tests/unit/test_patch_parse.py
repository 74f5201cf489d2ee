"""Reading unified diffs: every format feature, and one-line errors that name the line."""
from __future__ import annotations

import base64
import zlib

import pytest

from guest_init.patch import PatchParseError, UnsafePatchPath, parse_patch
from guest_init.patch.binary import apply_delta, blob_hash, decode_base85_line
from guest_init.patch.model import MODE_SYMLINK

pytestmark = pytest.mark.unit


def one(patch: bytes, **kw):
    files = parse_patch(patch, **kw)
    assert len(files) == 1
    return files[0]


PLAIN = b"""\
diff -urN a/etc/hosts b/etc/hosts
--- a/etc/hosts\t2024-01-02 03:04:05.000000000 +0000
+++ b/etc/hosts\t2024-01-02 03:04:06.000000000 +0000
@@ -1,3 +1,4 @@
 127.0.0.1 localhost
-127.0.1.1 old
+127.0.1.1 web1
+10.0.0.5 db
 ::1 localhost
"""


def test_plain_unified_diff() -> None:
    fp = one(PLAIN)
    assert (fp.old_path, fp.new_path, fp.action, fp.git) == ("etc/hosts", "etc/hosts", "modify", False)
    (h,) = fp.hunks
    assert (h.old_start, h.old_count, h.new_start, h.new_count) == (1, 3, 1, 4)
    assert h.header == "@@ -1,3 +1,4 @@"
    assert h.old_lines == [b"127.0.0.1 localhost\n", b"127.0.1.1 old\n", b"::1 localhost\n"]
    assert h.new_lines == [b"127.0.0.1 localhost\n", b"127.0.1.1 web1\n", b"10.0.0.5 db\n",
                           b"::1 localhost\n"]
    assert (h.old_kinds, h.new_kinds) == (" - ", " ++ ")
    assert (h.prefix_context, h.suffix_context) == (1, 1)
    assert h.line == 4


@pytest.mark.parametrize("strip, expected", [(0, "a/etc/hosts"), (1, "etc/hosts"), (2, "hosts")])
def test_strip_levels(strip: int, expected: str) -> None:
    assert one(PLAIN, strip=strip).old_path == expected


def test_strip_more_than_the_path_has_is_an_error() -> None:
    with pytest.raises(PatchParseError) as err:
        parse_patch(PLAIN, strip=3, source="p.diff")
    assert str(err.value).startswith("p.diff:2: expected a path with 3 leading component(s)")


def test_repeated_slashes_count_once_when_stripping() -> None:
    patch = PLAIN.replace(b"a/etc/hosts\t", b"a//etc/hosts\t")
    assert one(patch).old_path == "etc/hosts"


def test_many_files_and_garbage_between_them() -> None:
    patch = (b"From: admin@example.org\nSubject: [PATCH] personality\n\n"
             b"Set the host name.\n---\n etc/hostname | 2 +-\n 1 file changed\n\n"
             b"Only in b/etc: motd\n"
             b"--- a/etc/hostname\n+++ b/etc/hostname\n@@ -1 +1 @@\n-old\n+web1\n"
             b"some commentary between files\n"
             + PLAIN + b"-- \n2.39.5\n")
    files = parse_patch(patch)
    assert [f.path for f in files] == ["etc/hostname", "etc/hosts"]
    assert files[0].hunks[0].old_lines == [b"old\n"]


def test_several_hunks_and_counts_without_comma() -> None:
    patch = (b"--- a/f\n+++ b/f\n@@ -2 +2 @@ section text\n-b\n+B\n"
             b"@@ -10,2 +10,0 @@\n-x\n-y\n@@ -20,0 +19,1 @@\n+z\n")
    h1, h2, h3 = one(patch).hunks
    assert (h1.old_count, h1.new_count, h1.header) == (1, 1, "@@ -2 +2 @@")
    assert h2.new_lines == [] and h2.old_lines == [b"x\n", b"y\n"]
    assert (h3.old_count, h3.first) == (0, 21)  # an insertion goes after line 20, as in GNU patch
    assert [h.number for h in (h1, h2, h3)] == [1, 2, 3]


def test_dev_null_means_create_and_delete() -> None:
    create = one(b"--- /dev/null\n+++ b/new.conf\n@@ -0,0 +1,2 @@\n+a\n+b\n")
    assert (create.action, create.old_path, create.new_path) == ("create", None, "new.conf")
    delete = one(b"--- a/old.conf\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n")
    assert (delete.action, delete.old_path, delete.new_path) == ("delete", "old.conf", None)


@pytest.mark.parametrize("stamp", [b"1970-01-01 00:00:00.000000000 +0000",
                                   b"1969-12-31 19:00:00.000000000 -0500",
                                   b"1970-01-01 01:00:00 +0100"])
def test_diff_N_epoch_timestamps_mean_nonexistent(stamp: bytes) -> None:
    create = one(b"--- a/x\t" + stamp + b"\n+++ b/x\t2024-05-01 10:00:00.1 +0200\n"
                 b"@@ -0,0 +1 @@\n+a\n")
    assert create.action == "create" and create.new_path == "x"
    delete = one(b"--- a/x\t2024-05-01 10:00:00 +0000\n+++ b/x\t" + stamp + b"\n@@ -1 +0,0 @@\n-a\n")
    assert delete.action == "delete" and delete.old_path == "x"


def test_ordinary_timestamps_are_not_nonexistent() -> None:
    fp = one(b"--- a/x\t1970-01-01 00:00:01 +0000\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    assert fp.action == "modify"


def test_name_with_space_before_tab_and_timestamp() -> None:
    fp = one(b"--- a/my file.txt\t2024-01-01 00:00:00 +0000\n+++ b/my file.txt\t2024-01-01 00:00:00 +0000\n"
             b"@@ -1 +1 @@\n-a\n+b\n")
    assert fp.path == "my file.txt"


def test_no_newline_markers_on_each_side() -> None:
    fp = one(b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n"
             b"\\ No newline at end of file\n")
    (h,) = fp.hunks
    assert h.old_lines == [b"a\n", b"b"] and h.new_lines == [b"a\n", b"c"]
    ctx = one(b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n-a\n+A\n b\n\\ No newline at end of file\n")
    assert ctx.hunks[0].old_lines[-1] == b"b" and ctx.hunks[0].new_lines[-1] == b"b"


@pytest.mark.parametrize("patch, plain", [
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n", True),
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n+c", False),  # the patch's last line is cut short
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n\\ No newline at end of file\n", False),
    (b"--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n\n-b\n+c\n", False),  # a context line that lost its space
    (b"diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1 +1 @@\n-b\n+c\n@@ -5 +5 @@\n-x\n+y\n", True),
])
def test_the_parser_says_whether_every_hunk_line_ends_with_a_newline(patch: bytes, plain: bool) -> None:
    fp = one(patch)
    assert fp.plain_lines is plain
    ended = all(line.endswith(b"\n") for h in fp.hunks for line in h.old_lines + h.new_lines)
    assert ended or not plain


def test_the_fast_constructors_make_what_the_classes_make() -> None:
    from guest_init.patch.model import AppliedHunk, Hunk, HunkResult, applied_hunk, new_hunk

    fields = (3, 10, 7, 11, 8, b"@@ -10,7 +11,8 @@ def f():\n", 42, b"   -++   ", 3, 3, 10, [b"a\n"], [b"b\n"])
    hunk = new_hunk(iter(fields))
    assert type(hunk) is Hunk and hunk == Hunk(*fields)
    assert (hunk.first, hunk.old_lines, hunk.new_lines) == (10, [b"a\n"], [b"b\n"])
    assert hunk.header == "@@ -10,7 +11,8 @@"
    result = applied_hunk((3, b"@@ -10,7 +11,8 @@ def f():\n", 12, 13, 2))
    assert type(result) is AppliedHunk
    full = HunkResult(3, "@@ -10,7 +11,8 @@", "applied", 12, 13, 2, 0)
    # Every field of a HunkResult is there, with the same value, and the JSON is the same.
    assert all(getattr(result, name) == getattr(full, name) for name in HunkResult.__slots__)
    assert result.to_json() == full.to_json()


def test_crlf_content_is_kept_byte_exact() -> None:
    fp = one(b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\r\n-b\r\n+c\r\n")
    assert fp.hunks[0].old_lines == [b"a\r\n", b"b\r\n"]
    assert fp.hunks[0].new_lines == [b"a\r\n", b"c\r\n"]


def test_non_utf8_content_and_names() -> None:
    fp = one(b"--- a/caf\xe9\n+++ b/caf\xe9\n@@ -1 +1 @@\n-\xff\xfe\n+\x80\n")
    assert fp.hunks[0].new_lines == [b"\x80\n"]
    assert fp.path.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_blank_line_in_a_hunk_is_context_with_eaten_space() -> None:
    fp = one(b"--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n\n-b\n+c\n")
    assert fp.hunks[0].old_lines == [b"a\n", b"\n", b"b\n"]


# ------------------------------------------------------------------------ git


def test_git_new_deleted_and_mode_change() -> None:
    patch = (b"diff --git a/bin/run b/bin/run\nold mode 100644\nnew mode 100755\n"
             b"diff --git a/etc/new b/etc/new\nnew file mode 100600\nindex 0000000..2e65efe\n"
             b"--- /dev/null\n+++ b/etc/new\n@@ -0,0 +1 @@\n+a\n"
             b"diff --git a/etc/old b/etc/old\ndeleted file mode 100644\nindex 2e65efe..0000000\n"
             b"--- a/etc/old\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n")
    mode, new, old = parse_patch(patch)
    assert (mode.action, mode.path, mode.old_mode, mode.new_mode, mode.mode_changed, mode.hunks) == (
        "modify", "bin/run", 0o100644, 0o100755, True, [])
    assert (new.action, new.new_path, new.new_mode, new.git) == ("create", "etc/new", 0o100600, True)
    assert (old.action, old.old_path, old.old_mode) == ("delete", "etc/old", 0o100644)


def test_git_index_mode_is_not_a_mode_change() -> None:
    fp = one(b"diff --git a/f b/f\nindex 1234567..89abcde 100644\n--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n+b\n")
    assert fp.mode_changed is False and fp.old_hash == "1234567" and fp.new_hash == "89abcde"


def test_git_index_line_alone_is_no_change() -> None:
    patch = b"diff --git a/f b/f\nindex 1234567..1234567 100644\n" + PLAIN
    assert [f.path for f in parse_patch(patch)] == ["etc/hosts"]


def test_git_rename_with_and_without_edits() -> None:
    pure = one(b"diff --git a/etc/a.conf b/etc/b.conf\nsimilarity index 100%\n"
               b"rename from etc/a.conf\nrename to etc/b.conf\n")
    assert (pure.action, pure.old_path, pure.new_path, pure.similarity) == (
        "rename", "etc/a.conf", "etc/b.conf", 100)
    edited = one(b"diff --git a/a b/dir/b\nsimilarity index 80%\nrename from a\nrename to dir/b\n"
                 b"index 1..2 100644\n--- a/a\n+++ b/dir/b\n@@ -1 +1 @@\n-x\n+y\n")
    assert (edited.action, edited.old_path, edited.new_path, len(edited.hunks)) == (
        "rename", "a", "dir/b", 1)


def test_git_copy() -> None:
    fp = one(b"diff --git a/x b/y\nsimilarity index 90%\ncopy from x\ncopy to y\n"
             b"--- a/x\n+++ b/y\n@@ -1 +1 @@\n-1\n+2\n")
    assert (fp.action, fp.old_path, fp.new_path) == ("copy", "x", "y")


def test_git_symlink_content_is_the_target() -> None:
    fp = one(b"diff --git a/etc/localtime b/etc/localtime\nnew file mode 120000\nindex 0000000..1\n"
             b"--- /dev/null\n+++ b/etc/localtime\n@@ -0,0 +1 @@\n+/usr/share/zoneinfo/UTC\n"
             b"\\ No newline at end of file\n")
    assert fp.new_mode == MODE_SYMLINK and fp.is_symlink
    assert fp.hunks[0].new_lines == [b"/usr/share/zoneinfo/UTC"]


def test_git_quoted_names() -> None:
    fp = one(b'diff --git "a/tab\\tname" "b/tab\\tname"\nindex 1..2 100644\n'
             b'--- "a/tab\\tname"\n+++ "b/tab\\tname"\n@@ -1 +1 @@\n-a\n+b\n')
    assert fp.path == "tab\tname"
    utf8 = one(b'diff --git "a/caf\\303\\251" "b/caf\\303\\251"\nold mode 100644\nnew mode 100755\n')
    assert utf8.path == "caf\u00e9"


def test_git_names_with_spaces_from_the_diff_line() -> None:
    fp = one(b"diff --git a/my dir/x y b/my dir/x y\nold mode 100644\nnew mode 100755\n")
    assert fp.path == "my dir/x y"
    fp = one(b"diff --git a/with space b/with space\nindex 1..2 100644\n"
             b"--- a/with space\t\n+++ b/with space\t\n@@ -1 +1 @@\n-a\n+b\n")
    assert fp.path == "with space"


def test_git_empty_new_file_has_no_hunks() -> None:
    fp = one(b"diff --git a/empty b/empty\nnew file mode 100644\nindex 0000000..e69de29\n")
    assert (fp.action, fp.new_path, fp.hunks) == ("create", "empty", [])


def _git_literal(data: bytes) -> bytes:
    """A ``literal`` block the way git writes it (reference encoder for the test)."""
    z = zlib.compress(data)
    out = [b"literal %d\n" % len(data)]
    for k in range(0, len(z), 52):
        chunk = z[k:k + 52]
        n = len(chunk)
        ch = bytes([n + 64]) if n <= 26 else bytes([n - 26 + 96])
        out.append(ch + base64.b85encode(chunk.ljust((n + 3) // 4 * 4, b"\0")) + b"\n")
    return b"".join(out) + b"\n"


def _git_delta_block(delta: bytes) -> bytes:
    return _git_literal(delta).replace(b"literal", b"delta", 1)


def test_git_binary_literal_and_reverse() -> None:
    old, new = bytes(range(256)) * 3, b"\0\1\2 binary " * 40
    patch = (b"diff --git a/img.bin b/img.bin\nindex %s..%s 100644\nGIT binary patch\n"
             % (blob_hash(old).encode(), blob_hash(new).encode())
             + _git_literal(new) + _git_literal(old))
    fp = one(patch)
    assert fp.binary is not None and fp.binary.method == "literal" and fp.binary.data == new
    assert fp.binary_reverse is not None and fp.binary_reverse.data == old
    assert fp.old_hash == blob_hash(old)


def test_git_binary_delta_is_read() -> None:
    delta = bytes([3, 5, 0x91, 0, 3, 2]) + b"XY"  # copy 3 bytes from 0, insert "XY"
    fp = one(b"diff --git a/b b/b\nindex 1..2 100644\nGIT binary patch\n" + _git_delta_block(delta))
    assert fp.binary.method == "delta"
    assert apply_delta(b"abc", fp.binary.data) == b"abcXY"


def test_binary_files_differ_without_data() -> None:
    fp = one(b"diff --git a/b b/b\nindex 1..2 100644\nBinary files a/b and b/b differ\n")
    assert fp.binary is None and "carries no data" in fp.binary_problem


def test_base85_line_decoding() -> None:
    assert decode_base85_line(b"B" + base64.b85encode(b"hi\0\0")) == b"hi"
    with pytest.raises(ValueError):
        decode_base85_line(b"Z" + base64.b85encode(b"hi\0\0"))


def test_corrupt_binary_data_is_an_error() -> None:
    with pytest.raises(PatchParseError) as err:
        parse_patch(b"diff --git a/b b/b\nindex 1..2 100644\nGIT binary patch\nliteral 5\nB~~~~~\n\n",
                    source="p")
    assert str(err.value).startswith("p:5: expected a base85 line")


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("patch, line, expected, found", [
    (b"--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n", 7, "1 more old and 1 more new line(s) in hunk #1",
     "the end of the patch"),
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n*b\n+c\n", 5, "a hunk line", "'*b'"),
    (b"--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n-b\n+c\n", 5, "1 more '+' line(s) in hunk #1", "'-b'"),
    (b"--- a/f\n+++ b/f\n@@ garbage @@\n-a\n", 3, "a hunk header", "'@@ garbage @@'"),
    (b"--- a/f\n+++ b/f\nno hunk here\n", 3, "a hunk header", "'no hunk here'"),
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n-a\n\\ No newline at end of file\n+b\n a\n", 5,
     "'\\ No newline at end of file' only after the last line", None),
    (b"--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n b\n", 3, "at least one '-' or '+' line", "context lines only"),
])
def test_malformed_hunks_name_the_line(patch: bytes, line: int, expected: str, found: str | None) -> None:
    with pytest.raises(PatchParseError) as err:
        parse_patch(patch, source="web1.diff")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"web1.diff:{line}: expected {expected}")
    if found is not None:
        assert message.endswith(f"found {found}")
    assert isinstance(err.value, ValueError)


def test_no_diff_at_all() -> None:
    with pytest.raises(PatchParseError) as err:
        parse_patch(b"Just some text.\nNothing else.\n", source="x")
    assert str(err.value) == "x:1: expected a unified diff ('--- '/'+++ ' lines or 'diff --git'), found none"
    with pytest.raises(PatchParseError, match="found an empty patch"):
        parse_patch(b"")


@pytest.mark.parametrize("patch", [
    b"--- a/../etc/passwd\n+++ b/../etc/passwd\n@@ -1 +1 @@\n-a\n+b\n",
    b"--- a/etc/../../x\n+++ b/etc/../../x\n@@ -1 +1 @@\n-a\n+b\n",
    b"diff --git a/x b/x\nsimilarity index 100%\nrename from x\nrename to ../x\n",
    b"diff --git a/x b/../x\nsimilarity index 100%\nrename from x\nrename to ../x\n",
    b"diff --git a/x b/y\ncopy from x\ncopy to sub/../../y\n",
])
def test_dotdot_paths_are_refused(patch: bytes) -> None:
    with pytest.raises(UnsafePatchPath) as err:
        parse_patch(patch, source="evil.diff")
    assert "inside the tree" in str(err.value)


def test_absolute_path_is_refused_with_p0() -> None:
    patch = b"--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-a\n+b\n"
    with pytest.raises(UnsafePatchPath, match="absolute path '/etc/passwd'"):
        parse_patch(patch, strip=0)
    assert one(patch, strip=1).path == "etc/passwd"  # -p1 strips the leading '/' component


# ------------------------------------------------------------ fast reading agrees with line by line


@pytest.mark.parametrize("context", [0, 1, 3, 5])
def test_hunks_read_in_runs_equal_the_line_by_line_reading(context: int) -> None:
    """The common hunk is read without a step per line, and a run of them has its sides
    picked out at once; a hunk that needs the line-by-line reader (a blank context line
    whose space a mailer ate, a missing final newline) breaks the run.  Every hunk must
    come out exactly as the line-by-line reader makes it, whatever the context size."""
    import difflib

    from guest_init.patch.parse import _HUNK, _Parser

    old = [f"line {k}\n" for k in range(1, 200)]
    old[91] = "\n"  # an empty line next to a change: a context line " \n" in the diff
    new = list(old)
    for k in (150, 120, 90, 60, 30, 5):
        new[k] = f"changed {k}\n"
        new.insert(k, f"added {k}\n")
    diff = "".join(difflib.unified_diff(old, new, "a/f", "b/f", n=context)).encode()
    diff = diff.replace(b"\n \n", b"\n\n")  # the mailer ate the space of the empty context line
    diff += b"@@ -199 +199 @@\n-line 199\n\\ No newline at end of file\n+the end\n\\ No newline at end of file\n"
    files = parse_patch(diff)
    assert len(files) == 1
    reader = _Parser(diff, 1, "<test>")
    hunks = files[0].hunks
    for hunk in hunks:
        at = hunk.line - 1
        slow, _ = reader.hunk(at, hunk.number, _HUNK.match(reader.lines[at]))
        assert hunk == slow
    assert [h.number for h in hunks] == list(range(1, len(hunks) + 1)) and len(hunks) >= 4
    assert hunks[-1].old_lines == [b"line 199"] and hunks[-1].new_lines == [b"the end"]
    if context:
        assert any(b"\n" in h.old_lines for h in hunks)  # the mangled empty line was read as context
