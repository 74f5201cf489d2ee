"""The plan schema: valid plans load, every kind of bad field is named in the error."""
from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from guest_init.plan import (
    OPERATIONS,
    DeviceRef,
    Mount,
    PlanError,
    ReplaceStep,
    load_plan,
    validate_plan,
)

pytestmark = pytest.mark.unit

UUID = "0b9f5c1e-1111-2222-3333-444455556666"


def good_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "name": "web1",
        "init": "/sbin/init",
        "failure_policy": "halt",
        "device_timeout": 30,
        "mounts": [
            {"device": {"label": "web1-root"}, "target": "/", "fstype": "ext4", "options": ["rw"]},
            {"device": {"uuid": UUID.upper()}, "target": "/usr", "fstype": "ext4", "options": ["ro"]},
        ],
        "steps": [
            {"op": "replace", "path": "/etc/hostname", "content": "web1\n", "mode": "0644"},
            {
                "op": "replace",
                "path": "/etc/motd",
                "content_base64": base64.b64encode(b"\x00hi\xff").decode(),
                "mode": "0600",
                "uid": 0,
                "gid": 42,
            },
        ],
    }


def minimal_doc() -> dict[str, Any]:
    return {"version": 1, "name": "m", "mounts": [{"device": {"label": "r"}, "target": "/"}]}


def test_valid_plan() -> None:
    plan = validate_plan(good_doc())
    assert plan.version == 1 and plan.name == "web1" and plan.init == "/sbin/init"
    assert plan.failure_policy == "halt" and plan.device_timeout == 30.0
    assert plan.mounts[0] == Mount(DeviceRef(label="web1-root"), "/", "ext4", ("rw",))
    assert plan.mounts[1].device == DeviceRef(uuid=UUID)  # lower-cased
    assert plan.mounts[1].device.describe() == f"UUID={UUID}"
    assert plan.mounts[0].device.describe() == "LABEL=web1-root"
    assert plan.steps[0] == ReplaceStep("/etc/hostname", b"web1\n", 0o644, None, None)
    assert plan.steps[1] == ReplaceStep("/etc/motd", b"\x00hi\xff", 0o600, 0, 42)


def test_defaults() -> None:
    plan = validate_plan(minimal_doc())
    assert plan.init == "/sbin/init"
    assert plan.failure_policy == "halt"
    assert plan.device_timeout == 30.0
    assert plan.steps == ()
    assert plan.mounts[0].fstype == "ext4" and plan.mounts[0].options == ("rw",)
    doc = minimal_doc()
    doc["steps"] = [{"op": "replace", "path": "/etc/x", "content": ""}]
    assert validate_plan(doc).steps[0] == ReplaceStep("/etc/x", b"", 0o644, None, None)


def test_digest_is_sha256_of_canonical_json() -> None:
    doc = good_doc()
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert validate_plan(doc).digest == hashlib.sha256(canonical.encode()).hexdigest()
    reordered = dict(reversed(list(doc.items())))
    assert validate_plan(reordered).digest == validate_plan(doc).digest
    doc["name"] = "web2"
    assert validate_plan(doc).digest != validate_plan(good_doc()).digest


def test_mount_order_puts_parents_first() -> None:
    doc = minimal_doc()
    doc["mounts"] = [
        {"device": {"label": "c"}, "target": "/usr/local"},
        {"device": {"label": "b"}, "target": "/usr"},
        {"device": {"label": "a"}, "target": "/"},
    ]
    assert [m.target for m in validate_plan(doc).mount_order()] == ["/", "/usr", "/usr/local"]


def mutate(path: str, value: Any) -> dict[str, Any]:
    """good_doc() with the value at dotted ``path`` set (or deleted if value is DELETE)."""
    doc = copy.deepcopy(good_doc())
    keys: list[Any] = []
    for part in path.split("."):
        name, _, index = part.partition("[")
        keys.append(name)
        if index:
            keys.append(int(index.rstrip("]")))
    target: Any = doc
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return doc


DELETE = object()

