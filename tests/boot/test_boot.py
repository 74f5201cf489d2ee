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
from dom0.initrd import PLAN_IN_INITRD, prepare_initrd

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


def test_plan_applied_and_real_init_runs(tmp_path, kernel, root_image):
    disk = _disk_copy(root_image, tmp_path)
    plan = write_plan(tmp_path / "plan.json")
    initrd = tmp_path / "initrd.img"
    prepare_initrd(kernel, initrd, plan=plan)

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-ok")

    assert code == EXIT_OK, console[-3000:]
    assert "demo-init: running as pid 1" in console
    assert "demo-init: /etc/hostname is booted-host" in console
    assert report["complete"], report["problems"]
    assert report["outcome"]["outcome"] == "switched"
    for stage in ("early", "modules", "devices", "mount", "apply", "switch"):
        assert _stage(report, stage)["status"] == "ok", _stage(report, stage)
    assert _stage(report, "devices")["details"]["found"]["LABEL=sc-test-root"].startswith("/dev/vd")
    assert "Kernel panic" not in console


def test_missing_root_label_is_reported_without_panic(tmp_path, kernel, root_image):
    disk = _disk_copy(root_image, tmp_path)
    plan = write_plan(tmp_path / "plan.json", device_timeout=3,
                      mounts=[{"device": {"label": "no-such-label"}, "target": "/"}])
    initrd = tmp_path / "initrd.img"
    prepare_initrd(kernel, initrd, plan=plan)

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


def test_invalid_plan_is_reported_without_panic(tmp_path, kernel, root_image):
    """prepare-initrd refuses invalid plans, so the bad one is appended by hand."""
    disk = _disk_copy(root_image, tmp_path)
    base_only = tmp_path / "base.img"
    result = prepare_initrd(kernel, base_only)
    bad = json.dumps({"version": 1, "name": "bad", "mounts": [{"device": {"label": "x"}, "target": "/"}],
                      "steps": [{"op": "replace", "path": "/etc/hostname", "content": "x", "mode": 420}]})
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as out:
        out.write(result.base.path.read_bytes())
        writer = CpioWriter(out)
        writer.add_dir("etc/supercharge")
        writer.add_file(PLAN_IN_INITRD, bad.encode(), 0o644)
        writer.close()

    code, report, console = _boot(tmp_path, kernel, initrd, disk, "boot-badplan")

    assert code == EXIT_FAILED
    assert "Kernel panic" not in console
    early = _stage(report, "early")
    assert early["status"] == "failed"
    assert "steps[0].mode" in early["details"]["error"]
    assert report["outcome"]["outcome"] == "halted"
    assert "demo-init" not in console
