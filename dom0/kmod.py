"""Kernel module load order, computed on dom0 from depmod's files (no modprobe in the guest).

Why: the initramfs has no modprobe; the agent just calls finit_module on a list.
So dom0 computes, once, the closure of the requested modules and an order in
which every module comes after everything it needs:

- ``modules.dep`` gives the hard dependencies (symbols a module uses).
- ``modules.softdep`` gives "pre:"/"post:" soft dependencies that modules.dep
  does not show; ext4 needs ``crypto-crc32c`` (an alias) loaded first, or the
  mount fails (initramfs-notes.md pitfall 8). Names there are module names or
  aliases; aliases are resolved through ``modules.alias`` (fnmatch patterns),
  taking every matching module, as ``modprobe`` does. Like kmod, words in a
  softdep line before any "pre:"/"post:" are ignored.
- ``modules.builtin`` (and aliases in ``modules.builtin.modinfo``) say what is
  compiled in and needs no loading.

Module names compare with '-' and '_' equal ("xen-blkfront" == "xen_blkfront").
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dom0.errors import UserError

_KO_SUFFIX = re.compile(r"\.ko(\.(xz|zst|gz))?$")
_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class KernelModule:
    """One module to load. ``relpath`` is as written in modules.dep (relative to
    the modules dir); ``softdep`` is True when the module is only there because of
    a soft dependency: loading it may fail harmlessly (e.g. ``crc32c_intel`` on a
    CPU without SSE4.2, when ``crc32c_generic`` is also in the list)."""

    name: str
    relpath: str
    path: Path
    softdep: bool = False
    # The requested modules that pull this one in: the agent skips a file
    # system's whole closure when the plan mounts nothing of that type.
    wanted_by: tuple[str, ...] = ()


@dataclass
class ModulePlan:
    """What :func:`resolve_modules` returns.

    ``order``: modules to load, each after all of its dependencies.
    ``builtin``: requested names that are compiled into the kernel (nothing to load).
    ``skipped_softdeps``: (module, softdep name, reason) for soft dependencies that
    resolved to no loadable module ("builtin" or "not found"); informational.
    """

    order: list[KernelModule] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)
    skipped_softdeps: list[tuple[str, str, str]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [m.name for m in self.order]


def normalize(name: str) -> str:
    """Module name as the kernel sees it: '-' becomes '_'."""
    return name.strip().replace("-", "_")


def normalize_alias(alias: str) -> str:
    """Alias normalisation as kmod does it: '-' becomes '_' except inside [...] classes."""
    out = []
    depth = 0
    for ch in alias.strip():
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append("_" if ch == "-" and not depth else ch)
    return "".join(out)


def module_name(relpath: str) -> str:
    """Normalised module name from a modules.dep path (any of .ko, .ko.xz, .ko.zst, .ko.gz)."""
    base = relpath.rsplit("/", 1)[-1]
    return normalize(_KO_SUFFIX.sub("", base))


class ModuleIndex:
    """The parsed depmod files of one kernel's modules directory."""

    def __init__(self, modules_dir: Path) -> None:
        self.modules_dir = Path(modules_dir)
        self.relpaths: dict[str, str] = {}   # name -> relpath
        self.deps: dict[str, list[str]] = {}  # name -> names, as listed
        self.pre: dict[str, list[str]] = {}   # name -> softdep names (unresolved)
        self.post: dict[str, list[str]] = {}
        self.builtin: set[str] = set()
        self.builtin_aliases: set[str] = set()
        self._exact_aliases: dict[str, list[str]] = {}
        # (literal prefix before the first wildcard, pattern, module): the prefix
        # check avoids compiling thousands of pci:/usb: patterns per lookup.
        self._pattern_aliases: list[tuple[str, str, str]] = []
        self._lookups: dict[str, tuple[list[str], str]] = {}
        self._read_dep()
        self._read_softdep()
        self._read_alias()
        self._read_builtin()

    # -- parsing ------------------------------------------------------------

    def _lines(self, filename: str) -> list[str]:
        path = self.modules_dir / filename
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]

    def _read_dep(self) -> None:
        path = self.modules_dir / "modules.dep"
        if not path.is_file():
            raise UserError(
                f"{path} not found: run 'depmod -b <root> <kernel-version>' on the kernel's modules first"
            )
        for lineno, line in enumerate(self._lines("modules.dep"), 1):
            head, sep, tail = line.partition(":")
            if not sep:
                raise UserError(f"{path}:{lineno}: expected 'module.ko: deps...', got {line!r}")
            name = module_name(head.strip())
            self.relpaths.setdefault(name, head.strip())
            self.deps.setdefault(name, [module_name(d) for d in tail.split()])

    def _read_softdep(self) -> None:
        for line in self._lines("modules.softdep"):
            words = line.split()
            if len(words) < 3 or words[0] != "softdep":
                continue
            name = normalize(words[1])
            mode = None
            for word in words[2:]:
                if word in ("pre:", "post:"):
                    mode = word
                elif mode == "pre:":
                    self.pre.setdefault(name, []).append(word)
                elif mode == "post:":
                    self.post.setdefault(name, []).append(word)

    def _read_alias(self) -> None:
        for line in self._lines("modules.alias"):
            words = line.split()
            if len(words) != 3 or words[0] != "alias":
                continue
            pattern, target = normalize_alias(words[1]), normalize(words[2])
            if _WILDCARDS & set(pattern):
                prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
                self._pattern_aliases.append((prefix, pattern, target))
            else:
                self._exact_aliases.setdefault(pattern, []).append(target)

    def _read_builtin(self) -> None:
        self.builtin = {module_name(line) for line in self._lines("modules.builtin")}
        try:
            raw = (self.modules_dir / "modules.builtin.modinfo").read_bytes()
        except FileNotFoundError:
            return
        for record in raw.split(b"\0"):
            key, sep, value = record.decode("utf-8", "replace").partition("=")
            if sep and key.endswith(".alias"):
                self.builtin_aliases.add(normalize_alias(value))

    # -- lookups ------------------------------------------------------------

    def is_builtin(self, name: str) -> bool:
        n = normalize(name)
        return n in self.builtin or normalize_alias(name) in self.builtin_aliases

    def alias_targets(self, alias: str) -> list[str]:
        """Every module name an alias matches (exact entries, then fnmatch patterns), in file order."""
        key = normalize_alias(alias)
        found = list(self._exact_aliases.get(key, []))
        found += [
            t for prefix, pattern, t in self._pattern_aliases
            if key.startswith(prefix) and fnmatch.fnmatchcase(key, pattern)
        ]
        return list(dict.fromkeys(found))

    def lookup(self, name: str) -> tuple[list[str], str]:
        """Loadable modules for a module name or alias, and why none if empty.

        Returns ``(names, "")`` on success, ``([], "builtin")`` when compiled in,
        ``([], "not found")`` otherwise.
        """
        if name not in self._lookups:
            self._lookups[name] = self._lookup(name)
        found, reason = self._lookups[name]
        return list(found), reason

    def _lookup(self, name: str) -> tuple[list[str], str]:
        n = normalize(name)
        if n in self.builtin:
            return [], "builtin"
        if n in self.relpaths:
            return [n], ""
        targets = [t for t in self.alias_targets(name) if t in self.relpaths and t not in self.builtin]
        if targets:
            return targets, ""
        if self.is_builtin(name) or any(t in self.builtin for t in self.alias_targets(name)):
            return [], "builtin"
        return [], "not found"


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> ModulePlan:
    """The load order for ``names`` and everything they need, as a :class:`ModulePlan`.

    Deterministic: requested modules are taken in the given order, each preceded
    by its pre-softdeps and hard dependencies (depth first, modules.dep order) and
    followed by its post-softdeps. Hard edges always hold; a soft edge that would
    contradict them (a cycle) is dropped.
    """
    index = ModuleIndex(modules_dir)
    plan = ModulePlan()
    roots = _resolve_roots(index, names, plan)
    members = _closure(index, roots, plan)
    required = _hard_closure(index, roots)
    before, after = _edges(index, members)
    per_root = {root: _closure(index, [root], None) for root in roots}
    for name in _order(roots, before, after):
        relpath = index.relpaths[name]
        path = index.modules_dir / relpath
        if not path.is_file():
            raise UserError(f"module '{name}' is listed in {index.modules_dir / 'modules.dep'} but {path} is missing")
        wanted_by = tuple(root for root in roots if name in per_root[root])
        plan.order.append(KernelModule(name, relpath, path, softdep=name not in required,
                                       wanted_by=wanted_by))
    return plan


