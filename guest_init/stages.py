"""The agent's stages, in boot order: early, modules, devices, mount, apply, switch.

Each stage is a function taking the shared :class:`BootContext`; it returns the
details for its report record or raises :class:`StageFailed` (or any
exception) to stop the boot.  The runner in ``agent.py`` times them, writes
the records and applies the failure policy, so a stage never has to think
about reporting or about PID 1 dying.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sysc

PLAN_PATH = Path("/etc/supercharge/plan.json")
PLAN_SIG_PATH = Path("/etc/supercharge/plan.json.minisig")
TRUST_CONFIG = Path("/etc/supercharge/trust.json")
TRUSTED_KEYS = Path("/etc/supercharge/trusted-keys")
MODULES_LOAD = Path("/etc/supercharge/modules.json")

# File-system types whose module has another name.
FSTYPE_MODULES = {"ext2": "ext4", "ext3": "ext4", "nfs4": "nfsv4"}
SYSROOT = Path("/sysroot")


class StageFailed(Exception):
    """A stage could not do its job; ``details`` go into its report record."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass
class BootContext:
    """What the stages hand on to each other."""

    argv: list[str]
    plan: object | None = None           # guest_init.plan.Plan once read
    devices: dict[str, str] = field(default_factory=dict)
    mounted: list[str] = field(default_factory=list)
    root_mounted: bool = False
    applied: list[dict] = field(default_factory=list)
    policy: str = "halt"
    unsigned_allowed: bool = False


def _mount_if_needed(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    try:
        sysc.mount(source, target, fstype, flags, data)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise


def early(ctx: BootContext) -> dict:
    """Mount the API file systems and read the plan."""
    _mount_if_needed("proc", "/proc", "proc", sysc.MS_NOSUID | sysc.MS_NODEV | sysc.MS_NOEXEC)
    _mount_if_needed("sysfs", "/sys", "sysfs", sysc.MS_NOSUID | sysc.MS_NODEV | sysc.MS_NOEXEC)
    _mount_if_needed("devtmpfs", "/dev", "devtmpfs", sysc.MS_NOSUID, "mode=0755")
    _mount_if_needed("tmpfs", "/run", "tmpfs", sysc.MS_NOSUID | sysc.MS_NODEV, "mode=0755")
    trust = verify_plan_signature(ctx)
    from .plan import PlanError, load_plan

    try:
        plan = load_plan(PLAN_PATH)
    except PlanError as exc:
        raise StageFailed(str(exc), {"plan": str(PLAN_PATH), "field": getattr(exc, "field", None)}) from None
    ctx.plan = plan
    ctx.policy = plan.failure_policy
    return {"plan": plan.name, "plan_digest": plan.digest, "policy": plan.failure_policy,
            "kernel_args": ctx.argv, "trust": trust}


def verify_plan_signature(ctx: BootContext) -> dict:
    """Check the plan's signature before reading a byte of it as JSON.

    A plan is accepted when signed by a key the initrd trusts; unsigned only
    when the initrd was built with the development opt-out, which the report
    then states on every boot.
    """
    import json

    try:
        config = json.loads(TRUST_CONFIG.read_text())
    except (OSError, ValueError):
        config = {"allow_unsigned": False}
    allow_unsigned = bool(config.get("allow_unsigned"))
    ctx.unsigned_allowed = allow_unsigned
    if not PLAN_PATH.exists():
        raise StageFailed(f"{PLAN_PATH}: no plan in this initrd", {"plan": str(PLAN_PATH)})
    if not PLAN_SIG_PATH.exists():
        if allow_unsigned:
            return {"signed": False, "unsigned_plans_allowed": True,
                    "warning": "unsigned plan accepted: this initrd was built with --allow-unsigned-plans"}
        raise StageFailed("the plan is not signed, and this initrd accepts only plans signed by its "
                          f"trusted keys ({', '.join(config.get('keys', [])) or 'none'})",
                          {"signed": False, "trusted_keys": config.get("keys", [])})
    from .trust import TrustError, load_trusted_keys, verify_file

    try:
        keys = load_trusted_keys(TRUSTED_KEYS)
        verified = verify_file(PLAN_PATH, PLAN_SIG_PATH, keys)
    except TrustError as exc:
        raise StageFailed(f"plan signature refused: {exc}",
                          {"signed": True, "kind": getattr(exc, "kind", type(exc).__name__),
                           "key_id": getattr(exc, "key_id", None),
                           "trusted_keys": config.get("keys", [])}) from None
    return {"signed": True, "key_id": verified.key_id, "trusted_comment": verified.trusted_comment,
            "unsigned_plans_allowed": allow_unsigned}


def _load_one(path: Path) -> None:
    """finit_module a .ko; compressed modules are inflated into a memfd first.

    The kernel here has no in-kernel decompression (MODULE_INIT_COMPRESSED_FILE
    gives EOPNOTSUPP), so .ko.xz/.ko.zst/.ko.gz are decompressed in Python.
    """
    name = path.name
    if name.endswith(".ko"):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        data = path.read_bytes()
        if name.endswith(".xz"):
            import lzma
            data = lzma.decompress(data)
        elif name.endswith(".gz"):
            import gzip
            data = gzip.decompress(data)
        elif name.endswith(".zst"):
            raise OSError(errno.EOPNOTSUPP, "zstd-compressed modules are not supported by the agent")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, data)
    try:
        sysc.finit_module(fd)
    finally:
        os.close(fd)


