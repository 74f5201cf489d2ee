"""The ``supercharge`` command line.

Every command ends here: a :class:`UserError` becomes one line on stderr and
its exit code (docs/cli.md), so admins never see a traceback for bad input.
Heavy modules are imported inside the command that needs them, so
``supercharge --help`` and the warm ``prepare-initrd`` path stay quick.
"""
from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

from .errors import EXIT_FAILED, EXIT_OK, UserError


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def cmd_kernel_fetch(args: argparse.Namespace) -> int:
    from .kernel import fetch_kernel

    kernel, cached = fetch_kernel(args.version)
    if args.json:
        _print_json({"version": kernel.version, "vmlinuz": str(kernel.vmlinuz),
                     "modules": str(kernel.modules_dir), "cached": cached})
    else:
        print(f"kernel  {kernel.version}{' (cached)' if cached else ''}")
        print(f"vmlinuz {kernel.vmlinuz}")
        print(f"modules {kernel.modules_dir}")
    return EXIT_OK


def cmd_kernel_list(args: argparse.Namespace) -> int:
    from .kernel import cached_versions

    for version in cached_versions():
        print(version)
    return EXIT_OK


def _split_modules(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def cmd_prepare_initrd(args: argparse.Namespace) -> int:
    from .initrd import load_trust, prepare_initrd
    from .kernel import resolve_kernel

    trust = load_trust(args.trust or [], args.allow_unsigned_plans)
    if args.rescue_shell:
        import dataclasses

        trust = dataclasses.replace(trust, rescue_shell=True)
    kernel = resolve_kernel(args.kernel, args.modules_dir)
    result = prepare_initrd(kernel, Path(args.output), plan=Path(args.plan) if args.plan else None,
                            extra_modules=_split_modules(args.modules), method=args.compression,
                            level=args.level, trust=trust)
    if args.json:
        _print_json(result.to_json())
        return EXIT_OK
    base = result.base
    mib = 1024 * 1024
    print(f"initrd    {result.output}  {result.size / mib:.1f} MiB  ({result.seconds:.2f} s)")
    print(f"base      {base.path.name}  {base.size / mib:.1f} MiB {base.compression}, "
          f"{base.uncompressed / mib:.1f} MiB unpacked, {base.files} files, "
          f"{'from cache' if base.cached else f'built in {base.seconds:.1f} s'}"
          f"{'' if base.cached else (' (agent from cache)' if base.agent_cached else ' (agent frozen)')}")
    print(f"kernel    {base.kernel}, {len(base.modules)} modules, {len(base.libraries)} libraries")
    print(f"trust     {', '.join(k for k, _ in trust.keys) or 'no keys'}"
          f"{' + UNSIGNED PLANS ALLOWED (development)' if trust.allow_unsigned else ''}")
    if args.plan:
        print(f"plan      {args.plan}  {result.plan_segment} bytes appended, {result.plan_files} files")
    return EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    from .collect import collect_console, render_report, write_report

    report = collect_console(Path(args.console))
    if args.output:
        write_report(report, Path(args.output))
    if args.json:
        _print_json(report)
    else:
        print(render_report(report))
    outcome = (report.get("outcome") or {}).get("outcome")
    return EXIT_OK if outcome == "switched" else EXIT_FAILED


def cmd_boot(args: argparse.Namespace) -> int:
    from .boot import boot_function

    state_dir = Path(args.state_dir) if args.state_dir else None
    boot = boot_function(args.hypervisor, args.accel)
    return boot(Path(args.config), timeout=args.timeout, after=args.after, state_dir=state_dir,
                as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workdir=Path(args.workdir) if args.workdir else None, accel=args.accel,
                    timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supercharge",
        description="Deploy Linux guests from shared images plus a small personality.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kernel = sub.add_parser("kernel", help="fetch and list guest kernels (Debian linux-image)")
    ksub = kernel.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    fetch = ksub.add_parser("fetch", help="download and extract a kernel into the cache")
    fetch.add_argument("version", nargs="?", help="e.g. 6.1.0-56-amd64 (default: the release's current one)")
    fetch.add_argument("--json", action="store_true", help="machine-readable output")
    fetch.set_defaults(func=cmd_kernel_fetch)
    klist = ksub.add_parser("list", help="list cached kernel versions")
    klist.set_defaults(func=cmd_kernel_list)

    prep = sub.add_parser("prepare-initrd", help="build an initrd: cached base plus a domain's plan")
    prep.add_argument("-o", "--output", required=True, help="where to write the initrd")
    prep.add_argument("--kernel", help="cached kernel version, or a vmlinuz path (with --modules-dir)")
    prep.add_argument("--modules-dir", help="lib/modules/VERSION directory for a kernel given as a file")
    prep.add_argument("--modules", action="append", metavar="M1,M2",
                      help="extra kernel modules (with their dependencies)")
    prep.add_argument("--plan", help="the domain's plan (JSON), appended as a second archive; "
                                     "its signature PLAN.minisig goes with it")
    prep.add_argument("--trust", action="append", metavar="PUBKEY",
                      help="a public key whose signed plans the agent accepts (repeatable: rotation)")
    prep.add_argument("--allow-unsigned-plans", action="store_true",
                      help="development only: the agent also accepts unsigned plans, and every "
                           "boot report says so")
    prep.add_argument("--rescue-shell", action="store_true",
                      help="add busybox as /bin/sh, for plans whose failure_policy is rescue")
    prep.add_argument("--compression", default="zstd", choices=("zstd", "gzip", "xz", "none"))
    prep.add_argument("--level", type=int, help="compression level (default: the method's best)")
    prep.add_argument("--json", action="store_true", help="machine-readable output")
    prep.set_defaults(func=cmd_prepare_initrd)

    collect = sub.add_parser("collect", help="turn a console capture into a boot report")
    collect.add_argument("--console", required=True, help="console capture file")
    collect.add_argument("-o", "--output", help="write the report (JSON) here")
    collect.add_argument("--json", action="store_true", help="print the report as JSON")
    collect.set_defaults(func=cmd_collect)

    boot = sub.add_parser("boot", help="start a domain from an xl config and collect its boot report")
    boot.add_argument("config", help="xl domain configuration (DOMAIN.cfg)")
    boot.add_argument("--hypervisor", default="qemu", choices=("qemu", "xen"),
                      help="qemu (default; TCG or KVM, no Xen needed) or xen (xl, in a Xen dom0)")
    boot.add_argument("--accel", default=None, help="qemu accelerator: tcg (default) or kvm")
    boot.add_argument("--timeout", type=float, default=300.0, help="seconds before a hung guest is ended")
    boot.add_argument("--after", default="wait", choices=("wait", "stop"),
                      help="after the report: wait for the guest to power off, or stop it")
    boot.add_argument("--state-dir", help="where console capture and report go")
    boot.add_argument("--json", action="store_true", help="print the report as JSON")
    boot.set_defaults(func=cmd_boot)

    from .container.cli import add_parser as add_container_parser
    from .deploy import add_parsers as add_deploy_parsers
    from .diagnose import add_parsers as add_diagnose_parsers
    from .patch_cli import add_parsers as add_patch_parsers
    from .trust_cli import add_parsers as add_trust_parsers
    from .xenlab.cli import add_parsers as add_xenlab_parsers

    add_container_parser(sub)
    add_deploy_parsers(sub)
    add_diagnose_parsers(sub)
    add_patch_parsers(sub)
    add_trust_parsers(sub)
    add_xenlab_parsers(sub)

    demo = sub.add_parser("demo", help="build, boot and report a demo domain under qemu")
    demo.add_argument("--workdir", help="where the demo's image, plan and initrd go")
    demo.add_argument("--accel", default=None, help="qemu accelerator: tcg (default) or kvm")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"supercharge: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("supercharge: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # The reader went away (``supercharge report --json | head``): as cat does,
        # stop quietly; point stdout at /dev/null so the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    return code


if __name__ == "__main__":
    sys.exit(main())
