"""Patch application figures: our engine against GNU patch, side by side in one run.

    .venv/bin/python bench/patch_bench.py [--small N] [--hunks N] [--repeat R] [--dir DIR]

1. Many small patches, the size of real personality changes to /etc (a user
   added to passwd/shadow/group/gshadow, hostname and hosts, an sshd_config
   option), applied one after the other to a copy of an /etc-sized tree (this
   machine's /etc plus synthesised account and ssh files).  Ours: every patch
   through ``apply_patch`` in one process, as the agent does at boot (each
   commit fsyncs its files); GNU patch: one ``patch -p1`` process per patch,
   as a shell script would run it.
2. One large patch (about 10,000 hunks over a few hundred files), once on the
   exact base and once on a base drifted by lines inserted at the top of
   every file (every hunk needs an offset).  Ours: one ``apply_patch`` call;
   GNU patch: one process.

Both trees are compared after every run: the numbers only count if the
results are identical.  Patches are written by GNU ``diff -u``, so the
inputs are independent of our own diff generator.  Timings are the best of
``--repeat`` runs, with the median beside it: this kind of machine's speed
varies by up to half from one minute to the next, so only the two engines
run side by side, in turns, compare (the large patch's two bases and three
runs take turns at going first: a run made soon after many trees were
removed is slower on ext4).  ``--dir /dev/shm`` puts the trees on a
tmpfs: the engines' own work without a disk file system's costs (which are
the same for both, but vary with what was recently deleted there).
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from guest_init.patch import apply_patch  # noqa: E402

GNU = ["patch", "-p1", "-s", "-f", "--fuzz", "2", "--no-backup-if-mismatch", "-r", "-"]


class Best:
    """Best wall-clock and CPU time (ours plus child processes') over repeated runs.

    CPU time is shown next to wall time because this machine may be shared:
    other load inflates wall time for both sides alike, CPU time much less.
    """

    def __init__(self) -> None:
        self.cpu = float("inf")
        self.walls: list[float] = []

    @contextmanager
    def run(self):  # type: ignore[no-untyped-def]
        # Every run starts with nothing dirty in the page cache: the trees were just
        # copied, and whoever runs first would otherwise pay for their write-back.
        os.sync()
        c0 = time.process_time() + _children_cpu()
        w0 = time.perf_counter()
        yield
        self.walls.append(time.perf_counter() - w0)
        self.cpu = min(self.cpu, time.process_time() + _children_cpu() - c0)

    @property
    def wall(self) -> float:
        return min(self.walls, default=float("inf"))

    @property
    def median(self) -> float:
        return statistics.median_high(self.walls)

    def __str__(self) -> str:
        return (f"{self.wall * 1000:7.1f} ms wall (median {self.median * 1000:6.1f}), "
                f"{self.cpu * 1000:7.1f} ms CPU")


def paired(ours: Best, gnu: Best) -> str:
    """The ratio of the two runs of each repetition (made within a second): median and quartiles.

    This machine's speed drifts and has bursts of slowness that hit one run
    and not the next; a ratio of neighbouring runs cancels the drift, and the
    median of such ratios ignores the bursts (which tend to hit the longer
    run more often, so the ratio of the two medians can overstate the gap).
    """
    ratios = sorted(o / g for o, g in zip(ours.walls, gnu.walls))
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"median {q2:.2f}x (quartiles {q1:.2f}x-{q3:.2f}x, {len(ratios)} pairs)"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def no_disk_flush():
    """Our engine with syncfs/fsync turned into no-ops: GNU patch never flushes to disk,
    so this is the like-for-like figure (the real one, with the flush, is printed too)."""
    import guest_init.patch.tree as tree

    saved = tree._syncfs
    tree._syncfs = lambda fd: 0
    try:
        yield
    finally:
        tree._syncfs = saved


# ----------------------------------------------------------------- trees


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path).encode(), 0)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", path.read_bytes(), st.st_mode & 0o111)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", b"", 0)
    return out


def copy_real_etc(dest: Path) -> int:
    """Readable regular files and symlinks of this machine's /etc (no secrets needed)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk("/etc"):
        rel = os.path.relpath(dirpath, "/etc")
        for name in filenames:
            src = Path(dirpath) / name
            dst = dest / rel / name
            try:
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISREG(st.st_mode) and st.st_size < 1_000_000:
                    data = src.read_bytes()
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(data)
                else:
                    continue
            except OSError:
                continue
            count += 1
    return count


SSHD_OPTIONS = [
    ("Port", ["22", "2222"]), ("PermitRootLogin", ["prohibit-password", "no", "yes"]),
    ("PasswordAuthentication", ["yes", "no"]), ("X11Forwarding", ["yes", "no"]),
    ("MaxAuthTries", ["3", "6"]), ("ClientAliveInterval", ["0", "120", "300"]),
    ("AllowTcpForwarding", ["yes", "no"]), ("LogLevel", ["INFO", "VERBOSE"]),
    ("UseDNS", ["no", "yes"]), ("MaxSessions", ["10", "4"]),
]


def synth_etc(root: Path, rng: random.Random) -> None:
    """Account, host and ssh files shaped like a real Debian system's."""
    system = ["root:x:0:0:root:/root:/bin/bash", "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
              "bin:x:2:2:bin:/bin:/usr/sbin/nologin", "sys:x:3:3:sys:/dev:/usr/sbin/nologin",
              "sync:x:4:65534:sync:/bin:/bin/sync", "games:x:5:60:games:/usr/games:/usr/sbin/nologin",
              "man:x:6:12:man:/var/cache/man:/usr/sbin/nologin", "lp:x:7:7:lp:/var/spool/lpd:/usr/sbin/nologin",
              "mail:x:8:8:mail:/var/mail:/usr/sbin/nologin", "news:x:9:9:news:/var/spool/news:/usr/sbin/nologin",
              "www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin",
              "backup:x:34:34:backup:/var/backups:/usr/sbin/nologin",
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
              "systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin",
              "messagebus:x:100:107::/nonexistent:/usr/sbin/nologin",
              "sshd:x:101:65534::/run/sshd:/usr/sbin/nologin"]
    users = [f"user{i}:x:{1000 + i}:{1000 + i}:User {i},,,:/home/user{i}:/bin/bash" for i in range(12)]
    passwd = system + users
    (root / "passwd").write_text("\n".join(passwd) + "\n")
    (root / "shadow").write_text("".join(
        f"{line.split(':')[0]}:{'*' if int(line.split(':')[2]) < 1000 else '$y$j9T$' + '%016x' % rng.getrandbits(64)}"
        f":19700:0:99999:7:::\n" for line in passwd))
    groups = [f"{line.split(':')[0]}:x:{line.split(':')[3]}:" for line in passwd]
    groups += ["sudo:x:27:user0,user1", "adm:x:4:syslog,user0", "users:x:100:"]
    (root / "group").write_text("\n".join(groups) + "\n")
    (root / "gshadow").write_text("".join(f"{g.split(':')[0]}:*::\n" for g in groups))
    (root / "hostname").write_text("base-image\n")
    (root / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tbase-image\n\n"
                                "# The following lines are desirable for IPv6 capable hosts\n"
                                "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n"
                                "ff02::2 ip6-allrouters\n")
    ssh = root / "ssh"
    ssh.mkdir(exist_ok=True)
    body = ["# This is the sshd server system-wide configuration file.  See",
            "# sshd_config(5) for more information.", "", "Include /etc/ssh/sshd_config.d/*.conf", ""]
    for k, (opt, values) in enumerate(SSHD_OPTIONS):
        body += [f"#{opt} {values[0]}", f"{opt} {values[0]}" if k % 2 else f"#{opt}Extra no", ""]
        body += [f"# comment line {k}.{j} about the option above" for j in range(6)] + [""]
    body += ["AcceptEnv LANG LC_*", "Subsystem\tsftp\t/usr/lib/openssh/sftp-server"]
    (ssh / "sshd_config").write_text("\n".join(body) + "\n")


def mutate_etc(root: Path, rng: random.Random, step: int) -> None:
    """One personality-sized change: a user, a host name, an ssh option, or a hosts entry."""
    kind = rng.choice(["user", "user", "hostname", "sshd", "hosts"])
    if kind == "user":
        name = f"svc{step}"
        uid = 2000 + step
        for fname, line in (("passwd", f"{name}:x:{uid}:{uid}:Service {step}:/srv/{name}:/usr/sbin/nologin"),
                            ("shadow", f"{name}:!:19800:0:99999:7:::"), ("group", f"{name}:x:{uid}:"),
                            ("gshadow", f"{name}:!::")):
            path = root / fname
            lines = path.read_text().splitlines()
            lines.insert(rng.randint(len(lines) // 2, len(lines)), line)
            path.write_text("\n".join(lines) + "\n")
    elif kind == "hostname":
        new = f"web{step}"
        old = (root / "hostname").read_text().strip()
        (root / "hostname").write_text(new + "\n")
        (root / "hosts").write_text((root / "hosts").read_text().replace(f"\t{old}\n", f"\t{new}\n"))
    elif kind == "sshd":
        path = root / "ssh" / "sshd_config"
        lines = path.read_text().splitlines()
        opt, values = rng.choice(SSHD_OPTIONS)
        for k, line in enumerate(lines):
            if line.split(" ")[0] in (opt, "#" + opt):
                lines[k] = f"{opt} {rng.choice(values)}"
                break
        path.write_text("\n".join(lines) + "\n")
    else:
        path = root / "hosts"
        lines = path.read_text().splitlines()
        lines.insert(2, f"10.0.{step // 250}.{step % 250 + 1}\tnode{step}")
        path.write_text("\n".join(lines) + "\n")


def diff_u(old_root: Path, new_root: Path, names: list[str]) -> bytes:
    """A multi-file patch written by GNU diff -u, with a/ and b/ prefixes."""
    out = []
    for name in names:
        proc = subprocess.run(["diff", "-u", "--label", f"a/{name}", "--label", f"b/{name}",
                               str(old_root / name), str(new_root / name)], capture_output=True)
        if proc.returncode == 1:
            out.append(proc.stdout)
    return b"".join(out)


# ------------------------------------------------------------- benches


def bench_small(workdir: Path, count: int, repeat: int) -> None:
    rng = random.Random(2005)
    base = workdir / "etc-base"
    base.mkdir()
    real = copy_real_etc(base)
    synth_etc(base, rng)
    states = workdir / "states"
    shutil.copytree(base, states, symlinks=True)
    prev = workdir / "prev"
    shutil.copytree(base, prev, symlinks=True)
    names = ["passwd", "shadow", "group", "gshadow", "hostname", "hosts", "ssh/sshd_config"]
    patches = []
    for step in range(count):
        patch = b""
        while not patch:  # a change that changed nothing (an option set to its value) is redrawn
            mutate_etc(states, rng, step)
            patch = diff_u(prev, states, names)
        for name in names:
            shutil.copy2(states / name, prev / name)
        patches.append(patch)
    files = sum(1 for _ in base.rglob("*"))
    sizes = sorted(len(p) for p in patches)
    hunks = sum(p.count(b"\n@@ ") for p in patches)
    print(f"1. {count} small patches on an /etc-sized tree ({files} entries, {real} copied from /etc; "
          f"patches {sizes[0]}-{sizes[-1]} bytes, median {sizes[len(sizes) // 2]}, {hunks} hunks)")

    ours_t, noflush_t, gnu_t = Best(), Best(), Best()
    for _ in range(repeat):
        ours, noflush, gnu = workdir / "ours", workdir / "noflush", workdir / "gnu"
        for d in (ours, noflush, gnu):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d, symlinks=True)
        with ours_t.run():
            for k, patch in enumerate(patches):
                result = apply_patch(patch, ours, source=f"patch-{k}")
                if result.status != "applied":
                    raise SystemExit(f"ours failed on patch {k}:\n{result.render()}")
        with no_disk_flush(), noflush_t.run():
            for k, patch in enumerate(patches):
                apply_patch(patch, noflush, source=f"patch-{k}")
        with gnu_t.run():
            for k, patch in enumerate(patches):
                proc = subprocess.run(GNU, input=patch, cwd=gnu, capture_output=True)
                if proc.returncode != 0:
                    raise SystemExit(f"GNU patch failed on patch {k}: {proc.stdout!r}")
        if not snapshot(ours) == snapshot(noflush) == snapshot(gnu) == snapshot(states):
            raise SystemExit("RESULTS DIFFER between our engine and GNU patch")
    print(f"   ours, one process, flushed to disk:    {ours_t}  "
          f"({ours_t.wall / count * 1000:.2f} ms per patch)")
    print(f"   ours, no flush (like GNU patch):       {noflush_t}  "
          f"({noflush_t.wall / count * 1000:.2f} ms per patch)")
    print(f"   GNU patch, one process per patch:      {gnu_t}  "
          f"({gnu_t.wall / count * 1000:.2f} ms per patch)")
    print(f"   GNU/ours: {gnu_t.wall / ours_t.wall:.1f}x wall ({gnu_t.wall / noflush_t.wall:.1f}x without "
          f"the flush), {gnu_t.cpu / ours_t.cpu:.1f}x CPU; results identical")


def bench_large(workdir: Path, target_hunks: int, repeat: int) -> None:
    rng = random.Random(1984)
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    sources = [p for p in sources if 20_000 < p.stat().st_size < 200_000]
    old, new = workdir / "large-old", workdir / "large-new"
    hunks_per_file = 40
    nfiles = max(1, target_hunks // hunks_per_file)
    names = []
    for k in range(nfiles):
        src = sources[k % len(sources)]
        name = f"d{k % 17}/{k}-{src.name}"
        lines = src.read_bytes().splitlines(keepends=True)
        edited = list(lines)
        step = max(8, len(lines) // (hunks_per_file + 1))
        for pos in range(len(lines) - step // 2, 0, -step):  # bottom up, spaced beyond the context
            op = rng.random()
            if op < 0.5:
                edited[pos] = b"# changed: " + edited[pos]
            elif op < 0.8:
                edited.insert(pos, b"# inserted %d\n" % rng.randrange(10**6))
            else:
                del edited[pos]
        for root, data in ((old, b"".join(lines)), (new, b"".join(edited))):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        names.append(name)
    patch = diff_u(old, new, names)
    hunks = patch.count(b"\n@@ ")
    print(f"2. one large patch: {hunks} hunks over {nfiles} files, {len(patch) / 1e6:.1f} MB")

    drifted = workdir / "large-drifted"
    shutil.copytree(old, drifted)
    for name in names:
        path = drifted / name
        path.write_bytes(b"# local header line\n" * rng.randint(1, 9) + path.read_bytes())

    bases = (("exact base", old), ("drifted base, every hunk offset", drifted))
    timers = {label: (Best(), Best(), Best()) for label, _ in bases}
    ours, noflush, gnu = workdir / "l-ours", workdir / "l-noflush", workdir / "l-gnu"

    def run_ours(timer: Best) -> None:
        with timer.run():
            result = apply_patch(patch, ours, source="large.diff")
        if result.status != "applied":
            raise SystemExit(f"ours failed:\n{result.render()[:3000]}")

    def run_noflush(timer: Best) -> None:
        with no_disk_flush(), timer.run():
            apply_patch(patch, noflush, source="large.diff")

    def run_gnu(timer: Best) -> None:
        with timer.run():
            proc = subprocess.run(GNU, input=patch, cwd=gnu, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"GNU patch failed: {proc.stdout[:2000]!r}")

    engines = [run_ours, run_noflush, run_gnu]
    for rep in range(repeat):
        # Both bases in every repetition, each in turn first, and each engine in turn
        # first: a run made soon after many trees were removed is slower (ext4 then
        # takes longer to allocate inodes), so no base and no engine always comes last.
        for label, base in bases if rep % 2 == 0 else bases[::-1]:
            for d in (ours, noflush, gnu):
                shutil.rmtree(d, ignore_errors=True)
                shutil.copytree(base, d)
            runs = list(zip(engines, timers[label]))
            turn = rep % len(runs)
            for engine, timer in runs[turn:] + runs[:turn]:
                engine(timer)
            if not snapshot(ours) == snapshot(noflush) == snapshot(gnu):
                raise SystemExit(f"RESULTS DIFFER between our engine and GNU patch ({label})")
    for label, _ in bases:
        ours_t, noflush_t, gnu_t = timers[label]
        print(f"   {label}:")
        print(f"      ours, flushed to disk:         {ours_t}")
        print(f"      ours, no flush (like GNU):     {noflush_t}")
        print(f"      GNU patch:                     {gnu_t}")
        print(f"      ours/GNU: {ours_t.wall / gnu_t.wall:.2f}x wall ({noflush_t.wall / gnu_t.wall:.2f}x "
              f"without the flush; medians {ours_t.median / gnu_t.median:.2f}x and "
              f"{noflush_t.median / gnu_t.median:.2f}x), {noflush_t.cpu / gnu_t.cpu:.2f}x CPU; results identical")
        print(f"      paired runs (ours without the flush / GNU, same repetition): "
              f"{paired(noflush_t, gnu_t)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200, help="number of small patches")
    parser.add_argument("--hunks", type=int, default=10_000, help="hunks in the large patch")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement (best, median and, for the large patch, "
                             "paired ratios are shown)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the trees live (default: the temporary directory); "
                             "e.g. /dev/shm to compare the engines' CPU work without a disk's costs")
    parser.add_argument("--cpu", type=int, default=None,
                        help="the one CPU both engines run on (default: the last one allowed; "
                             "-1: wherever the scheduler puts them)")
    args = parser.parse_args()
    if shutil.which("patch") is None or shutil.which("diff") is None:
        print("GNU patch and diff are needed for the comparison", file=sys.stderr)
        return 3
    # Both engines on one CPU (GNU patch inherits it): neither is moved between CPUs
    # mid-run, nor shares its cache with the other's leftovers on a second one.  On a
    # two-CPU virtual machine this narrows the paired ratios' quartiles about threefold.
    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    print(subprocess.run(["patch", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
          f"| Python {sys.version.split()[0]} | {f'CPU {cpu}' if cpu >= 0 else 'any CPU'}")
    with tempfile.TemporaryDirectory(prefix="patch-bench-", dir=args.dir) as tmp:
        fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", tmp], capture_output=True,
                                text=True).stdout.split("\n")[0].strip() or "unknown"
        print(f"trees in {tmp} ({fstype})")
        bench_small(Path(tmp), args.small, args.repeat)
        bench_large(Path(tmp), args.hunks, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
