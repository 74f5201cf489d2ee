"""The container-file parser: the paper's syntax as printed, our extensions, and every error."""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from dom0.container import (
    EXPRESSIONS,
    Container,
    Copy,
    Create,
    Export,
    Hook,
    Image,
    Mount,
    NfsExport,
    Patch,
    Populate,
    Replace,
    load_container,
    model,
    parse_container,
    trim_body,
)
from dom0.errors import UserError
from dom0.xlcfg import Position, parse_xl_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

# --- the paper's figures, verbatim (../shared/paper-notes.md) -------------------------

FIGURE_1 = """\
[replace /etc/HOSTNAME
archive http://foo.org/images/etc.cpio.gz

FCDOBBS

] [end]
"""

PAPER_CREATE = """\
[create
 /etc/
 ftp://foo.org/images/etc.cpio.gz
 ][end]
"""

PAPER_IMAGE = """\
[image /var/images/fido-etc
 50MB
 fido_etc] [end]
"""

PAPER_POPULATE = """\
[populate image
 /var/images/fido-etc
 /mnt/
 ftp://foo.org/images/etc.cpio.gz
 ][end]
"""

PAPER_PATCH = """\
[patch
file:///var/images/fido-etc
ftp://foo.org/images/fido-etc.patch1
file:///var/images/fido-etc-patched
][end]
"""


def only(text: str, filename: str = "t.ct") -> Any:
    container = parse_container(text, filename)
    assert len(container.expressions) == 1
    return container.expressions[0]


def error(text: str, filename: str = "t.ct") -> str:
    with pytest.raises(UserError) as info:
        parse_container(text, filename)
    assert info.value.exit_code == 2
    return str(info.value)


def test_figure_1_replace_becomes_exactly_fcdobbs() -> None:
    expr = only(FIGURE_1, "my-domain")
    assert expr == Replace(pos=Position("my-domain", 1, 1), span=model.Span(0, len(FIGURE_1) - 1),
                           path="/etc/HOSTNAME", archive="http://foo.org/images/etc.cpio.gz",
                           content=b"FCDOBBS\n")
    assert expr.at_boot is False and expr.image is None and expr.fork is None
    assert str(expr.where("archive")) == "my-domain:2:9"
    assert str(expr.where("path")) == "my-domain:1:10"
    assert str(expr.where("content")) == "my-domain:4:1"


def test_paper_create() -> None:
    expr = only(PAPER_CREATE)
    assert isinstance(expr, Create)
    assert (expr.src_dir, expr.uri) == ("/etc/", "ftp://foo.org/images/etc.cpio.gz")
    assert str(expr.where("uri")) == "t.ct:3:2"


def test_paper_image_is_50_mib_labelled_fido_etc() -> None:
    expr = only(PAPER_IMAGE)
    assert isinstance(expr, Image)
    assert (expr.path, expr.size, expr.label) == ("/var/images/fido-etc", 52428800, "fido_etc")
    assert expr.fstype == "ext4" and expr.export is None


def test_paper_populate_keeps_its_mount_point() -> None:
    expr = only(PAPER_POPULATE)
    assert expr == Populate(pos=expr.pos, span=expr.span, image="/var/images/fido-etc",
                            mountpoint="/mnt/", uri="ftp://foo.org/images/etc.cpio.gz")


def test_paper_patch_with_fork() -> None:
    expr = only(PAPER_PATCH)
    assert isinstance(expr, Patch)
    assert expr.target == "file:///var/images/fido-etc"
    assert expr.patch == "ftp://foo.org/images/fido-etc.patch1"
    assert expr.fork == "file:///var/images/fido-etc-patched"
    assert expr.patch_out is None and expr.strip is None and not expr.at_boot


def test_patch_fork_is_optional() -> None:
    expr = only("[patch file:///var/images/fido-etc ftp://foo.org/p1] [end]")
    assert isinstance(expr, Patch) and expr.fork is None


def test_the_papers_whole_flow_mixed_with_xl_statements_in_order() -> None:
    text = ("name = 'fido'\nmemory = 256\n" + PAPER_CREATE + PAPER_IMAGE + "\n" + PAPER_POPULATE
            + "disk = [ 'file:/var/images/xen_usr,sda1,r' ]\n" + FIGURE_1 + PAPER_PATCH)
    container = parse_container(text, "fido.ct")
    assert [type(e) for e in container.expressions] == [Create, Image, Populate, Replace, Patch]
    assert container.settings == {"name": "fido", "memory": 256,
                                  "disk": ["file:/var/images/xen_usr,sda1,r"]}
    assert str(container.settings.position("disk")) == "fido.ct:16:1"
    for expr in container.expressions:
        start, end = expr.span
        assert text[start] == "[" and text[:end].endswith("[end]")
        assert expr.pos == Position("fido.ct", text.count("\n", 0, start) + 1, 1)
    assert container.path == "fido.ct" and container.text == text


# --- the body rule ------------------------------------------------------------------------


