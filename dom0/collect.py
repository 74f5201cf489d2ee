"""Turn a guest's console capture into a boot report (``supercharge collect``).

The record format and the parser live in :mod:`guest_init.report`, next to the
writer, so the two cannot disagree; this module only does dom0's file work:
reading the capture, writing the report atomically, and printing a summary.
"""
from __future__ import annotations

import json
from pathlib import Path

from guest_init.report import parse_console

from .errors import UserError


def collect_console(path: Path) -> dict:
    """Parse the console capture at ``path`` into a report (see docs/report.md).

    The capture is read as bytes: it is mostly kernel text in whatever
    encoding, and only the records, which are pure ASCII, are decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: console capture not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: console capture is a directory, expected a file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read console capture: {exc.strerror or exc}") from None
    report = parse_console(data)
    report["console"] = str(path)
    return report


def write_report(report: dict, out: Path) -> None:
    """Write ``report`` as JSON to ``out``, atomically.

    A temporary file in the same directory, fsynced, then ``os.replace``: a
    reader (or a second ``collect`` run) sees the old report or the new one,
    never half of one, even if dom0 crashes mid-write.
    """
    from .atomic import write_atomically

    out = Path(out)
    text = json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        write_atomically(out, [text.encode("utf-8")])
    except OSError as exc:
        raise UserError(f"{out}: cannot write report: {exc.strerror or exc}") from None


def _seconds(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f} s"
    return "-"


def _step_lines(stage: object, details: dict) -> list[str]:
    """The steps inside a stage worth a line each: artifacts, applied steps, hooks."""
    out: list[str] = []
    for item in details.get("artifacts") or []:
        out.append(f"fetched {item.get('uri')} ({item.get('bytes')} bytes, {_seconds(item.get('seconds'))}, "
                   f"{'pinned' if item.get('pinned') else 'signed' if item.get('signed') else 'unverified'})")
    for step in details.get("steps") or []:
        what = step.get("path") or step.get("uri") or ""
        out.append(f"steps[{step.get('step')}] {step.get('op')} {what} {_seconds(step.get('duration'))}")
    for hook in details.get("hooks") or []:
        out.append(f"hook {hook.get('name')}: exit {hook.get('exit_code')} {_seconds(hook.get('seconds'))}")
    if details.get("converged"):
        out.append("plan already applied on an earlier boot: nothing to do (converged)")
    if details.get("recovered"):
        out.append(f"an interrupted commit was {details['recovered']}")
    return out


def render_report(report: dict) -> str:
    """A short human summary: one line per stage, the outcome, then the problems.

    Meant for the terminal right after a boot; the JSON report holds the full
    records (details, uptimes) for ``supercharge report``/``diagnose``.
    """
    lines: list[str] = []
    if report.get("console"):
        lines.append(f"console: {report['console']}")
    # The records, not "stages", so a failed stage's error can be shown under it.
    records = [r for r in report.get("records") or [] if r.get("stage") != "outcome"]
    width = max([len(str(r.get("stage"))) for r in records] + [5])
    for record in records:
        lines.append(
            f"  {str(record.get('stage')):<{width}}  {str(record.get('status')):<7}  "
            f"{_seconds(record.get('duration')):>10}"
        )
        details = record.get("details")
        if isinstance(details, dict):
            lines += [f"  {'':<{width}}  {line}" for line in _step_lines(record.get("stage"), details)]
        if record.get("status") == "failed" and isinstance(details, dict) and details.get("error"):
            lines.append(f"  {'':<{width}}  error: {details['error']}")
    outcome = report.get("outcome")
    if outcome is None:
        lines.append("outcome: none recorded")
    else:
        lines.append(
            f"outcome: {outcome.get('outcome')} (policy {outcome.get('policy')}, "
            f"status {outcome.get('status')})"
        )
    problems = report.get("problems") or []
    if problems:
        lines.append(f"problems ({len(problems)}):")
        for p in problems:
            where = []
            if p.get("line") is not None:
                where.append(f"line {p['line']}")
            if p.get("seq") is not None:
                where.append(f"record {p['seq']}")
            prefix = f"{', '.join(where)}: " if where else ""
            lines.append(f"  {prefix}{p.get('kind')}: {p.get('detail')}")
    lines.append("report complete" if report.get("complete") else "report INCOMPLETE")
    return "\n".join(lines)
