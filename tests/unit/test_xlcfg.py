"""xl.cfg(5) parsing, disk specs, domain interpretation and writing back."""
from __future__ import annotations

from pathlib import Path

import pytest

from dom0.errors import UserError
from dom0.xlcfg import (
    ChannelSpec,
    DiskSpec,
    DomainConfig,
    Lexer,
    TokenKind,
    XlConfig,
    load_domain_config,
    format_vif_spec,
    parse_channel_spec,
    parse_disk_spec,
    parse_setting,
    parse_vif_spec,
    parse_xl_config,
    skip_separators,
    write_xl_config,
)

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "xl"
FIXTURE_FILES = sorted(FIXTURES.glob("*.cfg"))

PV_CONFIG = """\
# A PV guest, the way the Xen docs write them
name    = "web1"
kernel  = "/boot/vmlinuz-6.1.0-56-amd64"
ramdisk = '/boot/initrd.img-6.1.0-56-amd64'
root    = "/dev/xvda1 ro"
extra   = "console=hvc0 quiet"
memory  = 0x200         # 512 MiB, in hex
vcpus   = 2; maxvcpus = 4
disk    = [ 'phy:/dev/vg/web1-root,xvda1,w',
            "format=raw, vdev=xvdb, access=ro, target=/srv/images/shared.img",   # shared
          ]
vif     = [ 'mac=00:16:3e:01:02:03,bridge=xenbr0' ]
on_poweroff = "destroy"
on_reboot   = 'restart'
on_crash    = "preserve"
"""

PVH_CONFIG = """\
type = "pvh"
name = "db"
kernel = "vmlinuz"
ramdisk = "initrd.img"
cmdline = "root=LABEL=root console=hvc0"
memory = 256
disk = ['format=raw,vdev=xvda,access=rw,target=disk.img']
channel = [ "name=org.example.report,connection=pty" ]
"""


def parse_error(text: str, filename: str = "t.cfg") -> str:
    with pytest.raises(UserError) as info:
        parse_xl_config(text, filename)
    return str(info.value)


# --- parsing -----------------------------------------------------------------


def test_pv_config_values_and_order() -> None:
    cfg = parse_xl_config(PV_CONFIG, "web1.cfg")
    assert list(cfg) == ["name", "kernel", "ramdisk", "root", "extra", "memory", "vcpus",
                         "maxvcpus", "disk", "vif", "on_poweroff", "on_reboot", "on_crash"]
    assert cfg["name"] == "web1"
    assert cfg["ramdisk"] == "/boot/initrd.img-6.1.0-56-amd64"
    assert cfg["memory"] == 512
    assert cfg["vcpus"] == 2 and cfg["maxvcpus"] == 4
    assert cfg["disk"] == ["phy:/dev/vg/web1-root,xvda1,w",
                           "format=raw, vdev=xvdb, access=ro, target=/srv/images/shared.img"]
    assert cfg["vif"] == ["mac=00:16:3e:01:02:03,bridge=xenbr0"]
    assert cfg["on_crash"] == "preserve"


def test_positions_are_kept() -> None:
    cfg = parse_xl_config(PV_CONFIG, "web1.cfg")
    pos = cfg.position("maxvcpus")
    assert pos is not None and (pos.line, pos.col) == (8, 14)
    assert str(cfg.position("name")) == "web1.cfg:2:1"
    assert cfg.where("disk", 1) == "web1.cfg:10:13"
    assert cfg.where("memory") == "web1.cfg:7:11"


def test_comments_blank_lines_and_semicolons() -> None:
    text = "\n\n# only a comment\n   \t\n;;a = 1;b = 'x';  # trailing\n\nc=[];\n"
    assert parse_xl_config(text) == {"a": 1, "b": "x", "c": []}


def test_last_line_without_newline() -> None:
    assert parse_xl_config('name = "x"') == {"name": "x"}


def test_empty_file() -> None:
    assert parse_xl_config("") == {}
    assert parse_xl_config("# nothing\n") == {}


def test_lists_across_lines_with_comments_and_trailing_comma() -> None:
    text = "disk = [\n  # first\n  'a' ,\n\n  \"b\"   # second\n  ,\n  'c',\n]\nx = [ 1, 0x10 ]\n"
    cfg = parse_xl_config(text)
    assert cfg["disk"] == ["a", "b", "c"]
    assert cfg["x"] == [1, 16]


