"""Parse container files: xl.cfg(5) statements mixed with bracketed expressions.

The xl statements go through :mod:`dom0.xlcfg` (its :class:`~dom0.xlcfg.Lexer`,
:func:`~dom0.xlcfg.skip_separators`, :func:`~dom0.xlcfg.parse_setting` and
:meth:`~dom0.xlcfg.XlConfig.add`), so duplicate keys, quoting and lists behave
exactly as in a plain domain config.  When a statement starts with ``[``, this
module takes over the raw text up to the expression's ``[end]``, then hands
the rest back to the lexer.

An expression is ``[NAME ARGS... OPTIONS...`` then, optionally, a blank line
and a body, then ``]`` and ``[end]``.  What each NAME accepts is data:
:data:`EXPRESSIONS` maps it to an :class:`ExprSpec` (positional arguments,
options, whether a body is allowed, whether it may run at boot, and the
function that builds the typed node of :mod:`dom0.container.model`).  Adding
an expression is a dataclass in ``model.py`` plus one entry here.

The grammar, with every rule's reason, is in docs/container.md.
"""
from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dom0.container.model import (
    Container,
    Copy,
    Create,
    Export,
    Expr,
    Hook,
    Image,
    Mount,
    NfsExport,
    Patch,
    Populate,
    Replace,
    Span,
)
from dom0.errors import UserError
from dom0.xlcfg import (
    Lexer,
    Position,
    TokenKind,
    XlConfig,
    parse_setting,
    skip_separators,
    syntax_error,
)

URI_SCHEMES = ("file", "http", "https", "ftp")
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_IMAGE_SIZE = 64 << 10
MAX_IMAGE_SIZE = 16 << 40
IMAGE_FSTYPES = ("ext4", "ext3", "ext2", "xfs")
MOUNT_FSTYPES = ("ext4", "ext3", "ext2", "xfs", "btrfs", "vfat")
LABEL_MAX = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12}
MAX_HOOK_TIMEOUT = 86400
BODY_CLOSE_RE = re.compile(r"\][ \t\n]*\[end\]")
_LONE_CLOSE_RE = re.compile(r"^[ \t]*\][ \t]*(?:\n|\Z)", re.MULTILINE)
"""Where a body ends: the first ``]`` followed (after blanks) by ``[end]``."""

_VDEV_RE = re.compile(r"(?:xvd|sd|hd|vd)[a-z]{1,3}(?:[1-9][0-9]{0,2})?")
_LABEL_RE = re.compile(r"[A-Za-z0-9._-]+")
_HOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_OWNER_PART = r"(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10})"
_OWNER_RE = re.compile(rf"({_OWNER_PART}):({_OWNER_PART})")
_MODE_RE = re.compile(r"[0-7]{3,4}")
_SIZE_RE = re.compile(r"([0-9]+)([KMGTkmgt])(?:[iI]?[Bb])?")
_OPTION_LIKE_RE = re.compile(r"[a-z][a-z0-9-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------
# Words and value checks


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of an expression's header (quotes removed)."""

    text: str
    pos: Position
    start: int
    end: int
    quoted: bool = False


Converter = Callable[[Word], Any]


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _no_control(word: Word, what: str) -> None:
    if _CONTROL_RE.search(word.text):
        raise syntax_error(word.pos, f"{what} without control characters", _shown(word.text))


def convert_uri(word: Word) -> str:
    """A URI with scheme file (``file:///ABSOLUTE/PATH``), http, https or ftp."""
    text = word.text
    expected = "a URI (file:///PATH, http://HOST/PATH, https://HOST/PATH or ftp://HOST/PATH)"
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)
    if scheme is None:
        hint = " (a dom0 path needs file://, e.g. file:///var/images/x)" if text.startswith("/") else ""
        raise syntax_error(word.pos, expected, _shown(text) + hint)
    name = scheme.group(1).lower()
    if name not in URI_SCHEMES:
        raise syntax_error(word.pos, f"a URI scheme {', '.join(URI_SCHEMES[:-1])} or "
                           f"{URI_SCHEMES[-1]}", f"{scheme.group(1)!r} in {_shown(text)}")
    if any(char.isspace() for char in text) or _CONTROL_RE.search(text):
        raise syntax_error(word.pos, f"{expected} without spaces (write %20)", _shown(text))
    if not text[scheme.end():].startswith("//"):
        raise syntax_error(word.pos, f"'//' after '{scheme.group(1)}:' in {expected}", _shown(text))
    parts = urlsplit(text)
    if name == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise syntax_error(word.pos, "file:///ABSOLUTE/PATH (three slashes: file URIs name "
                               "a dom0 path, no host)", _shown(text))
        if parts.path == "/" or parts.query or parts.fragment:
            raise syntax_error(word.pos, "file:///ABSOLUTE/PATH naming a file, without '?' or '#'",
                               _shown(text))
        return text
    if not parts.hostname:
        raise syntax_error(word.pos, f"a host name in the {name} URI ({name}://HOST/PATH)",
                           _shown(text))
    try:
        port = parts.port  # urllib checks the range only when asked
    except ValueError:
        port = 0
    if port == 0:
        raise syntax_error(word.pos, f"a port number from 1 to 65535 in the {name} URI",
                           _shown(text))
    return text


