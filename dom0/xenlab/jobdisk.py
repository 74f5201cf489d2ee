"""The per-run job disk: the project, its Python packages, warm caches, inputs and the script.

Layout of the disk (mounted at /job in dom0):

    job.sh        the job (bash), after a preamble that sets up the environment
    timeout       seconds dom0 gives the job
    cache-root    where the host's cache lives; dom0 links /job/cache there, so the
                  cache keys (which contain that path) are the same on both sides
    src/          guest_init/, dom0/, initrd/ of this checkout (PYTHONPATH)
    py/           the runtime packages from this interpreter's site-packages,
                  linked as dom0's /usr/local site-packages
    cache/        the guest kernel (image and module index only), the frozen agent
                  and the base initrds of the requested trust sets
    in/           the job's inputs
    out/          what the job leaves for the host (read back with debugfs)
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from dom0.cache import cache_root
from dom0.errors import EnvironmentProblem, UserError
from dom0.kernel import KernelRef

from dom0.rootfs import make_ext4_image
from dom0.tools import run_tool
from .scripts import JOB_LABEL

REPO = Path(__file__).resolve().parent.parent.parent
SOURCE_DIRS = ("guest_init", "dom0", "initrd")
# What dom0's side imports (and prepare-initrd's warm path), with their requirements.
RUNTIME_DISTRIBUTIONS = ("requests", "cryptography", "pyroute2", "zstandard", "pyelftools")
# Only the metadata: the agent's cache key names PyInstaller's version, but dom0
# never freezes (the frozen agent comes from the host's cache).
METADATA_ONLY = ("pyinstaller",)

PREAMBLE = """#!/bin/bash
# Set up by dom0.xenlab: the project and its packages from this disk.
export JOB=/job IN=/job/in OUT=/job/out PYTHONPATH=/job/src
export SUPERCHARGE_CACHE={cache_root}
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$purelib"
mkdir -p "$(dirname "$purelib")"
ln -s /job/py "$purelib"
python3 -m dom0.xenlab.warm > /job/out/warm.json || echo "xenlab: warming the cache failed" >&2
cd /job
"""


def stage_job(staging: Path, script: str, job_dir: Path | None, kernel: KernelRef,
              warm_trust: Sequence[Sequence[Path]], timeout: float) -> None:
    """Fill ``staging`` with the job disk's files (see the module docstring)."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    root = cache_root()
    (staging / "job.sh").write_text(PREAMBLE.format(cache_root=root) + "\n" + script + "\n")
    (staging / "timeout").write_text(f"{int(timeout)}\n")
    (staging / "cache-root").write_text(f"{root}\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCE_DIRS:
        shutil.copytree(REPO / name, staging / "src" / name, ignore=ignore, symlinks=True)
    copy_packages(staging / "py")
    _stage_caches(staging / "cache", root, kernel, warm_trust)
    if job_dir is not None:
        shutil.copytree(job_dir, staging / "in", symlinks=True)
    else:
        (staging / "in").mkdir()
    (staging / "out").mkdir()


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """What ``dist`` requires on this platform (extras and other platforms' needs left out)."""
    names = []
    for req in dist.requires or []:
        text, _, marker = req.partition(";")
        if marker.strip() and not _marker_holds(marker.strip()):
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
        if match:
            names.append(match.group(1))
    return names


def _marker_holds(marker: str) -> bool:
    """An environment marker, evaluated with no extra selected; unknown means no."""
    try:
        from packaging.markers import Marker
    except ImportError:
        return False
    try:
        return Marker(marker).evaluate({"extra": ""})
    except Exception:   # noqa: BLE001 - a marker we cannot read is one we do not follow
        return False


def copy_packages(dest: Path) -> list[str]:
    """Copy the runtime distributions (and what they require) out of this interpreter's environment.

    File lists come from each distribution's RECORD, so nothing else of the
    venv (pytest, mypy, PyInstaller's code) goes along.
    """
    seen: dict[str, metadata.Distribution] = {}
    todo = list(RUNTIME_DISTRIBUTIONS)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise EnvironmentProblem(f"Python package {name} is not installed in this environment "
                                     f"(needed in the Xen lab's dom0): run ./run test once") from None
        seen[key] = dist
        todo += _requirement_names(dist)
    for name in METADATA_ONLY:
        try:
            seen[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
    dest.mkdir(parents=True, exist_ok=True)
    for key, dist in seen.items():
        for file in dist.files or []:
            if key in METADATA_ONLY and ".dist-info" not in str(file):
                continue
            if str(file).startswith("..") or "__pycache__" in str(file):
                continue
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                target = dest / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    return sorted(seen)


def _stage_caches(dest: Path, root: Path, kernel: KernelRef,
                  warm_trust: Sequence[Sequence[Path]]) -> None:
    """The guest kernel's image and module index, the frozen agent, and the wanted base initrds."""
    from dom0.freeze import freeze_agent
    from dom0.initrd import build_base, load_trust

    try:
        rel = kernel.modules_dir.relative_to(root)
    except ValueError:
        raise UserError(f"{kernel.modules_dir}: the lab's guest kernel must come from the cache "
                        f"({root}/kernels)") from None
    modules = dest / rel
    modules.mkdir(parents=True)
    for path in kernel.modules_dir.glob("modules.*"):
        shutil.copy2(path, modules / path.name)
    boot = dest / kernel.vmlinuz.relative_to(root)
    boot.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kernel.vmlinuz, boot)
    agent = freeze_agent()
    shutil.copytree(agent.tree, dest / "agent" / agent.key, symlinks=True)
    (dest / "initrd").mkdir()
    keys_dir = dest.parent / "warm-keys"
    keys_dir.mkdir()
    bases = []
    for index, keys in enumerate(warm_trust):
        base = build_base(kernel, trust=load_trust([str(k) for k in keys], False))
        shutil.copy2(base.path, dest / "initrd" / base.path.name)
        meta = base.path.with_name(f"base-{base.key}.json")
        shutil.copy2(meta, dest / "initrd" / meta.name)
        staged = []
        for number, key in enumerate(keys):
            shutil.copy2(key, keys_dir / f"{index}-{number}.pub")
            staged.append(f"/job/warm-keys/{index}-{number}.pub")
        bases.append({"key": base.key, "method": base.compression, "level": None, "trust": staged})
    (dest.parent / "warm.json").write_text(json.dumps(
        {"agent": agent.key, "kernel": kernel.version, "bases": bases}, indent=1) + "\n")


def make_job_image(staging: Path, image: Path, extra_mib: int) -> Path:
    """An ext4 image of ``staging`` with ``extra_mib`` free for the job's outputs."""
    used = int(run_tool(["du", "-s", "-B1M", str(staging)], "measure the job").split()[0])
    return make_ext4_image(staging, image, JOB_LABEL, int(used * 1.2) + extra_mib + 32)


def read_results(image: Path, dest: Path) -> Path:
    """Copy the job disk's /out to ``dest`` with debugfs (no mount, works on a dirty image)."""
    if dest.exists():
        shutil.rmtree(dest)
    scratch = dest.with_name(dest.name + ".rdump")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    proc = subprocess.run(["debugfs", "-R", f"rdump /out {scratch}", str(image)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (scratch / "out").is_dir():
        dest.mkdir()
        shutil.rmtree(scratch)
        return dest
    (scratch / "out").rename(dest)
    shutil.rmtree(scratch)
    return dest
