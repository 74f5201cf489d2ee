"""Prehashed signature verification of a 1 GiB image: ours against ``minisign -V``, side by side.

    .venv/bin/python bench/verify_bench.py [--size-mib 1024] [--runs 3] [--dir DIR]

Makes an image of random data (1 MiB of os.urandom repeated: incompressible to any
cache or file system, and no sparse holes that would make reading free), signs it
prehashed with a fresh key, then times in one interleaved loop, so that machine
load hits every contender alike:

  minisign      ``minisign -V -p KEY.pub -m IMAGE`` (libsodium's BLAKE2b, C);
  in-process    ``guest_init.trust.verify_file`` (what the agent and dom0 call);
  cli           ``supercharge verify IMAGE -p KEY.pub`` in a fresh interpreter,
                start-up included.

The file is read once before timing so every run reads it from the page cache:
the comparison is of the verifiers, not of the disk.  Prints each run, the
median and best of each, and the ratios against minisign (target: within 1.5x).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dom0.keys import generate_keypair, parse_secret_key, sign_file, write_signature
from guest_init.trust import load_trusted_keys, verify_file

#: ``supercharge verify`` through the trust commands alone, for when dom0.cli does not list them yet.
_CLI_HARNESS = """
import argparse, sys
sys.path.insert(0, {repo!r})
from dom0.errors import UserError
from dom0.trust_cli import add_parsers
parser = argparse.ArgumentParser(prog="supercharge")
add_parsers(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except UserError as exc:
    print(f"supercharge: {{exc}}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def cli_command() -> tuple[list[str], str]:
    """The real ``supercharge`` entry point when it has ``verify``, else the same code via a harness."""
    from dom0 import cli

    parser = cli.build_parser()
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    if "verify" in commands:
        return [sys.executable, "-m", "dom0"], "python -m dom0"
    return [sys.executable, "-c", _CLI_HARNESS.format(repo=str(REPO))], "python -c <trust_cli harness>"


def make_image(path: Path, size_mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        handle.writelines(block for _ in range(size_mib))


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buf = bytearray(1 << 20)
        while handle.readinto(buf):
            pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", help="where the image goes (default: a temporary directory)")
    args = parser.parse_args()
    if shutil.which("minisign") is None:
        print("minisign is not installed (apt-get install minisign)", file=sys.stderr)
        return 3

    work = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.dir))
    try:
        image, pub = work / "image.img", work / "bench.pub"
        print(f"image     {args.size_mib} MiB of random data in {work}")
        make_image(image, args.size_mib)
        secret_text, public_text = generate_keypair(None, unencrypted=True)
        pub.write_text(public_text)
        sk = parse_secret_key(secret_text, None)
        sign_seconds = timed(lambda: write_signature(image, sign_file(image, sk)))
        print(f"signed    prehashed by key {sk.key_id_hex} in {sign_seconds:.2f} s")
        keys = load_trusted_keys(pub)
        cli, cli_how = cli_command()
        print(f"cli       {cli_how}")
        warm(image)

        def run_minisign() -> None:
            subprocess.run(["minisign", "-q", "-V", "-p", str(pub), "-m", str(image)], check=True)

        def run_inprocess() -> None:
            assert verify_file(image, None, keys).prehashed

        def run_cli() -> None:
            subprocess.run([*cli, "verify", "-q", str(image), "-p", str(pub)], check=True)

        contenders = {"minisign": run_minisign, "in-process": run_inprocess, "cli": run_cli}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():   # one untimed round: page cache, imports, CPU frequency
            fn()
        for run in range(1, args.runs + 1):
            for name, fn in contenders.items():
                seconds = timed(fn)
                times[name].append(seconds)
                print(f"run {run}     {name:<11} {seconds:6.3f} s  "
                      f"{args.size_mib / seconds:7.0f} MiB/s", flush=True)

        base_median = statistics.median(times["minisign"])
        base_best = min(times["minisign"])
        print()
        print(f"{'':<11} {'median':>8} {'best':>8} {'ratio (median)':>15} {'ratio (best)':>13}")
        for name, values in times.items():
            median, best = statistics.median(values), min(values)
            print(f"{name:<11} {median:7.3f}s {best:7.3f}s {median / base_median:14.2f}x {best / base_best:12.2f}x")
        worst = max(statistics.median(v) / base_median for v in times.values())
        verdict = "within" if worst <= 1.5 else "OUTSIDE"
        print(f"\ntarget: within 1.5x of minisign -V; worst median ratio {worst:.2f}x ({verdict})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
