"""Where slow-to-build things are kept: outside the repository, keyed by their inputs.

``SUPERCHARGE_CACHE`` overrides the location; the default follows XDG
(``~/.cache/supercharge``).  Kernels, the frozen agent and base initrds live
here so a clean clone reuses what an earlier run built.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("SUPERCHARGE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "supercharge"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_root() -> Path:
    """Per-domain state (console captures, reports, pid files)."""
    explicit = os.environ.get("SUPERCHARGE_STATE")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/supercharge")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "supercharge"


def digest_of(*items: bytes | str) -> str:
    """A short stable key for a cache entry from its inputs."""
    h = hashlib.sha256()
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]