def _resolve_roots(index: ModuleIndex, names: Iterable[str], plan: ModulePlan) -> list[str]:
    """Requested names to module names; builtins are recorded, unknown names are errors."""
    roots: list[str] = []
    for raw in names:
        found, reason = index.lookup(raw)
        if reason == "builtin":
            if normalize(raw) not in plan.builtin:
                plan.builtin.append(normalize(raw))
            continue
        if not found:
            raise UserError(f"module '{raw}' not found in {index.modules_dir / 'modules.dep'}")
        roots.extend(n for n in found if n not in roots)
    return roots


def _soft_targets(index: ModuleIndex, module: str, kind: str, plan: ModulePlan | None) -> list[str]:
    table = index.pre if kind == "pre" else index.post
    targets: list[str] = []
    for soft in table.get(module, []):
        found, reason = index.lookup(soft)
        if not found and plan is not None:
            entry = (module, soft, reason)
            if entry not in plan.skipped_softdeps:
                plan.skipped_softdeps.append(entry)
        targets.extend(t for t in found if t != module and t not in targets)
    return targets


def _closure(index: ModuleIndex, roots: list[str], plan: ModulePlan | None) -> set[str]:
    """Every module reachable from the roots through hard and soft dependencies."""
    seen: set[str] = set()
    stack = list(reversed(roots))
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        nxt = index.deps.get(name, []) + _soft_targets(index, name, "pre", plan) \
            + _soft_targets(index, name, "post", plan)
        stack.extend(n for n in reversed(nxt) if n not in seen)
    for name in seen:
        for dep in index.deps.get(name, []):
            if dep not in index.relpaths:
                raise UserError(f"module '{name}' depends on '{dep}', which is not in modules.dep")
    return seen


