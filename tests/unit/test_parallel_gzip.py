"""Forks are gzipped in pieces on every core: still one valid .gz for every reader."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess

import pytest

from dom0.container.process import _parallel_gzip
from dom0.cpio import CpioWriter
from guest_init.archive import extract_archive

pytestmark = pytest.mark.unit


def test_members_concatenate_into_one_stream(tmp_path):
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    blobs = {f"etc/f{i}": os.urandom(1000) * (i + 1) for i in range(40)}
    for name, data in blobs.items():
        writer.add_file(name, data)
    writer.close()
    raw = buf.getvalue()
    packed = _parallel_gzip(raw, 6, parts=3)
    assert packed.count(b"\x1f\x8b\x08") >= 3
    assert gzip.decompress(packed) == raw
    if shutil.which("gzip"):
        out = subprocess.run(["gzip", "-dc"], input=packed, capture_output=True, check=True).stdout
        assert out == raw
    archive = tmp_path / "a.cpio.gz"
    archive.write_bytes(packed)
    extract_archive(archive, tmp_path / "x")
    for name, data in blobs.items():
        assert (tmp_path / "x" / name).read_bytes() == data