def convert_host_path(word: Word) -> str:
    """A dom0 path (image file, source tree, mount point), kept as written."""
    if not word.text:
        raise syntax_error(word.pos, "a dom0 path", "an empty string")
    _no_control(word, "a dom0 path")
    return word.text


def convert_guest_path(word: Word) -> str:
    """An absolute path in the guest's file system, normalised (``//`` and a final ``/`` dropped)."""
    text = word.text
    if not text.startswith("/"):
        raise syntax_error(word.pos, "an absolute path (like /etc/hostname)", _shown(text))
    _no_control(word, "a path")
    parts = text.split("/")
    if any(part in (".", "..") for part in parts):
        raise syntax_error(word.pos, "a path without '.' or '..' components", _shown(text))
    return "/" + "/".join(part for part in parts if part)


def convert_file_path(word: Word) -> str:
    """A guest path naming a file: absolute, not ``/``, no trailing ``/``."""
    path = convert_guest_path(word)
    if path == "/" or word.text.endswith("/"):
        raise syntax_error(word.pos, "the path of a file (like /etc/hostname), not a directory",
                           _shown(word.text))
    return path


def convert_size(word: Word) -> int:
    """``50MB``, ``50M``, ``50MiB``, ``512K``, ``1G``, ``2T``: binary units, in bytes."""
    text = word.text
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        hint = ""
        if text.isdigit():
            hint = " (a unit is required: K, M, G or T)"
        elif re.fullmatch(r"[0-9]*\.[0-9]+.*", text):
            hint = " (whole numbers only: write 1536M for 1.5G)"
        raise syntax_error(word.pos, "a size like 50MB, 512K, 1G or 2T (K, M, G, T are "
                           "binary: 1M = 1048576 bytes)", _shown(text) + hint)
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise syntax_error(word.pos, "a size from 64K to 16T", f"{_shown(text)} ({size} bytes)")
    return size


def convert_vdev(word: Word) -> str:
    """A guest disk name for xl's ``vdev=``: ``xvdb``, ``sdc``, ``hda``, ``vdb``, with a partition."""
    if not _VDEV_RE.fullmatch(word.text):
        raise syntax_error(word.pos, "a guest disk name like xvdb (xvd, sd, hd or vd, then "
                           "letters, then an optional partition number)", _shown(word.text))
    return word.text


def convert_label(word: Word) -> str:
    """A file-system label: 1 to 16 letters, digits, '.', '_' or '-'."""
    if not _LABEL_RE.fullmatch(word.text) or len(word.text) > 16:
        raise syntax_error(word.pos, "a file-system label of 1 to 16 letters, digits, '.', '_' "
                           "or '-'", _shown(word.text))
    return word.text


def convert_mode(word: Word) -> int:
    """``0644``, ``755``, ``4755``: octal permission bits."""
    if not _MODE_RE.fullmatch(word.text):
        raise syntax_error(word.pos, "an octal mode of 3 or 4 digits like 0644", _shown(word.text))
    return int(word.text, 8)


def convert_owner(word: Word) -> tuple[str, str]:
    """``USER:GROUP``, each a name or a number."""
    match = _OWNER_RE.fullmatch(word.text)
    if match is None:
        raise syntax_error(word.pos, "USER:GROUP (names or numbers, like root:root or 33:33)",
                           _shown(word.text))
    return match.group(1), match.group(2)


def convert_base64(word: Word) -> bytes:
    """Standard base64 (RFC 4648, with padding), decoded."""
    try:
        return base64.b64decode(word.text, validate=True)
    except (binascii.Error, ValueError):
        raise syntax_error(word.pos, "base64 (A-Z, a-z, 0-9, '+', '/', and '=' padding) on one "
                           "line", _shown(word.text)) from None


def convert_hook_name(word: Word) -> str:
    if not _HOOK_NAME_RE.fullmatch(word.text):
        raise syntax_error(word.pos, "a hook name (letters, digits, '.', '_' or '-', at most 64)",
                           _shown(word.text))
    return word.text


def convert_at(word: Word) -> bool:
    if word.text != "boot":
        raise syntax_error(word.pos, "'at boot' (the only place an expression can be moved to)",
                           f"'at {word.text}'")
    return True


def convert_devices(word: Word) -> bool:
    if word.text != "allow":
        raise syntax_error(word.pos, "'devices allow' (device nodes in an archive are refused "
                           "unless allowed)", f"'devices {word.text}'")
    return True


def choice(values: tuple[str, ...], what: str) -> Converter:
    def convert(word: Word) -> str:
        if word.text not in values:
            raise syntax_error(word.pos, f"{what} {', '.join(values[:-1])} or {values[-1]}",
                               _shown(word.text))
        return word.text
    return convert


