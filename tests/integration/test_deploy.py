"""``supercharge deploy --dry-run`` on container files, and deploy's errors: what the xl config
and the plan would be, with nothing started and nothing written outside a temporary
directory.  (The full deploy, booting a guest, is in tests/boot/test_deploy.py.)"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dom0.xlcfg import DiskSpec, parse_disk_spec, parse_xl_config
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"),
]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A container directory with a shared image, and a container using every kind of export."""
    from dom0.rootfs import make_ext4_image

    (tmp_path / "images").mkdir()
    (tmp_path / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "tree" / "etc" / "hostname").write_text("shared\n")
    make_ext4_image(tmp_path / "tree", tmp_path / "images" / "root.img", "sc-dry-root", size_mib=8)
    make_ext4_image(tmp_path / "tree", tmp_path / "images" / "usr.img", "sc-dry-usr", size_mib=8)
    (tmp_path / "web2.ct").write_text("""\
# web2: a cow root, a shared /usr, an LVM snapshot for /var.
name = "web2"
type = "pvh"
memory = 256
cmdline = "console=hvc0 quiet"
vif = [ "bridge=xenbr0, mac=00:16:3e:00:00:02" ]
channel = [ "name=org.supercharge.report, connection=pty" ]
disk = [ "format=raw, vdev=xvdz, access=ro, target=images/usr.img" ]

[export images/root.img xvda cow overlay overlays/web2-root.qcow2] [end]
[export images/usr.img xvdb ro] [end]
[export /dev/vg0/debian-var xvdc cow snapshot web2-var snapshot-size 1G] [end]
[image images/web2-etc.img 16M web2_etc export xvdd] [end]

[mount sc-dry-root / rw] [end]
[mount sc-dry-usr /usr ro] [end]
[replace /etc/hostname at boot

web2
] [end]
""")
    return tmp_path


def test_dry_run_prints_config_and_plan_and_writes_nothing(site: Path, kernel, tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    before = _tree_digest(site)
    scratch = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(scratch))         # where the dry run's workspace goes
    state = tmp_path / "state"
    proc = run_cli("deploy", str(site / "web2.ct"), "--dry-run", "--json", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["domain"], doc["dry_run"], doc["hypervisor"]) == ("web2", True, "qemu")
    assert doc["config"] == str(state / "web2" / "web2.cfg")

    xl = parse_xl_config(doc["xl"])
    assert xl["name"] == "web2" and xl["kernel"] == str(kernel.vmlinuz)
    assert xl["ramdisk"] == str(state / "web2" / "initrd.img")
    assert xl["cmdline"] == "console=hvc0 quiet"
    assert xl["vif"] == ["mac=00:16:3e:00:00:02,bridge=xenbr0"]
    assert xl["channel"] == ["name=org.supercharge.report,connection=pty"]
    images = site / "images"
    assert [parse_disk_spec(d) for d in xl["disk"]] == [
        DiskSpec(target=str(images / "usr.img"), vdev="xvdz", access="ro"),
        DiskSpec(target=str(site / "overlays" / "web2-root.qcow2"), vdev="xvda", format="qcow2",
                 backendtype="qdisk"),
        DiskSpec(target=str(images / "usr.img"), vdev="xvdb", access="ro"),
        DiskSpec(target="/dev/vg0/web2-var", vdev="xvdc", backendtype="phy"),
        DiskSpec(target=str(images / "web2-etc.img"), vdev="xvdd"),
    ]
    plan = doc["plan"]
    assert [m["target"] for m in plan["mounts"]] == ["/", "/usr"]
    assert plan["steps"] == [{"op": "replace", "path": "/etc/hostname", "content": "web2\n",
                              "mode": "0644"}]
    assert [e["action"].split(",")[0] for e in doc["expressions"][:4]] == [
        f"overlay {site / 'overlays' / 'web2-root.qcow2'} not created (dry run)",
        "shared read-only", "snapshot /dev/vg0/web2-var not created (dry run)",
        "not created (dry run)"]

    assert not state.exists()                          # nothing in the state directory
    assert _tree_digest(site) == before                # nor beside the container
    assert list(scratch.iterdir()) == []               # and its workspace is gone


