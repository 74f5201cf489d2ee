"""Power cuts during apply: qemu is SIGKILLed at chosen points of a boot, then booted again.

The plan has every kind of step (replace, copy, patch, extract, a hook) and its changes span two
file systems (the root and /etc on its own VBD), so the commit journals on both.  The agent's
test aid ``supercharge.pause=POINT`` on the kernel command line makes it report a ``pause``
record and sleep at POINT; the test kills qemu the moment that record reaches the console, so
the kill lands exactly there instead of wherever TCG's timing would put it.

Kill points, on one pair of disks in a row (each boot recovers from the one before):

- ``hooks``: the hooks ran in their overlay view, nothing is on disk yet;
- ``prepared``: both journals written, no commit marker (the next boot rolls back);
- ``marked``: the commit marker written, nothing renamed (the next boot rolls forward);

and on a second pair of disks ``renamed``: the first entry of the root file system renamed into
place, /etc untouched (the next boot rolls forward from the middle).  After each kill the
images are examined from dom0 (a copy, its journal replayed) to show where the kill landed.
The final trees must equal those of an uninterrupted boot, file for file, and ``e2fsck -fn``
must find nothing to fix.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.cpio import CpioWriter
from dom0.initrd import load_trust, prepare_initrd
from dom0.keys import sign_with
from dom0.qemu import QemuSettings, find_qemu, qemu_command
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xlcfg import load_domain_config, write_xl_config

from .conftest import HOSTS, HOSTS_PATCH, replayed

pytestmark = pytest.mark.boot

ROOT_LABEL = "sc-pc-root"
ETC_LABEL = "sc-pc-etc"
MAC = "52:54:00:12:34:58"
INIT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
echo "pc-init: hostname=$(cat /etc/hostname) hook=$(cat /etc/hook-ran)"
sync
mount -o remount,ro /etc
mount -o remount,ro /
poweroff -f
"""
PATCH = HOSTS_PATCH
HOOK = """set -e
echo "$SUPERCHARGE_DOMAIN" >> /etc/hook-ran
mkdir -p /var/lib/app
cat /opt/app/version > /var/lib/app/installed
rm -f /opt/obsolete
"""
#: Files whose content is expected to differ from boot to boot: the report the agent keeps.
VOLATILE = {"var/log/supercharge/boot-report.json"}
KILL_TIMEOUT = 180.0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The plan's artifacts over HTTP on 127.0.0.1 (10.0.2.2 from the guest)."""
    root = tmp_path_factory.mktemp("pc-served")
    (root / "motd").write_bytes(b"welcome to pc1\n")
    (root / "hosts.patch").write_bytes(PATCH)
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_file("version", b"app 3.0\n", 0o644)
    writer.add_file("bin/run", b"#!/bin/sh\necho running\n", 0o755)
    writer.close()
    (root / "app.cpio").write_bytes(buf.getvalue())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, server.server_address[1]
    server.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(served_dir: Path, port: int) -> dict:
    base = f"http://10.0.2.2:{port}"
    return {
        # Deadlines with room for a loaded 2-core machine: the test is about where the
        # power cut lands, not about how fast the guest gets there.
        "version": 1, "name": "pc1", "failure_policy": "halt", "device_timeout": 60,
        "network": {"interfaces": [{"match": {"mac": MAC}, "dhcp": True}], "timeout": 90},
        "mounts": [{"device": {"label": ROOT_LABEL}, "target": "/"},
                   {"device": {"label": ETC_LABEL}, "target": "/etc"}],
        "steps": [
            {"op": "replace", "path": "/etc/hostname", "content": "pc1\n"},
            {"op": "copy", "path": "/etc/motd", "uri": f"{base}/motd", "sha256": _sha(served_dir / "motd")},
            {"op": "patch", "uri": f"{base}/hosts.patch", "sha256": _sha(served_dir / "hosts.patch"),
             "dir": "/etc"},
            {"op": "extract", "uri": f"{base}/app.cpio", "sha256": _sha(served_dir / "app.cpio"),
             "dir": "/opt/app"},
            {"op": "replace", "path": "/opt/app/config", "content": "mode=production\n", "mode": "0600"},
            {"op": "hook", "name": "install", "script": HOOK, "timeout": 90},
        ],
    }


