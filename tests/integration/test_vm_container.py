"""``vm-container``: the paper's Figure 2 command line, run as the installed console script.

    vm-container --container my-domain \\
    --stripped my-config --log /var/log/domain \\
    --dir /var/images

The container mixes xl statements (comments, a list across lines) with
expressions that build, populate, change and fork file systems, from a local
tree and from a loopback HTTP server; the test checks what Figure 2 promises:
the stripped standard config (lines, order, comments kept), the log (one line
per expression), and the work done under --dir.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dom0.xlcfg import parse_disk_spec, parse_xl_config
from guest_init.archive import extract_archive
from guest_init.devices import read_fs_identity
from guest_init.plan import load_plan

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="image changes need loop mounts (root)"),
]

VENV_BIN = Path(sys.executable).parent
VM_CONTAINER = VENV_BIN / "vm-container"

PASSWD = b"root:x:0:0:root:/root:/bin/bash\nfido:x:1000:1000:Fido:/home/fido:/bin/sh\n"
ACCOUNTS_PATCH = b"""\
--- a/passwd
+++ b/passwd
@@ -1,2 +1,3 @@
 root:x:0:0:root:/root:/bin/bash
 fido:x:1000:1000:Fido:/home/fido:/bin/sh
+web:x:1001:1001:Web:/srv/web:/bin/sh
"""
LOG_LINE = re.compile(r"^my-domain:(\d+):(\d+): (\w+) .+: .+ \(\d+\.\d{3} s, \d+ bytes\)$")


def vm_container(*args: str, cwd: Path, via_python: bool = False) -> subprocess.CompletedProcess:
    if via_python:
        cmd = [sys.executable, "-c",
               "import sys; from dom0.container.cli import vm_container_main; sys.exit(vm_container_main())",
               *args]
    else:
        cmd = [str(VM_CONTAINER), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def site(tmp_path, http_server):
    """A dom0 with an /etc tree to archive and an HTTP server holding a patch and a file."""
    etc = tmp_path / "srv" / "etc"
    etc.mkdir(parents=True)
    (etc / "HOSTNAME").write_bytes(b"template\n")
    (etc / "passwd").write_bytes(PASSWD)
    (etc / "motd").write_bytes(b"Welcome\n")
    web = http_server(tmp_path / "www")
    (web.root / "accounts.patch").write_bytes(ACCOUNTS_PATCH)
    (web.root / "issue").write_bytes(b"Supercharged\n")
    return etc, web


def figure_2_container(tmp_path: Path, etc: Path, web: str) -> tuple[str, str]:
    """(container text, the stripped config expected from it)."""
    images = tmp_path / "var" / "images"
    head = """\
# my-domain: the paper's fido, as a container file.
name = "fido"
memory = 256   # MiB
"""
    middle = """\
kernel = "/boot/vmlinuz"
disk = [
    "format=raw, vdev=xvda, access=ro, target=/var/images/usr.img",  # shared /usr
]
"""
    tail = """\
# networking
vif = [ "bridge=xenbr0" ]
on_crash = "restart"
"""
    text = f"""{head}
[create
 {etc}/
 file://{images}/etc.cpio.gz
 ][end]

{middle}
[image {images}/fido-etc
 50MB
 fido_etc
 export xvdc] [end]

[populate image
 {images}/fido-etc
 /mnt/
 file://{images}/etc.cpio.gz
 ][end]

[replace /etc/HOSTNAME
image {images}/fido-etc

FCDOBBS

] [end]

[copy /etc/issue {web}issue image {images}/fido-etc mode 0644] [end]

