"""xl domain configuration files (xl.cfg(5)), disk specs (xl-disk-configuration(5)),
vif specs (xl-network-configuration(5)) and channel specs.

Why our own parser: ``supercharge boot`` runs the same file under qemu that a Xen
host hands to ``xl create``, and container files are xl syntax plus bracketed
expressions.  So the rules here follow libxlu (Xen's own lexer and grammar)
closely, and where xl would silently do something surprising (numeric string
escapes it mis-decodes, numbers with a leading zero read as octal, CRLF line
endings it rejects) we stop with a one-line error instead of guessing.

Layers, so the container-file parser can reuse the lower ones:

* :class:`Lexer` turns text into :class:`Token` s with positions.  It never
  decides what a statement is; the container parser can peek, take over a raw
  line (``[replace ...]``), and :meth:`Lexer.seek` back into xl statements.
* :func:`skip_separators` / :func:`parse_setting` parse one ``key = value``
  statement from a lexer; :meth:`XlConfig.add` stores it (duplicates, ``+=``).
* :func:`parse_xl_config` is the loop for a plain xl file.
* :func:`load_domain_config` / :func:`domain_from_settings` interpret the
  settings this project boots from; device specs become :class:`DiskSpec`,
  vif dicts and :class:`ChannelSpec` s, each with a canonical form that
  parses back equal.
* :func:`write_xl_config` writes xl syntax back, such that parsing it again
  gives the same mapping.

docs/xl.md lists the fields read and written and how they map to qemu.
"""
from __future__ import annotations

import bisect
import dataclasses
import enum
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from dom0.errors import UserError

XlValue: TypeAlias = "str | int | list[XlValue]"

# ---------------------------------------------------------------------------
# Positions and errors


@dataclass(frozen=True)
class Position:
    """A place in a source file; ``str()`` gives the ``file:line:col`` error prefix."""

    filename: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.col}"


def syntax_error(pos: Position | str, expected: str, found: str) -> UserError:
    """The one error shape for bad input: where, what was expected, what was there."""
    return UserError(f"{pos}: expected {expected}, found {found}")


# ---------------------------------------------------------------------------
# Tokens


class TokenKind(enum.Enum):
    """Token kinds; the value is how an error message names the kind."""

    IDENT = "name"
    NUMBER = "number"
    STRING = "string"
    EQUALS = "'='"
    PLUS_EQUALS = "'+='"
    COMMA = "','"
    LBRACKET = "'['"
    RBRACKET = "']'"
    SEMICOLON = "';'"
    NEWLINE = "end of line"
    EOF = "end of file"
    OTHER = "character"


@dataclass(frozen=True)
class Token:
    """One token.  ``offset``/``end`` index the lexer's text so a caller can take raw text."""

    kind: TokenKind
    text: str
    value: str | int | None
    pos: Position
    offset: int
    end: int

    def describe(self) -> str:
        """How the token reads in "found ..." of an error message."""
        if self.kind in (TokenKind.NEWLINE, TokenKind.EOF):
            return str(self.kind.value)
        if self.kind is TokenKind.STRING:
            shown = self.text if len(self.text) <= 40 else self.text[:37] + "..."
            return f"the string {shown}"
        if self.text == "\r":
            return "a carriage return (CRLF line ending; xl accepts LF only)"
        return repr(self.text)


_PUNCTUATION = {
    "=": TokenKind.EQUALS,
    ",": TokenKind.COMMA,
    "[": TokenKind.LBRACKET,
    "]": TokenKind.RBRACKET,
    ";": TokenKind.SEMICOLON,
    "\n": TokenKind.NEWLINE,
}
# The escapes libxlu's dequote decodes correctly.  Its \x always fails, its \ooo
# drops characters, and it silently drops unknown escapes: all are errors here.
_ESCAPES = {
    '"': '"', "'": "'", "\\": "\\",
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
}
_ESCAPES_SHOWN = "\\\\ \\\" \\' \\n \\t \\r \\a \\b \\f \\v"
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER_RE = re.compile(r"[0-9][0-9A-Za-z_.:\-]*")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")
_HEX_RE = re.compile(r"0x[0-9a-f]+")
KEY_RE = re.compile(r"[a-z][_0-9a-z]*")
"""What xl accepts as a setting name (libxlu's IDENT)."""


