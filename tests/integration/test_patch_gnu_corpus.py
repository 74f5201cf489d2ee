"""Our patch engine against GNU patch 2.7.6 on real text files from this machine.

Each case copies a few real files (``/etc/*.conf``, ``/usr/share/common-licenses/*``,
standard-library ``.py`` files) into a base tree, edits them deterministically
(seeded line changes, insertions, deletions, new, deleted and renamed files,
a missing final newline, CRLF), and writes the patch with ``diff -urN`` or
with ``git diff -M --binary`` in a scratch repository.  The patch is then
applied by GNU ``patch -p1 -f --fuzz 2 --no-backup-if-mismatch -r -`` and by
:func:`apply_patch` to:

* the exact base: both must produce the same tree, byte for byte;
* a drifted base (lines inserted and removed between hunks, context lines
  changed, sometimes a changed line too): where GNU patch applies every hunk
  the trees must be identical (so offsets and fuzz are placed the same way);
  where it rejects hunks we must fail the same hunks of the same files, and
  leave the tree untouched.

``-f`` stops GNU patch from guessing that a failing patch is reversed and
asking about it; our own already-applied detection is tested in the unit tests.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from guest_init.patch import apply_patch

pytestmark = pytest.mark.integration

SEEDS = range(130)
GNU_PATCH = ["patch", "-p1", "-f", "--fuzz", "2", "--no-backup-if-mismatch", "-r", "-", "-s"]


def _text_files() -> list[Path]:
    """Real text files present on this machine, in a stable order."""
    candidates: list[Path] = []
    candidates += sorted(Path("/etc").glob("*.conf"))
    candidates += sorted(Path("/usr/share/common-licenses").glob("*"))
    candidates += sorted(Path(os.__file__).parent.glob("*.py"))
    out = []
    for path in candidates:
        try:
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if 300 <= len(data) <= 120_000 and b"\0" not in data and data.count(b"\n") >= 15:
            out.append(path)
    return out


CORPUS = _text_files()


def _need_tools() -> None:
    for tool in ("patch", "diff", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if len(CORPUS) < 20:
        pytest.skip("not enough text files on this machine for the corpus")


def _lines(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+", data)


def _edit(rng: random.Random, data: bytes) -> bytes:
    """A few clusters of realistic line edits (change, insert, delete)."""
    lines = _lines(data)
    for _ in range(rng.randint(1, 4)):
        if not lines:
            lines.append(b"new line\n")
            continue
        at = rng.randrange(len(lines))
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            if op < 0.45 and at < len(lines):
                lines[at] = b"# changed %d: " % rng.randrange(10**6) + lines[at].lstrip()
            elif op < 0.75:
                lines.insert(at, b"added line %d\n" % rng.randrange(10**6))
            elif at < len(lines):
                del lines[at]
            at = min(len(lines), at + rng.randint(0, 2))
    return b"".join(lines)


def _drift(rng: random.Random, data: bytes, patch_hunks: list[tuple[int, int]], hard: bool) -> bytes:
    """The base as it might have changed since the patch was made.

    Lines are inserted or removed between hunks (offsets), a context line
    next to a change is altered (fuzz); with ``hard`` a line inside a hunk's
    change region is altered too (the hunk should be rejected).
    """
    lines = _lines(data)
    edits: list[tuple[int, str]] = []
    for start, count in patch_hunks:
        if rng.random() < 0.5:
            edits.append((max(0, start - 1 - rng.randint(4, 12)), rng.choice(["insert", "delete"])))
        if rng.random() < 0.45:
            first = rng.random() < 0.5  # the first or the last context line
            edge = start - 1 if first else start - 1 + max(count - 1, 0)
            edits.append((edge, "change"))
            if rng.random() < 0.35:  # and its neighbour inside the hunk: fuzz 2
                edits.append((edge + 1 if first else edge - 1, "change"))
        if hard and rng.random() < 0.5:
            edits.append((start - 1 + count // 2, "change"))
    for at, op in sorted(edits, reverse=True):  # bottom up: earlier positions stay valid
        if not 0 <= at < len(lines):
            continue
        if op == "insert":
            for _ in range(rng.randint(1, 3)):
                lines.insert(at, b"drift %d\n" % rng.randrange(10**6))
        elif op == "delete":
            del lines[at:at + rng.randint(1, 2)]
        else:
            lines[at] = b"drifted " + lines[at]
    return b"".join(lines)


def _write_tree(root: Path, files: dict[str, bytes], modes: dict[str, int], links: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, modes.get(name, 0o644))
    for name, target in links.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)


def _snapshot(root: Path) -> dict[str, tuple[str, bytes, bool]]:
    """Everything that matters about a tree: type, content or link target, exec bit."""
    out: dict[str, tuple[str, bytes, bool]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path).encode(), False)
            else:
                out[rel] = ("file", path.read_bytes(), bool(st.st_mode & 0o100))
    for dirpath, dirnames, filenames in os.walk(root):
        if not dirnames and not filenames and Path(dirpath) != root:
            out[Path(dirpath).relative_to(root).as_posix() + "/"] = ("dir", b"", False)
    return out


def _git(repo: Path, *args: str) -> bytes:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(repo.parent), GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", "-c", "core.autocrlf=false", *args], cwd=repo, env=env,
                          capture_output=True, check=True).stdout


def _make_patch(tmp: Path, kind: str, base: Path, new: Path) -> bytes:
    if kind == "diff":
        work = tmp / "diffwork"
        shutil.copytree(base, work / "a", symlinks=True)
        shutil.copytree(new, work / "b", symlinks=True)
        proc = subprocess.run(["diff", "-urN", "a", "b"], cwd=work, capture_output=True)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.stdout
    repo = tmp / "repo"
    shutil.copytree(base, repo, symlinks=True)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    for child in repo.iterdir():
        if child.name != ".git":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for child in new.iterdir():
        dest = repo / child.name
        shutil.copytree(child, dest, symlinks=True) if child.is_dir() and not child.is_symlink() \
            else shutil.copy2(child, dest, follow_symlinks=False)
    _git(repo, "add", "-A")
    return _git(repo, "diff", "--cached", "-M", "--binary")


def _gnu_patch(tree: Path, patch: bytes) -> tuple[int, dict[str, list[int]], str]:
    """Run GNU patch; (exit code, failed hunk numbers per file, its output)."""
    proc = subprocess.run(GNU_PATCH[:-1], input=patch, cwd=tree, capture_output=True)
    out = proc.stdout.decode("utf-8", "replace")
    failed: dict[str, list[int]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"patching (?:file|symbolic link) (\S+)", line)
        if m:
            current = m.group(1).strip("'")
            continue
        m = re.match(r"Hunk #(\d+) FAILED", line)
        if m:
            failed.setdefault(current or "?", []).append(int(m.group(1)))
    return proc.returncode, failed, out + proc.stderr.decode("utf-8", "replace")


def _hunk_spans(patch: bytes) -> dict[str, list[tuple[int, int]]]:
    """(old start, old count) of every hunk, per file (for drifting around them)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    current = None
    for line in patch.split(b"\n"):
        if line.startswith(b"--- "):
            name = line[4:].split(b"\t")[0].decode("utf-8", "replace")
            current = name.split("/", 1)[1] if "/" in name else None
        m = re.match(rb"@@ -(\d+)(?:,(\d+))?", line)
        if m and current:
            spans.setdefault(current, []).append((int(m.group(1)), int(m.group(2) or 1)))
    return spans