def _hard_closure(index: ModuleIndex, roots: list[str]) -> set[str]:
    """Modules that must load: the roots and their modules.dep dependencies."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(index.deps.get(name, []))
    return seen


def _reaches(before: dict[str, list[str]], start: str, goal: str) -> bool:
    """True if ``goal`` must load before ``start`` (transitively) under ``before``."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(before.get(node, []))
    return False


def _edges(index: ModuleIndex, members: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``before[x]``: modules to load before x; ``after[x]``: post-softdeps of x.

    Hard edges first; soft edges are added one by one in a fixed order and
    dropped if they would make a cycle.
    """
    before: dict[str, list[str]] = {m: [d for d in index.deps.get(m, []) if d in members] for m in members}
    after: dict[str, list[str]] = {m: [] for m in members}
    for module in sorted(members):
        slot = 0  # pre-softdeps go before the hard deps, in their own order
        for target in _soft_targets(index, module, "pre", None):
            if target in members and not _reaches(before, target, module):
                before[module].insert(slot, target)
                slot += 1
        for target in _soft_targets(index, module, "post", None):
            if target in members and not _reaches(before, module, target):
                before[target].append(module)
                after[module].append(target)
    return before, after


def _order(roots: list[str], before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    """Depth-first topological order: a module right after what it needs.

    Post-softdeps are visited once the current root is finished, not from inside
    the recursion: a post target may also need a module that is still being
    visited higher up the stack.
    """
    order: list[str] = []
    done: set[str] = set()
    pending: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        done.add(name)  # the edges are acyclic, so marking on entry is safe
        for dep in before[name]:
            visit(dep)
        order.append(name)
        pending.extend(after[name])

    for root in roots:
        visit(root)
        while pending:
            visit(pending.pop(0))
    return order


def read_module_list(path: Path) -> list[str]:
    """Module names from a list file: one per line, '#' comments and blank lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"module list {path} not found") from None
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        if len(content.split()) != 1:
            raise UserError(f"{path}:{lineno}: expected one module name, got {content!r}")
        names.append(content)
    return names
