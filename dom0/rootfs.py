"""Small root file systems for demos and tests: busybox-static into a labelled ext4 image.

``mkfs.ext4 -d`` fills the image from a directory without mounting anything,
so this works unprivileged and leaves no mount behind when it fails.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import EnvironmentProblem
from .tools import run_tool

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "mount", "umount", "poweroff", "halt", "reboot", "uname",
           "hostname", "ls", "sleep", "cut", "grep", "head", "sync", "mkdir", "stat", "sha256sum")


def busybox_tree(root: Path, init_script: str, hostname: str = "unconfigured") -> Path:
    """A minimal tree: busybox applets, /sbin/init from ``init_script``, /etc/hostname."""
    if not BUSYBOX.is_file():
        raise EnvironmentProblem(f"{BUSYBOX} not found: install Debian's busybox-static package")
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var/log", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    init = root / "sbin" / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    (root / "etc" / "hostname").write_text(hostname + "\n")
    return root


def make_ext4_image(tree: Path, image: Path, label: str, size_mib: int = 32) -> Path:
    """A sparse ext4 image holding ``tree``, labelled ``label``."""
    image.unlink(missing_ok=True)
    run_tool(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), str(image), f"{size_mib}M"],
             f"make {image} (mkfs.ext4 -d)")
    return image
