"""The guest pipeline's cost, side by side with Debian's stock initramfs in one run.

    .venv/bin/python bench/pipeline_bench.py [--boots N]

Reference personality: an overlay root (a shared read-only image below, a per-domain
writable VBD above), DHCP, and from an HTTP server on the host (10.0.2.2 in the guest)
three patches (passwd, shadow, group), one copied file, a replaced hostname and one hook,
all pinned in the signed plan.  Measured: guest uptime when the real init starts, against
the stock initrd (mkinitramfs) mounting the same shared image as root under the same qemu;
the agent's time per stage; and Python's start-up inside the guest (the kernel's
"Run /init" to the agent's first line of code).  Needs root (mkinitramfs, see boot_spine.py).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from boot_spine import UPTIME_RE, boot_uptime, host_kernel_links  # noqa: E402

from dom0.boot import boot_domain  # noqa: E402
from dom0.demo import INIT_SCRIPT  # noqa: E402
from dom0.initrd import load_trust, prepare_initrd  # noqa: E402
from dom0.kernel import fetch_kernel  # noqa: E402
from dom0.keys import ensure_unencrypted_keypair, sign_with  # noqa: E402
from dom0.rootfs import busybox_tree, make_ext4_image  # noqa: E402
from dom0.xlcfg import write_xl_config  # noqa: E402

SHARED = "sc-bench-shared"
ETC = {"passwd": "root:x:0:0:root:/root:/bin/sh\n", "shadow": "root:*:19000:0:99999:7:::\n",
       "group": "root:x:0:\nusers:x:100:\n"}
ADD = {"passwd": "web:x:1000:100::/home/web:/bin/sh\n", "shadow": "web:!:19000:0:99999:7:::\n",
       "group": "web:x:1000:\n"}
RUN_INIT = re.compile(rb"\[\s*([0-9.]+)\] Run /init as init process")


def _patch(name: str) -> bytes:
    old = ETC[name].splitlines(keepends=True)
    return "".join([f"--- a/{name}\n", f"+++ b/{name}\n", f"@@ -1,{len(old)} +1,{len(old) + 1} @@\n",
                    *(" " + line for line in old), "+" + ADD[name]]).encode()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D102 - the bench prints its own lines
        pass


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    kernel, _ = fetch_kernel()
    with tempfile.TemporaryDirectory(prefix="sc-pipe-bench-") as tmp:
        work = Path(tmp)
        served = work / "served"
        served.mkdir()
        for name in ADD:
            (served / f"{name}.patch").write_bytes(_patch(name))
        (served / "motd").write_text("managed\n")
        httpd, port = _serve(served)
        tree = busybox_tree(work / "root", INIT_SCRIPT)
        for name, text in ETC.items():
            (tree / "etc" / name).write_text(text)
        shared = make_ext4_image(tree, work / "shared.img", SHARED)
        empty = work / "empty"
        empty.mkdir()
        secret, public = ensure_unencrypted_keypair(work / "keys", "bench")
        base = f"http://10.0.2.2:{port}"
        sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        plan = {"version": 1, "name": "web", "device_timeout": 20,
                "network": {"interfaces": [{"match": {"name": "eth0"}, "dhcp": True}]},
                "mounts": [{"target": "/", "overlay": {"lower": [{"label": SHARED}],
                                                      "upper": {"label": "sc-bench-upper"}}}],
                "steps": [*({"op": "patch", "uri": f"{base}/{n}.patch", "dir": "/etc",
                             "sha256": sha(served / f"{n}.patch")} for n in ADD),
                          {"op": "copy", "path": "/etc/motd", "uri": f"{base}/motd", "sha256": sha(served / "motd")},
                          {"op": "replace", "path": "/etc/hostname", "content": "web\n"},
                          {"op": "hook", "name": "touch", "script": "echo ok > /etc/hook-ran\n"}]}
        plan_file = work / "plan.json"
        plan_file.write_text(json.dumps(plan))
        sign_with(plan_file, secret)
        ours_initrd = work / "ours.img"
        prepare_initrd(kernel, ours_initrd, plan=plan_file, trust=load_trust([str(public)], False))
        stock_initrd = work / "stock.img"
        with host_kernel_links(kernel):
            subprocess.run(["mkinitramfs", "-o", str(stock_initrd), kernel.version], check=True,
                           capture_output=True)

        ours, stock, stages, startup = [], [], {}, []
        for i in range(args.boots):
            upper = make_ext4_image(empty, work / f"upper{i}.img", "sc-bench-upper", size_mib=16)
            name = f"web{i}"
            cfg = work / f"{name}.cfg"
            cfg.write_text(write_xl_config({
                "name": name, "kernel": str(kernel.vmlinuz), "ramdisk": str(ours_initrd), "memory": 512,
                "vif": ["mac=52:54:00:12:34:58"],
                "disk": [f"format=raw,vdev=xvda,access=ro,target={shared}",
                         f"format=raw,vdev=xvdb,access=rw,target={upper}"]}))
            code = boot_domain(cfg, timeout=300, after="wait", state_dir=work / "state", quiet=True)
            console = (work / "state" / name / "console.log").read_bytes()
            if code != 0:
                raise SystemExit(f"our boot failed: see {work / 'state' / name}")
            ours.append(float(UPTIME_RE.search(console).group(1)))
            report = json.loads((work / "state" / name / "report.json").read_text())
            for record in report["records"]:
                if record["stage"] != "outcome":
                    stages.setdefault(record["stage"], []).append(record["duration"])
                if record["stage"] == "early":
                    run_init = float(RUN_INIT.search(console).group(1))
                    startup.append(record["details"]["agent_started"] - run_init)
            stock.append(boot_uptime(work, kernel, stock_initrd, shared, f"root=LABEL={SHARED} ro",
                                     f"stock{i}"))
        httpd.shutdown()

    med = statistics.median
    print(f"kernel {kernel.version}; {args.boots} boots each, alternating")
    print(f"uptime at the real init: ours {med(ours):.2f} s {ours} (overlay root, DHCP, 3 patches, "
          f"copy, replace, hook, all fetched over HTTP and verified)")
    print(f"                         stock {med(stock):.2f} s {stock} (mounts the same root)")
    print(f"ratio {med(ours) / med(stock):.2f} (target <= 1.00)")
    print(f"Python start-up inside the guest (Run /init -> agent code): median {med(startup):.2f} s")
    print("agent time per stage (median s): " + ", ".join(f"{k} {med(v):.3f}" for k, v in stages.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