def test_dry_run_text_output(site: Path, kernel, tmp_path: Path) -> None:
    proc = run_cli("deploy", str(site / "web2.ct"), "--dry-run", "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("# dry run: nothing was started or written; web2 would be deployed in ")
    config_text = out.split(f"# ---- {tmp_path / 's' / 'web2' / 'web2.cfg'}\n")[1].split("# ---- ")[0]
    assert parse_xl_config(config_text)["name"] == "web2"
    plan_text = out.split("initrd.img)\n")[1]
    assert json.loads(plan_text)["name"] == "web2"


@pytest.mark.skipif(shutil.which("xl") is not None, reason="a Xen dom0 would really start the domain")
def test_deploy_writes_everything_before_starting_and_nfs_exports_beside_the_config(
        tmp_path: Path, kernel) -> None:
    """Everything is in the state directory before the domain is started: here the start
    itself fails (no xl on this host, exit code 3), after the config, the plan, the initrd and
    the domain's NFS exports were written; an old plan signature is removed."""
    (tmp_path / "exports" / "opt").mkdir(parents=True)
    ct = tmp_path / "nfs1.ct"
    ct.write_text('name = "nfs1"\nvif = [ "mac=52:54:00:ab:cd:09" ]\n[mount sc-root / rw] [end]\n'
                  "[nfs exports/opt /opt ro server 10.0.2.2 pseudo /nfs1/opt] [end]\n")
    state = tmp_path / "state"
    stale = state / "nfs1" / "plan.json.minisig"
    stale.parent.mkdir(parents=True)
    stale.write_text("an old signature\n")
    proc = run_cli("deploy", str(ct), "--hypervisor", "xen", "--allow-unsigned-plans",
                   "--state-dir", str(state))
    assert proc.returncode == 3 and "xl" in proc.stderr, proc.stderr
    domain = state / "nfs1"
    assert {p.name for p in domain.iterdir()} >= {"nfs1.cfg", "plan.json", "initrd.img",
                                                   "nfs1.cfg.ganesha.conf", "nfs1.cfg.exports"}
    assert not stale.exists()
    assert 'Pseudo = "/nfs1/opt";' in (domain / "nfs1.cfg.ganesha.conf").read_text()
    assert str((tmp_path / "exports" / "opt").resolve()) in (domain / "nfs1.cfg.exports").read_text()
    assert "NFS exports: " + str(domain / "nfs1.cfg.ganesha.conf") in proc.stdout


def test_written_config_resolves_paths_from_the_container(site: Path, kernel, tmp_path: Path) -> None:
    """Relative targets in the container are relative to it, wherever the config is written."""
    proc = run_cli("deploy", str(site / "web2.ct"), "--dry-run", "--json",
                   "--state-dir", str(tmp_path / "elsewhere"))
    xl = parse_xl_config(json.loads(proc.stdout)["xl"])
    assert all(parse_disk_spec(d).target.startswith("/") for d in xl["disk"])


@pytest.mark.parametrize("text, args, code, message", [
    ("name = 'a'\n[export x.img xvda cow snapshot s] [end]\n", (), 2,
     "{ct}:2:24: expected 'overlay PATH' for an image file ('snapshot' is for a logical volume, a "
     "PATH under /dev/), found 'snapshot'"),
    ("memory = 64\n[mount r / rw] [end]\n", ("--dry-run",), 2,
     "{ct}: expected a 'name' setting (a quoted string naming the domain), found none"),
    ("name = 'a'\nvif = [ 'brige=xenbr0' ]\n[mount r / rw] [end]\n", ("--dry-run",), 2,
     "{ct}:2:9: vif spec 'brige=xenbr0': expected a vif keyword (mac, bridge, gatewaydev, type, "
     "model, vifname, script, ip, backend, rate, devid, mtu), found brige="),
    ("name = 'a'\n[mount r / rw] [end]\n", (), 2,
     "{ct}: the container has boot-time expressions, so its plan must be signed: give --sign-key "
     "SECKEY (its public key goes into the initrd), or --allow-unsigned-plans for development"),
    ("name = 'a'\nmemory = 64\n", ("--dry-run",), 2,
     "{ct}: expected boot-time expressions (at least [mount LABEL / ro|rw]) for the agent's plan, "
     "or a 'ramdisk' setting, found neither"),
    ("name = 'a'\nkernel = '/nonexistent/vmlinuz-9.9'\n[mount r / rw] [end]\n", ("--dry-run",), 2,
     "{ct}:2:10: kernel /nonexistent/vmlinuz-9.9 not found"),
    ("name = 'a'\nkernel = 'vmlinuz-9.9'\n[mount r / rw] [end]\n", ("--dry-run",), 2,
     "{ct}:2:10: kernel {dir}/vmlinuz-9.9: expected a cached kernel (vmlinuz-VERSION with its "
     "modules in the kernel cache), found none for it; give --modules-dir DIR (its "
     "lib/modules/VERSION), --kernel VERSION, or leave 'kernel' out"),
    ("name = 'a'\n[export missing.img xvda ro] [end]\n[mount r / rw] [end]\n", ("--dry-run",), 2,
     "{ct}:2:9: image {dir}/missing.img not found"),
])
def test_deploy_errors(tmp_path: Path, kernel, text: str, args: tuple, code: int, message: str) -> None:
    """Bad input: one line naming the place, exit code 2, nothing started or written."""
    container = tmp_path / "bad.ct"
    container.write_text(text)
    (tmp_path / "vmlinuz-9.9").write_bytes(b"not a kernel")
    state = tmp_path / "state"
    proc = run_cli("deploy", str(container), "--state-dir", str(state), *args)
    expected = message.format(ct=container, dir=tmp_path)
    assert (proc.returncode, proc.stderr) == (code, f"supercharge: {expected}\n")
    assert not state.exists()


def test_deploy_help_lists_the_options() -> None:
    proc = run_cli("deploy", "--help")
    assert proc.returncode == 0
    for option in ("--hypervisor {qemu,xen}", "--dry-run", "--state-dir", "--json", "--timeout",
                   "--sign-key"):
        assert option in proc.stdout
