"""``supercharge deploy CONTAINER``: from a container file to a running, reported domain.

Why one command: the steps (process the container, sign the plan, put it in an
initrd, write the xl config, start the domain, collect its report) each exist
as their own command, but deploying is the everyday operation and every
hand-off between them is a chance to pair the wrong plan with the wrong
initrd.  Here they run in order on one domain, in one state directory:

    STATE/NAME/plan.json (+ .minisig)   the boot plan, signed with --sign-key
    STATE/NAME/initrd.img               the cached base plus the plan
    STATE/NAME/NAME.cfg                 the xl config: the container's statements,
                                        its exported disks, kernel and ramdisk
    STATE/NAME/NAME.cfg.ganesha.conf,   with [nfs] expressions: the domain's NFS
    STATE/NAME/NAME.cfg.exports         exports for nfs-ganesha or /etc/exports
    STATE/NAME/console.log, report.json what the boot said

``--dry-run`` does everything that only reads (parsing, checking images,
fetching boot-time artifacts into a temporary workspace to pin them) and
prints the xl config and the plan; nothing is started, and nothing is written
outside a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .boot import BootFunction, boot_function
from .errors import EXIT_OK, UserError
from .exports import same_file

HYPERVISORS = ("qemu", "xen")



@dataclass
class Deployment:
    """What a deployment made (or, in a dry run, would make), for printing and JSON."""

    name: str
    container: str
    hypervisor: str
    dry_run: bool
    directory: Path
    config_path: Path
    config_text: str = ""
    plan: dict | None = None
    plan_path: Path | None = None
    initrd: Path | None = None
    initrd_info: dict | None = None
    kernel: str = ""
    log: list[str] = field(default_factory=list)
    expressions: list[dict] = field(default_factory=list)
    nfs_exports: list[Path] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"domain": self.name, "container": self.container, "hypervisor": self.hypervisor,
                "dry_run": self.dry_run, "directory": str(self.directory),
                "config": str(self.config_path), "xl": self.config_text, "plan": self.plan,
                "plan_path": str(self.plan_path) if self.plan_path else None,
                "initrd": str(self.initrd) if self.initrd else None,
                "initrd_info": self.initrd_info, "kernel": self.kernel,
                "expressions": self.expressions, "nfs_exports": [str(p) for p in self.nfs_exports]}


# ---------------------------------------------------------------------------
# The steps


def domain_name(container) -> str:
    """The domain's name, from the container's ``name`` setting (xl requires one)."""
    name = container.settings.get("name")
    if not isinstance(name, str) or not name:
        where = container.settings.where("name") if "name" in container.settings else container.path
        raise UserError(f"{where}: expected a 'name' setting (a quoted string naming the domain), "
                        "found " + ("none" if name is None else repr(name)))
    if "/" in name or name in (".", "..") or "\0" in name:
        raise UserError(f"{container.settings.where('name')}: expected a domain name without '/', "
                        f"found {name!r}")
    return name


def check_settings(container) -> None:
    """Interpret the container's xl statements now, so a bad disk or vif line stops the deploy
    before any expression runs, with the container's own line and column."""
    from .xlcfg import domain_from_settings

    probe = container.settings.copy()
    if "kernel" not in probe:
        probe["kernel"] = "/"          # deploy supplies it
    domain_from_settings(probe, Path(container.path))


def resolve_domain_kernel(container, kernel: str | None, modules_dir: str | None):
    """The kernel to boot and whose modules go in the initrd.

    ``--kernel`` wins; else the container's ``kernel`` setting, which must be a
    cached kernel's vmlinuz (or come with ``--modules-dir``) because the initrd
    needs that kernel's modules; else the newest cached kernel.
    """
    from .kernel import cached_versions, resolve_kernel

    if kernel:
        return resolve_kernel(kernel, modules_dir)
    setting = container.settings.get("kernel")
    if setting is None:
        return resolve_kernel(None, modules_dir)
    where = container.settings.where("kernel")
    if not isinstance(setting, str):
        raise UserError(f"{where}: expected a quoted string for 'kernel', found a "
                        f"{'list' if isinstance(setting, list) else 'number'}")
    path = Path(setting)
    if not path.is_absolute():
        path = Path(container.path).absolute().parent / path
    if not path.is_file():
        raise UserError(f"{where}: kernel {path} not found")
    if modules_dir:
        return resolve_kernel(str(path), modules_dir)
    for version in cached_versions():
        ref = resolve_kernel(version)
        if path.name == f"vmlinuz-{version}" or same_file(path, ref.vmlinuz):
            return type(ref)(ref.version, path, ref.modules_dir)
    raise UserError(f"{where}: kernel {path}: expected a cached kernel (vmlinuz-VERSION with its "
                    "modules in the kernel cache), found none for it; give --modules-dir DIR (its "
                    "lib/modules/VERSION), --kernel VERSION, or leave 'kernel' out")


