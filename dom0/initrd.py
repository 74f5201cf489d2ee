"""``supercharge prepare-initrd``: a cached base archive plus a small per-domain segment.

The base holds the frozen agent as /init, the shared libraries it needs that
PyInstaller leaves out, kernel modules with their load order, device nodes,
mount points and a CA bundle.  It is built once per set of inputs and kept
in the cache.  A domain's initrd is that base with the plan appended as a
second, uncompressed cpio archive: the kernel unpacks concatenated archives,
so a new domain costs the size of its plan, not a rebuild.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_atomically
from .cache import cache_dir, digest_of
from .compress import METHODS, compress_segment
from .cpio import CpioWriter
from .errors import EXIT_FAILED, UserError
from .freeze import INITRD_DATA, FrozenAgent, freeze_agent
from .kernel import KernelRef
from .kmod import read_module_list as read_list

BUILDER_FORMAT = "4"   # bump when the base layout changes, to invalidate cached bases
DEFAULT_MODULES = INITRD_DATA / "modules.default"
DLOPEN_LIBS = INITRD_DATA / "dlopen-libs"

PLAN_IN_INITRD = "etc/supercharge/plan.json"
PLAN_SIG_IN_INITRD = "etc/supercharge/plan.json.minisig"
TRUSTED_KEYS_DIR = "etc/supercharge/trusted-keys"
TRUST_CONFIG = "etc/supercharge/trust.json"
MODULES_LOAD = "etc/supercharge/modules.json"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"

# Nodes Python and the kernel need before devtmpfs is mounted (initramfs-notes pitfall 3).
DEVICE_NODES = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/random", 1, 8, 0o666),
    ("dev/urandom", 1, 9, 0o666),
    ("dev/kmsg", 1, 11, 0o644),
)
MOUNT_POINTS = ("dev", "proc", "sys", "run", "sysroot", "tmp", "etc/supercharge")


@dataclass
class BaseInfo:
    path: Path
    key: str
    cached: bool
    size: int
    uncompressed: int
    files: int
    compression: str
    kernel: str
    modules: list[str]
    libraries: list[str]
    agent_cached: bool
    seconds: float


@dataclass
class InitrdResult:
    output: Path
    size: int
    base: BaseInfo
    plan_segment: int = 0
    plan_files: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["output"] = str(self.output)
        doc["base"]["path"] = str(self.base.path)
        return doc


def _merged_usr(dest: str) -> str:
    """Debian is merged-/usr: /lib and /lib64 are symlinks into /usr in the archive too."""
    dest = dest.lstrip("/")
    for top in ("lib/", "lib64/", "bin/", "sbin/"):
        if dest.startswith(top):
            return "usr/" + dest
    return dest


def _ca_bundle() -> Path | None:
    try:
        import certifi  # noqa: PLC0415 - installed with requests

        return Path(certifi.where())
    except ImportError:
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        return system if system.is_file() else None


@dataclass(frozen=True)
class TrustSettings:
    """Which plans the agent accepts: signed by one of ``keys`` (public key texts),
    or also unsigned ones when ``allow_unsigned`` (a development opt-out that
    every boot report states)."""

    keys: tuple[tuple[str, str], ...] = ()   # (key id, public key text)
    allow_unsigned: bool = False
    rescue_shell: bool = False               # busybox as /bin/sh, for failure_policy "rescue"

    def fingerprint(self) -> str:
        return json.dumps({"keys": list(self.keys), "allow_unsigned": self.allow_unsigned,
                           "rescue_shell": self.rescue_shell}, sort_keys=True)


def load_trust(paths: list[str] | tuple[str, ...], allow_unsigned: bool) -> TrustSettings:
    """Validate ``--trust`` key files now, so a bad key fails the build, not the boot."""
    from guest_init.trust import TrustError, load_trusted_keys  # noqa: PLC0415

    if not paths and not allow_unsigned:
        raise UserError("no trusted keys: give --trust PUBKEY (the agent refuses unsigned plans), "
                        "or --allow-unsigned-plans for development")
    if not paths:
        return TrustSettings((), True)
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"{path}: trusted key not found")
    try:
        keys = load_trusted_keys(list(paths))
    except TrustError as exc:
        raise UserError(str(exc)) from None
    return TrustSettings(tuple((k.key_id_hex, k.to_text()) for k in keys), allow_unsigned)


def _base_key(agent: FrozenAgent, kernel: KernelRef, modules: list[str], method: str,
              level: int | None, ca: Path | None, trust: TrustSettings) -> str:
    dep = (kernel.modules_dir / "modules.dep").read_bytes()
    return digest_of(BUILDER_FORMAT, agent.key, kernel.version, str(kernel.modules_dir), dep,
                     "\n".join(modules), method, str(level), DLOPEN_LIBS.read_bytes(),
                     ca.read_bytes() if ca else b"", trust.fingerprint())


def _suffix(method: str) -> str:
    return {"zstd": ".zst", "gzip": ".gz", "xz": ".xz", "none": ""}[method]


@dataclass(frozen=True)
class BaseCacheEntry:
    """Where the base initrd for one set of inputs lives in the cache: its key, archive and metadata."""

    key: str
    archive: Path
    meta: Path
    modules: list[str]
    ca: Path | None


def base_cache_entry(agent: FrozenAgent, kernel: KernelRef, *, extra_modules: list[str] = (),
                     method: str = "zstd", level: int | None = None,
                     trust: TrustSettings = TrustSettings()) -> BaseCacheEntry:
    """The cache entry :func:`build_base` uses for these inputs (whether it exists yet or not).

    Shared with the Xen lab, which files a base built on the host under the
    key that dom0 computes for the same inputs.
    """
    modules = read_list(DEFAULT_MODULES) + [m for m in extra_modules if m]
    ca = _ca_bundle()
    key = _base_key(agent, kernel, modules, method, level, ca, trust)
    store = cache_dir("initrd")
    return BaseCacheEntry(key, store / f"base-{key}.cpio{_suffix(method)}", store / f"base-{key}.json",
                          modules, ca)


def _write_base(writer: CpioWriter, agent: FrozenAgent, kernel: KernelRef,
                modules: list[str], ca: Path | None, trust: TrustSettings) -> tuple[list[str], list[str]]:
    from .elf import library_closure  # noqa: PLC0415 - pyelftools only for builds
    from .kmod import resolve_modules

    for top in ("lib", "lib64", "bin", "sbin"):
        writer.add_dir(f"usr/{top}")
        writer.add_symlink(top, f"usr/{top}")
    for mp in MOUNT_POINTS:
        writer.add_dir(mp)
    for path, major, minor, mode in DEVICE_NODES:
        writer.add_device(path, "c", major, minor, mode)

    writer.add_tree(agent.tree)

    closure = library_closure(agent.tree, agent.executable, extra_sonames=read_list(DLOPEN_LIBS))
    if closure.missing:
        soname, needed_by = closure.missing[0]
        raise UserError(f"shared library {soname} (needed by {needed_by}) not found on this system")
    libs = []
    for lib in closure.libraries:
        writer.add_file(_merged_usr(lib.dest), lib.source, 0o755)
        libs.append(lib.dest)

    resolved = resolve_modules(kernel.modules_dir, modules)
    order = getattr(resolved, "order", resolved)
    load = []
    filesystems = sorted({m.name for m in order if m.relpath.startswith("kernel/fs/")}
                         & {root for m in order for root in m.wanted_by})
    for mod in order:
        inside = f"lib/modules/{kernel.version}/{mod.relpath}"
        writer.add_file(_merged_usr(inside), mod.path, 0o644)
        load.append({"path": "/" + inside, "wanted_by": list(mod.wanted_by), "softdep": mod.softdep})
    doc = {"kernel": kernel.version, "filesystems": filesystems, "modules": load}
    writer.add_file(MODULES_LOAD, json.dumps(doc, indent=1).encode(), 0o644)
    if ca is not None:
        writer.add_file(CA_BUNDLE, ca.read_bytes(), 0o644)
    if trust.rescue_shell:
        busybox = Path("/bin/busybox")
        if not busybox.is_file():
            raise UserError("--rescue-shell needs /bin/busybox: install Debian's busybox-static package")
        writer.add_file("usr/bin/busybox", busybox, 0o755)
        writer.add_symlink("usr/bin/sh", "busybox")
    writer.add_dir(TRUSTED_KEYS_DIR)
    for key_id, text in trust.keys:
        writer.add_file(f"{TRUSTED_KEYS_DIR}/{key_id}.pub", text.encode(), 0o644)
    writer.add_file(TRUST_CONFIG, json.dumps({"allow_unsigned": trust.allow_unsigned,
                                              "keys": [k for k, _ in trust.keys]}).encode(), 0o644)
    info = {"builder_format": BUILDER_FORMAT, "kernel": kernel.version, "agent": agent.key,
            "modules": [m.name for m in order]}
    writer.add_file("etc/supercharge/initrd.json", json.dumps(info, indent=1).encode(), 0o644)
    return [m.name for m in order], libs


def build_base(kernel: KernelRef, *, extra_modules: list[str] = (), method: str = "zstd",
               level: int | None = None, force: bool = False,
               trust: TrustSettings = TrustSettings()) -> BaseInfo:
    """The cached base initrd for this agent, kernel, module set and compression."""
    if method not in METHODS:
        raise UserError(f"unknown compression '{method}': expected one of {', '.join(METHODS)}")
    started = time.monotonic()
    agent = freeze_agent()
    entry = base_cache_entry(agent, kernel, extra_modules=extra_modules, method=method, level=level,
                             trust=trust)
    key, path, meta, modules, ca = entry.key, entry.archive, entry.meta, entry.modules, entry.ca
    if path.is_file() and meta.is_file() and not force:
        doc = json.loads(meta.read_text())
        doc.update(path=path, cached=True, agent_cached=agent.cached,
                   seconds=round(time.monotonic() - started, 3))
        return BaseInfo(**doc)
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    module_names, libs = _write_base(writer, agent, kernel, modules, ca, trust)
    writer.close()
    raw = buf.getvalue()
    # Padded: the kernel finds an appended archive only at a 4-byte-aligned offset.
    packed = compress_segment(raw, method, level)
    write_atomically(path, [packed])
    info = BaseInfo(path=path, key=key, cached=False, size=len(packed), uncompressed=len(raw),
                    files=writer.files, compression=method, kernel=kernel.version,
                    modules=module_names, libraries=libs, agent_cached=agent.cached,
                    seconds=round(time.monotonic() - started, 3))
    doc = asdict(info)
    for transient in ("path", "cached", "agent_cached", "seconds"):
        doc.pop(transient)
    write_atomically(meta, [json.dumps(doc, indent=1).encode()])
    return info


def plan_segment(plan_path: Path, trust: TrustSettings) -> tuple[bytes, int]:
    """The per-domain archive: the validated plan and its signature, uncompressed (tiny).

    With trusted keys the plan must carry ``PLAN.minisig`` from one of them; it is
    checked here too, so a wrongly signed plan fails the build, not the boot.
    """
    from guest_init.plan import PlanError, load_plan  # noqa: PLC0415

    try:
        load_plan(plan_path)
    except PlanError as exc:
        raise UserError(str(exc)) from None
    sig = plan_path.with_name(plan_path.name + ".minisig")
    if trust.keys:
        if not sig.is_file():
            raise UserError(f"{plan_path}: not signed ({sig.name} missing); sign it with "
                            f"'supercharge sign {plan_path}' or build with --allow-unsigned-plans")
        from guest_init.trust import PublicKey, TrustError, verify_file  # noqa: PLC0415

        try:
            verify_file(plan_path, sig, [PublicKey.from_string(text) for _, text in trust.keys])
        except TrustError as exc:
            raise UserError(str(exc), EXIT_FAILED) from None
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_dir("etc/supercharge")
    writer.add_file(PLAN_IN_INITRD, plan_path.read_bytes(), 0o644)
    if sig.is_file():
        writer.add_file(PLAN_SIG_IN_INITRD, sig.read_bytes(), 0o644)
    writer.close()
    return buf.getvalue(), writer.files


def prepare_initrd(kernel: KernelRef, output: Path, *, plan: Path | None = None,
                   extra_modules: list[str] = (), method: str = "zstd",
                   level: int | None = None, trust: TrustSettings | None = None) -> InitrdResult:
    started = time.monotonic()
    if plan is not None and not plan.is_file():
        raise UserError(f"{plan}: plan not found")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: output directory does not exist")
    if output.is_dir():
        raise UserError(f"{output}: is a directory; expected a file name for the initrd")
    if trust is None:
        raise UserError("no trust settings: give trusted keys, or allow unsigned plans for development")
    segment, seg_files = (plan_segment(plan, trust) if plan is not None else (b"", 0))
    base = build_base(kernel, extra_modules=list(extra_modules), method=method, level=level, trust=trust)
    write_atomically(output, [base.path, segment])
    return InitrdResult(output=output, size=output.stat().st_size, base=base,
                        plan_segment=len(segment), plan_files=seg_files,
                        seconds=round(time.monotonic() - started, 3))