@pytest.mark.parametrize("body, content", [
    ("\nFCDOBBS\n\n", b"FCDOBBS\n"),
    ("\n\n  \t\nFCDOBBS", b"FCDOBBS\n"),
    ("\nline 1\n\n    indented\n# not a comment\nlast   \n\n", b"line 1\n\n    indented\n# not a comment\nlast   \n"),
    ("\n[global]\nworkgroup = X\n", b"[global]\nworkgroup = X\n"),
    ("\nif [ -x /bin/a ]; then a; fi\nx = [1,\n  2\n]\n", b"if [ -x /bin/a ]; then a; fi\nx = [1,\n  2\n]\n"),
    ("\n\n", b""),
    ("\n", b""),
    ("\ncaf\u00e9\n", "caf\u00e9\n".encode()),
])
def test_body_rule(body: str, content: bytes) -> None:
    text = f"[replace /etc/x\narchive http://h/a.cpio.gz\n{body}] [end]\n"
    assert only(text).content == content


def test_body_may_end_on_the_closing_line_and_end_may_follow_later() -> None:
    text = "[replace /etc/x archive http://h/a.cpio.gz\n\nFCDOBBS]\n\n   [end]\nname = 'a'\n"
    container = parse_container(text, "t.ct")
    assert container.expressions == [only(text)]
    assert only(text).content == b"FCDOBBS\n"
    assert container.settings == {"name": "a"}


def test_trim_body_directly() -> None:
    assert trim_body("\n \n a\n\n b \n\t\n") == " a\n\n b \n"
    assert trim_body(" \n\t") == ""


def test_content_base64_gives_exact_bytes() -> None:
    raw = b"\n\nno final newline ] [end]\x00\xff"
    text = (f"[replace /etc/x\narchive http://h/a.cpio.gz\ncontent-base64 "
            f"{base64.b64encode(raw).decode()}\n] [end]\n")
    assert only(text).content == raw
    # A blank line with nothing after it is not a second content.
    assert only(text.replace("\n] [end]", "\n\n\n] [end]")).content == raw
    assert only("[replace /e/x archive http://h/a content-base64 ''] [end]").content == b""


# --- extensions -------------------------------------------------------------------------


def test_replace_with_every_dom0_option() -> None:
    text = """\
[replace /etc/motd
image /var/images/web1-etc.img  # the per-domain /etc
mode 0600
owner www-data:33
patch-out file:///srv/patches/motd.patch
fork ftp://foo.org/images/web1-etc.cpio.gz

Hello
] [end]
"""
    expr = only(text)
    assert isinstance(expr, Replace)
    assert (expr.image, expr.archive) == ("/var/images/web1-etc.img", None)
    assert expr.mode == 0o600 and expr.owner == ("www-data", "33")
    assert expr.patch_out == "file:///srv/patches/motd.patch"
    assert expr.fork == "ftp://foo.org/images/web1-etc.cpio.gz"
    assert expr.content == b"Hello\n"
    assert str(expr.where("mode")) == "t.ct:3:6"


def test_copy_with_options() -> None:
    expr = only("[copy /etc/ssh/sshd_config https://files.example.org/sshd_config\n"
                " archive http://foo.org/images/etc.cpio.gz\n mode 644 owner 0:0\n"
                " patch-out ftp://foo.org/p/ssh.patch fork file:///var/images/etc2.cpio.gz\n] [end]")
    assert expr == Copy(pos=expr.pos, span=expr.span, path="/etc/ssh/sshd_config",
                        uri="https://files.example.org/sshd_config",
                        archive="http://foo.org/images/etc.cpio.gz", mode=0o644, owner=("0", "0"),
                        patch_out="ftp://foo.org/p/ssh.patch", fork="file:///var/images/etc2.cpio.gz")


def test_patch_with_options() -> None:
    expr = only("[patch http://foo.org/images/etc.cpio.gz ftp://foo.org/p1\n"
                "fork file:///var/images/out.cpio.gz\npatch-out file:///var/p/out.patch\nstrip 0\n][end]")
    assert isinstance(expr, Patch)
    assert (expr.target, expr.fork, expr.patch_out, expr.strip) == (
        "http://foo.org/images/etc.cpio.gz", "file:///var/images/out.cpio.gz",
        "file:///var/p/out.patch", 0)


def test_image_options() -> None:
    expr = only("[image /var/images/a.img 1G data fstype xfs export xvdc access ro] [end]")
    assert isinstance(expr, Image)
    assert (expr.size, expr.fstype, expr.export, expr.access) == (1 << 30, "xfs", "xvdc", "ro")
    assert only("[image a.img 64K x fstype ext3 export sdb1] [end]").access == "rw"


def test_export_forms() -> None:
    shared = only("[export /var/images/usr.img xvdb ro] [end]")
    assert isinstance(shared, Export)
    assert (shared.path, shared.vdev, shared.access, shared.format, shared.cow) == (
        "/var/images/usr.img", "xvdb", "ro", "raw", None)
    cow = only("[export /var/images/root.img xvda cow\n overlay /var/lib/d/web1-root.qcow2\n"
               " existing replace\n] [end]")
    assert (cow.access, cow.cow, cow.overlay, cow.keep) == (
        "cow", "qcow2", "/var/lib/d/web1-root.qcow2", False)
    default = only("[export images/root.img xvda cow] [end]")
    assert (default.cow, default.overlay, default.keep) == ("qcow2", None, True)
    snap = only("[export /dev/vg0/debian-var xvdc cow snapshot web1-var snapshot-size 2G] [end]")
    assert (snap.cow, snap.snapshot, snap.snapshot_size) == ("lvm", "web1-var", 2 << 30)
    own = only("[export /var/images/db.qcow2 xvdd rw format qcow2] [end]")
    assert (own.access, own.format, own.cow) == ("rw", "qcow2", None)
    assert own.where("vdev") == Position("t.ct", 1, 30)