def test_nested_lists_parse_like_xl() -> None:
    assert parse_xl_config("x = [ [1, 'a'], [] ]")["x"] == [[1, "a"], []]


def test_numbers() -> None:
    cfg = parse_xl_config("a = 0\nb = 42\nc = 0xff\nd = 0x0\n")
    assert cfg == {"a": 0, "b": 42, "c": 255, "d": 0}


@pytest.mark.parametrize("text, expected", [
    (r"'a\'b'", "a'b"),
    (r'"a\"b"', 'a"b'),
    (r'"back\\slash"', "back\\slash"),
    (r'"tab\there\nnl\rcr"', "tab\there\nnl\rcr"),
    (r'"\a\b\f\v"', "\a\b\f\v"),
    ("'double \" inside single'", 'double " inside single'),
    ('"single \' inside double"', "single ' inside double"),
    ("'# not a comment'", "# not a comment"),
    ("''", ""),
])
def test_string_quotes_and_escapes(text: str, expected: str) -> None:
    assert parse_xl_config(f"s = {text}\n")["s"] == expected


def test_plus_equals_appends_like_xl() -> None:
    cfg = parse_xl_config("extra = 'a'\nextra += ' b'\ndisk = ['x']\ndisk += ['y']\nnew += 'z'\n")
    assert cfg == {"extra": "a b", "disk": ["x", "y"], "new": "z"}


# --- errors, with their exact positions --------------------------------------


@pytest.mark.parametrize("text, message", [
    ("memory = 512\nmemory = 256\n",
     "t.cfg:2:1: expected each setting once (use '+=' to add to a string or list), "
     "found 'memory' again (first set at line 1, col 1)"),
    ("name = \"web1\nmemory = 1\n",
     "t.cfg:1:8: expected a closing \" for this string (strings cannot span lines), "
     "found end of line"),
    ("name = 'web1",
     "t.cfg:1:8: expected a closing ' for this string (strings cannot span lines), "
     "found end of file"),
    ("a = 1\nname = \"x\\q\"\n",
     "t.cfg:2:10: expected one of the escapes \\\\ \\\" \\' \\n \\t \\r \\a \\b \\f \\v, "
     "found '\\\\q'"),
    ("name = \"\\x41\"\n",
     "t.cfg:1:9: expected one of the escapes \\\\ \\\" \\' \\n \\t \\r \\a \\b \\f \\v, "
     "found '\\\\x' (xl rejects or mis-decodes numeric escapes; write the character itself)"),
    ("type = pv\n",
     "t.cfg:1:8: expected a value for 'type' (a quoted string, a number or a [list]) "
     "(strings need quotes), found 'pv'"),
    ("memory =\n512\n",
     "t.cfg:1:9: expected a value for 'memory' (a quoted string, a number or a [list]), "
     "found end of line"),
    ("memory 512\n", "t.cfg:1:8: expected '=' after 'memory', found '512'"),
    ("memory = 512 256\n",
     "t.cfg:1:14: expected end of line or ';' after the value of 'memory', found '256'"),
    ("Memory = 512\n",
     "t.cfg:1:1: expected a setting name (lowercase letters, digits and '_', starting with a "
     "letter, as xl requires), found 'Memory'"),
    ("on-poweroff = 'destroy'\n",
     "t.cfg:1:1: expected a setting name (lowercase letters, digits and '_', starting with a "
     "letter, as xl requires), found 'on-poweroff'"),
    ("= 5\n",
     "t.cfg:1:1: expected a setting name (lowercase letters, digits and '_', starting with a "
     "letter, as xl requires), found '='"),
    ("memory = 010\n",
     "t.cfg:1:10: expected a number without leading zeros (xl would read it as octal), "
     "found '010'"),
    ("memory = 0xFF\n",
     "t.cfg:1:10: expected a hex number written 0x with lowercase digits (as xl requires), "
     "found '0xFF'"),
    ("memory = 1.5\n",
     "t.cfg:1:10: expected a whole number (decimal or 0x hex; other values need quotes), "
     "found '1.5'"),
    ("vcpus = -1\n",
     "t.cfg:1:9: expected a value for 'vcpus' (a quoted string, a number or a [list]), "
     "found '-'"),
    ("disk = ('a',)\n",
     "t.cfg:1:8: expected a value for 'disk' (a quoted string, a number or a [list]), "
     "found '('"),
    ("disk = [ 'a'\n  'b' ]\n",
     "t.cfg:2:3: expected ',' or ']' in the list of 'disk' opened at 1:8, "
     "found the string 'b'"),
    ("disk = [ 'a',\n",
     "t.cfg:2:1: expected a value for 'disk' (a quoted string, a number or a [list]), "
     "found end of file"),
    ("disk = [ 'a'\n",
     "t.cfg:2:1: expected ',' or ']' in the list of 'disk' opened at 1:8, found end of file"),
    ("disk = [ , ]\n",
     "t.cfg:1:10: expected a value for 'disk' (a quoted string, a number or a [list]), "
     "found ','"),
    ("memory = 512\r\n",
     "t.cfg:1:13: expected end of line or ';' after the value of 'memory', "
     "found a carriage return (CRLF line ending; xl accepts LF only)"),
    ("a = 1 b = 2\n",
     "t.cfg:1:7: expected end of line or ';' after the value of 'a', found 'b'"),
    ("x = 'a'\nx += 1\n",
     "t.cfg:2:6: expected a value of the same kind as 'x' for '+=' (string to string, "
     "list to list), found a number added to a string"),
])
def test_error_messages(text: str, message: str) -> None:
    assert parse_error(text) == message


