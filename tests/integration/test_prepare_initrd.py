"""``supercharge prepare-initrd`` against the real builder, the real frozen agent and the cached kernel.

The base initrd is cached in the shared cache (~/.cache/supercharge, or
SUPERCHARGE_CACHE), so after the first build these tests are quick.  Only
``test_cold_build_freezes_once_then_reuses`` builds from an empty private cache
(freezing the agent with PyInstaller, ~20 s); it links the already extracted
kernel into that cache, as bench/boot_spine.py does.

What a built initrd must hold is checked by reading it back with
:func:`dom0.cpio.read_initrd` (the kernel's view: concatenated segments) and by
checking the ELF dependencies of every file in it the way the guest's dynamic
loader will resolve them, with no ld.so.cache and no host file system behind it.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import stat
from pathlib import Path

import pytest

from dom0.compress import sniff
from dom0.cpio import CpioEntry, read_cpio, read_initrd
from dom0.demo import demo_plan
from dom0.freeze import agent_key
from dom0.kmod import module_name, normalize
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration

PLAN_IN_INITRD = "etc/supercharge/plan.json"
MODULES_JSON = "etc/supercharge/modules.json"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
LOADER = "usr/lib64/ld-linux-x86-64.so.2"
# The dynamic loader's built-in search path on Debian amd64 (``ld.so --help``);
# there is no /etc/ld.so.cache in the initramfs, so these are all it searches.
SYSTEM_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")


# ---------------------------------------------------------------------------
# Helpers


class Archive:
    """The entries of an initrd by name, with symlink resolution inside the archive."""

    def __init__(self, entries: list[CpioEntry]) -> None:
        self.entries = entries
        self.by_name: dict[str, CpioEntry] = {}
        for entry in entries:
            # The kernel's unpacker lets a later entry replace an earlier one; directories
            # (etc, etc/supercharge) legitimately appear in both segments.
            self.by_name[entry.name] = entry

    def resolve(self, path: str, depth: int = 0) -> str | None:
        """The archive name ``path`` leads to, following symlinks component by component
        (absolute targets are taken relative to the archive root, like after switch_root
        into it); None if it leads nowhere inside the archive."""
        if depth > 40:
            return None
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        current = ""
        for index, part in enumerate(parts):
            if part == "..":
                current = posixpath.dirname(current)
                continue
            candidate = f"{current}/{part}" if current else part
            entry = self.by_name.get(candidate)
            if entry is None:
                return None
            if entry.is_symlink:
                target = entry.symlink_target or ""
                joined = target if target.startswith("/") else posixpath.join(current, target)
                resolved = self.resolve(joined, depth + 1)
                if resolved is None:
                    return None
                candidate = resolved
            current = candidate
        return current

    def file(self, path: str) -> CpioEntry | None:
        """The regular file ``path`` leads to (through symlinks), or None."""
        name = self.resolve(path)
        entry = self.by_name.get(name) if name is not None else None
        return entry if entry is not None and entry.is_file else None


def build(*args: str, check: bool = True) -> dict:
    """``prepare-initrd --json`` through the real CLI; the parsed JSON result."""
    proc = run_cli("prepare-initrd", "--allow-unsigned-plans", "--json", *args, check=check)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def elf_dynamic(data: bytes) -> tuple[list[str], list[str], str | None]:
    """(DT_NEEDED, RUNPATH or RPATH entries, PT_INTERP) of an ELF file, via pyelftools."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    interp = None
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_INTERP":
            interp = segment.get_interp_name()
        elif segment["p_type"] == "PT_DYNAMIC":
            for tag in segment.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath += [p for p in tag.runpath.split(":") if p]
                elif tag.entry.d_tag == "DT_RPATH":
                    rpath += [p for p in tag.rpath.split(":") if p]
    return needed, runpath or rpath, interp


