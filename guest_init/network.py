"""The network stage: interfaces by MAC or name, static addresses or DHCP, routes, resolv.conf.

Runs only when the plan has a ``"network"`` section (:func:`needs_network`), after
the modules stage (the NIC driver may still be probing: interfaces are waited for).
Everything happens before one deadline; a failure raises :class:`NetworkError`
whose ``details`` say which interface, what state it reached, what was tried and
the timeout, and whatever this call had already changed is undone first, so a
failed stage never leaves half of a personality's addresses behind.

Imports: the standard library (and :mod:`guest_init.plan`) at module level only.
pyroute2 is imported on first use, by :func:`_load_iproute`, which loads just its
rtnetlink modules: in pyroute2 0.9 *any* ``import pyroute2.x`` first runs
``pyroute2/__init__``, which imports every API the library has (NDB and sqlite3
included) and costs about twice the netlink modules alone.

DHCP is a small DHCPv4 client of our own (:func:`dhcp_lease`), on an AF_PACKET
socket.  Why not pyroute2's: in 0.9 it is asyncio-only (``AsyncDHCPClient``) and
built as a daemon (lease timers, renewals, signal handlers, a JSON lease file in
the working directory, a DHCPRELEASE when its context closes unless told not
to); its first retransmission waits 4 s and nothing in it follows our deadline;
and its API has changed within 0.9.x.  It does work (it got a lease from dnsmasq
in a network namespace, the same 3.0 s as ours when dnsmasq pings the address
first); ours needs no asyncio, follows the deadline, and reports what it tried.  Why AF_PACKET and not a UDP socket on
0.0.0.0:68: with no address on the interface, a kernel UDP socket only receives
the server's broadcast reply when reverse-path filtering is off (with rp_filter
on and no address, ``fib_validate_source`` drops it); dhclient, udhcpc and
systemd-networkd all use packet sockets until bound for the same reason.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import PlanError, expect_int, expect_keys, expect_object, expect_str

DEFAULT_TIMEOUT = 20.0
MAX_TIMEOUT = 3600.0
MAX_NAMESERVERS = 3  # the C library's resolver reads only the first three (MAXNS)
RESOLV_CONF = Path("/etc/resolv.conf")

#: How often link state is polled while waiting for an interface or its carrier.
POLL_INTERVAL = 0.05

IFF_UP = 0x1
RTPROT_BOOT = 3  # "proto boot" in `ip route`: installed while booting, as the kernel's ip= does
IFF_LOWER_UP = 0x10000


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class InterfaceMatch:
    """How an interface is found: by MAC (lower-case, colon-separated) or by kernel name."""

    mac: str | None = None
    name: str | None = None

    def describe(self) -> str:
        """``mac=52:54:00:12:34:56`` or ``name=eth0``: the key used in reports and errors."""
        return f"mac={self.mac}" if self.mac is not None else f"name={self.name}"


@dataclass(frozen=True)
class InterfaceConfig:
    """One interface: static ``addresses`` (``"10.0.2.15/24"``, normalised) or ``dhcp``."""

    match: InterfaceMatch
    addresses: tuple[str, ...] = ()
    dhcp: bool = False
    gateway: str | None = None
    mtu: int | None = None


@dataclass(frozen=True)
class RouteConfig:
    """An extra IPv4 route: the network ``to`` (``"192.168.0.0/16"``) through ``via``."""

    to: str
    via: str


@dataclass(frozen=True)
class NetworkConfig:
    """The plan's ``"network"`` section, validated."""

    interfaces: tuple[InterfaceConfig, ...]
    routes: tuple[RouteConfig, ...] = ()
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT


class NetworkError(Exception):
    """The network stage failed; ``details`` (JSON-ready) go into the boot report.

    Always present in ``details``: ``phase`` (``"netlink"``, ``"appear"``, ``"link"``,
    ``"carrier"``, ``"dhcp"``, ``"address"``, ``"route"``, ``"resolv.conf"``),
    ``timeout`` (seconds the stage had), ``waited`` (seconds spent), ``configured``
    (the reports of the interfaces finished before the failure) and ``rolled_back``
    (what was undone).  Per phase: ``interface`` (its match, e.g. ``"mac=..."``),
    ``state`` (what it reached: name, operstate, carrier...), ``tried``, ``seen``.
    """

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


