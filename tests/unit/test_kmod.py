"""Module load order from depmod's files: the real Debian kernel, and synthetic corner cases."""
from __future__ import annotations

from pathlib import Path

import pytest

from dom0.cache import cache_root
from dom0.errors import UserError
from dom0.kmod import KernelModule, module_name, read_module_list, resolve_modules

pytestmark = pytest.mark.unit

KERNEL = "6.1.0-56-amd64"
DEFAULT_LIST = ["xen-blkfront", "xen-netfront", "virtio_blk", "virtio_net", "virtio_pci",
                "ext4", "overlay", "nfs", "nfsv4"]


@pytest.fixture(scope="module")
def modules_dir() -> Path:
    path = cache_root() / "kernels" / KERNEL / "lib" / "modules" / KERNEL
    if not (path / "modules.dep").is_file():
        pytest.skip(f"cached kernel {KERNEL} not present under {cache_root() / 'kernels'}")
    return path


def dep_edges(modules_dir: Path) -> dict[str, list[str]]:
    edges: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        head, _, tail = line.partition(":")
        edges[module_name(head)] = [module_name(d) for d in tail.split()]
    return edges


def position(order: list[KernelModule]) -> dict[str, int]:
    return {m.name: i for i, m in enumerate(order)}


def test_ext4_closure_with_softdep(modules_dir: Path) -> None:
    plan = resolve_modules(modules_dir, ["ext4"])
    pos = position(plan.order)
    for dep in ("crc16", "mbcache", "jbd2", "crc32c_generic"):
        assert pos[dep] < pos["ext4"], dep
    assert plan.order[-1].name == "ext4"
    by_name = {m.name: m for m in plan.order}
    assert by_name["crc32c_generic"].softdep and not by_name["jbd2"].softdep
    assert by_name["ext4"].relpath == "kernel/fs/ext4/ext4.ko"
    assert by_name["ext4"].path == modules_dir / "kernel/fs/ext4/ext4.ko"
    assert by_name["ext4"].path.is_file()


def test_virtio_pci_deps_first(modules_dir: Path) -> None:
    plan = resolve_modules(modules_dir, ["virtio_pci"])
    pos = position(plan.order)
    for dep in dep_edges(modules_dir)["virtio_pci"]:
        assert pos[dep] < pos["virtio_pci"]
    assert plan.order[-1].name == "virtio_pci"


def test_dash_and_underscore_are_equal(modules_dir: Path) -> None:
    a = resolve_modules(modules_dir, ["xen-blkfront"])
    b = resolve_modules(modules_dir, ["xen_blkfront"])
    assert a.names() == b.names() == ["xen_blkfront"]
    assert a.order[0].relpath == "kernel/drivers/block/xen-blkfront.ko"


def test_default_list_satisfies_every_edge(modules_dir: Path) -> None:
    plan = resolve_modules(modules_dir, DEFAULT_LIST)
    names = plan.names()
    assert len(names) == len(set(names))
    pos = position(plan.order)
    edges = dep_edges(modules_dir)
    for name in names:
        for dep in edges[name]:
            assert pos[dep] < pos[name], f"{dep} must load before {name}"
    for wanted in DEFAULT_LIST:
        assert wanted.replace("-", "_") in pos
    assert resolve_modules(modules_dir, DEFAULT_LIST).names() == names  # deterministic


def test_unknown_module(modules_dir: Path) -> None:
    with pytest.raises(UserError) as err:
        resolve_modules(modules_dir, ["ext4", "no_such_module_x"])
    assert str(err.value) == f"module 'no_such_module_x' not found in {modules_dir / 'modules.dep'}"


def test_missing_modules_dep(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"modules\.dep not found.*depmod"):
        resolve_modules(tmp_path, ["ext4"])


