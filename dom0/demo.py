"""``supercharge demo``: one domain built, booted under qemu and reported, end to end.

It builds a busybox root image labelled ``sc-demo-root`` whose /etc/hostname
says ``unconfigured``, a plan that replaces it with ``demo1``, the initrd
(cached base plus the plan) and an xl config, then boots that config exactly
as ``supercharge boot`` would and prints the report and what the real init saw.
"""
from __future__ import annotations

import json
from pathlib import Path

from .boot import boot_domain, domain_state_dir
from .initrd import load_trust, prepare_initrd
from .kernel import fetch_kernel
from .keys import ensure_unencrypted_keypair, sign_with
from .rootfs import busybox_tree, make_ext4_image
from .xlcfg import write_xl_config

DEMO_NAME = "sc-demo"
ROOT_LABEL = "sc-demo-root"
HOSTNAME = "demo1"

# The "real init" of the demo root: proves it runs as PID 1 of the customised
# root and shows what the plan changed, then powers the guest off.
INIT_SCRIPT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
echo "demo-init: running as pid $$ with args: $*"
echo "demo-init: /etc/hostname is $(cat /etc/hostname)"
echo "demo-init: uptime $(cut -d' ' -f1 /proc/uptime) s"
if [ -f /var/log/supercharge/boot-report.json ]; then
  echo "demo-init: boot report kept at /var/log/supercharge/boot-report.json"
fi
sync
poweroff -f
"""


def demo_plan(name: str = DEMO_NAME, label: str = ROOT_LABEL, hostname: str = HOSTNAME) -> dict:
    return {
        "version": 1,
        "name": name,
        "init": "/sbin/init",
        "failure_policy": "halt",
        "device_timeout": 30,
        "mounts": [{"device": {"label": label}, "target": "/", "fstype": "ext4", "options": ["rw"]}],
        "steps": [{"op": "replace", "path": "/etc/hostname", "content": f"{hostname}\n", "mode": "0644"}],
    }


def build_demo(workdir: Path, kernel_version: str | None = None) -> Path:
    """Everything the demo domain needs in ``workdir``; returns the xl config path."""
    workdir.mkdir(parents=True, exist_ok=True)
    kernel, _ = fetch_kernel(kernel_version)
    tree = busybox_tree(workdir / "root", INIT_SCRIPT)
    image = make_ext4_image(tree, workdir / "root.img", ROOT_LABEL)
    plan = workdir / "plan.json"
    plan.write_text(json.dumps(demo_plan(), indent=2) + "\n")
    secret, public = ensure_unencrypted_keypair(workdir / "keys", "demo")
    sign_with(plan, secret)
    initrd = workdir / "initrd.img"
    result = prepare_initrd(kernel, initrd, plan=plan, trust=load_trust([str(public)], False))
    base = result.base
    print(f"initrd: {initrd} ({result.size / 2**20:.1f} MiB; base "
          f"{'from cache' if base.cached else f'built in {base.seconds:.1f} s'}, plan {result.plan_segment} bytes)")
    config = workdir / f"{DEMO_NAME}.cfg"
    config.write_text(write_xl_config({
        "name": DEMO_NAME,
        "type": "pvh",
        "kernel": str(kernel.vmlinuz),
        "ramdisk": str(initrd),
        "memory": 512,
        "vcpus": 1,
        "disk": [f"format=raw,vdev=xvda,access=rw,target={image}"],
        "on_poweroff": "destroy",
    }))
    return config


def run_demo(workdir: Path | None = None, accel: str | None = None, timeout: float = 300.0) -> int:
    workdir = workdir or domain_state_dir(DEMO_NAME, None) / "build"
    config = build_demo(workdir)
    print(f"config: {config}")
    print("booting under qemu ...")
    code = boot_domain(config, accel=accel, timeout=timeout, after="wait")
    console = domain_state_dir(DEMO_NAME, None) / "console.log"
    lines = [ln.strip() for ln in console.read_text(errors="replace").splitlines() if "demo-init:" in ln]
    print("\nthe real init printed:")
    for line in lines:
        print(f"  {line[line.index('demo-init:'):]}")
    if not lines:
        print("  (nothing: the real init did not run)")
    return code
