"""The guest pipeline for real: DHCP, fetch over HTTP from dom0, copy, patch, extract, hook,
all committed at once; a second boot converges; a patch that does not fit, a hook that fails
and a hook that hangs past its timeout each change nothing (checked file by file from dom0) and
are diagnosed from dom0.

The HTTP server listens on 127.0.0.1; the guest reaches it as 10.0.2.2 (qemu user networking).
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.cpio import CpioWriter
from dom0.rootfs import busybox_tree, make_ext4_image

from .conftest import HOSTS, HOSTS_PATCH, replayed, root_disk, signed_domain

pytestmark = pytest.mark.boot

LABEL = "sc-pipe-root"
MAC = "52:54:00:12:34:56"
INIT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
echo "pipe-init: hostname=$(cat /etc/hostname)"
echo "pipe-init: motd=$(cat /etc/motd)"
echo "pipe-init: hosts=$(cat /etc/hosts | tr '\\n' '|')"
echo "pipe-init: app=$(cat /opt/app/version)"
echo "pipe-init: hook-runs=$(wc -l < /etc/hook-ran)"
poweroff -f
"""
PATCH = HOSTS_PATCH
BAD_PATCH = b"""--- a/hosts
+++ b/hosts
@@ -1,3 +1,3 @@
 127.0.0.1 localhost
 10.0.0.1 router
-10.0.0.2 database
+10.0.0.9 database
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving the artifacts; yields (dir, port)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (root / "motd").write_bytes(b"welcome to web1\n")
    (root / "hosts.patch").write_bytes(PATCH)
    (root / "bad.patch").write_bytes(BAD_PATCH)
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_file("version", b"app 2.1\n", 0o644)
    writer.close()
    (root / "app.cpio").write_bytes(buf.getvalue())
    yield root, server.server_address[1]
    server.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(served_dir: Path, port: int, patch: str) -> dict:
    base = f"http://10.0.2.2:{port}"
    return {
        "version": 1, "name": "web1", "failure_policy": "halt", "device_timeout": 20,
        "network": {"interfaces": [{"match": {"mac": MAC}, "dhcp": True}], "timeout": 30},
        "mounts": [{"device": {"label": LABEL}, "target": "/"}],
        "steps": [
            {"op": "replace", "path": "/etc/hostname", "content": "web1\n"},
            {"op": "copy", "path": "/etc/motd", "uri": f"{base}/motd", "sha256": _sha(served_dir / "motd")},
            {"op": "patch", "uri": f"{base}/{patch}", "sha256": _sha(served_dir / patch), "dir": "/etc"},
            {"op": "extract", "uri": f"{base}/app.cpio", "sha256": _sha(served_dir / "app.cpio"),
             "dir": "/opt/app"},
            {"op": "hook", "name": "mark",
             "script": 'echo "$SUPERCHARGE_DOMAIN $SUPERCHARGE_PLAN_DIGEST" >> /etc/hook-ran\n'},
        ],
    }


def _domain(tmp, kernel, keys, plan: dict, name: str, disk: Path) -> Path:
    return signed_domain(tmp, kernel, keys, plan, name, [root_disk(disk)], MAC)


def _boot(tmp, cfg: Path, name: str) -> tuple[int, dict, str]:
    code = boot_domain(cfg, timeout=300, after="wait", state_dir=tmp / "state", quiet=True)
    state = tmp / "state" / name
    return code, json.loads((state / "report.json").read_text()), (state / "console.log").read_text(errors="replace")


def _record(report: dict, stage: str) -> dict:
    return [r for r in report["records"] if r["stage"] == stage][-1]


def _root_image(tmp: Path) -> Path:
    tree = busybox_tree(tmp / "root", INIT, hostname="unconfigured")
    for applet in ("tr", "wc"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "hosts").write_bytes(HOSTS)
    (tree / "opt").mkdir()
    return make_ext4_image(tree, tmp / "root.img", LABEL)


def test_pipeline_applies_everything_then_converges(tmp_path, kernel, served, signing_keys):
    served_dir, port = served
    disk = _root_image(tmp_path)
    cfg = _domain(tmp_path, kernel, signing_keys, _plan(served_dir, port, "hosts.patch"), "web1", disk)

    code, report, console = _boot(tmp_path, cfg, "web1")

    assert code == 0, console[-4000:]
    assert "pipe-init: hostname=web1" in console
    assert "pipe-init: motd=welcome to web1" in console
    assert "pipe-init: hosts=127.0.0.1 localhost|10.0.0.1 gateway|10.0.0.9 db|" in console
    assert "pipe-init: app=app 2.1" in console
    assert "pipe-init: hook-runs=1" in console
    network = _record(report, "network")
    assert network["status"] == "ok", network
    fetch = _record(report, "fetch")
    assert [a["pinned"] for a in fetch["details"]["artifacts"]] == [True, True, True]
    apply = _record(report, "apply")
    assert [s["op"] for s in apply["details"]["steps"]] == ["replace", "copy", "patch", "extract"]
    hooks = _record(report, "hooks")
    assert hooks["details"]["hooks"][0]["exit_code"] == 0
    assert hooks["details"]["changed"] == ["/etc/hook-ran"]
    commit = _record(report, "commit")
    assert commit["status"] == "ok" and commit["details"]["recorded"] == "/var/lib/supercharge/applied.json"

    # The same plan again on the same disk: nothing applied twice, nothing fails.
    code, report, console = _boot(tmp_path, cfg, "web1")
    assert code == 0, console[-4000:]
    assert _record(report, "apply")["details"]["converged"] is True
    assert "pipe-init: hook-runs=1" in console
    assert "pipe-init: hosts=127.0.0.1 localhost|10.0.0.1 gateway|10.0.0.9 db|" in console


def test_patch_that_does_not_fit_changes_nothing_and_is_diagnosed(tmp_path, kernel, served, signing_keys):
    served_dir, port = served
    disk = _root_image(tmp_path)
    before = _files(disk, tmp_path)
    cfg = _domain(tmp_path, kernel, signing_keys, _plan(served_dir, port, "bad.patch"), "web2", disk)

    code, report, console = _boot(tmp_path, cfg, "web2")

    assert code == 1
    assert "pipe-init" not in console
    apply = _record(report, "apply")
    assert apply["status"] == "failed"
    assert apply["details"]["step"] == 2 and apply["details"]["committed"] is False
    assert report["outcome"]["outcome"] == "halted"
    # Nothing committed: the earlier replace and copy never reached the disk, nor anything else.
    debugfs = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(disk)], capture_output=True, text=True)
    assert debugfs.stdout == "unconfigured\n"
    assert _files(disk, tmp_path) == before

    diagnosis = subprocess.run([sys.executable, "-m", "dom0", "diagnose", str(tmp_path / "state" / "web2" / "report.json")],
                               capture_output=True, text=True)
    assert diagnosis.returncode == 1
    text = diagnosis.stdout
    assert "failed stage: apply" in text
    assert "steps[2] (patch)" in text
    assert "bad.patch" in text
    assert "10.0.0.1 router" in text      # what the hunk expected
    assert "10.0.0.1 gateway" in text     # what the file holds
    assert "what to do:" in text


def _diagnose(tmp: Path, name: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dom0", "diagnose", str(tmp / "state" / name / "report.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout


def _hostname_on_disk(disk: Path) -> str:
    return subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(disk)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("fault", ["server-down", "hash-mismatch"])
def test_fetch_failures_change_nothing_and_are_diagnosed(tmp_path, kernel, served, signing_keys, fault):
    served_dir, port = served
    disk = _root_image(tmp_path)
    plan = _plan(served_dir, port, "hosts.patch")
    plan["fetch_timeout"] = 6
    if fault == "server-down":
        plan["steps"][1]["uri"] = "http://10.0.2.2:9/motd"      # nothing listens on the discard port
    else:
        plan["steps"][1]["sha256"] = "0" * 64
    name = f"web-{fault}"
    cfg = _domain(tmp_path, kernel, signing_keys, plan, name, disk)

    code, report, console = _boot(tmp_path, cfg, name)

    assert code == 1 and "Kernel panic" not in console and "pipe-init" not in console
    fetch = _record(report, "fetch")
    assert fetch["status"] == "failed" and fetch["details"]["step"] == 1
    assert report["outcome"]["outcome"] == "halted"
    assert _hostname_on_disk(disk) == "unconfigured\n"
    text = _diagnose(tmp_path, name)
    assert "failed stage: fetch" in text and "motd" in text
    assert ("0000000000" in text or "SHA-256" in text or "sha256" in text) if fault == "hash-mismatch" \
        else "attempts:" in text


def _files(image: Path, tmp: Path) -> dict[str, tuple]:
    """Every entry of the file system in ``image``, as dom0 sees it after the guest stopped: kind,
    mode, owner, mtime, ctime and a SHA-256 of the content (or the link target).

    Read from a loop-mounted copy, so the journal the guest left is replayed without touching
    ``image`` itself.  Two equal results mean not one file, directory or attribute changed.
    """
    out: dict[str, tuple] = {}
    with replayed(image, tmp) as mnt:
        for path in sorted(mnt.rglob("*")):
            st = path.lstat()
            meta = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns)
            if path.is_symlink():
                body = path.readlink().as_posix()
            elif path.is_file():
                body = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                body = None
            out[path.relative_to(mnt).as_posix()] = (body, *meta)
    return out


@pytest.mark.parametrize("fault", ["fails", "hangs"])
def test_a_failed_or_hung_hook_changes_nothing_and_is_diagnosed(tmp_path, kernel, served, signing_keys, fault):
    """The hook runs after every other step was staged, changes files itself, then fails (exit 3)
    or runs past its timeout: nothing of the plan and nothing the hook wrote reaches the disk."""
    served_dir, port = served
    disk = _root_image(tmp_path)
    before = _files(disk, tmp_path)
    plan = _plan(served_dir, port, "hosts.patch")
    ending = ('echo "cannot reach the license server" >&2\nexit 3\n' if fault == "fails"
              else 'echo "waiting for the license server"\nsleep 600\n')
    name = "license" if fault == "fails" else "stuck"
    plan["steps"][4] = {"op": "hook", "name": name, "timeout": 3, "script": (
        'echo "hostname is $(cat /etc/hostname)"\n'
        "echo hacked > /etc/hostname\nrm /etc/hosts\nmkdir -p /var/lib/license\n"
        "echo partial > /opt/app/version\n" + ending)}
    domain = f"web-hook-{fault}"
    cfg = _domain(tmp_path, kernel, signing_keys, plan, domain, disk)

    code, report, console = _boot(tmp_path, cfg, domain)

    assert code == 1 and "Kernel panic" not in console and "pipe-init" not in console
    apply = _record(report, "apply")
    assert apply["status"] == "ok" and apply["details"]["staged"] == 4
    hooks = _record(report, "hooks")
    assert hooks["status"] == "failed" and hooks["details"]["committed"] is False
    (hook,) = hooks["details"]["hooks"]
    assert hook["output"].startswith("hostname is web1\n")      # it saw the staged personality
    if fault == "fails":
        assert hook["exit_code"] == 3 and not hook["timed_out"]
        assert "cannot reach the license server" in hook["output"]
    else:
        assert hook["timed_out"] is True and hook["signal_name"] == "SIGTERM"
        assert "waiting for the license server" in hook["output"]
    assert not [r for r in report["records"] if r["stage"] == "commit"]
    assert report["outcome"]["outcome"] == "halted"
    # From dom0, after the guest stopped: every file as it was, the hook's writes included.
    assert _files(disk, tmp_path) == before

    text = _diagnose(tmp_path, domain)
    assert "failed stage: hooks" in text and f"hook:         {name} (/bin/sh)" in text
    assert ("exit status 3" in text and "cannot reach the license server" in text) if fault == "fails" \
        else ("ran past its timeout" in text and "killed by SIGTERM" in text and "waiting for the license" in text)
    assert "nothing was committed, the file systems are as they were" in text
    assert "what to do:" in text
