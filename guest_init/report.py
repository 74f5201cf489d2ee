"""Boot report records: written by the agent to the console, parsed back by dom0.

The guest has no network or disk we can trust for reporting while it boots; the
console is the one channel that always exists, and dom0 already captures it
(qemu ``-serial``, ``xl console``, xenconsoled's log).  But that capture is
shared with the kernel, which prints whenever it likes, so every record is a
self-checking line::

    \\x1e\\x1eSCR1 <seq> <crc32 as 8 lower-case hex digits> <compact JSON object>\\r\\n

Two ASCII RS characters open the record (printk never emits them), the CRC-32
of the JSON bytes rejects anything mangled, and the JSON carries its own
``seq`` too, so a damaged sequence number in the header cannot go unnoticed.

Both the writer (:class:`Reporter`, in the guest) and the reader
(:func:`parse_console`, used by ``dom0.collect``) live in this one module, so
the format is defined exactly once.  Standard library only, and only cheap
modules, because this is imported by PID 1 of the initramfs.
"""
from __future__ import annotations

import json
import os
import time
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - typing is not imported at run time (start-up cost)
    from typing import BinaryIO, Callable, Union

    Opener = Callable[[], Union[int, BinaryIO]]

MARKER = "\x1e\x1eSCR1 "
FORMAT = "supercharge-report/1"
STATUSES = ("ok", "failed", "skipped")
DEFAULT_CONSOLE = "/dev/console"

_MARKER = MARKER.encode("ascii")
_HEX = frozenset(b"0123456789abcdef")
_MAX_SEQ_DIGITS = 12  # int() of a huge digit string is slow or refused; no boot has 10**12 records
_REASSEMBLE_LOOKAHEAD = 3  # lines searched for the rest of a record that a kernel message split
_REASSEMBLE_FULL_SEARCH = 4096  # longer split records are only rebuilt at a "[" (printk timestamp)


# --------------------------------------------------------------------------- encoding


