"""The network stage, for real: veth pairs between network namespaces, dnsmasq as DHCP server.

Each test gets two fresh namespaces (``lab``): the guest side ``lab.guest`` with one
end of a veth (``lab.ifname``, MAC ``lab.mac``), and the server side ``lab.server``
with the other end, addressed ``10.66.0.1/24``.  The code under test runs inside
the guest namespace in a subprocess (``ip netns exec``), exactly as the agent
would call it, and the result is checked with ``ip -n NS -j addr/route``.
Namespaces, veths and dnsmasq are removed when the test ends, failed or not.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest_init.network import (
    DEFAULT_TIMEOUT,
    InterfaceConfig,
    InterfaceMatch,
    NetworkConfig,
    RouteConfig,
    needs_network,
    parse_network,
    write_resolv_conf,
)
from guest_init.plan import PlanError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (ip netns, veth)"),
]

SERVER_ADDR = "10.66.0.1"
PY = sys.executable

# Run inside the guest namespace: parse the section, configure, print one JSON line.
RUNNER = r"""
import json, sys, time
from pathlib import Path
from guest_init.network import NetworkError, configure_network, parse_network
cfg = parse_network(json.loads(sys.argv[1]), "network")
t0 = time.monotonic()
try:
    out = {"ok": configure_network(cfg, deadline=t0 + cfg.timeout, resolv_conf=Path(sys.argv[2]))}
except NetworkError as exc:
    out = {"error": str(exc), "details": exc.details}
out["elapsed"] = time.monotonic() - t0
out["heavy_modules"] = sorted(m for m in ("pyroute2.ndb", "sqlite3") if m in sys.modules)
print(json.dumps(out))
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def ip_json(ns: str, *args: str) -> list:
    return json.loads(ip("-n", ns, "-j", *args).stdout or "[]")


@dataclass
class Lab:
    guest: str
    server: str
    ifname: str
    peer: str
    mac: str
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def move_guest_end(self) -> None:
        ip("link", "set", self.ifname, "netns", self.guest)

    def peer_up(self) -> None:
        ip("-n", self.server, "link", "set", self.peer, "up")

    def configure(self, network: dict, *, timeout: float = 60) -> dict:
        """Run configure_network in the guest namespace; the parsed JSON line it printed."""
        return self.finish(self.start_configure(network), timeout=timeout)

    def start_configure(self, network: dict) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.guest, PY, "-c", RUNNER, json.dumps(network),
                                 str(self.tmp / "resolv.conf")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 60) -> dict:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{err}"
        return json.loads(out.strip().splitlines()[-1])

    def addresses(self) -> list[str]:
        info = ip_json(self.guest, "addr", "show", "dev", self.ifname)
        return [f"{a['local']}/{a['prefixlen']}" for a in info[0]["addr_info"] if a["family"] == "inet"]

    def link(self) -> dict:
        return ip_json(self.guest, "link", "show", "dev", self.ifname)[0]

    def routes(self) -> list[dict]:
        return ip_json(self.guest, "route", "show")

    def start_dnsmasq(self, *extra: str) -> Path:
        """dnsmasq serving 10.66.0.50-99 on the server end; returns its log once it listens."""
        log = self.tmp / "dnsmasq.log"
        with log.open("w") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.server, "timeout", "120", "dnsmasq", "--no-daemon",
                 "--conf-file=/dev/null", f"--interface={self.peer}", "--bind-interfaces", "--port=0",
                 # --no-ping: otherwise dnsmasq pings a fresh address for 3 s before offering it
                 "--no-ping", "--dhcp-authoritative", "--dhcp-range=10.66.0.50,10.66.0.99,255.255.255.0,1h",
                 f"--dhcp-option=option:router,{SERVER_ADDR}", "--dhcp-option=option:dns-server,10.66.0.53",
                 "--dhcp-option=option:domain-name,lab.example", f"--dhcp-leasefile={self.tmp / 'leases'}",
                 f"--pid-file={self.tmp / 'dnsmasq.pid'}", *extra],
                stdout=subprocess.DEVNULL, stderr=log_file)
        self.procs.append(proc)
        end = time.monotonic() + 10
        while "sockets bound" not in log.read_text():
            assert proc.poll() is None, f"dnsmasq exited: {log.read_text()}"
            assert time.monotonic() < end, f"dnsmasq did not start: {log.read_text()}"
            time.sleep(0.02)
        return log


