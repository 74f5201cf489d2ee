"""Container processing figures: 100 domains' /etc derived from one base archive, in one invocation.

    .venv/bin/python bench/container_bench.py [--domains 100] [--files 400] [--profile] [--keep DIR]

The base is an /etc-sized tree (a few hundred files, about 3 MiB: accounts,
hosts, a CA bundle, service and package configuration), archived by GNU cpio
and gzip and served over HTTP on 127.0.0.1, as a canonical image would be.
Each domain has its own container file:

    [replace /etc/hostname archive BASE ...] [end]         its name
    [replace /etc/hosts archive BASE ...] [end]            its address
    [patch BASE PATCH fork file:///.../domNNN-etc.cpio.gz] [end]
                                                           its account added to passwd and
                                                           group (a small patch, over HTTP),
                                                           then its /etc forked to its own archive

All the containers are processed in one invocation (one Workspace, as
``supercharge container *.ct`` does), timed one by one.  Printed: time for the
first domain (which fetches and expands the base), time per domain after the
first (the target is under 0.1 s), the bytes each domain adds (its forked
archive and config, and the part of it that differs from the base), and how
many times the base was fetched (HTTP GETs seen by the server) and expanded
(calls to the archive extractor): once each.

Every fork is checked afterwards: the figures only count if each domain's
/etc is the base plus exactly its own changes.
"""
from __future__ import annotations

import argparse
import cProfile
import difflib
import gzip
import http.server
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import guest_init.archive as archive_module
from dom0.container.parse import load_container
from dom0.container.process import Workspace, process_container

TARGET = 0.1  # seconds per domain after the first

# Lines of the kind /etc is made of; files are drawn from them with varied numbers and names,
# so the tree compresses and costs zlib about what a real /etc does.
LINES = """\
# This file is part of the configuration of {name}; see {name}.conf(5) for details.
# Uncomment the following line to enable {name} on boot.
# The default is to listen on all interfaces; restrict it with ListenAddress.
#
#   This program is free software; you can redistribute it and/or modify
#   it under the terms of the GNU General Public License as published by
#   the Free Software Foundation; either version 2 of the License, or
#   (at your option) any later version.
Port {n}
ListenAddress 0.0.0.0
PermitRootLogin prohibit-password
PasswordAuthentication no
session    required   pam_unix.so
session    optional   pam_systemd.so
auth       [success=1 default=ignore]   pam_unix.so nullok
account    required   pam_permit.so
net.ipv4.conf.all.rp_filter = {b}
net.ipv4.ip_forward = {b}
kernel.printk = 3 4 1 3
options {name} max_loop={n} debug={b}
blacklist {name}
alias net-pf-{n} off
[Unit]
Description={Name} daemon ({n})
After=network-online.target {name}.socket
[Service]
ExecStart=/usr/sbin/{name} --foreground --config /etc/{name}/{name}.conf
Restart=on-failure
RestartSec={n}
[Install]
WantedBy=multi-user.target
{n} {n} * * * root test -x /usr/sbin/{name} && /usr/sbin/{name} --cron
/var/log/{name}/*.log {{
    daily
    rotate {n}
    compress
    missingok
}}
{name}\t{n}/tcp\t\t\t# {Name} service
{name}\t{n}/udp
application/x-{name}\t\t\t\t{name} {name}z
if [ -x /usr/bin/{name} ]; then
    . /etc/default/{name}
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
deb http://deb.debian.org/debian bookworm main contrib
APT::Periodic::Update-Package-Lists "{b}";
<Directory /var/www/{name}>
    Options Indexes FollowSymLinks
    AllowOverride None
    Require all granted
</Directory>
""".splitlines()
NAMES = ["ssh", "sshd", "cron", "rsyslog", "apache2", "nginx", "postfix", "dovecot", "ntp", "chrony", "systemd", "udev", "dbus", "network", "resolv", "logrotate", "apt", "dpkg", "pam", "sudo", "bash", "vim", "mysql", "redis", "memcached", "haproxy", "bind9", "dnsmasq", "nfs", "rpcbind", "snmpd", "zabbix", "munin", "nagios", "puppet", "salt", "docker", "lxc"]


