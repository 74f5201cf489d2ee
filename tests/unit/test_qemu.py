"""The qemu backend: command-line mapping, and process handling with a fake qemu."""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dom0.errors import EnvironmentProblem, UserError
from dom0.qemu import (
    QemuSettings,
    find_qemu,
    guest_cmdline,
    qemu_command,
    run_qemu,
)
from dom0.xlcfg import load_domain_config

pytestmark = pytest.mark.unit

# --- the command line -----------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("vmlinuz", "initrd.img", "root.img", "shared.img", "with,comma.img"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def domain(files: Path, body: str):
    path = files / "d.cfg"
    path.write_text("name = 'd'\nkernel = 'vmlinuz'\nramdisk = 'initrd.img'\n" + body)
    return load_domain_config(path)


def option(cmd: list[str], flag: str) -> list[str]:
    """Every value given after ``flag``."""
    return [cmd[i + 1] for i, word in enumerate(cmd[:-1]) if word == flag]


def test_basic_mapping_tcg(files: Path) -> None:
    dom = domain(files, "memory = 384\nvcpus = 2\nextra = 'quiet'\n")
    console = files / "out" / "console.log"
    cmd = qemu_command(dom, console, QemuSettings(accel="tcg"))
    assert cmd[0] == "qemu-system-x86_64"
    assert option(cmd, "-accel") == ["tcg,tb-size=256"]
    assert option(cmd, "-cpu") == ["qemu64,+rdrand"]
    assert option(cmd, "-machine") == ["pc"]
    assert option(cmd, "-m") == ["384"] and option(cmd, "-smp") == ["2"]
    assert option(cmd, "-kernel") == [str(files / "vmlinuz")]
    assert option(cmd, "-initrd") == [str(files / "initrd.img")]
    assert option(cmd, "-append") == ["console=ttyS0 quiet panic=-1"]
    assert option(cmd, "-chardev") == [f"file,id=console0,path={console}"]
    assert option(cmd, "-serial") == ["chardev:console0"]
    assert option(cmd, "-display") == ["none"] and option(cmd, "-monitor") == ["none"]
    assert "-no-reboot" in cmd and "-nodefaults" in cmd and "-nographic" not in cmd
    assert "virtio-rng-pci" in option(cmd, "-device")
    assert option(cmd, "-drive") == [] and option(cmd, "-netdev") == []


