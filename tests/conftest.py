"""Shared fixtures: the cached kernel, a busybox root image, and the supercharge CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kernel():
    """The cached Debian kernel (``./run`` fetches it; fetched here if missing)."""
    from dom0.kernel import fetch_kernel

    ref, _ = fetch_kernel(os.environ.get("SUPERCHARGE_TEST_KERNEL") or None)
    return ref


def run_cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line, as an admin would run it."""
    proc = subprocess.run([sys.executable, "-m", "dom0", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"supercharge {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli
