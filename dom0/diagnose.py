"""``supercharge report`` and ``supercharge diagnose``: a boot, read from dom0.

Both take a domain name (its report in the state directory), a report JSON
file, or a console capture.  ``report`` prints the timeline; ``diagnose``
explains a failure on one screen: which stage and step, which artifact, the
cause, and for a patch the hunk with the lines it expected beside the lines
found, then what to do about it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import state_root
from .collect import collect_console, render_report
from .errors import EXIT_FAILED, EXIT_OK, UserError

HINTS = {
    "early": "check the plan (supercharge prepare-initrd validates it) and that it is signed by a key "
             "the initrd trusts (--trust)",
    "modules": "the kernel and its modules must match: rebuild the initrd for this kernel",
    "network": "check the interface match (MAC or name), the link, and the DHCP server or static "
               "addresses in the plan",
    "devices": "the plan names file systems by label or UUID: check the domain's disk lines and the "
               "images' labels (e2label), and device_timeout",
    "mount": "check the file-system type and options in the plan's mounts",
    "fetch": "check that the URI is reachable from the guest, its pin (sha256) and its signature",
    "apply": "the target differs from what the step expects: regenerate the patch against the "
             "current image (supercharge patch diff), or update the image; nothing was changed",
    "hooks": "fix the hook (its output and status are above) or raise its timeout, then boot again; "
             "hooks run in a view of the staged target before the commit, so a failed hook changed "
             "nothing on disk",
    "commit": "check that the file systems are writable and have free space; a commit that failed "
              "before its commit point changed nothing, one that failed after it is finished by the "
              "next boot",
    "switch": "check the plan's init path in the target",
}

NFS_HINT = ("check that the NFS server answers NFSv4 on that address and port from the guest "
            "(under qemu's user networking the host is 10.0.2.2), that the path is exported "
            "(ganesha's Pseudo path, or /etc/exports and exportfs -ra), and the mount's timeout")


def load_report(what: str) -> dict:
    """A report from a domain name, a report file, or a console capture."""
    path = Path(what)
    if not path.exists() and "/" not in what:
        path = state_root() / "domains" / what / "report.json"
        if not path.exists():
            raise UserError(f"no report for domain '{what}' (looked for {path})")
    if not path.is_file():
        raise UserError(f"{what}: not found (expected a domain name, a report.json or a console capture)")
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        try:
            report = json.loads(data)
        except ValueError as exc:
            raise UserError(f"{path}: not a valid report: {exc}") from None
        if "records" not in report:
            raise UserError(f"{path}: not a boot report (no records)")
        return report
    return collect_console(path)


def failed_record(report: dict) -> dict | None:
    for record in report.get("records", []):
        if record.get("status") == "failed" and record.get("stage") != "outcome":
            return record
    return None


def _side_by_side(hunk: dict, width: int = 38) -> list[str]:
    expected = hunk.get("expected") or []
    best = hunk.get("best") or hunk.get("closest") or {}
    found = best.get("found") or best.get("lines") or []
    start = best.get("line") or best.get("start") or 0
    out = [f"    {'expected (the patch)':<{width}} | found at line {start} of the file"]
    for i in range(max(len(expected), len(found))):
        left = str(expected[i]) if i < len(expected) else ""
        right = str(found[i]) if i < len(found) else ""
        mark = " " if left == right else "!"
        out.append(f"  {mark} {left[:width]:<{width}} | {right[:width]}")
    return out


def _patch_lines(details: dict) -> list[str]:
    if details.get("rendered"):
        return ["", *("  " + line for line in str(details["rendered"]).splitlines())]
    lines: list[str] = []
    for file in (details.get("diagnosis") or {}).get("files", []):
        for hunk in file.get("hunks", []):
            if hunk.get("status") in ("failed", "rejected") or hunk.get("applied") is False:
                lines += ["", f"  {file.get('path')}: hunk #{hunk.get('number')} {hunk.get('header', '')}"]
                lines += _side_by_side(hunk)
    return lines


def _hook_lines(hook: dict) -> list[str]:
    """A failed hook: how it ended, in words, and the end of its output."""
    how: list[str] = []
    if hook.get("timed_out"):
        seconds = hook.get("seconds")
        took = f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "its timeout"
        how.append(f"ran past its timeout and was stopped after {took}")
    if hook.get("signal_name") or hook.get("signal") is not None:
        how.append(f"killed by {hook.get('signal_name') or hook.get('signal')}")
    elif hook.get("exit_code") is not None:
        how.append(f"exit status {hook.get('exit_code')}")
    if hook.get("error"):
        how.append(str(hook["error"]))
    lines = [f"hook:         {hook.get('name')} ({hook.get('interpreter', '?')}): {'; '.join(how) or 'failed'}"]
    output = str(hook.get("output") or "")
    if output:
        tail = output.splitlines()[-20:]
        lines.append(f"  its output ({hook.get('output_bytes', len(output))} bytes, last {len(tail)} lines):")
        lines += ["  | " + line for line in tail]
    else:
        lines.append("  it wrote no output")
    return lines


def explain(report: dict) -> tuple[str, int]:
    """The one-screen diagnosis and the exit code (0: nothing failed)."""
    outcome = report.get("outcome") or {}
    record = failed_record(report)
    if record is None:
        if outcome.get("outcome") == "switched":
            return "the boot succeeded: the agent switched into the real init; nothing to diagnose", EXIT_OK
        problems = ", ".join(p.get("kind", "?") for p in report.get("problems", [])) or "no records"
        return (f"no stage reported a failure, but the report has no successful outcome ({problems}); "
                "the guest may have hung or the console capture ended early"), EXIT_FAILED
    stage = record.get("stage", "?")
    details = record.get("details") or {}
    lines = [f"failed stage: {stage} (after {record.get('duration', 0):.2f} s, "
             f"uptime {record.get('uptime') or '?'} s)"]
    if "step" in details:
        lines.append(f"step:         steps[{details['step']}] ({details.get('op', '?')})")
    for key in ("uri", "dir", "path", "device", "target"):
        if details.get(key):
            lines.append(f"{key + ':':<13} {details[key]}")
    if details.get("attempts") is not None:
        lines.append(f"attempts:     {details['attempts']}, last error: {details.get('last_error', '?')}")
    if details.get("missing"):
        lines.append(f"missing:      {', '.join(details['missing'])}")
        for seen in details.get("seen", []):
            lines.append(f"  seen {seen.get('device')}: {seen.get('fstype') or 'no file system'} "
                         f"label={seen.get('label')} uuid={seen.get('uuid')}")
    lines.append(f"cause:        {details.get('error', 'see the stage details')}")
    if details.get("diagnosis") or details.get("rendered"):
        lines += _patch_lines(details)
    for hook in details.get("hooks", []):
        if hook.get("status") == "failed" or hook.get("exit_code") not in (0, None) \
                or hook.get("timed_out") or hook.get("error"):
            lines += _hook_lines(hook)
    if details.get("committed") is False:
        lines.append("changes:      none: nothing was committed, the file systems are as they were")
    elif details.get("committed") is True:
        lines.append("changes:      committed; the next boot finishes the commit (roll-forward)")
    lines.append(f"policy:       {outcome.get('policy', '?')} -> {outcome.get('outcome', 'no outcome record')}")
    hint = NFS_HINT if stage == "mount" and details.get("fstype") == "nfs4" else HINTS.get(stage)
    if hint:
        lines.append(f"what to do:   {hint}")
    return "\n".join(lines), EXIT_FAILED


def cmd_report(args) -> int:
    report = load_report(args.target)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_report(report))
    return EXIT_OK if (report.get("outcome") or {}).get("outcome") == "switched" else EXIT_FAILED


def cmd_diagnose(args) -> int:
    text, code = explain(load_report(args.target))
    print(text)
    return code


def add_parsers(sub) -> None:
    report = sub.add_parser("report", help="print a boot report: outcome, stages and steps with durations")
    report.add_argument("target", metavar="DOMAIN_OR_FILE",
                        help="a domain name, a report.json, or a console capture")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(func=cmd_report)
    diagnose = sub.add_parser("diagnose", help="explain a failed boot on one screen")
    diagnose.add_argument("target", metavar="DOMAIN_OR_FILE",
                          help="a domain name, a report.json, or a console capture")
    diagnose.set_defaults(func=cmd_diagnose)
