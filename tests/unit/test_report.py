"""Boot report records: framing, parsing a noisy console capture, the Reporter, dom0 collect."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from dom0.collect import collect_console, render_report, write_report
from dom0.errors import UserError
from guest_init.report import (
    FORMAT,
    MARKER,
    Reporter,
    encode_record,
    parse_console,
    timed,
)

pytestmark = pytest.mark.unit

KERNEL_BEFORE = (
    b"[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\r\n"
    b"[    0.812345] Run /init as init process\r\n"
)
KERNEL_LINE = b"[    1.234567] virtio_blk virtio1: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)\r\n"
KERNEL_LINE2 = b"[    1.301122] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.\r\n"


def boot_records() -> list[dict]:
    """The payloads of a normal, successful boot."""
    return [
        {"stage": "early", "status": "ok", "duration": 0.012, "uptime": 0.9},
        {"stage": "modules", "status": "ok", "duration": 0.25, "uptime": 1.2,
         "details": {"loaded": ["virtio_blk", "ext4"]}},
        {"stage": "mount", "status": "ok", "duration": 0.1, "uptime": 1.35},
        {"stage": "outcome", "status": "ok", "outcome": "switched", "policy": "fail-closed",
         "uptime": 1.4},
    ]


def lines_of(payloads: list[dict]) -> list[bytes]:
    return [encode_record(i, p) for i, p in enumerate(payloads, 1)]


def kinds(report: dict) -> list[str]:
    return [p["kind"] for p in report["problems"]]


# --------------------------------------------------------------------------- format


def test_encode_record_frame_is_exact() -> None:
    line = encode_record(7, {"stage": "mount", "status": "ok", "duration": 0.5, "details": {"é": 1}})
    assert line.startswith(b"\x1e\x1eSCR1 7 ")
    assert MARKER == "\x1e\x1eSCR1 "
    assert line.endswith(b"\r\n")
    line.decode("ascii")  # pure ASCII even with non-ASCII details
    _, _, crc, body = line[:-2].split(b" ", 3)
    assert body == b'{"details":{"\\u00e9":1},"duration":0.5,"seq":7,"stage":"mount","status":"ok"}'
    assert int(crc, 16) == zlib.crc32(body)
    assert len(crc) == 8


def test_encode_record_rejects_bad_seq() -> None:
    with pytest.raises(ValueError):
        encode_record(0, {"stage": "x"})


def test_round_trip() -> None:
    payloads = boot_records()
    report = parse_console(b"".join(lines_of(payloads)))
    assert report["format"] == FORMAT
    assert report["records"] == [{**p, "seq": i} for i, p in enumerate(payloads, 1)]
    assert report["outcome"]["outcome"] == "switched"
    assert report["outcome"]["seq"] == 4
    assert report["problems"] == []
    assert report["complete"] is True
    assert report["stages"] == [
        {"stage": "early", "status": "ok", "duration": 0.012},
        {"stage": "modules", "status": "ok", "duration": 0.25},
        {"stage": "mount", "status": "ok", "duration": 0.1},
    ]


def test_records_among_kernel_messages_and_glued_to_one() -> None:
    r = lines_of(boot_records())
    # A kernel message without its newline right before record 3; pty-style \r\r\n after record 2.
    capture = (
        KERNEL_BEFORE + r[0] + KERNEL_LINE + r[1][:-2] + b"\r\r\n" + KERNEL_LINE2
        + b"[    1.310000] random: crng init done" + r[2] + r[3]
        + b"[    1.500000] reboot: Power down\r\n"
    )
    report = parse_console(capture)
    assert report["problems"] == []
    assert report["complete"] is True
    assert [rec["stage"] for rec in report["records"]] == ["early", "modules", "mount", "outcome"]


def test_record_split_by_kernel_message_is_reassembled() -> None:
    r = lines_of(boot_records())
    cut = len(r[1]) // 2
    # printk wrote to the UART while half of record 2 was still in the tty buffer.
    capture = r[0] + r[1][:cut] + KERNEL_LINE + r[1][cut:] + r[2] + r[3]
    report = parse_console(capture)
    assert report["problems"] == []
    assert report["records"][1]["details"] == {"loaded": ["virtio_blk", "ext4"]}


def test_record_split_by_message_without_timestamp_is_reassembled() -> None:
    r = lines_of(boot_records())
    cut = len(r[1]) // 3
    capture = r[0] + r[1][:cut] + b"random: crng init done\r\n" + KERNEL_LINE + r[1][cut:] + r[2] + r[3]
    report = parse_console(capture)
    assert report["problems"] == []
    assert [rec["seq"] for rec in report["records"]] == [1, 2, 3, 4]


def test_kernel_message_after_closing_brace_is_reassembled() -> None:
    r = lines_of(boot_records())
    capture = r[0] + r[1][:-2] + KERNEL_LINE + r[2] + r[3]
    report = parse_console(capture)
    assert report["problems"] == []
    assert len(report["records"]) == 4


def test_truncated_record_at_end_of_capture() -> None:
    r = lines_of(boot_records())
    capture = KERNEL_BEFORE + r[0] + r[1] + r[2] + r[3][:30]
    report = parse_console(capture)
    assert [rec["seq"] for rec in report["records"]] == [1, 2, 3]
    assert report["outcome"] is None
    assert report["complete"] is False
    truncated = [p for p in report["problems"] if p["kind"] == "truncated"]
    assert len(truncated) == 1
    assert truncated[0]["seq"] == 4
    assert truncated[0]["line"] == 6  # two kernel lines, then the records one per line
    assert truncated[0]["detail"] == "capture ends mid-record"
    assert "no-outcome" in kinds(report)


def test_truncated_record_mid_capture_followed_by_next_record() -> None:
    r = lines_of(boot_records())
    capture = r[0] + r[1][:40] + r[2] + r[3]  # record 2 cut off, record 3 on the same line
    report = parse_console(capture)
    assert [rec["seq"] for rec in report["records"]] == [1, 3, 4]
    assert kinds(report) == ["truncated", "missing"]
    assert report["problems"][0]["seq"] == 2
    assert report["problems"][0]["line"] == 2
    missing = report["problems"][1]
    assert missing["seq"] == 2
    assert "truncated record on line 2" in missing["detail"]
    assert report["complete"] is False


def test_truncated_inside_header() -> None:
    r = lines_of(boot_records())
    report = parse_console(r[0] + b"\x1e\x1eSCR1 2 0a1b\r\n" + r[2] + r[3])
    assert report["problems"][0]["kind"] == "truncated"
    assert report["problems"][0]["seq"] == 2


def test_identical_duplicate_kept_once() -> None:
    r = lines_of(boot_records())
    report = parse_console(r[0] + r[1] + KERNEL_LINE + r[1] + r[2] + r[3])
    assert [rec["seq"] for rec in report["records"]] == [1, 2, 3, 4]
    assert kinds(report) == ["duplicate"]
    assert report["problems"][0]["seq"] == 2
    assert report["problems"][0]["line"] == 4
    assert report["complete"] is False


def test_conflicting_duplicate_keeps_first() -> None:
    r = lines_of(boot_records())
    other = encode_record(2, {"stage": "modules", "status": "failed", "duration": 9.0})
    report = parse_console(r[0] + r[1] + other + r[2] + r[3])
    assert kinds(report) == ["conflict"]
    assert report["records"][1]["status"] == "ok"
    assert len(report["records"]) == 4


def test_corrupted_byte_in_payload() -> None:
    r = lines_of(boot_records())
    bad = r[1].replace(b'"ok"', b'"ox"')
    assert bad != r[1]
    report = parse_console(r[0] + bad + r[2] + r[3])
    assert [rec["seq"] for rec in report["records"]] == [1, 3, 4]
    assert all(rec["status"] != "ox" for rec in report["records"])
    assert kinds(report) == ["corrupt", "missing"]
    corrupt = report["problems"][0]
    assert corrupt["seq"] == 2 and corrupt["line"] == 2
    assert "checksum" in corrupt["detail"]


def test_corrupted_checksum() -> None:
    r = lines_of(boot_records())
    head, body = r[2].split(b" {", 1)
    crc = head[-8:]
    flipped = (b"0" if crc[:1] != b"0" else b"1") + crc[1:]
    bad = head[:-8] + flipped + b" {" + body
    report = parse_console(r[0] + r[1] + bad + r[3])
    assert [rec["seq"] for rec in report["records"]] == [1, 2, 4]
    assert kinds(report) == ["corrupt", "missing"]
    assert report["problems"][0]["seq"] == 3


def test_corrupted_seq_in_header_is_caught_by_body_seq() -> None:
    r = lines_of(boot_records())
    bad = r[1].replace(b"SCR1 2 ", b"SCR1 5 ", 1)
    report = parse_console(r[0] + bad + r[2] + r[3])
    assert [rec["seq"] for rec in report["records"]] == [1, 3, 4]
    assert kinds(report)[0] == "corrupt"


def test_malformed_frame() -> None:
    r = lines_of(boot_records())
    report = parse_console(r[0] + b"\x1e\x1eSCR1 hello world\r\n" + r[1] + r[2] + r[3])
    assert kinds(report) == ["corrupt"]
    assert report["problems"][0]["seq"] is None
    assert len(report["records"]) == 4


def test_missing_seq_and_missing_before_first() -> None:
    r = lines_of(boot_records())
    report = parse_console(r[1] + r[3])  # records 1 and 3 never arrived
    assert [(p["kind"], p["seq"]) for p in report["problems"]] == [("missing", 1), ("missing", 3)]
    assert report["problems"][0]["line"] == 1
    assert report["outcome"] is not None
    assert report["complete"] is False


def test_missing_range_reported_once() -> None:
    r = lines_of(boot_records())
    report = parse_console(r[0] + r[3])
    assert [(p["kind"], p["seq"]) for p in report["problems"]] == [("missing", 2)]
    assert "records 2-3" in report["problems"][0]["detail"]


def test_no_outcome() -> None:
    r = lines_of(boot_records())
    report = parse_console(KERNEL_BEFORE + r[0] + r[1] + r[2] + KERNEL_LINE)
    assert report["outcome"] is None
    assert report["complete"] is False
    assert kinds(report) == ["no-outcome"]
    assert len(report["stages"]) == 3


def test_empty_capture() -> None:
    report = parse_console(KERNEL_BEFORE)
    assert report["records"] == []
    assert kinds(report) == ["no-outcome"]
    assert "no Supercharge records" in report["problems"][0]["detail"]


def test_records_after_outcome() -> None:
    payloads = boot_records() + [{"stage": "hooks", "status": "ok", "duration": 0.1}]
    report = parse_console(b"".join(lines_of(payloads)))
    assert kinds(report) == ["after-outcome"]
    assert report["problems"][0]["seq"] == 5
    assert report["outcome"]["seq"] == 4
    assert report["complete"] is False


def test_non_ascii_kernel_noise_is_ignored() -> None:
    r = lines_of(boot_records())
    noise = b"\xff\xfe garbage \x00\x1b[0m\r\n"
    report = parse_console(noise + b"".join(r) + noise)
    assert report["complete"] is True


# --------------------------------------------------------------------------- Reporter


def test_reporter_writes_file_parsed_back(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    rep = Reporter(str(console), create=True, uptime=lambda: 1.5)
    assert rep.destination == "unopened"  # lazy
    assert not console.exists()
    rep.stage("early", "ok", 0.01)
    rep.stage("mount", "failed", 0.2, {"error": "no device with label ROOT", "path": Path("/sysroot")})
    last = rep.outcome("failed", "fail-closed")
    rep.close()
    assert rep.destination != "memory"
    assert last == {"stage": "outcome", "status": "failed", "outcome": "failed",
                    "policy": "fail-closed", "uptime": 1.5, "seq": 3}
    data = console.read_bytes()
    assert data.count(b"\r\n") == 3
    report = parse_console(KERNEL_BEFORE + data)
    assert report["records"] == rep.records
    assert rep.records[1]["details"]["path"] == "/sysroot"  # stored as written, not as the object
    assert report["complete"] is True
    assert rep.to_report() == report
    assert [s["status"] for s in report["stages"]] == ["ok", "failed"]


def test_reporter_one_write_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    rep = Reporter(str(tmp_path / "c"), create=True)
    rep.stage("early", "ok", 0.1)
    rep.stage("modules", "skipped", 0.0)
    assert len(writes) == 2
    assert all(w.startswith(MARKER.encode()) and w.endswith(b"\r\n") for w in writes)


def test_reporter_uptime_from_proc_or_none() -> None:
    rep = Reporter(lambda: 1 / 0, fallback_fd=None, uptime=lambda: None)
    assert rep.stage("early", "ok", 0.0)["uptime"] is None
    rep2 = Reporter(lambda: 1 / 0, fallback_fd=None)
    value = rep2.stage("early", "ok", 0.0)["uptime"]
    assert value is None or (isinstance(value, float) and value > 0)


def test_reporter_unopenable_path_keeps_records_in_memory(tmp_path: Path) -> None:
    rep = Reporter(str(tmp_path / "no" / "such" / "console"), fallback_fd=None)
    rec = rep.stage("early", "ok", 0.1)
    rep.outcome("switched", "fail-closed")
    assert rep.destination == "memory"
    assert rec["seq"] == 1
    assert [r["seq"] for r in rep.records] == [1, 2]
    assert rep.to_report()["complete"] is True


def test_reporter_does_not_create_missing_console(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "console"
    rep = Reporter(str(target))  # like /dev/console before devtmpfs: must not become a regular file
    rep.stage("early", "ok", 0.1)
    assert not target.exists()
    assert rep.destination == "fallback"
    err = capfd.readouterr().err
    assert parse_console(err.encode())["records"] == rep.records


def test_reporter_write_failure_falls_back(capfd: pytest.CaptureFixture[str]) -> None:
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # writing now fails with EPIPE (Python ignores SIGPIPE)

    rep = Reporter(lambda: w_fd)
    rep.stage("early", "ok", 0.1)
    assert rep.destination == "fallback"
    assert b"SCR1 1 " in capfd.readouterr().err.encode()
    rep2 = Reporter(lambda: (_ for _ in ()).throw(OSError("gone")), fallback_fd=999_999)
    rep2.stage("early", "ok", 0.1)
    assert rep2.destination == "memory"
    assert len(rep2.records) == 1


def test_reporter_stream_without_fileno() -> None:
    import io

    buf = io.BytesIO()
    rep = Reporter(lambda: buf)
    rep.stage("early", "ok", 0.1)
    rep.outcome("switched", "fail-closed")
    assert parse_console(buf.getvalue())["records"] == rep.records


def test_reporter_unencodable_details_do_not_raise() -> None:
    rep = Reporter(lambda: 1 / 0, fallback_fd=None)
    rec = rep.stage("apply", "failed", float("nan"), {1: "a", "b": 2})
    assert rec["duration"] is None
    assert "unencodable" in rec["details"]
    assert rep.to_report()["records"][0] == rec


def test_reporter_rejects_bad_status() -> None:
    rep = Reporter(lambda: 1 / 0, fallback_fd=None)
    with pytest.raises(ValueError):
        rep.stage("early", "done", 0.1)
    with pytest.raises(ValueError):
        rep.stage("outcome", "ok", 0.1)
    assert rep.records == []


def test_timed_records_ok_and_failure() -> None:
    rep = Reporter(lambda: 1 / 0, fallback_fd=None)
    with timed(rep, "early") as t:
        t.details["plan"] = "v1"
    with pytest.raises(RuntimeError):
        with timed(rep, "apply"):
            raise RuntimeError("hunk 2 did not apply")
    with timed(rep, "network") as t:
        t.status = "skipped"
    assert [(r["stage"], r["status"]) for r in rep.records] == [
        ("early", "ok"), ("apply", "failed"), ("network", "skipped")]
    assert rep.records[0]["details"] == {"plan": "v1"}
    assert rep.records[1]["details"]["error"] == "RuntimeError: hunk 2 did not apply"
    assert all(r["duration"] >= 0 for r in rep.records)


# --------------------------------------------------------------------------- dom0 collect


def test_collect_console_and_write_report(tmp_path: Path) -> None:
    capture = tmp_path / "web1.console"
    capture.write_bytes(KERNEL_BEFORE + b"".join(lines_of(boot_records())))
    report = collect_console(capture)
    assert report["console"] == str(capture)
    assert report["complete"] is True
    out = tmp_path / "web1.report.json"
    out.write_text("old")
    write_report(report, out)
    assert json.loads(out.read_text()) == report
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_collect_missing_console(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"
    with pytest.raises(UserError) as info:
        collect_console(missing)
    assert str(info.value) == f"{missing}: console capture not found"


def test_write_report_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        write_report({"a": 1}, tmp_path / "missing-dir" / "r.json")


def test_render_report() -> None:
    payloads = boot_records()
    payloads[2] = {"stage": "mount", "status": "failed", "duration": 1.25,
                   "details": {"error": "no device with label ROOT"}}
    payloads[3] = {"stage": "outcome", "status": "failed", "outcome": "halted", "policy": "fail-closed"}
    r = lines_of(payloads)
    report = parse_console(r[0] + r[1][:20] + b"\n" + r[2] + r[3])
    text = render_report(report)
    assert "early" in text and "0.012 s" in text
    assert "mount" in text and "failed" in text and "1.250 s" in text
    assert "error: no device with label ROOT" in text
    assert "outcome: halted (policy fail-closed" in text
    assert "truncated" in text and "missing" in text
    assert "INCOMPLETE" in text
    ok = render_report(parse_console(b"".join(lines_of(boot_records()))))
    assert "problems" not in ok and "report complete" in ok