# -- synthetic modules dir ---------------------------------------------------


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A small modules dir exercising aliases, wildcards, builtins, post-softdeps and cycles."""
    mods = {
        "kernel/fs/myfs.ko": ["kernel/lib/libhelp.ko.xz"],
        "kernel/lib/libhelp.ko.xz": [],
        "kernel/crypto/hash-generic.ko.zst": [],
        "kernel/crypto/hash-fast.ko.gz": ["kernel/lib/libhelp.ko.xz"],
        "kernel/drivers/net/nic.ko": [],
        "kernel/drivers/net/nic-extra.ko": ["kernel/drivers/net/nic.ko"],
        "kernel/drivers/misc/loop-a.ko": [],
        "kernel/drivers/misc/loop-b.ko": ["kernel/drivers/misc/loop-a.ko"],
    }
    (tmp_path / "modules.dep").write_text(
        "".join(f"{m}: {' '.join(d)}\n" for m, d in mods.items())
    )
    for rel in mods:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "modules.softdep").write_text(
        "# comment\n"
        "softdep myfs pre: crypto-hash missing-thing builtin-alias\n"
        "softdep nic post: nic-extra\n"
        "softdep nic ignored-without-mode\n"
        "softdep loop_a pre: loop-b\n"  # would contradict the hard edge loop_b -> loop_a
    )
    (tmp_path / "modules.alias").write_text(
        "alias crypto-hash hash_generic\n"
        "alias crypto-hash hash_fast\n"
        "alias crypto-hash compiled_in\n"
        "alias pci:v00001234d*sv*sd*bc02sc*i* nic\n"
        "alias fs-myfs myfs\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/lib/compiled_in.ko\nkernel/fs/basefs.ko\n")
    (tmp_path / "modules.builtin.modinfo").write_bytes(
        b"compiled_in.alias=builtin-alias\0compiled_in.license=GPL\0"
    )
    return tmp_path


def test_alias_softdeps_all_matches_before(synthetic: Path) -> None:
    plan = resolve_modules(synthetic, ["myfs"])
    assert plan.names() == ["hash_generic", "libhelp", "hash_fast", "myfs"]
    assert [m.softdep for m in plan.order] == [True, False, True, False]
    assert plan.order[1].relpath == "kernel/lib/libhelp.ko.xz"
    assert ("myfs", "missing-thing", "not found") in plan.skipped_softdeps
    assert ("myfs", "builtin-alias", "builtin") in plan.skipped_softdeps


def test_wildcard_alias_request(synthetic: Path) -> None:
    assert resolve_modules(synthetic, ["pci:v00001234d00005678sv0sd0bc02sc00i00"]).names() == [
        "nic", "nic_extra"]
    assert resolve_modules(synthetic, ["fs-myfs"]).names()[-1] == "myfs"


def test_post_softdep_after(synthetic: Path) -> None:
    assert resolve_modules(synthetic, ["nic"]).names() == ["nic", "nic_extra"]


def test_builtin_skipped(synthetic: Path) -> None:
    plan = resolve_modules(synthetic, ["basefs", "nic-extra", "compiled-in"])
    assert plan.builtin == ["basefs", "compiled_in"]
    assert plan.names() == ["nic", "nic_extra"]


def test_softdep_cycle_dropped(synthetic: Path) -> None:
    assert resolve_modules(synthetic, ["loop_a", "loop_b"]).names() == ["loop_a", "loop_b"]
    assert resolve_modules(synthetic, ["loop_b"]).names() == ["loop_a", "loop_b"]


def test_missing_ko_file(synthetic: Path) -> None:
    (synthetic / "kernel/drivers/net/nic.ko").unlink()
    with pytest.raises(UserError, match="nic.ko is missing"):
        resolve_modules(synthetic, ["nic"])


def test_read_module_list(tmp_path: Path) -> None:
    path = tmp_path / "modules.list"
    path.write_text("# block devices\nxen-blkfront\n\n  virtio_blk   # qemu\next4\n")
    assert read_module_list(path) == ["xen-blkfront", "virtio_blk", "ext4"]
    path.write_text("ext4 overlay\n")
    with pytest.raises(UserError, match=r"modules\.list:1"):
        read_module_list(path)
    with pytest.raises(UserError, match="not found"):
        read_module_list(tmp_path / "nope")
