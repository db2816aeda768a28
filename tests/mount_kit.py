"""Helpers for the tests that use a real mount (tests/fs, tests/ndctl): paths of the small
topologies, raw attribute I/O with the errno, and snapshots of what the tree shows."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kernel_oracle as K
import numpy as np
import pytest
from topologies import SMALL_E820  # noqa: F401 (tests take it from here too)

from vnvdimm.mounts import describe, fuse_mounts_under, pids, process_alive, process_group_of
from vnvdimm.umount import stop_mount

TESTS = Path(__file__).resolve().parent
# The users the tests created (name -> uid), for the leak check: each must be gone after its
# test, and hold no keys.
TEST_USERS: dict[str, int] = {}
WITH_VNVDIMM = TESTS.parent / "mountscripts" / "with-vnvdimm"
# The vnvdimm under test (this checkout), whether or not its venv is on the PATH.
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): the two names swap what they point at, atomically (the
    attacker's move in the state-dir and mount-point swap tests)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip the test for an ordinary user, saying what only root has (the suite is run by
    users too: their run must end without failures and say what it left out)."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root: {why}")


# What tests that put a file system on /dev/pmemN need (with-vnvdimm's loop devices, mount).
ROOT_BLOCK_DEVICES = ("/dev/pmemN is a real block device (a loop device) only for root; an ordinary user's "
                      "with-vnvdimm runs in a user namespace, without losetup, mkfs.ext4 on it or mount")


def have_ndctl() -> bool:
    return shutil.which("ndctl") is not None and shutil.which("daxctl") is not None


# Every mount a test made and has not unmounted yet: what the watchdog looks after.
LIVE_MOUNTS: list[Mount] = []


class Mount:
    """A vnvdimm mount made by the test: root, sys and dev paths, and helpers."""

    def __init__(self, root: Path, state_dir: Path, config: Path | None, extra_args: list[str]) -> None:
        self.root = root
        self.state_dir = state_dir
        self.config = config
        self.extra_args = extra_args
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.pid: int | None = None

    # -- lifecycle
    def mount(self) -> subprocess.CompletedProcess[str]:
        args = [*VNVDIMM, "mount", str(self.root), "--state-dir", str(self.state_dir), *self.extra_args]
        if self.config is not None:
            args += ["--config", str(self.config)]
        res = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            self.pid = int((self.state_dir / "lock").read_text().split()[0])
            LIVE_MOUNTS.append(self)
        return res

    def umount(self, force: bool = False) -> None:
        """Unmount by `vnvdimm umount`'s rules: a mount with device files still in use is only
        detached (its daemon serves them until they are closed) and fails the test; `force`:
        `vnvdimm umount --force` (the test killed their users itself)."""
        busy = stop_mount(self.root, self.pid, force=force)
        self.pid = None
        if self in LIVE_MOUNTS:
            LIVE_MOUNTS.remove(self)
        assert not busy, f"{self.root}: device files still in use at teardown (detached):" + describe(busy)

    def is_mounted(self) -> bool:
        return str(self.root) in fuse_mounts_under(self.root)

    def remount(self) -> None:
        self.umount()
        res = self.mount()
        assert res.returncode == 0, res.stderr

    # -- access
    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str:
        return self.path(rel).read_text()

    def write(self, rel: str, data: bytes) -> int:
        fd = os.open(self.path(rel), os.O_WRONLY)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def run(self, *cmd: str, check: bool = False, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """CMD inside a private mount namespace where this mount is /sys and /dev."""
        return subprocess.run([str(WITH_VNVDIMM), str(self.root), "--", *cmd], capture_output=True, text=True,
                              timeout=timeout, check=check, env=env)

    def ndctl(self, *args: str) -> object:
        res = self.run("ndctl", *args)
        assert res.returncode == 0, f"ndctl {' '.join(args)}: rc {res.returncode}: {res.stderr}"
        return json.loads(res.stdout) if res.stdout.strip() else None


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


# ---------------------------------------------------------------- the memmap_state invariant


def _device_dir(root: Path | str, dev: str) -> Path:
    """`dev` as a directory of the mount at root: a name ("pfn0.1"), a path relative to the
    mount ("sys/bus/nd/devices/pfn0.1") or an absolute path."""
    path = Path(dev)
    if path.is_absolute():
        return path
    if "/" not in dev:
        return Path(root) / "sys" / "bus" / "nd" / "devices" / dev
    return Path(root) / dev.lstrip("/")


def _view(d: Path, name: str, dtype: object) -> np.ndarray:
    with open(d / "memmap" / name, "rb") as f:
        return np.frombuffer(f.read(), dtype=dtype)  # type: ignore[call-overload,no-any-return]


def expected_memmap(d: Path) -> np.ndarray:
    """The records the device at d must hold once its memmap is initialized, from its sysfs
    geometry and the kernel's formulas (kernel_oracle), not from vnvdimm's initializer."""
    start_pfn = int((d / "memmap" / "start_pfn").read_text(), 16)
    npages = int((d / "memmap" / "kpageflags").stat().st_size) // 8
    on_media = (d / "mode").read_text().strip() == "pmem"
    data_page = int((d / "resource").read_text(), 16) // 4096 - start_pfn
    nid = int((d / "numa_node").read_text())
    return K.device_memmap(start_pfn, npages, nid=nid, on_media=on_media, data_page=data_page)


def memmap_state(root: Path | str, dev: str) -> str:
    """memmap_state of a pfn/dax device ("active" or "idle", without the newline), checked
    against what it promises at that moment:

    * ``idle``: every page record of the device is initialized (no KPF_NOPAGE in kpageflags
      past the reserve), ``pages_done == pages_total``, and the records equal the kernel's
      (kernel_oracle, computed here from the device's geometry).
    * ``active``: progress and kpageflags read *before* the state show pages still to go.
      Initialization only moves forward while the device stays enabled, and vnvdimm marks
      pages initialized together with its progress count, so a device that showed every page
      done before reading ``active`` has an ``idle`` that came too late.

    Every test that reads memmap_state reads it through here (the test must not unbind or
    rebind the device at the same time)."""
    d = _device_dir(root, dev)
    done_before = int((d / "memmap" / "pages_done").read_text())
    total_before = int((d / "memmap" / "pages_total").read_text())
    flags_before = _view(d, "kpageflags", "<u8")
    state = (d / "memmap_state").read_text()
    assert state in ("active\n", "idle\n"), f"{d.name}: memmap_state reads {state!r}"
    state = state.strip()
    if total_before == 0 and state == "idle" and not flags_before.size:
        return state  # not enabled: no memmap
    reserve = 2 if (d / "mode").read_text().strip() == "pmem" else 0
    nopage = np.uint64(1 << K.KPF_NOPAGE)
    if state == "active" and total_before == 0:
        return memmap_state(root, dev)  # enabled while we looked: look again
    if state == "active":
        missing = int(((flags_before[reserve:] & nopage) != 0).sum())
        assert done_before < total_before, \
            f"{d.name}: memmap_state active after pages_done read {done_before} of {total_before}"
        assert missing > 0, f"{d.name}: memmap_state active after kpageflags showed every page initialized"
        return state
    done = int((d / "memmap" / "pages_done").read_text())
    total = int((d / "memmap" / "pages_total").read_text())
    assert total > 0 and done == total, f"{d.name}: memmap_state idle at pages_done {done} of {total}"
    flags = _view(d, "kpageflags", "<u8")
    missing = np.nonzero((flags[reserve:] & nopage) != 0)[0]
    assert missing.size == 0, (f"{d.name}: memmap_state idle with {missing.size} of {flags.size - reserve} pages "
                               f"not initialized (KPF_NOPAGE), first page {missing[0] + reserve}")
    records = _view(d, "records", K.STRUCT_PAGE)
    want = expected_memmap(d)
    assert records.size == want.size == flags.size, (d.name, records.size, want.size, flags.size)
    differ = np.nonzero(records[reserve:].view("V64") != want[reserve:].view("V64"))[0]
    assert differ.size == 0, (f"{d.name}: memmap_state idle, {differ.size} of {records.size - reserve} records "
                              f"differ from the kernel's, first page {differ[0] + reserve}")
    want_flags = K.kpageflags_of_initialized(want[reserve:])
    bad_flags = np.nonzero(flags[reserve:] != want_flags)[0]
    assert bad_flags.size == 0, \
        f"{d.name}: kpageflags of page {bad_flags[0] + reserve} is {int(flags[reserve + bad_flags[0]]):#x}"
    return state


# ---------------------------------------------------------------- processes


alive = process_alive  # True while pid runs (a zombie has exited)


def children(pid: int) -> list[int]:
    """Live child processes of pid (every thread's children)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return sorted(c for c in set(out) if alive(c))


def process_group(pgid: int) -> list[int]:
    """Live processes whose process group is pgid (the daemon and its workers)."""
    return sorted(pid for pid in pids() if process_group_of(pid) == pgid and process_alive(pid))


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.01,
             report: Callable[[], str] | None = None) -> Any:
    """pred()'s first truthy value, or fail after timeout seconds (with report() if given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f": {report()}" if report else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


def memfds(pids: list[int]) -> dict[str, set[int]]:
    """The memfds the processes hold, by name (without the "memfd:" prefix): as an open file
    descriptor (/proc/PID/fd) or as a mapping (/proc/PID/maps: a mapping outlives its fd).
    Values: the pids holding it."""
    out: dict[str, set[int]] = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/memfd:"):
                        out.setdefault(target[len("/memfd:"):].removesuffix(" (deleted)"), set()).add(pid)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError), \
                open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/memfd:"):
                    name = fields[5].strip()[len("/memfd:"):].removesuffix(" (deleted)")
                    out.setdefault(name, set()).add(pid)
    return out


def daemon_tree(pid: int | None) -> list[int]:
    """A mount's daemon and its live children (the memmap workers)."""
    return [] if pid is None or not alive(pid) else [pid, *children(pid)]


# Why the tests that count a mount's waiting requests (fuse_waiting) need root.
ROOT_FUSECTL = "counts the mount's waiting requests in fusectl, which only root can mount"


def fuse_waiting(m: Any) -> int:
    """Requests of this mount the daemon has not answered yet (fusectl's `waiting`, read in a
    private mount namespace so the host is left as it is)."""
    conn = os.stat(m.root).st_dev
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          "mount -t fusectl none /sys/fs/fuse/connections && "
                          f"cat /sys/fs/fuse/connections/{conn}/waiting"], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)