def test_error_on_first_line_of_multiline_list_item() -> None:
    text = "name = 'a'\ndisk = [\n    'ok',\n    ok2,\n]\n"
    assert parse_error(text).startswith("t.cfg:4:5: expected a value for 'disk'")


# --- the lexer on its own (what the container parser reuses) -----------------


def test_token_stream_with_positions() -> None:
    tokens = list(Lexer("a = [1, 'x'] # c\nb += \"y\";", "f"))
    kinds = [t.kind for t in tokens]
    assert kinds == [TokenKind.IDENT, TokenKind.EQUALS, TokenKind.LBRACKET, TokenKind.NUMBER,
                     TokenKind.COMMA, TokenKind.STRING, TokenKind.RBRACKET, TokenKind.NEWLINE,
                     TokenKind.IDENT, TokenKind.PLUS_EQUALS, TokenKind.STRING,
                     TokenKind.SEMICOLON, TokenKind.EOF]
    assert [(t.pos.line, t.pos.col) for t in tokens[:3]] == [(1, 1), (1, 3), (1, 5)]
    assert tokens[7].pos.col == 17  # the newline ending the comment
    assert tokens[10].value == "y" and (tokens[10].pos.line, tokens[10].pos.col) == (2, 6)


def test_statements_interleaved_with_foreign_lines() -> None:
    """How a container parser takes over a raw line and hands the rest back."""
    text = "name = 'a'\n[replace /etc/hostname]\nweb1\n[end]\nmemory = 64\n"
    lexer = Lexer(text, "c.ct")
    cfg = XlConfig(filename="c.ct")
    raw_lines = []
    while (token := skip_separators(lexer)).kind is not TokenKind.EOF:
        if token.kind is TokenKind.LBRACKET and token.pos.col == 1:
            end = lexer.line_end(token.offset)
            raw_lines.append(lexer.text[token.offset:end])
            body_end = text.index("[end]\n") + len("[end]\n")
            raw_lines.append(text[end + 1:body_end - 1])
            lexer.seek(body_end)
            continue
        cfg.add(parse_setting(lexer))
    assert cfg == {"name": "a", "memory": 64}
    assert str(cfg.position("memory")) == "c.ct:5:1"
    assert raw_lines == ["[replace /etc/hostname]", "web1\n[end]"]


# --- writing -------------------------------------------------------------------


def test_round_trip_of_realistic_configs() -> None:
    for text in (PV_CONFIG, PVH_CONFIG):
        cfg = parse_xl_config(text)
        assert parse_xl_config(write_xl_config(cfg)) == cfg


def test_round_trip_of_awkward_values() -> None:
    values: dict = {
        "s": "quotes ' \" back\\slash tab\t nl\n cr\r bell\a # not a comment ; , [ ]",
        "empty": "",
        "n": 0,
        "big": 2**40,
        "lst": ["a", 1, [], ["nested", 2]],
        "nolist": [],
        "unicode": "caf\u00e9 \u2603",
    }
    text = write_xl_config(values, header="generated\nby a test")
    assert text.startswith("# generated\n# by a test\n")
    assert parse_xl_config(text) == values


