"""Exporting a dom0 directory to domains over NFSv4: nfs-ganesha, or the kernel's server.

Why both: nfs-ganesha runs as an ordinary foreground process with its state in
directories we choose, so tests (and hosts without the nfsd module, such as
containers) can serve a domain from loopback; the kernel server is what most
hosts already run, and only needs one line in /etc/exports.

Only NFSv4 over TCP: the guest's agent mounts with mount(2) and has no rpcbind,
no MOUNT protocol and no mount.nfs, so the server must answer NFSv4 on one port.
For ganesha that also means no rpcbind on dom0 (NFSv3, NLM, RQUOTA and UDP off).
"""
from __future__ import annotations

import posixpath
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from .atomic import write_atomically
from .errors import EnvironmentProblem, UserError

GANESHA = "ganesha.nfsd"
DEFAULT_PORT = 2049
ACCESS = ("RO", "RW")
#: Squash modes both servers understand, with ganesha's spelling.
SQUASH = {"root_squash": "Root_Squash", "no_root_squash": "No_Root_Squash", "all_squash": "All_Squash"}


@dataclass(frozen=True)
class Export:
    """One directory exported to domains.

    ``pseudo`` is the path clients mount under ganesha's NFSv4 pseudo file system
    (the plan's ``nfs.path``); the kernel server exports ``path`` by its own name.
    ``clients`` limits access to these addresses or networks; empty means any
    client that can reach the port.  Under qemu's user networking the server
    sees the guest as 127.0.0.1 (qemu connects for it), from an unprivileged port.
    """

    path: Path
    pseudo: str
    access: str = "RO"
    squash: str = "root_squash"
    clients: tuple[str, ...] = ()
    export_id: int | None = None
    privileged_port: bool = False   # True: refuse clients connecting from ports >= 1024


@dataclass(frozen=True)
class GaneshaConfig:
    """What goes into one ganesha.conf: the listener, the NFSv4 state, the exports.

    ``graceless`` skips the grace period after a start (90 s by default in
    ganesha, during which clients may not open files): a domain booting right
    after dom0 starts the server would wait that long.  Turn it off when clients
    hold locks that must be reclaimed across server restarts.
    """

    exports: tuple[Export, ...]
    port: int = DEFAULT_PORT
    bind_addr: str = "0.0.0.0"
    recovery_root: Path = Path("/var/lib/nfs/ganesha")
    ccache_dir: Path = Path("/var/run/ganesha")
    graceless: bool = True
    lease_lifetime: int = 60


def _quoted(value: str, where: str) -> str:
    """A ganesha config string; its parser has no escape for these characters."""
    if any(c in value for c in '"\\') or any(ord(c) < 32 for c in value):
        raise UserError(f"{where}: expected no quotes, backslashes or control characters, found {value!r}")
    return f'"{value}"'


def _ip_address(value: str, where: str) -> str:
    """ganesha wants a bare address here, not a quoted string or a name."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise UserError(f"{where}: expected an IP address like 127.0.0.1 or 0.0.0.0, found {value!r}") from None


def _normal_abs(value: str, where: str) -> str:
    if not value.startswith("/") or posixpath.normpath(value) != value or value.startswith("//"):
        raise UserError(f"{where}: expected an absolute, normalised path, found {value!r}")
    return value


def _check_export(export: Export, where: str) -> None:
    path = Path(export.path)
    if not path.is_absolute():
        raise UserError(f"{where}.path: expected an absolute directory, found {str(path)!r}")
    if not path.is_dir():
        raise UserError(f"{where}.path: {path} is not a directory")
    _normal_abs(export.pseudo, f"{where}.pseudo")
    if export.pseudo == "/":
        raise UserError(f"{where}.pseudo: \"/\" is the server's own pseudo root; choose a path like /export/opt")
    if export.access not in ACCESS:
        raise UserError(f"{where}.access: expected RO or RW, found {export.access!r}")
    if export.squash not in SQUASH:
        raise UserError(f"{where}.squash: expected one of {', '.join(SQUASH)}, found {export.squash!r}")
    for i, client in enumerate(export.clients):
        if not client or any(c in client for c in ' ,;"()') or any(ord(c) < 32 for c in client):
            raise UserError(f"{where}.clients[{i}]: expected an address, network or host name, found {client!r}")


def _check_port(port: object, where: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"{where}: expected a TCP port from 1 to 65535, found {port!r}")
    return port


def export_ids(exports: tuple[Export, ...]) -> list[int]:
    """Each export's Export_Id: as given, else the next free number from 1 (0 is the pseudo root)."""
    given = [e.export_id for e in exports if e.export_id is not None]
    ids: list[int] = []
    next_id = 1
    for i, export in enumerate(exports):
        if export.export_id is not None:
            if isinstance(export.export_id, bool) or not 1 <= export.export_id <= 65535:
                raise UserError(f"exports[{i}].export_id: expected 1 to 65535, found {export.export_id!r}")
            if export.export_id in ids:
                raise UserError(f"exports[{i}].export_id: {export.export_id} is used twice")
            ids.append(export.export_id)
            continue
        while next_id in given or next_id in ids:
            next_id += 1
        ids.append(next_id)
        next_id += 1
    return ids