BAD = [
    # (field to change, new value, field named in the error, words in the message)
    ("version", 2, "version", "unsupported plan version 2"),
    ("version", "1", "version", "unsupported"),
    ("version", True, "version", "unsupported"),
    ("version", DELETE, "version", "missing"),
    ("name", "", "name", "non-empty"),
    ("name", "a/b", "name", "'/'"),
    ("name", 7, "name", "expected a string"),
    ("init", "sbin/init", "init", "absolute"),
    ("init", "/sbin/../init", "init", '".."'),
    ("failure_policy", "reboot", "failure_policy", "halt, continue, poweroff"),
    ("device_timeout", -1, "device_timeout", ">= 0"),
    ("device_timeout", "30", "device_timeout", "number of seconds"),
    ("device_timeout", True, "device_timeout", "number of seconds"),
    ("mounts", {}, "mounts", "list"),
    ("mounts[0]", "/dev/vda", "mounts[0]", "expected an object"),
    ("mounts[0].target", "/srv", "mounts", 'target "/"'),
    ("mounts[1].target", "/", "mounts[1].target", "already the target of mounts[0]"),
    ("mounts[1].target", "usr", "mounts[1].target", "absolute"),
    ("mounts[1].target", "/usr/", "mounts[1].target", "normalised"),
    ("mounts[1].target", "//usr", "mounts[1].target", "normalised"),
    ("mounts[1].target", "/usr/./lib", "mounts[1].target", "normalised"),
    ("mounts[1].target", "/usr/../etc", "mounts[1].target", '".."'),
    ("mounts[1].device", {"label": "a", "uuid": UUID}, "mounts[1].device", "exactly one"),
    ("mounts[1].device", {}, "mounts[1].device", "exactly one"),
    ("mounts[1].device", {"lable": "x"}, "mounts[1].device.lable", "unknown key"),
    ("mounts[1].device.uuid", "not-a-uuid", "mounts[1].device.uuid", "expected a UUID"),
    ("mounts[1].device.uuid", UUID[:-1] + "g", "mounts[1].device.uuid", "expected a UUID"),
    ("mounts[1].device.uuid", 12, "mounts[1].device.uuid", "expected a string"),
    ("mounts[0].device.label", "", "mounts[0].device.label", "non-empty"),
    ("mounts[0].fstype", 4, "mounts[0].fstype", "expected a string"),
    ("mounts[0].options", "rw", "mounts[0].options", "list of strings"),
    ("mounts[0].options", ["rw", 1], "mounts[0].options[1]", "expected a string"),
    ("mounts[0].optoins", ["rw"], "mounts[0].optoins", "unknown key"),
    ("mounts[0].device", DELETE, "mounts[0].device", "missing"),
    ("steps", "x", "steps", "list"),
    ("steps[0]", [], "steps[0]", "expected an object"),
    ("steps[0].op", "frobnicate", "steps[0].op", 'unknown operation "frobnicate"'),
    ("steps[0].op", DELETE, "steps[0].op", "missing"),
    ("steps[0].path", "etc/hostname", "steps[0].path", "absolute"),
    ("steps[0].path", "/etc/../root/x", "steps[0].path", '".."'),
    ("steps[0].path", "/", "steps[0].path", "file path"),
    ("steps[0].path", "/etc/ho\0st", "steps[0].path", "NUL"),
    ("steps[0].path", DELETE, "steps[0].path", "missing"),
    ("steps[0].content", 5, "steps[0].content", "expected a string"),
    ("steps[0].content", DELETE, "steps[0]", "exactly one of"),
    ("steps[1].content", "x", "steps[1]", "exactly one of"),
    ("steps[1].content_base64", "***", "steps[1].content_base64", "invalid base64"),
    ("steps[1].mode", 420, "steps[1].mode", 'expected an octal string like "0644", found 420'),
    ("steps[1].mode", "0944", "steps[1].mode", "octal"),
    ("steps[1].mode", "644644", "steps[1].mode", "octal"),
    ("steps[1].uid", -1, "steps[1].uid", ">= 0"),
    ("steps[1].uid", "root", "steps[1].uid", "integer"),
    ("steps[1].gid", 1.5, "steps[1].gid", "integer"),
    ("steps[1].owner", "root", "steps[1].owner", "unknown key"),
    ("extra", 1, "extra", "unknown key"),
]