def test_writer_layout() -> None:
    text = write_xl_config({"name": "a", "disk": ["x", "y"], "memory": 64})
    assert text == 'name = "a"\ndisk = [\n    "x",\n    "y",\n]\nmemory = 64\n'


@pytest.mark.parametrize("mapping", [{"Bad": 1}, {"n": -1}, {"s": "nul\0"}, {"f": 1.5}])
def test_writer_rejects_what_xl_cannot_say(mapping: dict) -> None:
    with pytest.raises(ValueError):
        write_xl_config(mapping)


def test_mapping_is_mutable_and_keeps_positions() -> None:
    cfg = parse_xl_config("a = 1\nb = 2\n", "m.cfg")
    cfg["a"] = 5
    cfg["c"] = "new"
    del cfg["b"]
    assert cfg == {"a": 5, "c": "new"}
    assert str(cfg.position("a")) == "m.cfg:1:1"
    assert cfg.position("c") is None
    assert cfg.copy() == cfg


# --- disk specs ---------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("phy:/dev/vg/root,xvda,w",
     DiskSpec(target="/dev/vg/root", vdev="xvda", format="raw", access="rw")),
    ("file:/path/a.img,sda1,r",
     DiskSpec(target="/path/a.img", vdev="sda1", access="ro")),
    ("tap:aio:/img/x.img,xvdb,w", DiskSpec(target="/img/x.img", vdev="xvdb")),
    ("tap:qcow2:/img/x.qcow2,xvdb,r",
     DiskSpec(target="/img/x.qcow2", vdev="xvdb", format="qcow2", access="ro")),
    ("/img/a.img,raw,xvda,rw", DiskSpec(target="/img/a.img", vdev="xvda")),
    ("/img/a.qcow2,qcow2,xvda,ro",
     DiskSpec(target="/img/a.qcow2", vdev="xvda", format="qcow2", access="ro")),
    ("/img/a.img,,xvda", DiskSpec(target="/img/a.img", vdev="xvda")),
    ("format=raw, vdev=xvda, access=rw, target=/path/disk.img",
     DiskSpec(target="/path/disk.img", vdev="xvda")),
    ("vdev=xvdc,access=r,format=vhd,target=/path/with,commas, and spaces.vhd",
     DiskSpec(target="/path/with,commas, and spaces.vhd", vdev="xvdc", format="vhd",
              access="ro")),
    ("target=/path/x.img", None),  # no vdev: error, checked below
    ("/iso/d.iso,raw,hdc:cdrom,r",
     DiskSpec(target="/iso/d.iso", vdev="hdc", access="ro", devtype="cdrom")),
    (",,hdc:cdrom,r",
     DiskSpec(target="", vdev="hdc", format="empty", access="ro", devtype="cdrom")),
    ("vdev=xvdd, devtype=cdrom, target=/iso/d.iso",
     DiskSpec(target="/iso/d.iso", vdev="xvdd", access="ro", devtype="cdrom")),
    ("/img/a.img,raw,xvda,w,", DiskSpec(target="/img/a.img", vdev="xvda")),
    ("backendtype=qdisk, script=block-x, discard, backend=dom1, vdev=xvda, target=/a",
     DiskSpec(target="/a", vdev="xvda", backendtype="qdisk", script="block-x",
              options=("discard", "backend=dom1"))),
    ("iscsi:iqn.2001-05.com.example:disk0,xvda,w",
     DiskSpec(target="iqn.2001-05.com.example:disk0", vdev="xvda", script="block-iscsi")),
])
def test_disk_specs(spec: str, expected: DiskSpec | None) -> None:
    if expected is None:
        with pytest.raises(UserError):
            parse_disk_spec(spec)
        return
    disk = parse_disk_spec(spec)
    assert disk == expected
    assert disk.spec == spec
    assert parse_disk_spec(disk.to_spec()) == disk


def test_disk_flags() -> None:
    disk = parse_disk_spec("format=raw,vdev=xvda,access=ro,target=/a")
    assert disk.readonly and not disk.is_cdrom and not disk.is_empty
    cdrom = parse_disk_spec(",,hdc:cdrom,r")
    assert cdrom.is_cdrom and cdrom.is_empty and cdrom.readonly


