"""``supercharge xenlab build|run`` (also ``python -m dom0.xenlab``): the lab for users and CI."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dom0.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, UserError


def cmd_build(args: argparse.Namespace) -> int:
    from .lab import XenLab

    lab = XenLab(Path(args.cache) if args.cache else None)
    xen, dom0 = lab.build()
    doc = {"hypervisor": str(xen), "dom0": str(dom0.directory), "kernel": str(dom0.kernel),
           "initramfs": str(dom0.initramfs), "root_image": str(dom0.root_image),
           "cached": dom0.cached, "seconds": dom0.seconds}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"xen     {xen}")
        print(f"dom0    {dom0.directory} ({'from cache' if dom0.cached else f'built in {dom0.seconds:.0f} s'})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .lab import XenLab

    script_path = Path(args.script)
    try:
        script = script_path.read_text()
    except OSError as exc:
        raise UserError(f"{script_path}: cannot read the job script: {exc.strerror}") from None
    lab = XenLab(Path(args.cache) if args.cache else None)
    result = lab.run_job(Path(args.input) if args.input else None, script, timeout=args.timeout,
                         results=Path(args.results) if args.results else None,
                         warm_trust=[[Path(k)] for k in args.trust or []])
    if args.json:
        print(json.dumps({"returncode": result.returncode, "files_dir": str(result.files_dir),
                          "serial_log": str(result.serial_log), "seconds": result.seconds,
                          "timed_out": result.timed_out, "timings": result.timings,
                          "dom0_ready_seconds": result.dom0_ready_seconds}, indent=2))
    else:
        print(f"xenlab: {result.summary()}")
    if result.timed_out:
        return EXIT_TIMEOUT
    return EXIT_OK if result.returncode == 0 else EXIT_FAILED


def add_parsers(sub) -> None:
    """The ``xenlab`` command with ``build`` and ``run``, for the main parser's subparsers."""
    lab = sub.add_parser("xenlab", help="real Xen under qemu: build the lab, run a job in its dom0")
    lsub = lab.add_subparsers(dest="xenlab_command", required=True, metavar="ACTION")
    build = lsub.add_parser("build", help="download Xen and build dom0 (cached)")
    build.add_argument("--cache", help="cache directory (default ~/.cache/supercharge/xenlab)")
    build.add_argument("--json", action="store_true", help="machine-readable output")
    build.set_defaults(func=cmd_build)
    run = lsub.add_parser("run", help="boot Xen and run a bash job script in dom0")
    run.add_argument("script", help="bash script run in dom0 (the project is on PYTHONPATH; "
                                    "inputs in $IN, outputs to $OUT)")
    run.add_argument("--input", help="directory copied to the job disk as $IN")
    run.add_argument("--results", help="where outputs, serial log and job disk go")
    run.add_argument("--trust", action="append", metavar="PUBKEY",
                     help="warm the base initrd for prepare-initrd --trust PUBKEY in dom0")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    run.add_argument("--cache", help="cache directory (default ~/.cache/supercharge/xenlab)")
    run.add_argument("--json", action="store_true", help="machine-readable output")
    run.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    """``python -m dom0.xenlab ACTION ...``: ``supercharge xenlab ACTION ...`` (same errors, same exit codes)."""
    from dom0.cli import main as supercharge

    return supercharge(["xenlab", *(argv if argv is not None else sys.argv[1:])])