# ------------------------------------------------------------------- plan parsing


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(value: object) -> str:
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect_list(value: object, where: str, what: str, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(where, f"expected a list of {what}, found {_shown(value)}")
    if non_empty and not value:
        raise PlanError(where, f"expected a non-empty list of {what}")
    return value


def _expect_mac(value: object, where: str) -> str:
    text = expect_str(value, where)
    parts = text.split(":")
    if len(parts) != 6 or any(len(p) != 2 or any(c not in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise PlanError(where, f'expected a MAC address like "52:54:00:12:34:56", found {_shown(text)}')
    mac = text.lower()
    if mac == "00:00:00:00:00:00" or int(parts[0], 16) & 1:
        raise PlanError(where, f"expected a unicast MAC address, found {_shown(text)}")
    return mac


def _expect_ifname(value: object, where: str) -> str:
    name = expect_str(value, where)
    if (len(name) > 15 or name in (".", "..")
            or any(c in "/:" or c.isspace() or ord(c) < 32 for c in name)):
        raise PlanError(where, "expected an interface name (at most 15 characters, no '/', ':' or "
                               f"spaces), found {_shown(name)}")
    if name == "lo":
        raise PlanError(where, 'the loopback interface "lo" is always brought up; do not list it')
    return name


def _expect_ipv4(value: object, where: str) -> ipaddress.IPv4Address:
    text = expect_str(value, where)
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise PlanError(where, f'expected an IPv4 address like "10.0.2.2", found {_shown(text)}') from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise PlanError(where, f"expected a unicast IPv4 address, found {_shown(text)}")
    return addr


def _expect_ipv4_interface(value: object, where: str) -> ipaddress.IPv4Interface:
    text = expect_str(value, where)
    try:
        if "/" not in text:
            raise ValueError
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise PlanError(where, f'expected an IPv4 address with its prefix length like "10.0.2.15/24", '
                               f"found {_shown(text)}") from None
    _expect_ipv4(str(iface.ip), where)
    net = iface.network
    if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
        which = "network" if iface.ip == net.network_address else "broadcast"
        raise PlanError(where, f"{iface.ip} is the {which} address of {net}, not a host address")
    return iface


def _expect_ipv4_network(value: object, where: str) -> ipaddress.IPv4Network:
    text = expect_str(value, where)
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError:
        pass
    try:
        fixed = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise PlanError(where, f'expected an IPv4 network like "192.168.0.0/16" or "0.0.0.0/0", '
                               f"found {_shown(text)}") from None
    raise PlanError(where, f"host bits set in {_shown(text)} (did you mean {_shown(str(fixed))}?)")


def _is_domain(name: str) -> bool:
    return (0 < len(name) <= 253 and all(1 <= len(label) <= 63 for label in name.split("."))
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in name.replace(".", "")))


def _expect_domain(value: object, where: str) -> str:
    name = expect_str(value, where).rstrip(".")
    if not _is_domain(name):
        raise PlanError(where, f'expected a domain name like "example.org", found {_shown(value)}')
    return name


def _parse_interface(value: object, where: str) -> InterfaceConfig:
    obj = expect_object(value, where)
    expect_keys(obj, where, ("match",), ("addresses", "dhcp", "gateway", "mtu"))
    mwhere = _join(where, "match")
    mobj = expect_object(obj["match"], mwhere)
    expect_keys(mobj, mwhere, (), ("mac", "name"))
    if ("mac" in mobj) == ("name" in mobj):
        raise PlanError(mwhere, 'expected exactly one of "mac" and "name"')
    if "mac" in mobj:
        match = InterfaceMatch(mac=_expect_mac(mobj["mac"], _join(mwhere, "mac")))
    else:
        match = InterfaceMatch(name=_expect_ifname(mobj["name"], _join(mwhere, "name")))

    dhcp = obj.get("dhcp", False)
    if not isinstance(dhcp, bool):
        raise PlanError(_join(where, "dhcp"), f"expected true or false, found {_shown(dhcp)}")
    addresses: list[ipaddress.IPv4Interface] = []
    if "addresses" in obj:
        raw = _expect_list(obj["addresses"], _join(where, "addresses"), "addresses", non_empty=True)
        for i, item in enumerate(raw):
            iface = _expect_ipv4_interface(item, f"{where}.addresses[{i}]")
            if any(a.ip == iface.ip for a in addresses):
                raise PlanError(f"{where}.addresses[{i}]", f"{iface.ip} is listed twice")
            addresses.append(iface)
    if dhcp == bool(addresses):
        raise PlanError(where, 'expected exactly one of "addresses" (static) and "dhcp": true')

    gateway = None
    if "gateway" in obj:
        gwhere = _join(where, "gateway")
        if dhcp:
            raise PlanError(gwhere, "not allowed with dhcp (the router comes from the lease; "
                                    'add a "routes" entry for anything else)')
        gw = _expect_ipv4(obj["gateway"], gwhere)
        if not any(gw in a.network for a in addresses):
            nets = ", ".join(str(a.network) for a in addresses)
            raise PlanError(gwhere, f"{gw} is not on the interface's networks ({nets})")
        if any(gw == a.ip for a in addresses):
            raise PlanError(gwhere, f"{gw} is one of the interface's own addresses")
        gateway = str(gw)

    mtu = None
    if "mtu" in obj:
        mtu = expect_int(obj["mtu"], _join(where, "mtu"), minimum=68)
        if mtu > 65535:
            raise PlanError(_join(where, "mtu"), f"expected an integer <= 65535, found {mtu}")
    return InterfaceConfig(match=match, addresses=tuple(str(a) for a in addresses), dhcp=dhcp,
                           gateway=gateway, mtu=mtu)


def parse_network(obj: object, where: str) -> NetworkConfig:
    """Validate the plan's network section (found at JSON path ``where``, e.g. ``"network"``).

    ``{"interfaces": [{"match": {"mac": ...} | {"name": ...}, "addresses": [...] |
    "dhcp": true, "gateway"?, "mtu"?}], "routes"?: [{"to", "via"}], "nameservers"?,
    "search"?, "timeout"? (20)}``.  Raises :class:`PlanError` naming the field.
    """
    obj = expect_object(obj, where)
    expect_keys(obj, where, ("interfaces",), ("routes", "nameservers", "search", "timeout"))

    raw_ifaces = _expect_list(obj["interfaces"], _join(where, "interfaces"), "interfaces", non_empty=True)
    interfaces: list[InterfaceConfig] = []
    seen: dict[str, int] = {}
    gateway_at: str | None = None
    for i, raw in enumerate(raw_ifaces):
        iwhere = f"{_join(where, 'interfaces')}[{i}]"
        iface = _parse_interface(raw, iwhere)
        key = iface.match.describe()
        if key in seen:
            raise PlanError(_join(iwhere, "match"), f"{key} is already matched by interfaces[{seen[key]}]")
        seen[key] = i
        if iface.gateway is not None:
            if gateway_at is not None:
                raise PlanError(_join(iwhere, "gateway"), f"a default gateway is already set by {gateway_at} "
                                                          "(there is one default route)")
            gateway_at = _join(iwhere, "gateway")
        interfaces.append(iface)

    routes: list[RouteConfig] = []
    if "routes" in obj:
        raw_routes = _expect_list(obj["routes"], _join(where, "routes"), "routes")
        targets: dict[str, int] = {}
        for i, raw in enumerate(raw_routes):
            rwhere = f"{_join(where, 'routes')}[{i}]"
            robj = expect_object(raw, rwhere)
            expect_keys(robj, rwhere, ("to", "via"))
            to = _expect_ipv4_network(robj["to"], _join(rwhere, "to"))
            via = _expect_ipv4(robj["via"], _join(rwhere, "via"))
            if str(to) in targets:
                raise PlanError(_join(rwhere, "to"), f"{to} is already routed by routes[{targets[str(to)]}]")
            if to.prefixlen == 0 and gateway_at is not None:
                raise PlanError(_join(rwhere, "to"), f"the default route is already set by {gateway_at}")
            targets[str(to)] = i
            routes.append(RouteConfig(to=str(to), via=str(via)))

    nameservers: list[str] = []
    if "nameservers" in obj:
        nwhere = _join(where, "nameservers")
        raw_ns = _expect_list(obj["nameservers"], nwhere, "addresses")
        if len(raw_ns) > MAX_NAMESERVERS:
            raise PlanError(nwhere, f"at most {MAX_NAMESERVERS} nameservers (the C library reads only "
                                    f"the first {MAX_NAMESERVERS}), found {len(raw_ns)}")
        for i, raw in enumerate(raw_ns):
            text = expect_str(raw, f"{nwhere}[{i}]")
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                raise PlanError(f"{nwhere}[{i}]", f'expected an IP address like "10.0.2.3", '
                                                  f"found {_shown(text)}") from None
            if addr.is_unspecified or addr.is_multicast:
                raise PlanError(f"{nwhere}[{i}]", f"expected a unicast address, found {_shown(text)}")
            nameservers.append(str(addr))

    search: list[str] = []
    if "search" in obj:
        swhere = _join(where, "search")
        raw_search = _expect_list(obj["search"], swhere, "domain names")
        search = [_expect_domain(s, f"{swhere}[{i}]") for i, s in enumerate(raw_search)]

    timeout = obj.get("timeout", DEFAULT_TIMEOUT)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= MAX_TIMEOUT):
        raise PlanError(_join(where, "timeout"),
                        f"expected seconds > 0 and <= {MAX_TIMEOUT:g}, found {_shown(timeout)}")

    return NetworkConfig(interfaces=tuple(interfaces), routes=tuple(routes),
                         nameservers=tuple(nameservers), search=tuple(search), timeout=float(timeout))


def needs_network(plan: object) -> bool:
    """True when the plan has a network section: the network stage runs only then."""
    return getattr(plan, "network", None) is not None


# ------------------------------------------------------------------------- netlink


def _load_iproute() -> tuple[type, type, str]:
    """``(IPRoute, NetlinkError, how)``: pyroute2's rtnetlink API, loaded as lean as possible.

    ``pyroute2/__init__`` imports every API of the library (NDB, and with it sqlite3,
    IPVS, WireGuard, nl80211...), about as much again as the rtnetlink modules.  When
    no one has imported pyroute2 yet, the package is registered without running its
    ``__init__`` (:func:`_lazy_pyroute2`), so only ``pyroute2.iproute.linux`` and what
    it needs load.  Any failure falls back to the ordinary import.  ``how`` is
    ``"lean"`` or ``"full"`` for the report.
    """
    import sys

    if "pyroute2" not in sys.modules:
        before = set(sys.modules)
        try:
            if _lazy_pyroute2():
                from pyroute2.iproute.linux import IPRoute  # type: ignore[import-untyped]
                from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

                return IPRoute, NetlinkError, "lean"
        except Exception:  # noqa: BLE001 - anything odd: forget the partial import, do it the usual way
            for name in set(sys.modules) - before:
                if name == "pyroute2" or name.startswith("pyroute2."):
                    del sys.modules[name]

    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    return IPRoute, NetlinkError, "full"


def _lazy_pyroute2() -> bool:
    """Register the ``pyroute2`` package with its ``__init__`` not run yet; False if not found.

    Submodules import normally below it.  The first access to anything else on the
    package (``pyroute2.NDB``, ``from pyroute2 import IPRoute`` elsewhere in the
    agent) runs the real ``__init__`` then, in the same module object, so other code
    sees the complete package (with the submodules already loaded bound to it).
    """
    import importlib
    import importlib.util
    import sys

    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    loader = spec.loader
    pkg = importlib.util.module_from_spec(spec)  # __path__, __spec__, __loader__; code not run

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name not in ("__all__", "__version__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")  # `from pyroute2 import config`
        pkg.__dict__.pop("__getattr__", None)
        loader.exec_module(pkg)  # the whole library, as `import pyroute2` would have
        return getattr(pkg, name)

    setattr(pkg, "__getattr__", __getattr__)  # noqa: B010 - a module-level __getattr__ (PEP 562)
    sys.modules["pyroute2"] = pkg
    return True


def _link_state(msg: Any) -> dict[str, Any]:
    flags = msg["flags"]
    return {
        "index": msg["index"],
        "name": msg.get_attr("IFLA_IFNAME"),
        "mac": (msg.get_attr("IFLA_ADDRESS") or "").lower(),
        "mtu": msg.get_attr("IFLA_MTU"),
        "operstate": msg.get_attr("IFLA_OPERSTATE"),
        "admin_up": bool(flags & IFF_UP),
        "carrier": bool(flags & IFF_LOWER_UP),
    }


def _shown_link(link: dict[str, Any]) -> dict[str, Any]:
    return {k: link[k] for k in ("name", "mac", "operstate", "carrier")}


def _errno_text(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


class _Run:
    """One call of :func:`configure_network`: the netlink socket, the clock and an undo log."""

    def __init__(self, cfg: NetworkConfig, deadline: float) -> None:
        self.cfg = cfg
        self.deadline = deadline
        self.start = time.monotonic()
        self.ipr: Any = None
        self.netlink_error: type[BaseException] = Exception
        self.undo: list[tuple[str, dict[str, Any]]] = []
        self.done: list[dict[str, Any]] = []
        self.phase = "netlink"            # what is being done, for errors
        self.current: str | None = None   # which interface (its match) or route

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 3)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fail(self, phase: str, message: str, **details: Any) -> NetworkError:
        info: dict[str, Any] = {"phase": phase, **details}
        info["timeout"] = round(self.deadline - self.start, 3)
        info["waited"] = self.elapsed()
        info["configured"] = self.done
        info["rolled_back"] = self.rollback()
        return NetworkError(message, info)

    # -- links

    def links(self) -> list[dict[str, Any]]:
        return [_link_state(m) for m in self.ipr.get_links()]

    def link(self, index: int) -> dict[str, Any]:
        return _link_state(self.ipr.link("get", index=index)[0])

    def set_link(self, index: int, **kw: Any) -> None:
        self.ipr.link("set", index=index, **kw)

    # -- changes that are undone on failure

    def add_address(self, index: int, iface: ipaddress.IPv4Interface) -> bool:
        """Add ``iface`` to the link; False when it was already there (nothing to undo)."""
        net = iface.network
        kw: dict[str, Any] = {"index": index, "address": str(iface.ip), "prefixlen": net.prefixlen}
        if net.prefixlen <= 30:
            kw["broadcast"] = str(net.broadcast_address)
        try:
            self.ipr.addr("add", **kw)
        except self.netlink_error as exc:
            if getattr(exc, "code", None) == 17:  # EEXIST: a second run, same result
                return False
            raise
        self.undo.append(("addr", {"index": index, "address": str(iface.ip), "prefixlen": net.prefixlen}))
        return True

    def add_route(self, dst: ipaddress.IPv4Network, gateway: str | None, oif: int | None = None,
                  scope: int | None = None) -> None:
        kw: dict[str, Any] = {"dst": str(dst.network_address), "dst_len": dst.prefixlen,
                              "proto": RTPROT_BOOT}
        if gateway is not None:
            kw["gateway"] = gateway
        if oif is not None:
            kw["oif"] = oif
        if scope is not None:
            kw["scope"] = scope
        self.ipr.route("replace", **kw)
        self.undo.append(("route", kw))

    def rollback(self) -> list[str]:
        """Undo this run's changes, newest first; returns what was undone (or failed to be)."""
        undone: list[str] = []
        while self.undo and self.ipr is not None:
            kind, kw = self.undo.pop()
            what = f"{kind} {_shown(kw)}"
            try:
                if kind == "addr":
                    self.ipr.addr("del", **kw)
                elif kind == "route":
                    self.ipr.route("del", **kw)
                elif kind == "up":
                    self.ipr.link("set", index=kw["index"], state="down")
                elif kind == "mtu":
                    self.ipr.link("set", index=kw["index"], mtu=kw["mtu"])
                undone.append(what)
            except Exception as exc:  # noqa: BLE001 - report, keep undoing the rest
                undone.append(f"{what}: failed: {_errno_text(exc)}")
        return undone


def _find(links: list[dict[str, Any]], match: InterfaceMatch) -> list[dict[str, Any]]:
    if match.mac is not None:
        return [ln for ln in links if ln["mac"] == match.mac and ln["name"] != "lo"]
    return [ln for ln in links if ln["name"] == match.name]


def _wait_for_interfaces(run: _Run) -> list[tuple[dict[str, Any], float]]:
    """Poll until every interface of the plan exists; ``[(link, seconds waited)]`` in plan order."""
    wanted = list(run.cfg.interfaces)
    found: dict[int, tuple[dict[str, Any], float]] = {}
    t0 = time.monotonic()
    while True:
        links = run.links()
        for i, iface in enumerate(wanted):
            if i in found:
                continue
            hits = _find(links, iface.match)
            if len(hits) > 1:
                raise run.fail("appear", f"{iface.match.describe()} is ambiguous: "
                                         f"{', '.join(h['name'] for h in hits)} all match",
                               interface=iface.match.describe(), state={"matches": [_shown_link(h) for h in hits]})
            if hits:
                found[i] = (hits[0], round(time.monotonic() - t0, 3))
        if len(found) == len(wanted):
            break
        if run.remaining() <= 0:
            missing = [wanted[i].match.describe() for i in range(len(wanted)) if i not in found]
            seen = [_shown_link(ln) for ln in links if ln["name"] != "lo"]
            shown = ", ".join(f"{s['name']} ({s['mac']})" for s in seen) or "none"
            raise run.fail("appear", f"no network interface with {', '.join(missing)} after "
                                     f"{run.elapsed():.1f} s (interfaces seen: {shown})",
                           interface=missing[0], missing=missing, seen=seen,
                           tried=f"listed the links every {POLL_INTERVAL:.2f} s")
        time.sleep(min(POLL_INTERVAL, max(run.remaining(), 0.0)))
    result = [found[i] for i in range(len(wanted))]
    indexes = [link["index"] for link, _ in result]
    for i, index in enumerate(indexes):
        if indexes.index(index) != i:
            j = indexes.index(index)
            raise run.fail("appear", f"interfaces[{j}] and interfaces[{i}] both match {result[i][0]['name']}",
                           interface=wanted[i].match.describe(), state=_shown_link(result[i][0]))
    return result


def _wait_for_carrier(run: _Run, indexes: list[int], matches: list[InterfaceMatch]) -> dict[int, float]:
    """Poll until every link has carrier (IFF_LOWER_UP); seconds waited per index."""
    waited: dict[int, float] = {}
    t0 = time.monotonic()
    while True:
        states = {index: run.link(index) for index in indexes if index not in waited}
        for index, state in states.items():
            if state["carrier"]:
                waited[index] = round(time.monotonic() - t0, 3)
        if len(waited) == len(indexes):
            return waited
        if run.remaining() <= 0:
            index = next(i for i in indexes if i not in waited)
            state = states[index]
            match = matches[indexes.index(index)]
            raise run.fail("carrier", f"{state['name']} ({match.describe()}) has no carrier after "
                                      f"{run.elapsed():.1f} s (operstate {state['operstate']})",
                           interface=match.describe(), state=state,
                           tried="set the link up, then waited for IFF_LOWER_UP")
        time.sleep(min(POLL_INTERVAL, max(run.remaining(), 0.0)))


def configure_network(cfg: NetworkConfig, *, deadline: float, resolv_conf: Path = RESOLV_CONF) -> dict[str, Any]:
    """Configure the network of ``cfg`` before ``deadline`` (a ``time.monotonic()`` value).

    Loopback up; each interface found by MAC or name (waited for), MTU set, link up,
    carrier waited for; then its static addresses and gateway, or a DHCP lease;
    then the extra routes; then ``resolv_conf`` (the plan's nameservers, else the
    leases'), written atomically.  Returns the report details (see docs/network.md);
    raises :class:`NetworkError` after undoing this call's changes.
    """
    run = _Run(cfg, deadline)
    t_import = time.monotonic()
    try:
        IPRoute, run.netlink_error, how = _load_iproute()
        import_seconds = round(time.monotonic() - t_import, 3)
        run.ipr = IPRoute(groups=0)
    except Exception as exc:  # noqa: BLE001 - no netlink, no network: say so plainly
        raise run.fail("netlink", f"cannot open rtnetlink: {_errno_text(exc)}", error=_errno_text(exc)) from None
    try:
        return _configure(run, resolv_conf, {"import": how, "seconds": import_seconds})
    except NetworkError:
        raise
    except Exception as exc:  # noqa: BLE001 - netlink refusals and the unforeseen: undo, then report
        where = f" ({run.current})" if run.current else ""
        raise run.fail(run.phase, f"network {run.phase} step failed{where}: {_errno_text(exc)}",
                       interface=run.current, error=_errno_text(exc)) from None
    finally:
        try:
            run.ipr.close()
        except Exception:  # noqa: BLE001, S110 - closing is best effort; the result stands
            pass


def _configure(run: _Run, resolv_conf: Path, pyroute2_info: dict[str, Any]) -> dict[str, Any]:
    cfg = run.cfg
    run.phase, run.current = "netlink", "lo"
    lo = [ln for ln in run.links() if ln["name"] == "lo"]
    if lo and not lo[0]["admin_up"]:
        run.set_link(lo[0]["index"], state="up")  # the kernel adds 127.0.0.1/8 itself

    run.phase, run.current = "appear", None
    found = _wait_for_interfaces(run)

    # MTU and link up for all first, so their carriers come up in parallel.
    run.phase = "link"
    for iface, (link, _) in zip(cfg.interfaces, found):
        run.current = iface.match.describe()
        if iface.mtu is not None and link["mtu"] != iface.mtu:
            run.set_link(link["index"], mtu=iface.mtu)
            run.undo.append(("mtu", {"index": link["index"], "mtu": link["mtu"]}))
        if not link["admin_up"]:
            run.set_link(link["index"], state="up")
            run.undo.append(("up", {"index": link["index"]}))
    run.phase, run.current = "carrier", None
    indexes = [link["index"] for link, _ in found]
    carrier_waits = _wait_for_carrier(run, indexes, [i.match for i in cfg.interfaces])

    plan_sets_default = any(i.gateway for i in cfg.interfaces) or any(
        ipaddress.IPv4Network(r.to).prefixlen == 0 for r in cfg.routes)
    default_route: str | None = None
    routes_report: list[dict[str, Any]] = []
    dns_from_leases: list[str] = []
    domains_from_leases: list[str] = []

    for iface, (link, appear_wait) in zip(cfg.interfaces, found):
        run.current = iface.match.describe()
        index, name = link["index"], link["name"]
        entry: dict[str, Any] = {"match": iface.match.describe(), "name": name, "index": index,
                                 "mac": link["mac"], "method": "dhcp" if iface.dhcp else "static"}
        waited = {"appear": appear_wait, "carrier": carrier_waits[index]}
        if iface.dhcp:
            run.phase = "dhcp"
            t0 = time.monotonic()
            try:
                lease = dhcp_lease(name, link["mac"], deadline=run.deadline)
            except DhcpError as exc:
                raise run.fail("dhcp", f"{name} ({iface.match.describe()}): {exc}", interface=iface.match.describe(),
                               state=run.link(index), tried=exc.details) from None
            waited["dhcp"] = round(time.monotonic() - t0, 3)
            run.phase = "address"
            addr = ipaddress.IPv4Interface(f"{lease.address}/{lease.prefixlen}")
            run.add_address(index, addr)
            entry["addresses"] = [str(addr)]
            entry["lease"] = lease.report()
            dns_from_leases += [d for d in lease.dns if d not in dns_from_leases]
            if lease.domain and lease.domain not in domains_from_leases:
                domains_from_leases.append(lease.domain)
            if lease.routers:
                router = lease.routers[0]
                if plan_sets_default:
                    entry["lease"]["router_installed"] = "no: the plan sets the default route"
                elif default_route is not None:
                    entry["lease"]["router_installed"] = f"no: the default route is already via {default_route}"
                else:
                    run.phase = "route"
                    if ipaddress.IPv4Address(router) not in addr.network:
                        # An off-link router (a /32 lease): reach it directly first.
                        run.add_route(ipaddress.IPv4Network(f"{router}/32"), None, oif=index, scope=253)
                        routes_report.append({"to": f"{router}/32", "dev": name, "source": "dhcp"})
                    run.add_route(ipaddress.IPv4Network("0.0.0.0/0"), router, oif=index)
                    default_route = f"{router} dev {name}"
                    routes_report.append({"to": "0.0.0.0/0", "via": router, "dev": name, "source": "dhcp"})
        else:
            run.phase = "address"
            for text in iface.addresses:
                run.add_address(index, ipaddress.IPv4Interface(text))
            entry["addresses"] = list(iface.addresses)
            if iface.gateway is not None:
                run.phase = "route"
                run.add_route(ipaddress.IPv4Network("0.0.0.0/0"), iface.gateway, oif=index)
                default_route = f"{iface.gateway} dev {name}"
                entry["gateway"] = iface.gateway
                routes_report.append({"to": "0.0.0.0/0", "via": iface.gateway, "dev": name, "source": "gateway"})
        state = run.link(index)
        entry["mtu"] = state["mtu"]
        entry["link"] = {"operstate": state["operstate"], "carrier": state["carrier"]}
        entry["waited"] = waited
        run.done.append(entry)

    run.phase = "route"
    for route in run.cfg.routes:
        run.current = f"route to {route.to}"
        try:
            run.add_route(ipaddress.IPv4Network(route.to), route.via)
        except run.netlink_error as exc:
            raise run.fail("route", f"route to {route.to} via {route.via}: {_errno_text(exc)}"
                                    + (" (the gateway is not on any configured network)"
                                       if getattr(exc, "code", None) == 101 else ""),
                           route={"to": route.to, "via": route.via}, error=_errno_text(exc)) from None
        routes_report.append({"to": route.to, "via": route.via, "source": "routes"})

    run.phase, run.current = "resolv.conf", str(resolv_conf)
    nameservers = list(cfg.nameservers) or dns_from_leases[:MAX_NAMESERVERS]
    search = list(cfg.search) or domains_from_leases
    written: str | None = None
    if nameservers or search:
        try:
            write_resolv_conf(resolv_conf, nameservers, search)
        except OSError as exc:
            raise run.fail("resolv.conf", f"cannot write {resolv_conf}: {exc.strerror or exc}",
                           path=str(resolv_conf), error=str(exc)) from None
        written = str(resolv_conf)

    return {
        "interfaces": run.done,
        "routes": routes_report,
        "nameservers": nameservers,
        "nameservers_from": "plan" if cfg.nameservers else ("dhcp" if nameservers else None),
        "search": search,
        "resolv_conf": written,
        "timeout": round(run.deadline - run.start, 3),
        "seconds": run.elapsed(),
        "pyroute2": pyroute2_info,
    }


def write_resolv_conf(path: Path, nameservers: list[str], search: list[str]) -> None:
    """Write resolv.conf atomically: a temporary file beside it, fsync, rename."""
    lines = ["# written by supercharge (guest_init network stage)"]
    if search:
        lines.append("search " + " ".join(search))
    lines += [f"nameserver {ns}" for ns in nameservers]
    data = ("\n".join(lines) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # tempfile would import shutil, bz2, lzma
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- DHCP

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_CSUM_VALID = 1 << 7
PACKET_OUTGOING = 4
_AUXDATA = struct.Struct("=IIIHHHH")

DHCP_MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
_MESSAGE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK"}
OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_MTU, OPT_BROADCAST = 1, 3, 6, 15, 26, 28
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_OVERLOAD, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 52, 53, 54
OPT_PARAMS, OPT_MESSAGE, OPT_MAX_SIZE, OPT_CLIENT_ID = 55, 56, 57, 61
PARAMETERS = bytes([OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_MTU, OPT_BROADCAST, OPT_LEASE_TIME,
                    OPT_SERVER_ID])

#: Retransmission: the first wait, its growth and its cap (RFC 2131 4.1 uses 4 s
#: doubling to 64 s, +-1 s; a boot wants the first retry sooner).  Jitter +-20%.
FIRST_WAIT, BACKOFF, MAX_WAIT, JITTER = 1.0, 2.0, 16.0, 0.2
#: REQUESTs sent for one OFFER before starting again with a DISCOVER.
MAX_REQUESTS = 4


class DhcpError(Exception):
    """No lease before the deadline; ``details`` say what was sent and received."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class DhcpLease:
    """What the server's ACK granted (addresses as dotted strings)."""

    address: str
    prefixlen: int
    server: str
    lease_time: int | None
    routers: tuple[str, ...]
    dns: tuple[str, ...]
    domain: str | None
    mtu: int | None
    broadcast: str | None
    seconds: float
    attempts: int

    def report(self) -> dict[str, Any]:
        return {"server": self.server, "address": f"{self.address}/{self.prefixlen}",
                "lease_time": self.lease_time, "router": self.routers[0] if self.routers else None,
                "dns": list(self.dns), "domain": self.domain, "mtu": self.mtu,
                "seconds": round(self.seconds, 3), "attempts": self.attempts}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp_ip_packet(payload: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """An IPv4 datagram carrying ``payload`` over UDP, checksums computed."""
    ulen = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, random.getrandbits(16), 0, 64,
                         socket.IPPROTO_UDP, 0, src, dst)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def _dhcp_message(kind: int, xid: int, mac: bytes, secs: int, extra: list[tuple[int, bytes]]) -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, min(secs, 0xFFFF), 0x8000,
                        bytes(4), bytes(4), bytes(4), bytes(4), mac, b"", b"")
    opts = [(OPT_MESSAGE_TYPE, bytes([kind])), (OPT_CLIENT_ID, b"\x01" + mac),
            (OPT_MAX_SIZE, struct.pack("!H", 1500)), (OPT_PARAMS, PARAMETERS), *extra]
    body = b"".join(bytes([code, len(value)]) + value for code, value in opts) + b"\xff"
    msg = fixed + DHCP_MAGIC + body
    return msg + bytes(max(0, 300 - len(msg)))  # BOOTP's minimum; some relays drop shorter


def _parse_options(data: bytes, into: dict[int, bytes]) -> None:
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= len(data):
            return
        length = data[i + 1]
        value = data[i + 2:i + 2 + length]
        into[code] = into.get(code, b"") + value  # RFC 3396: split options concatenate
        i += 2 + length


def _parse_dhcp(payload: bytes, xid: int, mac: bytes) -> tuple[int, str, dict[int, bytes]] | None:
    """``(message type, yiaddr, options)`` for a reply to us, else None."""
    if len(payload) < 240 or payload[0] != 2 or payload[236:240] != DHCP_MAGIC:
        return None
    rxid, = struct.unpack_from("!I", payload, 4)
    if rxid != xid or payload[28:34] != mac:
        return None
    options: dict[int, bytes] = {}
    _parse_options(payload[240:], options)
    overload = options.get(OPT_OVERLOAD, b"\0")[0]
    if overload & 1:
        _parse_options(payload[108:236], options)
    if overload & 2:
        _parse_options(payload[44:108], options)
    kind = options.get(OPT_MESSAGE_TYPE, b"\0")[0]
    return kind, socket.inet_ntoa(payload[16:20]), options


def _udp_payload(packet: bytes, aux_status: int) -> bytes | None:
    """The payload of a UDP datagram to port 68 in an IPv4 packet, or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total, = struct.unpack_from("!H", packet, 2)
    frag, = struct.unpack_from("!H", packet, 6)
    if packet[9] != socket.IPPROTO_UDP or frag & 0x3FFF or ihl < 20 or total > len(packet) or total < ihl + 8:
        return None
    if _checksum(packet[:ihl]) != 0:
        return None
    _sport, dport, ulen, csum = struct.unpack_from("!HHHH", packet, ihl)
    if dport != 68 or ulen < 8 or ihl + ulen > total:
        return None
    udp = packet[ihl:ihl + ulen]
    # A checksum is only checked when the kernel has neither verified it nor left it to
    # the NIC (CHECKSUM_PARTIAL on veth, virtio, xen-netfront: the field is not final yet).
    if csum and not aux_status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID):
        pseudo = packet[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
        if _checksum(pseudo + udp) != 0:
            return None
    return udp[8:]


def _ips(value: bytes | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(socket.inet_ntoa(value[i:i + 4]) for i in range(0, len(value) - len(value) % 4, 4))


def _waits():
    """Seconds before each retransmission: exponential, jittered, capped."""
    wait = FIRST_WAIT
    while True:
        yield wait * random.uniform(1 - JITTER, 1 + JITTER)
        wait = min(wait * BACKOFF, MAX_WAIT)


def dhcp_lease(ifname: str, mac: str, *, deadline: float) -> DhcpLease:
    """Obtain a DHCPv4 lease on ``ifname`` (link up, no address needed) before ``deadline``.

    DISCOVER, first OFFER, REQUEST, ACK; broadcast flag set, everything sent to
    255.255.255.255 from 0.0.0.0 on an AF_PACKET socket bound to the interface.
    Unanswered messages are retransmitted (1 s doubling to 16 s, +-20%); a NAK or
    four unanswered REQUESTs start again with a new transaction.  Raises
    :class:`DhcpError` at the deadline.
    """
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6:
        raise DhcpError(f"{ifname} has no Ethernet address ({mac!r})", {"mac": mac})
    start = time.monotonic()
    log: dict[str, Any] = {"discover_sent": 0, "request_sent": 0, "offers": [], "naks": [], "ignored": 0}
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    except OSError as exc:
        raise DhcpError(f"cannot open a packet socket: {exc.strerror or exc}", log) from None
    try:
        sock.bind((ifname, ETH_P_IP))
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setblocking(False)
        return _dhcp_exchange(sock, ifname, hw, start, deadline, log)
    except OSError as exc:
        raise DhcpError(f"DHCP on {ifname}: {exc.strerror or exc}", log) from None
    finally:
        sock.close()


def _dhcp_exchange(sock: socket.socket, ifname: str, hw: bytes, start: float, deadline: float,
                   log: dict[str, Any]) -> DhcpLease:
    broadcast_to = (ifname, ETH_P_IP, 0, 0, b"\xff" * 6)
    zero, everyone = bytes(4), b"\xff" * 4
    attempts = 0

    def send(kind: int, xid: int, extra: list[tuple[int, bytes]]) -> None:
        nonlocal attempts
        msg = _dhcp_message(kind, xid, hw, int(time.monotonic() - start), extra)
        sock.sendto(_udp_ip_packet(msg, zero, everyone, 68, 67), broadcast_to)
        attempts += 1
        log["discover_sent" if kind == DISCOVER else "request_sent"] += 1

    while True:  # one transaction per turn: DISCOVER, OFFER, REQUEST, ACK
        xid = random.getrandbits(32)
        offered = offer_server = ""  # set once an OFFER is taken: then we are "requesting"
        offer_opts: dict[int, bytes] = {}
        requests = 0
        waits = _waits()
        send(DISCOVER, xid, [])
        resend_at = time.monotonic() + next(waits)
        restart = False
        while not restart:
            now = time.monotonic()
            if now >= deadline:
                reason = (f"an offer of {offered} from {offer_server} but no DHCPACK" if offer_server
                          else "no DHCPOFFER")
                log["state"] = "requesting" if offer_server else "selecting"
                log["seconds"] = round(now - start, 3)
                raise DhcpError(f"no DHCP lease after {now - start:.1f} s ({reason}; sent "
                                f"{log['discover_sent']} DISCOVER, {log['request_sent']} REQUEST)", log)
            if now >= resend_at:
                if offer_server and requests >= MAX_REQUESTS:
                    break  # the server went quiet: start again with a DISCOVER
                if offer_server:
                    send(REQUEST, xid, _request_options(offered, offer_server))
                    requests += 1
                else:
                    send(DISCOVER, xid, [])
                resend_at = time.monotonic() + next(waits)
                continue
            ready, _, _ = select.select([sock], [], [], max(0.0, min(resend_at, deadline) - now))
            if not ready:
                continue
            while True:
                try:
                    packet, ancdata, _flags, addr = sock.recvmsg(4096, socket.CMSG_SPACE(_AUXDATA.size))
                except BlockingIOError:
                    break
                if len(addr) > 2 and addr[2] == PACKET_OUTGOING:
                    continue
                status = 0
                for level, kind, data in ancdata:
                    if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
                        status = _AUXDATA.unpack_from(data)[0]
                payload = _udp_payload(packet, status)
                if payload is None:
                    continue  # not a UDP datagram to port 68
                reply = _parse_dhcp(payload, xid, hw)
                if reply is None:
                    log["ignored"] += 1  # someone else's transaction, or not DHCP
                    continue
                kind, yiaddr, opts = reply
                sid = opts.get(OPT_SERVER_ID, b"")
                server = socket.inet_ntoa(sid[:4]) if len(sid) >= 4 else None
                if kind == OFFER and not offer_server and server and yiaddr != "0.0.0.0":
                    log["offers"].append({"server": server, "address": yiaddr})
                    offered, offer_server, offer_opts, requests = yiaddr, server, opts, 0
                    waits = _waits()
                    send(REQUEST, xid, _request_options(offered, offer_server))
                    requests += 1
                    resend_at = time.monotonic() + next(waits)
                elif kind == ACK and offer_server and server in (None, offer_server):
                    merged = {**offer_opts, **opts}
                    return _lease(yiaddr, offer_server, merged, time.monotonic() - start, attempts)
                elif kind == NAK and offer_server and server in (None, offer_server):
                    message = opts.get(OPT_MESSAGE, b"").decode("utf-8", "replace")
                    log["naks"].append({"server": offer_server, "message": message})
                    restart = True
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                    break
                else:
                    log["ignored"] += 1


def _request_options(address: str, server: str) -> list[tuple[int, bytes]]:
    return [(OPT_REQUESTED_IP, socket.inet_aton(address)), (OPT_SERVER_ID, socket.inet_aton(server))]


def _lease(address: str, server: str, opts: dict[int, bytes], seconds: float, attempts: int) -> DhcpLease:
    mask = opts.get(OPT_SUBNET)
    if mask and len(mask) == 4:
        try:
            prefixlen = ipaddress.IPv4Network(f"0.0.0.0/{socket.inet_ntoa(mask)}").prefixlen
        except ValueError:
            prefixlen = 32
    else:  # no mask offered: the address class's (RFC 2131 leaves it to the client)
        first = int(address.split(".")[0])
        prefixlen = 8 if first < 128 else 16 if first < 192 else 24
    lease_time = struct.unpack("!I", opts[OPT_LEASE_TIME][:4])[0] if len(opts.get(OPT_LEASE_TIME, b"")) >= 4 else None
    mtu = struct.unpack("!H", opts[OPT_MTU][:2])[0] if len(opts.get(OPT_MTU, b"")) >= 2 else None
    # Only a plain domain name is kept: the value ends up in resolv.conf.
    words = opts.get(OPT_DOMAIN, b"").rstrip(b"\0").decode("ascii", "replace").split()
    domain = words[0].rstrip(".") if words and _is_domain(words[0].rstrip(".")) else None
    broadcast = _ips(opts.get(OPT_BROADCAST))
    return DhcpLease(address=address, prefixlen=prefixlen, server=server, lease_time=lease_time,
                     routers=_ips(opts.get(OPT_ROUTER)), dns=_ips(opts.get(OPT_DNS)), domain=domain, mtu=mtu,
                     broadcast=broadcast[0] if broadcast else None, seconds=seconds, attempts=attempts)