def _images(tmp: Path) -> tuple[Path, Path]:
    """A fresh pair of disks: the root (busybox) and /etc."""
    tree = busybox_tree(tmp / "root-tree", INIT, hostname="unconfigured")
    (tree / "etc" / "hostname").unlink()
    (tree / "opt").mkdir()
    (tree / "opt" / "obsolete").write_text("from the image\n")
    root = make_ext4_image(tree, tmp / "root.img", ROOT_LABEL)
    etc_tree = tmp / "etc-tree"
    etc_tree.mkdir()
    (etc_tree / "hostname").write_text("unconfigured\n")
    (etc_tree / "hosts").write_bytes(HOSTS)
    etc = make_ext4_image(etc_tree, tmp / "etc.img", ETC_LABEL, size_mib=8)
    return root, etc


@pytest.fixture(scope="module")
def initrd(tmp_path_factory, kernel, served, signing_keys) -> Path:
    (secret, public), _ = signing_keys
    served_dir, port = served
    work = tmp_path_factory.mktemp("pc-initrd")
    plan_file = work / "pc1.plan.json"
    plan_file.write_text(json.dumps(_plan(served_dir, port)))
    sign_with(plan_file, secret)
    image = work / "pc1.initrd"
    prepare_initrd(kernel, image, plan=plan_file, trust=load_trust([str(public)], False))
    return image


def _config(tmp: Path, kernel, initrd: Path, disks: tuple[Path, Path], pause: str | None) -> Path:
    cfg = tmp / f"pc1-{pause or 'run'}.cfg"
    cfg.write_text(write_xl_config({
        "name": "pc1", "kernel": str(kernel.vmlinuz), "ramdisk": str(initrd), "memory": 512,
        "vif": [f"mac={MAC}"], **({"extra": f"supercharge.pause={pause}"} if pause else {}),
        "disk": [f"format=raw,vdev=xvda,access=rw,target={disks[0]}",
                 f"format=raw,vdev=xvdb,access=rw,target={disks[1]}"]}))
    return cfg


def _boot_and_kill(tmp: Path, kernel, initrd: Path, disks: tuple[Path, Path], point: str) -> str:
    """Boot with a pause at ``point``; SIGKILL qemu as soon as the pause is reported. The console."""
    domain = load_domain_config(_config(tmp, kernel, initrd, disks, point))
    console = tmp / f"kill-{point}.console"
    cmd = qemu_command(domain, console, QemuSettings())
    console.write_bytes(b"")
    wanted = f'"point":"{point}"'.encode()
    with open(tmp / f"kill-{point}.qemu.log", "wb") as log:
        proc = subprocess.Popen([find_qemu(cmd[0]), *cmd[1:]], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT
        while wanted not in console.read_bytes():
            assert proc.poll() is None, f"qemu ended before the pause at {point}:\n" + _tail(console)
            assert time.monotonic() < deadline, f"no pause at {point} within {KILL_TIMEOUT} s:\n" + _tail(console)
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)      # the power cut
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return console.read_text(errors="replace")


def _tail(console: Path) -> str:
    return console.read_text(errors="replace")[-3000:]


def _boot(tmp: Path, kernel, initrd: Path, disks: tuple[Path, Path], name: str) -> tuple[dict, str]:
    """An ordinary boot to the end (the real init powers off); the report and the console."""
    cfg = _config(tmp, kernel, initrd, disks, None)
    state = tmp / f"state-{name}"
    code = boot_domain(cfg, timeout=300, after="wait", state_dir=state, quiet=True)
    console = (state / "pc1" / "console.log").read_text(errors="replace")
    assert code == 0, console[-4000:]
    return json.loads((state / "pc1" / "report.json").read_text()), console


def _record(report: dict, stage: str) -> dict:
    return [r for r in report["records"] if r["stage"] == stage][-1]


def _tree(image: Path, tmp: Path) -> dict[str, tuple]:
    """Every file of ``image``: kind, mode, owner, and content or link target (the applied record
    without its time stamp; the kept boot report left out)."""
    out: dict[str, tuple] = {}
    with replayed(image, tmp) as mnt:
        for dirpath, dirs, files in os.walk(mnt):
            for name in dirs + files:
                path = Path(dirpath) / name
                rel = path.relative_to(mnt).as_posix()
                if rel.startswith("lost+found") or rel in VOLATILE:
                    continue
                st = path.lstat()
                meta = (oct(st.st_mode), st.st_uid, st.st_gid)
                if path.is_symlink():
                    out[rel] = ("link", os.readlink(path), *meta)
                elif path.is_file():
                    data = path.read_bytes()
                    if rel == "var/lib/supercharge/applied.json":
                        data = json.loads(data)["plan_digest"].encode()
                    out[rel] = ("file", hashlib.sha256(data).hexdigest(), *meta)
                else:
                    out[rel] = ("dir", *meta)
    return out