@pytest.mark.parametrize("path,value,field,words", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_invalid_field_is_named(path: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_plan(mutate(path, value), "plan.json")
    assert info.value.field == field
    assert str(info.value).startswith(f"plan.json: {field}: ")
    assert words in str(info.value)


def test_error_message_format_matches_docs() -> None:
    with pytest.raises(PlanError) as info:
        validate_plan(mutate("steps[1].mode", 420), "plan.json")
    assert str(info.value) == 'plan.json: steps[1].mode: expected an octal string like "0644", found 420'
    assert isinstance(info.value, ValueError)


def test_document_not_an_object() -> None:
    with pytest.raises(PlanError, match=r"^plan: expected an object, found a list$"):
        validate_plan([])


def test_null_uid_means_unchanged() -> None:
    assert validate_plan(mutate("steps[1].uid", None)).steps[1].uid is None


def test_load_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good_doc(), indent=2))
    plan = load_plan(path)
    assert plan.name == "web1" and plan.digest == validate_plan(good_doc()).digest
    assert load_plan(str(path)) == plan


def test_load_plan_names_file_for_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(mutate("steps[1].mode", 420)))
    with pytest.raises(PlanError, match=r"plan\.json: steps\[1\]\.mode: expected an octal"):
        load_plan(path)


def test_load_plan_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(info.value).startswith(f"{path}: cannot read: ")
    assert info.value.field == ""


