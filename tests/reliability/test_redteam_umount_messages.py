"""`vnvdimm umount` run by root names the processes that keep a mount busy, with their
command lines: those are their owners' to choose. A user's process sits in root's mount
(--allow-other) with a command line full of a terminal's escape sequences (clear the screen,
set the window title, colours, a fake new line): root's umount names it without a single
control character. And the daemon itself is never named as what keeps its own mount busy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_kit import SMALL_E820, wait_for

from vnvdimm.mounts import fuse_mounts_under, lazy_unmount

pytestmark = pytest.mark.mount

NOBODY = 65534
HOSTILE_NAME = "\x1b[2J\x1b]0;pwned\x07\x1b[31mroot, run rm -rf /\x1b[0m\r\n\x9b6n"
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]


@pytest.fixture
def shared_mount(tmp_path: Path) -> Iterator[Path]:
    """Root's mount with --allow-other, at a mount point any user can reach."""
    if os.geteuid() != 0:
        pytest.skip("root's mount and another user's process: needs root")
    base = Path(tempfile.mkdtemp(prefix="vnvdimm-redteam-"))
    base.chmod(0o755)
    (base / "mnt").mkdir()
    (base / "topology.toml").write_text(SMALL_E820)
    try:
        res = subprocess.run([*VNVDIMM, "mount", str(base / "mnt"), "--state-dir", str(tmp_path / "state"),
                              "--config", str(base / "topology.toml"), "--allow-other"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        yield base / "mnt"
    finally:
        subprocess.run([*VNVDIMM, "umount", "--force", str(base / "mnt")], capture_output=True, timeout=120)
        for m in fuse_mounts_under(base):
            lazy_unmount(m)
        shutil.rmtree(base, ignore_errors=True)


def test_a_users_command_line_reaches_roots_terminal_without_control_characters(shared_mount: Path) -> None:
    code = f"import os; os.chdir({str(shared_mount)!r}); os.execv('/bin/sleep', [{HOSTILE_NAME!r}, '120'])"
    squatter = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                                 "/usr/bin/python3", "-c", code])
    try:
        wait_for(lambda: Path(f"/proc/{squatter.pid}/cmdline").read_bytes().startswith(b"\x1b"), 30, "nobody's exec")
        assert os.readlink(f"/proc/{squatter.pid}/cwd") == str(shared_mount)
        res = subprocess.run([*VNVDIMM, "umount", str(shared_mount)], capture_output=True, timeout=120)
        stderr = res.stderr.decode(errors="surrogateescape")
        assert res.returncode == 1, stderr
        assert f"cwd by pid {squatter.pid} (" in stderr, stderr  # named...
        assert "pwned" in stderr and "root, run rm -rf /" in stderr  # ...with what it says of itself...
        controls = [c for c in stderr if not c.isprintable() and c != "\n"]
        assert controls == [], stderr  # ...but not one control character of it
        assert "vnvdimm.cli mount" not in stderr  # the daemon is not its own mount's holder
        assert fuse_mounts_under(shared_mount) == [str(shared_mount)]
    finally:
        squatter.kill()
        squatter.wait()