def whole_number(low: int, high: int, what: str) -> Converter:
    def convert(word: Word) -> int:
        if not re.fullmatch(r"[0-9]{1,12}", word.text) or not low <= int(word.text) <= high:
            raise syntax_error(word.pos, f"{what}: a whole number from {low} to {high}",
                               _shown(word.text))
        return int(word.text)
    return convert


def keep_word(word: Word) -> Word:
    """For arguments whose meaning depends on options (a patch's TARGET)."""
    return word


def trim_body(raw: str) -> str:
    """The body rule: blank lines at both ends dropped, exactly one newline at the end.

    A blank line holds only spaces and tabs.  Lines in between are kept as they
    are, indentation and blank lines included.  An empty body gives ``""``.
    """
    lines = raw.split("\n")
    while lines and not lines[0].strip(" \t"):
        lines.pop(0)
    while lines and not lines[-1].strip(" \t"):
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ArgSpec:
    """A positional argument: its name in messages (``PATH``) and the model field it fills."""

    name: str
    field: str
    convert: Converter
    optional: bool = False
    literal: str | None = None

    def accepts(self, word: Word) -> bool:
        """Whether an optional argument takes ``word`` (optional ones are URIs: they have '://')."""
        return not self.optional or "://" in word.text


@dataclass(frozen=True)
class OptionSpec:
    """``NAME VALUE`` among an expression's options."""

    name: str
    field: str
    metavar: str
    convert: Converter


@dataclass
class Parsed:
    """An expression's words, checked one by one; the builder checks them together."""

    spec: ExprSpec
    pos: Position
    span: Span
    values: dict[str, Any] = field(default_factory=dict)
    words: dict[str, Word] = field(default_factory=dict)
    option_pos: dict[str, Position] = field(default_factory=dict)
    body: str | None = None
    body_pos: Position | None = None

    def common(self) -> dict[str, Any]:
        """The keyword arguments every :class:`Expr` takes."""
        positions = {name: word.pos for name, word in self.words.items()}
        if self.body_pos is not None and self.spec.body != "none":
            positions.setdefault(self.spec.body, self.body_pos)
        return {"pos": self.pos, "span": self.span, "at_boot": bool(self.values.get("at_boot")),
                "allow_devices": bool(self.values.get("allow_devices")), "positions": positions}

    def fields(self, *names: str) -> dict[str, Any]:
        return {name: self.values[name] for name in names if name in self.values}


@dataclass(frozen=True)
class ExprSpec:
    """What one expression accepts, and how its node is built."""

    name: str
    args: tuple[ArgSpec, ...]
    options: dict[str, OptionSpec]
    body: Literal["none", "content", "script"]
    boot: Literal["never", "optional", "always"]
    build: Callable[[Parsed], Expr]

    @property
    def usage(self) -> str:
        parts = [self.name]
        for arg in self.args:
            parts.append(arg.literal or (f"[{arg.name}]" if arg.optional else arg.name))
        return "[" + " ".join(parts) + "]"

    @property
    def required(self) -> int:
        return sum(1 for arg in self.args if not arg.optional)


def _options(*specs: OptionSpec) -> dict[str, OptionSpec]:
    return {spec.name: spec for spec in specs}


OPT_ARCHIVE = OptionSpec("archive", "archive", "URI", convert_uri)
OPT_IMAGE = OptionSpec("image", "image", "PATH", convert_host_path)
OPT_PATCH_OUT = OptionSpec("patch-out", "patch_out", "URI", convert_uri)
OPT_FORK = OptionSpec("fork", "fork", "URI", convert_uri)
OPT_MODE = OptionSpec("mode", "mode", "MODE", convert_mode)
OPT_OWNER = OptionSpec("owner", "owner", "USER:GROUP", convert_owner)
OPT_AT = OptionSpec("at", "at_boot", "boot", convert_at)
OPT_CONTENT = OptionSpec("content-base64", "content", "BASE64", convert_base64)
OPT_DEVICES = OptionSpec("devices", "allow_devices", "allow", convert_devices)


# -- builders -----------------------------------------------------------------


def _file_system_fields(p: Parsed) -> dict[str, Any]:
    """replace and copy: in dom0 exactly one of archive/image; at boot neither, nor fork/patch-out."""
    name = p.spec.name
    if p.values.get("at_boot"):
        at = p.option_pos.get("at")
        where = f"; 'at boot' is at {at.line}:{at.col}" if at else ""
        for option in ("archive", "image", "patch-out", "fork"):
            if option in p.option_pos:
                raise syntax_error(p.option_pos[option], f"no '{option}' in a {name} that runs at "
                                   f"boot (at boot it changes the guest's own root{where})", repr(option))
    else:
        given = [option for option in ("archive", "image") if option in p.option_pos]
        if not given:
            raise syntax_error(p.pos, f"'archive URI' or 'image PATH' in this {name} (the file "
                               "system to change in dom0), or 'at boot' (the guest's root at "
                               "boot)", "none of them")
        if len(given) == 2:
            first, second = sorted(given, key=lambda o: (p.option_pos[o].line, p.option_pos[o].col))
            at = p.option_pos[first]
            raise syntax_error(p.option_pos[second], "one file system per expression: 'archive' "
                               "or 'image'", f"both ('{first}' at {at.line}:{at.col})")
    return p.fields("path", "archive", "image", "patch_out", "fork", "mode", "owner")