@pytest.mark.parametrize("text, message", [
    ("[export /a.img xvdb ro overlay /o] [end]",
     "t.ct:1:24: expected 'overlay' only with access cow (it says how the copy-on-write view is "
     "made), found 'overlay' with access ro"),
    ("[export /a.img xvdb rw existing keep] [end]",
     "t.ct:1:24: expected 'existing' only with access cow (it says how the copy-on-write view is "
     "made), found 'existing' with access rw"),
    ("[export /dev/vg/a xvdb cow overlay /o] [end]",
     "t.ct:1:28: expected 'snapshot NAME' for a logical volume (a cow export of /dev/vg/a is an LVM "
     "snapshot; 'overlay' is for image files), found 'overlay'"),
    ("[export /dev/vg/a xvdb cow format qcow2] [end]",
     "t.ct:1:28: expected format raw for an LVM snapshot, found format qcow2"),
    ("[export /a.img xvdb cow snapshot s] [end]",
     "t.ct:1:25: expected 'overlay PATH' for an image file ('snapshot' is for a logical volume, a "
     "PATH under /dev/), found 'snapshot'"),
    ("[export /dev/vg/a xvdb cow snapshot-size 512K] [end]",
     "t.ct:1:42: expected a snapshot size of at least 1M, found '512K'"),
    ("[export /dev/vg/a xvdb cow snapshot -x] [end]",
     "t.ct:1:37: expected a logical volume name (letters, digits, '+', '_', '.' and '-', not "
     "starting with '-', at most 127), found '-x'"),
    ("[export /a.img xvdb] [end]",
     "t.ct:1:20: expected the ACCESS argument of [export PATH VDEV ACCESS], found ']'"),
    ("[export /a.img xvdb rwx] [end]", "t.ct:1:21: expected access ro, rw or cow, found 'rwx'"),
    ("[export /a.img eth0 ro] [end]",
     "t.ct:1:16: expected a guest disk name like xvdb (xvd, sd, hd or vd, then letters, then an "
     "optional partition number), found 'eth0'"),
    ("[export /a.img xvdb ro format vmdk] [end]",
     "t.ct:1:31: expected format raw or qcow2, found 'vmdk'"),
    ("[export /a.img xvdb cow existing forget] [end]",
     "t.ct:1:34: expected existing keep or replace, found 'forget'"),
    ("[export /a.img xvdb ro at boot] [end]",
     "t.ct:1:24: expected no 'at boot' on export (export runs in dom0 only; replace, copy, patch, "
     "hook and mount can run at boot), found 'at'"),
])
def test_export_errors(text: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_container(text, "t.ct")
    assert str(info.value) == message


@pytest.mark.parametrize("size, value", [
    ("50MB", 50 << 20), ("50M", 50 << 20), ("50MiB", 50 << 20), ("50mb", 50 << 20),
    ("512K", 512 << 10), ("64K", 64 << 10), ("1G", 1 << 30), ("2T", 2 << 40), ("16T", 16 << 40),
    ("0050M", 50 << 20),
])
def test_sizes_are_binary(size: str, value: int) -> None:
    assert only(f"[image /a.img {size} l] [end]").size == value


def test_boot_time_operations() -> None:
    text = """\
[replace /etc/hostname at boot
mode 0644
owner root:root

web1
] [end]
[copy /etc//apache2/web1.conf http://10.0.2.2:8000/web1.conf
 at boot] [end]
[patch /etc http://10.0.2.2:8000/accounts.patch at boot strip 1] [end]
[hook enable-site
timeout 30
interpreter /bin/sh

set -e
if [ -x /usr/sbin/apache2ctl ]; then
    apache2ctl configtest
fi
] [end]
[hook second at boot

echo hi
][end]
[mount debian12_root / ro] [end]
[mount debian12_usr /usr/ ro fstype ext4] [end]
[mount web1_etc /etc rw at boot] [end]
"""
    container = parse_container(text)
    replace, copy, patch, hook, hook2, root, usr, etc = container.expressions
    assert isinstance(hook2, Hook)
    assert isinstance(replace, Replace) and replace.at_boot and replace.archive is None
    assert replace.content == b"web1\n" and replace.mode == 0o644
    assert isinstance(copy, Copy) and copy.at_boot and copy.path == "/etc/apache2/web1.conf"
    assert copy.uri == "http://10.0.2.2:8000/web1.conf"
    assert isinstance(patch, Patch) and patch.at_boot
    assert (patch.target, patch.patch, patch.strip) == ("/etc", "http://10.0.2.2:8000/accounts.patch", 1)
    assert hook == Hook(pos=hook.pos, span=hook.span, name="enable-site", timeout=30,
                        interpreter="/bin/sh", script="set -e\nif [ -x /usr/sbin/apache2ctl ]; then\n"
                        "    apache2ctl configtest\nfi\n")
    assert hook.at_boot and hook2.at_boot and hook2.timeout is None
    mounts = [m for m in (root, usr, etc) if isinstance(m, Mount)]
    assert [(m.label, m.target, m.access, m.fstype) for m in mounts] == [
        ("debian12_root", "/", "ro", None), ("debian12_usr", "/usr", "ro", "ext4"),
        ("web1_etc", "/etc", "rw", None)]
    assert all(isinstance(m, Mount) and m.at_boot for m in (root, usr, etc))
    assert container.boot_expressions() == container.expressions
    assert container.dom0_expressions() == []


def test_quoted_words_and_comments_in_headers() -> None:
    text = """\
[image "/srv/my images/a.img"   # a path with a space
 # a whole comment line
 50M "fstype"
] [end]
[copy /etc/x http://h/page#part archive 'http://h/a'] [end]
"""
    image, copy = parse_container(text).expressions
    assert isinstance(image, Image)
    assert (image.path, image.label) == ("/srv/my images/a.img", "fstype")
    assert isinstance(copy, Copy) and copy.uri == "http://h/page#part" and copy.archive == "http://h/a"


def test_uris_accepted() -> None:
    for uri in ("file:///var/images/x", "file://localhost/var/x", "HTTP://h/x",
                "http://[::1]:8000/x.cpio.gz", "https://user@h:8443/x?y=1", "ftp://foo.org/"):
        assert only(f"[create /etc/ {uri}] [end]").uri == uri


def test_expressions_on_one_line_and_separators() -> None:
    container = parse_container("a = 1; [mount r / ro][end][mount u /usr ro] [end] # c\nb = 2\n")
    assert len(container.expressions) == 2 and container.settings == {"a": 1, "b": 2}
    assert parse_container("[mount r / ro] [end]; b = 2").settings == {"b": 2}


def test_registry_is_complete() -> None:
    kinds = {cls.kind for cls in (Replace, Copy, Create, Image, Export, Populate, Patch, Hook, Mount,
                                  NfsExport)}
    assert set(EXPRESSIONS) == kinds
    for name, spec in EXPRESSIONS.items():
        assert spec.name == name and spec.usage.startswith(f"[{name}")


# --- stripped text ----------------------------------------------------------------------


def test_stripped_text_keeps_statements_comments_and_order() -> None:
    text = """\
# web1, from the shared images
name = "web1"   # the domain

[image /var/images/a.img 64M a] [end]

memory = 512
  [replace /etc/hostname at boot

web1
] [end]   
# mounts next

[mount a / rw] [end]

disk = [
    'file:/var/images/a.img,xvda,w',   # the root
]
vcpus = 1; [mount b /usr ro] [end]
[hook h

true
] [end] # trailing comment

"""
    container = parse_container(text, "w.ct")
    stripped = container.stripped_text()
    assert stripped == """\
# web1, from the shared images
name = "web1"   # the domain

memory = 512
# mounts next

disk = [
    'file:/var/images/a.img,xvda,w',   # the root
]
vcpus = 1;
# trailing comment

"""
    assert parse_xl_config(stripped) == container.settings
    assert "[" not in stripped.replace("disk = [", "")


@pytest.mark.parametrize("text, stripped", [
    (FIGURE_1, ""),
    (FIGURE_1 + "\nname = 'a'\n", "name = 'a'\n"),
    ("name = 'a'\n\n" + FIGURE_1, "name = 'a'\n"),
    ("name = 'a'\n\n" + FIGURE_1 + "\n" + PAPER_IMAGE + "\n\nb = 1\n", "name = 'a'\n\nb = 1\n"),
    ("a = 1\n\n\nb = 2\n", "a = 1\n\n\nb = 2\n"),
    ("a = 1\n" + PAPER_CREATE.rstrip("\n"), "a = 1\n"),
])
def test_stripped_text_leaves_no_blank_line_pile_up(text: str, stripped: str) -> None:
    container = parse_container(text)
    assert container.stripped_text() == stripped
    assert parse_xl_config(stripped) == container.settings


# --- errors: FILE:LINE:COL: expected ..., found ... -------------------------------------

ERRORS = [
    # unterminated: no ']' / no '[end]'
    ("[replace /etc/x\narchive http://h/a\n\nbody\n",
     ("t.ct:1:1: expected ']' and '[end]' to close this replace expression (a body ends at the "
     "first ']' followed by '[end]'), found end of file")),
    ("[image /a 50MB lbl",
     "t.ct:1:1: expected ']' and '[end]' to close this image expression, found end of file"),
    ("[image /a 50MB lbl\n[end]\n",
     "t.ct:2:1: expected ']' to close the image expression opened at 1:1, found '[end]'"),
    ("[replace /etc/x\narchive http://h/a\n\nbody\n]\n",
     ("t.ct:5:1: expected '[end]' after the ']' at 5:1 that closes the replace expression opened "
     "at 1:1, found end of file")),
    ("[replace /etc/x archive http://h/a\n\nfoo\n]\n\n[copy /etc/y http://h/y archive http://h/a] [end]\n",
     ("t.ct:6:1: expected '[end]' after the ']' at 4:1 that closes the replace expression opened "
     "at 1:1, found '[copy'")),
    ("[replace /etc/x archive http://h/a\n\nfoo\n]\nmemory = 5\n[copy /etc/y http://h/y archive http://h/a] [end]\n",
     ("t.ct:5:1: expected '[end]' after the ']' at 4:1 that closes the replace expression opened "
     "at 1:1, found 'memory'")),
    ("[image /a 50MB lbl]\nname = 'x'\n",
     ("t.ct:2:1: expected '[end]' after the ']' at 1:19 that closes the image expression opened "
     "at 1:1, found 'name'")),
    ("[create /etc/ ftp://h/x] [end\n",
     ("t.ct:1:26: expected '[end]' after the ']' at 1:24 that closes the create expression opened "
     "at 1:1, found '[end'")),
    ("[create /etc/ ftp://h/x] [end] memory = 5\n",
     "t.ct:1:32: expected end of line after '[end]', found 'memory'"),
    ("[create /etc/ ftp://h/x]\r\n[end]\n",
     ("t.ct:1:25: expected '[end]' after the ']' at 1:24 that closes the create expression opened "
     "at 1:1, found a carriage return (CRLF line ending; xl accepts LF only)")),
    ("[create /etc/\r\n ftp://h/x] [end]",
     "t.ct:1:14: expected LF line endings (as xl requires), found a carriage return"),
    # unknown expression
    ("name = 'a'\n  [replce /etc/x]",
     ("t.ct:2:4: expected an expression name after '[' (replace, copy, create, image, export, populate, "
     "patch, hook, mount, nfs), found 'replce' (did you mean 'replace'?)")),
    ("[frobnicate]",
     ("t.ct:1:2: expected an expression name after '[' (replace, copy, create, image, export, populate, "
     "patch, hook, mount, nfs), found 'frobnicate'")),
    ("[end]",
     ("t.ct:1:2: expected an expression name after '[' (replace, copy, create, image, export, populate, "
     "patch, hook, mount, nfs), found 'end' ('[end]' with no expression open)")),
    ("[boot replace /etc/x]",
     ("t.ct:1:2: expected an expression name after '[' (replace, copy, create, image, export, populate, "
     "patch, hook, mount, nfs), found 'boot' (to run an expression in the guest at boot, add the "
     "option 'at boot', e.g. [replace /etc/motd at boot ...)")),
    ("[\n",
     ("t.ct:1:1: expected an expression name after '[' (replace, copy, create, image, export, populate, "
     "patch, hook, mount, nfs), found end of file")),
    # wrong number of arguments
    ("[image /a 50MB] [end]",
     "t.ct:1:15: expected the LABEL argument of [image PATH SIZE LABEL], found ']'"),
    ("[create\n /etc/\n\n] [end]",
     "t.ct:3:1: expected the URI argument of [create SRC_DIR URI], found a blank line"),
    ("[copy /etc/x archive http://h/a] [end]",
     "t.ct:1:14: expected the URI argument of [copy PATH URI], found the option 'archive'"),
    ("[patch file:///a] [end]",
     "t.ct:1:17: expected the PATCH_URI argument of [patch TARGET PATCH_URI [FORK_URI]], found ']'"),
    ("[mount root /] [end]",
     "t.ct:1:14: expected the ACCESS argument of [mount LABEL TARGET ACCESS], found ']'"),
    ("[create /etc/ ftp://h/x /extra] [end]",
     ("t.ct:1:25: expected ']' (create takes no options), found an extra argument '/extra' "
     "([create SRC_DIR URI] takes 2)")),
    ("[populate /var/images/x /mnt/ ftp://h/x] [end]",
     ("t.ct:1:11: expected the word 'image' (as in [populate image IMAGE MOUNTPOINT URI]), "
     "found '/var/images/x'")),
    ("[copy /etc/x http://h/x archive http://h/a http://h/b] [end]",
     ("t.ct:1:44: expected an option of copy (archive, image, patch-out, fork, mode, owner, at, devices) "
     "or ']', found 'http://h/b' (arguments come before options)")),
    # bad URI
    ("[create /etc/ foo.org/x] [end]",
     ("t.ct:1:15: expected a URI (file:///PATH, http://HOST/PATH, https://HOST/PATH or "
     "ftp://HOST/PATH), found 'foo.org/x'")),
    ("[create /etc/ /var/x.cpio] [end]",
     ("t.ct:1:15: expected a URI (file:///PATH, http://HOST/PATH, https://HOST/PATH or "
     "ftp://HOST/PATH), found '/var/x.cpio' (a dom0 path needs file://, e.g. file:///var/images/x)")),
    ("[create /etc/ sftp://foo.org/x] [end]",
     "t.ct:1:15: expected a URI scheme file, http, https or ftp, found 'sftp' in 'sftp://foo.org/x'"),
    ("[create /etc/ file://host/x] [end]",
     ("t.ct:1:15: expected file:///ABSOLUTE/PATH (three slashes: file URIs name a dom0 path, no "
     "host), found 'file://host/x'")),
    ("[create /etc/ http:///x] [end]",
     "t.ct:1:15: expected a host name in the http URI (http://HOST/PATH), found 'http:///x'"),
    ("[create /etc/ http://h:99999/x] [end]",
     "t.ct:1:15: expected a port number from 1 to 65535 in the http URI, found 'http://h:99999/x'"),
    ("[create /etc/ http:h/x] [end]",
     ("t.ct:1:15: expected '//' after 'http:' in a URI (file:///PATH, http://HOST/PATH, "
     "https://HOST/PATH or ftp://HOST/PATH), found 'http:h/x'")),
    ("[create /etc/ 'http://h/a b'] [end]",
     ("t.ct:1:15: expected a URI (file:///PATH, http://HOST/PATH, https://HOST/PATH or "
     "ftp://HOST/PATH) without spaces (write %20), found 'http://h/a b'")),
    ("[replace /etc/x\narchive file:///\n\nx\n] [end]",
     "t.ct:2:9: expected file:///ABSOLUTE/PATH naming a file, without '?' or '#', found 'file:///'"),
    # bad size
    ("[image /a 50 lbl] [end]",
     ("t.ct:1:11: expected a size like 50MB, 512K, 1G or 2T (K, M, G, T are binary: 1M = 1048576 "
     "bytes), found '50' (a unit is required: K, M, G or T)")),
    ("[image /a 1.5G lbl] [end]",
     ("t.ct:1:11: expected a size like 50MB, 512K, 1G or 2T (K, M, G, T are binary: 1M = 1048576 "
     "bytes), found '1.5G' (whole numbers only: write 1536M for 1.5G)")),
    ("[image /a 50XB lbl] [end]",
     ("t.ct:1:11: expected a size like 50MB, 512K, 1G or 2T (K, M, G, T are binary: 1M = 1048576 "
     "bytes), found '50XB'")),
    ("[image /a 0M lbl] [end]",
     "t.ct:1:11: expected a size from 64K to 16T, found '0M' (0 bytes)"),
    ("[image /a 32T lbl] [end]",
     "t.ct:1:11: expected a size from 64K to 16T, found '32T' (35184372088832 bytes)"),
    ("[image /a 50MB a-very-long-label-here] [end]",
     ("t.ct:1:16: expected a file-system label of 1 to 16 letters, digits, '.', '_' or '-', "
     "found 'a-very-long-label-here'")),
    ("[image /a 50MB abcdefghijklm fstype xfs] [end]",
     "t.ct:1:16: expected a label of at most 12 characters for xfs, found 'abcdefghijklm' (13)"),
    ("[image /a 50MB l fstype zfs] [end]",
     "t.ct:1:25: expected a type ext4, ext3, ext2 or xfs, found 'zfs'"),
    ("[image /a 50MB l export eth0] [end]",
     ("t.ct:1:25: expected a guest disk name like xvdb (xvd, sd, hd or vd, then letters, then an "
     "optional partition number), found 'eth0'")),
    ("[image /a 50MB l access ro] [end]",
     ("t.ct:1:18: expected 'export VDEV' with 'access' (access says how the exported disk is "
     "attached), found 'access' without 'export'")),
    # bad mode, owner, other values
    ("[copy /etc/x http://h/x archive http://h/a mode 0999] [end]",
     "t.ct:1:49: expected an octal mode of 3 or 4 digits like 0644, found '0999'"),
    ("[copy /etc/x http://h/x archive http://h/a\nmode 420000] [end]",
     "t.ct:2:6: expected an octal mode of 3 or 4 digits like 0644, found '420000'"),
    ("[copy /etc/x http://h/x archive http://h/a owner root] [end]",
     "t.ct:1:50: expected USER:GROUP (names or numbers, like root:root or 33:33), found 'root'"),
    ("[replace /etc/x archive http://h/a content-base64 e!==] [end]",
     ("t.ct:1:51: expected base64 (A-Z, a-z, 0-9, '+', '/', and '=' padding) on one line, "
     "found 'e!=='")),
    ("[replace etc/x archive http://h/a\n\nx\n] [end]",
     "t.ct:1:10: expected an absolute path (like /etc/hostname), found 'etc/x'"),
    ("[replace /etc/../shadow archive http://h/a\n\nx\n] [end]",
     "t.ct:1:10: expected a path without '.' or '..' components, found '/etc/../shadow'"),
    ("[replace /etc/ archive http://h/a\n\nx\n] [end]",
     "t.ct:1:10: expected the path of a file (like /etc/hostname), not a directory, found '/etc/'"),
    ("[mount root / rx] [end]", "t.ct:1:15: expected access ro, rw or cow, found 'rx'"),
    ("[mount root etc ro] [end]",
     "t.ct:1:13: expected an absolute path (like /etc/hostname), found 'etc'"),
    ("[hook h1 timeout 0\n\necho\n] [end]",
     "t.ct:1:18: expected timeout: a whole number from 1 to 86400, found '0'"),
    ("[hook h1 interpreter sh\n\necho\n] [end]",
     "t.ct:1:22: expected an absolute path (like /etc/hostname), found 'sh'"),
    ("[hook 'bad name'\n\necho\n] [end]",
     "t.ct:1:7: expected a hook name (letters, digits, '.', '_' or '-', at most 64), found 'bad name'"),
    ("[copy /etc/x http://h/x archive] [end]",
     "t.ct:1:32: expected a value after 'archive' (archive URI), found ']'"),
    ("[create /etc/ \"ftp://h/x\"y] [end]",
     "t.ct:1:26: expected a space or ']' after a quoted word, found 'y'"),
    # unknown option
    ("[copy /etc/x http://h/x archive http://h/a\ncolour red] [end]",
     ("t.ct:2:1: expected an option of copy (archive, image, patch-out, fork, mode, owner, at, devices) "
     "or ']', found 'colour'")),
    ("[copy /etc/x http://h/x archive http://h/a fstype ext3] [end]",
     ("t.ct:1:44: expected an option of copy (archive, image, patch-out, fork, mode, owner, at, devices) "
     "or ']', found 'fstype' (an option of image, mount)")),
    ("[image /a 50MB lbl ext3] [end]",
     ("t.ct:1:20: expected an option of image (fstype, export, access) or ']', found 'ext3' "
     "(write 'fstype ext3')")),
    ("[replace /etc/x archive http://h/a mdoe 0644\n\nx\n] [end]",
     ("t.ct:1:36: expected an option of replace (archive, image, patch-out, fork, mode, owner, at, devices, "
     "content-base64) or ']', found 'mdoe' (did you mean 'mode'?)")),
    ("[hook x\n#!/bin/sh\necho hi\n] [end]",
     ("t.ct:3:1: expected an option of hook (timeout, interpreter, at) or ']', found 'echo' "
     "(the script starts after a blank line)")),
    ("[create /etc/ ftp://h/x extra] [end]",
     "t.ct:1:25: expected ']' (create takes no options), found 'extra'"),
    # duplicate option
    ("[copy /etc/x http://h/x\narchive http://h/a\narchive http://h/b] [end]",
     "t.ct:3:1: expected each option once in copy, found a second 'archive' (the first is at 2:1)"),
    ("[patch file:///a ftp://h/p ftp://h/f fork ftp://h/g] [end]",
     ("t.ct:1:38: expected the fork given once (here as an argument or as an option), found 'fork' "
     "again (first at 1:28)")),
    # duplicate xl key (the xl parser's message, through the container parser)
    ("name = 'a'\n[create /etc/ ftp://h/x][end]\nname = 'b'\n",
     ("t.ct:3:1: expected each setting once (use '+=' to add to a string or list), found 'name' "
     "again (first set at line 1, col 1)")),
    ("name = a\n",
     ("t.ct:1:8: expected a value for 'name' (a quoted string, a number or a [list]) (strings "
     "need quotes), found 'a'")),
    # body where none is allowed
    ("[copy /etc/x http://h/x\narchive http://h/a\n\nHello\n] [end]",
     ("t.ct:4:1: expected ']' to close the copy expression (copy takes no body; a blank line ends "
     "its arguments and options), found 'Hello'")),
    ("[image /a 50MB lbl\n\n\n fstype ext3] [end]",
     ("t.ct:4:2: expected ']' to close the image expression (image takes no body; a blank line "
     "ends its arguments and options), found 'fstype'")),
    # at boot where it cannot run
    ("[image /a 50MB lbl\n at boot] [end]",
     ("t.ct:2:2: expected no 'at boot' on image (image runs in dom0 only; replace, copy, patch, "
     "hook and mount can run at boot), found 'at'")),
    ("[create /etc/ ftp://h/x at boot] [end]",
     ("t.ct:1:25: expected no 'at boot' on create (create runs in dom0 only; replace, copy, patch, "
     "hook and mount can run at boot), found 'at'")),
    ("[populate image /a /mnt/ ftp://h/x\nat boot\n] [end]",
     ("t.ct:2:1: expected no 'at boot' on populate (populate runs in dom0 only; replace, copy, "
     "patch, hook and mount can run at boot), found 'at'")),
    ("[replace /etc/x at dom0\n\nx\n] [end]",
     "t.ct:1:20: expected 'at boot' (the only place an expression can be moved to), found 'at dom0'"),
    # what a boot-time or dom0 operation needs
    ("[replace /etc/x at boot archive http://h/a\n\nx\n] [end]",
     ("t.ct:1:25: expected no 'archive' in a replace that runs at boot (at boot it changes the "
     "guest's own root; 'at boot' is at 1:17), found 'archive'")),
    ("[copy /etc/x http://h/x fork file:///f.cpio at boot] [end]",
     ("t.ct:1:25: expected no 'fork' in a copy that runs at boot (at boot it changes the guest's "
     "own root; 'at boot' is at 1:45), found 'fork'")),
    ("[replace /etc/x\n\nx\n] [end]",
     ("t.ct:1:1: expected 'archive URI' or 'image PATH' in this replace (the file system to change "
     "in dom0), or 'at boot' (the guest's root at boot), found none of them")),
    ("[replace /etc/x image /i archive http://h/a\n\nx\n] [end]",
     ("t.ct:1:26: expected one file system per expression: 'archive' or 'image', found both "
     "('image' at 1:17)")),
    ("[replace /etc/x archive http://h/a] [end]",
     ("t.ct:1:1: expected the new content of /etc/x: a blank line then the text, or "
     "'content-base64 BASE64', found neither")),
    ("[replace /etc/x archive http://h/a content-base64 eA==\n\nbody\n] [end]",
     ("t.ct:3:1: expected either a body or 'content-base64', not both, found a body "
     "('content-base64' is at 1:36)")),
    ("[patch / ftp://h/p] [end]",
     ("t.ct:1:8: expected a URI as the TARGET of a patch in dom0 (file:///PATH for an image or "
     "archive on dom0), or 'at boot' for a guest directory, found '/'")),
    ("[patch file:///a ftp://h/p at boot] [end]",
     ("t.ct:1:8: expected the guest directory the patch applies in (like / or /etc) as the TARGET "
     "of a patch at boot, found 'file:///a'")),
    ("[patch / ftp://h/p ftp://h/f at boot] [end]",
     ("t.ct:1:20: expected no fork in a patch that runs at boot (it changes the guest's own root), "
     "found 'ftp://h/f'")),
    ("[hook h1] [end]",
     "t.ct:1:1: expected the script of hook 'h1' after a blank line, found no body"),
    ("[hook h1\n\n\n] [end]",
     "t.ct:3:1: expected the script of hook 'h1' after a blank line, found an empty body"),
]


@pytest.mark.parametrize("text, message", ERRORS)
def test_error_messages(text: str, message: str) -> None:
    assert error(text) == message


def test_error_positions_count_from_the_file_start() -> None:
    text = "name = 'x'\n# comment\n\n" + PAPER_IMAGE + "[image /b\n  50 l] [end]\n"
    assert error(text, "web.ct").startswith("web.ct:8:3: expected a size like 50MB")


# --- files -------------------------------------------------------------------------------


def test_load_container(tmp_path: Path) -> None:
    path = tmp_path / "my-domain"
    path.write_text("name = 'fido'\n" + FIGURE_1)
    container = load_container(path)
    assert isinstance(container, Container)
    assert container.path == str(path)
    assert container.expressions[0].pos == Position(str(path), 2, 1)
    assert container.stripped_text() == "name = 'fido'\n"


def test_load_container_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ct"
    with pytest.raises(UserError, match=re.escape(f"{missing}: cannot read the container file")):
        load_container(missing)
    with pytest.raises(UserError, match="cannot read the container file"):
        load_container(tmp_path)
    latin = tmp_path / "latin1.ct"
    latin.write_bytes(b"name = 'caf\xe9'\n")
    with pytest.raises(UserError, match=re.escape(f"{latin}: expected UTF-8 text, found byte 0xe9 "
                                                  "at offset 11")):
        load_container(latin)
    bad = tmp_path / "bad.ct"
    bad.write_text("[image /a 50 l] [end]\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:1:11: expected a size")):
        load_container(bad)


