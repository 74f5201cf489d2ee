"""The agent's stages, in boot order: early, modules, network, devices, mount, fetch, apply,
hooks, commit, then switch.

Nothing reaches the disks before ``commit``: ``apply`` stages the steps, ``hooks``
runs the hooks on a view of the staged target, and ``commit`` writes everything
(steps, hooks' changes, the applied record) as one transaction.

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

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - typing is not imported at run time (start-up cost)
    from collections.abc import Callable

PLAN_PATH = Path("/etc/supercharge/plan.json")
PLAN_SIG_PATH = Path("/etc/supercharge/plan.json.minisig")
TRUST_CONFIG = Path("/etc/supercharge/trust.json")
TRUSTED_KEYS = Path("/etc/supercharge/trusted-keys")
MODULES_LOAD = Path("/etc/supercharge/modules.json")

# File-system types whose module has another name.
FSTYPE_MODULES = {"ext2": "ext4", "ext3": "ext4", "nfs4": "nfsv4"}
SYSROOT = Path("/sysroot")
RUN_DIR = Path("/run/supercharge")
LAYERS = Path("/run/supercharge-layers")
ARTIFACTS = RUN_DIR / "artifacts"
SCRATCH = RUN_DIR / "scratch"
HOOK_WORK = RUN_DIR / "hooks"   # the hooks' overlay view: staged and upper layers (tmpfs)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APPLIED_RECORD = "/var/lib/supercharge/applied.json"
MAX_ARTIFACT = 1 << 30


class StageFailed(Exception):
    """A stage could not do its job; ``details`` go into its report record."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def _no_checkpoint(point: str) -> None:
    """The default checkpoint: nothing happens at any point (the agent sets its pauser)."""


@dataclass
class BootContext:
    """What the stages hand on to each other."""

    argv: list[str]
    agent_started: float | None = None   # uptime when the agent's code began (after Python's start-up)
    plan: object | None = None           # guest_init.plan.Plan once read
    devices: dict[str, str] = field(default_factory=dict)
    mounted: list[str] = field(default_factory=list)
    root_mounted: bool = False
    applied: list[dict] = field(default_factory=list)
    policy: str = "halt"
    unsigned_allowed: bool = False
    artifacts: dict[int, Path] = field(default_factory=dict)
    converged: bool = False
    committed: bool = False
    txn: object | None = None            # guest_init.transaction.Transaction: apply stages, commit commits
    #: Called with the name of a point of the apply/hooks/commit stages when it is reached
    #: (``staged``, ``hooks``, ``prepared``, ``marked``, ``renamed``, ``committed``); the agent's
    #: debugging pause (``supercharge.pause=`` on the kernel command line).
    checkpoint: Callable[[str], None] = _no_checkpoint


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
            "kernel_args": ctx.argv, "trust": trust, "agent_started": ctx.agent_started}


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
    if not plan:
        return set()
    types = {m.fstype for m in plan.mounts} | {m.overlay.fstype for m in plan.mounts if m.overlay}
    if any(step.op == "hook" for step in plan.steps):
        types.add("overlay")   # hooks run in an overlay view of the staged target
    return {FSTYPE_MODULES.get(t, t) for t in types}


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
    refs = [ref for m in plan.mounts for ref in m.devices()]
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
    done: list[dict] = []
    for m in plan.mount_order():
        where = SYSROOT if m.target == "/" else SYSROOT / m.target.lstrip("/")
        if m.overlay is not None:
            done.append(_mount_overlay(ctx, m, where, len(done)))
            ctx.mounted.append(str(where))
            ctx.root_mounted = ctx.root_mounted or m.target == "/"
            continue
        if m.nfs is not None:
            done.append(_mount_nfs(ctx, m, where))
            ctx.mounted.append(str(where))
            ctx.root_mounted = ctx.root_mounted or m.target == "/"
            continue
        device = ctx.devices[m.device.describe()]
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


#: errnos after which another NFS mount attempt may succeed: the server is still
#: starting (refused, reset), or a path to it is not there yet.  Anything else (no such
#: export, access denied, bad options) will not change by waiting.
_NFS_RETRY = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                        errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
                        errno.EAGAIN, errno.EIO})
#: Minor versions tried, newest first, when the plan does not choose (what mount.nfs does).
_NFS_NEGOTIATE = ("4.2", "4.1", "4.0")
_NFS_CLIENT_ID = Path("/sys/fs/nfs/net/nfs_client/identifier")