def ganesha_config_text(config: GaneshaConfig) -> str:
    """The ganesha.conf for ``config``, after checking every field (one-line errors)."""
    if not config.exports:
        raise UserError("exports: expected at least one export")
    port = _check_port(config.port, "port")
    ids = export_ids(config.exports)
    pseudos: dict[str, int] = {}
    for i, export in enumerate(config.exports):
        _check_export(export, f"exports[{i}]")
        if export.pseudo in pseudos:
            raise UserError(f"exports[{i}].pseudo: {export.pseudo} is already exports[{pseudos[export.pseudo]}]")
        pseudos[export.pseudo] = i
    if not 0 <= config.lease_lifetime <= 120:
        raise UserError(f"lease_lifetime: expected 0 to 120 seconds, found {config.lease_lifetime!r}")
    lines = [
        "# Written by supercharge (dom0/nfs.py): NFSv4 only, over TCP, so no rpcbind is needed.",
        "NFS_CORE_PARAM {",
        f"    NFS_Port = {port};",
        f"    Bind_Addr = {_ip_address(config.bind_addr, 'bind_addr')};",
        "    Protocols = 4;",
        "    Enable_NLM = false;",
        "    Enable_RQUOTA = false;",
        "    Enable_UDP = false;",
        "}",
        "NFSV4 {",
        "    RecoveryBackend = fs;",
        f"    RecoveryRoot = {_quoted(str(config.recovery_root), 'recovery_root')};",
        f"    Graceless = {'true' if config.graceless else 'false'};",
        f"    Lease_Lifetime = {config.lease_lifetime};",
        # The guest has no idmapd: numeric owners are what its kernel understands.
        "    Only_Numeric_Owners = true;",
        "}",
        "NFS_KRB5 {",
        "    Active_krb5 = false;",
        f"    CCacheDir = {_quoted(str(config.ccache_dir), 'ccache_dir')};",
        "}",
    ]
    for export, export_id in zip(config.exports, ids):
        access = "None" if export.clients else export.access
        lines += [
            "EXPORT {",
            f"    Export_Id = {export_id};",
            f"    Path = {_quoted(str(export.path), 'path')};",
            f"    Pseudo = {_quoted(export.pseudo, 'pseudo')};",
            f"    Access_Type = {access};",
            f"    Squash = {SQUASH[export.squash]};",
            "    Protocols = 4;",
            "    Transports = TCP;",
            "    SecType = sys;",
            f"    PrivilegedPort = {'true' if export.privileged_port else 'false'};",
            "    FSAL {",
            "        Name = VFS;",
            "    }",
        ]
        if export.clients:
            lines += [
                "    CLIENT {",
                f"        Clients = {', '.join(export.clients)};",
                f"        Access_Type = {export.access};",
                "    }",
            ]
        lines.append("}")
    return "\n".join(lines) + "\n"


def write_ganesha_config(path: Path, config: GaneshaConfig) -> Path:
    """Write ganesha.conf atomically: a server reloading (SIGHUP) never reads half a file."""
    text = ganesha_config_text(config)
    write_atomically(Path(path), [text.encode()], mode=0o644)
    return Path(path)


