"""A guest whose /opt is an NFSv4 export served by nfs-ganesha on dom0's loopback.

ganesha listens on 127.0.0.1 on a free port; under qemu's user networking the guest
reaches it as 10.0.2.2, and ganesha sees the guest as 127.0.0.1 (qemu connects for it).
The agent mounts the export with mount(2) itself, before switching into the busybox root,
whose init reads a file from /opt.  When the server is down, the mount stage fails with
the server, the export and the errno, and `supercharge diagnose` says so.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.nfs import Export, GaneshaConfig, free_port, serve
from dom0.rootfs import busybox_tree, make_ext4_image

from .conftest import root_disk, signed_domain

pytestmark = [
    pytest.mark.boot,
    pytest.mark.skipif(shutil.which("ganesha.nfsd") is None,
                       reason="needs nfs-ganesha and nfs-ganesha-vfs (./run installs them)"),
]

LABEL = "sc-nfs-root"
MAC = "52:54:00:12:34:57"
PSEUDO = "/export/opt"
INIT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
echo "nfs-init: app=$(cat /opt/app/version)"
grep ' /opt ' /proc/mounts | sed 's/^/nfs-init: mount=/'
poweroff -f
"""


@pytest.fixture(scope="module")
def ganesha(tmp_path_factory):
    """nfs-ganesha on 127.0.0.1, a free port, state in a temporary directory; yields (export dir, port)."""
    state = tmp_path_factory.mktemp("ganesha")
    export = state / "export"
    (export / "app").mkdir(parents=True)
    (export / "app" / "version").write_text("app 4.2 from nfs\n")
    port = free_port()
    config = GaneshaConfig(exports=(Export(path=export, pseudo=PSEUDO, access="RO", squash="no_root_squash"),),
                           port=port, bind_addr="127.0.0.1", recovery_root=state / "recovery",
                           ccache_dir=state / "ccache")
    server = serve(config, state)
    try:
        yield export, port
    finally:
        server.stop()


def _root_image(tmp: Path) -> Path:
    tree = busybox_tree(tmp / "root", INIT, hostname="unconfigured")
    for applet in ("grep", "sed"):
        if not (tree / "bin" / applet).exists():
            (tree / "bin" / applet).symlink_to("busybox")
    (tree / "opt").mkdir()
    return make_ext4_image(tree, tmp / "root.img", LABEL)


def _plan(port: int, timeout: float = 30, options: list[str] | None = None) -> dict:
    return {
        "version": 1, "name": "nfs1", "failure_policy": "halt", "device_timeout": 20,
        "network": {"interfaces": [{"match": {"mac": MAC}, "dhcp": True}], "timeout": 30},
        "mounts": [
            {"device": {"label": LABEL}, "target": "/"},
            {"nfs": {"server": "10.0.2.2", "path": PSEUDO, "port": port, "timeout": timeout},
             "target": "/opt", "fstype": "nfs4", "options": options or ["ro", "vers=4.2"]},
        ],
        "steps": [{"op": "replace", "path": "/etc/hostname", "content": "nfs1\n"}],
    }


def _boot(tmp: Path, kernel, keys, plan: dict, name: str) -> tuple[int, dict, str]:
    cfg = signed_domain(tmp, kernel, keys, plan, name, [root_disk(_root_image(tmp))], MAC)
    code = boot_domain(cfg, timeout=300, after="wait", state_dir=tmp / "state", quiet=True)
    state = tmp / "state" / name
    return code, json.loads((state / "report.json").read_text()), (state / "console.log").read_text(errors="replace")


def _record(report: dict, stage: str) -> dict:
    return [r for r in report["records"] if r["stage"] == stage][-1]


@pytest.mark.parametrize("options", [["ro", "vers=4.2"], ["ro"]], ids=["vers=4.2", "negotiated"])
def test_opt_from_nfs_ganesha(tmp_path, kernel, signing_keys, ganesha, options):
    _, port = ganesha
    code, report, console = _boot(tmp_path, kernel, signing_keys, _plan(port, options=options), "nfs1")

    assert code == 0, console[-4000:]
    assert "nfs-init: app=app 4.2 from nfs" in console
    assert f"nfs-init: mount=10.0.2.2:{PSEUDO} /opt nfs4 ro" in console
    assert report["outcome"]["outcome"] == "switched"
    mount = _record(report, "mount")
    (nfs,) = [m for m in mount["details"]["mounts"] if m.get("fstype") == "nfs4"]
    assert nfs["server"] == "10.0.2.2" and nfs["path"] == PSEUDO and nfs["port"] == port
    assert nfs["target"] == "/opt" and nfs["options"] == options
    # Without vers= the agent tries 4.2 first, as mount.nfs does; ganesha 4 has it.
    assert nfs["version"] == "4.2" and nfs["data"].count("vers=") == 1
    assert "addr=10.0.2.2" in nfs["data"] and f"port={port}" in nfs["data"]
    assert nfs["clientaddr"] == "10.0.2.15" and nfs["client_id"] == "nfs1"
    assert nfs["seconds"] > 0 and nfs["attempts"] >= 1
    modules = _record(report, "modules")
    assert modules["status"] == "ok" and "failed" not in modules["details"], modules
    # The NFS modules are loaded because this plan mounts nfs4; the network stage ran first.
    assert _record(report, "network")["status"] == "ok"
    print(f"\nNFS mount {nfs['seconds']} s in {nfs['attempts']} attempt(s); modules stage "
          f"{modules['duration']:.2f} s ({modules['details']['loaded']} loaded)")


def test_nfs_server_down_is_reported_and_diagnosed(tmp_path, kernel, signing_keys):
    port = free_port()   # nothing listens there
    code, report, console = _boot(tmp_path, kernel, signing_keys, _plan(port, timeout=6), "nfs-down")

    assert code == 1 and "Kernel panic" not in console and "nfs-init" not in console
    mount = _record(report, "mount")
    assert mount["status"] == "failed"
    details = mount["details"]
    assert details["server"] == "10.0.2.2" and details["path"] == PSEUDO and details["port"] == port
    assert details["errno_name"] in ("ECONNREFUSED", "ETIMEDOUT", "EIO"), details
    assert details["attempts"] >= 2 and details["seconds"] < 30
    assert report["outcome"]["outcome"] == "halted"

    proc = subprocess.run([sys.executable, "-m", "dom0", "diagnose", str(tmp_path / "state" / "nfs-down" / "report.json")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout
    assert "failed stage: mount" in text
    assert f"10.0.2.2:{PSEUDO}" in text and details["errno_name"] in text
    print("\n" + text)