def build_replace(p: Parsed) -> Replace:
    fields = _file_system_fields(p)
    content = p.values.get("content")
    if content is not None and p.body is not None and p.body.strip(" \t\n"):
        at = p.option_pos["content-base64"]
        raise syntax_error(p.body_pos or p.pos, "either a body or 'content-base64', not both",
                           f"a body ('content-base64' is at {at.line}:{at.col})")
    if content is None:
        if p.body is None:
            raise syntax_error(p.pos, f"the new content of {p.values['path']}: a blank line then "
                               "the text, or 'content-base64 BASE64'", "neither")
        content = trim_body(p.body).encode("utf-8")
    return Replace(**p.common(), **fields, content=content)


def build_copy(p: Parsed) -> Copy:
    return Copy(**p.common(), **_file_system_fields(p), uri=p.values["uri"])


def build_create(p: Parsed) -> Create:
    return Create(**p.common(), **p.fields("src_dir", "uri"))


def build_image(p: Parsed) -> Image:
    fstype = p.values.get("fstype", "ext4")
    if "access" in p.option_pos and "export" not in p.option_pos:
        raise syntax_error(p.option_pos["access"], "'export VDEV' with 'access' (access says how "
                           "the exported disk is attached)", "'access' without 'export'")
    label = p.values["label"]
    if len(label) > LABEL_MAX[fstype]:
        raise syntax_error(p.words["label"].pos, f"a label of at most {LABEL_MAX[fstype]} "
                           f"characters for {fstype}", f"{label!r} ({len(label)})")
    return Image(**p.common(), **p.fields("path", "size", "label", "export", "access"),
                 fstype=fstype)


_COW_ONLY = ("overlay", "snapshot", "snapshot-size", "existing")


def build_export(p: Parsed) -> Export:
    """Checks that need several words: what a cow export is made of depends on PATH."""
    path, access = p.values["path"], p.values["access"]
    given = sorted((name for name in _COW_ONLY if name in p.option_pos),
                   key=lambda name: (p.option_pos[name].line, p.option_pos[name].col))
    if access != "cow" and given:
        raise syntax_error(p.option_pos[given[0]], f"'{given[0]}' only with access cow (it says how "
                           "the copy-on-write view is made)", f"'{given[0]}' with access {access}")
    if access == "cow" and path.startswith("/dev/"):
        if "overlay" in p.option_pos:
            raise syntax_error(p.option_pos["overlay"], "'snapshot NAME' for a logical volume "
                               f"(a cow export of {path} is an LVM snapshot; 'overlay' is for "
                               "image files)", "'overlay'")
        if p.values.get("format", "raw") != "raw":
            raise syntax_error(p.option_pos["format"], "format raw for an LVM snapshot",
                               f"format {p.values['format']}")
    elif access == "cow":
        for name in ("snapshot", "snapshot-size"):
            if name in p.option_pos:
                raise syntax_error(p.option_pos[name], f"'overlay PATH' for an image file ('{name}' "
                                   "is for a logical volume, a PATH under /dev/)", f"'{name}'")
    keep = p.values.get("existing", "keep") == "keep"
    return Export(**p.common(), **p.fields("path", "vdev", "access", "format", "overlay", "snapshot",
                                            "snapshot_size"), keep=keep)


def convert_lv_name(word: Word) -> str:
    """An LVM logical volume name: letters, digits, '+', '_', '.', '-', not starting with '-'."""
    if not re.fullmatch(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}", word.text) or word.text in (".", ".."):
        raise syntax_error(word.pos, "a logical volume name (letters, digits, '+', '_', '.' and '-', "
                           "not starting with '-', at most 127)", _shown(word.text))
    return word.text


def convert_lv_size(word: Word) -> int:
    """A snapshot's copy-on-write space: a size like 1G (binary units, whole MiB at least)."""
    size = convert_size(word)
    if size < 1 << 20:
        raise syntax_error(word.pos, "a snapshot size of at least 1M", _shown(word.text))
    return size


def build_populate(p: Parsed) -> Populate:
    return Populate(**p.common(), **p.fields("image", "mountpoint", "uri"))


def build_patch(p: Parsed) -> Patch:
    target_word: Word = p.values["target"]
    if p.values.get("at_boot"):
        for name, option in (("fork", "fork"), ("patch_out", "patch-out")):
            if name in p.words:
                raise syntax_error(p.words[name].pos, f"no {option} in a patch that runs at boot "
                                   "(it changes the guest's own root)", _shown(p.words[name].text))
        if "://" in target_word.text:
            raise syntax_error(target_word.pos, "the guest directory the patch applies in (like / "
                               "or /etc) as the TARGET of a patch at boot", _shown(target_word.text))
        target = convert_guest_path(target_word)
    elif target_word.text.startswith("/"):
        raise syntax_error(target_word.pos, "a URI as the TARGET of a patch in dom0 (file:///PATH "
                           "for an image or archive on dom0), or 'at boot' for a guest directory",
                           _shown(target_word.text))
    else:
        target = convert_uri(target_word)
    return Patch(**p.common(), target=target, **p.fields("patch", "fork", "patch_out", "strip"))


