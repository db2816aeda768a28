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


def test_a_parent_swapped_during_umount_unmounts_nothing_else(make_mount, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Root unmounts a/mnt. Whoever can rename a/ (its owner: here a thread of the test plays
    them) swaps it for a link to b/, where another mount of root's is, while umount looks
    for the mount's holders (a scan of every process: a window of its own). umount then
    unmounts what a/mnt names at the end, b/mnt. It must unmount the mount it checked
    (a.old/mnt after the swap), and leave b/mnt alone."""
    if os.geteuid() != 0:
        pytest.skip("root's umount: needs root")
    from vnvdimm import mounts, umount

    a, b = make_mount(), make_mount()
    # Binds of the two mounts stand for mounts under a/ and b/ (what umount is given is a
    # path through a/, a directory its owner can rename).
    target_a = tmp_path / "a" / "mnt"
    target_b = tmp_path / "b" / "mnt"
    target_a.mkdir(parents=True)
    target_b.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(a.root), str(target_a)], check=True)
    subprocess.run(["mount", "--bind", str(b.root), str(target_b)], check=True)
    try:
        real_holders = mounts.holders
        swapped = []

        def holders_while_swapping(*args: object, **kwargs: object) -> list[mounts.Holder]:
            found = real_holders(*args, **kwargs)  # type: ignore[arg-type]
            if not swapped:
                os.rename(tmp_path / "a", tmp_path / "a.old")
                os.symlink(tmp_path / "b", tmp_path / "a")
                swapped.append(True)
            return found

        monkeypatch.setattr(umount, "holders", holders_while_swapping)
        umount.umount(target_a, "lazy", timeout=5, out=sys.stderr)
        assert swapped
        table = [e.mountpoint for e in mounts.mount_table()]
        assert str(target_b) in table, "umount unmounted the mount the swapped path led to"
        assert str(tmp_path / "a.old" / "mnt") not in table, "umount left the mount it checked"
    finally:
        for p in (tmp_path / "a.old" / "mnt", target_b, target_a):
            while str(p) in [e.mountpoint for e in mounts.mount_table()]:
                subprocess.run(["umount", "-l", str(p)], capture_output=True, timeout=60)
