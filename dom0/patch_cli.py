"""``supercharge patch apply|diff``: the patch engine on the command line.

The same engine the agent runs at boot (:mod:`guest_init.patch`), so an admin
can try a personality patch against an unpacked image in dom0 and see exactly
what the guest would do, including the diagnosis of a hunk that does not fit.

Exit codes (docs/patch.md): 0 applied or already applied, 1 a hunk did not
fit (nothing changed), 2 bad input (unreadable or malformed patch, missing
tree, unsafe path), raised as :class:`~dom0.errors.UserError` so that
``cli.main`` prints one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EXIT_FAILED, EXIT_OK, UserError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``patch`` with its ``apply`` and ``diff`` actions to the top-level subparsers."""
    patch = subparsers.add_parser("patch", help="apply or make unified diffs of file trees",
                                  description="Apply a unified diff to a tree (all or nothing, "
                                  "as GNU patch places hunks), or diff two trees.")
    actions = patch.add_subparsers(dest="patch_command", required=True, metavar="ACTION")

    apply = actions.add_parser("apply", help="apply a unified diff to a tree, completely or not at all")
    apply.add_argument("patch", metavar="PATCH", help="the patch file ('-' for standard input)")
    apply.add_argument("--dir", required=True, metavar="TREE", help="the tree to patch")
    apply.add_argument("-p", "--strip", type=int, default=1, metavar="N",
                       help="leading path components to strip from names (default 1, as for git diffs)")
    apply.add_argument("--fuzz", type=int, default=2, metavar="N",
                       help="context lines that may be ignored at each end of a hunk (default 2)")
    apply.add_argument("--dry-run", action="store_true", help="report what would happen, change nothing")
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    apply.set_defaults(func=cmd_patch_apply)

    diff = actions.add_parser("diff", help="write a git-style unified diff from OLD_TREE to NEW_TREE")
    diff.add_argument("old_tree", metavar="OLD_TREE")
    diff.add_argument("new_tree", metavar="NEW_TREE")
    diff.add_argument("-o", "--output", metavar="FILE", help="write the patch here (default: stdout)")
    diff.set_defaults(func=cmd_patch_diff)


def _read_patch(name: str) -> tuple[bytes, str]:
    if name == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    path = Path(name)
    try:
        return path.read_bytes(), name
    except FileNotFoundError:
        raise UserError(f"{name}: no such patch file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a patch file") from None
    except OSError as exc:
        raise UserError(f"{name}: cannot read the patch: {exc.strerror or exc}") from None


def _need_dir(name: str, what: str) -> Path:
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name}: {what} does not exist")
    if not path.is_dir():
        raise UserError(f"{name}: {what} is not a directory")
    return path


def cmd_patch_apply(args: argparse.Namespace) -> int:
    """``patch apply``: 0 applied/already applied, 1 did not fit, 2 bad input."""
    from guest_init.patch import PatchParseError, apply_patch

    if args.strip < 0:
        raise UserError(f"-p {args.strip}: the strip count cannot be negative")
    if args.fuzz < 0:
        raise UserError(f"--fuzz {args.fuzz}: the fuzz cannot be negative")
    data, source = _read_patch(args.patch)
    tree = _need_dir(args.dir, "the tree to patch")
    try:
        result = apply_patch(data, tree, strip=args.strip, dry_run=args.dry_run, fuzz=args.fuzz,
                             source=source)
    except PatchParseError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(result.render())
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_patch_diff(args: argparse.Namespace) -> int:
    """``patch diff``: the git-style patch that turns OLD_TREE into NEW_TREE (exit 0)."""
    from guest_init.patch.generate import diff_trees

    old = _need_dir(args.old_tree, "OLD_TREE")
    new = _need_dir(args.new_tree, "NEW_TREE")
    try:
        patch = diff_trees(old, new)
    except OSError as exc:
        raise UserError(f"cannot diff {old} and {new}: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if exc.filename else "")) from None
    if args.output:
        try:
            Path(args.output).write_bytes(patch)
        except OSError as exc:
            raise UserError(f"{args.output}: cannot write the patch: {exc.strerror or exc}") from None
    else:
        sys.stdout.buffer.write(patch)
        sys.stdout.buffer.flush()
    return EXIT_OK