def _journal(image: Path, tmp: Path) -> dict[str, object]:
    """What the transaction left on ``image``: its journal directory's entries, and key files."""
    with replayed(image, tmp) as mnt:
        txn = mnt / ".supercharge-txn"
        return {"txn": sorted(p.name for p in txn.iterdir()) if txn.is_dir() else None,
                "hostname": (mnt / "hostname").read_text() if (mnt / "hostname").exists() else None,
                "app": sorted(p.name for p in (mnt / "opt/app").iterdir()) if (mnt / "opt/app").is_dir() else None}


def _fsck(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, f"e2fsck -fn {image}: {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_power_cuts_during_apply_converge_to_the_uninterrupted_result(tmp_path, kernel, initrd):
    started = time.monotonic()
    timings: dict[str, float] = {}

    # The reference: one boot, nothing interrupted.
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_disks = _images(ref)
    report, console = _boot(ref, kernel, initrd, ref_disks, "ref")
    assert "pc-init: hostname=pc1 hook=pc1" in console
    assert _record(report, "apply")["details"]["recovered"] is None
    expected = [_tree(d, ref) for d in ref_disks]
    assert expected[0]["var/lib/app/installed"][0] == "file" and "opt/obsolete" not in expected[0]
    pristine = [_tree(d, ref) for d in _images(tmp_path / "pristine")]
    timings["reference boot"] = time.monotonic() - started

    # Disks A: a kill at three points in a row, each boot recovering from the previous one.
    a = tmp_path / "a"
    a.mkdir()
    disks = _images(a)
    t = time.monotonic()
    _boot_and_kill(a, kernel, initrd, disks, "hooks")
    assert [_tree(d, a) for d in disks] == pristine              # nothing reached the disks
    timings["kill at hooks"] = time.monotonic() - t

    t = time.monotonic()
    console = _boot_and_kill(a, kernel, initrd, disks, "prepared")
    assert '"recovered":null' in console
    root_state, etc_state = (_journal(d, a) for d in disks)
    assert root_state["txn"] and "prepared.json" in root_state["txn"] and "committed.json" not in root_state["txn"]
    assert etc_state["txn"] and "prepared.json" in etc_state["txn"]
    assert etc_state["hostname"] == "unconfigured\n" and root_state["app"] is None
    timings["kill at prepared"] = time.monotonic() - t

    t = time.monotonic()
    console = _boot_and_kill(a, kernel, initrd, disks, "marked")
    assert '"recovered":"rolled back"' in console
    root_state, etc_state = (_journal(d, a) for d in disks)
    assert "committed.json" in root_state["txn"] and "prepared.json" in root_state["txn"]
    assert etc_state["hostname"] == "unconfigured\n" and root_state["app"] is None
    timings["kill at marked"] = time.monotonic() - t

    t = time.monotonic()
    report, console = _boot(a, kernel, initrd, disks, "a-after")
    assert _record(report, "apply")["details"] == {"converged": True, "plan_digest": report["records"][0]
                                                   ["details"]["plan_digest"], "recovered": "rolled forward"}
    assert _record(report, "hooks")["details"] == {"hooks": [], "converged": True}
    assert "pc-init: hostname=pc1 hook=pc1" in console           # the hook's change, once
    timings["recovery boot (roll forward)"] = time.monotonic() - t
    assert [_tree(d, a) for d in disks] == expected
    for d in disks:
        _fsck(d)

    # Disks B: a kill in the middle of the roll-forward.
    b = tmp_path / "b"
    b.mkdir()
    disks = _images(b)
    t = time.monotonic()
    _boot_and_kill(b, kernel, initrd, disks, "renamed")
    root_state, etc_state = (_journal(d, b) for d in disks)
    assert "committed.json" in root_state["txn"] and etc_state["hostname"] == "unconfigured\n"
    timings["kill at renamed"] = time.monotonic() - t
    t = time.monotonic()
    report, console = _boot(b, kernel, initrd, disks, "b-after")
    assert _record(report, "apply")["details"]["recovered"] == "rolled forward"
    assert "pc-init: hostname=pc1 hook=pc1" in console
    timings["recovery boot (mid roll-forward)"] = time.monotonic() - t
    assert [_tree(d, b) for d in disks] == expected
    for d in [*disks, *ref_disks]:
        _fsck(d)

    timings["total"] = time.monotonic() - started
    print("\npower-cut timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