def _wanted_filesystems(ctx: BootContext) -> set[str]:
    plan = ctx.plan
    return {FSTYPE_MODULES.get(m.fstype, m.fstype) for m in plan.mounts} if plan else set()


def modules(ctx: BootContext) -> dict:
    """Load the precomputed module list in order (dependencies first).

    Device drivers are always loaded; a file system's modules only when the
    plan mounts that type (NFS alone is a dozen modules, seconds under TCG).
    """
    import json

    if not MODULES_LOAD.exists():
        return {"loaded": 0, "note": "no module list in this initrd"}
    doc = json.loads(MODULES_LOAD.read_text())
    on_demand = set(doc.get("filesystems", []))
    wanted_fs = _wanted_filesystems(ctx)
    loaded: list[str] = []
    absent: list[str] = []
    present: list[str] = []
    skipped: list[str] = []
    failed: list[dict] = []
    for entry in doc.get("modules", []):
        path = Path(entry["path"])
        roots = set(entry.get("wanted_by") or ())
        if roots and roots <= on_demand and not roots & wanted_fs:
            skipped.append(path.name)
            continue
        try:
            _load_one(path)
            loaded.append(path.name)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                present.append(path.name)
            elif exc.errno == errno.ENODEV:
                # e.g. xen-blkfront outside Xen, crc32c-intel without SSE4.2: no such hardware.
                absent.append(path.name)
            else:
                failed.append({"module": path.name, "error": exc.strerror or str(exc)})
    details: dict = {"loaded": len(loaded), "already": present, "no_device": absent,
                     "not_needed": len(skipped)}
    if failed:
        details["failed"] = failed
    return details


def devices(ctx: BootContext) -> dict:
    """Wait for every VBD the plan names, by label or UUID, never by name."""
    from .devices import AmbiguousDevice, DeviceTimeout, wait_for_devices

    plan = ctx.plan
    refs = [m.device for m in plan.mounts]
    try:
        found = wait_for_devices(refs, plan.device_timeout)
    except DeviceTimeout as exc:
        raise StageFailed(str(exc), {"missing": exc.missing, "seen": exc.seen,
                                     "timeout": plan.device_timeout}) from None
    except AmbiguousDevice as exc:
        raise StageFailed(str(exc), {"ambiguous": str(exc.ref),
                                     "devices": [str(d) for d in exc.devices]}) from None
    ctx.devices = {k: str(v) for k, v in found.items()}
    return {"found": ctx.devices}


_FLAG_OPTIONS = {"ro": sysc.MS_RDONLY, "rw": 0, "nosuid": sysc.MS_NOSUID, "nodev": sysc.MS_NODEV,
                 "noexec": sysc.MS_NOEXEC}


def _mount_flags(options: list[str]) -> tuple[int, str | None]:
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data) or None


def mount(ctx: BootContext) -> dict:
    """Mount the root under /sysroot, then the others beneath it, shallowest first."""
    plan = ctx.plan
    SYSROOT.mkdir(exist_ok=True)
    done = []
    for m in plan.mount_order():
        device = ctx.devices[m.device.describe()]
        where = SYSROOT if m.target == "/" else SYSROOT / m.target.lstrip("/")
        if not where.is_dir():
            raise StageFailed(f"mount point {m.target} does not exist in the root file system",
                              {"target": m.target})
        flags, data = _mount_flags(m.options)
        try:
            sysc.mount(device, str(where), m.fstype, flags, data)
        except OSError as exc:
            raise StageFailed(f"cannot mount {m.device.describe()} ({device}) on {m.target}: {exc.strerror}",
                              {"device": device, "target": m.target, "fstype": m.fstype}) from None
        ctx.mounted.append(str(where))
        if m.target == "/":
            ctx.root_mounted = True
        done.append({"device": device, "ref": m.device.describe(), "target": m.target,
                     "fstype": m.fstype, "options": m.options})
    return {"mounts": done}


def apply(ctx: BootContext) -> dict:
    """Apply the plan's steps to the mounted target, through the shared operations."""
    from .ops import OP_APPLIERS, OpError

    for index, step in enumerate(ctx.plan.steps):
        started = time.monotonic()
        applier = OP_APPLIERS.get(step.op)
        if applier is None:
            raise StageFailed(f"steps[{index}]: operation '{step.op}' is not supported by this agent",
                              {"step": index, "op": step.op, "applied": ctx.applied})
        try:
            result = applier(SYSROOT, step)
        except (OpError, OSError, ValueError) as exc:
            raise StageFailed(f"steps[{index}] ({step.op} {getattr(step, 'path', '')}): {exc}",
                              {"step": index, "op": step.op, "applied": ctx.applied}) from None
        result = dict(result or {})
        result.update(step=index, op=step.op, duration=round(time.monotonic() - started, 4))
        ctx.applied.append(result)
    return {"steps": ctx.applied}