# --- the documentation ------------------------------------------------------------------


def _doc_blocks() -> list[str]:
    """The untyped code blocks of docs/container.md (```ebnf, ```python and so on are left out)."""
    blocks: list[str] = []
    lang: str | None = None
    lines: list[str] = []
    for line in (REPO / "docs" / "container.md").read_text().splitlines(keepends=True):
        if not line.startswith("```"):
            lines.append(line)
        elif lang is None:
            lang, lines = line[3:].strip(), []
        else:
            if not lang:
                blocks.append("".join(lines))
            lang = None
    return blocks


def test_paper_examples_in_the_docs_are_verbatim() -> None:
    blocks = _doc_blocks()
    for figure in (FIGURE_1, PAPER_CREATE, PAPER_IMAGE, PAPER_POPULATE, PAPER_PATCH):
        assert figure in blocks


def test_every_container_example_in_the_docs_parses() -> None:
    examples = [b for b in _doc_blocks() if "[end]" in b and not re.search(r"^\S+:\d+:\d+:", b, re.MULTILINE)]
    assert len(examples) >= 10
    for block in examples:
        parse_container(block, "doc.ct")
    complete = next(b for b in examples if b.startswith("# web1.ct"))
    container = parse_container(complete, "web1.ct")
    kinds = [e.kind for e in container.expressions]
    assert kinds == ["patch", "image", "populate", "replace", "mount", "mount", "mount",
                     "replace", "copy", "hook"]
    assert parse_xl_config(container.stripped_text()) == container.settings
    assert container.settings["name"] == "web1"