{tail}
[patch
file://{images}/fido-etc
{web}accounts.patch
file://{images}/fido-etc-patched
][end]
"""
    return text, f"{head}\n{middle}\n{tail}# exported by container expressions\ndisk += ["


@pytest.mark.parametrize("via_python", [False, True], ids=["console-script", "python-entry"])
def test_figure_2_flags_exactly(tmp_path, site, via_python):
    if not via_python and not VM_CONTAINER.exists():
        pytest.skip("the vm-container console script is not installed in this environment")
    etc, web = site
    text, expected = figure_2_container(tmp_path, etc, web)
    (tmp_path / "my-domain").write_text(text)
    log = tmp_path / "var" / "log" / "domain"
    log.parent.mkdir(parents=True)
    images = tmp_path / "var" / "images"
    proc = vm_container("--container", "my-domain", "--stripped", "my-config",
                        "--log", str(log), "--dir", str(images), cwd=tmp_path, via_python=via_python)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # The stripped config: the standard statements, in order, comments kept, plus the exported disk.
    stripped = (tmp_path / "my-config").read_text()
    assert stripped.startswith(expected), stripped
    config = parse_xl_config(stripped, "my-config")
    assert list(config) == ["name", "memory", "kernel", "disk", "vif", "on_crash"]
    assert [parse_disk_spec(d).vdev for d in config["disk"]] == ["xvda", "xvdc"]
    assert parse_disk_spec(config["disk"][1]).target == str(images / "fido-etc")
    # The log: one line per expression, in file order, each saying where, what, how long, how many bytes.
    lines = log.read_text().splitlines()
    kinds = [LOG_LINE.match(line) for line in lines]
    assert all(kinds), lines
    opened = [(line[1:].split()[0], number) for number, line in enumerate(text.splitlines(), 1)
              if re.match(r"\[[a-z]", line)]
    assert [k for k, _ in opened] == ["create", "image", "populate", "replace", "copy", "patch"]
    assert [(m.group(3), int(m.group(1))) for m in kinds] == opened
    assert proc.stdout.splitlines()[:6] == lines
    assert "stripped config: my-config" in proc.stdout
    # The work: the image, personalised and patched, and its fork.
    image = images / "fido-etc"
    ident = read_fs_identity(image)
    assert (ident.fstype, ident.label) == ("ext4", "fido_etc")
    forked = tmp_path / "forked"
    extract_archive(images / "fido-etc-patched", forked)
    assert (forked / "HOSTNAME").read_bytes() == b"FCDOBBS\n"
    assert (forked / "issue").read_bytes() == b"Supercharged\n"
    assert (forked / "passwd").read_bytes() == PASSWD + b"web:x:1001:1001:Web:/srv/web:/bin/sh\n"
    assert (forked / "motd").read_bytes() == b"Welcome\n"
    # Work files stay under --dir; no plan (nothing runs at boot).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forked", "my-config", "my-domain", "srv", "var", "www"]
    assert not list(tmp_path.glob("*.plan.json"))
    # A second run appends to the log, as a log does.
    proc = vm_container("--container", "my-domain", "--stripped", "my-config",
                        "--log", str(log), "--dir", str(images), cwd=tmp_path, via_python=via_python)
    assert proc.returncode == 0, proc.stderr
    assert len(log.read_text().splitlines()) == 12


def test_vm_container_writes_the_plan_beside_the_stripped_config(tmp_path, site):
    _, web = site
    text = f"""\
name = "web1"
[mount web1_root / ro] [end]
[copy /etc/issue {web}issue at boot] [end]
[hook hello

echo hello
] [end]
"""
    (tmp_path / "my-domain").write_text(text)
    proc = vm_container("--container", "my-domain", "--stripped", "my-config", "--log", "domain.log",
                        "--dir", "images", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "my-config").read_text() == 'name = "web1"\n'
    plan = load_plan(tmp_path / "my-config.plan.json")
    assert plan.steps[0].source.sha256 == hashlib.sha256(b"Supercharged\n").hexdigest()
    assert [line.split(": ")[1].split()[0] for line in (tmp_path / "domain.log").read_text().splitlines()] == [
        "mount", "copy", "hook"]
    assert (tmp_path / "images" / ".supercharge").is_dir()


@pytest.mark.parametrize("text, where", [
    ("[replace /etc/HOSTNAME\narchive http://foo.org/images/etc.cpio.gz\n\nFCDOBBS\n", "my-domain:1:1: expected ']'"),
    ("name = 'a'\nname = 'b'\n", "my-domain:2:1: expected each setting once"),
])
def test_vm_container_malformed_file(tmp_path, text, where):
    (tmp_path / "my-domain").write_text(text)
    proc = vm_container("--container", "my-domain", "--stripped", "my-config", "--log", "log",
                        "--dir", "images", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"vm-container: {where}")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "my-config").exists() and not (tmp_path / "log").exists()


def test_vm_container_missing_file_and_missing_flags(tmp_path):
    proc = vm_container("--container", "nope", "--stripped", "my-config", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("vm-container: ") and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vm_container("--stripped", "my-config", cwd=tmp_path)
    assert proc.returncode == 2 and "--container" in proc.stderr


def test_vm_container_failed_patch_exit_code(tmp_path, site):
    etc, web = site
    (web.root / "bad.patch").write_bytes(b"--- a/passwd\n+++ b/passwd\n@@ -1,2 +1,2 @@\n"
                                         b" root:x:0:0:root:/root:/bin/bash\n-nobody:x:65534:65534::/:/bin/false\n"
                                         b"+web:x:1001:1001:Web:/srv/web:/bin/sh\n")
    archive = tmp_path / "etc.cpio.gz"
    text = (f"[create {etc} file://{archive}] [end]\n"
            f"[patch file://{archive} {web}bad.patch file://{tmp_path}/never.cpio.gz] [end]\n")
    (tmp_path / "my-domain").write_text(text)
    proc = vm_container("--container", "my-domain", "--stripped", "my-config", "--log", "log",
                        "--dir", "images", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"vm-container: my-domain:2:1: patch {web}bad.patch does not apply")
    assert "hunk #1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never.cpio.gz").exists()
    shutil.rmtree(tmp_path / "images", ignore_errors=True)