class Lexer:
    """Tokens of xl syntax with positions, one at a time.

    State is just an offset into ``text``, so another parser (container files)
    can :meth:`peek`, take raw text with :meth:`line_end`, and :meth:`seek` on.
    Whitespace is space and tab; ``#`` starts a comment to the end of the line,
    which yields a NEWLINE token like a bare line end does.
    """

    def __init__(self, text: str, filename: str = "<config>", *, offset: int = 0) -> None:
        self.text = text
        self.filename = filename
        self._offset = offset
        self._peeked: Token | None = None
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    # -- positions ---------------------------------------------------------
    def position_at(self, offset: int) -> Position:
        """The line and column (both from 1) of ``offset``."""
        index = bisect.bisect_right(self._line_starts, offset) - 1
        return Position(self.filename, index + 1, offset - self._line_starts[index] + 1)

    @property
    def offset(self) -> int:
        """Where the next token starts scanning (the peeked token's start if any)."""
        return self._peeked.offset if self._peeked else self._offset

    def seek(self, offset: int) -> None:
        """Continue scanning at ``offset`` (drops a peeked token)."""
        self._peeked = None
        self._offset = offset

    def line_end(self, offset: int) -> int:
        """The offset of the newline ending the line that holds ``offset`` (or len(text))."""
        end = self.text.find("\n", offset)
        return len(self.text) if end < 0 else end

    # -- tokens ------------------------------------------------------------
    def peek(self) -> Token:
        """The next token, without consuming it."""
        if self._peeked is None:
            self._peeked = self._scan()
        return self._peeked

    def next(self) -> Token:
        """The next token, consumed."""
        token = self.peek()
        self._peeked = None
        self._offset = token.end
        return token

    def __iter__(self) -> Iterator[Token]:
        """All remaining tokens, the EOF token last."""
        while True:
            token = self.next()
            yield token
            if token.kind is TokenKind.EOF:
                return

    def _token(self, kind: TokenKind, start: int, end: int, value: str | int | None = None) -> Token:
        return Token(kind, self.text[start:end], value, self.position_at(start), start, end)

    def _scan(self) -> Token:
        text, i = self.text, self._skip_blanks(self._offset)
        if i >= len(text):
            return self._token(TokenKind.EOF, i, i)
        char = text[i]
        if char in _PUNCTUATION:
            return self._token(_PUNCTUATION[char], i, i + 1)
        if text.startswith("+=", i):
            return self._token(TokenKind.PLUS_EQUALS, i, i + 2)
        if char in "'\"":
            return self._scan_string(i)
        if "0" <= char <= "9":
            return self._scan_number(i)
        word = _WORD_RE.match(text, i)
        if word:
            return self._token(TokenKind.IDENT, i, word.end(), word.group())
        return self._token(TokenKind.OTHER, i, i + 1)

    def _skip_blanks(self, i: int) -> int:
        text = self.text
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "#":
            i = self.line_end(i)
        return i

    def _scan_number(self, start: int) -> Token:
        """Decimal or 0x-hex, as xl's strtol(..., 0) reads them, minus the octal trap."""
        match = _NUMBER_RE.match(self.text, start)
        assert match is not None
        word = match.group()
        if _DECIMAL_RE.fullmatch(word):
            return self._token(TokenKind.NUMBER, start, match.end(), int(word))
        if _HEX_RE.fullmatch(word):
            return self._token(TokenKind.NUMBER, start, match.end(), int(word, 16))
        pos = self.position_at(start)
        if re.fullmatch(r"0[0-9]+", word):
            raise syntax_error(pos, "a number without leading zeros (xl would read it as octal)",
                               repr(word))
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", word):
            raise syntax_error(pos, "a hex number written 0x with lowercase digits (as xl requires)",
                               repr(word))
        raise syntax_error(pos, "a whole number (decimal or 0x hex; other values need quotes)",
                           repr(word))

    def _scan_string(self, start: int) -> Token:
        """A quoted string on one line; backslash escapes decoded the way xl does."""
        text, quote = self.text, self.text[start]
        out: list[str] = []
        i = start + 1
        while True:
            if i >= len(text) or text[i] == "\n":
                raise self._unterminated(start, i)
            char = text[i]
            if char == quote:
                return self._token(TokenKind.STRING, start, i + 1, "".join(out))
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= len(text) or text[i + 1] == "\n":
                raise self._unterminated(start, i + 1)
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise syntax_error(self.position_at(i), f"one of the escapes {_ESCAPES_SHOWN}",
                                   repr("\\" + escaped) + _escape_hint(escaped))
            out.append(_ESCAPES[escaped])
            i += 2

    def _unterminated(self, start: int, at: int) -> UserError:
        found = "end of file" if at >= len(self.text) else "end of line"
        return syntax_error(self.position_at(start),
                            f"a closing {self.text[start]} for this string (strings cannot span lines)",
                            found)


def _escape_hint(escaped: str) -> str:
    if escaped == "x" or escaped in "01234567":
        return " (xl rejects or mis-decodes numeric escapes; write the character itself)"
    return ""


# ---------------------------------------------------------------------------
# Statements


@dataclass(frozen=True)
class Setting:
    """One ``key = value`` (or ``key += value``) statement with where its parts are."""

    key: str
    value: XlValue
    key_pos: Position | None = None
    value_pos: Position | None = None
    item_pos: tuple[Position, ...] = ()
    op: str = "="


