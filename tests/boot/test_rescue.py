"""failure_policy "rescue": a shell on the console when the initrd carries one, halt otherwise."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from dom0.boot import boot_domain
from dom0.initrd import load_trust, prepare_initrd
from dom0.keys import sign_with

from .conftest import write_domain, write_plan

pytestmark = pytest.mark.boot


@pytest.mark.parametrize("with_shell", [True, False], ids=["shell", "no-shell"])
def test_rescue_policy(tmp_path, kernel, root_image, signing_keys, with_shell):
    (secret, public), _ = signing_keys
    disk = tmp_path / "root.img"
    shutil.copyfile(root_image, disk)
    plan = write_plan(tmp_path / "plan.json", failure_policy="rescue", device_timeout=2,
                      mounts=[{"device": {"label": "no-such-label"}, "target": "/"}])
    sign_with(plan, secret)
    trust = dataclasses.replace(load_trust([str(public)], False), rescue_shell=with_shell)
    initrd = tmp_path / "initrd.img"
    prepare_initrd(kernel, initrd, plan=plan, trust=trust)
    name = f"rescue-{with_shell}"
    cfg = write_domain(tmp_path / f"{name}.cfg", name, kernel, initrd, [disk])

    code = boot_domain(cfg, timeout=180, after="wait", state_dir=tmp_path / "state", quiet=True)

    report = json.loads((tmp_path / "state" / name / "report.json").read_text())
    console = (tmp_path / "state" / name / "console.log").read_text(errors="replace")
    assert code == 1 and "Kernel panic" not in console
    if with_shell:
        assert report["outcome"]["outcome"] == "rescue"
        assert report["outcome"]["details"]["shell"] == "/bin/sh"
    else:
        policy = [r for r in report["records"] if r["stage"] == "policy"][-1]
        assert "no rescue shell" in policy["details"]["reason"]
        assert report["outcome"]["outcome"] == "halted"
