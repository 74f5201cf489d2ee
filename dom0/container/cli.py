"""``supercharge container`` and ``vm-container`` (the paper's Figure 2 command line)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..atomic import write_atomically
from ..errors import EXIT_OK, UserError


def _atomic_write(path: Path, text: str) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, [text.encode()])


def run_containers(files: list[str], stripped: str, plan: str | None, log: str | None,
                   workdir: str | None, as_json: bool, trust: list[str] | None = None,
                   require_signatures: bool = False, sign_key: str | None = None) -> int:
    from .parse import load_container
    from .process import Workspace, process_container, write_nfs_exports

    if len(files) > 1 and plan is not None:
        raise UserError("--plan names one file; with several containers the plans go beside the "
                        "stripped configs in the --stripped directory")
    containers = [load_container(Path(f)) for f in files]   # parse all first: fail before changing anything
    out_dir = Path(stripped) if len(files) > 1 else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(Path(workdir) if workdir else Path(files[0]).resolve().parent)
    _set_trust(workspace, trust or [], require_signatures, sign_key)
    summary = []

    def append_log(lines: list[str]) -> None:
        # Written as each container ends, so a later failure does not lose what was done.
        if log and lines:
            with open(log, "a") as out:
                out.writelines(line + "\n" for line in lines)

    for container in containers:
        try:
            result = process_container(container, workspace)
        except UserError as exc:
            done = [entry.line() for entry in getattr(exc, "log", [])]
            append_log(done + [f"{str(exc).splitlines()[0]} (FAILED, exit code {exc.exit_code})"])
            raise
        stem = Path(container.path).stem
        cfg_path = out_dir / f"{stem}.cfg" if out_dir else Path(stripped)
        _atomic_write(cfg_path, result.stripped)
        plan_path = None
        if result.plan is not None:
            plan_path = (out_dir / f"{stem}.plan.json" if out_dir
                         else Path(plan) if plan else cfg_path.with_name(cfg_path.name + ".plan.json"))
            if plan_path.is_dir():
                raise UserError(f"{plan_path}: is a directory; expected a file name")
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            from ..keys import write_signed_plan

            write_signed_plan(plan_path, result.plan, workspace.signer)
        exports = write_nfs_exports(result, cfg_path)
        append_log([entry.line() for entry in result.log])
        summary.append({"container": container.path, "stripped": str(cfg_path),
                        "plan": str(plan_path) if plan_path else None,
                        "nfs_exports": [str(p) for p in exports],
                        "expressions": [vars(e) for e in result.log]})
        if not as_json:
            for entry in result.log:
                print(entry.line())
            print(f"stripped config: {cfg_path}" + (f"\nplan: {plan_path}" if plan_path else ""))
            for path in exports:
                print(f"NFS exports: {path}")
    if as_json:
        print(json.dumps(summary if len(summary) > 1 else summary[0], indent=2, default=str))
    return EXIT_OK


def _set_trust(workspace, trust: list[str], require: bool, sign_key: str | None) -> None:
    if require and not trust:
        raise UserError("--require-signatures needs --trust PUBKEY: the keys signatures are checked with")
    if trust:
        from guest_init.trust import TrustError, load_trusted_keys

        for path in trust:
            if not Path(path).exists():
                raise UserError(f"{path}: trusted key not found")
        try:
            workspace.trust_keys = load_trusted_keys(trust)
        except TrustError as exc:
            raise UserError(str(exc)) from None
    workspace.require_signatures = require
    if sign_key is not None:
        from ..keys import signing_key

        workspace.signer = signing_key(sign_key)


def _trust_options(p) -> None:
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="verify fetched archives, patches and files against these keys (URI.minisig)")
    p.add_argument("--require-signatures", action="store_true",
                   help="refuse anything fetched without a valid signature from a --trust key")
    p.add_argument("--sign-key", metavar="SECKEY",
                   help="sign what is produced (created and forked archives, patches, the plan)")


def add_parser(sub) -> None:
    p = sub.add_parser("container", help="process container files: build, fetch, patch, fork; write "
                                         "the stripped xl config and the boot plan")
    p.add_argument("files", nargs="+", metavar="FILE", help="container file(s)")
    p.add_argument("--stripped", required=True,
                   help="where the stripped xl config goes (a directory when several files are given)")
    p.add_argument("--plan", help="where the boot plan goes (default: STRIPPED.plan.json)")
    p.add_argument("--log", help="append one line per expression to this file")
    p.add_argument("--dir", help="working directory for fetched and expanded archives "
                                 "(default: the container's directory)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _trust_options(p)
    p.set_defaults(func=lambda a: run_containers(a.files, a.stripped, a.plan, a.log, a.dir, a.json,
                                                 a.trust, a.require_signatures, a.sign_key))


def vm_container_main(argv: list[str] | None = None) -> int:
    """The paper's Figure 2: vm-container --container F --stripped OUT --log LOG --dir DIR."""
    parser = argparse.ArgumentParser(prog="vm-container",
                                     description="Process a domain container file (Supercharge).")
    parser.add_argument("--container", required=True)
    parser.add_argument("--stripped", required=True)
    parser.add_argument("--log")
    parser.add_argument("--dir")
    parser.add_argument("--plan")
    _trust_options(parser)
    args = parser.parse_args(argv)
    try:
        return run_containers([args.container], args.stripped, args.plan, args.log, args.dir, False,
                              args.trust, args.require_signatures, args.sign_key)
    except UserError as exc:
        print(f"vm-container: {exc}", file=sys.stderr)
        return exc.exit_code