def _build_case(seed: int) -> tuple[str, dict, dict, dict, dict, dict, dict]:
    rng = random.Random(seed)
    kind = "git" if seed % 2 else "diff"
    picks = rng.sample(CORPUS, rng.randint(1, 4))
    base: dict[str, bytes] = {}
    for k, path in enumerate(picks):
        name = f"{rng.choice(['etc', 'usr/share/doc', 'srv/app/lib', 'opt'])}/{k}-{path.name}"
        data = path.read_bytes()
        if rng.random() < 0.1:
            data = data.replace(b"\n", b"\r\n")  # a CRLF file: bytes must survive as they are
        if rng.random() < 0.1:
            data = data.rstrip(b"\n")  # no newline at the end
        base[name] = data
    base_modes = {name: 0o644 for name in base}
    base_links: dict[str, str] = {}
    new = dict(base)
    new_modes = dict(base_modes)
    new_links = dict(base_links)
    for name in list(base):
        roll = rng.random()
        if roll < 0.08 and len(new) > 1:
            del new[name], new_modes[name]  # deleted file
        elif roll < 0.16 and kind == "git":
            data = new.pop(name)  # renamed (with a small edit sometimes)
            mode = new_modes.pop(name)
            renamed = name.rsplit("/", 1)[0] + "/renamed-" + name.rsplit("/", 1)[1]
            new[renamed] = _edit(rng, data) if rng.random() < 0.5 else data
            new_modes[renamed] = mode
        else:
            new[name] = _edit(rng, new[name])
            if rng.random() < 0.1:
                new[name] = new[name].rstrip(b"\r\n")
            if kind == "git" and rng.random() < 0.1:
                new_modes[name] = 0o755
    if rng.random() < 0.3:
        src = rng.choice(CORPUS).read_bytes()
        new[f"etc/new.d/{seed}.conf"] = b"".join(_lines(src)[: rng.randint(1, 40)])
        new_modes[f"etc/new.d/{seed}.conf"] = 0o644
    if kind == "git" and rng.random() < 0.15:
        new_links[f"etc/link-{seed}"] = rng.choice(sorted(new))  # a new symlink, inside the tree
    return kind, base, base_modes, base_links, new, new_modes, new_links


