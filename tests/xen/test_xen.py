"""Real Xen 4.17 (under qemu) with a Debian dom0: xl, and supercharge boot --hypervisor xen.

All Xen work happens in one boot (the ``xen_session`` fixture); the tests read
its outputs.  The failing-patch test also boots the same plan under qemu on
the host and compares the diagnosis.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.errors import EXIT_FAILED, EXIT_OK
from dom0.initrd import load_trust, prepare_initrd
from dom0.xlcfg import write_xl_config

from .conftest import BAD, GUESTS

pytestmark = pytest.mark.xen

REPO = Path(__file__).resolve().parents[2]
# Keys of a failed step's details that measure time, not what failed.
TIMING_KEYS = {"duration", "seconds", "uptime", "elapsed", "started", "finished"}


def _record(report: dict, stage: str) -> dict:
    found = [r for r in report["records"] if r["stage"] == stage]
    assert found, f"no {stage} record: {[r['stage'] for r in report['records']]}"
    return found[-1]


def test_job_ran_to_the_end(xen_session):
    assert xen_session.returncode == 0, xen_session.text("job.log")[-3000:]


def test_xl_dry_run_accepts_our_config(xen_session):
    assert xen_session.text("dry.rc").strip() == "0", xen_session.text("dry.err")
    out = xen_session.text("dry.out")
    assert "xvda" in out and "xvdb" in out, out[:2000]
    assert "00:16:3e:5a:17:01" in out
    doc = json.loads(out)
    disks = {d["vdev"]: d for d in doc["disks"]}
    assert disks["xvda"]["pdev_path"].endswith("shared.img")
    assert disks["xvda"].get("readwrite", 0) in (0, False)
    assert disks["xvdb"]["pdev_path"].endswith("xen-pv-upper.img")
    assert doc["nics"][0]["bridge"] == "xenbr0"
    assert doc["on_reboot"] == "restart" and doc["on_crash"] == "preserve"


def test_the_papers_stripped_config_is_accepted_by_xl(xen_session):
    assert xen_session.text("paper.rc").strip() == "0", xen_session.text("paper.err")
    doc = json.loads(xen_session.text("paper.out"))
    disks = {d["vdev"]: d for d in doc["disks"]}
    assert disks["sda1"]["pdev_path"] == "/var/images/xen_usr"
    assert disks["sda1"].get("readwrite", 0) in (0, False)
    assert disks["sda2"]["pdev_path"].endswith("fido-etc")      # the [image ... export sda2]
    assert doc["c_info"]["name"] == "fido"


def test_prepare_initrd_in_dom0_is_the_warm_path(xen_session):
    assert xen_session.text(f"{BAD}.prepare.rc").strip() == "0", xen_session.text(f"{BAD}.prepare.err")
    result = json.loads(xen_session.text(f"{BAD}.prepare.json"))
    assert result["base"]["cached"] is True, result["base"]
    for name in GUESTS:                        # deploy's own prepare-initrd, from the same cache
        deployed = json.loads(xen_session.text(f"{name}.deploy.json") or "{}")
        assert deployed.get("initrd_info", {}).get("base", {}).get("cached") is True, (
            xen_session.text(f"{name}.boot.err")[-2000:])


@pytest.mark.parametrize("name,kind", [("xen-pv", "pv"), ("xen-pvh", "pvh")])
def test_deploy_boots_a_guest_from_shared_root_with_own_overlay(xen_session, name, kind):
    console = xen_session.console(name)
    assert xen_session.text(f"{name}.boot.rc").strip() == str(EXIT_OK), (
        xen_session.text(f"{name}.boot.err") + console[-3000:])
    report = xen_session.report(name)
    assert report["hypervisor"]["backend"] == "xen"
    assert report["hypervisor"]["type"] == kind
    assert report["outcome"]["outcome"] == "switched"
    assert report["complete"], report["problems"]
    mount = _record(report, "mount")
    assert mount["details"]["mounts"][0]["fstype"] == "overlay"
    found = _record(report, "devices")["details"]["found"]
    assert all(dev.startswith("/dev/xvd") for dev in found.values()), found
    assert _record(report, "early")["details"]["trust"]["signed"] is True
    assert f"demo-init: /etc/hostname is {name}" in console
    deployed = json.loads(xen_session.text(f"{name}.deploy.json"))
    assert deployed["hypervisor"] == "xen" and deployed["exit_code"] == EXIT_OK
    assert deployed["plan"]["mounts"][0]["overlay"]["upper"] == {"label": f"{name}-upper"}
    assert "vdev=xvda" in deployed["xl"] and "access=ro" in deployed["xl"]


def test_shared_root_untouched_and_upper_layer_kept(xen_session):
    assert xen_session.text("shared.sha256").strip() == xen_session.shared_sha256
    assert xen_session.text("xen-pv-upper-hostname.txt") == "xen-pv\n"


def _failed_step(report: dict) -> dict:
    failed = [r for r in report["records"] if r.get("status") == "failed" and r["stage"] != "outcome"]
    assert failed, "no failed stage"
    return {"stage": failed[0]["stage"], "details": _without_timing(failed[0].get("details") or {}),
            "outcome": report["outcome"]["outcome"], "policy": report["outcome"]["policy"]}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _diagnosis_lines(text: str) -> list[str]:
    """``supercharge diagnose`` output without its first line (durations and uptime)."""
    return text.splitlines()[1:]


def test_failing_patch_is_diagnosed_as_under_qemu(xen_session, kernel, tmp_path):
    assert xen_session.text(f"{BAD}.boot.rc").strip() == str(EXIT_FAILED), xen_session.text(f"{BAD}.boot.err")
    on_xen = xen_session.report(BAD)
    assert on_xen["hypervisor"]["backend"] == "xen"

    # The same signed plan, root image and trust, booted under qemu here on the host.
    disk = tmp_path / "shared.img"
    shutil.copyfile(xen_session.inputs / "shared.img", disk)
    initrd = tmp_path / f"{BAD}.initrd"
    prepare_initrd(kernel, initrd, plan=xen_session.inputs / f"{BAD}.json",
                   trust=load_trust([str(xen_session.public_key)], False))
    cfg = tmp_path / f"{BAD}.cfg"
    cfg.write_text(write_xl_config({"name": BAD, "kernel": str(kernel.vmlinuz), "ramdisk": str(initrd),
                                    "extra": "console=hvc0", "memory": 256,
                                    "disk": [f"format=raw,vdev=xvda,access=ro,target={disk}"]}))
    code = boot_domain(cfg, timeout=240, state_dir=tmp_path / "state", quiet=True)
    assert code == EXIT_FAILED
    on_qemu = json.loads((tmp_path / "state" / BAD / "report.json").read_text())

    xen_step, qemu_step = _failed_step(on_xen), _failed_step(on_qemu)
    assert xen_step["stage"] == "apply", xen_step
    assert xen_step == qemu_step
    qemu_text = subprocess.run([sys.executable, "-m", "dom0", "diagnose",
                                str(tmp_path / "state" / BAD / "report.json")],
                               capture_output=True, text=True, cwd=REPO, check=False).stdout
    xen_text = xen_session.text(f"{BAD}.diagnose.txt")
    assert "expected-name" in xen_text and "shared" in xen_text
    assert _diagnosis_lines(xen_text) == _diagnosis_lines(qemu_text)


def test_deploy_gives_a_domain_an_lvm_snapshot_and_the_origin_stays(xen_session):
    """[export /dev/VG/LV ... cow]: dom0 makes an LVM snapshot, the domain boots from it on
    blkback and changes it; the origin volume (the shared image) is byte for byte the same."""
    assert xen_session.text("lvm-setup.rc").strip() == "0", xen_session.text("lvm-setup.log")
    assert xen_session.text("xen-lvm.boot.rc").strip() == str(EXIT_OK), (
        xen_session.text("xen-lvm.boot.err")[-3000:] + xen_session.console("xen-lvm")[-3000:])
    assert xen_session.report("xen-lvm")["outcome"]["outcome"] == "switched"
    deployed = json.loads(xen_session.text("xen-lvm.deploy.json"))
    assert "target=/dev/scxen/xen-lvm-xvda" in deployed["xl"] and "phy" in deployed["xl"]
    volumes = dict(line.split() if len(line.split()) == 2 else (line.strip(), "")
                   for line in xen_session.text("lvs.txt").splitlines() if line.strip())
    assert volumes.get("xen-lvm-xvda") == "root", volumes
    before, after = xen_session.text("lvm-origin.before").strip(), xen_session.text("lvm-origin.after").strip()
    assert len(before) == 64 and before == after
    assert xen_session.text("lvm-snapshot-hostname.txt") == "xen-lvm\n"
