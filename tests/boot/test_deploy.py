"""``supercharge deploy`` end to end under qemu: a container whose root is a qcow2
copy-on-write overlay over a shared image is processed, its plan signed and put in an
initrd, its xl config written, and the guest booted; the personality lands in the
overlay and the shared image is byte-for-byte unchanged afterwards."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from dom0.demo import INIT_SCRIPT
from dom0.exports import backing_path, read_qcow2_header
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xlcfg import load_domain_config
from tests.conftest import run_cli

pytestmark = pytest.mark.boot

SHARED_LABEL = "sc-deploy-root"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deploy_boots_a_cow_root_and_leaves_the_shared_image_alone(tmp_path, kernel, signing_keys):
    (secret, _public), _ = signing_keys
    images = tmp_path / "images"
    images.mkdir()
    tree = busybox_tree(tmp_path / "root", INIT_SCRIPT, hostname="shared")
    shared = make_ext4_image(tree, images / "shared-root.img", SHARED_LABEL)
    before = _digest(shared)
    container = tmp_path / "web7.ct"
    container.write_text(f"""\
# web7: a copy-on-write root over the shared image, its hostname set at boot.
name = "web7"
type = "pvh"
memory = 512
vcpus = 1
cmdline = "console=hvc0"
on_poweroff = "destroy"

[export images/shared-root.img xvda cow
 overlay overlays/web7-root.qcow2
] [end]

[mount {SHARED_LABEL} / rw] [end]

[replace /etc/hostname at boot

web7
] [end]
""")
    (tmp_path / "overlays").mkdir()
    state = tmp_path / "state"
    proc = run_cli("deploy", str(container), "--hypervisor", "qemu", "--state-dir", str(state),
                   "--sign-key", str(secret), "--timeout", "240", "--json", timeout=400)
    console = state / "web7" / "console.log"
    shown = console.read_text(errors="replace")[-3000:] if console.exists() else proc.stderr
    assert proc.returncode == 0, shown
    doc = json.loads(proc.stdout)
    assert doc["report"]["outcome"]["outcome"] == "switched"
    assert doc["exit_code"] == 0
    assert "demo-init: /etc/hostname is web7" in console.read_text(errors="replace")

    # What deploy wrote: the xl config boots the overlay; the plan is signed.
    cfg = load_domain_config(state / "web7" / "web7.cfg")
    overlay = tmp_path / "overlays" / "web7-root.qcow2"
    assert [(d.target, d.format, d.backendtype, d.access) for d in cfg.disks] == [
        (str(overlay), "qcow2", "qdisk", "rw")]
    assert cfg.ramdisk == state / "web7" / "initrd.img" and cfg.kernel == kernel.vmlinuz
    assert (state / "web7" / "plan.json.minisig").is_file()
    header = read_qcow2_header(overlay)
    assert header is not None and backing_path(overlay, header) == tmp_path / "images" / "shared-root.img"

    # The personality lives in the overlay; the shared image never changed.
    assert _digest(shared) == before
    flat = tmp_path / "flat.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    hostname = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(flat)],
                              capture_output=True, text=True)
    assert hostname.stdout == "web7\n"
    original = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(shared)],
                              capture_output=True, text=True)
    assert original.stdout == "shared\n"
