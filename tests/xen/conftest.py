"""Xen tier: one real Xen boot per session (dom0.xenlab), with everything done inside dom0.

The session fixture builds the inputs on the host (a shared busybox root,
per-domain upper layers, container files, the paper's container processed by
vm-container, a signed plan for the failing domain), runs one job in the lab's
dom0 that dry-runs ``xl create -n``, deploys the PV and PVH domains from their
container files with ``supercharge deploy --hypervisor xen``, boots the failing
one with ``supercharge boot --hypervisor xen``, and brings the reports back.
Each test then asserts one thing on the host.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dom0.demo import INIT_SCRIPT
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xlcfg import write_xl_config

SHARED_LABEL = "sc-xen-shared"
GUESTS = ("xen-pv", "xen-pvh")
BAD = "xen-bad"
BAD_PATCH = b"--- a/hostname\n+++ b/hostname\n@@ -1 +1 @@\n-expected-name\n+xen-bad\n"
# The whole qemu run: Xen and dom0 (~30 s), three guests (~30 s each), Python in dom0.
RUN_TIMEOUT = 720.0
GUEST_TIMEOUT = 180

JOB = r"""
set -u
cd "$IN"
stamp() { date +%s.%N; }
deploy() {  # deploy NAME: supercharge deploy --hypervisor xen of NAME.ct, its outputs in $OUT
  local name=$1 t0
  t0=$(stamp)
  python3 -m dom0 deploy --hypervisor xen --sign-key xen.key --state-dir "$OUT/state" \
    --timeout @GUEST_TIMEOUT@ --json "$name.ct" > "$OUT/$name.deploy.json" 2> "$OUT/$name.boot.err"
  echo $? > "$OUT/$name.boot.rc"
  echo "$t0 $(stamp)" > "$OUT/$name.times"
  python3 -m dom0 diagnose "$OUT/state/$name/report.json" > "$OUT/$name.diagnose.txt" 2>&1
  echo "== $name: deploy $(cat "$OUT/$name.boot.rc")"
}
xl create -n dry.cfg > "$OUT/dry.out" 2> "$OUT/dry.err"; echo $? > "$OUT/dry.rc"
xl create -n paper.cfg > "$OUT/paper.out" 2> "$OUT/paper.err"; echo $? > "$OUT/paper.rc"
deploy xen-pv
deploy xen-pvh
# LVM: a volume group on a loop device whose origin volume holds the shared root; the domain
# gets a snapshot of it (deploy's [export /dev/VG/LV ... cow]) and the origin must not change.
size=$(stat -c %s shared.img)
truncate -s $(( size + 96 * 1048576 )) "$IN/pv.img"
loop=$(losetup --find --show "$IN/pv.img")
{ pvcreate -q "$loop" && vgcreate -q scxen "$loop" \
  && lvcreate -q -y -L $(( size / 1048576 + 4 ))m -n root scxen \
  && dd if=shared.img of=/dev/scxen/root bs=1M conv=fsync status=none; } > "$OUT/lvm-setup.log" 2>&1
echo $? > "$OUT/lvm-setup.rc"
sha256sum /dev/scxen/root | cut -d' ' -f1 > "$OUT/lvm-origin.before"
deploy xen-lvm
sha256sum /dev/scxen/root | cut -d' ' -f1 > "$OUT/lvm-origin.after"
lvs --noheadings -o lv_name,origin scxen > "$OUT/lvs.txt" 2>&1
debugfs -R "cat /etc/hostname" /dev/scxen/xen-lvm-xvda > "$OUT/lvm-snapshot-hostname.txt" 2>/dev/null
vgchange -q -an scxen >/dev/null 2>&1; losetup -d "$loop"
for name in xen-bad; do
  t0=$(stamp)
  python3 -m dom0 prepare-initrd --trust trusted.pub --plan "$name.json" -o "$name.initrd" --json \
    > "$OUT/$name.prepare.json" 2> "$OUT/$name.prepare.err"
  echo $? > "$OUT/$name.prepare.rc"
  t1=$(stamp)
  python3 -m dom0 boot --hypervisor xen --state-dir "$OUT/state" --timeout @GUEST_TIMEOUT@ "$name.cfg" \
    > "$OUT/$name.boot.out" 2> "$OUT/$name.boot.err"
  echo $? > "$OUT/$name.boot.rc"
  t2=$(stamp)
  echo "$t0 $t1 $t2" > "$OUT/$name.times"
  python3 -m dom0 diagnose "$OUT/state/$name/report.json" > "$OUT/$name.diagnose.txt" 2>&1
  echo "== $name: prepare $(cat "$OUT/$name.prepare.rc"), boot $(cat "$OUT/$name.boot.rc")"
