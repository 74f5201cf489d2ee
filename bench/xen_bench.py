"""Boot to the real init on real Xen: our initrd against Debian's stock initramfs, in one dom0.

    .venv/bin/python bench/xen_bench.py [--boots N] [--type pv|pvh]

One Xen lab run (dom0.xenlab; real Xen 4.17 under qemu TCG).  In dom0, for
each of N rounds, alternating:
  * ours:  ``supercharge prepare-initrd`` (warm) and ``supercharge boot
    --hypervisor xen`` of a domain whose signed plan mounts the root by label
    and replaces /etc/hostname;
  * stock: the same ``boot`` of the same kind of domain with Debian's
    ``mkinitramfs`` output for the same kernel and ``root=LABEL=... rw``.
Both roots run the demo init, which prints the guest's uptime when it starts.
Domains get 512 MB: Debian's initramfs (MODULES=most) runs out of memory
unpacking itself in 256 MB.
Printed per side: that uptime (kernel start to the real init), the agent's
uptime at the switch (ours), and the wall time of the boot command in dom0
(xl create to the domain's end, as seen by ``supercharge boot``).
Needs root and initramfs-tools (like bench/boot_spine.py, whose kernel links it reuses).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from boot_spine import host_kernel_links

from dom0.demo import INIT_SCRIPT, demo_plan
from dom0.kernel import fetch_kernel
from dom0.keys import sign_with
from dom0.rootfs import busybox_tree, make_ext4_image
from dom0.xenlab import XenLab
from dom0.xlcfg import write_xl_config

LABEL = "sc-xbench-root"
UPTIME_RE = re.compile(r"demo-init: uptime ([0-9.]+) s")

JOB = r"""
set -u
cd "$IN"
python3 -m dom0 prepare-initrd --trust trusted.pub --plan plan.json -o warmup.initrd >/dev/null
for i in $(seq 1 @BOOTS@); do
  for side in ours stock; do
    name="$side$i"
    t0=$(date +%s.%N)
    if [ "$side" = ours ]; then
      python3 -m dom0 prepare-initrd --trust trusted.pub --plan plan.json -o ours.initrd >/dev/null
    fi
    t1=$(date +%s.%N)
    python3 -m dom0 boot --hypervisor xen --state-dir "$OUT/state" --timeout 200 "$name.cfg" \
      > "$OUT/$name.out" 2>&1
    t2=$(date +%s.%N)
    echo "$t0 $t1 $t2" > "$OUT/$name.times"
    echo "== $name done"
  done
done
"""


def _config(path: Path, name: str, kernel, kind: str, initrd: str, disk: str, extra: str) -> None:
    path.write_text(write_xl_config({
        "name": name, "type": kind, "kernel": str(kernel.vmlinuz), "ramdisk": initrd,
        "extra": extra, "memory": 512, "vcpus": 1,
        "disk": [f"format=raw,vdev=xvda,access=rw,target={disk}"],
        "on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=2, help="rounds (one boot of each side per round)")
    parser.add_argument("--type", default="pv", choices=("pv", "pvh"), help="domain type")
    parser.add_argument("--keep", help="keep the lab's outputs in this directory")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("mkinitramfs") is None:
        raise SystemExit("needs root and Debian's initramfs-tools (mkinitramfs)")
    kernel, _ = fetch_kernel()
    from dom0.cache import cache_dir
    from dom0.keys import ensure_unencrypted_keypair

    secret, public = ensure_unencrypted_keypair(cache_dir("xenlab", "test-keys"), "xen-trusted")
    with tempfile.TemporaryDirectory(prefix="sc-xbench-") as tmp:
        work = Path(tmp)
        inputs = work / "in"
        inputs.mkdir()
        shutil.copy2(public, inputs / "trusted.pub")
        plan = inputs / "plan.json"
        plan.write_text(json.dumps(demo_plan(name="xbench", label=LABEL, hostname="xbench1")))
        sign_with(plan, secret)
        with host_kernel_links(kernel):
            subprocess.run(["mkinitramfs", "-o", str(inputs / "stock.initrd"), kernel.version],
                           check=True, capture_output=True)
        tree = busybox_tree(work / "root", INIT_SCRIPT)
        image = make_ext4_image(tree, work / "root.img", LABEL)
        for i in range(1, args.boots + 1):
            for side in ("ours", "stock"):
                shutil.copyfile(image, inputs / f"{side}{i}.img")
                extra = "console=hvc0" if side == "ours" else f"console=hvc0 root=LABEL={LABEL} rw"
                _config(inputs / f"{side}{i}.cfg", f"{side}{i}", kernel, args.type,
                        f"{side}.initrd", f"{side}{i}.img", extra)
        results = Path(args.keep) if args.keep else work / "results"
        lab = XenLab(kernel=kernel)
        run = lab.run_job(inputs, JOB.replace("@BOOTS@", str(args.boots)),
                          timeout=300 + 240 * args.boots, results=results,
                          warm_trust=[[inputs / "trusted.pub"]])
        out = run.files_dir
        figures: dict = {"kernel": kernel.version, "type": args.type, "lab_seconds": run.seconds,
                         "job_exit": run.returncode}
        for side in ("ours", "stock"):
            uptimes, switch, walls, prepare = [], [], [], []
            for i in range(1, args.boots + 1):
                name = f"{side}{i}"
                console = (out / "state" / name / "console.log")
                text = console.read_text(errors="replace") if console.is_file() else ""
                match = UPTIME_RE.search(text)
                if not match:
                    raise SystemExit(f"{name}: the real init did not report its uptime "
                                     f"(console {console}; lab serial log {run.serial_log})")
                uptimes.append(float(match.group(1)))
                t0, t1, t2 = (float(x) for x in (out / f"{name}.times").read_text().split())
                walls.append(round(t2 - t1, 2))
                prepare.append(round(t1 - t0, 2))
                report = json.loads((out / "state" / name / "report.json").read_text())
                outcome = report.get("outcome") or {}
                if side == "ours":
                    switch.append(outcome.get("uptime"))
            figures[side] = {"uptime_at_init": uptimes, "boot_wall": walls,
                             "uptime_median": statistics.median(uptimes),
                             "boot_wall_median": statistics.median(walls)}
            if side == "ours":
                figures[side].update(agent_switch_uptime=switch, prepare_initrd=prepare)
    ours, stock = figures["ours"], figures["stock"]
    print(f"kernel {kernel.version}, {args.type} domains on Xen 4.17 (under qemu TCG), {args.boots} boots each")
    print(f"uptime at real init   ours {ours['uptime_median']:6.2f} s   stock {stock['uptime_median']:6.2f} s"
          f"   ratio {ours['uptime_median'] / stock['uptime_median']:.2f}  (target <= 1.00)")
    print(f"boot command (dom0)   ours {ours['boot_wall_median']:6.2f} s   stock {stock['boot_wall_median']:6.2f} s")
    print(f"agent uptime at switch {ours['agent_switch_uptime']}; prepare-initrd in dom0 {ours['prepare_initrd']} s")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