@pytest.mark.parametrize("spec, message", [
    ("/img/a.img,xvda,w",
     "disk spec '/img/a.img,xvda,w': expected a format (raw, qcow, qcow2, vhd, qed, empty; "
     "the positional form is target,format,vdev,access), found 'xvda'"),
    ("/img/a.img,raw", "disk spec '/img/a.img,raw': expected a vdev (the guest device name, "
     "e.g. xvda), found none"),
    ("vdev=xvda", "disk spec 'vdev=xvda': expected a target (an image file or device), "
     "found none"),
    ("/a,raw,xvda,rw,extra",
     "disk spec '/a,raw,xvda,rw,extra': expected at most target,format,vdev,access as "
     "positional values, found an extra 'extra'"),
    ("/a,raw,xvda,rx", "disk spec '/a,raw,xvda,rx': expected access ro, r, rw or w, found 'rx'"),
    ("foo:/a,xvda,w", "disk spec 'foo:/a,xvda,w': expected a known prefix (phy:, file:, tap:, "
     "aio:, raw:, qcow2:, vhd:, ...), found 'foo:'"),
    ("colour=red,vdev=xvda,target=/a",
     "disk spec 'colour=red,vdev=xvda,target=/a': expected a known disk parameter (format, vdev, "
     "access, devtype, backendtype, script, backend, target, ...), found colour="),
    ("format=raw,format=qcow2,vdev=xvda,target=/a",
     "disk spec 'format=raw,format=qcow2,vdev=xvda,target=/a': expected format given once, "
     "found format 'raw' and 'qcow2'"),
    ("devtype=floppy,vdev=xvda,target=/a",
     "disk spec 'devtype=floppy,vdev=xvda,target=/a': expected devtype=disk or devtype=cdrom, "
     "found 'floppy'"),
])
def test_disk_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_disk_spec(spec)
    assert str(info.value) == message


def test_disk_spec_error_names_its_place_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.cfg"
    path.write_text("name = 'd'\nkernel = 'k'\ndisk = [\n  'format=raw,vdev=xvda,target=/a',\n"
                    "  '/b,xvdb,w',\n]\n")
    with pytest.raises(UserError) as info:
        load_domain_config(path)
    assert str(info.value).startswith(f"{path}:5:3: disk spec '/b,xvdb,w': expected a format")


def test_vif_specs() -> None:
    assert parse_vif_spec("mac=00:16:3e:01:02:03, bridge=xenbr0") == {
        "mac": "00:16:3e:01:02:03", "bridge": "xenbr0"}
    assert parse_vif_spec("") == {}
    with pytest.raises(UserError, match="expected key=value, found 'xenbr0'"):
        parse_vif_spec("bridge=br0,xenbr0")
    assert parse_vif_spec("bridge=br0, trusted") == {"bridge": "br0", "trusted": ""}


@pytest.mark.parametrize("spec, message", [
    ("brige=xenbr0", "expected a vif keyword (mac, bridge, gatewaydev, type, model, vifname, "
     "script, ip, backend, rate, devid, mtu), found brige="),
    ("bridge=a,bridge=b", "expected each keyword once, found bridge= again"),
])
def test_vif_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_vif_spec(spec, "d.cfg:3:9")
    assert str(info.value) == f"d.cfg:3:9: vif spec {spec!r}: {message}"


def test_vif_spec_is_written_canonically() -> None:
    vif = parse_vif_spec("untrusted, bridge=xenbr0 ,mac=00:16:3E:00:00:01")
    assert format_vif_spec(vif) == "mac=00:16:3E:00:00:01,bridge=xenbr0,untrusted"
    assert parse_vif_spec(format_vif_spec(vif)) == vif
    assert format_vif_spec({}) == ""
    with pytest.raises(ValueError):
        format_vif_spec({"ip": "10.0.0.1,10.0.0.2"})


# --- channels -------------------------------------------------------------------


