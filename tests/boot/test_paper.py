"""The paper's scenario: a shared read-only root, a per-domain /etc image, and at boot signed
patches adding an account to passwd, shadow and group, a replaced hostname, a copied file and a
hook; the real init shows the account (busybox id), the hostname and the hook's effect.

The patches are not pinned in the plan: they carry PATCH.minisig from a trusted key, which the
agent fetches and checks too.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import pytest

from dom0.boot import boot_domain
from dom0.initrd import load_trust, prepare_initrd
from dom0.keys import sign_with
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xlcfg import write_xl_config

pytestmark = pytest.mark.boot

INIT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
echo "paper-init: $(id fido)"
echo "paper-init: hostname=$(cat /etc/hostname)"
echo "paper-init: motd=$(cat /etc/motd)"
echo "paper-init: hook=$(cat /etc/hook-ran)"
poweroff -f
"""
ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "shadow": "root:*:19000:0:99999:7:::\n",
    "group": "root:x:0:\nusers:x:100:\n",
    "hostname": "unconfigured\n",
}
ADD = {
    "passwd": "fido:x:1000:100:Fido:/home/fido:/bin/sh\n",
    "shadow": "fido:!:19000:0:99999:7:::\n",
    "group": "fido:x:1000:\n",
}


def _patch(name: str) -> bytes:
    old = ETC[name].splitlines(keepends=True)
    lines = [f"--- a/{name}\n", f"+++ b/{name}\n", f"@@ -1,{len(old)} +1,{len(old) + 1} @@\n"]
    lines += [" " + line for line in old] + ["+" + ADD[name]]
    return "".join(lines).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, httpd.server_address[1]
    httpd.shutdown()


def test_paper_scenario_account_hostname_copy_and_hook(tmp_path, kernel, server, signing_keys):
    (secret, public), _ = signing_keys
    served, port = server
    for name in ADD:
        patch = served / f"{name}.patch"
        patch.write_bytes(_patch(name))
        sign_with(patch, secret)
    (served / "motd").write_text("managed by supercharge\n")

    tree = busybox_tree(tmp_path / "root", INIT, hostname="unconfigured")
    (tree / "bin" / "id").symlink_to("busybox")
    (tree / "etc" / "hostname").unlink()
    root = make_ext4_image(tree, tmp_path / "root.img", "sc-paper-root")
    etc_tree = tmp_path / "etc"
    etc_tree.mkdir()
    for name, text in ETC.items():
        (etc_tree / name).write_text(text)
    (etc_tree / "shadow").chmod(0o640)
    etc = make_ext4_image(etc_tree, tmp_path / "etc.img", "sc-paper-etc", size_mib=8)

    base = f"http://10.0.2.2:{port}"
    plan = {
        "version": 1, "name": "fido", "device_timeout": 20,
        "network": {"interfaces": [{"match": {"name": "eth0"}, "dhcp": True}]},
        "mounts": [{"device": {"label": "sc-paper-root"}, "target": "/", "options": ["ro"]},
                   {"device": {"label": "sc-paper-etc"}, "target": "/etc", "options": ["rw"]}],
        "steps": [
            *({"op": "patch", "uri": f"{base}/{name}.patch", "dir": "/etc"} for name in ADD),
            {"op": "replace", "path": "/etc/hostname", "content": "FCDOBBS\n"},
            {"op": "copy", "path": "/etc/motd", "uri": f"{base}/motd",
             "sha256": hashlib.sha256((served / "motd").read_bytes()).hexdigest()},
            {"op": "hook", "name": "welcome", "script": "echo \"ran for $SUPERCHARGE_DOMAIN\" > /etc/hook-ran\n"},
        ],
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    sign_with(plan_file, secret)
    initrd = tmp_path / "initrd.img"
    prepare_initrd(kernel, initrd, plan=plan_file, trust=load_trust([str(public)], False))
    cfg = tmp_path / "fido.cfg"
    cfg.write_text(write_xl_config({
        "name": "fido", "kernel": str(kernel.vmlinuz), "ramdisk": str(initrd), "memory": 512,
        "vif": ["mac=52:54:00:12:34:57"],
        "disk": [f"format=raw,vdev=xvda,access=ro,target={root}",
                 f"format=raw,vdev=xvdb,access=rw,target={etc}"]}))

    code = boot_domain(cfg, timeout=300, after="wait", state_dir=tmp_path / "state", quiet=True)
    console = (tmp_path / "state" / "fido" / "console.log").read_text(errors="replace")
    report = json.loads((tmp_path / "state" / "fido" / "report.json").read_text())

    assert code == 0, console[-4000:]
    assert "paper-init: uid=1000(fido) gid=100(users)" in console
    assert "paper-init: hostname=FCDOBBS" in console
    assert "paper-init: motd=managed by supercharge" in console
    assert "paper-init: hook=ran for fido" in console
    fetched = [r for r in report["records"] if r["stage"] == "fetch"][-1]["details"]["artifacts"]
    assert [(a["pinned"], a.get("signed")) for a in fetched] == [(False, True)] * 3 + [(True, None)]