def parse_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as the kernel's depmod wrote it: name -> (relpath, names it needs)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if not line.strip():
            continue
        head, _, tail = line.partition(":")
        deps[module_name(head.strip())] = (head.strip(), [module_name(d) for d in tail.split()])
    return deps


def skip_if_agent_changed(before: str) -> None:
    """Skip when guest_init/ (hence the agent's cache key) changed while the test ran.

    Why: other work in the same tree edits the agent's sources; a refreeze between two
    builds is then correct behaviour, not a cache miss.  Call after the builds and before
    asserting on ``cached`` flags or on bytes that come from the frozen agent.
    """
    if agent_key() != before:
        pytest.skip("guest_init/ changed while the test ran: the agent was legitimately refrozen")


def plan_text(hostname: str) -> str:
    # Indented and with a trailing newline: the initrd must carry these exact bytes,
    # not a re-serialisation of the parsed document.
    return json.dumps(demo_plan(name="itest", label="sc-itest-root", hostname=hostname), indent=3) + "\n"


# ---------------------------------------------------------------------------
# One domain initrd from the shared cache, read back once for the module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepare-initrd")


@pytest.fixture(scope="module")
def plan_file(work) -> Path:
    path = work / "web1-plan.json"
    path.write_text(plan_text("web1"))
    return path


@pytest.fixture(scope="module")
def domain(work, plan_file, kernel):
    """The default (zstd) initrd of one domain: (json result, raw bytes, Archive)."""
    out = work / "web1.img"
    key = agent_key()
    result = build("--kernel", kernel.version, "--plan", str(plan_file), "-o", str(out))
    raw = out.read_bytes()
    skip_if_agent_changed(key)
    return result, raw, Archive(read_initrd(raw))


# ---------------------------------------------------------------------------
# Contents


def test_init_is_the_frozen_agent_executable(domain):
    _, _, archive = domain
    init = archive.by_name.get("init")
    assert init is not None and init.is_file, "no regular file 'init' at the archive root"
    assert init.mode & 0o111 == 0o111, f"init is not executable: mode {oct(init.mode)}"
    assert init.data[:4] == b"\x7fELF"
    internal = archive.by_name.get("_internal")
    assert internal is not None and internal.is_dir
    libpython = [n for n in archive.by_name if n.startswith("_internal/libpython3")]
    assert libpython, "no libpython in _internal/"
    assert archive.file(libpython[0]) is not None


def test_loader_is_at_its_interp_path_through_lib64(domain):
    _, _, archive = domain
    lib64 = archive.by_name.get("lib64")
    assert lib64 is not None and lib64.is_symlink and lib64.symlink_target == "usr/lib64"
    loader = archive.by_name.get(LOADER)
    assert loader is not None and loader.is_file and loader.mode & 0o111
    # The kernel execs init, whose PT_INTERP must name that very file.
    _, _, interp = elf_dynamic(archive.by_name["init"].data)
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    assert archive.resolve(interp) == LOADER


def test_libc_and_libz_are_in_a_system_library_dir(domain):
    _, _, archive = domain
    # libz: the PyInstaller bootloader needs it before _internal/ is on the library path.
    for soname in ("libc.so.6", "libz.so.1"):
        found = [d for d in SYSTEM_LIB_DIRS if archive.file(f"{d}/{soname}") is not None]
        assert found, f"{soname} is in none of {SYSTEM_LIB_DIRS}"
        data = archive.file(f"{found[0]}/{soname}").data
        assert data[:4] == b"\x7fELF"


@pytest.mark.parametrize("path,major,minor", [
    ("dev/console", 5, 1),
    ("dev/null", 1, 3),
    ("dev/urandom", 1, 9),
    ("dev/random", 1, 8),
    ("dev/kmsg", 1, 11),
])
def test_device_node(domain, path, major, minor):
    _, _, archive = domain
    node = archive.by_name.get(path)
    assert node is not None, f"{path} missing"
    assert stat.S_ISCHR(node.mode), f"{path} is not a character device: mode {oct(node.mode)}"
    assert (node.rdev_major, node.rdev_minor) == (major, minor)


