"""The state dir and the mount point as an attacker on the same host goes at them (issue 20):
root's state dir or mount point inside a directory the attacker can write, which the attacker
swaps for a link to a root-only directory (renameat2(RENAME_EXCHANGE) in a loop) while root
mounts, 20 times. Whatever the timing, nothing is ever written or mounted outside the state
dir and the mount point that were checked: the root-only decoy stays byte-identical (no lock,
platform.json, media or log appears in it), and no mount lands in it. The attacker is a real
unprivileged uid (nobody) where the directory is theirs; where it is root's, a thread of the
test plays the attacker that got a link of theirs there, to swap after the check."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mount_kit import exchange, needs_root
from reliability_kit import SMALL, e820

from vnvdimm.fuse import fusermount
from vnvdimm.mounts import fuse_mounts_under, lazy_unmount, wait_exit
from vnvdimm.umount import stop_mount

pytestmark = pytest.mark.mount

NEEDS_A_SECOND_USER = "the attacker is another user (nobody), whose links and directories only root can make"

VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]
NOBODY = 65534
MOUNTS = 20
def tree_digest(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under `root` (itself included): mode, owner, size, content hash or link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            content = (os.readlink(p) if stat.S_ISLNK(st.st_mode)
                       else hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "")
            out[os.path.normpath(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, content)
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(e820(*SMALL))
    return path


@pytest.fixture
def decoy(tmp_path: Path) -> Iterator[Path]:
    """A root-only directory (as /root) with what a redirected mount would use: a state dir
    (holding a lock, as the issue's did) and a mount point."""
    path = tmp_path / "decoy"
    (path / "state" / "labels").mkdir(parents=True)
    (path / "mnt").mkdir()
    (path / "state" / "lock").write_bytes(b"1\n")
    (path / "secret").write_bytes(b"root only\n" * 100)
    path.chmod(0o700)
    before = tree_digest(path)
    yield path
    assert not fuse_mounts_under(path), "a mount landed in the decoy"
    assert tree_digest(path) == before, "something was written in the decoy"


def mount(mnt: Path, state: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNVDIMM, "mount", str(mnt), "--state-dir", str(state), "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


class Swapper:
    """A thread that swaps two names for each other as fast as it can."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a, self.b = a, b
        self.swaps = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.is_set():
            exchange(self.a, self.b)
            self.swaps += 1

    def __enter__(self) -> Swapper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(30)
        if self.swaps % 2:
            exchange(self.a, self.b)  # back in place, for the teardown


def stop_any(where: list[Path]) -> None:
    """Unmount whatever vnvdimm mount is under `where` (the test's own mounts)."""
    for base in where:
        for m in fuse_mounts_under(base):
            stop_mount(Path(m), None)


@needs_root(NEEDS_A_SECOND_USER)
def test_a_swap_loop_on_the_state_dirs_parent_writes_nothing_outside(tmp_path: Path, decoy: Path, config: Path,
                                                                    figures: Any) -> None:
    """root's state dir in a directory of root's, where an attacker's link was put beside its
    parent: swapped during 20 mounts. A mount that meets the link is refused; one that does
    not writes everything into the directory it checked, wherever that is by then."""
    base = tmp_path / "base"
    (base / "parent").mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    (base / "evil").symlink_to(decoy)
    os.chown(base / "evil", NOBODY, NOBODY, follow_symlinks=False)
    real = os.open(base / "parent", os.O_RDONLY | os.O_DIRECTORY)  # the real parent, wherever it goes
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    outcomes = {"mounted": 0, "refused": 0}
    try:
        with Swapper(base / "parent", base / "evil") as swapper:
            for _ in range(MOUNTS):
                res = mount(mnt, base / "parent" / "state", config)
                if res.returncode == 0:
                    outcomes["mounted"] += 1
                    pid = int(Path(f"/proc/self/fd/{real}/state/lock").read_text().split()[0])
                    assert str(mnt) in fuse_mounts_under(mnt)
                    assert stop_mount(mnt, pid) == []
                else:
                    outcomes["refused"] += 1
                    assert "Traceback" not in res.stderr, res.stderr
                    assert "a symbolic link owned by nobody on the way to the state dir" in res.stderr, res.stderr
        assert swapper.swaps > 0
        figures.add(swaps=swapper.swaps, **outcomes)
    finally:
        stop_any([tmp_path])
        os.close(real)
    assert sum(outcomes.values()) == MOUNTS
    if outcomes["mounted"]:
        made = set(os.listdir(base / "parent" / "state"))
        assert {"lock", "platform.json", "region0.media", "region1.media", "vnvdimm.log"} <= made


@needs_root(NEEDS_A_SECOND_USER)
def test_a_swap_loop_on_the_mount_points_parent_mounts_nothing_elsewhere(tmp_path: Path, decoy: Path, config: Path,
                                                                        figures: Any) -> None:
    """The same for the mount point: fusermount3 looks the mount point up by path again, so a
    swap after the check can make the mount land in the decoy; the daemon sees it did not land
    on the directory it checked, detaches it and refuses."""
    base = tmp_path / "base"
    (base / "parent" / "mnt").mkdir(parents=True)
    (base / "parent").chmod(0o755)
    base.chmod(0o755)
    (base / "evil").symlink_to(decoy)
    os.chown(base / "evil", NOBODY, NOBODY, follow_symlinks=False)
    mnt = base / "parent" / "mnt"
    outcomes: dict[str, int] = {}
    try:
        with Swapper(base / "parent", base / "evil") as swapper:
            for i in range(MOUNTS):
                res = mount(mnt, tmp_path / "state", config)
                assert "Traceback" not in res.stderr, res.stderr
                assert not fuse_mounts_under(decoy), f"mount {i} landed in the decoy: {res.stderr}"
                if res.returncode == 0:
                    outcomes["mounted"] = outcomes.get("mounted", 0) + 1
                    pid = int((tmp_path / "state" / "lock").read_text().split()[0])
                    # Mounted on the checked directory, wherever the swap has put it now (a
                    # daemon whose mount moved away from its path may already have detached it).
                    for where in fuse_mounts_under(base):
                        assert where.endswith("/mnt"), where
                        stop_mount(Path(where), pid)
                    assert wait_exit(pid, 30)
                    continue
                # Refused: which check caught it depends on where the swap was at that moment
                # (the walk met the link; the path led to the decoy, where no mnt is; the mount
                # landed elsewhere and was undone; an earlier daemon's unmount, sent down the
                # swapped path, left its dead mount on the checked directory). Every refusal says
                # why, none is a traceback, and nothing lands in the decoy (checked above).
                assert res.stderr.startswith("vnvdimm: "), res.stderr
                if "changed between its check and the mount" in res.stderr:
                    reason = "landed elsewhere, undone"
                elif "a symbolic link owned by nobody on the way to the mount point" in res.stderr:
                    reason = "refused at the check"
                else:
                    reason = "refused otherwise"
                outcomes[reason] = outcomes.get(reason, 0) + 1
                # A refused mount leaves no daemon behind.
                holder = (tmp_path / "state" / "lock")
                if holder.exists() and holder.read_text().strip():
                    assert wait_exit(int(holder.read_text().split()[0]), 30)
        figures.add(swaps=swapper.swaps, **outcomes)
    finally:
        stop_any([tmp_path])
    assert sum(outcomes.values()) == MOUNTS, outcomes


@pytest.fixture
def attackers_dir() -> Iterator[Path]:
    """A directory of nobody's that root can be talked into using (0755, reachable by all)."""
    top = Path(tempfile.mkdtemp(prefix="vnvdimm-attack-"))
    top.chmod(0o755)
    shared = top / "shared"
    shared.mkdir(mode=0o755)
    os.chown(shared, NOBODY, NOBODY)
    try:
        yield shared
    finally:
        for m in fuse_mounts_under(top):
            lazy_unmount(m)
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


@contextlib.contextmanager
def swapping_as_nobody(a: Path, b: Path) -> Iterator[None]:
    """A child process, as nobody, swapping `a` and `b` until killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            while True:
                exchange(a, b)
        finally:
            os._exit(1)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@needs_root(NEEDS_A_SECOND_USER)
@pytest.mark.parametrize("what", ["state dir", "mount point"])
def test_an_unprivileged_attacker_swapping_in_their_own_directory_gets_nothing(attackers_dir: Path, decoy: Path,
                                                                               tmp_path: Path, config: Path,
                                                                               what: str) -> None:
    """The issue's attack as it was done: root's state dir (or mount point) in a directory
    the attacker (a real unprivileged uid) owns, swapped for their link to a root-only
    directory in a loop. Every one of 20 mounts is refused, naming that directory."""
    if os.geteuid() != 0:
        pytest.skip("root's mount against another uid needs root")
    parent = attackers_dir / "parent"
    (parent / "mnt").mkdir(parents=True)
    (parent / "state").mkdir(mode=0o700)
    os.chown(parent, NOBODY, NOBODY)
    (attackers_dir / "evil").symlink_to(decoy)
    os.chown(attackers_dir / "evil", NOBODY, NOBODY, follow_symlinks=False)
    (tmp_path / "mnt").mkdir()
    mnt, state = (tmp_path / "mnt", parent / "state") if what == "state dir" else (parent / "mnt", tmp_path / "s")
    with swapping_as_nobody(parent, attackers_dir / "evil"):
        for _ in range(MOUNTS):
            res = mount(mnt, state, config)
            assert res.returncode == 1, res.stderr
            assert "Traceback" not in res.stderr
            assert f"{attackers_dir}: owned by nobody, who could replace" in res.stderr or (
                f"{attackers_dir}/parent: owned by nobody" in res.stderr), res.stderr
            assert what in res.stderr and "choose one elsewhere" in res.stderr, res.stderr
    assert not fuse_mounts_under(attackers_dir.parent) and not fuse_mounts_under(tmp_path)


LANDING_OPTIONS = ["fsname=vnvdimm", "subtype=vnvdimm", "default_permissions"]


@contextlib.contextmanager
def checked_mount_point(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The mount point `tmp_path/mnt` and its directory opened as the daemon's check leaves it
    (the anchor); every mount left under `tmp_path` is detached after."""
    checked = tmp_path / "mnt"
    checked.mkdir()
    anchor = os.open(checked, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield checked, anchor
    finally:
        os.close(anchor)
        for m in fuse_mounts_under(tmp_path):
            lazy_unmount(m)


def mount_is_kept(checked: Path, anchor: int) -> None:
    """The mount lands on the checked directory and is kept (then unmounted)."""
    fd = fusermount.mount(str(checked), LANDING_OPTIONS, anchor)
    try:
        assert fuse_mounts_under(checked.parent) == [str(checked)]
    finally:
        fusermount.unmount(str(checked))
        os.close(fd)


def test_a_mount_that_lands_on_another_directory_is_undone(tmp_path: Path) -> None:
    """What the daemon does when fusermount3 mounts elsewhere than on the directory it
    checked (the swap above at its worst moment, made deterministic): the mount is detached,
    the /dev/fuse descriptor closed, and the message says what happened."""
    with checked_mount_point(tmp_path) as (checked, anchor):
        mount_is_kept(checked, anchor)  # first the good case
        # Then another directory put where the checked one was (moved away).
        os.rename(checked, tmp_path / "moved")
        (tmp_path / "mnt").mkdir()
        with pytest.raises(fusermount.FusermountError,
                           match=r"mnt: the mount point changed between its check and the mount \(the directory "
                                 r"checked is now at .*/moved\)"):
            fusermount.mount(str(checked), LANDING_OPTIONS, anchor)
        assert fuse_mounts_under(tmp_path) == []


def test_a_mount_that_reuses_a_freed_mount_id_is_still_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel gives a freed mount id to the next mount: a mount unmounted anywhere on the
    machine between the daemon's two looks at mountinfo (another user's test run, say) frees
    the id that its own mount then gets. That mount is still the one on the checked directory
    and must be kept. Made deterministic: the first look also lists, elsewhere, every id the
    new mount could get."""
    real = fusermount._mountinfo
    looks = 0

    def mountinfo_with_freed_ids() -> list[Any]:
        nonlocal looks
        looks += 1
        mounts = real()
        if looks > 1:
            return mounts
        used = {m.mount_id for m in mounts}
        root = mounts[0]
        freed = []
        for mount_id in range(1, max(used) + 1000):
            if mount_id not in used:
                line = (f"{mount_id} {root.mount_id} 0:99 / /elsewhere/{mount_id} rw - "
                        f"fuse.vnvdimm vnvdimm rw,user_id={os.geteuid()},group_id=0")
                freed.append(fusermount._Mount(line))
        return mounts + freed

    monkeypatch.setattr(fusermount, "_mountinfo", mountinfo_with_freed_ids)
    with checked_mount_point(tmp_path) as (checked, anchor):
        mount_is_kept(checked, anchor)