done
debugfs -R "cat /upper/etc/hostname" xen-pv-upper.img > "$OUT/xen-pv-upper-hostname.txt" 2>/dev/null
sha256sum shared.img | cut -d' ' -f1 > "$OUT/shared.sha256"
""".replace("@GUEST_TIMEOUT@", str(GUEST_TIMEOUT))


@dataclass
class XenSession:
    """The inputs made on the host and what came back from dom0."""

    inputs: Path
    out: Path
    serial_log: Path
    returncode: int | None
    seconds: float
    timings: dict
    shared_sha256: str
    public_key: Path

    def report(self, name: str) -> dict:
        path = self.out / "state" / name / "report.json"
        assert path.is_file(), f"no report for {name}: {self.text(name + '.boot.err')[-2000:]}"
        return json.loads(path.read_text())

    def text(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.is_file() else ""

    def console(self, name: str) -> str:
        return self.text(f"state/{name}/console.log")


def sign_plan(path: Path, doc: dict, secret: Path) -> Path:
    from dom0.keys import sign_with

    path.write_text(json.dumps(doc, indent=1))
    sign_with(path, secret)
    return path


def guest_plan(name: str, upper) -> dict:
    return {"version": 1, "name": name, "init": "/sbin/init", "failure_policy": "halt",
            "device_timeout": 30,
            "mounts": [{"target": "/", "overlay": {"lower": [{"label": SHARED_LABEL}], "upper": upper}}],
            "steps": [{"op": "replace", "path": "/etc/hostname", "content": f"{name}\n", "mode": "0644"}]}


def bad_plan() -> dict:
    """A patch that expects another hostname than the shared root has: fails in apply."""
    doc = guest_plan(BAD, "tmpfs")
    doc["steps"] = [{"op": "patch", "uri": "file:///sysroot/srv/bad.patch",
                     "sha256": hashlib.sha256(BAD_PATCH).hexdigest(), "dir": "/etc"}]
    return doc


def xl_config(name: str, kind: str, kernel, disks: list[str]) -> str:
    return write_xl_config({
        "name": name, "type": kind, "kernel": str(kernel.vmlinuz), "ramdisk": f"{name}.initrd",
        "extra": "console=hvc0", "memory": 256, "vcpus": 1, "disk": disks,
        "on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy"})


def shared_root(work: Path) -> Path:
    tree = busybox_tree(work / "root", INIT_SCRIPT, hostname="shared")
    (tree / "srv").mkdir()
    (tree / "srv" / "bad.patch").write_bytes(BAD_PATCH)
    return make_ext4_image(tree, work / "shared.img", SHARED_LABEL)


def guest_container(name: str, kind: str) -> str:
    """What an admin writes for one domain: the shared root read-only, its own copy-on-write
    disk, a hostname; ``supercharge deploy`` does the rest (plan, initrd, xl config, boot)."""
    return (f'name = "{name}"\ntype = "{kind}"\nmemory = 256\nvcpus = 1\nextra = "console=hvc0"\n'
            'on_poweroff = "destroy"\non_reboot = "destroy"\non_crash = "destroy"\n'
            "[export shared.img xvda ro] [end]\n"
            f"[export {name}-upper.img xvdb rw] [end]\n"
            f"[mount {SHARED_LABEL} / cow upper {name}-upper] [end]\n"
            f"[replace /etc/hostname at boot\n\n{name}\n] [end]\n")


def paper_container(work: Path) -> str:
    """A domain container as the paper writes one: xl statements in the old disk syntax, the
    canned /usr shared read-only, a per-domain /etc image made, populated and personalised."""
    etc = work / "etc"
    etc.mkdir(parents=True)
    (etc / "HOSTNAME").write_text("linux\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    archive = f"file://{work}/etc.cpio.gz"
    return ("# The paper's domain container (Day et al., Linux Symposium 2005)\n"
            'kernel = "/boot/vmlinuz-2.6.11-xenU"\nmemory = 128\nname = "fido"\n'
            "disk = ['file:/var/images/xen_usr,sda1,r']\n"
            f"[create\n {etc}/\n {archive}\n ][end]\n"
            f"[image {work}/fido-etc\n 50MB\n fido_etc export sda2] [end]\n"
            f"[populate image\n {work}/fido-etc\n /mnt/\n {archive}\n ][end]\n"
            f"[replace /etc/HOSTNAME\narchive {archive}\n\nFCDOBBS\n\n] [end]\n")


def make_inputs(inputs: Path, kernel, secret: Path, public: Path) -> None:
    import subprocess
    import sys

    inputs.mkdir(parents=True)
    shared_root(inputs)
    empty = inputs.parent / "empty"
    empty.mkdir(exist_ok=True)
    shutil.copy2(public, inputs / "trusted.pub")
    shutil.copy2(secret, inputs / "xen.key")
    shared_disk = "format=raw,vdev=xvda,access=ro,target=shared.img"
    for name, kind in zip(GUESTS, ("pv", "pvh")):
        make_ext4_image(empty, inputs / f"{name}-upper.img", f"{name}-upper", size_mib=16)
        (inputs / f"{name}.ct").write_text(guest_container(name, kind))
    (inputs / "xen-lvm.ct").write_text(
        'name = "xen-lvm"\ntype = "pv"\nmemory = 256\nextra = "console=hvc0"\n'
        'on_poweroff = "destroy"\non_reboot = "destroy"\non_crash = "destroy"\n'
        "[export /dev/scxen/root xvda cow snapshot xen-lvm-xvda snapshot-size 16M] [end]\n"
        f"[mount {SHARED_LABEL} / rw] [end]\n"
        "[replace /etc/hostname at boot\n\nxen-lvm\n] [end]\n")
    # The paper's container, processed here with vm-container as the paper runs it (Figure 2);
    # its stripped config goes to xl create -n in dom0.
    paper = inputs.parent / "paper"
    paper.mkdir()
    (paper / "my-domain").write_text(paper_container(paper))
    proc = subprocess.run([str(Path(sys.executable).parent / "vm-container"), "--container", "my-domain",
                           "--stripped", str(inputs / "paper.cfg"), "--log", str(paper / "log"),
                           "--dir", str(paper / "images")], cwd=paper, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sign_plan(inputs / f"{BAD}.json", bad_plan(), secret)
    (inputs / f"{BAD}.cfg").write_text(xl_config(BAD, "pv", kernel, [shared_disk]))
    # For xl create -n: both disk forms, a vif, every on_* action.
    (inputs / "dry.cfg").write_text(write_xl_config({
        "name": "dry", "type": "pv", "kernel": str(kernel.vmlinuz), "memory": 128,
        "extra": "console=hvc0 root=LABEL=x",
        "disk": ["shared.img,raw,xvda,ro", "format=raw,vdev=xvdb,access=rw,target=xen-pv-upper.img"],
        "vif": ["mac=00:16:3e:5a:17:01,bridge=xenbr0"],
        "on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "preserve"}))


@pytest.fixture(scope="session")
def xen_keys():
    """A test key pair kept in the lab's cache: its base initrd (keyed by the trusted keys)
    then stays warm from one session to the next instead of costing a minute each time."""
    from dom0.cache import cache_dir
    from dom0.keys import ensure_unencrypted_keypair

    return ensure_unencrypted_keypair(cache_dir("xenlab", "test-keys"), "xen-trusted")


@pytest.fixture(scope="session")
def xen_session(tmp_path_factory, kernel, xen_keys) -> XenSession:
    """Boot Xen once, run every in-dom0 step of the tier, and keep the outputs."""
    if os.geteuid() != 0:
        pytest.skip("the Xen tier needs root (debootstrap and mkfs.ext4 -d for dom0's image)")
    from dom0.xenlab import XenLab

    secret, public = xen_keys
    work = tmp_path_factory.mktemp("xen")
    inputs = work / "in"
    make_inputs(inputs, kernel, secret, public)
    shared_sha = hashlib.sha256((inputs / "shared.img").read_bytes()).hexdigest()
    lab = XenLab(kernel=kernel)
    started = time.monotonic()
    _, dom0 = lab.build()
    build_seconds = time.monotonic() - started
    result = lab.run_job(inputs, JOB, timeout=RUN_TIMEOUT, results=work / "results",
                         warm_trust=[[inputs / "trusted.pub"]])
    timings = dict(result.timings, dom0_cached=dom0.cached, dom0_build=round(build_seconds, 1),
                   dom0_ready_uptime=result.dom0_ready_seconds, total=round(time.monotonic() - started, 1))
    for name in (*GUESTS, "xen-lvm", BAD):
        stamps = (result.files_dir / f"{name}.times")
        if stamps.is_file():
            stamp = [float(x) for x in stamps.read_text().split()]
            if len(stamp) == 2:
                timings[name] = {"deploy": round(stamp[1] - stamp[0], 1)}
            else:
                timings[name] = {"prepare_initrd": round(stamp[1] - stamp[0], 1),
                                 "boot": round(stamp[2] - stamp[1], 1)}
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\nxen tier timings: {json.dumps(timings)}")
    assert not result.timed_out, f"the Xen run timed out; serial log {result.serial_log}"
    return XenSession(inputs=inputs, out=result.files_dir, serial_log=result.serial_log,
                      returncode=result.returncode, seconds=result.seconds, timings=timings,
                      shared_sha256=shared_sha, public_key=public)
