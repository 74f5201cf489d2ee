"""`supercharge diagnose` explains a failed stage from the report alone (no guest needed)."""
from __future__ import annotations

import pytest

from dom0.diagnose import HINTS, NFS_HINT, explain

pytestmark = pytest.mark.unit


def _report(stage: str, details: dict) -> dict:
    return {"domain": "web1",
            "records": [{"seq": 1, "stage": stage, "status": "failed", "details": details}],
            "outcome": {"seq": 2, "stage": "outcome", "outcome": "halted", "policy": "halt"}}


def test_a_failed_nfs_mount_gets_the_nfs_advice():
    text, code = explain(_report("mount", {
        "error": "cannot mount 10.0.2.2:/export/opt on /opt: Connection refused [ECONNREFUSED]",
        "device": "10.0.2.2:/export/opt", "fstype": "nfs4", "target": "/opt"}))
    assert code == 1
    assert "failed stage: mount" in text and "ECONNREFUSED" in text
    assert NFS_HINT in text and HINTS["mount"] not in text


def test_a_failed_block_mount_keeps_the_general_advice():
    text, _ = explain(_report("mount", {"error": "cannot mount /dev/vda on /: Invalid argument",
                                        "device": "/dev/vda", "fstype": "ext4", "target": "/"}))
    assert HINTS["mount"] in text and NFS_HINT not in text


def test_a_failed_hook_says_nothing_was_committed():
    text, _ = explain(_report("hooks", {
        "error": "hook 'ssh-keys' exited with 3; nothing was committed", "committed": False,
        "hooks": [{"name": "ssh-keys", "status": "failed", "exit_code": 3, "output": "no key\n"}]}))
    assert "nothing was committed" in text and "ssh-keys" in text