def test_channel_specs() -> None:
    pty = parse_channel_spec("name=org.example.report, connection=pty")
    assert pty == ChannelSpec(name="org.example.report", connection="pty")
    sock = parse_channel_spec("connection=socket,path=/run/a.sock,name=qga,backend=0")
    assert (sock.name, sock.connection, sock.path, sock.backend) == ("qga", "socket", "/run/a.sock", "0")
    for channel in (pty, sock):
        assert parse_channel_spec(channel.to_spec()) == channel
    assert sock.to_spec() == "name=qga,connection=socket,path=/run/a.sock,backend=0"


@pytest.mark.parametrize("spec, message", [
    ("connection=pty", "expected name=NAME (the guest sees the channel by this name), found none"),
    ("name=a", "expected connection=pty or connection=socket, found none"),
    ("name=a,connection=tcp", "expected connection=pty or connection=socket, found 'tcp'"),
    ("name=a,connection=socket", "expected path=SOCKET_PATH with connection=socket, found none"),
    ("name=a,connection=pty,path=/x",
     "expected no path with connection=pty (a pty has no path; use connection=socket), found '/x'"),
    ("name=a,colour=red", "expected a channel keyword (name, connection, path, backend), found colour="),
    ("name=a,name=b", "expected each keyword once, found name= again"),
    ("name=a,pty", "expected key=value, found 'pty'"),
])
def test_channel_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_channel_spec(spec, "c.cfg:9:5")
    assert str(info.value) == f"c.cfg:9:5: channel spec {spec!r}: {message}"


def test_channel_error_names_its_place_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.cfg"
    path.write_text("name = 'c'\nkernel = '/k'\nchannel = [ 'name=a,connection=pty',\n"
                    "  'name=b' ]\n")
    with pytest.raises(UserError) as info:
        load_domain_config(path)
    assert str(info.value).startswith(f"{path}:4:3: channel spec 'name=b': expected connection=")


# --- the fixtures: real-world-style configs, every field ------------------------------

ROUND_TRIP_FIELDS = ("name", "type", "kernel", "ramdisk", "cmdline", "memory", "vcpus", "disks",
                     "vifs", "channels", "channel", "on_poweroff", "on_reboot", "on_crash")


def _fields(dom: DomainConfig) -> dict:
    return {name: getattr(dom, name) for name in ROUND_TRIP_FIELDS if name != "channel"}


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_settings_round_trip(fixture: Path) -> None:
    """parse -> write -> parse gives the same settings, for every fixture."""
    cfg = parse_xl_config(fixture.read_text(), str(fixture))
    again = parse_xl_config(write_xl_config(cfg))
    assert again == cfg
    assert list(again) == list(cfg)


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_domain_round_trip(fixture: Path, tmp_path: Path) -> None:
    """A domain written out (resolved paths, canonical specs) and read back is the same domain."""
    dom = load_domain_config(fixture)
    written = tmp_path / "elsewhere" / fixture.name
    written.parent.mkdir()
    written.write_text(write_xl_config(dom, header=f"from {fixture.name}"))
    again = load_domain_config(written)
    assert _fields(again) == _fields(dom)
    # Written again, the text is a fixed point: canonical specs stay canonical.
    assert write_xl_config(again) == write_xl_config(dom)
    # Settings this project does not interpret survive.
    assert {k: v for k, v in again.raw.items() if k not in ("kernel", "ramdisk", "disk", "vif", "channel")} \
        == {k: v for k, v in dom.raw.items() if k not in ("kernel", "ramdisk", "disk", "vif", "channel")}


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_specs_normalise_and_reparse_equal(fixture: Path) -> None:
    dom = load_domain_config(fixture)
    for disk in dom.disks:
        canonical = disk.to_spec()
        assert parse_disk_spec(canonical) == disk, disk.spec
        assert parse_disk_spec(canonical).to_spec() == canonical
    for vif in dom.vifs:
        assert parse_vif_spec(format_vif_spec(vif)) == vif
    for channel in dom.channels:
        assert parse_channel_spec(channel.to_spec()) == channel


