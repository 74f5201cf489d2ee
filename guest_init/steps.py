"""The plan's file operations, staged into a :class:`~guest_init.transaction.Transaction`.

Each applier changes only the transaction (nothing in the target) and returns
the details for the boot report; the apply stage commits once every step has
succeeded.  Engines that work on directories (the patch engine, archive
extraction) run on a scratch tree in the initramfs holding just the files
they touch, and their result is taken back into the transaction.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .plan import CopyStep, ExtractStep, PatchStep, ReplaceStep, Step
from .transaction import Transaction, TransactionError


class StepFailed(Exception):
    """A step cannot be applied; ``details`` go into the report as they are."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def _replace(txn: Transaction, step: ReplaceStep, artifact: Path | None, scratch: Path) -> dict:
    created = txn.write(step.path, step.content, mode=step.mode, uid=step.uid, gid=step.gid)
    return {"path": step.path, "bytes": len(step.content), "mode": f"{step.mode:04o}", "created": created}


def _copy(txn: Transaction, step: CopyStep, artifact: Path | None, scratch: Path) -> dict:
    assert artifact is not None
    created = txn.write(step.path, source=artifact, mode=step.mode, uid=step.uid, gid=step.gid)
    return {"path": step.path, "uri": step.source.uri, "bytes": artifact.stat().st_size,
            "mode": f"{step.mode:04o}", "created": created}


def _under(base: str, rel: str) -> str:
    return (base.rstrip("/") + "/" + rel.lstrip("/")) if base != "/" else "/" + rel.lstrip("/")


def _patch(txn: Transaction, step: PatchStep, artifact: Path | None, scratch: Path) -> dict:
    from .patch import PatchParseError, apply_patch, parse_patch

    assert artifact is not None
    data = artifact.read_bytes()
    try:
        files = parse_patch(data, strip=step.strip, source=step.source.uri)
    except PatchParseError as exc:
        raise StepFailed(f"patch {step.source.uri}: {exc}", {"uri": step.source.uri}) from None
    rels = sorted({p for f in files for p in (f.old_path, f.new_path, *f.alternatives) if p})
    guest_paths = [_under(step.dir, rel) for rel in rels]
    txn.materialize(guest_paths, scratch, base=step.dir)
    # The scratch copy is in the initramfs: the transaction makes the result durable once.
    result = apply_patch(data, scratch, strip=step.strip, source=step.source.uri, durable=False)
    if result.status == "failed":
        raise StepFailed(f"patch {step.source.uri} does not apply under {step.dir}",
                         {"uri": step.source.uri, "dir": step.dir, "diagnosis": result.to_json(),
                          "rendered": result.render()})
    changed = txn.absorb(guest_paths, scratch, base=step.dir) if result.status == "applied" else []
    return {"uri": step.source.uri, "dir": step.dir, "status": result.status, "files": changed,
            "result": result.to_json()}


def _extract(txn: Transaction, step: ExtractStep, artifact: Path | None, scratch: Path) -> dict:
    from .archive import ArchiveError, extract_archive

    assert artifact is not None
    tree = scratch / "tree"
    try:
        stats = extract_archive(artifact, tree)
    except ArchiveError as exc:
        raise StepFailed(f"extract {step.source.uri}: {exc}", {"uri": step.source.uri}) from None
    count = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            src = Path(dirpath) / name
            guest = _under(step.dir, str(src.relative_to(tree)))
            if src.is_symlink():
                txn.symlink(guest, os.readlink(src))
            else:
                txn.write(guest, source=src, mode=src.stat().st_mode & 0o7777)
            count += 1
    return {"uri": step.source.uri, "dir": step.dir, "files": count,
            "bytes": getattr(stats, "bytes", None)}


APPLIERS: dict[str, Callable[[Transaction, Any, Path | None, Path], dict]] = {
    "replace": _replace,
    "copy": _copy,
    "patch": _patch,
    "extract": _extract,
}


def apply_step(txn: Transaction, step: Step, artifact: Path | None, scratch: Path) -> dict:
    """Stage one step; raises :class:`StepFailed` with report details."""
    applier = APPLIERS.get(step.op)
    if applier is None:
        raise StepFailed(f"operation '{step.op}' is not supported by this agent", {"op": step.op})
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return applier(txn, step, artifact, scratch)
    except TransactionError as exc:
        raise StepFailed(str(exc), {"op": step.op}) from None
    except OSError as exc:
        raise StepFailed(f"{step.op}: {exc.strerror or exc}", {"op": step.op}) from None


def clean_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
