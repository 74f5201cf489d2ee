"""Container files: xl configuration plus the paper's bracketed expressions.

``parse_container`` / ``load_container`` give a :class:`Container` (the xl
settings, and the expressions as typed nodes in file order); the language is
documented in docs/container.md.
"""
from __future__ import annotations

from dom0.container.model import (
    Container,
    Copy,
    Create,
    Expr,
    FileChange,
    Hook,
    Image,
    Mount,
    Owner,
    Patch,
    Populate,
    Replace,
    Span,
)
from dom0.container.parse import (
    EXPRESSIONS,
    ExprSpec,
    load_container,
    parse_container,
    trim_body,
)

__all__ = [
    "EXPRESSIONS",
    "Container",
    "Copy",
    "Create",
    "Expr",
    "ExprSpec",
    "FileChange",
    "Hook",
    "Image",
    "Mount",
    "Owner",
    "Patch",
    "Populate",
    "Replace",
    "Span",
    "load_container",
    "parse_container",
    "trim_body",
]
