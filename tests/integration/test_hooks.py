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
)
from guest_init.plan import Artifact, HookStep, validate_plan

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