def skip_separators(lexer: Lexer) -> Token:
    """Consume empty statements (newlines, comments, ';'); return the next token, unconsumed."""
    while lexer.peek().kind in (TokenKind.NEWLINE, TokenKind.SEMICOLON):
        lexer.next()
    return lexer.peek()


def parse_setting(lexer: Lexer) -> Setting:
    """Parse ``key = value`` or ``key += value`` and the end of its statement."""
    key_tok = lexer.next()
    if key_tok.kind is not TokenKind.IDENT or not KEY_RE.fullmatch(key_tok.text):
        raise syntax_error(key_tok.pos, "a setting name (lowercase letters, digits and '_', "
                           "starting with a letter, as xl requires)", key_tok.describe())
    key = key_tok.text
    op_tok = lexer.next()
    if op_tok.kind not in (TokenKind.EQUALS, TokenKind.PLUS_EQUALS):
        raise syntax_error(op_tok.pos, f"'=' after {key!r}", op_tok.describe())
    value, value_pos, item_pos = parse_value(lexer, key)
    end = lexer.peek()
    if end.kind not in (TokenKind.NEWLINE, TokenKind.SEMICOLON, TokenKind.EOF):
        raise syntax_error(end.pos, f"end of line or ';' after the value of {key!r}",
                           end.describe())
    return Setting(key, value, key_tok.pos, value_pos, item_pos, op_tok.text)


def parse_value(lexer: Lexer, key: str) -> tuple[XlValue, Position, tuple[Position, ...]]:
    """A string, a number or a list; returns the value, its position and its items' positions."""
    token = lexer.next()
    if token.kind in (TokenKind.STRING, TokenKind.NUMBER):
        assert token.value is not None
        return token.value, token.pos, ()
    if token.kind is TokenKind.LBRACKET:
        items, positions = _parse_list_items(lexer, key, token.pos)
        return items, token.pos, positions
    hint = " (strings need quotes)" if token.kind is TokenKind.IDENT else ""
    raise syntax_error(token.pos, f"a value for {key!r} (a quoted string, a number or a "
                       f"[list]){hint}", token.describe())


def _skip_newlines(lexer: Lexer) -> Token:
    while lexer.peek().kind is TokenKind.NEWLINE:
        lexer.next()
    return lexer.peek()


def _parse_list_items(lexer: Lexer, key: str, opened: Position) -> tuple[list[XlValue], tuple[Position, ...]]:
    """Items after '[' up to ']': newlines allowed around items, a trailing comma allowed."""
    items: list[XlValue] = []
    positions: list[Position] = []
    if _skip_newlines(lexer).kind is TokenKind.RBRACKET:
        lexer.next()
        return items, ()
    while True:
        value, pos, _ = parse_value(lexer, key)
        items.append(value)
        positions.append(pos)
        token = _skip_newlines(lexer)
        if token.kind is TokenKind.RBRACKET:
            lexer.next()
            return items, tuple(positions)
        if token.kind is not TokenKind.COMMA:
            raise syntax_error(token.pos, f"',' or ']' in the list of {key!r} opened at "
                               f"{opened.line}:{opened.col}", token.describe())
        lexer.next()
        if _skip_newlines(lexer).kind is TokenKind.RBRACKET:
            lexer.next()
            return items, tuple(positions)


# ---------------------------------------------------------------------------
# The mapping


