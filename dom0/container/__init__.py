"""Container files: xl configuration plus the paper's bracketed expressions.

``parse_container`` / ``load_container`` give a :class:`Container` (the xl
settings, and the expressions as typed nodes in file order); the language is
documented in docs/container.md.

The names are loaded on first use (PEP 562): ``supercharge`` registers this
package's subcommand on every start, and the parser and model are only
needed when a container is actually processed.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_MODEL = ("Container", "Copy", "Create", "Export", "Expr", "FileChange", "Hook", "Image", "Mount", "NfsExport", "Owner",
          "Patch", "Populate", "Replace", "Span")
_PARSE = ("EXPRESSIONS", "ExprSpec", "load_container", "parse_container", "trim_body")

__all__ = [*_PARSE, *_MODEL]


def __getattr__(name: str) -> Any:
    if name in _MODEL:
        return getattr(import_module("dom0.container.model"), name)
    if name in _PARSE:
        return getattr(import_module("dom0.container.parse"), name)
    raise AttributeError(f"module 'dom0.container' has no attribute {name!r}")
