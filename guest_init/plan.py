"""The boot plan: what the agent mounts and which files it changes in the real root.

The plan is versioned JSON written by dom0 and read by the agent at boot.  It is
validated completely before anything is touched, so that a typo is reported as one
line naming the file and the field (``plan.json: steps[1].mode: ...``) instead of
surfacing as a half-applied personality.  Unknown keys are errors for the same
reason: a misspelt ``"uid"`` silently ignored is a wrong owner in production.

Each operation (``"op"``) has its own parser in :data:`OPERATIONS`; adding an
operation means writing one parser (with the ``expect_*`` helpers below), one
dataclass and one applier in :mod:`guest_init.ops`, and registering both.

Only the standard library is imported: this module is on the agent's start path.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

PLAN_VERSION = 1
FAILURE_POLICIES = ("halt", "continue", "poweroff", "rescue")
DEFAULT_FAILURE_POLICY = "halt"
DEFAULT_DEVICE_TIMEOUT = 30.0
DEFAULT_FETCH_TIMEOUT = 120.0
DEFAULT_INIT = "/sbin/init"
DEFAULT_FSTYPE = "ext4"
DEFAULT_OPTIONS = ("rw",)
DEFAULT_MODE = 0o644
NFS_FSTYPE = "nfs4"
DEFAULT_NFS_PORT = 2049
DEFAULT_NFS_TIMEOUT = 30.0
#: NFS mount options the agent computes itself (``addr``, ``clientaddr``) or that the
#: plan gives elsewhere (``port``): a second value in ``options`` would be ambiguous.
NFS_RESERVED_OPTIONS = ("addr", "clientaddr", "port", "proto", "mountport", "mountaddr")
NFS_VERSIONS = ("4", "4.0", "4.1", "4.2")

_HEX = frozenset("0123456789abcdef")


class PlanError(ValueError):
    """An invalid plan, reported as ``<source>[:line:col]: [<field>: ]<problem>``.

    ``field`` is the JSON path of the offending value (``"steps[1].mode"``), or ``""``
    when the problem is with the file as a whole (unreadable, not JSON).  ``source``
    is filled in by :func:`validate_plan` / :func:`load_plan`, so the per-operation
    parsers need not know which file they are reading.
    """

    def __init__(
        self,
        field: str,
        problem: str,
        source: str = "plan",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.source = source
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        if self.field:
            return f"{where}: {self.field}: {self.problem}"
        return f"{where}: {self.problem}"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DeviceRef:
    """A block device named by file-system label or UUID, never by kernel name.

    Exactly one of ``label`` / ``uuid`` is set.  ``uuid`` is stored lower-case
    (a FAT serial ``ABCD-1234`` becomes ``abcd-1234``); matching is case-insensitive.
    """

    label: str | None = None
    uuid: str | None = None

    def describe(self) -> str:
        """The fstab-style spelling, e.g. ``LABEL=web1-root``; also the key in reports."""
        if self.label is not None:
            return f"LABEL={self.label}"
        return f"UUID={self.uuid}"


@dataclass(frozen=True)
class Overlay:
    """A copy-on-write mount: read-only shared ``lower`` layers, a per-domain writable
    ``upper`` (a file system by label or UUID, or None for a tmpfs that lasts one boot)."""

    lower: tuple[DeviceRef, ...]
    upper: DeviceRef | None = None
    fstype: str = DEFAULT_FSTYPE


@dataclass(frozen=True)
class NfsExport:
    """An NFSv4 export, mounted with the kernel's mount(2): there is no mount.nfs in the
    initramfs, so ``server`` is an IPv4 address (nothing resolves a name for the kernel)."""

    server: str
    path: str
    port: int = DEFAULT_NFS_PORT
    timeout: float = DEFAULT_NFS_TIMEOUT

    def describe(self) -> str:
        """The fstab-style spelling, ``10.0.2.2:/export/opt``; also the key in reports."""
        return f"{self.server}:{self.path}"


@dataclass(frozen=True)
class Mount:
    """One file system to mount under the new root (``target`` is a guest path).

    ``device`` is a :class:`DeviceRef` for a block device, or the :class:`NfsExport`
    of an NFS mount (both have ``describe()``, so reports and hooks name either).
    """

    device: DeviceRef | NfsExport
    target: str
    fstype: str = DEFAULT_FSTYPE
    options: tuple[str, ...] = DEFAULT_OPTIONS
    overlay: Overlay | None = None

    @property
    def nfs(self) -> NfsExport | None:
        """The export when this is an NFS mount, else None."""
        return self.device if isinstance(self.device, NfsExport) else None

    def devices(self) -> list[DeviceRef]:
        """Every block device this mount needs (none for NFS: the devices stage skips it)."""
        if isinstance(self.device, NfsExport):
            return []
        if self.overlay is None:
            return [self.device]
        return [*self.overlay.lower, *([self.overlay.upper] if self.overlay.upper else [])]


@dataclass(frozen=True)
class Step:
    """Base of all plan operations; ``op`` names the operation and its applier."""

    op: ClassVar[str] = ""


@dataclass(frozen=True)
class ReplaceStep(Step):
    """Replace (or create) the file ``path`` with ``content``, atomically."""

    op: ClassVar[str] = "replace"
    path: str
    content: bytes
    mode: int = DEFAULT_MODE
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Artifact:
    """Something the agent fetches: its URI and, when dom0 pinned it, its SHA-256.

    An artifact without a pin must carry a valid signature from a trusted key.
    """

    uri: str
    sha256: str | None = None


@dataclass(frozen=True)
class CopyStep(Step):
    """Fetch ``source`` and install it as the file ``path``, atomically."""

    op: ClassVar[str] = "copy"
    path: str
    source: Artifact
    mode: int = DEFAULT_MODE
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class PatchStep(Step):
    """Fetch a unified diff and apply it under ``dir`` with ``strip`` (patch -pN)."""

    op: ClassVar[str] = "patch"
    source: Artifact
    dir: str = "/"
    strip: int = 1


@dataclass(frozen=True)
class ExtractStep(Step):
    """Fetch a cpio or tar archive and unpack it safely into ``dir``."""

    op: ClassVar[str] = "extract"
    source: Artifact
    dir: str


@dataclass(frozen=True)
class HookStep(Step):
    """A post-processing script run chrooted in the target, with a timeout."""

    op: ClassVar[str] = "hook"
    name: str
    script: bytes | None = None
    source: Artifact | None = None
    interpreter: str = "/bin/sh"
    timeout: float = 60.0


@dataclass(frozen=True)
class Plan:
    """A validated plan.  ``digest`` is the SHA-256 of the canonical JSON document."""

    version: int
    name: str
    init: str
    failure_policy: str
    device_timeout: float
    mounts: tuple[Mount, ...]
    steps: tuple[Step, ...]
    digest: str = field(compare=False)
    fetch_timeout: float = 120.0
    network: Any = None   # guest_init.network.NetworkConfig when the plan configures interfaces

    def mount_order(self) -> list[Mount]:
        """Mounts ordered so that every target's parent is mounted before it.

        The plan lists mounts in any order; mounting ``/usr`` before ``/`` would hide it.
        Sorting by depth (stable) is enough because targets are normalised.
        """
        return sorted(self.mounts, key=lambda m: 0 if m.target == "/" else m.target.count("/"))


# ------------------------------------------------------- helpers for op parsers


def _found(value: object) -> str:
    """How a wrong value is shown in an error: as JSON, cut short."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def expect_object(value: object, where: str) -> dict[str, Any]:
    """``value`` must be a JSON object."""
    if not isinstance(value, dict):
        raise PlanError(where, f"expected an object, found {_type_name(value)}")
    return value


