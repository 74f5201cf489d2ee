"""dom0/nfs.py: the ganesha configuration, the kernel server's exports line, and a real ganesha."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from dom0.errors import EnvironmentProblem, UserError
from dom0.nfs import (
    Export,
    GaneshaConfig,
    export_ids,
    exportfs_commands,
    exports_line,
    free_port,
    ganesha_command,
    ganesha_config_text,
    serve,
    write_ganesha_config,
)

pytestmark = pytest.mark.unit


def _config(tmp: Path, **kw) -> GaneshaConfig:
    (tmp / "opt").mkdir(exist_ok=True)
    exports = kw.pop("exports", (Export(tmp / "opt", "/export/opt"),))
    return GaneshaConfig(exports=exports, recovery_root=tmp / "recovery", ccache_dir=tmp / "ccache", **kw)


def _block(text: str, name: str, index: int = 0) -> str:
    """The text of the index-th top-level block ``name { ... }``."""
    starts = [i for i, line in enumerate(text.splitlines()) if line == f"{name} {{"]
    lines = text.splitlines()[starts[index]:]
    return "\n".join(lines[:lines.index("}") + 1])


def test_ganesha_config_is_nfsv4_only_on_one_port(tmp_path: Path) -> None:
    text = ganesha_config_text(_config(tmp_path, port=20490, bind_addr="127.0.0.1"))
    core = _block(text, "NFS_CORE_PARAM")
    for line in ("NFS_Port = 20490;", "Bind_Addr = 127.0.0.1;", "Protocols = 4;", "Enable_NLM = false;",
                 "Enable_RQUOTA = false;", "Enable_UDP = false;"):
        assert f"    {line}" in core.splitlines()
    v4 = _block(text, "NFSV4")
    assert f'RecoveryRoot = "{tmp_path / "recovery"}";' in v4 and "Graceless = true;" in v4
    assert "Only_Numeric_Owners = true;" in v4
    export = _block(text, "EXPORT")
    for line in ("Export_Id = 1;", f'Path = "{tmp_path / "opt"}";', 'Pseudo = "/export/opt";',
                 "Access_Type = RO;", "Squash = Root_Squash;", "Protocols = 4;", "Transports = TCP;",
                 "SecType = sys;", "PrivilegedPort = false;", "Name = VFS;"):
        assert line in export, line
    assert text.count("{") == text.count("}")


def test_ganesha_config_several_exports_and_clients(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    exports = (Export(tmp_path / "opt", "/export/opt", export_id=7),
               Export(tmp_path / "data", "/export/data", access="RW", squash="no_root_squash",
                      clients=("127.0.0.1", "10.0.2.0/24"), privileged_port=True))
    (tmp_path / "opt").mkdir()
    text = ganesha_config_text(_config(tmp_path, exports=exports))
    first, second = _block(text, "EXPORT", 0), _block(text, "EXPORT", 1)
    assert "Export_Id = 7;" in first and "Export_Id = 1;" in second
    assert "Access_Type = None;" in second and "Squash = No_Root_Squash;" in second
    assert "Clients = 127.0.0.1, 10.0.2.0/24;" in second and "        Access_Type = RW;" in second
    assert "PrivilegedPort = true;" in second


def test_export_ids_fill_the_gaps() -> None:
    def e(i: int | None = None) -> Export:
        return Export(Path("/"), "/x", export_id=i)

    assert export_ids((e(), e(2), e(), e())) == [1, 2, 3, 4]
    assert export_ids((e(5), e())) == [5, 1]


@pytest.mark.parametrize("change,words", [
    ({"port": 0}, "port: expected a TCP port from 1 to 65535, found 0"),
    ({"bind_addr": "localhost"}, "bind_addr: expected an IP address"),
    ({"lease_lifetime": 500}, "lease_lifetime: expected 0 to 120 seconds"),
    ({"exports": ()}, "exports: expected at least one export"),
])
def test_bad_config_is_one_line(tmp_path: Path, change: dict, words: str) -> None:
    with pytest.raises(UserError) as info:
        ganesha_config_text(_config(tmp_path, **change))
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("export,words", [
    (Export(Path("relative"), "/e"), "exports[0].path: expected an absolute directory"),
    (Export(Path("/nonexistent/dir"), "/e"), "exports[0].path: /nonexistent/dir is not a directory"),
    (Export(Path("OPT"), "e"), "exports[0].pseudo: expected an absolute, normalised path"),
    (Export(Path("OPT"), "/e/"), "exports[0].pseudo: expected an absolute, normalised path"),
    (Export(Path("OPT"), "/"), "exports[0].pseudo: \"/\" is the server's own pseudo root"),
    (Export(Path("OPT"), '/e"x'), "pseudo: expected no quotes"),
    (Export(Path("OPT"), "/e", access="rw"), "exports[0].access: expected RO or RW"),
    (Export(Path("OPT"), "/e", squash="squash"), "exports[0].squash: expected one of root_squash"),
    (Export(Path("OPT"), "/e", clients=("a b",)), "exports[0].clients[0]: expected an address"),
    (Export(Path("OPT"), "/e", export_id=0), "exports[0].export_id: expected 1 to 65535"),
])
def test_bad_export_is_named(tmp_path: Path, export: Export, words: str) -> None:
    (tmp_path / "opt").mkdir()
    if str(export.path) == "OPT":
        export = Export(tmp_path / "opt", export.pseudo, export.access, export.squash, export.clients,
                        export.export_id)
    with pytest.raises(UserError) as info:
        ganesha_config_text(_config(tmp_path, exports=(export,)))
    assert words in str(info.value)


def test_duplicate_pseudo_and_id_are_refused(tmp_path: Path) -> None:
    (tmp_path / "opt").mkdir()
    twice = (Export(tmp_path / "opt", "/e"), Export(tmp_path / "opt", "/e"))
    with pytest.raises(UserError, match=r"exports\[1\]\.pseudo: /e is already exports\[0\]"):
        ganesha_config_text(_config(tmp_path, exports=twice))
    ids = (Export(tmp_path / "opt", "/a", export_id=3), Export(tmp_path / "opt", "/b", export_id=3))
    with pytest.raises(UserError, match=r"exports\[1\]\.export_id: 3 is used twice"):
        ganesha_config_text(_config(tmp_path, exports=ids))


def test_write_is_atomic_and_leaves_nothing_on_error(tmp_path: Path) -> None:
    conf = tmp_path / "ganesha.conf"
    write_ganesha_config(conf, _config(tmp_path))
    first = conf.read_text()
    assert first == ganesha_config_text(_config(tmp_path)) and oct(conf.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(UserError):
        write_ganesha_config(conf, _config(tmp_path, port=70000))
    assert conf.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ganesha.conf", "opt"]


def test_ganesha_command_is_foreground() -> None:
    cmd = ganesha_command(Path("/c/g.conf"), Path("/s/g.log"), Path("/s/g.pid"))
    assert cmd[:8] == ["ganesha.nfsd", "-F", "-L", "/s/g.log", "-f", "/c/g.conf", "-p", "/s/g.pid"]


def test_kernel_server_exports_line(tmp_path: Path) -> None:
    (tmp_path / "opt").mkdir()
    export = Export(tmp_path / "opt", "/export/opt", clients=("10.0.2.15", "192.168.0.0/16"))
    options = "ro,root_squash,no_subtree_check,sec=sys,insecure"
    assert exports_line(export) == f"{tmp_path / 'opt'} 10.0.2.15({options}) 192.168.0.0/16({options})"
    assert exportfs_commands(export)[0] == ["exportfs", "-o", options, f"10.0.2.15:{tmp_path / 'opt'}"]
    rw = Export(tmp_path / "opt", "/e", access="RW", squash="no_root_squash", privileged_port=True)
    assert exports_line(rw) == f"{tmp_path / 'opt'} *(rw,no_root_squash,no_subtree_check,sec=sys,secure)"
    assert exportfs_commands(rw) == [["exportfs", "-o", "rw,no_root_squash,no_subtree_check,sec=sys,secure",
                                      f"*:{tmp_path / 'opt'}"]]


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ganesha.nfsd") is None or os.geteuid() != 0,
                    reason="needs nfs-ganesha and root (the VFS FSAL opens files by handle)")
def test_ganesha_serves_the_written_config(tmp_path: Path) -> None:
    """The config is one ganesha accepts: it starts, listens on the port, stops on SIGTERM."""
    port = free_port()
    config = _config(tmp_path, port=port, bind_addr="127.0.0.1")
    with serve(config, tmp_path / "state") as server:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert server.process.poll() is None
    assert server.process.returncode == 0
    assert (tmp_path / "recovery" / "v4recov").is_dir()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ganesha.nfsd") is None, reason="needs nfs-ganesha")
def test_ganesha_refusing_its_config_is_one_line(tmp_path: Path) -> None:
    from dom0.nfs import start_ganesha

    conf = tmp_path / "bad.conf"
    conf.write_text("NFS_CORE_PARAM { NFS_Port = nonsense; }\n")
    with pytest.raises(EnvironmentProblem, match="ganesha.nfsd exited with status"):
        start_ganesha(conf, tmp_path / "state", port=free_port(), timeout=20)
