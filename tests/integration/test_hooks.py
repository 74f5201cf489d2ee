"""The hooks stage for real: busybox-static roots, chroot, process groups, bind mounts.

Needs root (chroot, mount) and Debian's busybox-static at /bin/busybox.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from guest_init.hooks import (
    BASE_ENVIRONMENT,
    HookError,
    HookFailed,
    bind_api_mounts,
    hook_environment,
    run_hook,
    run_hooks,
    run_hooks_staged,
)
from guest_init.plan import Artifact, HookStep, validate_plan
from guest_init.transaction import TXN_DIR, Transaction, recover

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "sleep", "id", "hostname", "env", "ls", "setsid", "kill", "yes", "head",
           "true", "grep")
REPO = Path(__file__).resolve().parents[2]

if os.geteuid() != 0:
    pytest.skip("hooks need root (chroot, mount)", allow_module_level=True)
if not BUSYBOX.is_file():
    pytest.skip("busybox-static is not installed (/bin/busybox)", allow_module_level=True)


def make_root(path: Path, dirs: tuple[str, ...] = ("etc", "tmp", "run", "proc", "sys", "dev", "root")) -> Path:
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    for d in dirs:
        (path / d).mkdir()
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


def hook(script: str, name: str = "h", **kw) -> HookStep:
    return HookStep(name=name, script=textwrap.dedent(script).encode(), **kw)


def mounts_under(root: Path) -> list[str]:
    prefix = str(Path(os.path.realpath(root))) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix) or p == prefix[:-1]]


def processes_in(root: Path) -> list[int]:
    real = os.path.realpath(root)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            link = os.readlink(f"/proc/{name}/root")
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (link == real or link.startswith(real + "/")):
            found.append(int(name))
    return found


def pgrep(pattern: str) -> list[str]:
    proc = subprocess.run(["pgrep", "-af", pattern], check=False, capture_output=True, text=True)
    return proc.stdout.splitlines()


def leftover_scripts(root: Path) -> list[Path]:
    return [p for d in ("run", "tmp") if (root / d).is_dir() for p in (root / d).iterdir()
            if p.name.startswith(".supercharge-hook-")]


# ------------------------------------------------------------------ basic running


def test_output_exit_code_and_interleaving(root: Path) -> None:
    result = run_hook(root, hook("""\
        echo out1
        echo err1 >&2
        echo out2
        id -u
        exit 0
        """, name="basic"), env={})
    assert result.ok, result
    assert result.exit_code == 0 and result.signal is None and not result.timed_out
    assert result.output == "out1\nerr1\nout2\n0\n"
    assert result.name == "basic" and result.interpreter == "/bin/sh"
    assert 0 < result.seconds < 5
    assert result.to_record()["status"] == "ok"
    assert leftover_scripts(root) == []


def test_nonzero_exit(root: Path) -> None:
    result = run_hook(root, hook("echo failing; exit 3"), env={})
    assert result.exit_code == 3 and not result.ok
    assert result.output == "failing\n"
    assert result.describe() == "exit status 3"


def test_environment_is_clean_and_documented(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIxyz")
    monkeypatch.setenv("_PYI_ARCHIVE_FILE", "/init")
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    plan = validate_plan({"version": 1, "name": "web1", "mounts": [
        {"device": {"label": "usr"}, "target": "/usr", "options": ["ro"]},
        {"device": {"label": "web1-root"}, "target": "/"},
    ]})
    env = hook_environment(plan)
    assert env == {"SUPERCHARGE_DOMAIN": "web1", "SUPERCHARGE_PLAN_DIGEST": plan.digest,
                   "SUPERCHARGE_MOUNTS": "/:LABEL=web1-root /usr:LABEL=usr"}
    result = run_hook(root, hook("env", name="show-env"), env=env)
    assert result.ok, result
    seen = dict(line.split("=", 1) for line in result.output.splitlines())
    expected = {**BASE_ENVIRONMENT, **env, "SUPERCHARGE_HOOK": "show-env", "SUPERCHARGE_STAGE": "hooks"}
    shell_own = {"PWD", "SHLVL", "OLDPWD"}  # set by busybox sh itself
    assert {k: v for k, v in seen.items() if k not in shell_own} == expected
    assert seen.get("PWD", "/") == "/"
    assert "LD_LIBRARY_PATH" not in seen and "_PYI_ARCHIVE_FILE" not in seen and "SOMETHING_ELSE" not in seen


def test_invalid_environment_is_refused(root: Path) -> None:
    with pytest.raises(HookError, match="invalid environment entry"):
        run_hook(root, hook("true"), env={"A=B": "x"})


def test_chroot_writes_land_in_root(root: Path) -> None:
    name = f"supercharge-hook-test-{uuid.uuid4().hex}"
    (root / "etc" / "hostname").write_text("inside\n")
    result = run_hook(root, hook(f"""\
        echo written > /etc/{name}
        cat /etc/hostname
        pwd
        """), env={})
    assert result.ok, result
    assert result.output == "inside\n/\n"
    assert (root / "etc" / name).read_text() == "written\n"
    assert not Path("/etc", name).exists()
    assert leftover_scripts(root) == []


def test_fetched_script_by_path(root: Path, tmp_path: Path) -> None:
    local = tmp_path / "fetched.sh"  # as the fetch stage leaves it, outside the root
    local.write_bytes(b"echo from a fetched script: $SUPERCHARGE_HOOK\n")
    step = HookStep(name="fetched", source=Artifact("http://10.0.2.2:8000/h.sh", "0" * 64))
    result = run_hook(root, step, script_path=local, env={})
    assert result.ok and result.output == "from a fetched script: fetched\n"
    results = run_hooks(root, [step], {}, {"fetched": local})
    assert [r.output for r in results] == [result.output]
    results = run_hooks(root, [step], {}, {step.source: local})
    assert results[0].ok
    with pytest.raises(HookError, match="was not fetched"):
        run_hook(root, step, env={})


# --------------------------------------------------------------- errors before fork


def test_missing_interpreter_is_a_clear_error(root: Path) -> None:
    step = hook("echo never", name="needs-bash", interpreter="/bin/bash")
    with pytest.raises(HookError, match=r"interpreter /bin/bash not found in the target root") as info:
        run_hook(root, step, env={})
    assert info.value.hook == "needs-bash"
    with pytest.raises(HookFailed, match="'needs-bash' failed") as failed:
        run_hooks(root, [hook("echo first", name="first"), step], {})
    assert [r.name for r in failed.value.results] == ["first", "needs-bash"]
    assert failed.value.results[0].output == "first\n"
    last = failed.value.results[-1]
    assert last.exit_code is None and "not found in the target root" in last.error
    assert leftover_scripts(root) == []


def test_exec_failure_in_child_is_reported(root: Path) -> None:
    bogus = root / "bin" / "bogus"
    bogus.write_bytes(b"\x00\x01 not a program\n")
    bogus.chmod(0o755)
    result = run_hook(root, hook("echo never", interpreter="/bin/bogus"), env={})
    assert result.exit_code == 127 and not result.ok
    assert result.error.startswith("cannot start the hook: exec /bin/bogus")
    assert "Exec format error" in result.error
    assert result.error in result.output


def test_nowhere_to_put_the_script(tmp_path: Path) -> None:
    bare = make_root(tmp_path / "bare", dirs=())
    with pytest.raises(HookError, match="nowhere to put the script"):
        run_hook(bare, hook("true"), env={})


def test_refuses_the_agent_root() -> None:
    with pytest.raises(HookError, match="refusing"):
        run_hook(Path("/"), hook("true"), env={})


# --------------------------------------------------------------- run_hooks failures


def test_failure_stops_the_run_with_every_result(root: Path) -> None:
    steps = [hook("echo one; echo one > /tmp/one", name="first"),
             hook("echo two; echo oops >&2; exit 3", name="second"),
             hook("echo three > /tmp/three", name="third")]
    with pytest.raises(HookFailed) as info:
        run_hooks(root, steps, {"SUPERCHARGE_DOMAIN": "d"})
    exc = info.value
    assert "'second'" in str(exc) and "exit status 3" in str(exc)
    assert exc.hook == "second"
    assert [(r.name, r.exit_code, r.output) for r in exc.results] == [
        ("first", 0, "one\n"), ("second", 3, "two\noops\n")]
    assert exc.failed is exc.results[-1]
    assert (root / "tmp" / "one").exists() and not (root / "tmp" / "three").exists()


def test_all_succeed(root: Path) -> None:
    results = run_hooks(root, [hook("echo a", name="a"), hook("echo b", name="b")], {})
    assert [(r.name, r.output) for r in results] == [("a", "a\n"), ("b", "b\n")]


def test_signal_death_is_reported(root: Path) -> None:
    result = run_hook(root, hook("echo dying; kill -KILL $$"), env={})
    assert result.signal == signal.SIGKILL and result.exit_code is None and not result.timed_out
    assert result.output == "dying\n" and "SIGKILL" in result.describe()
    with pytest.raises(HookFailed, match="killed by SIGSEGV"):
        run_hooks(root, [hook("kill -SEGV $$", name="segv")], {})


# ------------------------------------------------------- timeouts and process groups


def test_timeout_kills_the_hook_and_its_children(root: Path) -> None:
    with bind_api_mounts(root):
        started = time.monotonic()
        result = run_hook(root, hook("""\
            echo started
            sleep 9871 &
            sleep 9872
            echo never
            """, timeout=0.5), env={})
        elapsed = time.monotonic() - started
    assert result.timed_out and not result.ok
    assert result.signal == signal.SIGTERM
    assert result.output == "started\n"
    assert elapsed < 3
    assert "timed out" in result.describe()
    assert pgrep("sleep 987[12]") == []
    assert processes_in(root) == []


def test_timeout_escalates_to_sigkill(root: Path) -> None:
    with bind_api_mounts(root):
        result = run_hook(root, hook("""\
            trap '' TERM
            echo stubborn
            sleep 9873
            """, timeout=0.3), env={}, kill_grace=0.5)
    assert result.timed_out and result.signal == signal.SIGKILL
    assert 0.7 < result.seconds < 3
    assert result.output == "stubborn\n"
    assert pgrep("sleep 9873") == [] and processes_in(root) == []


def test_background_children_outliving_the_hook_are_killed(root: Path) -> None:
    with bind_api_mounts(root):
        started = time.monotonic()
        result = run_hook(root, hook("""\
            sleep 9874 &
            setsid sleep 9875 &
            echo done
            """), env={})
        elapsed = time.monotonic() - started
    assert result.ok, result
    assert result.output == "done\n"
    assert result.leftovers == 2
    assert elapsed < 3
    assert pgrep("sleep 987[45]") == [] and processes_in(root) == []


def test_orphans_are_reaped_as_pid1_would(root: Path) -> None:
    """In a child subreaper (what PID 1 is), orphans of the hook are reaped, ours kept."""
    code = textwrap.dedent("""\
        import ctypes, json, os, sys
        from pathlib import Path
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        from guest_init.hooks import run_hook
        from guest_init.plan import HookStep
        script = b"(sleep 9876 &); (setsid sleep 9877 &); sleep 0.2; exit 5"
        result = run_hook(Path(sys.argv[1]), HookStep(name="orphans", script=script), env={},
                          reap_orphans=True)
        me = str(os.getpid())
        kids = []
        for name in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                kids.append([name, fields[0]])
        print(json.dumps({"exit": result.exit_code, "leftovers": result.leftovers, "kids": kids}))
        """)
    with bind_api_mounts(root):
        proc = subprocess.run([sys.executable, "-c", code, str(root)], check=False, capture_output=True,
                              text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit"] == 5
    assert out["leftovers"] == 2
    assert out["kids"] == []  # no zombie (nor live) child left behind
    assert pgrep("sleep 987[67]") == []


# ---------------------------------------------------------------------- output limit


def test_huge_output_is_tail_truncated(root: Path) -> None:
    result = run_hook(root, hook("yes 0123456789 | head -n 200000; echo THE-END"), env={})
    assert result.ok, result
    total = 200000 * 11 + len("THE-END\n")
    assert result.output_bytes == total
    assert result.truncated and result.to_record()["truncated"]
    marker, _, tail = result.output.partition("\n")
    match = re.fullmatch(r"\[supercharge: (\d+) bytes of earlier output cut \((\d+) in all\); "
                         r"the last (\d+) follow\]", marker)
    assert match, marker
    cut, in_all, kept = map(int, match.groups())
    assert in_all == total and kept == 64 * 1024 and cut == total - kept
    assert len(tail.encode()) == kept
    assert tail.endswith("0123456789\nTHE-END\n")


def test_small_output_limit_and_utf8_cut(root: Path) -> None:
    result = run_hook(root, hook("echo 'héhéhéhéhé'; echo end"), env={}, output_limit=8)
    assert result.truncated
    assert result.output.endswith("\nend\n")
    assert "\ufffd" not in result.output
    untouched = run_hook(root, hook("echo short"), env={}, output_limit=8)
    assert untouched.output == "short\n" and not untouched.truncated


# ------------------------------------------------------------------------ API mounts


def test_bind_api_mounts_inside_and_gone_after(root: Path) -> None:
    (root / "run" / "on-disk").write_text("hidden by the tmpfs\n")
    before = mounts_under(root)
    assert before == []
    with bind_api_mounts(root) as mounted:
        assert mounted == [root / "proc", root / "sys", root / "dev", root / "run"]
        during = mounts_under(root)
        for d in ("proc", "sys", "dev", "run"):
            assert str(root / d) in during
        result = run_hook(root, hook("""\
            cat /proc/self/comm
            ls /sys/kernel >/dev/null && echo sys-ok
            echo discarded > /dev/null && echo dev-ok
            ls /run
            echo temporary > /run/made-by-hook
            """), env={})
        assert result.ok, result
        assert result.output == "cat\nsys-ok\ndev-ok\n"  # the fresh /run: only the (hidden) script
        assert (root / "run" / "made-by-hook").exists()
    assert mounts_under(root) == []
    assert not (root / "run" / "made-by-hook").exists()
    assert (root / "run" / "on-disk").read_text() == "hidden by the tmpfs\n"
    assert os.listdir(root / "proc") == []


def test_bind_api_mounts_unwinds_on_failure(root: Path) -> None:
    (root / "sys").rmdir()
    (root / "sys").write_text("not a directory")
    with pytest.raises(HookError, match="/sys"), bind_api_mounts(root):
        pytest.fail("must not get here")
    assert mounts_under(root) == []


def test_bind_api_mounts_creates_missing_points_and_unmounts_on_error(tmp_path: Path) -> None:
    bare = make_root(tmp_path / "bare", dirs=())
    with pytest.raises(RuntimeError), bind_api_mounts(bare):
        assert (bare / "proc" / "self").exists()
        raise RuntimeError("a failing body")
    assert mounts_under(bare) == []
    assert sorted(p.name for p in bare.iterdir()) == ["bin", "dev", "proc", "run", "sys"]



# ------------------------------------------- hooks in a view of the staged transaction

VIEW_APPLETS = ("rm", "mkdir", "ln", "chmod", "chown", "mv", "touch", "test", "mkfifo", "stat")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` on its own file system or the ones mounted in it: kind, mode,
    owner, mtime, and the content (files) or target (symlinks).  Equal snapshots: nothing changed."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(dirpath) / name
            st = path.lstat()
            key = path.relative_to(root).as_posix()
            meta = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if path.is_symlink():
                out[key] = ("link", os.readlink(path), *meta)
            elif path.is_file():
                out[key] = ("file", path.read_bytes(), *meta)
            else:
                out[key] = ("other", *meta)
    return out


@pytest.fixture
def target(tmp_path: Path):
    """A busybox root with /etc on a file system of its own (a tmpfs), as with an /etc VBD."""
    top = make_root(tmp_path / "target", dirs=("etc", "tmp", "root"))
    for d in ("opt/app/old", "var/lib"):
        (top / d).mkdir(parents=True)
    for applet in VIEW_APPLETS:
        (top / "bin" / applet).symlink_to("busybox")
    (top / "opt/app/old/data").write_text("old data\n")
    (top / "opt/app/keep").write_text("keep\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "sc-test-etc", str(top / "etc")], check=True)
    try:
        (top / "etc/hostname").write_text("unconfigured\n")
        (top / "etc/hosts").write_text("127.0.0.1 localhost\n")
        (top / "etc/obsolete").write_text("remove me\n")
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top / "etc")], check=False)


def staged_txn(top: Path) -> Transaction:
    txn = Transaction(top, ["/", "/etc"])
    txn.write("/etc/hostname", b"web1\n")
    txn.write("/opt/app/version", b"2.1\n", mode=0o640)
    txn.delete("/etc/obsolete")
    return txn


def test_hooks_see_the_staged_target_and_their_changes_join_the_transaction(target: Path,
                                                                           tmp_path: Path) -> None:
    before = snapshot(target)
    txn = staged_txn(target)
    step = hook("""\
        set -e
        echo "hostname=$(cat /etc/hostname) version=$(cat /opt/app/version)"
        test ! -e /etc/obsolete && echo obsolete-gone
        test -e /proc/self/status && test -c /dev/null && echo api-ok
        echo 10.0.0.2 db >> /etc/hosts
        echo hooked > /etc/hook-ran
        rm -rf /opt/app/old
        rm /opt/app/keep
        ln -s ../etc/hostname /opt/app/link
        mkdir -p /var/lib/app/cache
        chmod 0700 /var/lib/app
        chown 12:34 /opt/app/version
        chmod 0600 /etc/hostname
        echo scratch > /run/not-kept
        """, name="configure")

    results, changed = run_hooks_staged(txn, [step], {"SUPERCHARGE_DOMAIN": "web1"}, work=tmp_path / "work")

    assert results[0].ok, results[0]
    assert results[0].output == "hostname=web1 version=2.1\nobsolete-gone\napi-ok\n"
    assert sorted(changed) == ["/etc/hook-ran", "/etc/hostname", "/etc/hosts", "/opt/app/keep",
                               "/opt/app/link", "/opt/app/old", "/opt/app/version", "/var/lib/app",
                               "/var/lib/app/cache"]
    assert snapshot(target) == before                          # nothing on disk before the commit
    assert mounts_under(tmp_path / "work") == []               # the view is gone
    assert not (target / "proc").exists() and not (target / "run").exists()

    summary = txn.commit()

    assert summary["file_systems"] == ["/", "/etc"]
    assert (target / "etc/hostname").read_text() == "web1\n"
    assert (target / "etc/hostname").stat().st_mode & 0o777 == 0o600
    assert (target / "etc/hosts").read_text() == "127.0.0.1 localhost\n10.0.0.2 db\n"
    assert (target / "etc/hook-ran").read_text() == "hooked\n"
    assert not (target / "etc/obsolete").exists()
    version = (target / "opt/app/version").stat()
    assert (version.st_uid, version.st_gid, version.st_mode & 0o777) == (12, 34, 0o640)
    assert not (target / "opt/app/old").exists() and not (target / "opt/app/keep").exists()
    assert os.readlink(target / "opt/app/link") == "../etc/hostname"
    assert (target / "var/lib/app").stat().st_mode & 0o777 == 0o700
    assert (target / "var/lib/app/cache").is_dir()
    for fs in (target, target / "etc"):
        assert not (fs / TXN_DIR).exists()
    # Neither the API mount points the view needed nor the hook's /run reached the disk.
    assert not any((target / d).exists() for d in ("proc", "sys", "dev", "run"))


@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_a_failed_or_hung_hook_changes_nothing(target: Path, tmp_path: Path, how: str) -> None:
    before = snapshot(target)
    txn = staged_txn(target)
    staged = dict(txn.changes)
    ending = "echo giving up >&2; exit 4" if how == "fails" else "echo waiting; sleep 9878"
    steps = [hook("echo first >> /etc/hosts", name="first"),
             hook(f"""\
                 echo changed > /etc/hostname
                 rm -rf /opt/app
                 mkdir /etc/new-dir
                 {ending}
                 """, name="second", timeout=1),
             hook("echo never > /etc/third", name="third")]

    with pytest.raises(HookFailed) as info:
        run_hooks_staged(txn, steps, {}, work=tmp_path / "work", kill_grace=0.5)

    failed = info.value.failed
    assert [r.name for r in info.value.results] == ["first", "second"]
    if how == "fails":
        assert failed.exit_code == 4 and failed.output == "giving up\n"
    else:
        assert failed.timed_out and failed.output == "waiting\n"
    assert txn.changes == staged                               # the transaction is as it was
    assert snapshot(target) == before                          # and so is the disk
    assert mounts_under(tmp_path / "work") == [] and mounts_under(target) == [str(target / "etc")]
    assert pgrep("sleep 9878") == [] and processes_in(tmp_path / "work") == []
    assert recover(target, ["/", "/etc"]) is None


def test_read_only_file_systems_stay_read_only_in_the_view(target: Path, tmp_path: Path) -> None:
    usr = target / "usr"
    usr.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "sc-test-usr", str(usr)], check=True)
    try:
        txn = Transaction(target, ["/", "/etc", "/usr"])
        result, = run_hooks_staged(txn, [hook("touch /usr/x 2>&1 || echo refused; touch /etc/x")], {},
                                   work=tmp_path / "work")[0]
        assert "Read-only file system" in result.output and "refused" in result.output
        assert list(txn.changes) == ["/etc/x"]
    finally:
        subprocess.run(["umount", "-l", str(usr)], check=False)


def test_replacing_and_renaming_directories(target: Path, tmp_path: Path) -> None:
    (target / "opt/app/old/sub").mkdir()
    (target / "opt/app/old/sub/deep").write_text("deep\n")
    (target / "opt/app/was-file").write_text("file\n")
    txn = Transaction(target, ["/", "/etc"])
    txn.write("/opt/app/staged-dir/inner", b"staged\n")
    step = hook("""\
        set -e
        mv /opt/app/old /opt/app/renamed
        rm -rf /opt/app/staged-dir && mkdir /opt/app/staged-dir && echo fresh > /opt/app/staged-dir/new
        rm /opt/app/was-file && mkdir /opt/app/was-file && echo inside > /opt/app/was-file/f
        rm /opt/app/keep && mkdir /opt/app/keep
        """)
    results, _ = run_hooks_staged(txn, [step], {}, work=tmp_path / "work")
    assert results[0].ok, results[0]
    txn.commit()
    app = target / "opt/app"
    assert sorted(p.name for p in app.iterdir()) == ["keep", "renamed", "staged-dir", "was-file"]
    assert (app / "renamed/data").read_text() == "old data\n"
    assert (app / "renamed/sub/deep").read_text() == "deep\n"
    assert sorted(p.name for p in (app / "staged-dir").iterdir()) == ["new"]
    assert (app / "was-file/f").read_text() == "inside\n"
    assert (app / "keep").is_dir() and not any((app / "keep").iterdir())


def test_what_a_transaction_cannot_hold_fails_the_hooks(target: Path, tmp_path: Path) -> None:
    before = snapshot(target)
    txn = Transaction(target, ["/", "/etc"])
    with pytest.raises(HookError, match="/etc/fifo: a fifo cannot be committed"):
        run_hooks_staged(txn, [hook("mkfifo /etc/fifo")], {}, work=tmp_path / "work")
    assert snapshot(target) == before and mounts_under(tmp_path / "work") == []


def test_a_hook_that_changes_nothing_stages_nothing(target: Path, tmp_path: Path) -> None:
    txn = staged_txn(target)
    staged = dict(txn.changes)
    results, changed = run_hooks_staged(
        txn, [hook("touch /etc/hosts /etc/hostname; cat /etc/hosts > /dev/null; echo x > /run/x")], {},
        work=tmp_path / "work")
    assert results[0].ok and changed == [] and txn.changes == staged


def test_a_copy_on_write_root_works_as_a_lower_layer(tmp_path: Path) -> None:
    """A plan's overlay root (shared image below, the domain's layer above) under the hooks' view:
    overlayfs on overlayfs, the deepest stacking the kernel allows."""
    shared = make_root(tmp_path / "shared", dirs=("etc", "tmp", "root"))
    for applet in VIEW_APPLETS:
        (shared / "bin" / applet).symlink_to("busybox")
    (shared / "etc/hostname").write_text("shared\n")
    layer = tmp_path / "domain-layer"
    for d in ("upper", "work"):
        (layer / d).mkdir(parents=True)
    root = tmp_path / "sysroot"
    root.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={shared},upperdir={layer}/upper,workdir={layer}/work", str(root)], check=True)
    try:
        txn = Transaction(root, ["/"])
        txn.write("/etc/hostname", b"web-a\n")
        results, changed = run_hooks_staged(txn, [hook("cat /etc/hostname; echo on > /etc/feature")], {},
                                            work=tmp_path / "work")
        assert results[0].output == "web-a\n" and changed == ["/etc/feature"]
        txn.commit()
        assert (root / "etc/feature").read_text() == "on\n"
        assert (layer / "upper/etc/hostname").read_text() == "web-a\n"   # in the domain's layer
        assert (shared / "etc/hostname").read_text() == "shared\n"       # the shared image untouched
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