def text_blob(rng: random.Random, size: int) -> bytes:
    """Config-file-like text of ``size`` bytes, drawn from LINES."""
    name = rng.choice(NAMES)
    out, n = [], 0
    while n < size:
        if rng.random() < 0.1:
            name = rng.choice(NAMES)
        line = rng.choice(LINES).format(name=name, Name=name.capitalize(), n=rng.randint(1, 65535),
                                        b=rng.randint(0, 1))
        out.append(line)
        n += len(line) + 1
    return ("\n".join(out) + "\n").encode()[:size]


def pem_bundle(rng: random.Random, size: int) -> bytes:
    """A CA bundle: PEM blocks of random base64, as incompressible as real certificates."""
    import base64

    out, n = [], 0
    while n < size:
        body = base64.b64encode(rng.randbytes(1100)).decode()
        block = ("-----BEGIN CERTIFICATE-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
                 + "\n-----END CERTIFICATE-----\n")
        out.append(block)
        n += len(block)
    return "".join(out).encode()[:size]


def accounts(n_system: int) -> tuple[bytes, bytes, bytes]:
    names = ["root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
             "proxy", "www-data", "backup", "list", "irc", "_apt", "nobody", "systemd-network",
             "systemd-resolve", "messagebus", "sshd", "ntp", "postfix", "syslog"]
    names = (names + [f"svc{i}" for i in range(n_system)])[:n_system]
    passwd, group, shadow = [], [], []
    for uid, name in enumerate(names):
        uid = 65534 if name == "nobody" else uid
        passwd.append(f"{name}:x:{uid}:{uid}:{name}:/var/lib/{name}:/usr/sbin/nologin")
        group.append(f"{name}:x:{uid}:")
        shadow.append(f"{name}:*:19700:0:99999:7:::")
    return tuple(("\n".join(lines) + "\n").encode() for lines in (passwd, group, shadow))  # type: ignore[return-value]


def make_etc(root: Path, n_files: int, seed: int = 2005) -> tuple[int, int]:
    """An /etc-like tree of about ``n_files`` files; returns (files, bytes)."""
    rng = random.Random(seed)
    passwd, group, shadow = accounts(30)
    fixed = {
        "hostname": b"template\n",
        "hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "passwd": passwd, "group": group, "shadow": shadow, "gshadow": shadow,
        "ssl/certs/ca-certificates.crt": pem_bundle(rng, 220_000),
        "services": text_blob(rng, 12_000),
        "mime.types": text_blob(rng, 60_000),
        "ld.so.cache": rng.randbytes(40_000),
    }
    dirs = ["apt/apt.conf.d", "apt/sources.list.d", "ssh", "ssl/private", "default", "init.d",
            "systemd/system", "systemd/network", "security/limits.d", "pam.d", "cron.d", "cron.daily",
            "logrotate.d", "network/if-up.d", "sysctl.d", "modprobe.d", "profile.d", "sudoers.d",
            "udev/rules.d", "dpkg/dpkg.cfg.d", "fonts/conf.d", "X11/Xsession.d", "kernel/postinst.d",
            "alternatives", "rc0.d", "rc1.d", "rc2.d", "rc3.d", "ca-certificates/update.d", "apache2/conf",
            "apache2/sites-available", "apache2/mods-available", "postfix", "selinux", "vim"]
    total = 0
    for rel, data in fixed.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    os.chmod(root / "shadow", 0o640)
    os.chmod(root / "gshadow", 0o640)
    count = len(fixed)
    while count < n_files:
        d = rng.choice(dirs)
        path = root / d / f"{rng.choice(NAMES)}-{count}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = min(int(rng.lognormvariate(8.3, 1.2)), 120_000)
        data = text_blob(rng, size)
        path.write_bytes(data)
        if d in ("init.d", "cron.daily", "network/if-up.d", "kernel/postinst.d"):
            os.chmod(path, 0o755)
        total += len(data)
        count += 1
    for i, target in enumerate(sorted((root / "init.d").iterdir())[:20]):
        os.symlink(f"../init.d/{target.name}", root / "rc2.d" / f"S{i:02d}{target.name}")
    os.symlink("/usr/share/zoneinfo/Etc/UTC", root / "localtime")
    return count, total