@pytest.fixture
def lab(tmp_path):
    tag = secrets.token_hex(3)
    guest, server = f"scn{tag}g", f"scn{tag}s"
    ifname, peer = f"scn{tag}g", f"scn{tag}s"   # 10 characters, below IFNAMSIZ
    mac = "02:5c:" + ":".join(secrets.token_hex(1) for _ in range(4))
    made: list[str] = []
    lab = Lab(guest, server, ifname, peer, mac, tmp_path)
    try:
        for ns in (guest, server):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", ifname, "address", mac, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", server)
        ip("-n", server, "addr", "add", f"{SERVER_ADDR}/24", "dev", peer)
        ip("-n", server, "link", "set", "lo", "up")
        yield lab
    finally:
        for proc in lab.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        ip("link", "del", ifname, check=False)  # still in the root namespace if never moved
        for ns in made:
            ip("netns", "del", ns, check=False)


@pytest.fixture
def ready_lab(lab):
    """The guest end in the guest namespace (still down), the server end up."""
    lab.move_guest_end()
    lab.peer_up()
    return lab


def _assert_rolled_back(lab: Lab) -> None:
    assert lab.addresses() == []
    assert "UP" not in lab.link()["flags"]
    assert [r for r in lab.routes() if r.get("dev") == lab.ifname] == []


# ------------------------------------------------------------------ static


def test_static_by_mac(ready_lab):
    lab = ready_lab
    network = {
        "interfaces": [{"match": {"mac": lab.mac.upper()}, "addresses": ["10.66.0.2/24", "10.66.7.2/24"],
                        "gateway": SERVER_ADDR, "mtu": 1400}],
        "routes": [{"to": "192.168.0.0/16", "via": SERVER_ADDR}],
        "nameservers": ["10.66.0.53", "2001:db8::53"],
        "search": ["example.org", "lab.example"],
        "timeout": 10,
    }
    out = lab.configure(network)
    assert "ok" in out, out
    rep = out["ok"]
    assert out["heavy_modules"] == [], "pyroute2 pulled in NDB/sqlite3"
    assert rep["pyroute2"]["import"] == "lean"

    assert sorted(lab.addresses()) == ["10.66.0.2/24", "10.66.7.2/24"]
    link = lab.link()
    assert link["mtu"] == 1400 and "LOWER_UP" in link["flags"]
    routes = {r["dst"]: r for r in lab.routes()}
    assert routes["default"]["gateway"] == SERVER_ADDR and routes["default"]["dev"] == lab.ifname
    assert routes["192.168.0.0/16"]["gateway"] == SERVER_ADDR
    assert (lab.tmp / "resolv.conf").read_text().splitlines()[1:] == [
        "search example.org lab.example", "nameserver 10.66.0.53", "nameserver 2001:db8::53"]
    assert ip_json(lab.guest, "addr", "show", "dev", "lo")[0]["operstate"] == "UNKNOWN"  # lo is up

    (entry,) = rep["interfaces"]
    assert entry["name"] == lab.ifname and entry["mac"] == lab.mac and entry["method"] == "static"
    assert entry["match"] == f"mac={lab.mac}"
    assert entry["addresses"] == ["10.66.0.2/24", "10.66.7.2/24"] and entry["gateway"] == SERVER_ADDR
    assert entry["mtu"] == 1400 and entry["link"] == {"operstate": "UP", "carrier": True}
    assert set(entry["waited"]) == {"appear", "carrier"}
    assert {"to": "192.168.0.0/16", "via": SERVER_ADDR, "source": "routes"} in rep["routes"]
    assert rep["nameservers"] == ["10.66.0.53", "2001:db8::53"] and rep["nameservers_from"] == "plan"
    assert rep["resolv_conf"] == str(lab.tmp / "resolv.conf") and rep["timeout"] == 10

    # A second run (the agent restarted, the same plan) converges instead of failing.
    again = lab.configure(network)
    assert "ok" in again, again
    assert sorted(lab.addresses()) == ["10.66.0.2/24", "10.66.7.2/24"]


