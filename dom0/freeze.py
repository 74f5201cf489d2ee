"""Freeze ``guest_init`` with PyInstaller (one-dir), cached by its inputs.

The key covers the agent's sources, our spec and entry script, and the build
environment (Python, PyInstaller and platform), so a second build with the
same inputs reuses the frozen tree and never runs PyInstaller again.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, digest_of
from .errors import EnvironmentProblem

REPO = Path(__file__).resolve().parent.parent
INITRD_DATA = REPO / "initrd"
SPEC = INITRD_DATA / "guest_init.spec"
ENTRY = INITRD_DATA / "agent_main.py"


@dataclass
class FrozenAgent:
    tree: Path          # contains ``init`` and ``_internal/``
    key: str
    cached: bool

    @property
    def executable(self) -> Path:
        return self.tree / "init"


def _pyinstaller_version() -> str:
    # The dist-info directory's name, not ``import PyInstaller`` nor importlib.metadata
    # (17 ms of email parsing): the warm per-domain path must stay cheap.
    import sysconfig  # noqa: PLC0415

    for key in ("purelib", "platlib"):
        for info in sorted(Path(sysconfig.get_paths()[key]).glob("[pP]y[iI]nstaller-*.dist-info")):
            return info.name[len("pyinstaller-"):-len(".dist-info")]
    raise EnvironmentProblem(
        "PyInstaller is not installed: install the 'initrd' extra (pip install 'supercharge[initrd]')")


def agent_key() -> str:
    sources = sorted((REPO / "guest_init").rglob("*.py"))
    parts: list[bytes | str] = [SPEC.read_bytes(), ENTRY.read_bytes()]
    for path in sources:
        parts.append(str(path.relative_to(REPO)))
        parts.append(path.read_bytes())
    parts += [sys.version, _pyinstaller_version(), platform.machine(), platform.libc_ver()[1]]
    return digest_of(*parts)


def freeze_agent(*, force: bool = False) -> FrozenAgent:
    key = agent_key()
    final = cache_dir("agent") / key
    if (final / "init").exists() and not force:
        return FrozenAgent(final, key, cached=True)
    if shutil.which("strip") is None:
        raise EnvironmentProblem("'strip' not found: install Debian's binutils package")
    with tempfile.TemporaryDirectory(prefix="freeze-", dir=cache_dir("agent")) as tmp:
        work = Path(tmp)
        env = dict(os.environ, SUPERCHARGE_REPO=str(REPO))
        cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
               "--distpath", str(work / "dist"), "--workpath", str(work / "build"), str(SPEC)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise EnvironmentProblem(f"PyInstaller failed freezing the agent: {tail[0]}")
        built = work / "dist" / "agent"
        if final.exists():
            shutil.rmtree(final)
        os.replace(built, final)
    return FrozenAgent(final, key, cached=False)