def test_fixtures_cover_every_field() -> None:
    """The fixture set exercises every setting and spec form we read and write."""
    doms = [load_domain_config(path) for path in FIXTURE_FILES]
    keys = set().union(*(set(d.raw) for d in doms))
    assert {"name", "type", "kernel", "ramdisk", "cmdline", "extra", "root", "memory", "vcpus",
            "on_poweroff", "on_reboot", "on_crash", "vif", "channel", "disk"} <= keys
    assert {d.type for d in doms} >= {"pv", "pvh"}
    disks = [disk for d in doms for disk in d.disks]
    specs = [disk.spec for disk in disks]
    assert any("=" not in s for s in specs) and any(s.startswith("format=") for s in specs)
    assert any(":" in s.split(",")[0] and "=" not in s for s in specs)       # prefix: forms
    assert {disk.format for disk in disks} >= {"raw", "qcow2", "vhd", "qed", "empty"}
    assert {disk.access for disk in disks} == {"ro", "rw"}
    assert {disk.backendtype for disk in disks} >= {"phy", "qdisk", "tap", None}
    assert {disk.devtype for disk in disks} == {"disk", "cdrom"}
    assert any(disk.script for disk in disks) and any(disk.options for disk in disks)
    assert any("," in disk.target for disk in disks)
    vif_keys = {key for d in doms for vif in d.vifs for key in vif}
    assert vif_keys >= {"mac", "bridge", "script", "vifname", "model", "type", "ip", "gatewaydev",
                        "rate", "mtu", "backend", "devid", "trusted", "untrusted"}
    assert {c.connection for d in doms for c in d.channels} == {"pty", "socket"}
    assert {d.on_crash for d in doms} >= {"coredump-restart", "preserve", "destroy"}


def test_fixture_values(tmp_path: Path) -> None:
    """What the interpreted fields are, per fixture (the parsers read what xl reads)."""
    legacy = load_domain_config(FIXTURES / "pv-classic.cfg")
    assert legacy.cmdline == "root=/dev/xvda1 ro console=hvc0 xencons=tty"
    assert (legacy.memory, legacy.vcpus, legacy.raw["maxvcpus"]) == (512, 2, 4)
    assert [(d.target, d.vdev, d.format, d.access) for d in legacy.disks] == [
        ("/dev/vg0/legacy-root", "xvda1", "raw", "rw"),
        ("/srv/xen/legacy-swap.img", "xvda2", "raw", "rw"),
        ("/srv/xen/usr.img", "xvdb", "raw", "ro"),
        ("/srv/xen/data.qcow2", "xvdc", "qcow2", "rw"),
        ("/srv/xen/scratch.img", "xvdd", "raw", "rw")]
    assert legacy.vifs[2] == {} and legacy.vifs[1]["vifname"] == "legacy-eth1"

    web = load_domain_config(FIXTURES / "pvh-keyvalue.cfg")
    root, usr, var, vhd, iscsi, odd = web.disks
    assert (root.format, root.backendtype, root.access) == ("qcow2", "qdisk", "rw")
    assert usr.readonly and var.backendtype == "phy" and var.target == "/dev/vg0/web1-var"
    assert (vhd.format, vhd.backendtype, vhd.access) == ("vhd", "tap", "ro")
    assert iscsi.script == "block-iscsi" and iscsi.target == "iqn.2005-07.org.example:web1"
    assert odd.target == "/var/images/with,comma and space.img"
    assert odd.options == ("discard", "backend=driver-dom")
    assert web.channels[1].path == "/run/xen/web1-qga.sock"
    assert web.vifs[1]["untrusted"] == ""

    cd = load_domain_config(FIXTURES / "cdrom-and-extras.cfg")
    base = str(FIXTURES)
    assert cd.kernel == FIXTURES / "vmlinuz" and cd.cmdline == "console=hvc0 priority=low"
    assert cd.disks[0].target == f"{base}/disk.img"
    assert [(d.devtype, d.is_empty, d.readonly) for d in cd.disks[1:4]] == [
        ("cdrom", False, True), ("cdrom", True, True), ("cdrom", False, True)]
    assert cd.disks[4].script == "block-iscsi"          # no path resolution for script targets
    assert cd.disks[5].target == f"{base}/extra.qed"
    assert cd.raw["cpus"] == "0-1" and cd.raw["pci"] == []


# --- the domain ----------------------------------------------------------------


