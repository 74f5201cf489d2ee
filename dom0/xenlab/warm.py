"""Run inside the lab's dom0 (``python3 -m dom0.xenlab.warm``): file the host's frozen agent and
base initrds under the cache keys dom0 computes.

Why this is needed: the agent's cache key names the exact Python build
(``sys.version`` carries its build date), and dom0's python3.11 from the
mirror can be a different build of the same version than the host's.  The
frozen agent is self-contained (PyInstaller bundles its interpreter), so the
host's tree is the right one to use; without this step dom0's
``prepare-initrd`` would miss the cache and try to run PyInstaller, which is
not there.  Each staged base is linked under the key dom0 computes for the
same kernel, module list, compression, CA bundle and trust set.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MANIFEST = Path("/job/warm.json")


def _link(link: Path, target: Path) -> None:
    if link.exists() or link.is_symlink():
        return
    link.symlink_to(target.name)


def main() -> int:
    from dom0.cache import cache_dir
    from dom0.freeze import FrozenAgent, agent_key
    from dom0.initrd import base_cache_entry, load_trust
    from dom0.kernel import resolve_kernel

    manifest = json.loads(MANIFEST.read_text())
    agents = cache_dir("agent")
    key = agent_key()
    _link(agents / key, agents / manifest["agent"])
    agent = FrozenAgent(agents / key, key, cached=True)
    kernel = resolve_kernel(manifest["kernel"])
    linked = []
    for base in manifest["bases"]:
        entry = base_cache_entry(agent, kernel, method=base["method"], level=base["level"],
                                 trust=load_trust(base["trust"], False))
        host_archive = entry.archive.with_name(entry.archive.name.replace(entry.key, base["key"]))
        _link(entry.archive, host_archive)
        _link(entry.meta, entry.meta.with_name(f"base-{base['key']}.json"))
        linked.append({"host": base["key"], "dom0": entry.key})
    print(json.dumps({"agent": {"host": manifest["agent"], "dom0": key}, "bases": linked}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
