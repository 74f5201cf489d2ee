"""Boot tier: a real kernel under qemu with the real initrd from prepare-initrd."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dom0.demo import INIT_SCRIPT
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xlcfg import write_xl_config

ROOT_LABEL = "sc-test-root"


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory):
    """(secret key, public key) trusted by the test initrds, and a second, untrusted pair."""
    from dom0.keys import ensure_unencrypted_keypair

    keys = tmp_path_factory.mktemp("keys")
    return ensure_unencrypted_keypair(keys, "trusted"), ensure_unencrypted_keypair(keys, "stranger")


@pytest.fixture(scope="session")
def root_image(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rootfs")
    tree = busybox_tree(work / "root", INIT_SCRIPT, hostname="unconfigured")
    return make_ext4_image(tree, work / "root.img", ROOT_LABEL)


def write_plan(path: Path, **overrides) -> Path:
    doc = {
        "version": 1,
        "name": "boot-test",
        "init": "/sbin/init",
        "failure_policy": "halt",
        "device_timeout": 20,
        "mounts": [{"device": {"label": ROOT_LABEL}, "target": "/", "fstype": "ext4", "options": ["rw"]}],
        "steps": [{"op": "replace", "path": "/etc/hostname", "content": "booted-host\n", "mode": "0644"}],
    }
    doc.update(overrides)
    path.write_text(json.dumps(doc, indent=1))
    return path


def write_domain(path: Path, name: str, kernel, initrd: Path, disks: list[Path]) -> Path:
    path.write_text(write_xl_config({
        "name": name,
        "kernel": str(kernel.vmlinuz),
        "ramdisk": str(initrd),
        "memory": 512,
        "vcpus": 1,
        "disk": [f"format=raw,vdev=xvd{chr(97 + i)},access=rw,target={d}" for i, d in enumerate(disks)],
    }))
    return path


#: /etc/hosts of the pipeline and power-cut roots, and a patch of it that changes one line.
HOSTS = b"127.0.0.1 localhost\n10.0.0.1 gateway\n10.0.0.2 db\n"
HOSTS_PATCH = b"""--- a/hosts
+++ b/hosts
@@ -1,3 +1,3 @@
 127.0.0.1 localhost
 10.0.0.1 gateway
-10.0.0.2 db
+10.0.0.9 db
"""


def root_disk(image: Path, access: str = "rw") -> str:
    """The xl disk spec of a domain's first disk (xvda) on ``image``."""
    return f"format=raw,vdev=xvda,access={access},target={image}"


def signed_domain(tmp: Path, kernel, keys, plan: dict, name: str, disks: list[str],
                  mac: str | None = None) -> Path:
    """The plan signed with the trusted key, an initrd trusting it, and an xl config with
    ``disks`` (xl disk specs) and, given ``mac``, a NIC."""
    from dom0.initrd import load_trust, prepare_initrd
    from dom0.keys import sign_with

    (secret, public), _ = keys
    plan_file = tmp / f"{name}.plan.json"
    plan_file.write_text(json.dumps(plan))
    sign_with(plan_file, secret)
    initrd = tmp / f"{name}.initrd"
    prepare_initrd(kernel, initrd, plan=plan_file, trust=load_trust([str(public)], False))
    settings = {"name": name, "kernel": str(kernel.vmlinuz), "ramdisk": str(initrd), "memory": 512,
                "disk": disks}
    if mac is not None:
        settings["vif"] = [f"mac={mac}"]
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(write_xl_config(settings))
    return cfg


@contextmanager
def replayed(image: Path, tmp: Path) -> Iterator[Path]:
    """The file system of ``image`` as the guest left it: a copy, loop-mounted (its journal
    replayed), so ``image`` itself is never touched."""
    copy = tmp / f"look-{image.name}"
    shutil.copyfile(image, copy)
    mnt = tmp / f"mnt-{image.name}"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(copy), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        copy.unlink()