def ganesha_command(conf: Path, log: Path, pidfile: Path, debug_level: str = "NIV_EVENT") -> list[str]:
    """The foreground command line: ``ganesha.nfsd -F -L LOG -f CONF -p PIDFILE``."""
    return [GANESHA, "-F", "-L", str(log), "-f", str(conf), "-p", str(pidfile), "-N", debug_level]


@dataclass
class GaneshaServer:
    """A ganesha.nfsd started by :func:`start_ganesha`; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    process: subprocess.Popen
    conf: Path
    log: Path
    pidfile: Path
    host: str
    port: int

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self) -> int:
        """Block until the server exits (a foreground server for an admin's terminal)."""
        return self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_ganesha(conf: Path, state_dir: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                  recovery_root: Path | None = None, timeout: float = 30.0) -> GaneshaServer:
    """Run ganesha.nfsd in the foreground (as a child) and return once it accepts connections.

    ``state_dir`` receives the log and the pid file.  The recovery root (where
    ganesha keeps NFSv4 client records, ``v4recov``/``v4old``) is created when it
    is missing.  ganesha logs CRIT lines about D-Bus when there is no system bus
    and a MAJ line for rpcbind; neither stops an NFSv4-only server.
    """
    import shutil

    if shutil.which(GANESHA) is None:
        raise EnvironmentProblem(f"{GANESHA} not found: install Debian's nfs-ganesha and nfs-ganesha-vfs packages")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if recovery_root is not None:
        Path(recovery_root).mkdir(parents=True, exist_ok=True)
    log, pidfile = state_dir / "ganesha.log", state_dir / "ganesha.pid"
    process = subprocess.Popen(ganesha_command(conf, log, pidfile), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=state_dir,
                               start_new_session=True)
    server = GaneshaServer(process, Path(conf), log, pidfile, host, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EnvironmentProblem(f"{GANESHA} exited with status {process.returncode} before serving "
                                     f"{host}:{port}; its log ({log}) ends: {server.log_tail(5)}")
        if _accepting(host, port):
            return server
        time.sleep(0.1)
    server.stop()
    raise EnvironmentProblem(f"{GANESHA} did not accept connections on {host}:{port} within {timeout:.0f} s; "
                             f"its log ({log}) ends: {server.log_tail(5)}")


def serve(config: GaneshaConfig, state_dir: Path, host: str = "127.0.0.1") -> GaneshaServer:
    """Write ``state_dir/ganesha.conf`` for ``config`` and start the server on it."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    Path(config.ccache_dir).mkdir(parents=True, exist_ok=True)
    conf = write_ganesha_config(Path(state_dir) / "ganesha.conf", config)
    return start_ganesha(conf, state_dir, host=host, port=config.port, recovery_root=config.recovery_root)


# ------------------------------------------------------------ the kernel's server


def kernel_options(export: Export) -> str:
    """The option list for /etc/exports and ``exportfs -o``.

    ``no_subtree_check`` because subtree checking breaks on renames and buys nothing
    for whole-directory exports; ``insecure`` unless ``privileged_port``, because
    qemu's user networking and unprivileged clients connect from ports >= 1024.
    """
    _check_export(export, "export")
    return ",".join([export.access.lower(), export.squash, "no_subtree_check", "sec=sys",
                     "secure" if export.privileged_port else "insecure"])


def exports_line(export: Export) -> str:
    """The /etc/exports line: ``/srv/web1/opt 10.0.2.15(ro,root_squash,...)``.

    The kernel server exports a directory by its own path: the plan's ``nfs.path``
    is then ``export.path``, not ``export.pseudo``.
    """
    options = kernel_options(export)
    path = str(export.path)
    if any(c.isspace() for c in path):
        path = '"' + path + '"'
    clients = export.clients or ("*",)
    return f"{path} " + " ".join(f"{client}({options})" for client in clients)


def exportfs_commands(export: Export) -> list[list[str]]:
    """``exportfs -o OPTIONS CLIENT:PATH``, one per client: the same export without editing /etc/exports."""
    options = kernel_options(export)
    return [["exportfs", "-o", options, f"{client}:{export.path}"] for client in (export.clients or ("*",))]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and one-off servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