def test_static_by_name_waits_for_the_interface_to_appear(lab):
    lab.peer_up()
    network = {"interfaces": [{"match": {"name": lab.ifname}, "addresses": ["10.66.0.3/24"]}], "timeout": 15}
    proc = lab.start_configure(network)
    time.sleep(1.5)  # the "driver" is still probing (the runner starts in about 0.3 s)
    lab.move_guest_end()
    out = lab.finish(proc)
    assert "ok" in out, out
    assert lab.addresses() == ["10.66.0.3/24"]
    (entry,) = out["ok"]["interfaces"]
    assert entry["waited"]["appear"] > 0  # it was not there at the first look
    assert out["ok"]["resolv_conf"] is None and not (lab.tmp / "resolv.conf").exists()


# ------------------------------------------------------------------ DHCP


@pytest.fixture
def dnsmasq_available():
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not installed (apt-get install dnsmasq-base)")


def test_dhcp_lease_from_dnsmasq(ready_lab, dnsmasq_available):
    lab = ready_lab
    log = lab.start_dnsmasq()
    out = lab.configure({"interfaces": [{"match": {"mac": lab.mac}, "dhcp": True}], "search": ["override.example"],
                         "timeout": 20})
    assert "ok" in out, (out, log.read_text())
    rep = out["ok"]
    (entry,) = rep["interfaces"]
    lease = entry["lease"]
    print(f"\ntime to first DHCP lease: {entry['waited']['dhcp']:.3f} s "
          f"(exchange {lease['seconds']:.3f} s, {lease['attempts']} messages sent); stage {rep['seconds']:.3f} s")
    assert entry["method"] == "dhcp"
    assert lease["server"] == SERVER_ADDR and lease["router"] == SERVER_ADDR and lease["lease_time"] == 3600
    assert lease["dns"] == ["10.66.0.53"] and lease["domain"] == "lab.example"
    (addr,) = lab.addresses()
    assert addr == lease["address"] == entry["addresses"][0]
    assert addr.endswith("/24") and 50 <= int(addr.split("/")[0].split(".")[3]) <= 99
    default = next(r for r in lab.routes() if r["dst"] == "default")
    assert default["gateway"] == SERVER_ADDR and default["dev"] == lab.ifname
    assert rep["nameservers"] == ["10.66.0.53"] and rep["nameservers_from"] == "dhcp"
    # Nameservers from the lease, search domains from the plan (it wins over the lease's domain).
    assert (lab.tmp / "resolv.conf").read_text().splitlines()[1:] == [
        "search override.example", "nameserver 10.66.0.53"]
    assert f"DHCPACK({lab.peer}) {addr.split('/')[0]} {lab.mac}" in log.read_text()


def test_dhcp_without_a_server_fails_before_the_deadline_and_rolls_back(ready_lab):
    lab = ready_lab
    out = lab.configure({"interfaces": [{"match": {"name": lab.ifname}, "dhcp": True, "mtu": 1280}], "timeout": 3})
    assert "error" in out, out
    d = out["details"]
    assert d["phase"] == "dhcp" and d["interface"] == f"name={lab.ifname}" and d["timeout"] == 3
    assert d["tried"]["discover_sent"] >= 2 and d["tried"]["offers"] == []
    assert d["state"]["carrier"] is True
    assert "no DHCPOFFER" in out["error"]
    assert out["elapsed"] < 3 + 1.0
    _assert_rolled_back(lab)
    assert lab.link()["mtu"] == 1500  # the MTU change was undone too