# --- [nfs]: a dom0 directory over NFSv4 ------------------------------------------------


def test_nfs_export_with_every_option() -> None:
    expr = only("[nfs /srv/opt /opt rw server 10.0.2.2 port 20490 pseudo /export/opt "
                "squash no_root_squash] [end]")
    assert isinstance(expr, NfsExport) and expr.at_boot
    assert (expr.path, expr.target, expr.access, expr.server, expr.port, expr.pseudo, expr.squash) == \
        ("/srv/opt", "/opt", "rw", "10.0.2.2", 20490, "/export/opt", "no_root_squash")


@pytest.mark.parametrize("text, message", [
    ("[nfs /srv/opt /opt ro] [end]", "t.ct:1:1: expected 'server ADDR'"),
    ("[nfs /srv/opt /opt ro server nfs.example] [end]", "t.ct:1:30: expected an IPv4 address"),
    ("[nfs /srv/opt /opt cow server 10.0.2.2] [end]", "t.ct:1:20: expected access ro or rw"),
    ("[nfs /srv/opt opt ro server 10.0.2.2] [end]", "t.ct:1:15:"),
    ("[nfs /srv/opt /opt ro server 10.0.2.2 port 0] [end]", "port: a whole number from 1 to 65535"),
])
def test_nfs_export_errors(text: str, message: str) -> None:
    assert message in error(text)


def test_mount_cow_names_its_upper_layer() -> None:
    expr = only("[mount shared-root / cow upper web1-upper] [end]")
    assert isinstance(expr, Mount) and (expr.access, expr.upper) == ("cow", "web1-upper")
    assert only("[mount shared-root / cow] [end]").upper is None
    assert "t.ct:1:25: expected 'upper LABEL' only with access cow" in error(
        "[mount shared-root / ro upper web1-upper] [end]")