def test_load_pv_domain(tmp_path: Path) -> None:
    path = tmp_path / "web1.cfg"
    path.write_text(PV_CONFIG)
    dom = load_domain_config(path)
    assert dom.name == "web1" and dom.type == "pv"
    assert dom.kernel == Path("/boot/vmlinuz-6.1.0-56-amd64")
    assert dom.ramdisk == Path("/boot/initrd.img-6.1.0-56-amd64")
    assert dom.cmdline == "root=/dev/xvda1 ro console=hvc0 quiet"
    assert (dom.memory, dom.vcpus) == (512, 2)
    assert [d.target for d in dom.disks] == ["/dev/vg/web1-root", "/srv/images/shared.img"]
    assert [d.access for d in dom.disks] == ["rw", "ro"]
    assert dom.vifs == [{"mac": "00:16:3e:01:02:03", "bridge": "xenbr0"}]
    assert (dom.on_poweroff, dom.on_reboot, dom.on_crash) == ("destroy", "restart", "preserve")
    assert dom.raw["maxvcpus"] == 4


def test_load_pvh_domain_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db.cfg"
    path.parent.mkdir()
    path.write_text(PVH_CONFIG)
    dom = load_domain_config(path)
    base = path.parent.absolute()
    assert dom.type == "pvh"
    assert dom.kernel == base / "vmlinuz" and dom.ramdisk == base / "initrd.img"
    assert dom.disks[0].target == str(base / "disk.img")
    assert dom.cmdline == "root=LABEL=root console=hvc0"
    assert dom.channel == ["name=org.example.report,connection=pty"]
    assert dom.vifs == [] and dom.on_reboot == "restart"


def test_defaults_and_cmdline_rules(tmp_path: Path) -> None:
    def load(text: str):
        path = tmp_path / "x.cfg"
        path.write_text("name = 'x'\nkernel = '/k'\n" + text)
        return load_domain_config(path)

    dom = load("")
    assert (dom.type, dom.memory, dom.vcpus, dom.cmdline, dom.disks) == ("pv", 512, 1, "", [])
    assert load("root = '/dev/xvda'\n").cmdline == "root=/dev/xvda"
    assert load("extra = 'quiet'\n").cmdline == "quiet"
    assert load("cmdline = 'a'\nroot = 'r'\nextra = 'e'\n").cmdline == "a"
    assert load("builder = 'hvm'\n").type == "hvm"
    assert load("memory = '1024'\n").memory == 1024


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\n", "expected a 'kernel' setting"),
    ("kernel = '/k'\n", "expected a 'name' setting, found none"),
    ("name = 'x'\nkernel = 5\n", ":2:10: expected a quoted string for 'kernel', found a number"),
    ("name = 'x'\nkernel = '/k'\ntype = 'pvx'\n",
     ":3:8: expected type \"pv\", \"pvh\" or \"hvm\", found 'pvx'"),
    ("name = 'x'\nkernel = '/k'\nmemory = 0\n",
     ":3:10: expected a positive whole number for 'memory', found 0"),
    ("name = 'x'\nkernel = '/k'\ndisk = '/a,raw,xvda,w'\n",
     ":3:8: expected a [list] of strings for 'disk', found a string"),
    ("name = 'x'\nkernel = '/k'\ndisk = ['/a,raw,xvda,w', 5]\n",
     ":3:26: expected a quoted string in the list 'disk', found a number"),
    ("name = 'x'\nkernel = '/k'\non_crash = 'explode'\n",
     ":3:12: expected on_crash one of destroy, restart"),
])
def test_domain_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_domain_config(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the domain config"):
        load_domain_config(tmp_path / "missing.cfg")
    path = tmp_path / "latin1.cfg"
    path.write_bytes(b"name = 'caf\xe9'\n")
    with pytest.raises(UserError, match="expected UTF-8 text, found byte 0xe9 at offset 11"):
        load_domain_config(path)


def test_domain_written_with_resolved_paths(tmp_path: Path) -> None:
    path = tmp_path / "db.cfg"
    path.write_text(PVH_CONFIG)
    dom = load_domain_config(path)
    again = parse_xl_config(write_xl_config(dom))
    base = str(tmp_path.absolute())
    assert again["kernel"] == f"{base}/vmlinuz"
    assert again["disk"] == [f"format=raw, vdev=xvda, access=rw, target={base}/disk.img"]
    assert again["cmdline"] == dom.raw["cmdline"]
    written = tmp_path / "elsewhere" / "db.cfg"
    written.parent.mkdir()
    written.write_text(write_xl_config(dom))
    moved = load_domain_config(written)
    assert (moved.kernel, moved.disks) == (dom.kernel, dom.disks)