def gnu_cpio_gz(tree: Path, out: Path) -> None:
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=names,
                          capture_output=True, check=True).stdout
    out.write_bytes(gzip.compress(data, compresslevel=6))


# -- the per-domain personality ---------------------------------------------------------


def domain_name(i: int) -> str:
    return f"dom{i:03d}"


def account_patch(passwd: bytes, group: bytes, i: int) -> bytes:
    name = domain_name(i)
    out = []
    for rel, old, line in (("passwd", passwd, f"{name}:x:{2000 + i}:{2000 + i}:{name}:/srv/{name}:/bin/sh\n"),
                           ("group", group, f"{name}:x:{2000 + i}:\n")):
        a = old.decode().splitlines(keepends=True)
        out += difflib.unified_diff(a, a + [line], f"a/{rel}", f"b/{rel}")
    return "".join(out).encode()


def container_text(i: int, base: str, patch: str, fork: Path) -> str:
    name = domain_name(i)
    return f"""\
name = "{name}"
memory = 256
vcpus = 1
disk = [ "format=raw, vdev=xvda, access=ro, target=/var/images/root.img" ]

[replace /etc/hostname archive {base}

{name}
] [end]

[replace /etc/hosts archive {base}

127.0.0.1\tlocalhost
10.1.{i // 250}.{i % 250 + 1}\t{name}.example.org {name}
] [end]

[patch {base} {patch}
 fork file://{fork}
][end]
"""


# -- a counting HTTP server -------------------------------------------------------------


class Server:
    def __init__(self, root: Path) -> None:
        self.gets: dict[str, int] = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.gets[self.path] = server.gets.get(self.path, 0) + 1
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- checking ---------------------------------------------------------------------------


def tree_files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = b"-> " + os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--files", type=int, default=400, help="files in the base /etc tree")
    parser.add_argument("--profile", action="store_true",
                        help="profile the domains after the first (cProfile, top functions)")
    parser.add_argument("--suffix", default=".cpio.gz", choices=(".cpio.gz", ".cpio.zst", ".cpio.xz", ".cpio"),
                        help="the forks' suffix, which chooses their compression (default: gzip, as the paper)")
    parser.add_argument("--keep", help="work here and keep everything (default: a temporary directory)")
    args = parser.parse_args()
    for tool in ("cpio", "find"):
        if shutil.which(tool) is None:
            print(f"container_bench: '{tool}' is needed", file=sys.stderr)
            return 3

    top = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="container-bench-"))
    top.mkdir(parents=True, exist_ok=True)
    try:
        return run(top, args)
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)


