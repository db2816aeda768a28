"""Helpers for the tests that use a real mount (tests/fs, tests/ndctl): paths of the small
topologies, raw attribute I/O with the errno, and snapshots of what the tree shows."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parent
WITH_VNVDIMM = TESTS.parent / "mountscripts" / "with-vnvdimm"

# The tests/conftest.py topology the mnt fixture mounts (test modules cannot import a conftest
# by name: tests/unit has one of its own).
SMALL_E820 = """\
template = "e820"
[memmap]
workers = 2
[[region]]
size = "256M"
namespace = { mode = "fsdax", map = "dev", align = "2M" }
[[region]]
size = "256M"
namespace = { mode = "devdax", map = "mem", align = "2M" }
"""


def have_ndctl() -> bool:
    return shutil.which("ndctl") is not None and shutil.which("daxctl") is not None


def fuse_mounts_under(prefix: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [p[1] for p in (line.split() for line in f) if p[2].startswith("fuse") and p[1].startswith(str(prefix))]


def root_conftest(config: pytest.Config) -> ModuleType:
    """tests/conftest.py as pytest loaded it (for its Mount class)."""
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == TESTS / "conftest.py":
            return plugin  # type: ignore[no-any-return]
    raise LookupError("tests/conftest.py is not loaded")

E820_BUS = "devices/platform/e820_pmem/ndbus0"
NFIT_BUS = "devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0"

# Binary extension files (large, per page) and values that move while a memmap initializes.
SKIP_CONTENT = {"kpageflags", "kpagecount", "records"}
VOLATILE = {"pages_done", "elapsed_us", "pages_per_sec", "memmap_state"}


def read(path: Path | str) -> bytes:
    """One open + one read of 4096 bytes, as ndctl reads an attribute."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def read_errno(path: Path | str) -> int | None:
    try:
        read(path)
    except OSError as e:
        return e.errno
    return None


def write(path: Path | str, data: bytes) -> int:
    """One open(O_WRONLY) + one write(), as ndctl writes an attribute."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def write_errno(path: Path | str, data: bytes) -> int | None:
    try:
        n = write(path, data)
    except OSError as e:
        return e.errno
    assert n == len(data) or (len(data) > 4096 and n == 4096), (path, data, n)
    return None


def snapshot(root: Path, *, volatile: bool = False) -> dict[str, object]:
    """Every entry under root: directories (as their sorted listing), symlink targets, and
    the content (or read errno) of every readable attribute. Write-only files are recorded
    by name only."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = sorted(dirnames + filenames)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out[os.path.join(rel, name)] = ("link", os.readlink(full))
                dirnames.remove(name)
        for name in filenames:
            full = os.path.join(dirpath, name)
            key = os.path.join(rel, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(full))
            elif not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o444 or name in SKIP_CONTENT:
                out[key] = ("mode", stat.S_IMODE(st.st_mode))
            elif name in VOLATILE and not volatile:
                out[key] = ("volatile",)
            else:
                try:
                    out[key] = read(full)
                except OSError as e:
                    out[key] = ("errno", e.errno)
    return out


def diff(before: dict[str, object], after: dict[str, object]) -> dict[str, tuple[object, object]]:
    keys = set(before) | set(after)
    return {k: (before.get(k), after.get(k)) for k in sorted(keys) if before.get(k) != after.get(k)}


def sync_memmaps(sys_root: Path) -> None:
    """Write 'sync' to every memmap_state: returns once every memmap is initialized."""
    for path in sys_root.glob("devices/**/memmap_state"):
        with contextlib.suppress(OSError):
            write(path, b"sync\n")


@contextlib.contextmanager
def mounted(request: pytest.FixtureRequest, config_text: str | None, *extra_args: str):  # type: ignore[no-untyped-def]
    """A mount for a whole module (tests that only read, or that restore what they change):
    the same Mount as the make_mount fixture, in a temp dir of this session, unmounted
    however the block exits."""
    Mount = root_conftest(request.config).Mount
    base = request.getfixturevalue("tmp_path_factory").mktemp(request.module.__name__.rsplit(".", 1)[-1])
    base.mkdir(parents=True, exist_ok=True)
    root = base / "mnt"
    root.mkdir()
    config = None
    if config_text is not None:
        config = base / "topology.toml"
        config.write_text(config_text)
    m = Mount(root, base / "state", config, list(extra_args))
    try:
        res = m.mount()
        assert res.returncode == 0, f"mount failed: {res.stderr}"
        yield m
    finally:
        m.umount()
