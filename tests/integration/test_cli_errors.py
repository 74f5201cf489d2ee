"""Bad input through the real command line: one clear line, a documented exit code, no traceback,
and nothing written where the command would have put its output.

The rule (DESIGN.md, docs/cli.md, dom0/errors.py): a bad argument, plan, config or missing
file exits with EXIT_BAD_INPUT (2) and prints exactly one line, ``supercharge: <message>``,
that names the offending thing (file:line:col for syntax errors, the field for a plan).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dom0.demo import demo_plan
from dom0.errors import EXIT_BAD_INPUT
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def assert_one_line_error(proc, *names: str, code: int = EXIT_BAD_INPUT) -> str:
    """The process failed with ``code`` and one stderr line naming each of ``names``."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("supercharge: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}: {line}"
    return line


@pytest.fixture
def inputs(tmp_path) -> Path:
    path = tmp_path / "in"
    path.mkdir()
    return path


@pytest.fixture
def outdir(tmp_path) -> Path:
    """Where outputs would go; must stay empty when a command fails."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def assert_nothing_written(outdir: Path, expected: dict[str, bytes] | None = None) -> None:
    """``outdir`` holds exactly ``expected`` (name -> bytes): no output, no temporary file."""
    expected = expected or {}
    found = {p.name: p.read_bytes() for p in outdir.iterdir()}
    assert set(found) == set(expected), f"files left in {outdir}: {sorted(set(found) - set(expected))}"
    for name, data in expected.items():
        assert found[name] == data, f"{name} was modified"


def good_plan(inputs: Path) -> Path:
    path = inputs / "plan.json"
    path.write_text(json.dumps(demo_plan(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------
# prepare-initrd and kernel


def test_unknown_kernel_version(cli, outdir):
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", "9.9.9-nonexistent", "-o", str(out))
    assert_one_line_error(proc, "9.9.9-nonexistent", "kernel")
    assert not out.exists()
    assert_nothing_written(outdir)


def test_kernel_fetch_unknown_version(cli, tmp_path, monkeypatch):
    # A private cache: the failed download must leave nothing behind in kernels/.
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERCHARGE_CACHE", str(cache))
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not installed")
    proc = cli("kernel", "fetch", "9.9.9-nonexistent-amd64")
    line = assert_one_line_error(proc, "9.9.9-nonexistent-amd64")
    assert "unknown kernel version" in line
    kernels = cache / "kernels"
    assert not kernels.exists() or not list(kernels.iterdir()), \
        f"left in the kernel cache: {list(kernels.iterdir())}"


def test_kernel_file_without_modules_dir(cli, kernel, outdir):
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", str(kernel.vmlinuz), "-o", str(out))
    assert_one_line_error(proc, str(kernel.vmlinuz), "--modules-dir")
    assert not out.exists()
    assert_nothing_written(outdir)


def test_kernel_file_with_missing_modules_dir(cli, kernel, tmp_path, outdir):
    missing = tmp_path / "no" / "lib" / "modules" / kernel.version
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", str(kernel.vmlinuz), "--modules-dir", str(missing),
               "-o", str(out))
    assert_one_line_error(proc, str(missing))
    assert not out.exists()
    assert_nothing_written(outdir)


def test_kernel_file_that_does_not_exist(cli, kernel, tmp_path, outdir):
    missing = tmp_path / "boot" / "vmlinuz-missing"
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", str(missing), "--modules-dir", str(kernel.modules_dir),
               "-o", str(out))
    assert_one_line_error(proc, str(missing))
    assert_nothing_written(outdir)


def test_unknown_module(cli, kernel, outdir):
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--modules", "no_such_module", "-o", str(out))
    assert_one_line_error(proc, "no_such_module")
    assert not out.exists()
    assert_nothing_written(outdir)


def test_plan_that_does_not_exist(cli, kernel, inputs, outdir):
    plan = inputs / "missing-plan.json"
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--plan", str(plan), "-o", str(out))
    assert_one_line_error(proc, str(plan))
    assert_nothing_written(outdir)


def test_plan_that_is_not_json(cli, kernel, inputs, outdir):
    plan = inputs / "broken.json"
    text = '{\n  "version": 1,\n  "name": "x",,\n  "mounts": []\n}\n'
    plan.write_text(text)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{plan}:{exc.lineno}:{exc.colno}"
    assert where == f"{plan}:3:15"
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--plan", str(plan), "-o", str(out))
    assert_one_line_error(proc, where)
    assert_nothing_written(outdir)


def test_plan_with_a_wrong_field(cli, kernel, inputs, outdir):
    doc = demo_plan()
    doc["steps"][0]["mode"] = "999"
    plan = inputs / "wrong.json"
    plan.write_text(json.dumps(doc, indent=2))
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--plan", str(plan), "-o", str(out))
    assert_one_line_error(proc, str(plan), "steps[0].mode", "999")
    assert_nothing_written(outdir)


def test_output_directory_that_does_not_exist(cli, kernel, inputs, tmp_path):
    out = tmp_path / "nowhere" / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--plan", str(good_plan(inputs)),
               "-o", str(out))
    assert_one_line_error(proc, str(out.parent))
    assert not out.parent.exists()


def test_output_path_that_is_a_directory(cli, kernel, inputs, outdir):
    target = outdir / "initrd.img"
    target.mkdir()
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--plan", str(good_plan(inputs)),
               "-o", str(target))
    assert_one_line_error(proc, str(target))
    assert target.is_dir() and not list(target.iterdir())
    assert [p.name for p in outdir.iterdir()] == ["initrd.img"], "temporary file left beside the output"


@pytest.mark.parametrize("method,level", [
    ("zstd", "0"),
    ("gzip", "99"),
    ("xz", "99"),
])
def test_compression_level_out_of_range(cli, kernel, outdir, method, level):
    out = outdir / "X.img"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", "--kernel", kernel.version, "--compression", method, "--level", level,
               "-o", str(out))
    assert_one_line_error(proc, method, level)
    assert_nothing_written(outdir)


@pytest.mark.parametrize("case", ["bad-plan", "bad-module", "bad-kernel"])
def test_existing_output_is_left_untouched_on_failure(cli, kernel, inputs, outdir, case):
    out = outdir / "domain.img"
    previous = b"the previous, working initrd\n" * 100
    out.write_bytes(previous)
    before = out.stat()
    args = ["--kernel", kernel.version, "--plan", str(good_plan(inputs))]
    if case == "bad-plan":
        (inputs / "plan.json").write_text('{"version": 1, "name": "x", "mounts": [], }')
    elif case == "bad-module":
        args += ["--modules", "virtio_blk,no_such_module"]
    else:
        args[1] = "9.9.9-nonexistent"
    proc = cli("prepare-initrd", "--allow-unsigned-plans", *args, "-o", str(out))
    assert_one_line_error(proc)
    assert_nothing_written(outdir, {"domain.img": previous})
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "output was replaced"


# ---------------------------------------------------------------------------
# boot


def write_config(path: Path, kernel, disk: Path | None = None, extra: str = "") -> Path:
    lines = ['name = "errdom"', f'kernel = "{kernel.vmlinuz}"', "memory = 256"]
    if disk is not None:
        lines.append(f'disk = ["format=raw,vdev=xvda,access=rw,target={disk}"]')
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_boot_config_with_missing_disk_image(cli, kernel, inputs, tmp_path):
    image = inputs / "missing-root.img"
    cfg = write_config(inputs / "errdom.cfg", kernel, disk=image)
    state = tmp_path / "state"
    proc = cli("boot", str(cfg), "--state-dir", str(state), "--timeout", "5")
    assert_one_line_error(proc, str(image), str(cfg))
    assert not image.exists()


def test_boot_rejected_config_keeps_the_previous_console_capture(cli, kernel, inputs, tmp_path):
    image = inputs / "missing-root.img"
    cfg = write_config(inputs / "errdom.cfg", kernel, disk=image)
    state = tmp_path / "state"
    (state / "errdom").mkdir(parents=True)
    previous = b"console of the last boot, still needed for diagnose\n"
    (state / "errdom" / "console.log").write_bytes(previous)
    proc = cli("boot", str(cfg), "--state-dir", str(state), "--timeout", "5")
    assert_one_line_error(proc, str(image))
    assert_nothing_written(state / "errdom", {"console.log": previous})


def test_boot_config_that_does_not_exist(cli, inputs, tmp_path):
    cfg = inputs / "missing.cfg"
    state = tmp_path / "state"
    proc = cli("boot", str(cfg), "--state-dir", str(state), "--timeout", "5")
    assert_one_line_error(proc, str(cfg))
    assert not state.exists()


def test_boot_config_with_a_syntax_error(cli, kernel, inputs, tmp_path):
    cfg = write_config(inputs / "syntax.cfg", kernel, extra="vcpus = = 2\n")
    state = tmp_path / "state"
    proc = cli("boot", str(cfg), "--state-dir", str(state), "--timeout", "5")
    assert_one_line_error(proc, f"{cfg}:4:9")
    assert not state.exists()


# ---------------------------------------------------------------------------
# collect


def test_collect_missing_console(cli, inputs, outdir):
    console = inputs / "missing.log"
    report = outdir / "report.json"
    proc = cli("collect", "--console", str(console), "-o", str(report))
    assert_one_line_error(proc, str(console))
    assert proc.stdout == ""
    assert_nothing_written(outdir)


def test_collect_missing_console_relative_path(cli):
    # As typed by an admin: a bare relative name (the CLI runs in the repository).
    proc = cli("collect", "--console", "missing.log")
    assert_one_line_error(proc, "missing.log")
    assert not (REPO / "missing.log").exists()


def test_no_trusted_keys_and_no_opt_out_is_refused(cli, kernel, tmp_path):
    out = tmp_path / "initrd.img"
    proc = cli("prepare-initrd", "--kernel", kernel.version, "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.startswith("supercharge: no trusted keys")
    assert "--allow-unsigned-plans" in proc.stderr
    assert not out.exists()


def test_unsigned_plan_with_trusted_keys_is_refused(cli, kernel, tmp_path):
    from dom0.keys import ensure_unencrypted_keypair

    _, public = ensure_unencrypted_keypair(tmp_path / "keys", "k")
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 1, "name": "p", "mounts": [{"device": {"label": "r"}, "target": "/"}]}')
    out = tmp_path / "initrd.img"
    proc = cli("prepare-initrd", "--trust", str(public), "--kernel", kernel.version, "--plan", str(plan),
               "-o", str(out))
    assert proc.returncode == 2
    assert "not signed" in proc.stderr and "plan.json.minisig" in proc.stderr
    assert not out.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """Output into a pipe nobody reads any more (``| head``): no BrokenPipe traceback, exit 141."""
    import os
    import subprocess

    old, new = tmp_path / "old", tmp_path / "new"
    for root, word in ((old, b"old"), (new, b"new")):
        root.mkdir()
        for i in range(50):
            (root / f"f{i}").write_bytes(word * 2000 + b"\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([str(REPO / ".venv/bin/supercharge"), "patch", "diff", str(old), str(new)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