def test_kvm_settings(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERCHARGE_ACCEL", "kvm")
    settings = QemuSettings()
    cmd = qemu_command(domain(files, ""), files / "c.log", settings)
    assert option(cmd, "-accel") == ["kvm"] and option(cmd, "-cpu") == ["host"]
    explicit = QemuSettings(accel="tcg", cpu="max,-smap", tb_size=128)
    cmd = qemu_command(domain(files, ""), files / "c.log", explicit)
    assert option(cmd, "-accel") == ["tcg,tb-size=128"] and option(cmd, "-cpu") == ["max,-smap"]


def test_unknown_accelerator() -> None:
    with pytest.raises(UserError, match="accelerator 'hax'.*expected one of tcg, kvm"):
        QemuSettings(accel="hax")


@pytest.mark.parametrize("given, expected", [
    ("", "console=ttyS0 panic=-1"),
    ("root=LABEL=root ro", "console=ttyS0 root=LABEL=root ro panic=-1"),
    ("console=ttyS0,115200 quiet", "console=ttyS0,115200 quiet panic=-1"),
    ("console=hvc0 quiet", "console=ttyS0 quiet panic=-1"),
    ("quiet panic=10", "console=ttyS0 quiet panic=10"),
    ("console=tty0 console=ttyS0 panic=-1", "console=tty0 console=ttyS0 panic=-1"),
])
def test_guest_cmdline(given: str, expected: str) -> None:
    assert guest_cmdline(given) == expected
    assert guest_cmdline(expected) == expected  # applying it twice adds nothing


def test_disks_map_to_virtio_drives(files: Path) -> None:
    dom = domain(files, textwrap.dedent("""\
        disk = [ 'format=raw, vdev=xvda, access=rw, target=root.img',
                 'file:shared.img,xvdb,r',
                 'vdev=xvdc, access=ro, target=with,comma.img',
                 ',,hdc:cdrom,r' ]
        """))
    cmd = qemu_command(dom, files / "c.log", QemuSettings(accel="tcg"))
    assert option(cmd, "-drive") == [
        f"file={files}/root.img,format=raw,if=virtio,cache=unsafe,readonly=off",
        f"file={files}/shared.img,format=raw,if=virtio,cache=unsafe,readonly=on",
        f"file={files}/with,,comma.img,format=raw,if=virtio,cache=unsafe,readonly=on",
    ]


def test_qcow2_and_vhd_formats(files: Path) -> None:
    dom = domain(files, "disk = ['root.img,qcow2,xvda,w', 'vhd:shared.img,xvdb,w']\n")
    drives = option(qemu_command(dom, files / "c.log", QemuSettings(accel="tcg")), "-drive")
    assert "format=qcow2" in drives[0] and "format=vpc" in drives[1]  # qemu calls VHD vpc


@pytest.mark.parametrize("remove, what", [
    ("vmlinuz", "kernel"), ("initrd.img", "ramdisk"), ("root.img", "disk target")])
def test_missing_files_are_named(files: Path, remove: str, what: str) -> None:
    dom = domain(files, "disk = ['format=raw,vdev=xvda,target=root.img']\n")
    (files / remove).unlink()
    with pytest.raises(UserError) as info:
        qemu_command(dom, files / "c.log", QemuSettings(accel="tcg"))
    assert str(info.value) == f"{files}/d.cfg: {what} {files}/{remove} does not exist"


def test_script_disks_are_refused(files: Path) -> None:
    dom = domain(files, "disk = ['iscsi:iqn.2001-05.com.example:d0,xvda,w']\n")
    with pytest.raises(UserError, match="script=block-iscsi"):
        qemu_command(dom, files / "c.log", QemuSettings(accel="tcg"))


def test_vifs_map_to_user_networking(files: Path) -> None:
    dom = domain(files, "vif = [ 'mac=00:16:3e:0a:0b:0c,bridge=xenbr0', '' ]\n")
    cmd = qemu_command(dom, files / "c.log", QemuSettings(accel="tcg"))
    assert option(cmd, "-netdev") == ["user,id=net0", "user,id=net1"]
    assert option(cmd, "-device")[1:] == ["virtio-net-pci,netdev=net0,mac=00:16:3e:0a:0b:0c",
                                          "virtio-net-pci,netdev=net1"]
    bad = domain(files, "vif = [ 'mac=00:16:3e:xx' ]\n")
    with pytest.raises(UserError, match="vif mac '00:16:3e:xx'"):
        qemu_command(bad, files / "c.log", QemuSettings(accel="tcg"))


# --- running, with a fake qemu ----------------------------------------------------

FAKE_QEMU = """\
#!{python}
import os, signal, subprocess, sys, time
console, mode, pidfile = sys.argv[1], sys.argv[2], sys.argv[3]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pidfile + ".child", "w") as f:
        f.write(str(child.pid))
print("qemu-system-x86_64: warning: fake", file=sys.stderr, flush=True)
with open(console, "ab", buffering=0) as out:
    for n in range(5):
        out.write(b"line %d\\n" % n)
        time.sleep(0.05)
    if mode == "exit":
        sys.exit(3)
    if mode == "marker":
        out.write(b"BOOT-REPORT done\\n")
    while True:
        out.write(b"tick\\n")
        time.sleep(0.05)
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    path.write_text(FAKE_QEMU.format(python=sys.executable))
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped by someone else."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def fake_cmd(fake: Path, console: Path, mode: str) -> list[str]:
    return [str(fake), str(console), mode, str(console.parent / "fake.pid")]


def test_normal_exit(fake_qemu: Path, tmp_path: Path) -> None:
    console = tmp_path / "run" / "console.log"
    console.parent.mkdir()
    console.write_bytes(b"stale BOOT-REPORT done from an earlier run\n")
    run = run_qemu(fake_cmd(fake_qemu, console, "exit"), console, timeout=30, poll=0.05,
                   should_stop=lambda data: b"BOOT-REPORT" in data)
    assert (run.returncode, run.timed_out, run.stopped) == (3, False, False)
    assert console.read_bytes() == b"".join(b"line %d\n" % n for n in range(5))
    assert run.log == console.parent / "qemu.log"
    assert b"warning: fake" in run.log.read_bytes()
    assert run.duration < 10 and not alive(run.pid)


def test_should_stop_terminates(fake_qemu: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    seen: list[int] = []

    def stop(data: bytes) -> bool:
        seen.append(len(data))
        return b"BOOT-REPORT done" in data

    run = run_qemu(fake_cmd(fake_qemu, console, "marker"), console, timeout=30, poll=0.05,
                   should_stop=stop)
    assert run.stopped and not run.timed_out
    assert run.returncode is not None and run.returncode < 0  # ended by SIGTERM
    assert seen == sorted(seen) and seen[0] > 0  # called with the growing capture
    assert b"BOOT-REPORT done" in console.read_bytes()
    assert run.duration < 10 and not alive(run.pid)


def test_timeout_kills_even_a_stubborn_process_and_its_children(fake_qemu: Path,
                                                                tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    start = time.monotonic()
    run = run_qemu(fake_cmd(fake_qemu, console, "stubborn"), console, timeout=1.0, poll=0.05,
                   term_grace=0.5)
    assert run.timed_out and not run.stopped
    assert 1.0 <= time.monotonic() - start < 10
    assert run.returncode == -9  # SIGTERM ignored, so SIGKILL
    child = int((tmp_path / "fake.pid.child").read_text())
    assert int((tmp_path / "fake.pid").read_text()) == run.pid
    deadline = time.monotonic() + 5
    while (alive(run.pid) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(run.pid) and not alive(child)


def test_keyboard_interrupt_leaves_nothing_behind(fake_qemu: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"

    def interrupt(data: bytes) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_qemu(fake_cmd(fake_qemu, console, "marker"), console, timeout=30, poll=0.05,
                 should_stop=interrupt)
    pid = int((tmp_path / "fake.pid").read_text())
    assert not alive(pid)


def test_missing_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem) as info:
        find_qemu()
    assert "qemu-system-x86_64" in str(info.value) and "qemu-system-x86 " in str(info.value)
    with pytest.raises(EnvironmentProblem, match="qemu-system-x86"):
        run_qemu(["qemu-system-x86_64", "-version"], tmp_path / "c.log", timeout=5)
