"""Root's commands pointed at a tree an unprivileged user made to look like a vnvdimm mount.

with-vnvdimm (and `vnvdimm run`) binds MNT/dev over /dev and MNT/sys over /sys for the command,
and `vnvdimm inject-error` writes to a control file it finds by following MNT's sysfs links.
A directory of nobody's with `sys/bus/nd`, `dev/pts` and `dev/shm` in it passes for a mount
by its looks alone; its `dev/pmem0` is a symbolic link to a root-only file. As root, a command
that writes /dev/pmem0 (mkfs, dd, ndctl's tests) then rewrote that file, and inject-error
wrote its request into whatever file nobody's links led to. Only a vnvdimm mount (the file
system type `fuse.vnvdimm`, with MNT, MNT/dev and MNT/sys on it) of root's or the caller's own
may be used: anything else is refused and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mount_kit import WITH_VNVDIMM

pytestmark = pytest.mark.mount

NOBODY = 65534
SECRET = b"root only\n" * 10


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the victim is root: needs root")


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def nobodys(tree: Path) -> None:
    """Hand `tree` to nobody, as if nobody had made it (links included)."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            os.lchown(Path(dirpath) / name, NOBODY, NOBODY)


def lookalike(tmp_path: Path, target: Path) -> Path:
    """What with-vnvdimm looked for (sys/bus/nd, dev/pts, dev/shm), and dev/pmem0 -> target."""
    tree = tmp_path / "lookalike"
    for sub in ("sys/bus/nd", "dev/pts", "dev/shm"):
        (tree / sub).mkdir(parents=True)
    (tree / "dev" / "pmem0").symlink_to(target)
    nobodys(tree)
    return tree


def with_vnvdimm(mnt: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    # No loop devices: a regression here must not leave one bound to the victim.
    env = {**os.environ, "VNVDIMM_BLOCKDEVS": "0"}
    return subprocess.run([str(WITH_VNVDIMM), str(mnt), "--", *cmd], capture_output=True, text=True, timeout=60,
                          env=env)


def test_root_runs_nothing_in_a_users_lookalike_tree(tmp_path: Path) -> None:
    secret = victim(tmp_path)
    tree = lookalike(tmp_path, secret)
    res = with_vnvdimm(tree, "sh", "-c", "echo overwritten > /dev/pmem0")
    assert res.returncode != 0
    assert f"{tree} is not a vnvdimm mount" in res.stderr
    assert secret.read_bytes() == SECRET


def test_root_takes_no_users_sys_beside_a_real_mounts_dev(tmp_path: Path, mnt) -> None:  # type: ignore[no-untyped-def]
    """MNT/dev is a real mount's (so its device number is FUSE's), MNT/sys is nobody's."""
    tree = tmp_path / "halfway"
    (tree / "sys" / "bus" / "nd").mkdir(parents=True)
    (tree / "sys" / "planted").write_text("nobody's\n")
    (tree / "dev").symlink_to(mnt.dev)
    nobodys(tree)
    res = with_vnvdimm(tree, "cat", "/sys/planted")
    assert res.returncode != 0
    assert "nobody's" not in res.stdout
    assert "is not a vnvdimm mount" in res.stderr


def test_a_real_mount_still_works(mnt) -> None:  # type: ignore[no-untyped-def]
    res = with_vnvdimm(mnt.root, "cat", "/sys/bus/nd/devices/region0/size")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) > 0


def test_inject_error_writes_nothing_through_a_users_links(tmp_path: Path) -> None:
    """inject-error follows namespaceX.Y to its region and bus; here nobody's links lead its
    write to root's file."""
    secret = victim(tmp_path)
    tree = tmp_path / "lookalike"
    bus = tree / "bus0"
    (bus / "region0" / "namespace0.0").mkdir(parents=True)
    (bus / "vnvdimm").mkdir()
    (bus / "vnvdimm" / "inject_error").symlink_to(secret)
    (tree / "sys" / "bus" / "nd" / "devices").mkdir(parents=True)
    (tree / "sys" / "bus" / "nd" / "devices" / "namespace0.0").symlink_to(bus / "region0" / "namespace0.0")
    nobodys(tree)
    res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "inject-error", str(tree), "namespace0.0", "-B", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "not a vnvdimm mount" in res.stderr
    assert secret.read_bytes() == SECRET



def test_blockdevs_binds_nothing_over_a_users_links(tmp_path: Path) -> None:
    """with-vnvdimm's helper `vnvdimm blockdevs MNT -- CMD`, run by root on nobody's tree:
    it attached a loop device to what dev/pmem0 linked to and bound it over that file, in
    root's own mount namespace (the helper is meant to run in with-vnvdimm's private one)."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here")
    secret = victim(tmp_path)
    tree = lookalike(tmp_path, secret)
    (tree / "sys" / "block" / "pmem0").mkdir(parents=True)
    (tree / "sys" / "block" / "pmem0" / "ro").write_text("0\n")
    nobodys(tree)
    try:
        res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "blockdevs", str(tree), "--", "sh", "-c",
                              f"echo overwritten > {tree / 'dev' / 'pmem0'}"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert "is not a vnvdimm mount" in res.stderr, res.stderr
        assert not mounted_at(secret)
        assert secret.read_bytes() == SECRET
    finally:
        while mounted_at(secret):  # what the attack left: a loop device bound over root's file
            subprocess.run(["umount", "-l", str(secret)], capture_output=True, timeout=60)


def mounted_at(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.mark.parametrize("command", [["status"], ["wait", "-t", "5"]])
def test_status_and_wait_print_nothing_of_a_users_tree(tmp_path: Path, command: list[str]) -> None:
    """nobody's tree's attributes hold a terminal's escape sequences (window title, clear
    screen, colours): root's status printed them as they were."""
    bus = tmp_path / "lookalike" / "sys" / "bus" / "nd" / "devices" / "ndbus0"
    (bus / "region0" / "namespace0.0").mkdir(parents=True)
    (tmp_path / "lookalike" / "dev").mkdir()
    (bus / "provider").write_bytes(b"\x1b]0;pwned\x07\x1b[2J\x1b[31mEVIL\n")
    (bus / "region0" / "size").write_text("4096\n")
    (bus / "region0" / "namespace0.0" / "size").write_text("4096\n")
    (bus / "region0" / "namespace0.0" / "mode").write_bytes(b"\x1b[31mRED\n")
    nobodys(tmp_path / "lookalike")
    res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", command[0], str(tmp_path / "lookalike"), *command[1:]],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "\x1b" not in res.stdout + res.stderr
    assert "not a vnvdimm mount of root's or yours" in res.stderr, res.stderr