def test_dhcp_retransmits_until_the_server_answers(ready_lab, dnsmasq_available):
    lab = ready_lab
    proc = lab.start_configure({"interfaces": [{"match": {"name": lab.ifname}, "dhcp": True}], "timeout": 20})
    end = time.monotonic() + 15
    while "UP" not in lab.link()["flags"]:  # the stage sets the link up just before DHCP
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.02)
    time.sleep(1.0)  # the first DISCOVER goes unanswered
    lab.start_dnsmasq()
    out = lab.finish(proc)
    assert "ok" in out, out
    lease = out["ok"]["interfaces"][0]["lease"]
    assert lease["attempts"] >= 3 and lease["server"] == SERVER_ADDR and lease["seconds"] >= 1.0


# A scripted DHCP server for what dnsmasq will not do on demand: NAK the first REQUEST,
# then grant a /32 lease with an off-link router, the domain name in the overloaded
# "file" field (option 52).  It prints what it received as JSON.
FAKE_SERVER = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.bind(("0.0.0.0", 67))
s.settimeout(20)
print("listening", flush=True)
seen, naks = [], 0
def opts(data):
    out, i = {}, 0
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        out[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return out
def opt(code, value):
    return bytes([code, len(value)]) + value
while True:
    data, _ = s.recvfrom(2048)
    o = opts(data[240:])
    kind = o[53][0]
    seen.append({"type": kind, "flags": struct.unpack("!H", data[10:12])[0], "client_id": o.get(61, b"").hex(),
                 "requested": socket.inet_ntoa(o[50]) if 50 in o else None})
    if kind == 1:
        reply, extra, file = 2, b"", b""
    elif kind == 3 and naks == 0:
        naks, reply, extra, file = 1, 6, opt(56, b"try again"), b""
    elif kind == 3:
        reply, extra, file = 5, opt(52, b"\x01"), opt(15, b"fake.example") + b"\xff"
    else:
        continue
    yiaddr = socket.inet_aton("10.66.0.77") if reply != 6 else bytes(4)
    msg = bytes([2, 1, 6, 0]) + data[4:8] + bytes(8) + yiaddr + bytes(8) + data[28:44] + bytes(64)
    msg += file.ljust(128, b"\0") + bytes.fromhex("63825363")
    msg += opt(53, bytes([reply])) + opt(54, socket.inet_aton("10.66.0.1")) + extra
    if reply != 6:
        msg += opt(51, struct.pack("!I", 600)) + opt(1, socket.inet_aton("255.255.255.255"))
        msg += opt(3, socket.inet_aton("10.66.0.1")) + opt(6, socket.inet_aton("10.66.0.53") + socket.inet_aton("10.66.0.54"))
    s.sendto(msg + b"\xff", ("255.255.255.255", 68))
    if reply == 5:
        print(json.dumps(seen), flush=True)
        break
"""


def test_dhcp_nak_restarts_and_off_link_router(ready_lab):
    lab = ready_lab
    server = subprocess.Popen(["ip", "netns", "exec", lab.server, "timeout", "60", PY, "-c", FAKE_SERVER, lab.peer],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(server)
    assert server.stdout.readline().strip() == "listening", server.stderr.read()
    out = lab.configure({"interfaces": [{"match": {"mac": lab.mac}, "dhcp": True}], "timeout": 15})
    assert "ok" in out, out
    seen = json.loads(server.stdout.readline())
    # DISCOVER, REQUEST (NAKed), then a new DISCOVER and REQUEST; always broadcast, client id = 01 + MAC.
    assert [m["type"] for m in seen] == [1, 3, 1, 3]
    assert all(m["flags"] & 0x8000 and m["client_id"] == "01" + lab.mac.replace(":", "") for m in seen)
    assert seen[1]["requested"] == seen[3]["requested"] == "10.66.0.77"
    lease = out["ok"]["interfaces"][0]["lease"]
    assert lease["address"] == "10.66.0.77/32" and lease["lease_time"] == 600
    assert lease["dns"] == ["10.66.0.53", "10.66.0.54"] and lease["domain"] == "fake.example"
    assert lab.addresses() == ["10.66.0.77/32"]
    routes = {r["dst"]: r for r in lab.routes()}
    assert routes["10.66.0.1"]["scope"] == "link" and routes["default"]["gateway"] == SERVER_ADDR
    assert (lab.tmp / "resolv.conf").read_text().splitlines()[1:] == [
        "search fake.example", "nameserver 10.66.0.53", "nameserver 10.66.0.54"]


# ------------------------------------------------------------------ failures


def test_link_that_never_comes_up(lab):
    lab.move_guest_end()  # the peer stays down: no carrier, ever
    out = lab.configure({"interfaces": [{"match": {"mac": lab.mac}, "addresses": ["10.66.0.4/24"]}], "timeout": 1.5})
    assert "error" in out, out
    d = out["details"]
    assert d["phase"] == "carrier" and d["interface"] == f"mac={lab.mac}"
    assert d["state"]["name"] == lab.ifname and d["state"]["carrier"] is False
    assert d["state"]["operstate"] in ("LOWERLAYERDOWN", "DOWN")
    assert "no carrier" in out["error"] and d["timeout"] == 1.5
    assert 1.5 <= out["elapsed"] < 1.5 + 1.0
    _assert_rolled_back(lab)


def test_interface_that_never_appears(ready_lab):
    lab = ready_lab
    out = lab.configure({"interfaces": [{"match": {"mac": "02:00:00:00:00:99"}, "dhcp": True}], "timeout": 1})
    assert "error" in out, out
    d = out["details"]
    assert d["phase"] == "appear" and d["missing"] == ["mac=02:00:00:00:00:99"]
    assert {"name": lab.ifname, "mac": lab.mac} in [{k: s[k] for k in ("name", "mac")} for s in d["seen"]]
    assert lab.ifname in out["error"] and out["elapsed"] < 1 + 1.0


def test_unreachable_route_undoes_the_addresses(ready_lab):
    lab = ready_lab
    out = lab.configure({"interfaces": [{"match": {"name": lab.ifname}, "addresses": ["10.66.0.5/24"],
                                         "gateway": SERVER_ADDR}],
                         "routes": [{"to": "172.16.0.0/12", "via": "10.99.0.1"}], "nameservers": ["10.66.0.53"],
                         "timeout": 5})
    assert "error" in out, out
    d = out["details"]
    assert d["phase"] == "route" and d["route"] == {"to": "172.16.0.0/12", "via": "10.99.0.1"}
    assert "not on any configured network" in out["error"]
    assert len(d["configured"]) == 1 and len(d["rolled_back"]) == 3  # route, address, link up
    _assert_rolled_back(lab)
    assert not (lab.tmp / "resolv.conf").exists()


# ------------------------------------------------------------------ plan section


def test_parse_valid_section():
    cfg = parse_network({
        "interfaces": [
            {"match": {"mac": "52:54:00:12:34:56"}, "addresses": ["10.0.2.15/24"], "gateway": "10.0.2.2",
             "mtu": 1500},
            {"match": {"name": "eth1"}, "dhcp": True},
        ],
        "routes": [{"to": "192.168.0.0/16", "via": "10.0.2.2"}],
        "nameservers": ["10.0.2.3"],
        "search": ["example.org."],
    }, "network")
    assert cfg == NetworkConfig(
        interfaces=(InterfaceConfig(match=InterfaceMatch(mac="52:54:00:12:34:56"), addresses=("10.0.2.15/24",),
                                    gateway="10.0.2.2", mtu=1500),
                    InterfaceConfig(match=InterfaceMatch(name="eth1"), dhcp=True)),
        routes=(RouteConfig(to="192.168.0.0/16", via="10.0.2.2"),),
        nameservers=("10.0.2.3",), search=("example.org",), timeout=DEFAULT_TIMEOUT)
    assert parse_network({"interfaces": [{"match": {"name": "eth0"}, "dhcp": True}], "timeout": 2.5},
                         "network").timeout == 2.5


IFACE = {"match": {"name": "eth0"}, "addresses": ["10.0.2.15/24"]}


@pytest.mark.parametrize("section, field, words", [
    ([], "network", "expected an object"),
    ({}, "network.interfaces", "missing"),
    ({"interfaces": [IFACE], "dns": []}, "network.dns", "unknown key"),
    ({"interfaces": []}, "network.interfaces", "non-empty"),
    ({"interfaces": [{"addresses": ["10.0.2.15/24"]}]}, "network.interfaces[0].match", "missing"),
    ({"interfaces": [{"match": {}, "dhcp": True}]}, "network.interfaces[0].match", "exactly one"),
    ({"interfaces": [{"match": {"mac": "52:54:00:12:34"}, "dhcp": True}]},
     "network.interfaces[0].match.mac", "MAC address"),
    ({"interfaces": [{"match": {"mac": "01:00:5e:00:00:01"}, "dhcp": True}]},
     "network.interfaces[0].match.mac", "unicast"),
    ({"interfaces": [{"match": {"name": "a/b"}, "dhcp": True}]}, "network.interfaces[0].match.name", "interface name"),
    ({"interfaces": [{"match": {"name": "averyveryverylongname"}, "dhcp": True}]},
     "network.interfaces[0].match.name", "15"),
    ({"interfaces": [{"match": {"name": "eth0"}}]}, "network.interfaces[0]", "exactly one"),
    ({"interfaces": [{"match": {"name": "eth0"}, "dhcp": True, "addresses": ["10.0.2.15/24"]}]},
     "network.interfaces[0]", "exactly one"),
    ({"interfaces": [{"match": {"name": "eth0"}, "dhcp": "yes"}]}, "network.interfaces[0].dhcp", "true or false"),
    ({"interfaces": [{"match": {"name": "eth0"}, "addresses": ["10.0.2.15"]}]},
     "network.interfaces[0].addresses[0]", "prefix length"),
    ({"interfaces": [{"match": {"name": "eth0"}, "addresses": ["10.0.2.0/24"]}]},
     "network.interfaces[0].addresses[0]", "network address"),
    ({"interfaces": [{"match": {"name": "eth0"}, "addresses": ["fe80::1/64"]}]},
     "network.interfaces[0].addresses[0]", "IPv4"),
    ({"interfaces": [{"match": {"name": "eth0"}, "addresses": "10.0.2.15/24"}]},
     "network.interfaces[0].addresses", "list"),
    ({"interfaces": [dict(IFACE, gateway="10.0.3.2")]}, "network.interfaces[0].gateway", "not on the interface"),
    ({"interfaces": [{"match": {"name": "eth0"}, "dhcp": True, "gateway": "10.0.2.2"}]},
     "network.interfaces[0].gateway", "not allowed with dhcp"),
    ({"interfaces": [dict(IFACE, mtu=40)]}, "network.interfaces[0].mtu", ">= 68"),
    ({"interfaces": [dict(IFACE, mtu="1500")]}, "network.interfaces[0].mtu", "integer"),
    ({"interfaces": [IFACE, dict(IFACE, addresses=["10.0.3.15/24"])]}, "network.interfaces[1].match",
     "already matched"),
    ({"interfaces": [dict(IFACE, gateway="10.0.2.2"),
                     {"match": {"name": "eth1"}, "addresses": ["10.0.3.1/24"], "gateway": "10.0.3.2"}]},
     "network.interfaces[1].gateway", "already set"),
    ({"interfaces": [IFACE], "routes": [{"to": "192.168.1.0/16", "via": "10.0.2.2"}]},
     "network.routes[0].to", "192.168.0.0/16"),
    ({"interfaces": [IFACE], "routes": [{"to": "192.168.0.0/16"}]}, "network.routes[0].via", "missing"),
    ({"interfaces": [IFACE], "routes": [{"to": "192.168.0.0/16", "via": "gw"}]}, "network.routes[0].via", "IPv4"),
    ({"interfaces": [dict(IFACE, gateway="10.0.2.2")], "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.3"}]},
     "network.routes[0].to", "default route"),
    ({"interfaces": [IFACE], "nameservers": ["10.0.2.3", "1.1.1.1", "8.8.8.8", "9.9.9.9"]},
     "network.nameservers", "at most 3"),
    ({"interfaces": [IFACE], "nameservers": ["dns.example"]}, "network.nameservers[0]", "IP address"),
    ({"interfaces": [IFACE], "search": ["bad domain"]}, "network.search[0]", "domain name"),
    ({"interfaces": [IFACE], "timeout": 0}, "network.timeout", "seconds"),
    ({"interfaces": [IFACE], "timeout": True}, "network.timeout", "seconds"),
])
def test_parse_invalid_section_names_the_field(section, field, words):
    with pytest.raises(PlanError) as info:
        parse_network(section, "network")
    assert info.value.field == field, str(info.value)
    assert words in info.value.problem


def test_needs_network():
    class P:
        network = None

    assert not needs_network(P()) and not needs_network(object())
    P.network = parse_network({"interfaces": [IFACE]}, "network")
    assert needs_network(P())


def test_resolv_conf_is_replaced_atomically(tmp_path):
    target = tmp_path / "etc" / "resolv.conf"
    write_resolv_conf(target, ["10.0.2.3"], [])
    write_resolv_conf(target, ["10.0.2.4"], ["example.org"])
    assert target.read_text().splitlines()[1:] == ["search example.org", "nameserver 10.0.2.4"]
    assert [p.name for p in target.parent.iterdir()] == ["resolv.conf"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_import_is_light():
    """Importing the module (as the agent does at start) loads only the standard library."""
    proc = subprocess.run([PY, "-X", "importtime", "-c", "import guest_init.network"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")][1:]
    modules = {row[2].strip() for row in rows}
    heavy = {m for m in modules if m.split(".")[0] in {"pyroute2", "asyncio", "sqlite3", "requests", "cryptography",
                                                        "ssl", "dom0", "unittest"}}
    assert heavy == set()
    total_us = sum(int(row[1]) for row in rows if row[2] == " guest_init.network")
    print(f"\nimport guest_init.network: {total_us / 1000:.1f} ms cumulative, {len(modules)} modules")


def test_lean_pyroute2_import_keeps_the_package_whole():
    """The stage loads only pyroute2's rtnetlink modules; later users still get all of pyroute2."""
    script = r"""
import sys
from guest_init.network import _load_iproute
IPRoute, NetlinkError, how = _load_iproute()
with IPRoute(groups=0) as ipr:
    assert any(m.get_attr("IFLA_IFNAME") == "lo" for m in ipr.get_links())
assert how == "lean", how
assert "pyroute2.ndb" not in sys.modules and "sqlite3" not in sys.modules
import pyroute2, pyroute2.iproute
from pyroute2 import NDB, IPRoute as Again
assert Again is IPRoute and pyroute2.iproute.IPRoute is IPRoute and "pyroute2.ndb" in sys.modules
assert _load_iproute() == (IPRoute, NetlinkError, "full")
print("ok")
"""
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