@pytest.mark.parametrize("mount_point", ["proc", "sys", "dev", "run", "sysroot"])
def test_mount_point(domain, mount_point):
    _, _, archive = domain
    entry = archive.by_name.get(mount_point)
    assert entry is not None and entry.is_dir, f"/{mount_point} is not a directory in the initrd"


def test_ca_bundle(domain):
    _, _, archive = domain
    bundle = archive.file(CA_BUNDLE)
    assert bundle is not None, f"{CA_BUNDLE} missing"
    text = bundle.data.decode("ascii", "replace")
    assert text.count("-----BEGIN CERTIFICATE-----") > 10


def test_modules_load_order_satisfies_modules_dep(domain, kernel):
    _, _, archive = domain
    doc = json.loads(archive.file(MODULES_JSON).data)
    assert doc["kernel"] == kernel.version
    deps = parse_modules_dep(kernel.modules_dir)
    prefix = f"/lib/modules/{kernel.version}/"
    seen: set[str] = set()
    for item in doc["modules"]:
        path = item["path"]
        assert path.startswith(prefix), path
        relpath = path[len(prefix):]
        name = module_name(relpath)
        assert name in deps and deps[name][0] == relpath, f"{path} is not a module of {kernel.version}"
        missing = [d for d in deps[name][1] if d not in seen]
        assert not missing, f"{name} is loaded before its dependencies {missing}"
        entry = archive.file(path)
        assert entry is not None, f"{path} is listed in modules.json but not in the initrd"
        assert entry.data == (kernel.modules_dir / relpath).read_bytes(), f"{path} differs from the kernel's"
        seen.add(name)
    # Every module the default list asks for (unless compiled in) is there.
    builtin = {module_name(ln) for ln in (kernel.modules_dir / "modules.builtin").read_text().split()}
    wanted = [normalize(ln) for ln in (REPO / "initrd" / "modules.default").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    absent = [m for m in wanted if m not in seen and m not in builtin]
    assert not absent, f"default modules missing from modules.json: {absent}"


def test_plan_is_a_second_segment_after_the_compressed_base(domain, plan_file):
    result, raw, archive = domain
    base = Path(result["base"]["path"]).read_bytes()
    assert sniff(base) == "zstd"
    assert raw[:len(base)] == base, "the initrd does not start with the cached base, byte for byte"
    assert PLAN_IN_INITRD not in {e.name for e in read_initrd(base)}, "the plan is inside the base"
    tail = raw[len(base):]
    assert tail[:6] == b"070701", "no plain cpio archive right after the base"
    in_tail = {e.name: e for e in read_cpio(tail)}
    assert in_tail[PLAN_IN_INITRD].data == plan_file.read_bytes()
    # And the kernel's view of the whole initrd has the same bytes at that path.
    assert archive.file(PLAN_IN_INITRD).data == plan_file.read_bytes()


# ---------------------------------------------------------------------------
# ELF closure: what the guest's loader will need is all inside the archive


def _system_lookup(archive: Archive, soname: str) -> str | None:
    for directory in SYSTEM_LIB_DIRS:
        name = archive.resolve(f"{directory}/{soname}")
        if name is not None and archive.file(name) is not None:
            return name
    return None


def test_every_dt_needed_is_satisfied_inside_the_archive(domain):
    _, _, archive = domain
    init_interp = elf_dynamic(archive.by_name["init"].data)[2]
    assert archive.file(init_interp) is not None, f"PT_INTERP {init_interp} is not in the archive"
    # The loader is already mapped when libraries load; it satisfies its own soname.
    preloaded = {posixpath.basename(init_interp)}
    elf_files = [e for e in archive.entries if e.is_file and e.data[:4] == b"\x7fELF"
                 and not e.name.startswith("usr/lib/modules/")]
    assert len(elf_files) > 5
    unsatisfied = []
    for entry in elf_files:
        needed, runpath, _ = elf_dynamic(entry.data)
        origin = posixpath.dirname(entry.name)
        # The bootloader runs python with LD_LIBRARY_PATH=_internal: a bundled file looks
        # in its own directory and _internal first, then RUNPATH, then the system dirs.
        search = []
        if entry.name.startswith("_internal/"):
            search += [origin, "_internal"]
        search += [p.replace("$ORIGIN", "/" + origin).replace("${ORIGIN}", "/" + origin) for p in runpath]
        for soname in needed:
            if soname in preloaded:
                continue
            if any(archive.file(f"{d}/{soname}") is not None for d in search):
                continue
            if _system_lookup(archive, soname) is None:
                unsatisfied.append(f"{entry.name} needs {soname}")
    assert not unsatisfied, "\n".join(unsatisfied)


def test_init_needs_are_met_from_the_system_dirs_alone(domain):
    _, _, archive = domain
    needed, runpath, interp = elf_dynamic(archive.by_name["init"].data)
    assert "libz.so.1" in needed  # the premise: the bootloader links zlib
    assert not runpath, "the bootloader has a RUNPATH: revisit this test"
    missing = [s for s in needed if posixpath.basename(interp) != s and _system_lookup(archive, s) is None]
    assert not missing, f"init needs {missing} before _internal/ is on the path"
    # And what those system libraries need in turn, is there too.
    for soname in needed:
        lib = _system_lookup(archive, soname)
        for sub in elf_dynamic(archive.by_name[lib].data)[0]:
            assert sub == posixpath.basename(interp) or _system_lookup(archive, sub), \
                f"{lib} needs {sub}, not in a system dir"


# ---------------------------------------------------------------------------
# Cost, caching and the JSON result


def test_json_output(domain, work):
    result, raw, _ = domain
    assert result["output"] == str(work / "web1.img")
    assert result["size"] == len(raw) == (work / "web1.img").stat().st_size
    base = result["base"]
    base_bytes = Path(base["path"]).read_bytes()
    assert base["size"] == len(base_bytes)
    # ``files`` counts the base's entries (not the trailer).
    assert base["files"] == len(read_initrd(base_bytes))
    assert result["plan_segment"] == len(raw) - len(base_bytes) > 0
    assert base["compression"] == "zstd"
    assert result["plan_files"] >= 1


def test_domain_cost_is_its_plan(domain, work, kernel):
    result, _, _ = domain
    assert result["size"] - result["base"]["size"] == result["plan_segment"]
    # A second domain with another plan shares the same base; only the plan differs.
    other_plan = work / "web2-plan.json"
    other_plan.write_text(plan_text("web2-with-a-much-longer-hostname" * 20))
    key = agent_key()
    other = build("--kernel", kernel.version, "--plan", str(other_plan), "-o", str(work / "web2.img"))
    assert other["base"]["path"] == result["base"]["path"]
    assert other["base"]["cached"] is True
    assert other["size"] - other["base"]["size"] == other["plan_segment"]
    assert other["plan_segment"] > result["plan_segment"]
    assert Archive(read_initrd((work / "web2.img").read_bytes())).file(PLAN_IN_INITRD).data \
        == other_plan.read_bytes()
    # No plan: the initrd is the base itself.
    bare = build("--kernel", kernel.version, "-o", str(work / "bare.img"))
    skip_if_agent_changed(key)
    if other["base"]["key"] != result["base"]["key"]:
        pytest.skip("guest_init/ changed since the module's first build")
    assert bare["plan_segment"] == 0
    assert (work / "bare.img").read_bytes() == Path(bare["base"]["path"]).read_bytes()


def test_second_build_reuses_the_cached_base(work, plan_file, kernel):
    key = agent_key()
    first = build("--kernel", kernel.version, "--plan", str(plan_file), "-o", str(work / "a.img"))
    second = build("--kernel", kernel.version, "--plan", str(plan_file), "-o", str(work / "b.img"))
    skip_if_agent_changed(key)
    assert second["base"]["cached"] is True
    assert second["base"]["agent_cached"] is True
    assert second["base"]["key"] == first["base"]["key"]
    # Same inputs, same bytes.
    assert (work / "a.img").read_bytes() == (work / "b.img").read_bytes()


@pytest.mark.parametrize("method,magic", [
    ("none", b"070701"),
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
])
def test_compression_method(method, magic, work, plan_file, kernel):
    key = agent_key()
    out = work / f"web1-{method}.img"
    result = build("--kernel", kernel.version, "--plan", str(plan_file), "--compression", method,
                   "-o", str(out))
    reference = build("--kernel", kernel.version, "--plan", str(plan_file), "-o", str(work / "ref.img"))
    skip_if_agent_changed(key)
    raw = out.read_bytes()
    assert raw.startswith(magic), f"{method}: initrd starts with {raw[:6]!r}"
    assert result["base"]["compression"] == method
    assert result["size"] - result["base"]["size"] == result["plan_segment"]
    archive = Archive(read_initrd(raw))
    assert archive.file(PLAN_IN_INITRD).data == plan_file.read_bytes()
    # The same content, entry for entry, as the default (zstd) initrd of the same inputs.
    assert reference["base"]["compression"] == "zstd"
    zstd = read_initrd((work / "ref.img").read_bytes())
    assert [(e.name, e.mode, e.data) for e in archive.entries] == [(e.name, e.mode, e.data) for e in zstd]


def test_cold_build_freezes_once_then_reuses(tmp_path, monkeypatch, cli, kernel, plan_file):
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    kernel_root = kernel.modules_dir.parent.parent.parent  # <cache>/kernels/<version>
    assert kernel.vmlinuz.is_relative_to(kernel_root)
    (cache / "kernels" / kernel.version).symlink_to(kernel_root)
    monkeypatch.setenv("SUPERCHARGE_CACHE", str(cache))

    def run(out: Path) -> dict:
        proc = cli("prepare-initrd", "--allow-unsigned-plans", "--json", "--kernel", kernel.version, "--plan", str(plan_file),
                   "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    key = agent_key()
    first = run(tmp_path / "cold.img")
    assert first["base"]["cached"] is False
    assert first["base"]["agent_cached"] is False
    assert Path(first["base"]["path"]).parent == cache / "initrd"
    agents = [p for p in (cache / "agent").iterdir()]
    assert len(agents) == 1 and agents[0].is_dir(), f"expected one frozen agent, found {agents}"
    agent = agents[0]
    stamps = {p: p.stat().st_mtime_ns for p in (agent, agent / "init", agent / "_internal")}

    second = run(tmp_path / "warm.img")
    skip_if_agent_changed(key)
    assert second["base"]["cached"] is True
    assert second["base"]["agent_cached"] is True
    assert second["base"]["path"] == first["base"]["path"]
    # PyInstaller did not run again: the frozen tree was not replaced or touched.
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert list((cache / "agent").iterdir()) == [agent], "a second agent tree (or a temp dir) appeared"
    assert (tmp_path / "cold.img").read_bytes() == (tmp_path / "warm.img").read_bytes()
    # The kernel was used through the link, not copied into the private cache.
    assert (cache / "kernels" / kernel.version).is_symlink()
    assert Archive(read_initrd((tmp_path / "warm.img").read_bytes())).file(PLAN_IN_INITRD).data \
        == plan_file.read_bytes()
    leftovers = [n for n in os.listdir(cache / "initrd") if n.endswith(".tmp")]
    assert not leftovers, f"temporary files left in the cache: {leftovers}"
