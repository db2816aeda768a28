"""Shared fixtures: real FUSE mounts in temp dirs that are always unmounted, and a check
that the suite leaves no mount, daemon or shared-memory segment behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mount_kit import SMALL_E820, WITH_VNVDIMM, fuse_mounts_under

from vnvdimm.daemon import stop_mount

REPO = Path(__file__).resolve().parent.parent
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]


SMALL_NFIT = """\
template = "nfit"
[memmap]
workers = 2
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[dimm]]
size = "512M"
[[region]]
dimms = [0, 1]
namespaces = [ { size = "256M", mode = "fsdax", map = "dev" } ]
[[region]]
dimms = [2, 3]
"""


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
        return res

    def umount(self) -> None:
        stop_mount(self.root, self.pid)
        self.pid = None

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

    def run(self, *cmd: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """CMD inside a private mount namespace where this mount is /sys and /dev."""
        return subprocess.run([str(WITH_VNVDIMM), str(self.root), "--", *cmd], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def ndctl(self, *args: str) -> object:
        res = self.run("ndctl", *args)
        assert res.returncode == 0, f"ndctl {' '.join(args)}: rc {res.returncode}: {res.stderr}"
        return json.loads(res.stdout) if res.stdout.strip() else None


@pytest.fixture
def make_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """make_mount(config_text=None, *extra_args, state_dir=None, mount=True) -> Mount."""
    made: list[Mount] = []

    def factory(config_text: str | None = SMALL_E820, *extra_args: str, state_dir: Path | None = None,
                mount: bool = True) -> Mount:
        n = len(made)
        root = tmp_path / f"mnt{n}"
        root.mkdir()
        config = None
        if config_text is not None:
            config = tmp_path / f"topology{n}.toml"
            config.write_text(config_text)
        m = Mount(root, state_dir or tmp_path / f"state{n}", config, list(extra_args))
        made.append(m)
        if mount:
            res = m.mount()
            assert res.returncode == 0, f"mount failed: {res.stderr}"
        return m

    try:
        yield factory
    finally:
        for m in made:
            m.umount()


@pytest.fixture
def mnt(make_mount: Callable[..., Mount]) -> Mount:
    """The small e820 topology (fsdax map=dev + devdax map=mem, 256 MiB each), mounted."""
    return make_mount()


@pytest.fixture
def nfit_mnt(make_mount: Callable[..., Mount]) -> Mount:
    return make_mount(SMALL_NFIT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left vnvdimm daemons or FUSE mounts of its own behind. Only this
    session's (under its basetemp): other test runs may be mounting at the same time, and
    unmounting theirs would break them."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = factory.getbasetemp().resolve()
    leftovers = fuse_mounts_under(base)
    daemons = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"vnvdimm.cli" in b" ".join(cmd) and b"mount" in cmd and str(base).encode() in b" ".join(cmd):
                daemons.append(pid)
    if leftovers or daemons:
        for m in leftovers:
            subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        print(f"\nvnvdimm tests left behind: mounts {leftovers}, daemons {daemons}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
