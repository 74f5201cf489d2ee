"""Boot tier: a real kernel under qemu with the real initrd from prepare-initrd."""
from __future__ import annotations

import json
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