class _NfsNoAnswer(OSError):
    """The deadline came while mount(2) was still waiting for the server.

    Its own class because a kernel ETIMEDOUT (the RPC layer gave up) is a
    TimeoutError too, and that one may be retried.
    """


def _nfs_client_address(server: str, port: int) -> str:
    """The local address on the route to ``server``, as the network stage configured it.

    A connected UDP socket makes the kernel choose the route and source address
    without sending anything; that is the ``clientaddr`` NFSv4.0 callbacks need.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((server, port))
        return sock.getsockname()[0]


def _nfs_client_id(ctx: BootContext) -> str | None:
    """Give this client a unique NFSv4 identity before its first mount.

    In the initramfs every guest's hostname is "(none)", so without a uniquifier
    two domains mounting from one server would present the same client id and
    take each other's state.  The domain's name is unique on the server's side.
    An identifier already set (nfs.nfs4_unique_id= on the kernel command line) is kept.
    """
    try:
        current = _NFS_CLIENT_ID.read_text().strip()
        if current and current != "(null)":   # the kernel shows an unset identifier as "(null)"
            return current
        _NFS_CLIENT_ID.write_text(ctx.plan.name)
        return ctx.plan.name
    except OSError:
        return None


def _nfs_attempt(source: str, where: Path, flags: int, data: str, wait: float) -> OSError | None:
    """One mount(2) that the caller stops waiting for after ``wait`` seconds.

    The kernel's NFS mount can block for minutes (timeo x retrans) when the server
    does not answer; running it in a thread lets the stage keep its deadline.
    Returns None when mounted, else the OSError (:class:`_NfsNoAnswer` when still waiting).
    """
    import threading

    outcome: list[OSError | None] = []

    def attempt() -> None:
        try:
            sysc.mount(source, str(where), "nfs4", flags, data)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="nfs-mount", daemon=True)
    thread.start()
    thread.join(max(wait, 0.0))
    if not outcome:
        return _NfsNoAnswer(errno.ETIMEDOUT, "no answer (the mount is still waiting in the kernel)")
    return outcome[0]


def _mount_nfs(ctx: BootContext, m, where: Path) -> dict:
    """Mount an NFSv4 export with mount(2) directly: no mount.nfs in the initramfs.

    The kernel's text options then need what mount.nfs would have added:
    ``addr=`` (the server's address), ``clientaddr=`` (ours), ``vers=4.x``, and
    ``port=`` when it is not 2049.  Attempts are retried until the export's
    ``timeout`` while the server refuses or does not answer (it may still be starting).
    """
    from .plan import DEFAULT_NFS_PORT

    nfs = m.nfs
    source = nfs.describe()
    base = {"device": source, "server": nfs.server, "path": nfs.path, "port": nfs.port,
            "target": m.target, "fstype": m.fstype, "options": list(m.options), "timeout": nfs.timeout}
    if not where.is_dir():
        raise StageFailed(f"mount point {m.target} does not exist in the root file system", base)
    started = time.monotonic()
    deadline = started + nfs.timeout
    try:
        clientaddr = _nfs_client_address(nfs.server, nfs.port)
    except OSError as exc:
        raise StageFailed(f"cannot mount NFS export {source} on {m.target}: no route to {nfs.server} "
                          f"({exc.strerror}); check the plan's network section",
                          {**base, "errno": exc.errno, "errno_name": errno.errorcode.get(exc.errno or 0)}) from None
    client_id = _nfs_client_id(ctx)
    flags, extra = _mount_flags(list(m.options))
    chosen = [o for o in m.options if o.partition("=")[0] in ("vers", "nfsvers", "minorversion")]
    versions = [None] if chosen else list(_NFS_NEGOTIATE)
    common = f"addr={nfs.server},clientaddr={clientaddr}" + (f",port={nfs.port}" if nfs.port != DEFAULT_NFS_PORT else "")
    attempts = 0
    delay = 0.25
    seen: dict[str, int] = {}       # what each failed attempt got, in order of first appearance
    first_real: OSError | None = None
    while True:
        version = versions[0]
        data = ",".join(x for x in (extra, f"vers={version}" if version else None, common) if x)
        attempts += 1
        error = _nfs_attempt(source, where, flags, data, deadline - time.monotonic())
        if error is None:
            return {**base, "clientaddr": clientaddr, "data": data, "attempts": attempts,
                    "version": version or chosen[-1].partition("=")[2], "client_id": client_id,
                    "errors": seen, "seconds": round(time.monotonic() - started, 3)}
        label = _nfs_error_text(error)
        seen[label] = seen.get(label, 0) + 1
        if not isinstance(error, _NfsNoAnswer):
            first_real = first_real or error
        if error.errno == errno.EPROTONOSUPPORT and len(versions) > 1:
            versions.pop(0)          # the server lacks this minor version: the next one, at once
            continue
        if isinstance(error, _NfsNoAnswer) or error.errno not in _NFS_RETRY:
            break
        if time.monotonic() + delay >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    seconds = time.monotonic() - started
    # The kernel's own errno explains more than "no answer by the deadline" does.
    cause = error if first_real is None or not isinstance(error, _NfsNoAnswer) else first_real
    name = errno.errorcode.get(cause.errno or 0, "?")
    tried = ", ".join(f"{text} x{count}" if count > 1 else text for text, count in seen.items())
    raise StageFailed(f"cannot mount NFS export {source} (port {nfs.port}) on {m.target}: "
                      f"{_nfs_error_text(cause)} (after {attempts} attempt{'s' if attempts != 1 else ''} "
                      f"in {seconds:.1f} s: {tried})",
                      {**base, "errno": cause.errno, "errno_name": name, "errors": seen, "attempts": attempts,
                       "last_error": _nfs_error_text(error), "clientaddr": clientaddr, "data": data,
                       "seconds": round(seconds, 3)})


def _nfs_error_text(error: OSError) -> str:
    """``Connection refused [ECONNREFUSED]``: the words for people, the name for scripts."""
    if isinstance(error, _NfsNoAnswer):
        return "no answer by the deadline"
    return f"{os.strerror(error.errno or 0)} [{errno.errorcode.get(error.errno or 0, '?')}]"


def network(ctx: BootContext) -> dict:
    """Bring up the interfaces the plan names (only when it has a network section)."""
    plan = ctx.plan
    if getattr(plan, "network", None) is None:
        return {"skipped": "the plan configures no network"}
    from .network import NetworkError, configure_network

    cfg = plan.network
    try:
        return configure_network(cfg, deadline=time.monotonic() + cfg.timeout)
    except NetworkError as exc:
        raise StageFailed(str(exc), dict(getattr(exc, "details", {}) or {})) from None


def _sources(plan) -> list[tuple[int, object]]:
    return [(i, step) for i, step in enumerate(plan.steps) if getattr(step, "source", None) is not None]


def fetch(ctx: BootContext) -> dict:
    """Retrieve and check every artifact before anything in the target changes.

    A pinned artifact must match its SHA-256 (the pin is inside the signed
    plan); an unpinned one must carry a valid ``URI.minisig`` from a trusted key.
    """
    items = _sources(ctx.plan)
    if not items:
        return {"artifacts": []}
    if _already_applied(ctx):
        return {"artifacts": [], "converged": True}
    from .fetch import FetchError
    from .fetch import fetch as get

    deadline = time.monotonic() + ctx.plan.fetch_timeout
    ca = str(CA_BUNDLE) if CA_BUNDLE.exists() else None
    done: list[dict] = []
    for index, step in items:
        source = step.source
        dest = ARTIFACTS / str(index)
        try:
            got = get(source.uri, dest, sha256=source.sha256, deadline=deadline, ca_bundle=ca,
                      max_bytes=MAX_ARTIFACT)
        except FetchError as exc:
            raise StageFailed(f"steps[{index}]: {exc}",
                              {"step": index, "uri": source.uri, "attempts": getattr(exc, "attempts", None),
                               "last_error": str(getattr(exc, "last_error", "") or exc), "fetched": done}) from None
        entry = {"step": index, "uri": source.uri, "bytes": got.size, "sha256": got.sha256,
                 "attempts": got.attempts, "seconds": round(got.seconds, 3), "pinned": bool(source.sha256)}
        if not source.sha256:
            entry.update(_check_unpinned(ctx, index, source.uri, dest, deadline, ca))
        ctx.artifacts[index] = dest
        done.append(entry)
    return {"artifacts": done}


def _check_unpinned(ctx: BootContext, index: int, uri: str, dest: Path, deadline: float, ca) -> dict:
    from .fetch import FetchError
    from .fetch import fetch as get
    from .trust import TrustError, load_trusted_keys, verify_file

    sig = dest.with_name(dest.name + ".minisig")
    try:
        get(uri + ".minisig", sig, deadline=deadline, ca_bundle=ca, max_bytes=8192)
    except FetchError as exc:
        if ctx.unsigned_allowed:
            return {"signed": False, "warning": "unpinned and unsigned, accepted (development opt-out)"}
        raise StageFailed(f"steps[{index}]: {uri} is not pinned and has no signature: {exc}",
                          {"step": index, "uri": uri, "signature": uri + ".minisig"}) from None
    try:
        verified = verify_file(dest, sig, load_trusted_keys(TRUSTED_KEYS))
    except TrustError as exc:
        raise StageFailed(f"steps[{index}]: signature of {uri} refused: {exc}",
                          {"step": index, "uri": uri, "kind": getattr(exc, "kind", None),
                           "key_id": getattr(exc, "key_id", None)}) from None
    return {"signed": True, "key_id": verified.key_id}


def _applied_record() -> Path:
    return SYSROOT / APPLIED_RECORD.lstrip("/")


def _already_applied(ctx: BootContext) -> bool:
    """Whether the target records this very plan as applied (its hooks included)."""
    import json

    if not ctx.converged:
        try:
            record = json.loads(_applied_record().read_text())
        except (OSError, ValueError):
            record = {}
        ctx.converged = record.get("plan_digest") == ctx.plan.digest
    return ctx.converged


def _mount_overlay(ctx: BootContext, m, where: Path, index: int) -> dict:
    """Read-only shared layers below, the domain's writable layer above (overlayfs).

    The layers are mounted under /run/supercharge-layers, which moves into the
    real system with /run (the upper layer must stay mounted while in use).
    """
    base = LAYERS / str(index)
    lowers = []
    for i, ref in enumerate(m.overlay.lower):
        point = base / f"lower{i}"
        point.mkdir(parents=True, exist_ok=True)
        device = ctx.devices[ref.describe()]
        try:
            sysc.mount(device, str(point), m.overlay.fstype, sysc.MS_RDONLY)
        except OSError as exc:
            raise StageFailed(f"cannot mount lower layer {ref.describe()} ({device}): {exc.strerror}",
                              {"device": device, "target": m.target}) from None
        lowers.append(str(point))
    upper_point = base / "upper"
    upper_point.mkdir(parents=True, exist_ok=True)
    try:
        if m.overlay.upper is None:
            sysc.mount("tmpfs", str(upper_point), "tmpfs", 0, "mode=0755")
            upper = "tmpfs"
        else:
            upper = ctx.devices[m.overlay.upper.describe()]
            sysc.mount(upper, str(upper_point), m.overlay.fstype, 0)
    except OSError as exc:
        raise StageFailed(f"cannot mount the upper layer for {m.target}: {exc.strerror}",
                          {"target": m.target}) from None
    for sub in ("upper", "work"):
        (upper_point / sub).mkdir(exist_ok=True)
    if not where.is_dir():
        where.mkdir(parents=True)
    data = f"lowerdir={':'.join(lowers)},upperdir={upper_point}/upper,workdir={upper_point}/work"
    flags, extra = _mount_flags(list(m.options))
    try:
        sysc.mount("overlay", str(where), "overlay", flags, data + (f",{extra}" if extra else ""))
    except OSError as exc:
        raise StageFailed(f"cannot mount the overlay on {m.target}: {exc.strerror}",
                          {"target": m.target, "options": data}) from None
    return {"target": m.target, "fstype": "overlay", "lower": [r.describe() for r in m.overlay.lower],
            "upper": m.overlay.upper.describe() if m.overlay.upper else "tmpfs"}


def apply(ctx: BootContext) -> dict:
    """Stage every step in a transaction; nothing reaches the target's disks here.

    A crash during an earlier commit is finished (or undone) first.  A plan
    whose digest the target already records is not applied again: the boot
    converges instead of failing on "already there".  The hooks stage adds the
    hooks' changes to the same transaction and the commit stage commits it.
    """
    from .steps import StepFailed, apply_step
    from .transaction import Transaction, recover

    plan = ctx.plan
    mounts = [m.target for m in plan.mounts]
    recovered = recover(SYSROOT, mounts)
    if _already_applied(ctx):
        return {"converged": True, "plan_digest": plan.digest, "recovered": recovered}
    txn = Transaction(SYSROOT, mounts, checkpoint=ctx.checkpoint)
    for index, step in enumerate(plan.steps):
        if step.op == "hook":
            continue
        started = time.monotonic()
        try:
            details = apply_step(txn, step, ctx.artifacts.get(index), SCRATCH / str(index))
        except StepFailed as exc:
            raise StageFailed(f"steps[{index}] ({step.op}): {exc}",
                              {"step": index, "op": step.op, **exc.details, "staged": ctx.applied,
                               "committed": False}) from None
        details.update(step=index, op=step.op, duration=round(time.monotonic() - started, 4))
        ctx.applied.append(details)
    ctx.txn = txn
    ctx.checkpoint("staged")
    return {"steps": ctx.applied, "staged": len(txn.changes), "recovered": recovered}


def hooks(ctx: BootContext) -> dict:
    """Run the post-processing scripts chrooted in a view of the staged target, before the commit.

    The view is an overlay per file system (guest_init.hooks.StagedView): the
    hooks see every staged change and may change anything, but what they write
    goes to a tmpfs in the initramfs.  When every hook succeeded their changes
    join the plan's transaction; when one fails or times out nothing of the
    plan (and nothing a hook wrote) reaches the disks.
    """
    plan = ctx.plan
    if ctx.converged:
        return {"hooks": [], "converged": True}
    steps = [s for s in plan.steps if s.op == "hook"]
    if not steps:
        return {"hooks": []}
    from .hooks import HookError, HookFailed, hook_environment, run_hooks_staged

    scripts = {s.name: ctx.artifacts[i] for i, s in enumerate(plan.steps)
               if s.op == "hook" and i in ctx.artifacts}
    try:
        done, changed = run_hooks_staged(ctx.txn, steps, hook_environment(plan), scripts, work=HOOK_WORK,
                                         after_hooks=lambda: ctx.checkpoint("hooks"))
    except HookFailed as exc:
        raise StageFailed(f"{exc}; nothing was committed",
                          {"hooks": [r.to_record() for r in exc.results], "committed": False}) from None
    except HookError as exc:
        raise StageFailed(f"{exc}; nothing was committed", {"committed": False}) from None
    return {"hooks": [r.to_record() for r in done], "changed": changed}


def commit(ctx: BootContext) -> dict:
    """Commit the plan's steps, the hooks' changes and the applied record at once."""
    import shutil

    from .transaction import TransactionError

    if ctx.converged:
        return {"converged": True}
    txn = ctx.txn
    recorded = _stage_applied_record(ctx) if ctx.plan.steps else None
    try:
        summary = txn.commit()
    except (TransactionError, OSError) as exc:
        ctx.committed = txn.marked
        if txn.marked:
            raise StageFailed(f"commit interrupted after its commit point: {exc}; the next boot finishes it",
                              {"committed": True}) from None
        raise StageFailed(f"commit failed, nothing changed: {exc}", {"committed": False}) from None
    ctx.committed = bool(summary["file_systems"])
    shutil.rmtree(HOOK_WORK, ignore_errors=True)
    ctx.checkpoint("committed")
    return {"commit": summary, "recorded": recorded}


def _stage_applied_record(ctx: BootContext) -> str | None:
    """Add "this plan is applied" to the transaction, so it is committed with the plan or not at all.

    Only where it can be written: a read-only target keeps the personality but
    loses convergence (the next boot applies the plan again).
    """
    import json

    from .transaction import TransactionError

    txn = ctx.txn
    try:
        guest = txn.guest(APPLIED_RECORD)
        if txn.read_only(txn.mount_of(guest)):
            return None
        doc = {"plan_digest": ctx.plan.digest, "name": ctx.plan.name,
               "uptime": round(time.clock_gettime(time.CLOCK_BOOTTIME), 3)}
        txn.write(APPLIED_RECORD, json.dumps(doc, sort_keys=True).encode() + b"\n", mode=0o644, uid=0, gid=0)
    except (TransactionError, OSError):
        return None
    return APPLIED_RECORD


def cleanup_run() -> None:
    """Artifacts and scratch trees live in /run's tmpfs, which moves into the real system."""
    import shutil

    shutil.rmtree(RUN_DIR, ignore_errors=True)