def build_hook(p: Parsed) -> Hook:
    script = trim_body(p.body or "")
    if not script:
        raise syntax_error(p.body_pos or p.pos, f"the script of hook {p.values['name']!r} after "
                           "a blank line", "an empty body" if p.body is not None else "no body")
    common = p.common()
    common["at_boot"] = True
    return Hook(**common, **p.fields("name", "timeout", "interpreter"), script=script)


def build_mount(p: Parsed) -> Mount:
    if "upper" in p.option_pos and p.values["access"] != "cow":
        raise syntax_error(p.option_pos["upper"], "'upper LABEL' only with access cow (it names the "
                           "copy-on-write layer)", f"'upper' with access {p.values['access']}")
    common = p.common()
    common["at_boot"] = True
    return Mount(**common, **p.fields("label", "target", "access", "fstype", "upper"))


def convert_ipv4(word: Word) -> str:
    """An IPv4 address: the guest mounts with mount(2) and resolves no names in the initramfs."""
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(word.text))
    except ValueError:
        raise syntax_error(word.pos, "an IPv4 address (the guest resolves no names before its "
                           "root is mounted)", _shown(word.text)) from None


def build_nfs(p: Parsed) -> NfsExport:
    if "server" not in p.values:
        raise syntax_error(p.pos, "'server ADDR' in an nfs expression (the address the guest "
                           "mounts from, e.g. 10.0.2.2 under qemu)", "no server")
    common = p.common()
    common["at_boot"] = True
    return NfsExport(**common, **p.fields("path", "target", "access", "server", "port", "pseudo",
                                           "squash"))


_FILE_OPTIONS = (OPT_ARCHIVE, OPT_IMAGE, OPT_PATCH_OUT, OPT_FORK, OPT_MODE, OPT_OWNER, OPT_AT, OPT_DEVICES)

EXPRESSIONS: dict[str, ExprSpec] = {
    "replace": ExprSpec(
        "replace", (ArgSpec("PATH", "path", convert_file_path),),
        _options(*_FILE_OPTIONS, OPT_CONTENT), body="content", boot="optional",
        build=build_replace),
    "copy": ExprSpec(
        "copy", (ArgSpec("PATH", "path", convert_file_path), ArgSpec("URI", "uri", convert_uri)),
        _options(*_FILE_OPTIONS), body="none", boot="optional", build=build_copy),
    "create": ExprSpec(
        "create", (ArgSpec("SRC_DIR", "src_dir", convert_host_path),
                   ArgSpec("URI", "uri", convert_uri)),
        {}, body="none", boot="never", build=build_create),
    "image": ExprSpec(
        "image", (ArgSpec("PATH", "path", convert_host_path), ArgSpec("SIZE", "size", convert_size),
                  ArgSpec("LABEL", "label", convert_label)),
        _options(OptionSpec("fstype", "fstype", "TYPE", choice(IMAGE_FSTYPES, "a type")),
                 OptionSpec("export", "export", "VDEV", convert_vdev),
                 OptionSpec("access", "access", "ro|rw", choice(("ro", "rw"), "access"))),
        body="none", boot="never", build=build_image),
    "export": ExprSpec(
        "export", (ArgSpec("PATH", "path", convert_host_path), ArgSpec("VDEV", "vdev", convert_vdev),
                   ArgSpec("ACCESS", "access", choice(("ro", "rw", "cow"), "access"))),
        _options(OptionSpec("format", "format", "raw|qcow2", choice(("raw", "qcow2"), "format")),
                 OptionSpec("overlay", "overlay", "PATH", convert_host_path),
                 OptionSpec("snapshot", "snapshot", "NAME", convert_lv_name),
                 OptionSpec("snapshot-size", "snapshot_size", "SIZE", convert_lv_size),
                 OptionSpec("existing", "existing", "keep|replace",
                            choice(("keep", "replace"), "existing"))),
        body="none", boot="never", build=build_export),
    "populate": ExprSpec(
        "populate", (ArgSpec("image", "", keep_word, literal="image"),
                     ArgSpec("IMAGE", "image", convert_host_path),
                     ArgSpec("MOUNTPOINT", "mountpoint", convert_host_path),
                     ArgSpec("URI", "uri", convert_uri)),
        _options(OPT_DEVICES), body="none", boot="never", build=build_populate),
    "patch": ExprSpec(
        "patch", (ArgSpec("TARGET", "target", keep_word), ArgSpec("PATCH_URI", "patch", convert_uri),
                  ArgSpec("FORK_URI", "fork", convert_uri, optional=True)),
        _options(OPT_FORK, OPT_PATCH_OUT,
                 OptionSpec("strip", "strip", "N", whole_number(0, 32, "strip")), OPT_AT, OPT_DEVICES),
        body="none", boot="optional", build=build_patch),
    "hook": ExprSpec(
        "hook", (ArgSpec("NAME", "name", convert_hook_name),),
        _options(OptionSpec("timeout", "timeout", "SECONDS",
                            whole_number(1, MAX_HOOK_TIMEOUT, "timeout")),
                 OptionSpec("interpreter", "interpreter", "PATH", convert_file_path), OPT_AT),
        body="script", boot="always", build=build_hook),
    "mount": ExprSpec(
        "mount", (ArgSpec("LABEL", "label", convert_label),
                  ArgSpec("TARGET", "target", convert_guest_path),
                  ArgSpec("ACCESS", "access", choice(("ro", "rw", "cow"), "access"))),
        _options(OptionSpec("fstype", "fstype", "TYPE", choice(MOUNT_FSTYPES, "a type")),
                 OptionSpec("upper", "upper", "LABEL", convert_label), OPT_AT),
        body="none", boot="always", build=build_mount),
    "nfs": ExprSpec(
        "nfs", (ArgSpec("DIR", "path", convert_host_path),
                ArgSpec("TARGET", "target", convert_guest_path),
                ArgSpec("ACCESS", "access", choice(("ro", "rw"), "access"))),
        _options(OptionSpec("server", "server", "ADDR", convert_ipv4),
                 OptionSpec("port", "port", "N", whole_number(1, 65535, "port")),
                 OptionSpec("pseudo", "pseudo", "PATH", convert_guest_path),
                 OptionSpec("squash", "squash", "MODE",
                            choice(("root_squash", "no_root_squash", "all_squash"), "squash")), OPT_AT),
        body="none", boot="always", build=build_nfs),
}
"""Every expression, by name.  Order here is the order of the documentation."""


