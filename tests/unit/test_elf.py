"""Shared-library closure of a frozen tree, checked against real host binaries."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dom0.elf import DEFAULT_SYSTEM_DIRS, library_closure, read_elf
from dom0.errors import UserError

pytestmark = pytest.mark.unit

LOADER = "/lib64/ld-linux-x86-64.so.2"


def host_python() -> Path:
    """A dynamically linked executable of this host to play the bootloader."""
    for candidate in (Path("/usr/bin/python3.11"), Path(sys.executable).resolve()):
        info = read_elf(candidate) if candidate.is_file() else None
        if info is not None and info.interp and "libc.so.6" in info.needed:
            return candidate
    pytest.skip("no dynamically linked python executable on this host")


def find_system(soname: str) -> Path:
    for d in DEFAULT_SYSTEM_DIRS:
        if (d / soname).is_file():
            return d / soname
    pytest.skip(f"{soname} not on this host")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "agent"
    (root / "_internal").mkdir(parents=True)
    shutil.copy2(host_python(), root / "init")
    return root


def test_executable_closure(tree: Path) -> None:
    plan = library_closure(tree, tree / "init")
    sonames = plan.sonames()
    assert {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"} <= sonames
    assert plan.interpreter == LOADER
    assert LOADER in plan.dests()
    assert plan.missing == []
    for lib in plan.libraries:
        assert lib.source.is_file() and not lib.source.is_symlink()
        assert lib.dest.startswith("/") and lib.dest.endswith("/" + lib.soname)
        assert lib.needed_by
    libc = next(lib for lib in plan.libraries if lib.soname == "libc.so.6")
    assert "init" in libc.needed_by
    assert plan.dests() == sorted(plan.dests())
    assert len(plan.dests()) == len(set(plan.dests()))


def test_closure_property(tree: Path) -> None:
    """Every DT_NEEDED of every copied library is itself in the plan."""
    plan = library_closure(tree, tree / "init", extra_sonames=["libgcc_s.so.1"])
    sonames = plan.sonames()
    for lib in plan.libraries:
        info = read_elf(lib.source)
        assert info is not None, lib.source
        for needed in info.needed:
            assert needed in sonames, f"{lib.dest} needs {needed}"


def test_bundled_library_not_duplicated_for_tree_files(tree: Path) -> None:
    """A bundled libz satisfies files in _internal, but not the bootloader."""
    libz = find_system("libz.so.1")
    shutil.copy2(libz, tree / "_internal" / "libz.so.1")
    ext = tree / "_internal" / "lib-dynload" / "zlib.cpython-311-x86_64-linux-gnu.so"
    ext.parent.mkdir()
    shutil.copy2(host_python(), ext)  # an ELF file in the tree that needs libz.so.1
    with_exe = library_closure(tree, tree / "init")
    assert "libz.so.1" in with_exe.sonames()  # init needs libz before _internal is searched
    zlib_lib = next(lib for lib in with_exe.libraries if lib.soname == "libz.so.1")
    assert zlib_lib.needed_by == ["init"]  # the extension found the bundled one
    assert [lib.soname for lib in with_exe.libraries].count("libz.so.1") == 1
    libc = next(lib for lib in with_exe.libraries if lib.soname == "libc.so.6")
    assert "_internal/libz.so.1" in libc.needed_by


def test_bundled_library_satisfies_tree_files(tmp_path: Path) -> None:
    """With a bootloader that does not need libz, the bundled libz is enough."""
    true = Path(shutil.which("true") or "/usr/bin/true").resolve()
    if read_elf(true) is None or read_elf(true).needed != ("libc.so.6",):
        pytest.skip("need a 'true' that links only libc")
    tree = tmp_path / "agent"
    (tree / "_internal").mkdir(parents=True)
    shutil.copy2(true, tree / "init")
    shutil.copy2(find_system("libz.so.1"), tree / "_internal" / "libz.so.1")
    shutil.copy2(host_python(), tree / "_internal" / "needs_z.so")
    plan = library_closure(tree, tree / "init")
    assert "libz.so.1" not in plan.sonames()
    assert "libm.so.6" in plan.sonames()  # not bundled: copied for the tree file
    libm = next(lib for lib in plan.libraries if lib.soname == "libm.so.6")
    assert "_internal/needs_z.so" in libm.needed_by
    assert plan.missing == []


def test_extra_sonames_added(tree: Path) -> None:
    plan = library_closure(tree, tree / "init", extra_sonames=["libgcc_s.so.1"])
    gcc = next(lib for lib in plan.libraries if lib.soname == "libgcc_s.so.1")
    assert gcc.needed_by == ["extra_sonames"]
    assert gcc.source == find_system("libgcc_s.so.1").resolve()


def test_missing_soname_reported(tree: Path) -> None:
    plan = library_closure(tree, tree / "init", extra_sonames=["libdoes-not-exist.so.7"])
    assert ("libdoes-not-exist.so.7", "extra_sonames") in plan.missing


def test_system_dirs_restrict_search(tree: Path) -> None:
    plan = library_closure(tree, tree / "init", system_dirs=[tree.parent / "nowhere"])
    assert ("libc.so.6", "init") in plan.missing
    assert plan.interpreter == LOADER  # the loader comes from PT_INTERP, not the search path


def test_non_elf_and_broken_files_ignored(tree: Path) -> None:
    (tree / "_internal" / "base_library.zip").write_bytes(b"PK\3\4 not elf")
    (tree / "_internal" / "broken.so").write_bytes(b"\x7fELF\2\1\1" + b"\0" * 9 + b"\3\0\x3e\0" + b"\xff" * 40)
    plan = library_closure(tree, tree / "init")
    assert plan.missing == []


def test_same_directory_search(tree: Path) -> None:
    """A tree file finds a dependency in its own directory inside the bundle."""
    sub = tree / "_internal" / "pkg"
    sub.mkdir()
    shutil.copy2(find_system("libz.so.1"), sub / "libz.so.1")
    shutil.copy2(host_python(), sub / "tool")
    plan = library_closure(tree, tree / "init")
    libz = next(lib for lib in plan.libraries if lib.soname == "libz.so.1")
    assert libz.needed_by == ["init"]  # _internal/pkg/tool found its libz beside it


def compile_so(cc: str, out: Path, source: str, *args: str) -> None:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src), *args], check=True,
                   capture_output=True)


def test_runpath_origin(tree: Path, tmp_path: Path) -> None:
    """$ORIGIN in RUNPATH points into the tree: the dependency is not copied."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a library with a RUNPATH")
    vendor = tree / "_internal" / "pkg.libs"
    vendor.mkdir()
    compile_so(cc, vendor / "libvendored.so.1", "int vendored(void) { return 1; }",
               "-Wl,-soname,libvendored.so.1")
    ext_dir = tree / "_internal" / "pkg"
    ext_dir.mkdir()
    compile_so(cc, ext_dir / "ext.so", "int vendored(void); int ext(void) { return vendored(); }",
               f"-L{vendor}", "-l:libvendored.so.1", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../pkg.libs")
    assert read_elf(ext_dir / "ext.so").runpath == ("$ORIGIN/../pkg.libs",)
    plan = library_closure(tree, tree / "init")
    assert "libvendored.so.1" not in plan.sonames()
    assert plan.missing == []
    # without the RUNPATH it would be missing
    compile_so(cc, ext_dir / "ext.so", "int vendored(void); int ext(void) { return vendored(); }",
               f"-L{vendor}", "-l:libvendored.so.1")
    assert ("libvendored.so.1", "_internal/pkg/ext.so") in library_closure(tree, tree / "init").missing


def test_not_an_executable(tmp_path: Path) -> None:
    (tmp_path / "init").write_text("#!/bin/sh\n")
    with pytest.raises(UserError, match="not an ELF"):
        library_closure(tmp_path, tmp_path / "init")
