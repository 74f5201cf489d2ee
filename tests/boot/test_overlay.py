"""Copy-on-write roots: two domains boot from one read-only shared image, each with its own
upper layer (a writable VBD for one, a tmpfs for the other), and see their own hostnames."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.demo import INIT_SCRIPT
from dom0.rootfs import busybox_tree, make_ext4_image

from .conftest import root_disk, signed_domain

pytestmark = pytest.mark.boot

SHARED = "sc-shared-root"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _domain(tmp: Path, kernel, keys, name: str, shared: Path, upper, disks: list[str]) -> Path:
    plan = {"version": 1, "name": name, "device_timeout": 20,
            "mounts": [{"target": "/", "overlay": {"lower": [{"label": SHARED}], "upper": upper}}],
            "steps": [{"op": "replace", "path": "/etc/hostname", "content": f"{name}\n"}]}
    return signed_domain(tmp, kernel, keys, plan, name, [root_disk(shared, "ro"), *disks])


def test_two_domains_share_one_read_only_root(tmp_path, kernel, signing_keys):
    tree = busybox_tree(tmp_path / "root", INIT_SCRIPT, hostname="shared")
    shared = make_ext4_image(tree, tmp_path / "shared.img", SHARED)
    before = _digest(shared)
    empty = tmp_path / "empty"
    empty.mkdir()
    upper_a = make_ext4_image(empty, tmp_path / "a-upper.img", "web-a-upper", size_mib=16)

    consoles = {}
    for name, upper, disks in (
            ("web-a", {"label": "web-a-upper"}, [f"format=raw,vdev=xvdb,access=rw,target={upper_a}"]),
            ("web-b", "tmpfs", [])):
        cfg = _domain(tmp_path, kernel, signing_keys, name, shared, upper, disks)
        code = boot_domain(cfg, timeout=240, after="wait", state_dir=tmp_path / "state", quiet=True)
        console = (tmp_path / "state" / name / "console.log").read_text(errors="replace")
        assert code == 0, console[-3000:]
        report = json.loads((tmp_path / "state" / name / "report.json").read_text())
        mount = [r for r in report["records"] if r["stage"] == "mount"][-1]
        assert mount["details"]["mounts"][0]["fstype"] == "overlay"
        consoles[name] = console

    assert "demo-init: /etc/hostname is web-a" in consoles["web-a"]
    assert "demo-init: /etc/hostname is web-b" in consoles["web-b"]
    assert _digest(shared) == before                      # the shared image is untouched
    kept = subprocess.run(["debugfs", "-R", "cat /upper/etc/hostname", str(upper_a)],
                          capture_output=True, text=True)
    assert kept.stdout == "web-a\n"                       # web-a's change lives in its own layer
