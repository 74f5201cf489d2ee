"""Boot-spine figures, side by side with Debian's initramfs-tools in one run.

    .venv/bin/python bench/boot_spine.py [--boots N]

Measures, for the cached kernel:
  1. base initrd size against Debian's stock initramfs (``mkinitramfs``);
  2. ``supercharge prepare-initrd`` cold (freezing the agent, empty cache) and
     warm (a domain's plan appended to the cached base), against the wall time
     of ``mkinitramfs -o FILE VERSION``;
  3. guest uptime when the real init starts: our initrd applying a plan, against
     the stock initrd mounting the same root, under the same qemu.

mkinitramfs reads /lib/modules/VERSION and /boot/config-VERSION; the kernel is
only extracted into the cache, so this script links both there for the run
(when they are absent) and removes the links afterwards.  Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dom0.demo import INIT_SCRIPT, demo_plan  # noqa: E402
from dom0.kernel import KernelRef, fetch_kernel  # noqa: E402
from dom0.keys import ensure_unencrypted_keypair, sign_with  # noqa: E402
from dom0.qemu import QemuSettings, qemu_command, run_qemu  # noqa: E402
from dom0.rootfs import busybox_tree, make_ext4_image  # noqa: E402
from dom0.xlcfg import load_domain_config, write_xl_config  # noqa: E402

LABEL = "sc-bench-root"
UPTIME_RE = re.compile(rb"demo-init: uptime ([0-9.]+) s")


@contextmanager
def host_kernel_links(kernel: KernelRef):
    """Make mkinitramfs find the cached kernel's modules and config."""
    made: list[Path] = []
    links = {
        Path("/lib/modules") / kernel.version: kernel.modules_dir,
        Path("/boot") / f"config-{kernel.version}": kernel.vmlinuz.parent / f"config-{kernel.version}",
    }
    try:
        for link, target in links.items():
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target)
                made.append(link)
        yield
    finally:
        for link in made:
            link.unlink()


def timed(cmd: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dom0", *args]


def boot_uptime(work: Path, kernel: KernelRef, initrd: Path, image: Path, extra: str, name: str) -> float:
    disk = work / f"{name}.img"
    shutil.copyfile(image, disk)
    cfg = work / f"{name}.cfg"
    cfg.write_text(write_xl_config({"name": name, "kernel": str(kernel.vmlinuz), "ramdisk": str(initrd),
                                    "extra": extra, "memory": 512, "vcpus": 1,
                                    "disk": [f"format=raw,vdev=xvda,access=rw,target={disk}"]}))
    console = work / f"{name}.console"
    cmd = qemu_command(load_domain_config(cfg), console, QemuSettings())
    run_qemu(cmd, console, timeout=240)
    match = UPTIME_RE.search(console.read_bytes())
    if not match:
        raise SystemExit(f"{name}: the real init did not report its uptime (see {console})")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3, help="boots per initrd (alternating)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("mkinitramfs") is None:
        raise SystemExit("needs root and Debian's initramfs-tools (mkinitramfs)")
    kernel, _ = fetch_kernel()
    results: dict = {"kernel": kernel.version}
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        work = Path(tmp)
        plan = work / "plan.json"
        plan.write_text(json.dumps(demo_plan(name="bench", label=LABEL, hostname="bench1")))
        secret, public = ensure_unencrypted_keypair(work / "keys", "bench")
        sign_with(plan, secret)   # a real domain's plan is signed; warm builds verify it

        # -- prepare-initrd cold (own empty cache, kernel linked in) and warm --------------
        cache = work / "cache"
        (cache / "kernels").mkdir(parents=True)
        (cache / "kernels" / kernel.version).symlink_to(kernel.modules_dir.parent.parent.parent)
        env = dict(os.environ, SUPERCHARGE_CACHE=str(cache))
        ours = work / "ours.img"
        cold = timed(cli("prepare-initrd", "--trust", str(public), "--kernel", kernel.version, "--plan", str(plan),
                         "-o", str(ours)), env)
        warm_runs = [timed(cli("prepare-initrd", "--trust", str(public), "--kernel", kernel.version, "--plan", str(plan),
                               "-o", str(work / f"warm{i}.img")), env) for i in range(5)]
        warm = statistics.median(warm_runs)
        base = next((cache / "initrd").glob("base-*.cpio.zst"))

        # -- Debian's mkinitramfs, same kernel -------------------------------------------
        stock = work / "stock.img"
        with host_kernel_links(kernel):
            stock_runs = [timed(["mkinitramfs", "-o", str(stock), kernel.version]) for _ in range(2)]
        mkinit = statistics.median(stock_runs)

        results["size"] = {"base_bytes": base.stat().st_size, "stock_bytes": stock.stat().st_size,
                           "ratio": round(base.stat().st_size / stock.stat().st_size, 3)}
        results["prepare"] = {"cold_s": round(cold, 2), "warm_s": round(warm, 4),
                              "mkinitramfs_s": round(mkinit, 2),
                              "warm_speedup": round(mkinit / warm, 1), "cold_speedup": round(mkinit / cold, 2)}

        # -- uptime at the real init, alternating our initrd and the stock one ----------
        tree = busybox_tree(work / "root", INIT_SCRIPT)
        image = make_ext4_image(tree, work / "root.img", LABEL)
        ours_up, stock_up = [], []
        for i in range(args.boots):
            ours_up.append(boot_uptime(work, kernel, ours, image, "", f"ours{i}"))
            stock_up.append(boot_uptime(work, kernel, stock, image, f"root=LABEL={LABEL} rw", f"stock{i}"))
        results["uptime"] = {"ours_s": ours_up, "stock_s": stock_up,
                             "ours_median": statistics.median(ours_up),
                             "stock_median": statistics.median(stock_up),
                             "ratio": round(statistics.median(ours_up) / statistics.median(stock_up), 3)}

    size, prep, up = results["size"], results["prepare"], results["uptime"]
    print(f"kernel {kernel.version}")
    print(f"base initrd       {size['base_bytes'] / 2**20:6.1f} MiB   stock initramfs {size['stock_bytes'] / 2**20:6.1f} MiB"
          f"   ratio {size['ratio']:.2f}  (target <= 0.40)")
    print(f"prepare cold      {prep['cold_s']:6.2f} s     mkinitramfs     {prep['mkinitramfs_s']:6.2f} s"
          f"     {prep['cold_speedup']:.2f}x")
    print(f"prepare warm      {prep['warm_s']:6.3f} s    mkinitramfs     {prep['mkinitramfs_s']:6.2f} s"
          f"     {prep['warm_speedup']:.0f}x  (target >= 100x)")
    print(f"uptime at init    {up['ours_median']:6.2f} s     stock initrd    {up['stock_median']:6.2f} s"
          f"     ratio {up['ratio']:.2f}  (target <= 1.00)  ours {up['ours_s']} stock {up['stock_s']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
