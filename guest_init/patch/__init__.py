"""The patch engine: unified diffs applied to file trees, identical to GNU patch.

A personality is mostly small diffs against shared images, applied by the
agent at boot (no GNU patch in the initramfs) and by dom0 before boot; both
call :func:`apply_patch`.  Results match ``patch -p1 --fuzz 2`` byte for byte
(placement with offsets and fuzz follows GNU patch 2.7.6), a patch applies
to a tree completely or not at all, a patch already applied is recognised so
a second boot converges, and a hunk that does not fit is reported as data
(:class:`PatchResult`) with the closest place it would fit.

Modules: :mod:`.parse` (reading diffs), :mod:`.place` (GNU placement),
:mod:`.tree` (safe paths, staging, commit), :mod:`.apply` (the whole patch),
:mod:`.diagnose` (failure evidence, rendering), :mod:`.binary` (git binary
patches), :mod:`.generate` (diffing two trees).  Standard library only;
difflib, hashlib and the binary code are imported only when needed.
"""
from __future__ import annotations

from .apply import apply_patch
from .model import (
    FilePatch,
    FileResult,
    Hunk,
    HunkResult,
    PatchParseError,
    PatchResult,
    UnsafePatchPath,
)
from .parse import parse_patch

__all__ = [
    "apply_patch",
    "parse_patch",
    "FilePatch",
    "FileResult",
    "Hunk",
    "HunkResult",
    "PatchParseError",
    "PatchResult",
    "UnsafePatchPath",
]