def _dumps(obj: dict) -> bytes:
    """Canonical compact ASCII JSON: the bytes the checksum covers.

    ``sort_keys`` makes identical payloads byte-identical (so duplicates are
    recognised), ``ensure_ascii`` keeps the console line pure ASCII whatever a
    detail contains, ``allow_nan=False`` keeps the report readable by strict
    JSON tools, and ``default=str`` turns a stray Path or exception into text
    instead of failing.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str
    ).encode("ascii")


def encode_record(seq: int, payload: dict) -> bytes:
    """Return the framed console line for ``payload`` as record number ``seq``.

    ``seq`` is stored both in the header and inside the JSON (overriding any
    ``"seq"`` key of ``payload``): only the JSON is checksummed, so the copy
    inside is what protects the number.  Raises ``ValueError``/``TypeError``
    for a bad ``seq`` or a payload JSON cannot represent (NaN, unsortable
    keys); :class:`Reporter` catches those, callers of this function decide.
    """
    if type(seq) is not int or seq < 1:
        raise ValueError(f"record sequence numbers start at 1, got {seq!r}")
    return _frame(seq, _dumps({**payload, "seq": seq}))


def _frame(seq: int, body: bytes) -> bytes:
    return b"%s%d %08x %s\r\n" % (_MARKER, seq, zlib.crc32(body), body)


def read_uptime(path: str = "/proc/uptime") -> float | None:
    """Seconds since the kernel started, or None (e.g. before /proc is mounted).

    Uptime rather than wall-clock time: the guest clock is often wrong this
    early, and uptime lines up with the kernel's own ``[    1.234567]`` stamps.
    """
    try:
        with open(path, "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- writing


class Reporter:
    """Writes boot records to the console, and never lets that kill PID 1.

    ``target`` is a path (default ``/dev/console``) or a zero-argument opener
    returning a file descriptor or a binary stream.  It is opened on the first
    record, not at construction, because the agent creates its reporter before
    ``/dev`` may be usable.  If opening or writing fails, records go to
    ``fallback_fd`` (stderr, which the kernel points at the console for init),
    and if that fails too they are only kept in :attr:`records`.

    A path is opened with ``O_NOCTTY`` (PID 1 must not acquire the console as
    its controlling terminal) and ``O_CLOEXEC`` (the real init must not inherit
    it).  It is not created unless ``create`` is true: creating a regular file
    named ``/dev/console`` before devtmpfs is mounted would swallow the report.

    Each record is written with a single ``os.write`` on an unbuffered
    descriptor so that a kernel message is less likely to land mid-line.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | Opener = DEFAULT_CONSOLE,
        *,
        create: bool = False,
        fallback_fd: int | None = 2,
        uptime: Callable[[], float | None] = read_uptime,
    ) -> None:
        self._target = target
        self._create = create
        self._fallback_fd = fallback_fd
        self._uptime = uptime
        self._fd: int | None = None
        self._stream: BinaryIO | None = None  # kept alive while we write to its descriptor
        self._owns_fd = False
        self._state = "unopened"  # -> "target" | "fallback" | "memory"
        self.records: list[dict] = []
        """Every record so far (payload with ``seq``), written or not, for persisting the report."""

    # -- public API

    @property
    def destination(self) -> str:
        """Where records currently go: "unopened", "target", "fallback" or "memory"."""
        return self._state

    def stage(self, stage: str, status: str, duration: float, details: dict | None = None) -> dict:
        """Record that ``stage`` ended with ``status`` after ``duration`` seconds.

        Returns the payload as written (with ``seq`` and ``uptime``).  A wrong
        ``status`` or the reserved name ``outcome`` is a programming error and
        raises ``ValueError``; I/O problems never raise.
        """
        if status not in STATUSES:
            raise ValueError(f"stage status must be one of {', '.join(STATUSES)}, got {status!r}")
        if stage == "outcome":
            raise ValueError("the stage name 'outcome' is reserved; use Reporter.outcome()")
        payload: dict = {"stage": stage, "status": status, "duration": duration}
        if details is not None:
            payload["details"] = details
        return self._record(payload)

    def outcome(self, outcome: str, policy: str, details: dict | None = None) -> dict:
        """Write the final record: what the agent did (``switched``, ...) under which policy.

        dom0 treats a capture without it as an unfinished boot, so the agent
        must write it last, just before switching root or powering off.
        """
        payload: dict = {
            "stage": "outcome",
            "status": "ok" if outcome == "switched" else "failed",
            "outcome": outcome,
            "policy": policy,
        }
        if details is not None:
            payload["details"] = details
        return self._record(payload)

    def to_report(self) -> dict:
        """The report dom0 would build from a perfect capture of these records.

        Built by encoding and re-parsing, so it cannot drift from the collector.
        """
        return parse_console(b"".join(encode_record(r["seq"], r) for r in self.records))

    def close(self) -> None:
        """Close the console descriptor if we opened it (exec closes it anyway: O_CLOEXEC)."""
        fd, self._fd = self._fd, None
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                stream.close()
            elif fd is not None and self._owns_fd:
                os.close(fd)
        except Exception:
            pass
        if self._state == "target":
            self._state = "unopened"

    # -- internals

    def _record(self, payload: dict) -> dict:
        seq = len(self.records) + 1
        payload["uptime"] = self._safe_uptime()
        try:
            body = _dumps({**payload, "seq": seq})
        except (TypeError, ValueError):
            body = _dumps({**self._sanitize(payload), "seq": seq})
        # Keep what the line says, not the caller's objects: .records must equal
        # what dom0 parses back (Paths become strings, tuples lists, ...).
        record = json.loads(body)
        self.records.append(record)
        self._emit(_frame(seq, body))
        return record

    def _safe_uptime(self) -> float | None:
        try:
            value = self._uptime()
            return float(value) if value is not None else None
        except Exception:
            return None

    @staticmethod
    def _sanitize(payload: dict) -> dict:
        """A payload that always encodes: used when details hold NaN or unsortable keys."""
        safe: dict = {}
        for key, value in payload.items():
            if key == "details":
                safe[key] = {"unencodable": repr(value)[:4000]}
            elif isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
                safe[key] = None  # NaN/infinity: not JSON
            elif isinstance(value, (str, int, float, type(None))):
                safe[key] = value
            else:
                safe[key] = repr(value)
        return safe

    def _emit(self, line: bytes) -> None:
        """Write ``line`` somewhere, degrading target -> fallback fd -> memory."""
        while self._state != "memory":
            if self._state == "unopened":
                self._open()
                continue
            try:
                if self._state == "target":
                    self._write_target(line)
                else:
                    self._write_fd(self._fallback_fd, line)  # type: ignore[arg-type]
                return
            except Exception:
                self._degrade()

    def _open(self) -> None:
        try:
            target = self._target
            if callable(target):
                opened = target()
                if isinstance(opened, int):
                    self._fd, self._owns_fd = opened, True
                else:
                    self._stream = opened
                    try:
                        self._fd = opened.fileno()
                    except Exception:  # e.g. io.BytesIO: no descriptor, write to the stream
                        self._fd = None
            else:
                flags = os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
                if self._create:
                    flags |= os.O_CREAT
                self._fd, self._owns_fd = os.open(target, flags, 0o644), True
            self._state = "target"
        except Exception:
            self._state = "target"  # so that _degrade moves on to the fallback
            self._degrade()

    def _degrade(self) -> None:
        if self._state == "target":
            self.close()
            self._state = "fallback" if self._fallback_fd is not None else "memory"
        else:
            self._state = "memory"

    def _write_target(self, line: bytes) -> None:
        if self._fd is not None:
            self._write_fd(self._fd, line)
        elif self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
        else:
            raise OSError("console not open")

    @staticmethod
    def _write_fd(fd: int, line: bytes) -> None:
        """One ``os.write`` for the whole line; loop only if the kernel took part of it."""
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError("console accepted no bytes")
            view = view[written:]


