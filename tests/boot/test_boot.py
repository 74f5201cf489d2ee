"""A real Debian kernel under qemu, booted with the real initrd from prepare-initrd.

Each boot keeps its console capture and report in the test's temporary
directory (state/<domain>/console.log and report.json) for inspection.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dom0.boot import boot_domain
from dom0.cpio import CpioWriter
from dom0.errors import EXIT_FAILED, EXIT_OK
from dom0.initrd import PLAN_IN_INITRD, PLAN_SIG_IN_INITRD, load_trust, prepare_initrd
from dom0.keys import sign_with

from .conftest import write_domain, write_plan

pytestmark = pytest.mark.boot

BOOT_TIMEOUT = 240.0


def _boot(tmp_path: Path, kernel, initrd: Path, disk: Path, name: str) -> tuple[int, dict, str]:
    cfg = write_domain(tmp_path / f"{name}.cfg", name, kernel, initrd, [disk])
    code = boot_domain(cfg, timeout=BOOT_TIMEOUT, after="wait", state_dir=tmp_path / "state", quiet=True)
    state = tmp_path / "state" / name
    report = json.loads((state / "report.json").read_text())
    console = (state / "console.log").read_text(errors="replace")
    return code, report, console


def _stage(report: dict, name: str) -> dict:
    matches = [r for r in report["records"] if r["stage"] == name]
    assert matches, f"no record for stage {name}: {[r['stage'] for r in report['records']]}"
    return matches[-1]


def _disk_copy(root_image: Path, tmp_path: Path) -> Path:
    disk = tmp_path / "root.img"
    shutil.copyfile(root_image, disk)
    return disk


def _signed_initrd(tmp_path, kernel, plan, signing_keys):
    (secret, public), _ = signing_keys
    sign_with(plan, secret)
    initrd = tmp_path / "initrd.img"
    prepare_initrd(kernel, initrd, plan=plan, trust=load_trust([str(public)], False))
    return initrd


def test_plan_applied_and_real_init_runs(tmp_path, kernel, root_image, signing_keys):
    disk = _disk_copy(root_image, tmp_path)
    plan = write_plan(tmp_path / "plan.json")
    initrd = _signed_initrd(tmp_path, kernel, plan, signing_keys)

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-ok")

    assert code == EXIT_OK, console[-3000:]
    assert "demo-init: running as pid 1" in console
    assert "demo-init: /etc/hostname is booted-host" in console
    assert report["complete"], report["problems"]
    assert report["outcome"]["outcome"] == "switched"
    for stage in ("early", "modules", "devices", "mount", "apply", "switch"):
        assert _stage(report, stage)["status"] == "ok", _stage(report, stage)
    assert _stage(report, "devices")["details"]["found"]["LABEL=sc-test-root"].startswith("/dev/vd")
    trust = _stage(report, "early")["details"]["trust"]
    assert trust["signed"] is True and trust["unsigned_plans_allowed"] is False
    assert report["outcome"]["details"]["unsigned_plans_allowed"] is False
    assert "Kernel panic" not in console


def test_missing_root_label_is_reported_without_panic(tmp_path, kernel, root_image, signing_keys):
    disk = _disk_copy(root_image, tmp_path)
    plan = write_plan(tmp_path / "plan.json", device_timeout=3,
                      mounts=[{"device": {"label": "no-such-label"}, "target": "/"}])
    initrd = _signed_initrd(tmp_path, kernel, plan, signing_keys)

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-nolabel")

    assert code == EXIT_FAILED
    assert "Kernel panic" not in console
    devices = _stage(report, "devices")
    assert devices["status"] == "failed"
    assert devices["details"]["missing"] == ["LABEL=no-such-label"]
    assert "LABEL=no-such-label" in devices["details"]["error"]
    assert any(seen.get("label") == "sc-test-root" for seen in devices["details"]["seen"])
    assert report["outcome"]["outcome"] == "halted"
    assert report["outcome"]["policy"] == "halt"
    assert "demo-init" not in console


def _hand_made_initrd(tmp_path, kernel, plan_bytes: bytes, sig: bytes | None, trust) -> Path:
    """Base plus a plan segment written by hand: prepare-initrd refuses what these tests need."""
    result = prepare_initrd(kernel, tmp_path / "base.img", trust=trust)
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as out:
        out.write(result.base.path.read_bytes())
        writer = CpioWriter(out)
        writer.add_dir("etc/supercharge")
        writer.add_file(PLAN_IN_INITRD, plan_bytes, 0o644)
        if sig is not None:
            writer.add_file(PLAN_SIG_IN_INITRD, sig, 0o644)
        writer.close()
    return initrd


def test_invalid_plan_is_reported_without_panic(tmp_path, kernel, root_image):
    """Built with the development opt-out, which the report must state."""
    disk = _disk_copy(root_image, tmp_path)
    bad = json.dumps({"version": 1, "name": "bad", "mounts": [{"device": {"label": "x"}, "target": "/"}],
                      "steps": [{"op": "replace", "path": "/etc/hostname", "content": "x", "mode": 420}]})
    initrd = _hand_made_initrd(tmp_path, kernel, bad.encode(), None, load_trust([], True))

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-badplan")

    assert code == EXIT_FAILED
    assert "Kernel panic" not in console
    early = _stage(report, "early")
    assert early["status"] == "failed"
    assert "steps[0].mode" in early["details"]["error"]
    assert report["outcome"]["outcome"] == "halted"
    assert report["outcome"]["details"]["unsigned_plans_allowed"] is True
    assert "demo-init" not in console


def test_plan_signed_by_an_untrusted_key_is_refused(tmp_path, kernel, root_image, signing_keys):
    (_, trusted_pub), (stranger_secret, _) = signing_keys
    disk = _disk_copy(root_image, tmp_path)
    plan = write_plan(tmp_path / "plan.json")
    sig = sign_with(plan, stranger_secret)
    initrd = _hand_made_initrd(tmp_path, kernel, plan.read_bytes(), sig.read_bytes(),
                               load_trust([str(trusted_pub)], False))

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-untrusted")

    assert code == EXIT_FAILED
    early = _stage(report, "early")
    assert early["status"] == "failed"
    assert "plan signature refused" in early["details"]["error"]
    assert early["details"]["kind"]
    assert report["outcome"]["outcome"] == "halted"
    assert "demo-init" not in console
    assert "Kernel panic" not in console