@pytest.mark.parametrize("seed", SEEDS)
def test_same_result_as_gnu_patch(seed: int, tmp_path: Path) -> None:
    _need_tools()
    kind, base, base_modes, base_links, new, new_modes, new_links = _build_case(seed)
    _write_tree(tmp_path / "base", base, base_modes, base_links)
    _write_tree(tmp_path / "new", new, new_modes, new_links)
    patch = _make_patch(tmp_path, kind, tmp_path / "base", tmp_path / "new")
    if not patch:
        pytest.skip("the edits cancelled out")
    rng = random.Random(seed * 7919 + 1)

    # (a) the exact base: GNU patch and we must both produce the new tree.
    spans = _hunk_spans(patch)
    targets = {"exact": dict(base)}
    drifted = dict(base)
    for name, hunks in spans.items():
        if name in drifted:
            drifted[name] = _drift(rng, drifted[name], hunks, hard=rng.random() < 0.3)
    targets["drifted"] = drifted

    for label, files in targets.items():
        gnu_dir, our_dir = tmp_path / f"gnu-{label}", tmp_path / f"ours-{label}"
        _write_tree(gnu_dir, files, base_modes, base_links)
        _write_tree(our_dir, files, base_modes, base_links)
        before = _snapshot(our_dir)
        code, gnu_failed, gnu_out = _gnu_patch(gnu_dir, patch)
        result = apply_patch(patch, our_dir, strip=1, fuzz=2, source=f"seed{seed}-{kind}")
        ours_failed = {f.path: f.failed_hunks for f in result.files if f.failed_hunks}
        context = f"{label} {kind} seed {seed}\nGNU patch said:\n{gnu_out}\nwe said:\n{result.render()}"
        if code == 0:
            assert result.status == "applied", context
            assert _snapshot(our_dir) == _snapshot(gnu_dir), context
            if label == "exact":
                assert _snapshot(our_dir) == _snapshot(tmp_path / "new"), context
        else:
            assert label == "drifted", context
            assert result.status == "failed", context
            assert ours_failed == gnu_failed, context
            assert _snapshot(our_dir) == before, "a failed patch changed the tree\n" + context
            leftovers = [p for p in our_dir.rglob(".*") if "supercharge" in p.name]
            assert not leftovers, leftovers


def _numbered(first: int, last: int) -> bytes:
    return b"".join(b"line %d\n" % k for k in range(first, last + 1))


_FIRST_HUNK = "@@ -1,7 +1,7 @@\n line 1\n line 2\n line 3\n-line 4\n+LINE 4\n line 5\n line 6\n line 7\n"
_SECOND_HUNK = "@@ -6,7 +6,7 @@\n line 6\n line 7\n line 8\n-line 9\n+LINE 9\n line 10\n line 11\n line 12\n"
_LAST_LINES_HUNK = "@@ -7,3 +7,3 @@\n line 7\n line 8\n-line 9\n+LINE 9\n"  # made at the end of the file
_NO_NEWLINE_HUNK = ("@@ -7,3 +7,3 @@\n line 7\n line 8\n-line 9\n\\ No newline at end of file\n"
                    "+LINE 9\n\\ No newline at end of file\n")
#: Hunks whose places overlap (the second starts inside the first's trailing context), and
#: one that does not but is placed another way than the first.
#: Name -> (file, second hunk, its line in the file, as GNU patch places it).
_OVERLAPS = {
    "second hunk inside the first's trailing context": (_numbered(1, 30), _SECOND_HUNK, 6),
    "the same, its text again further on (the nearer place wins)":
        (_numbered(1, 30) + _numbered(6, 12), _SECOND_HUNK, 6),
    "the same on a drifted file": (b"local 1\nlocal 2\n" + _numbered(1, 30), _SECOND_HUNK, 8),
    "its text only further on":
        (_numbered(1, 9) + b"other 10\n" + _numbered(11, 30) + _numbered(6, 12), _SECOND_HUNK, 31),
    "a last-lines hunk inside the first's trailing context": (_numbered(1, 9), _LAST_LINES_HUNK, 7),
    "a last-lines hunk further on (not overlapping)": (_numbered(1, 9) + _numbered(1, 9), _LAST_LINES_HUNK, 16),
    "a hunk without a final newline inside the first's trailing context":
        (_numbered(1, 9)[:-1], _NO_NEWLINE_HUNK, 7),
}


@pytest.mark.parametrize("case", sorted(_OVERLAPS))
def test_overlapping_hunks_go_where_gnu_patch_puts_them(case: str, tmp_path: Path) -> None:
    # The first hunk's trailing context is copied out with it and the next hunk searched
    # for after it; a second hunk that GNU patch finds inside that context (or nearer to
    # its stated line than the place found after it) must be placed as GNU places it.
    _need_tools()
    text, second, line = _OVERLAPS[case]
    patch = f"--- a/f\n+++ b/f\n{_FIRST_HUNK}{second}".encode()
    for side in ("gnu", "ours"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "f").write_bytes(text)
    code, failed, out = _gnu_patch(tmp_path / "gnu", patch)
    assert code == 0 and not failed, out
    result = apply_patch(patch, tmp_path / "ours")
    assert result.status == "applied", result.render()
    assert (tmp_path / "ours" / "f").read_bytes() == (tmp_path / "gnu" / "f").read_bytes()
    assert [h.line for h in result.files[0].hunks][1] == line