# ---------------------------------------------------------------------------
# The expression parser


@dataclass(frozen=True)
class _Item:
    """What the header scanner found next."""

    kind: Literal["word", "close", "blank", "eof", "bracket"]
    offset: int
    end: int
    word: Word | None = None


class _ExpressionParser:
    """Parses one expression from its ``[`` to its ``[end]``, on the lexer's raw text."""

    def __init__(self, lexer: Lexer, start: int) -> None:
        self.lexer = lexer
        self.text = lexer.text
        self.start = start
        self.pos = lexer.position_at(start)
        self.i = start + 1
        self.line_has_content = True
        self.spec: ExprSpec | None = None

    # -- scanning -------------------------------------------------------------
    def at(self, offset: int) -> Position:
        return self.lexer.position_at(offset)

    def scan(self) -> _Item:
        """The next word, ``]``, blank line, ``[``-word or end of file; comments skipped."""
        text, i = self.text, self.i
        blank_start = i
        while i < len(text):
            char = text[i]
            if char in " \t":
                i += 1
            elif char == "\n":
                if not self.line_has_content:
                    self.i = i + 1
                    return _Item("blank", blank_start, i + 1)
                self.line_has_content = False
                i += 1
                blank_start = i
            elif char == "\r":
                raise syntax_error(self.at(i), "LF line endings (as xl requires)",
                                   "a carriage return")
            elif char == "#":
                i = self.lexer.line_end(i)
                self.line_has_content = True
            else:
                break
        self.line_has_content = True
        if i >= len(text):
            self.i = i
            return _Item("eof", i, i)
        if text[i] == "]":
            self.i = i + 1
            return _Item("close", i, i + 1)
        if text[i] == "[":
            end = self._bare_word_end(i)
            self.i = end
            return _Item("bracket", i, end, Word(text[i:end], self.at(i), i, end))
        if text[i] in "'\"":
            self.lexer.seek(i)
            token = self.lexer.peek()
            assert token.kind is TokenKind.STRING and isinstance(token.value, str)
            end = token.end
            if end < len(text) and text[end] not in " \t\n]":
                raise syntax_error(self.at(end), "a space or ']' after a quoted word",
                                   _shown(text[end:self._bare_word_end(end)]))
            self.i = end
            return _Item("word", i, end, Word(token.value, token.pos, i, end, quoted=True))
        end = self._bare_word_end(i)
        self.i = end
        return _Item("word", i, end, Word(text[i:end], self.at(i), i, end))

    def _bare_word_end(self, i: int) -> int:
        """A word ends at whitespace or at a ``]`` that does not close a ``[`` inside it."""
        text, depth = self.text, 0
        while i < len(text) and text[i] not in " \t\n\r":
            if text[i] == "[":
                depth += 1
            elif text[i] == "]":
                if depth == 0:
                    break
                depth -= 1
            i += 1
        return i

    def describe(self, item: _Item) -> str:
        if item.kind == "close":
            return "']'"
        if item.kind == "blank":
            return "a blank line"
        if item.kind == "eof":
            return "end of file"
        assert item.word is not None
        return _shown(item.word.text)

    def item_pos(self, item: _Item) -> Position:
        return self.pos if item.kind == "eof" else self.at(item.offset)

    # -- the expression ------------------------------------------------------------
    def parse(self) -> Expr:
        spec = self.spec = self._name()
        parsed = Parsed(spec, self.pos, Span(self.start, self.start))
        arg_index = 0
        in_options = False
        while True:
            item = self.scan()
            if item.kind != "word":
                break
            assert item.word is not None
            word = item.word
            if not word.quoted and (word.text in spec.options or word.text == "at"):
                if arg_index < spec.required:
                    raise self._missing_argument(spec.args[arg_index], item)
                in_options = True
                self._option(parsed, word)
                continue
            if not in_options and arg_index < len(spec.args) and spec.args[arg_index].accepts(word):
                self._argument(parsed, spec.args[arg_index], word)
                arg_index += 1
                continue
            raise self._unexpected(word, in_options)
        if item.kind in ("eof", "bracket"):
            raise self._unterminated(item)
        if arg_index < spec.required:
            raise self._missing_argument(spec.args[arg_index], item)
        if item.kind == "close":
            close = item.offset
        elif spec.body == "none":
            close = self._close_without_body()
        else:
            close = self._body(parsed, item.end)
        end = self._end(close)
        parsed.span = Span(self.start, end)
        return spec.build(parsed)

    def _name(self) -> ExprSpec:
        item = self.scan()
        known = ", ".join(EXPRESSIONS)
        if item.kind != "word" or item.word is None or item.word.quoted:
            raise syntax_error(self.item_pos(item), f"an expression name after '[' ({known})",
                               self.describe(item))
        name = item.word.text
        spec = EXPRESSIONS.get(name)
        if spec is not None:
            return spec
        hint = ""
        if name == "end":
            hint = " ('[end]' with no expression open)"
        elif name == "boot":
            hint = (" (to run an expression in the guest at boot, add the option 'at boot', "
                    "e.g. [replace /etc/motd at boot ...)")
        else:
            close = difflib.get_close_matches(name.lower(), EXPRESSIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise syntax_error(item.word.pos, f"an expression name after '[' ({known})",
                           _shown(name) + hint)

    def _argument(self, parsed: Parsed, arg: ArgSpec, word: Word) -> None:
        if arg.literal is not None:
            if word.text != arg.literal:
                assert self.spec is not None
                raise syntax_error(word.pos, f"the word {arg.literal!r} (as in {self.spec.usage})",
                                   _shown(word.text))
            return
        parsed.values[arg.field] = arg.convert(word)
        parsed.words[arg.field] = word

    def _option(self, parsed: Parsed, word: Word) -> None:
        spec = self.spec
        assert spec is not None
        if word.text == "at" and "at" not in spec.options:
            raise syntax_error(word.pos, f"no 'at boot' on {spec.name} ({spec.name} runs in dom0 "
                               "only; replace, copy, patch, hook and mount can run at boot)",
                               "'at'")
        option = spec.options[word.text]
        if option.name in parsed.option_pos:
            first = parsed.option_pos[option.name]
            raise syntax_error(word.pos, f"each option once in {spec.name}",
                               f"a second {option.name!r} (the first is at {first.line}:{first.col})")
        if option.field in parsed.words:
            first = parsed.words[option.field].pos
            raise syntax_error(word.pos, f"the {option.name} given once (here as an argument "
                               "or as an option)",
                               f"{option.name!r} again (first at {first.line}:{first.col})")
        item = self.scan()
        if item.kind in ("eof", "bracket"):
            raise self._unterminated(item)
        if item.kind != "word" or item.word is None:
            raise syntax_error(self.item_pos(item), f"a value after {option.name!r} "
                               f"({option.name} {option.metavar})", self.describe(item))
        parsed.values[option.field] = option.convert(item.word)
        parsed.words[option.field] = item.word
        parsed.option_pos[option.name] = word.pos

    # -- errors ------------------------------------------------------------------
    def _missing_argument(self, arg: ArgSpec, item: _Item) -> UserError:
        assert self.spec is not None
        found = self.describe(item)
        if item.kind == "word" and item.word is not None and item.word.text in self.spec.options:
            found = f"the option {item.word.text!r}"
        return syntax_error(self.item_pos(item), f"the {arg.name} argument of {self.spec.usage}",
                            found)

    def _unexpected(self, word: Word, in_options: bool) -> UserError:
        spec = self.spec
        assert spec is not None
        names = ", ".join(spec.options)
        expected = (f"an option of {spec.name} ({names}) or ']'" if names
                    else f"']' ({spec.name} takes no options)")
        if word.quoted or not _OPTION_LIKE_RE.fullmatch(word.text):
            if in_options:
                return syntax_error(word.pos, expected,
                                    f"{_shown(word.text)} (arguments come before options)")
            count = len(spec.args) - (1 if any(a.literal for a in spec.args) else 0)
            return syntax_error(word.pos, expected, f"an extra argument {_shown(word.text)} "
                                f"({spec.usage} takes {count})")
        hint = ""
        others = [s.name for s in EXPRESSIONS.values() if word.text in s.options]
        if "fstype" in spec.options and word.text in MOUNT_FSTYPES:
            hint = f" (write 'fstype {word.text}')"
        elif others:
            hint = f" (an option of {', '.join(others)})"
        else:
            close = difflib.get_close_matches(word.text, spec.options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        if not hint and spec.body != "none":
            hint = f" (the {'script' if spec.body == 'script' else 'body'} starts after a blank line)"
        return syntax_error(word.pos, expected, _shown(word.text) + hint)

    def _unterminated(self, item: _Item) -> UserError:
        assert self.spec is not None
        name = self.spec.name
        if item.kind == "eof":
            return syntax_error(self.pos, f"']' and '[end]' to close this {name} expression",
                                "end of file")
        return syntax_error(self.item_pos(item), f"']' to close the {name} expression opened at "
                            f"{self.pos.line}:{self.pos.col}", self.describe(item))

    # -- body and end -----------------------------------------------------------------
    def _close_without_body(self) -> int:
        """After a blank line in an expression that takes no body: only ']' may follow."""
        spec = self.spec
        assert spec is not None
        while (item := self.scan()).kind == "blank":
            pass
        if item.kind == "close":
            return item.offset
        if item.kind in ("eof", "bracket"):
            raise self._unterminated(item)
        raise syntax_error(self.item_pos(item), f"']' to close the {spec.name} expression "
                           f"({spec.name} takes no body; a blank line ends its arguments and "
                           "options)", self.describe(item))

    def _body(self, parsed: Parsed, body_start: int) -> int:
        """The body runs from after the blank line to the first ']' followed by '[end]'."""
        spec = self.spec
        assert spec is not None
        text = self.text
        close = BODY_CLOSE_RE.search(text, body_start)
        stop = close.start() if close else len(text)
        # A ']' line without its '[end]' would make the body swallow what follows,
        # up to the next expression's '] [end]'.  A body line that starts like an
        # expression, after a ']' line, is that mistake; so is no '[end]' at all.
        names = "|".join(re.escape(name) for name in EXPRESSIONS)
        opener = re.compile(rf"^[ \t]*\[(?:{names})(?=[ \t\n\]])", re.MULTILINE)
        suspect = opener.search(text, body_start, stop)
        lone = _LONE_CLOSE_RE.search(text, body_start, suspect.start() if suspect else stop)
        if lone and (suspect or close is None):
            raise self._missing_end(text.index("]", lone.start()), lone.end())
        if close is None:
            raise syntax_error(self.pos, f"']' and '[end]' to close this {spec.name} expression "
                               "(a body ends at the first ']' followed by '[end]')", "end of file")
        parsed.body = text[body_start:close.start()]
        parsed.body_pos = self.at(body_start)
        return close.start()

    def _end(self, close: int) -> int:
        """The offset after the ``[end]`` that must follow the ``]`` at ``close``."""
        i = close + 1
        while i < len(self.text) and self.text[i] in " \t\n":
            i += 1
        if self.text.startswith("[end]", i):
            return i + len("[end]")
        raise self._missing_end(close, i)

    def _missing_end(self, close: int, after: int) -> UserError:
        """No '[end]' after the ']' at ``close``; ``after`` is where it was looked for."""
        assert self.spec is not None
        text, i = self.text, after
        while i < len(text) and text[i] in " \t\n":
            i += 1
        where = self.at(close)
        expected = (f"'[end]' after the ']' at {where.line}:{where.col} that closes the "
                    f"{self.spec.name} expression opened at {self.pos.line}:{self.pos.col}")
        if i >= len(text):
            return syntax_error(where, expected, "end of file")
        if text[i] == "\r":
            found = "a carriage return (CRLF line ending; xl accepts LF only)"
        else:
            found = _shown(text[i:max(self._bare_word_end(i), i + 1)])
        return syntax_error(self.at(i), expected, found)


# ---------------------------------------------------------------------------
# Files


def parse_container(text: str, filename: str = "<container>") -> Container:
    """Parse a container file's text; errors are :class:`UserError` s ``FILE:LINE:COL: ...``."""
    lexer = Lexer(text, filename)
    settings = XlConfig(filename=filename)
    expressions: list[Expr] = []
    while (token := skip_separators(lexer)).kind is not TokenKind.EOF:
        if token.kind is not TokenKind.LBRACKET:
            settings.add(parse_setting(lexer))
            continue
        expr = _ExpressionParser(lexer, token.offset).parse()
        expressions.append(expr)
        lexer.seek(expr.span.end)
        after = lexer.peek()
        if after.kind not in (TokenKind.NEWLINE, TokenKind.SEMICOLON, TokenKind.EOF,
                              TokenKind.LBRACKET):
            raise syntax_error(after.pos, "end of line after '[end]'", after.describe())
    return Container(filename, text, settings, expressions)


def load_container(path: Path | str) -> Container:
    """Read and parse a container file; an unreadable or non-UTF-8 file is a UserError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the container file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: expected UTF-8 text, found byte 0x{data[exc.start]:02x} at "
                        f"offset {exc.start}") from None
    return parse_container(text, str(path))