def trust_settings(trust: list[str], signer, allow_unsigned: bool):
    """What the initrd trusts: the --trust keys and the signing key's own public key."""
    from .initrd import TrustSettings, load_trust

    keys = list(load_trust(trust, True).keys) if trust else []
    if signer is not None:
        public = signer.public_key()
        keys.append((public.key_id_hex, public.to_text()))
    unique = list(dict.fromkeys(keys))
    return TrustSettings(tuple(unique), allow_unsigned)


def xl_settings(container, disks: list[str], kernel: Path, ramdisk: Path | None):
    """The container's statements plus exported disks, with the kernel and ramdisk deployed."""
    from .xlcfg import Setting

    settings = container.settings.copy()
    if disks:
        settings.add(Setting("disk", list(disks), op="+="))
    settings["kernel"] = str(kernel)
    if ramdisk is not None:
        settings["ramdisk"] = str(ramdisk)
    return settings


# ---------------------------------------------------------------------------
# The command


def deploy(args: argparse.Namespace) -> int:
    from .atomic import write_atomically
    from .cache import state_root
    from .container.cli import _set_trust
    from .container.parse import load_container
    from .container.process import Workspace, process_container, write_nfs_exports
    from .xlcfg import domain_from_settings, write_xl_config

    container = load_container(Path(args.container))
    name = domain_name(container)
    check_settings(container)
    boot_needed = bool(container.boot_expressions())
    if boot_needed and not args.sign_key and not args.allow_unsigned_plans and not args.dry_run:
        raise UserError(f"{container.path}: the container has boot-time expressions, so its plan "
                        "must be signed: give --sign-key SECKEY (its public key goes into the "
                        "initrd), or --allow-unsigned-plans for development")
    if not boot_needed and "ramdisk" not in container.settings:
        raise UserError(f"{container.path}: expected boot-time expressions (at least [mount LABEL / "
                        "ro|rw]) for the agent's plan, or a 'ramdisk' setting, found neither")
    boot = None if args.dry_run else boot_function(args.hypervisor, args.accel)
    kernel = resolve_domain_kernel(container, args.kernel, args.modules_dir)

    states = Path(args.state_dir).absolute() if args.state_dir else state_root() / "domains"
    scratch = Path(tempfile.mkdtemp(prefix="supercharge-deploy-")) if args.dry_run else None
    try:
        directory = (scratch / name) if scratch else states / name
        directory.mkdir(parents=True, exist_ok=True)
        workdir = Path(args.dir) if args.dir and not args.dry_run else directory
        workspace = Workspace(workdir)
        _set_trust(workspace, args.trust or [], False, None if args.dry_run else args.sign_key)
        result = process_container(container, workspace, dry_run=args.dry_run)
        lines = [entry.line() for entry in result.log]
        if args.log and not args.dry_run:
            with open(args.log, "a") as out:
                out.writelines(line + "\n" for line in lines)

        final_dir = states / name
        dep = Deployment(name, container.path, args.hypervisor, args.dry_run, final_dir,
                         final_dir / f"{name}.cfg", plan=result.plan, kernel=str(kernel.vmlinuz),
                         log=lines, expressions=[vars(e) for e in result.log])
        ramdisk: Path | None = None
        if result.plan is not None:
            dep.plan_path = final_dir / "plan.json"
            ramdisk = dep.initrd = final_dir / "initrd.img"
            if not args.dry_run:
                _write_plan_and_initrd(dep, result.plan, workspace.signer, kernel, args)
        settings = xl_settings(container, result.disks, kernel.vmlinuz, ramdisk)
        domain = domain_from_settings(settings, dep.config_path,
                                      base=Path(container.path).absolute().parent)
        dep.config_text = write_xl_config(
            domain, header=f"{name}: deployed by supercharge from {Path(container.path).name}")
        if args.dry_run:
            return _print_dry_run(dep, args.json)
        write_atomically(dep.config_path, [dep.config_text.encode()])
        dep.nfs_exports = write_nfs_exports(result, dep.config_path)
        return _start(dep, boot, args)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _write_plan_and_initrd(dep: Deployment, plan: dict, signer, kernel, args) -> None:
    from .initrd import prepare_initrd
    from .keys import write_signed_plan

    assert dep.plan_path is not None and dep.initrd is not None
    write_signed_plan(dep.plan_path, plan, signer)
    trust = trust_settings(args.trust or [], signer, args.allow_unsigned_plans)
    modules = [m.strip() for value in args.modules or [] for m in value.split(",") if m.strip()]
    result = prepare_initrd(kernel, dep.initrd, plan=dep.plan_path, extra_modules=modules,
                            trust=trust)
    dep.initrd_info = result.to_json()