class XlConfig(MutableMapping[str, XlValue]):
    """Settings in file order, each with where it was written.

    Equality is that of the plain mapping (positions are ignored), so a config
    compares equal to the dict of its values and to itself re-parsed.
    """

    def __init__(self, items: Mapping[str, XlValue] | Iterable[tuple[str, XlValue]] = (),
                 *, filename: str = "<config>") -> None:
        self.filename = filename
        self._settings: dict[str, Setting] = {}
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            self[key] = value

    # -- mapping protocol --------------------------------------------------
    def __getitem__(self, key: str) -> XlValue:
        return self._settings[key].value

    def __setitem__(self, key: str, value: XlValue) -> None:
        """Set a value from code; keeps the key's source position if it had one."""
        old = self._settings.get(key)
        self._settings[key] = Setting(key, value, old.key_pos if old else None)

    def __delitem__(self, key: str) -> None:
        del self._settings[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"XlConfig({dict(self)!r}, filename={self.filename!r})"

    def copy(self) -> XlConfig:
        """A shallow copy that keeps positions."""
        new = XlConfig(filename=self.filename)
        new._settings = dict(self._settings)
        return new

    # -- parsing -----------------------------------------------------------
    def add(self, setting: Setting) -> None:
        """Store a parsed statement: a repeated key is an error, ``+=`` appends."""
        old = self._settings.get(setting.key)
        if old is None:
            self._settings[setting.key] = dataclasses.replace(setting, op="=")
        elif setting.op == "+=":
            self._settings[setting.key] = _concatenate(old, setting)
        else:
            first = f" (first set at line {old.key_pos.line}, col {old.key_pos.col})" if old.key_pos else ""
            raise syntax_error(setting.key_pos or self.filename, "each setting once (use '+=' to "
                               "add to a string or list)", f"{setting.key!r} again{first}")

    # -- positions ---------------------------------------------------------
    def setting(self, key: str) -> Setting:
        """The stored statement for ``key`` (KeyError if absent)."""
        return self._settings[key]

    def position(self, key: str) -> Position | None:
        """Where ``key`` was written, None for a key set from code."""
        return self._settings[key].key_pos

    def where(self, key: str, index: int | None = None) -> str:
        """The ``file:line:col`` of a value (or of list item ``index``) for error messages."""
        setting = self._settings.get(key)
        if setting is None:
            return self.filename
        if index is not None and index < len(setting.item_pos):
            return str(setting.item_pos[index])
        pos = setting.value_pos or setting.key_pos
        return str(pos) if pos else self.filename


def _concatenate(old: Setting, new: Setting) -> Setting:
    """xl's ``+=``: append to a string or list of the same kind."""
    if isinstance(old.value, str) and isinstance(new.value, str):
        return dataclasses.replace(old, value=old.value + new.value)
    if isinstance(old.value, list) and isinstance(new.value, list):
        return dataclasses.replace(old, value=old.value + new.value,
                                   item_pos=old.item_pos + new.item_pos)
    raise syntax_error(new.value_pos or new.key_pos or "<config>",
                       f"a value of the same kind as {old.key!r} for '+=' (string to string, "
                       "list to list)", f"{_kind(new.value)} added to {_kind(old.value)}")


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a number"


def parse_xl_config(text: str, filename: str = "<config>") -> XlConfig:
    """Parse a whole xl.cfg(5) file."""
    lexer = Lexer(text, filename)
    config = XlConfig(filename=filename)
    while skip_separators(lexer).kind is not TokenKind.EOF:
        config.add(parse_setting(lexer))
    return config


# ---------------------------------------------------------------------------
# Writing


def write_xl_config(config: Mapping[str, XlValue] | DomainConfig, *, header: str | None = None) -> str:
    """xl syntax for a mapping (or a domain, with its resolved paths) that parses back equal.

    Strings are double-quoted with escapes, lists one item per line.  Values xl
    cannot express (negative numbers, NUL characters, bad names) raise
    ValueError: they come from code, not from a user's file.
    """
    if isinstance(config, DomainConfig):
        config = config.to_xl()
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for key, value in config.items():
        if not KEY_RE.fullmatch(key):
            raise ValueError(f"{key!r} is not a valid xl setting name")
        lines.append(f"{key} = {format_xl_value(value)}")
    return "\n".join(lines) + "\n"


def format_xl_value(value: XlValue, indent: str = "") -> str:
    """One value in xl syntax; nested lists are indented further."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"xl has no negative numbers: {value} (use a string)")
        return str(value)
    if isinstance(value, str):
        return quote_xl_string(value)
    if isinstance(value, list):
        if not value:
            return "[]"
        inner = indent + "    "
        items = "".join(f"{inner}{format_xl_value(item, inner)},\n" for item in value)
        return f"[\n{items}{indent}]"
    raise ValueError(f"xl cannot express a {type(value).__name__}: {value!r}")


_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t",
                  "\a": "\\a", "\b": "\\b", "\f": "\\f", "\v": "\\v"}


def quote_xl_string(text: str) -> str:
    """``text`` as a double-quoted xl string."""
    if "\0" in text:
        raise ValueError("xl strings cannot contain NUL characters")
    return '"' + "".join(_QUOTE_ESCAPES.get(char, char) for char in text) + '"'


# ---------------------------------------------------------------------------
# Disk specs (xl-disk-configuration(5), following libxlu_disk_l.l)

DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
BACKEND_TYPES = ("phy", "qdisk", "tap", "standalone")
_ACCESS = {"": "rw", "rw": "rw", "w": "rw", "r": "ro", "ro": "ro"}
# Deprecated "prefix:" forms: what each one means.
_FORMAT_PREFIXES = {"raw", "qcow", "qcow2", "vhd"}
_SCRIPT_PREFIXES = {"iscsi", "nbd", "enbd", "drbd"}
_IGNORED_PREFIXES = {"file", "phy", "tap", "tap2", "tapdisk", "aio", "ioemu"}
_PREFIX_RE = re.compile(r"([a-z][a-z0-9]*):(?![a-z0-9])")
_KNOWN_PREFIX_RE = re.compile(r"(raw|qcow2?|vhd|iscsi|e?nbd|drbd|tapdisk|tap2?|aio|ioemu|file|phy):")
_FLAGS = {"cdrom", "direct-io-safe", "discard", "no-discard", "colo", "no-colo",
          "trusted", "untrusted"}
# key=value parameters kept as they are in DiskSpec.options (xl knows them; qemu ignores them).
_PASSTHROUGH_KEYS = {"backend", "specification", "colo-host", "colo-port", "colo-export",
                     "active-disk", "hidden-disk", "grant_usage"}
_PARAM_RE = re.compile(r"([a-z][-a-z0-9_]*)=([^,]*),?")


@dataclass(frozen=True)
class DiskSpec:
    """One xl disk: where the data is, how the guest sees it.

    ``options`` keeps xl parameters this project does not interpret (backend=,
    discard, ...) so writing the spec back loses nothing.
    """

    target: str
    vdev: str
    format: str = "raw"
    access: str = "rw"
    devtype: str = "disk"
    backendtype: str | None = None
    script: str | None = None
    options: tuple[str, ...] = ()
    spec: str = field(default="", compare=False)

    @property
    def readonly(self) -> bool:
        return self.access == "ro"

    @property
    def is_cdrom(self) -> bool:
        return self.devtype == "cdrom"

    @property
    def is_empty(self) -> bool:
        """A cdrom drive without media: nothing to attach."""
        return self.format == "empty" or (self.is_cdrom and not self.target)

    def to_spec(self) -> str:
        """The canonical key=value form, target last (it may contain commas).

        ``devtype`` is written only for a cdrom (``disk`` is xl's default).
        """
        parts = [f"format={self.format}", f"vdev={self.vdev}", f"access={self.access}"]
        if self.devtype != "disk":
            parts.append(f"devtype={self.devtype}")
        if self.backendtype:
            parts.append(f"backendtype={self.backendtype}")
        if self.script:
            parts.append(f"script={self.script}")
        parts.extend(self.options)
        parts.append(f"target={self.target}")
        return ", ".join(parts)


class _DiskParse:
    """The mutable state of libxlu's disk lexer while it walks one spec."""

    def __init__(self, spec: str, where: str | None) -> None:
        self.spec = spec
        self.where = f"{where}: " if where else ""
        self.target: str | None = None
        self.vdev: str | None = None
        self.format: str | None = None
        self.access: str | None = None
        self.devtype: str | None = None
        self.backendtype: str | None = None
        self.script: str | None = None
        self.options: list[str] = []
        self.had_prefix = False

    def error(self, expected: str, found: str) -> UserError:
        return UserError(f"{self.where}disk spec {self.spec!r}: expected {expected}, found {found}")

    def set_once(self, name: str, value: str) -> None:
        """Set a field; xl rejects giving one twice with different values."""
        old = getattr(self, name)
        if old not in (None, "", value):
            raise self.error(f"{name} given once", f"{name} {old!r} and {value!r}")
        setattr(self, name, value)


def parse_disk_spec(spec: str, where: str | None = None) -> DiskSpec:
    """Parse one disk spec, positional (``target,format,vdev,access``), key=value or mixed.

    ``where`` (``file:line:col``) prefixes error messages.  Like xl: a deprecated
    ``prefix:`` (phy:, file:, tap:aio:, raw:, ...) drops the positional format,
    ``target=`` swallows the rest of the spec (so it may contain commas), and a
    cdrom is read-only.
    """
    state = _DiskParse(spec, where)
    i = 0
    while i < len(spec):
        i = _skip_disk_blanks(spec, i)
        if i < len(spec):
            i = _disk_param(state, spec, i)
    return _finish_disk(state)


def _skip_disk_blanks(spec: str, i: int) -> int:
    while i < len(spec) and spec[i] in " \t\n":
        i += 1
    return i


def _disk_param(state: _DiskParse, spec: str, i: int) -> int:
    """Consume one parameter starting at ``i``; return where the next one starts."""
    rest = spec[i:]
    if rest.startswith("target="):
        value = rest[len("target="):]
        state.set_once("target", value.removesuffix(","))
        return len(spec)
    param = _PARAM_RE.match(rest)
    if param:
        _disk_keyword(state, param.group(1), param.group(2))
        return i + param.end()
    prefix = _KNOWN_PREFIX_RE.match(rest) or _PREFIX_RE.match(rest)
    if prefix:
        _disk_prefix(state, prefix.group(1))
        return i + prefix.end()
    comma = rest.find(",")
    word = rest if comma < 0 else rest[:comma]
    if "=" in word:
        raise state.error("key=value with a known key, or a positional value without '='",
                          repr(word))
    if word in _FLAGS:
        _disk_flag(state, word)
    else:
        _disk_positional(state, word)
    return len(spec) if comma < 0 else i + comma + 1


def _disk_keyword(state: _DiskParse, key: str, value: str) -> None:
    if key == "format":
        state.set_once("format", _disk_format(state, value))
    elif key == "vdev":
        state.set_once("vdev", value)
    elif key == "access":
        state.set_once("access", _disk_access(state, value))
    elif key == "devtype":
        if value not in ("disk", "cdrom"):
            raise state.error("devtype=disk or devtype=cdrom", repr(value))
        state.set_once("devtype", value)
    elif key == "backendtype":
        if value not in BACKEND_TYPES:
            raise state.error(f"backendtype one of {', '.join(BACKEND_TYPES)}", repr(value))
        state.set_once("backendtype", value)
    elif key == "script":
        state.set_once("script", value)
    elif key in _PASSTHROUGH_KEYS:
        state.options.append(f"{key}={value}")
    else:
        raise state.error("a known disk parameter (format, vdev, access, devtype, backendtype, "
                          "script, backend, target, ...)", f"{key}=")


def _disk_flag(state: _DiskParse, flag: str) -> None:
    if flag == "cdrom":
        state.set_once("devtype", "cdrom")
    else:
        state.options.append(flag)


def _disk_prefix(state: _DiskParse, prefix: str) -> None:
    """The old ``phy:``/``file:``/``tap:aio:``/``raw:`` forms; they drop the positional format."""
    if prefix in _FORMAT_PREFIXES:
        state.set_once("format", prefix)
    elif prefix in _SCRIPT_PREFIXES:
        state.set_once("script", f"block-{prefix}")
    elif prefix not in _IGNORED_PREFIXES:
        raise state.error("a known prefix (phy:, file:, tap:, aio:, raw:, qcow2:, vhd:, ...)",
                          repr(prefix + ":"))
    state.had_prefix = True


def _disk_positional(state: _DiskParse, word: str) -> None:
    """target, then format (unless a prefix was given), then vdev, then access."""
    if state.target is None:
        state.target = word
    elif not state.had_prefix and state.format is None:
        if not state.target and _vdev_with_devtype(state, word):
            state.format = "empty"
        else:
            state.format = _disk_format(state, word)
    elif state.vdev is None:
        if not _vdev_with_devtype(state, word):
            state.vdev = word
    elif state.access is None:
        state.access = _disk_access(state, word)
    else:
        raise state.error("at most target,format,vdev,access as positional values",
                          f"an extra {word!r}")


def _vdev_with_devtype(state: _DiskParse, word: str) -> bool:
    """The deprecated ``hdc:cdrom`` vdev form; False if ``word`` has no colon."""
    vdev, colon, devtype = word.rpartition(":")
    if not colon:
        return False
    if devtype not in ("cdrom", "disk"):
        raise state.error("vdev:cdrom or vdev:disk", repr(word))
    state.set_once("vdev", vdev)
    state.set_once("devtype", devtype)
    return True


def _disk_format(state: _DiskParse, value: str) -> str:
    if value == "":
        return "raw"
    if value not in DISK_FORMATS:
        raise state.error(f"a format ({', '.join(DISK_FORMATS)}; the positional form is "
                          "target,format,vdev,access)", repr(value))
    return value


def _disk_access(state: _DiskParse, value: str) -> str:
    if value not in _ACCESS:
        raise state.error("access ro, r, rw or w", repr(value))
    return _ACCESS[value]


def _finish_disk(state: _DiskParse) -> DiskSpec:
    """Defaults and the checks xl makes once the whole spec is read."""
    devtype = state.devtype or "disk"
    target = state.target or ""
    fmt = state.format or "raw"
    access = state.access or "rw"
    if devtype == "cdrom":
        access = "ro"
        if not target:
            fmt = "empty"
    if not state.vdev:
        raise state.error("a vdev (the guest device name, e.g. xvda)", "none")
    if not target and fmt != "empty":
        raise state.error("a target (an image file or device)", "none")
    return DiskSpec(target=target, vdev=state.vdev, format=fmt, access=access, devtype=devtype,
                    backendtype=state.backendtype, script=state.script,
                    options=tuple(state.options), spec=state.spec)


VIF_KEYS = ("mac", "bridge", "gatewaydev", "type", "model", "vifname", "script", "ip",
            "backend", "rate", "devid", "mtu")
"""xl-network-configuration(5)'s keywords, in the order :func:`format_vif_spec` writes them."""
VIF_FLAGS = ("trusted", "untrusted")


def parse_vif_spec(spec: str, where: str | None = None) -> dict[str, str]:
    """A vif spec (``mac=...,bridge=...``) as a dict; an empty spec means all defaults.

    Keys are xl-network-configuration(5)'s; the flags ``trusted`` and
    ``untrusted`` map to an empty value.  Unknown keys are refused: a typo
    (``brige=``) would otherwise put the guest on the default bridge.  Values
    are checked where they are used (the qemu backend checks ``mac``).
    """
    prefix = f"{where}: " if where else ""
    result: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part in VIF_FLAGS:
            result[part] = ""
            continue
        key, equals, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key:
            raise UserError(f"{prefix}vif spec {spec!r}: expected key=value, found {part!r}")
        if key not in VIF_KEYS:
            raise UserError(f"{prefix}vif spec {spec!r}: expected a vif keyword "
                            f"({', '.join(VIF_KEYS)}), found {key}=")
        if key in result:
            raise UserError(f"{prefix}vif spec {spec!r}: expected each keyword once, found "
                            f"{key}= again")
        result[key] = value
    return result


def format_vif_spec(vif: Mapping[str, str]) -> str:
    """The canonical vif spec: keywords in :data:`VIF_KEYS` order, then flags.

    ``parse_vif_spec(format_vif_spec(v)) == v`` for every parsed ``v``; values
    holding a comma cannot be written (xl has no quoting inside a vif spec).
    """
    parts: list[str] = []
    for key in VIF_KEYS:
        if key in vif:
            if "," in vif[key]:
                raise ValueError(f"vif {key}={vif[key]!r}: xl cannot express a comma in a vif value")
            parts.append(f"{key}={vif[key]}")
    parts.extend(flag for flag in VIF_FLAGS if flag in vif)
    unknown = set(vif) - set(VIF_KEYS) - set(VIF_FLAGS)
    if unknown:
        raise ValueError(f"not vif keywords: {', '.join(sorted(unknown))}")
    return ",".join(parts)


# ---------------------------------------------------------------------------
# Channels (xl.cfg(5) "channel")

CHANNEL_CONNECTIONS = ("pty", "socket")


@dataclass(frozen=True)
class ChannelSpec:
    """One xl channel: a named, PV-console-like byte stream between guest and dom0.

    ``connection`` is ``pty`` (dom0 end is a pty) or ``socket`` (a UNIX socket
    at ``path``, which xl then requires); ``backend`` is the backend domain.
    """

    name: str
    connection: str
    path: str | None = None
    backend: str | None = None
    spec: str = field(default="", compare=False)

    def to_spec(self) -> str:
        """The canonical spec: name, connection, path, backend (xl reads any order)."""
        parts = [f"name={self.name}", f"connection={self.connection}"]
        if self.path is not None:
            parts.append(f"path={self.path}")
        if self.backend is not None:
            parts.append(f"backend={self.backend}")
        return ",".join(parts)


def parse_channel_spec(spec: str, where: str | None = None) -> ChannelSpec:
    """Parse ``name=N,connection=pty|socket[,path=P][,backend=D]`` as xl does.

    xl requires ``name`` and ``connection``, and ``path`` for a socket; a path
    on a pty channel is refused here (xl ignores it, which hides a mistake).
    """
    prefix = f"{where}: " if where else ""

    def error(expected: str, found: str) -> UserError:
        return UserError(f"{prefix}channel spec {spec!r}: expected {expected}, found {found}")

    values: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, equals, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            raise error("key=value", repr(part))
        if key not in ("name", "connection", "path", "backend"):
            raise error("a channel keyword (name, connection, path, backend)", f"{key}=")
        if key in values:
            raise error("each keyword once", f"{key}= again")
        values[key] = value
    if not values.get("name"):
        raise error("name=NAME (the guest sees the channel by this name)", "none")
    connection = values.get("connection")
    if connection is None:
        raise error("connection=pty or connection=socket", "none")
    if connection not in CHANNEL_CONNECTIONS:
        raise error("connection=pty or connection=socket", repr(connection))
    path = values.get("path")
    if connection == "socket" and not path:
        raise error("path=SOCKET_PATH with connection=socket", "none")
    if connection == "pty" and path is not None:
        raise error("no path with connection=pty (a pty has no path; use connection=socket)",
                    repr(path))
    return ChannelSpec(name=values["name"], connection=connection, path=path,
                       backend=values.get("backend"), spec=spec)


# ---------------------------------------------------------------------------
# The domain

DOMAIN_TYPES = ("pv", "pvh", "hvm")
ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
           "coredump-restart", "soft-reset")


@dataclass
class DomainConfig:
    """What a domain config asks for, with kernel, ramdisk and disk paths made absolute."""

    path: Path
    name: str
    kernel: Path
    type: str = "pv"
    ramdisk: Path | None = None
    cmdline: str = ""
    memory: int = 512
    vcpus: int = 1
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[dict[str, str]] = field(default_factory=list)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    raw: XlConfig = field(default_factory=XlConfig)
    channels: list[ChannelSpec] = field(default_factory=list)

    @property
    def channel(self) -> list[str]:
        """The channel specs as the config wrote them."""
        return [c.spec for c in self.channels]

    def to_xl(self) -> XlConfig:
        """The raw settings with resolved paths and canonical device specs.

        Paths are absolute so ``xl create`` works from any directory; disk, vif
        and channel specs are written in their canonical key=value form, which
        parses back to the same :class:`DiskSpec`, vif dict and
        :class:`ChannelSpec`.  Settings this project does not interpret are kept.
        """
        config = self.raw.copy()
        config["kernel"] = str(self.kernel)
        if self.ramdisk is not None:
            config["ramdisk"] = str(self.ramdisk)
        if "disk" in config:
            config["disk"] = [disk.to_spec() for disk in self.disks]
        if "vif" in config:
            config["vif"] = [format_vif_spec(vif) for vif in self.vifs]
        if "channel" in config:
            config["channel"] = [channel.to_spec() for channel in self.channels]
        return config


def load_domain_config(path: Path) -> DomainConfig:
    """Read and interpret an xl domain config file."""
    path = Path(path)
    raw = parse_xl_config(_read_text(path), str(path))
    return domain_from_settings(raw, path)


def domain_from_settings(raw: XlConfig, path: Path, base: Path | None = None) -> DomainConfig:
    """Interpret parsed settings; relative paths are taken from ``base``.

    ``base`` defaults to the directory of ``path``.  It differs when the
    settings come from somewhere else than the file they will be written to:
    a container's stripped config names paths relative to the container.
    """
    path = Path(path)
    base = (base or path.absolute().parent).absolute()
    kernel = _string(raw, "kernel")
    if kernel is None:
        raise UserError(f"{path}: expected a 'kernel' setting (domains here boot a kernel "
                        "directly; bootloader= is not supported), found none")
    name = _string(raw, "name")
    if not name:
        raise UserError(f"{path}: expected a 'name' setting, found none")
    ramdisk = _string(raw, "ramdisk")
    return DomainConfig(
        path=path, name=name, type=_domain_type(raw),
        kernel=_resolve(base, kernel), ramdisk=_resolve(base, ramdisk) if ramdisk else None,
        cmdline=_cmdline(raw), memory=_positive(raw, "memory", 512),
        vcpus=_positive(raw, "vcpus", 1), disks=_disks(raw, base), vifs=_vifs(raw),
        on_poweroff=_action(raw, "on_poweroff", "destroy"),
        on_reboot=_action(raw, "on_reboot", "restart"),
        on_crash=_action(raw, "on_crash", "destroy"),
        raw=raw, channels=_channels(raw))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the domain config: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: expected UTF-8 text, found byte 0x{data[exc.start]:02x} at "
                        f"offset {exc.start}") from None