def run(top: Path, args: argparse.Namespace) -> int:
    etc, www, out, cts = top / "src" / "etc", top / "www", top / "out", top / "containers"
    for d in (www / "patches", out, cts):
        d.mkdir(parents=True, exist_ok=True)
    n_files, n_bytes = make_etc(etc, args.files)
    gnu_cpio_gz(etc, www / "etc.cpio.gz")
    base_size = (www / "etc.cpio.gz").stat().st_size
    passwd, group = (etc / "passwd").read_bytes(), (etc / "group").read_bytes()
    server = Server(www)
    base_uri = server.url + "etc.cpio.gz"
    files = []
    for i in range(args.domains):
        name = domain_name(i)
        (www / "patches" / f"{name}.patch").write_bytes(account_patch(passwd, group, i))
        path = cts / f"{name}.ct"
        path.write_text(container_text(i, base_uri, f"{server.url}patches/{name}.patch",
                                       out / f"{name}-etc{args.suffix}"))
        files.append(path)

    expansions: list[str] = []
    real_extract = archive_module.extract_archive

    def counting_extract(archive, dest, **kw):
        expansions.append(str(archive))
        return real_extract(archive, dest, **kw)

    archive_module.extract_archive = counting_extract
    profiler = cProfile.Profile() if args.profile else None
    times: list[float] = []
    try:
        started = time.perf_counter()
        containers = [load_container(f) for f in files]      # as the CLI does: parse all first
        parse_seconds = time.perf_counter() - started
        workspace = Workspace(top / "work")
        for i, container in enumerate(containers):
            t0 = time.perf_counter()
            if profiler is not None and i > 0:
                profiler.enable()
            result = process_container(container, workspace)
            if profiler is not None and i > 0:
                profiler.disable()
            (out / f"{domain_name(i)}.cfg").write_text(result.stripped)
            times.append(time.perf_counter() - t0)
        del workspace, result          # its spare working copies are removed here: counted in the total
        total = time.perf_counter() - started
    finally:
        archive_module.extract_archive = real_extract
        server.close()

    # Check every fork: the base plus exactly this domain's changes.
    base_files = tree_files(etc)
    personality: list[int] = []
    stored: list[int] = []
    check = top / "check"
    for i in range(args.domains):
        name = domain_name(i)
        fork = out / f"{name}-etc{args.suffix}"
        shutil.rmtree(check, ignore_errors=True)
        real_extract(fork, check)
        got = tree_files(check)
        patched_passwd = passwd + f"{name}:x:{2000 + i}:{2000 + i}:{name}:/srv/{name}:/bin/sh\n".encode()
        expected = dict(base_files)
        expected.update({
            "hostname": f"{name}\n".encode(),
            "hosts": f"127.0.0.1\tlocalhost\n10.1.{i // 250}.{i % 250 + 1}\t{name}.example.org {name}\n".encode(),
            "passwd": patched_passwd,
            "group": group + f"{name}:x:{2000 + i}:\n".encode(),
        })
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            print(f"container_bench: {name}: the fork differs from the expected /etc at {wrong[:5]}",
                  file=sys.stderr)
            return 1
        personality.append(sum(len(v) for k, v in got.items() if base_files.get(k) != v))
        stored.append(fork.stat().st_size + (out / f"{name}.cfg").stat().st_size)

    after_first = times[1:] or times
    per_domain = statistics.mean(after_first)
    base_gets = server.gets.get("/etc.cpio.gz", 0)
    print(f"base /etc: {n_files} files, {human(n_bytes)}; archive {human(base_size)} (cpio newc, gzip), over HTTP")
    print(f"domains: {args.domains} containers in one invocation (one Workspace); parsing all: "
          f"{parse_seconds:.3f} s")
    print(f"first domain (fetches and expands the base): {times[0]:.3f} s")
    print(f"per domain after the first: mean {per_domain:.4f} s, median {statistics.median(after_first):.4f} s, "
          f"p90 {sorted(after_first)[int(0.9 * (len(after_first) - 1))]:.4f} s, max {max(after_first):.4f} s")
    print(f"total: {total:.2f} s for {args.domains} domains")
    print(f"new bytes per domain: {human(statistics.mean(stored))} stored (its forked /etc archive and "
          f"its config); {statistics.mean(personality):.0f} B of it differ from the base "
          f"(hostname, hosts, passwd, group)")
    print(f"base fetched {base_gets} time(s), expanded {len(expansions)} time(s)")
    ok = per_domain < TARGET and base_gets == 1 and len(expansions) == 1
    print(f"target: under {TARGET} s per domain after the first, base fetched and expanded once: "
          f"{'met' if ok else 'NOT met'}")
    if profiler is not None:
        print("\nprofile of the domains after the first (cumulative):")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(25)
        print("profile (own time):")
        stats.sort_stats("tottime").print_stats(15)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