def _print_dry_run(dep: Deployment, as_json: bool) -> int:
    if as_json:
        print(json.dumps(dep.to_json(), indent=2, sort_keys=True, default=str))
        return EXIT_OK
    print(f"# dry run: nothing was started or written; {dep.name} would be deployed in "
          f"{dep.directory} ({dep.hypervisor})")
    for line in dep.log:
        print(f"# {line}")
    print(f"# ---- {dep.config_path}")
    print(dep.config_text, end="")
    if dep.plan is not None:
        print(f"# ---- {dep.plan_path} (appended, with its signature, to {dep.initrd})")
        print(json.dumps(dep.plan, indent=2, sort_keys=True))
    return EXIT_OK


def _start(dep: Deployment, boot: BootFunction | None, args: argparse.Namespace) -> int:
    assert boot is not None
    states = dep.directory.parent
    if not args.json:
        for line in dep.log:
            print(line)
        if dep.initrd_info is not None:
            base = dep.initrd_info["base"]
            print(f"plan:    {dep.plan_path}" + (" (signed)" if args.sign_key else " (unsigned)"))
            print(f"initrd:  {dep.initrd}  {dep.initrd_info['size'] / 2**20:.1f} MiB "
                  f"(base {'from cache' if base['cached'] else 'built'}, plan "
                  f"{dep.initrd_info['plan_segment']} bytes, {dep.initrd_info['seconds']:.2f} s)")
        print(f"config:  {dep.config_path}")
        for path in dep.nfs_exports:
            print(f"NFS exports: {path}")
        print(f"starting {dep.name} under {dep.hypervisor} ...", flush=True)
    code = boot(dep.config_path, timeout=args.timeout, after=args.after, state_dir=states,
                as_json=False, quiet=args.json)
    if args.json:
        doc = dep.to_json()
        report_path = dep.directory / "report.json"
        doc["report"] = json.loads(report_path.read_text()) if report_path.is_file() else None
        doc["exit_code"] = code
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
    return code


def add_parsers(sub) -> None:
    """Register ``supercharge deploy``."""
    p = sub.add_parser("deploy", help="process a container, build its initrd, write its xl config, "
                                      "start the domain and report its boot")
    p.add_argument("container", help="the domain's container file")
    p.add_argument("--hypervisor", default="qemu", choices=HYPERVISORS,
                   help="qemu (default; TCG unless --accel kvm) or xen (xl create)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the xl config and the plan; start nothing, write nothing")
    p.add_argument("--state-dir", help="where NAME/ (config, plan, initrd, console, report) goes "
                                       "(default /var/lib/supercharge/domains)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a guest that has not finished its report is ended")
    p.add_argument("--after", default="wait", choices=("wait", "stop"),
                   help="once the real init runs: wait for the guest to power off, or stop it")
    p.add_argument("--accel", default=None, help="qemu accelerator: tcg (default) or kvm")
    p.add_argument("--sign-key", metavar="SECKEY",
                   help="sign the plan (and what the container stores); the initrd trusts its key")
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="another key the initrd trusts (repeatable); fetched artifacts with a "
                        ".minisig are checked against these keys")
    p.add_argument("--allow-unsigned-plans", action="store_true",
                   help="development only: deploy an unsigned plan")
    p.add_argument("--kernel", help="cached kernel version, or a vmlinuz path (with --modules-dir); "
                                    "default: the container's kernel, else the newest cached one")
    p.add_argument("--modules-dir", help="lib/modules/VERSION of a kernel given as a file")
    p.add_argument("--modules", action="append", metavar="M1,M2",
                   help="extra kernel modules for the initrd")
    p.add_argument("--dir", help="working directory for fetched and expanded archives "
                                 "(default: the domain's state directory)")
    p.add_argument("--log", help="append one line per expression to this file")
    p.set_defaults(func=deploy)