def _resolve(base: Path, value: str) -> Path:
    """Relative paths in a config are relative to the config's directory (xl uses the cwd)."""
    candidate = Path(value)
    return candidate if candidate.is_absolute() else base / candidate


def _string(raw: XlConfig, key: str) -> str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    raise syntax_error(raw.where(key), f"a quoted string for {key!r}", _kind(value))


def _string_list(raw: XlConfig, key: str) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise syntax_error(raw.where(key), f"a [list] of strings for {key!r}", _kind(value))
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise syntax_error(raw.where(key, index), f"a quoted string in the list {key!r}",
                               _kind(item))
    return list(value)  # type: ignore[arg-type]


def _positive(raw: XlConfig, key: str, default: int) -> int:
    """A count like xl reads it: a number, or a string holding one."""
    value = raw.get(key, default)
    if isinstance(value, str) and (_DECIMAL_RE.fullmatch(value) or _HEX_RE.fullmatch(value)):
        value = int(value, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        found = repr(value) if not isinstance(value, list) else "a list"
        raise syntax_error(raw.where(key), f"a positive whole number for {key!r}", found)
    return value


def _domain_type(raw: XlConfig) -> str:
    kind = _string(raw, "type")
    if kind is None:
        return "hvm" if _string(raw, "builder") == "hvm" else "pv"
    if kind not in DOMAIN_TYPES:
        raise syntax_error(raw.where("type"), "type \"pv\", \"pvh\" or \"hvm\"", repr(kind))
    return kind


def _cmdline(raw: XlConfig) -> str:
    """xl's rule: ``cmdline`` wins; else ``root=ROOT EXTRA``, either part optional."""
    cmdline = _string(raw, "cmdline")
    if cmdline is not None:
        return cmdline
    root, extra = _string(raw, "root"), _string(raw, "extra")
    if root is not None and extra is not None:
        return f"root={root} {extra}"
    if root is not None:
        return f"root={root}"
    return extra or ""


def _action(raw: XlConfig, key: str, default: str) -> str:
    value = _string(raw, key)
    if value is None:
        return default
    if value not in ACTIONS:
        raise syntax_error(raw.where(key), f"{key} one of {', '.join(ACTIONS)}", repr(value))
    return value


def _disks(raw: XlConfig, base: Path) -> list[DiskSpec]:
    disks = []
    for index, spec in enumerate(_string_list(raw, "disk")):
        disk = parse_disk_spec(spec, raw.where("disk", index))
        if disk.target and not disk.script and not Path(disk.target).is_absolute():
            disk = dataclasses.replace(disk, target=str(base / disk.target))
        disks.append(disk)
    return disks


def _vifs(raw: XlConfig) -> list[dict[str, str]]:
    return [parse_vif_spec(spec, raw.where("vif", index))
            for index, spec in enumerate(_string_list(raw, "vif"))]


def _channels(raw: XlConfig) -> list[ChannelSpec]:
    return [parse_channel_spec(spec, raw.where("channel", index))
            for index, spec in enumerate(_string_list(raw, "channel"))]