class timed:
    """``with timed(reporter, "mount") as t:`` — time a stage and record it.

    Records ``ok`` when the block ends normally, ``failed`` (with the error in
    ``details["error"]``) when it raises; the exception propagates so the agent
    can apply its failure policy.  The block may set ``t.status = "skipped"``
    and fill ``t.details``.  A class, not ``contextlib``, to keep imports small.
    """

    def __init__(self, reporter: Reporter, stage: str) -> None:
        self.reporter = reporter
        self.stage = stage
        self.status: str | None = None
        self.details: dict = {}
        self.record: dict | None = None
        self._start = 0.0

    def __enter__(self) -> timed:
        self._start = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        duration = time.monotonic() - self._start
        status = self.status or "ok"
        if exc is not None:
            status = "failed"
            self.details.setdefault("error", f"{exc_type.__name__}: {exc}")
        self.record = self.reporter.stage(self.stage, status, duration, self.details or None)
        return False


# --------------------------------------------------------------------------- parsing


def _is_header_prefix(parts: list[bytes]) -> bool:
    """True if ``parts`` could be the start of ``<seq> <crc>``: the line ended in the header."""
    if len(parts) == 1:
        return parts[0] == b"" or parts[0].isdigit()
    return parts[0].isdigit() and len(parts[1]) <= 8 and all(c in _HEX for c in parts[1])


def _parse_frame(seg: bytes) -> tuple[str, int | None, object, bytes]:
    """Decode the text after a marker.

    Returns ``("ok", seq, payload, body)`` or ``(kind, seq_or_None, detail, b"")``
    with kind "truncated" (the text stops before the record could be complete)
    or "corrupt" (complete-looking but wrong).  A seq in a bad record comes from
    its unverified header and is only a hint.
    """
    parts = seg.split(b" ", 2)
    head = parts[0]
    seq = int(head) if head.isdigit() and len(head) <= _MAX_SEQ_DIGITS else None
    if len(parts) < 3:
        if _is_header_prefix(parts):
            return "truncated", seq, "record ends inside its header", b""
        return "corrupt", seq, "malformed record header", b""
    _, crc_text, body = parts
    if seq is None or len(crc_text) != 8 or not all(c in _HEX for c in crc_text):
        return "corrupt", seq, "malformed record header", b""
    if not body.startswith(b"{"):
        return "corrupt", seq, "record body is not a JSON object", b""
    if not body.endswith(b"}"):
        return "truncated", seq, "record ends early (line cut short)", b""
    actual = zlib.crc32(body)
    if actual != int(crc_text, 16):
        return "corrupt", seq, f"checksum mismatch (header {crc_text.decode()}, body {actual:08x})", b""
    try:
        payload = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return "corrupt", seq, "checksum matches but the body is not valid JSON", b""
    if not isinstance(payload, dict):
        return "corrupt", seq, "record body is not a JSON object", b""
    if type(payload.get("seq")) is not int or payload["seq"] != seq:
        return "corrupt", seq, f"header seq {seq} does not match body seq {payload.get('seq')!r}", b""
    if seq < 1:
        return "corrupt", seq, "sequence numbers start at 1", b""
    if not isinstance(payload.get("stage"), str):
        return "corrupt", seq, "record has no stage", b""
    return "ok", seq, payload, body


def _reassemble(seg: bytes, lines: list[bytes], index: int) -> tuple[int, dict, bytes] | None:
    """Try to rebuild a truncated record that a kernel message split in two.

    On a serial console printk writes straight to the UART while our line may
    still sit in the tty buffer, so the capture can read
    ``<record start>[    1.23] kernel text\\n<record end>\\r\\n``.  We try cut
    points in the first part (every one for short records, else each ``[``)
    joined with one of the next few marker-free lines, or with nothing (a
    message glued after the closing brace).  The
    CRC-32, the JSON parse and the seq check together make a false match
    practically impossible, so a rebuilt record is as trustworthy as any other.
    """
    tails: list[bytes] = [b""]
    for k in range(1, _REASSEMBLE_LOOKAHEAD + 1):
        if index + k >= len(lines):
            break
        tail = lines[index + k].rstrip(b"\r")
        if _MARKER in tail:
            break
        tails.append(tail)
    # Where printk's text starts: at a "[" (its timestamp) when printk.time is on.
    # Every position is tried only for short records, to bound the work (quadratic).
    cuts = [i for i in range(len(seg) - 1, 0, -1) if seg[i] == 0x5B]  # b"["
    if len(seg) <= _REASSEMBLE_FULL_SEARCH:
        cuts += [i for i in range(len(seg), 0, -1) if seg[i : i + 1] != b"["]
    tried: set[bytes] = set()
    for tail in tails:
        if tail in tried or (not tail.endswith(b"}") and not (tail == b"" and b"}" in seg)):
            continue
        tried.add(tail)
        for cut in cuts:
            candidate = seg[:cut] + tail
            if not candidate.endswith(b"}"):
                continue
            kind, seq, payload, body = _parse_frame(candidate)
            if kind == "ok":
                return seq, payload, body  # type: ignore[return-value]
    return None