def test_load_plan_bad_json_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{\n  "version": 1,\n  "name": "x"\n  "mounts": []\n}\n')
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert (info.value.line, info.value.column) == (4, 3)
    assert str(info.value).startswith(f"{path}:4:3: invalid JSON: Expecting ',' delimiter")


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"version": 1, "version": 1}', 'duplicate key "version"'),
        ('{"version": NaN}', "NaN is not valid JSON"),
    ],
)
def test_load_plan_rejects_json_quirks(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=words) as info:
        load_plan(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_plan_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(path)


def test_operation_registry_is_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an op is one registry entry; its parser gets the object and its field path."""
    seen: list[tuple[dict[str, Any], str]] = []

    def parse_noop(obj: dict[str, Any], where: str) -> ReplaceStep:
        seen.append((obj, where))
        if "bad" in obj:
            raise PlanError(f"{where}.bad", "not allowed")
        return ReplaceStep("/x", b"", 0o644, None, None)

    monkeypatch.setitem(OPERATIONS, "noop", parse_noop)
    doc = minimal_doc()
    doc["steps"] = [{"op": "noop"}, {"op": "noop", "bad": 1}]
    with pytest.raises(PlanError, match=r"^p\.json: steps\[1\]\.bad: not allowed$"):
        validate_plan(doc, "p.json")
    assert seen[0] == ({"op": "noop"}, "steps[0]")
    assert "replace" in OPERATIONS


# ------------------------------------------------------------------ NFS mounts


def nfs_doc(**nfs_mount: Any) -> dict[str, Any]:
    """A plan mounting /opt from an NFSv4 export, with the network it needs."""
    mount = {"nfs": {"server": "10.0.2.2", "path": "/export/opt", "port": 20490}, "target": "/opt",
             "fstype": "nfs4", "options": ["ro", "vers=4.2"]}
    mount.update(nfs_mount)
    doc = minimal_doc()
    doc["network"] = {"interfaces": [{"match": {"name": "eth0"}, "dhcp": True}]}
    doc["mounts"].append(mount)
    return doc


def test_nfs_mount() -> None:
    from guest_init.plan import NfsExport

    plan = validate_plan(nfs_doc())
    mount = plan.mounts[1]
    assert mount.nfs == NfsExport("10.0.2.2", "/export/opt", 20490, 30.0)
    assert mount.device is mount.nfs and mount.device.describe() == "10.0.2.2:/export/opt"
    assert mount.fstype == "nfs4" and mount.options == ("ro", "vers=4.2")
    assert mount.devices() == []            # the devices stage waits for no block device
    assert plan.mounts[0].nfs is None
    assert [m.target for m in plan.mount_order()] == ["/", "/opt"]


def test_nfs_mount_defaults() -> None:
    doc = nfs_doc(nfs={"server": "192.168.1.5", "path": "/srv"})
    del doc["mounts"][1]["fstype"], doc["mounts"][1]["options"]
    mount = validate_plan(doc).mounts[1]
    assert mount.nfs.port == 2049 and mount.nfs.timeout == 30.0
    assert mount.fstype == "nfs4" and mount.options == ("rw",)


def test_nfs_mount_needs_the_network() -> None:
    doc = nfs_doc()
    del doc["network"]
    with pytest.raises(PlanError) as info:
        validate_plan(doc, "plan.json")
    assert info.value.field == "mounts[1].nfs"
    assert str(info.value).startswith('plan.json: mounts[1].nfs: an NFS mount needs the network: add a "network"')


BAD_NFS = [
    # (change to the NFS mount, field named in the error, words in the message)
    ({"nfs": {"server": "nfs.example.org", "path": "/x"}}, "mounts[1].nfs.server", "IPv4 address"),
    ({"nfs": {"server": "0.0.0.0", "path": "/x"}}, "mounts[1].nfs.server", "unicast"),
    ({"nfs": {"server": "224.0.0.1", "path": "/x"}}, "mounts[1].nfs.server", "unicast"),
    ({"nfs": {"server": "fe80::1", "path": "/x"}}, "mounts[1].nfs.server", "IPv4 address"),
    ({"nfs": {"server": 10, "path": "/x"}}, "mounts[1].nfs.server", "expected a string"),
    ({"nfs": {"path": "/x"}}, "mounts[1].nfs.server", "missing"),
    ({"nfs": {"server": "10.0.2.2"}}, "mounts[1].nfs.path", "missing"),
    ({"nfs": {"server": "10.0.2.2", "path": "export"}}, "mounts[1].nfs.path", "absolute"),
    ({"nfs": {"server": "10.0.2.2", "path": "/a/../b"}}, "mounts[1].nfs.path", '".."'),
    ({"nfs": {"server": "10.0.2.2", "path": "/a/"}}, "mounts[1].nfs.path", "normalised"),
    ({"nfs": {"server": "10.0.2.2", "path": "/a,b"}}, "mounts[1].nfs.path", "','"),
    ({"nfs": {"server": "10.0.2.2", "path": "/x", "port": 0}}, "mounts[1].nfs.port", "1 to 65535"),
    ({"nfs": {"server": "10.0.2.2", "path": "/x", "port": "2049"}}, "mounts[1].nfs.port", "1 to 65535"),
    ({"nfs": {"server": "10.0.2.2", "path": "/x", "timeout": 0}}, "mounts[1].nfs.timeout", "more than 0"),
    ({"nfs": {"server": "10.0.2.2", "path": "/x", "timout": 5}}, "mounts[1].nfs.timout", "unknown key"),
    ({"nfs": "10.0.2.2:/x"}, "mounts[1].nfs", "expected an object"),
    ({"device": {"label": "x"}}, "mounts[1].device", "unknown key"),
    ({"fstype": "nfs"}, "mounts[1].fstype", 'expected "nfs4"'),
    ({"options": "ro"}, "mounts[1].options", "list of strings"),
    ({"options": ["ro,addr=1.2.3.4"]}, "mounts[1].options[0]", "one option per string"),
    ({"options": ["ro", "addr=1.2.3.4"]}, "mounts[1].options[1]", "addr= is set by the agent"),
    ({"options": ["clientaddr=10.0.2.15"]}, "mounts[1].options[0]", "clientaddr= is set by the agent"),
    ({"options": ["port=2050"]}, "mounts[1].options[0]", "port= is set by nfs.port"),
    ({"options": ["vers=3"]}, "mounts[1].options[0]", "vers=4, 4.0, 4.1 or 4.2"),
    ({"options": ["nfsvers=4.3"]}, "mounts[1].options[0]", "vers=4, 4.0, 4.1 or 4.2"),
    ({"options": ["minorversion=7"]}, "mounts[1].options[0]", "minorversion=0, 1 or 2"),
    ({"options": [""]}, "mounts[1].options[0]", "non-empty"),
    ({"target": "opt"}, "mounts[1].target", "absolute"),
]


@pytest.mark.parametrize("change,field,words", BAD_NFS, ids=[json.dumps(b[0]) for b in BAD_NFS])
def test_invalid_nfs_field_is_named(change: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_plan(nfs_doc(**change), "plan.json")
    assert info.value.field == field
    assert str(info.value).startswith(f"plan.json: {field}: ")
    assert words in str(info.value)


def test_nfs_root_and_version_options_are_accepted() -> None:
    doc = nfs_doc(options=["ro", "vers=4.1", "soft", "timeo=50", "retrans=3"])
    doc["mounts"][1]["target"] = "/"
    doc["mounts"].pop(0)
    plan = validate_plan(doc)
    assert plan.mounts[0].target == "/" and plan.mounts[0].options[1] == "vers=4.1"
