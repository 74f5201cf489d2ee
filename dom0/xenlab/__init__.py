"""Real Xen 4.17 under qemu (TCG) on a machine without Xen: the lab behind the Xen test tier.

:class:`XenLab` builds (once, cached under ``~/.cache/supercharge/xenlab``) the
hypervisor and a Debian dom0, and runs jobs in that dom0: each job is a bash
script with the project and its inputs on a fresh second disk, and its
outputs come back to the host.  See docs/xen.md.
"""
from __future__ import annotations

from .lab import JobResult, XenLab

__all__ = ["JobResult", "XenLab"]