def expect_keys(
    obj: dict[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    """Every ``required`` key present and no key outside ``required + optional``."""
    allowed = set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise PlanError(_join(where, key), f"unknown key (known keys: {known})")
    for key in required:
        if key not in obj:
            raise PlanError(_join(where, key), "missing (required)")


def expect_str(value: object, where: str, *, non_empty: bool = True) -> str:
    """A string (non-empty unless told), without NUL: every string may reach a syscall."""
    if not isinstance(value, str):
        raise PlanError(where, f"expected a string, found {_found(value)}")
    if non_empty and not value:
        raise PlanError(where, "expected a non-empty string")
    if "\0" in value:
        raise PlanError(where, "contains a NUL character")
    return value


def expect_int(value: object, where: str, *, minimum: int | None = None) -> int:
    """A JSON integer (``true`` is not 1 here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(where, f"expected an integer, found {_found(value)}")
    if minimum is not None and value < minimum:
        raise PlanError(where, f"expected an integer >= {minimum}, found {value}")
    return value


def expect_id(value: object, where: str) -> int | None:
    """A uid or gid: a non-negative integer, or ``null`` for "leave as is"."""
    if value is None:
        return None
    return expect_int(value, where, minimum=0)


def expect_mode(value: object, where: str) -> int:
    """Permission bits as an octal string such as ``"0644"``.

    A string, not a number, because JSON has no octal: ``420`` is what ``0644``
    becomes when someone forgets, and it must be caught rather than applied.
    """
    if (
        not isinstance(value, str)
        or not 3 <= len(value) <= 4
        or any(c not in "01234567" for c in value)
    ):
        raise PlanError(where, f'expected an octal string like "0644", found {_found(value)}')
    return int(value, 8)


def expect_guest_path(value: object, where: str) -> str:
    """An absolute guest path with no ``..`` component, returned normalised.

    Refused here rather than only when applied, so that a bad plan never starts
    changing anything.  Symlinks are checked at apply time by :mod:`guest_init.safepath`.
    """
    text = expect_str(value, where)
    if not text.startswith("/"):
        raise PlanError(where, f"expected an absolute path, found {_found(text)}")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PlanError(where, f'".." is not allowed in a path, found {_found(text)}')
    return "/" + "/".join(parts)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expect_file_path(value: object, where: str) -> str:
    path = expect_guest_path(value, where)
    if path == "/":
        raise PlanError(where, 'expected a file path, found "/"')
    return path


# ------------------------------------------------------------- operation parsers


def parse_replace(obj: dict[str, Any], where: str) -> ReplaceStep:
    """``{"op": "replace", "path", "content" | "content_base64", "mode"?, "uid"?, "gid"?}``."""
    expect_keys(obj, where, ("op", "path"), ("content", "content_base64", "mode", "uid", "gid"))
    path = _expect_file_path(obj["path"], _join(where, "path"))
    has_text, has_b64 = "content" in obj, "content_base64" in obj
    if has_text == has_b64:
        raise PlanError(where, 'expected exactly one of "content" and "content_base64"')
    if has_text:
        content = expect_str(obj["content"], _join(where, "content"), non_empty=False).encode()
    else:
        b64 = expect_str(obj["content_base64"], _join(where, "content_base64"), non_empty=False)
        try:
            content = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PlanError(_join(where, "content_base64"), f"invalid base64: {exc}") from None
    mode = expect_mode(obj["mode"], _join(where, "mode")) if "mode" in obj else DEFAULT_MODE
    return ReplaceStep(
        path=path,
        content=content,
        mode=mode,
        uid=expect_id(obj.get("uid"), _join(where, "uid")),
        gid=expect_id(obj.get("gid"), _join(where, "gid")),
    )


def _parse_artifact(obj: dict[str, Any], where: str) -> Artifact:
    uri = expect_str(obj["uri"], _join(where, "uri"))
    if "://" not in uri and not uri.startswith("/"):
        raise PlanError(_join(where, "uri"), f"expected a URI (file://, http://, https://, ftp://), found {_found(uri)}")
    pin = obj.get("sha256")
    if pin is not None:
        pin = expect_str(pin, _join(where, "sha256"))
        if len(pin) != 64 or not set(pin) <= _HEX:
            raise PlanError(_join(where, "sha256"), f"expected 64 lowercase hex digits, found {_found(pin)}")
    return Artifact(uri=uri, sha256=pin)


def parse_copy(obj: dict[str, Any], where: str) -> CopyStep:
    """``{"op": "copy", "path", "uri", "sha256"?, "mode"?, "uid"?, "gid"?}``."""
    expect_keys(obj, where, ("op", "path", "uri"), ("sha256", "mode", "uid", "gid"))
    return CopyStep(
        path=_expect_file_path(obj["path"], _join(where, "path")),
        source=_parse_artifact(obj, where),
        mode=expect_mode(obj["mode"], _join(where, "mode")) if "mode" in obj else DEFAULT_MODE,
        uid=expect_id(obj.get("uid"), _join(where, "uid")),
        gid=expect_id(obj.get("gid"), _join(where, "gid")),
    )


def parse_patch(obj: dict[str, Any], where: str) -> PatchStep:
    """``{"op": "patch", "uri", "sha256"?, "dir"? ("/"), "strip"? (1)}``."""
    expect_keys(obj, where, ("op", "uri"), ("sha256", "dir", "strip"))
    return PatchStep(
        source=_parse_artifact(obj, where),
        dir=expect_guest_path(obj.get("dir", "/"), _join(where, "dir")),
        strip=expect_int(obj.get("strip", 1), _join(where, "strip"), minimum=0),
    )


def parse_extract(obj: dict[str, Any], where: str) -> ExtractStep:
    """``{"op": "extract", "uri", "sha256"?, "dir"}``."""
    expect_keys(obj, where, ("op", "uri", "dir"), ("sha256",))
    return ExtractStep(source=_parse_artifact(obj, where),
                       dir=expect_guest_path(obj["dir"], _join(where, "dir")))


def parse_hook(obj: dict[str, Any], where: str) -> HookStep:
    """``{"op": "hook", "name", "script" | "uri" (+ "sha256"), "interpreter"?, "timeout"?}``."""
    expect_keys(obj, where, ("op", "name"), ("script", "uri", "sha256", "interpreter", "timeout"))
    name = expect_str(obj["name"], _join(where, "name"))
    if ("script" in obj) == ("uri" in obj):
        raise PlanError(where, 'expected exactly one of "script" and "uri"')
    script = source = None
    if "script" in obj:
        script = expect_str(obj["script"], _join(where, "script")).encode()
    else:
        source = _parse_artifact(obj, where)
    timeout = obj.get("timeout", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
        raise PlanError(_join(where, "timeout"), f"expected seconds between 0 and 86400, found {_found(timeout)}")
    return HookStep(name=name, script=script, source=source,
                    interpreter=expect_guest_path(obj.get("interpreter", "/bin/sh"), _join(where, "interpreter")),
                    timeout=float(timeout))


#: Parser for each ``"op"``: ``parser(step_object, "steps[i]") -> Step``.
#: A parser raises :class:`PlanError` naming the field; the source is added later.
OPERATIONS: dict[str, Callable[[dict[str, Any], str], Step]] = {
    "replace": parse_replace,
    "copy": parse_copy,
    "patch": parse_patch,
    "extract": parse_extract,
    "hook": parse_hook,
}


# ------------------------------------------------------------------ the document


def _parse_device(value: object, where: str) -> DeviceRef:
    obj = expect_object(value, where)
    expect_keys(obj, where, (), ("label", "uuid"))
    if ("label" in obj) == ("uuid" in obj):
        raise PlanError(where, 'expected exactly one of "label" and "uuid"')
    if "label" in obj:
        return DeviceRef(label=expect_str(obj["label"], _join(where, "label")))
    uuid = expect_str(obj["uuid"], _join(where, "uuid")).lower()
    groups = uuid.split("-")
    shape = [len(g) for g in groups]
    # A 128-bit UUID (ext, xfs, btrfs, swap) or a 32-bit FAT serial ("ABCD-1234").
    if shape not in ([8, 4, 4, 4, 12], [4, 4]) or any(c not in _HEX for g in groups for c in g):
        raise PlanError(
            _join(where, "uuid"),
            f'expected a UUID like "0b9f5c1e-...-..." or a FAT serial like "ABCD-1234", '
            f"found {_found(obj['uuid'])}",
        )
    return DeviceRef(uuid=uuid)


def _parse_mount(value: object, where: str) -> Mount:
    obj = expect_object(value, where)
    overlay = None
    if "nfs" in obj:
        return _parse_nfs_mount(obj, where)
    if "overlay" in obj:
        expect_keys(obj, where, ("overlay", "target"), ("options",))
        overlay = _parse_overlay(obj["overlay"], _join(where, "overlay"))
        device = overlay.lower[0]
    else:
        expect_keys(obj, where, ("device", "target"), ("fstype", "options"))
        device = _parse_device(obj["device"], _join(where, "device"))
    target = _parse_target(obj, where)
    fstype = "overlay" if overlay else expect_str(obj.get("fstype", DEFAULT_FSTYPE), _join(where, "fstype"))
    options = _parse_options(obj, where, expect_str)
    return Mount(device=device, target=target, fstype=fstype, options=options, overlay=overlay)


def _parse_options(obj: dict[str, Any], where: str, expect: Callable[[Any, str], str]) -> tuple[str, ...]:
    """A mount's ``options`` (each checked by ``expect``), or the defaults."""
    if "options" not in obj:
        return DEFAULT_OPTIONS
    raw = obj["options"]
    if not isinstance(raw, list):
        raise PlanError(_join(where, "options"), f"expected a list of strings, found {_found(raw)}")
    return tuple(expect(o, f"{where}.options[{i}]") for i, o in enumerate(raw))


def _parse_target(obj: dict[str, Any], where: str) -> str:
    raw_target = obj["target"]
    target = expect_guest_path(raw_target, _join(where, "target"))
    if target != raw_target:
        raise PlanError(
            _join(where, "target"), f"expected a normalised path ({_found(target)}), found {_found(raw_target)}"
        )
    return target


def _parse_nfs_mount(obj: dict[str, Any], where: str) -> Mount:
    """``{"nfs": {"server", "path", "port"?, "timeout"?}, "target", "fstype"? ("nfs4"), "options"?}``.

    Only NFSv4: v2/v3 need rpcbind and the MOUNT protocol (mount.nfs), which the
    initramfs does not have.  Options the agent sets itself are refused here, so a
    plan cannot say two different things about the server's address or port.
    """
    expect_keys(obj, where, ("nfs", "target"), ("fstype", "options"))
    export = _parse_nfs_export(obj["nfs"], _join(where, "nfs"))
    target = _parse_target(obj, where)
    fstype = obj.get("fstype", NFS_FSTYPE)
    if fstype != NFS_FSTYPE:
        raise PlanError(_join(where, "fstype"),
                        f'expected "nfs4" for an NFS mount (NFSv2/3 need rpcbind and mount.nfs, which the '
                        f"initramfs does not have), found {_found(fstype)}")
    options = _parse_options(obj, where, _expect_nfs_option)
    return Mount(device=export, target=target, fstype=NFS_FSTYPE, options=options)


def _parse_nfs_export(value: object, where: str) -> NfsExport:
    import ipaddress  # only plans with NFS mounts pay for it

    obj = expect_object(value, where)
    expect_keys(obj, where, ("server", "path"), ("port", "timeout"))
    server = expect_str(obj["server"], _join(where, "server"))
    try:
        addr = ipaddress.IPv4Address(server)
    except ValueError:
        raise PlanError(_join(where, "server"),
                        f'expected an IPv4 address like "10.0.2.2" (the kernel mounts by address; no name is '
                        f"resolved in the initramfs), found {_found(server)}") from None
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise PlanError(_join(where, "server"), f"expected a unicast address, found {_found(server)}")
    raw_path = obj["path"]
    path = expect_guest_path(raw_path, _join(where, "path"))
    if path != raw_path:
        raise PlanError(_join(where, "path"),
                        f"expected a normalised export path ({_found(path)}), found {_found(raw_path)}")
    if any(c in path for c in ",\n"):
        raise PlanError(_join(where, "path"), f"expected a path without ',' or newlines, found {_found(path)}")
    port = obj.get("port", DEFAULT_NFS_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PlanError(_join(where, "port"), f"expected a TCP port from 1 to 65535, found {_found(port)}")
    timeout = obj.get("timeout", DEFAULT_NFS_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise PlanError(_join(where, "timeout"),
                        f"expected seconds more than 0 and at most 3600, found {_found(timeout)}")
    return NfsExport(server=str(addr), path=path, port=port, timeout=float(timeout))


def _expect_nfs_option(value: object, where: str) -> str:
    """One option per string; the agent joins them, so a ',' would smuggle in a second one."""
    opt = expect_str(value, where)
    if "," in opt or any(ord(c) < 32 for c in opt):
        raise PlanError(where, f"expected one option per string (no ',' or control characters), found {_found(opt)}")
    key, _, val = opt.partition("=")
    if key in NFS_RESERVED_OPTIONS:
        given = "by nfs.port" if key == "port" else "by the agent"
        raise PlanError(where, f"{key}= is set {given}; remove it from options")
    if key in ("vers", "nfsvers") and val not in NFS_VERSIONS:
        raise PlanError(where, f"expected vers=4, 4.0, 4.1 or 4.2 (only NFSv4 is mounted), found {_found(opt)}")
    if key == "minorversion" and val not in ("0", "1", "2"):
        raise PlanError(where, f"expected minorversion=0, 1 or 2, found {_found(opt)}")
    return opt


def _parse_overlay(value: object, where: str) -> Overlay:
    """``{"lower": [DEVICE, ...], "upper": DEVICE | "tmpfs", "fstype"?}``."""
    obj = expect_object(value, where)
    expect_keys(obj, where, ("lower", "upper"), ("fstype",))
    raw_lower = obj["lower"]
    if not isinstance(raw_lower, list) or not raw_lower:
        raise PlanError(_join(where, "lower"), f"expected a non-empty list of devices, found {_found(raw_lower)}")
    lower = tuple(_parse_device(d, f"{where}.lower[{i}]") for i, d in enumerate(raw_lower))
    upper = None if obj["upper"] == "tmpfs" else _parse_device(obj["upper"], _join(where, "upper"))
    fstype = expect_str(obj.get("fstype", DEFAULT_FSTYPE), _join(where, "fstype"))
    return Overlay(lower=lower, upper=upper, fstype=fstype)


def _parse_timeout(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PlanError(where, f"expected a number of seconds >= 0, found {_found(value)}")
    return float(value)


def _parse_name(value: object, where: str) -> str:
    name = expect_str(value, where)
    # The name ends up in report file names and log lines on dom0.
    if "/" in name or any(ord(c) < 32 for c in name):
        raise PlanError(where, f"expected a name without '/' or control characters, found {_found(name)}")
    return name


def digest_of(doc: object) -> str:
    """SHA-256 hex of the canonical JSON form, identical on dom0 and in the guest."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_plan(doc: object, source: str = "plan") -> Plan:
    """Check a decoded plan document completely and build the :class:`Plan`.

    Raises :class:`PlanError` for the first problem found, with ``source`` as the
    file name in its message.
    """
    try:
        return _validate(doc)
    except PlanError as exc:
        exc.source = source
        raise


def _validate(doc: object) -> Plan:
    obj = expect_object(doc, "")
    expect_keys(
        obj, "", ("version", "name", "mounts"),
        ("init", "failure_policy", "device_timeout", "fetch_timeout", "steps", "network"),
    )
    version = obj["version"]
    if isinstance(version, bool) or version != PLAN_VERSION or not isinstance(version, int):
        raise PlanError("version", f"unsupported plan version {_found(version)} (this agent reads {PLAN_VERSION})")
    name = _parse_name(obj["name"], "name")

    init = expect_guest_path(obj.get("init", DEFAULT_INIT), "init")
    if init == "/":
        raise PlanError("init", 'expected the path of a program, found "/"')

    policy = obj.get("failure_policy", DEFAULT_FAILURE_POLICY)
    if policy not in FAILURE_POLICIES:
        raise PlanError("failure_policy", f"expected one of {', '.join(FAILURE_POLICIES)}, found {_found(policy)}")

    timeout = _parse_timeout(obj.get("device_timeout", DEFAULT_DEVICE_TIMEOUT), "device_timeout")
    fetch_timeout = _parse_timeout(obj.get("fetch_timeout", DEFAULT_FETCH_TIMEOUT), "fetch_timeout")
    network = None
    if "network" in obj:
        from .network import parse_network  # network.py imports this module: import here

        network = parse_network(obj["network"], "network")

    raw_mounts = obj["mounts"]
    if not isinstance(raw_mounts, list):
        raise PlanError("mounts", f"expected a list of mounts, found {_found(raw_mounts)}")
    mounts: list[Mount] = []
    targets: dict[str, int] = {}
    for i, raw in enumerate(raw_mounts):
        mount = _parse_mount(raw, f"mounts[{i}]")
        if mount.target in targets:
            raise PlanError(
                f"mounts[{i}].target", f"{mount.target} is already the target of mounts[{targets[mount.target]}]"
            )
        targets[mount.target] = i
        mounts.append(mount)
    if "/" not in targets:
        raise PlanError("mounts", 'expected exactly one mount with target "/", found none')
    for i, mount in enumerate(mounts):
        # The network stage runs only when the plan has a network section (see stages.network).
        if mount.nfs is not None and network is None:
            raise PlanError(f"mounts[{i}].nfs", 'an NFS mount needs the network: add a "network" section '
                                                "(interfaces, addresses or DHCP; see network.md)")

    raw_steps = obj.get("steps", [])
    if not isinstance(raw_steps, list):
        raise PlanError("steps", f"expected a list of steps, found {_found(raw_steps)}")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        step_obj = expect_object(raw, where)
        if "op" not in step_obj:
            raise PlanError(f"{where}.op", "missing (required)")
        op = step_obj["op"]
        parser = OPERATIONS.get(op) if isinstance(op, str) else None
        if parser is None:
            known = ", ".join(sorted(OPERATIONS))
            raise PlanError(f"{where}.op", f"unknown operation {_found(op)} (known: {known})")
        steps.append(parser(step_obj, where))
    hook_names = [s.name for s in steps if isinstance(s, HookStep)]
    for i, step in enumerate(steps):
        if isinstance(step, HookStep) and hook_names.count(step.name) > 1:
            raise PlanError(f"steps[{i}].name", f"hook name {_found(step.name)} is used twice")

    return Plan(
        version=version,
        name=name,
        init=init,
        failure_policy=policy,
        device_timeout=timeout,
        mounts=tuple(mounts),
        steps=tuple(steps),
        digest=digest_of(doc),
        fetch_timeout=fetch_timeout,
        network=network,
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's default keeps the last of two equal keys; in a plan that is a silent typo."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise PlanError("", f"duplicate key {_found(key)} in an object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise PlanError("", f"{name} is not valid JSON")


def load_plan(path: str | Path) -> Plan:
    """Read, decode and validate a plan file; every failure is a :class:`PlanError`."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PlanError("", f"cannot read: {exc.strerror or exc}", source=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError("", f"not UTF-8 (byte {exc.start})", source=source) from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise PlanError("", f"invalid JSON: {exc.msg}", source=source, line=exc.lineno, column=exc.colno) from None
    except PlanError as exc:
        exc.source = source
        raise
    return validate_plan(doc, source)