def _problem(kind: str, seq: int | None, line: int | None, detail: str) -> dict:
    return {"kind": kind, "seq": seq, "line": line, "detail": detail}


def parse_console(data: bytes) -> dict:
    """Turn a raw console capture into the structured boot report.

    Records may start anywhere in a line (a kernel message without a newline
    can precede them); lines end in ``\\n`` with any number of ``\\r`` (a pty
    turns our ``\\r\\n`` into ``\\r\\r\\n``).  Nothing that fails its checksum is
    ever reported as a record: it becomes a problem instead, so an admin reads
    either true records or an explicit note of what is missing.

    Returns ``{"format", "records", "outcome", "complete", "problems",
    "stages"}``; see docs/report.md.
    """
    lines = data.split(b"\n")
    unterminated_tail = not data.endswith(b"\n")
    accepted: dict[int, tuple[dict, bytes, int]] = {}  # seq -> (payload, body, line number)
    bad: dict[int, tuple[str, int]] = {}  # seq from a bad header -> (kind, line number)
    problems: list[dict] = []

    for index, raw in enumerate(lines):
        if _MARKER not in raw:
            continue
        lineno = index + 1
        line = raw.rstrip(b"\r")
        starts = []
        pos = line.find(_MARKER)
        while pos >= 0:
            starts.append(pos)
            pos = line.find(_MARKER, pos + len(_MARKER))
        for n, start in enumerate(starts):
            last = n == len(starts) - 1
            seg = line[start + len(_MARKER) : len(line) if last else starts[n + 1]]
            kind, seq, payload, body = _parse_frame(seg)
            if kind == "truncated" and last:
                rebuilt = _reassemble(seg, lines, index)
                if rebuilt is not None:
                    kind, (seq, payload, body) = "ok", rebuilt
            if kind != "ok":
                detail = str(payload)
                if kind == "truncated" and last and index == len(lines) - 1 and unterminated_tail:
                    detail = "capture ends mid-record"
                problems.append(_problem(kind, seq, lineno, detail))
                if seq is not None:
                    bad.setdefault(seq, (kind, lineno))
                continue
            assert isinstance(payload, dict) and seq is not None
            if seq in accepted:
                _, first_body, first_line = accepted[seq]
                if body == first_body:
                    problems.append(_problem(
                        "duplicate", seq, lineno,
                        f"record {seq} repeated (first on line {first_line}); identical, one kept"))
                else:
                    problems.append(_problem(
                        "conflict", seq, lineno,
                        f"record {seq} differs from the one on line {first_line}; the first is kept"))
                continue
            accepted[seq] = (payload, body, lineno)

    ordered = sorted(accepted)

    expected = 1
    for seq in ordered:
        if seq > expected:
            span = f"record {expected}" if seq - 1 == expected else f"records {expected}-{seq - 1}"
            hints = [f"{bad[s][0]} record on line {bad[s][1]}" for s in range(expected, seq) if s in bad]
            detail = f"{span} not received (before record {seq})"
            if hints:
                detail += "; see the " + ", ".join(hints)
            problems.append(_problem("missing", expected, accepted[seq][2], detail))
        expected = seq + 1

    outcome_seq = next((s for s in ordered if accepted[s][0]["stage"] == "outcome"), None)
    if outcome_seq is None:
        if accepted:
            detail = "no outcome record: the boot did not finish, or the capture stopped early"
        else:
            detail = "no Supercharge records in the capture"
        problems.append(_problem("no-outcome", None, None, detail))
    else:
        for seq in ordered:
            if seq > outcome_seq:
                problems.append(_problem(
                    "after-outcome", seq, accepted[seq][2],
                    f"record {seq} (stage {accepted[seq][0]['stage']!r}) follows the outcome "
                    f"(record {outcome_seq})"))

    records = [accepted[s][0] for s in ordered]
    outcome = accepted[outcome_seq][0] if outcome_seq is not None else None
    stages = [
        {"stage": r["stage"], "status": r.get("status"), "duration": r.get("duration")}
        for r in records
        if r["stage"] != "outcome"
    ]
    return {
        "format": FORMAT,
        "records": records,
        "outcome": outcome,
        "complete": outcome is not None and not problems,
        "problems": problems,
        "stages": stages,
    }
