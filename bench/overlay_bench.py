"""100 domains from one shared image: qcow2 overlays against copying the image.

    .venv/bin/python bench/overlay_bench.py [--domains 100] [--size-mib 512] [--copies 5] [--json]

The design goal (DESIGN.md): per-domain disk in proportion to the
personality, not the image; target here: at most 1% of the image per domain.

1. A shared ext4 image of ``--size-mib`` is made with ``mkfs.ext4 -d`` from a
   tree of real files copied from this machine's /usr (Python's standard
   library, Perl's, locales, shared libraries), filling most of it.
2. Overlays: for each of ``--domains`` domains, :func:`dom0.exports.create_overlay`
   (``qemu-img create -f qcow2 -b BASE -F raw``), timed; its allocated bytes
   (st_blocks x 512, what ``du`` reports) measured.  Then each domain's
   personality is written through its overlay with ``qemu-io`` (16 writes of
   4 KiB scattered over the image, about what replacing hostname, hosts,
   passwd, shadow, group and a few config files dirties in ext4 blocks), and
   the overlays measured again.
3. Copies: ``cp --sparse=always BASE COPY`` for ``--copies`` domains (a copy
   is per domain, so its time and size do not depend on how many there are;
   fewer copies keep the run's disk use down), timed, allocated bytes
   measured.  The base was just written, so it is in the page cache for both.

Figures are per domain: the median time and the mean allocated bytes, with the
ratio to the image's allocated size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dom0.exports import allocated_bytes, create_overlay  # noqa: E402
from dom0.rootfs import make_ext4_image  # noqa: E402
from dom0.tools import require_tool  # noqa: E402

MIB = 1 << 20
SOURCES = ("/usr/lib/python3.11", "/usr/share/perl", "/usr/share/locale", "/usr/share/doc",
           "/usr/lib/x86_64-linux-gnu")
PERSONALITY_WRITES = 16
WRITE_SIZE = 4096


def build_tree(tree: Path, budget: int) -> tuple[int, int]:
    """Copy real files from /usr into ``tree`` until ``budget`` bytes; returns (files, bytes)."""
    files = size = 0
    for source in SOURCES:
        src = Path(source)
        if not src.is_dir():
            continue
        for path in sorted(src.rglob("*")):
            if size >= budget:
                return files, size
            if path.is_symlink() or not path.is_file():
                continue
            try:
                length = path.stat().st_size
                if size + length > budget:
                    continue
                dest = tree / path.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            except OSError:
                continue
            files += 1
            size += length
    return files, size


def make_base(work: Path, size_mib: int) -> tuple[Path, int, int]:
    tree = work / "tree"
    files, content = build_tree(tree, int(size_mib * MIB * 0.7))
    base = work / "shared.img"
    make_ext4_image(tree, base, "sc-bench", size_mib)
    shutil.rmtree(tree)
    return base, files, content


def personality(overlay: Path, image_size: int, rng: random.Random) -> None:
    """Write a personality's worth of blocks through the overlay, as the guest would."""
    commands: list[str] = []
    for _ in range(PERSONALITY_WRITES):
        offset = rng.randrange(0, image_size // WRITE_SIZE) * WRITE_SIZE
        commands += ["-c", f"write -P 0x{rng.randrange(256):02x} {offset} {WRITE_SIZE}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(overlay)], check=True,
                   capture_output=True)


def run(domains: int, size_mib: int, copies: int) -> dict:
    require_tool("qemu-img")
    require_tool("qemu-io")
    work = Path(tempfile.mkdtemp(prefix="overlay-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        started = time.monotonic()
        base, files, content = make_base(work, size_mib)
        image_apparent = base.stat().st_size
        image_allocated = allocated_bytes(base)
        build_seconds = time.monotonic() - started

        overlays = work / "overlays"
        overlays.mkdir()
        create_times, fresh, written = [], [], []
        for index in range(domains):
            target = overlays / f"dom{index:03d}.qcow2"
            t0 = time.perf_counter()
            create_overlay(base, target)
            create_times.append(time.perf_counter() - t0)
            fresh.append(allocated_bytes(target))
        rng = random.Random(7)
        for index in range(domains):
            target = overlays / f"dom{index:03d}.qcow2"
            personality(target, image_apparent, rng)
            written.append(allocated_bytes(target))

        copy_dir = work / "copies"
        copy_dir.mkdir()
        copy_times, copied = [], []
        for index in range(copies):
            target = copy_dir / f"dom{index:03d}.img"
            t0 = time.perf_counter()
            subprocess.run(["cp", "--sparse=always", str(base), str(target)], check=True)
            copy_times.append(time.perf_counter() - t0)
            copied.append(allocated_bytes(target))
            target.unlink()           # keep the run's disk use to one copy
        return {
            "domains": domains, "copies_measured": copies,
            "image": {"apparent_bytes": image_apparent, "allocated_bytes": image_allocated,
                      "files": files, "content_bytes": content, "build_seconds": round(build_seconds, 1)},
            "overlay": {"create_seconds_median": statistics.median(create_times),
                        "create_seconds_total": sum(create_times),
                        "allocated_bytes_fresh_mean": statistics.mean(fresh),
                        "allocated_bytes_with_personality_mean": statistics.mean(written),
                        "allocated_bytes_with_personality_max": max(written),
                        "allocated_bytes_all_domains": sum(written)},
            "copy": {"seconds_median": statistics.median(copy_times),
                     "allocated_bytes_mean": statistics.mean(copied)},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(doc: dict) -> str:
    image = doc["image"]
    ov, cp = doc["overlay"], doc["copy"]
    size = image["apparent_bytes"]
    per = ov["allocated_bytes_with_personality_mean"]
    share = per / size
    lines = [
        f"shared image: {size / MIB:.0f} MiB ext4, {image['allocated_bytes'] / MIB:.1f} MiB allocated, "
        f"{image['files']} files ({image['content_bytes'] / MIB:.1f} MiB) copied from /usr",
        f"{'per domain':<34}{'time':>12}{'allocated':>14}{'of image':>10}",
        f"{'qcow2 overlay, fresh':<34}{ov['create_seconds_median'] * 1000:>10.1f}ms"
        f"{ov['allocated_bytes_fresh_mean'] / 1024:>11.0f}KiB{ov['allocated_bytes_fresh_mean'] / size:>10.3%}",
        f"{'qcow2 overlay, with personality':<34}{'':>12}"
        f"{per / 1024:>11.0f}KiB{share:>10.3%}",
        f"{'cp --sparse=always':<34}{cp['seconds_median'] * 1000:>10.1f}ms"
        f"{cp['allocated_bytes_mean'] / 1024:>11.0f}KiB{cp['allocated_bytes_mean'] / size:>10.3%}",
        f"{doc['domains']} domains: overlays {ov['allocated_bytes_all_domains'] / MIB:.1f} MiB in all, "
        f"created in {ov['create_seconds_total']:.1f} s; copies would take "
        f"{cp['allocated_bytes_mean'] * doc['domains'] / MIB:.0f} MiB and "
        f"{cp['seconds_median'] * doc['domains']:.1f} s",
        f"ratio: a copy costs {cp['allocated_bytes_mean'] / per:.0f}x the disk and "
        f"{cp['seconds_median'] / ov['create_seconds_median']:.1f}x the time of an overlay",
        f"target (at most 1% of the image per domain): {'met' if share <= 0.01 else 'NOT met'} "
        f"({share:.3%})",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    doc = run(args.domains, args.size_mib, args.copies)
    print(json.dumps(doc, indent=2) if args.json else report(doc))
    share = doc["overlay"]["allocated_bytes_with_personality_mean"] / doc["image"]["apparent_bytes"]
    return 0 if share <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
