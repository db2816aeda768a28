"""The state dir is safe to use as root and provisioning is all or nothing: a mount refuses a
state dir with planted symbolic links (their targets untouched), loose modes or another
owner; what it creates is 0700/0600; a first mount that fails leaves nothing that blocks the
next one; the mount's own errors say what to do."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mount_kit import SMALL_E820
from topologies import SMALL_NFIT

from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER, LabelArea
from vnvdimm.model.media import Media
from vnvdimm.safe_files import write_atomically

VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]

def digest(path: Path) -> tuple[str, float, int]:
    st = os.stat(path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime, stat.S_IMODE(st.st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the state dir that a planted link points at (root-only, as /etc/shadow)."""
    path = tmp_path / "elsewhere" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"root only\n" * 100)
    path.chmod(0o600)
    return path


def test_what_a_mount_creates_is_private(make_mount: Callable[..., Any]) -> None:
    m = make_mount(SMALL_NFIT)
    state = m.state_dir
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "labels").st_mode) == 0o700
    files = ["lock", "platform.json", "vnvdimm.log", "region0.media", "region1.media",
             *(f"labels/nmem{d}.lsa" for d in range(4))]
    assert {f: stat.S_IMODE(os.stat(state / f).st_mode) for f in files} == dict.fromkeys(files, 0o600)
    assert not (state / ".provisioning").exists()


@pytest.mark.parametrize("name", ["lock", ".platform.json.tmp", "vnvdimm.log", "platform.json", "region0.media",
                                  "labels"])
def test_a_planted_symlink_is_refused_and_its_target_untouched(make_mount: Callable[..., Any], victim: Path,
                                                               name: str) -> None:
    m = make_mount(SMALL_E820, mount=False)
    m.state_dir.mkdir(mode=0o700)
    before = digest(victim)
    (m.state_dir / name).symlink_to(victim)
    res = m.mount()
    assert res.returncode != 0 and not m.is_mounted()
    assert f"{m.state_dir / name}: a symbolic link" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert digest(victim) == before


def test_a_media_symlink_of_the_right_size_is_not_served(make_mount: Callable[..., Any], victim: Path) -> None:
    m = make_mount(SMALL_E820)
    m.umount()
    size = (m.state_dir / "region0.media").stat().st_size
    os.truncate(victim, size)
    before = digest(victim)
    (m.state_dir / "region0.media").unlink()
    (m.state_dir / "region0.media").symlink_to(victim)
    res = m.mount()
    assert res.returncode != 0 and not m.is_mounted()
    assert "region0.media: a symbolic link" in res.stderr, res.stderr
    assert digest(victim) == before


@pytest.mark.parametrize("name", ["labels/nmem0.lsa", "labels/.nmem1.lsa.tmp", ".provisioning"])
def test_a_label_area_symlink_is_refused_and_its_target_untouched(make_mount: Callable[..., Any], victim: Path,
                                                                  name: str) -> None:
    """The label storage areas of nfit DIMMs (written by every namespace change) follow the
    same rules: a link planted in place of one, of the area's exact size, is refused."""
    m = make_mount(SMALL_NFIT)
    m.umount()
    os.truncate(victim, NFIT_TEST_LABEL_SIZE)
    before = digest(victim)
    with contextlib.suppress(FileNotFoundError):
        (m.state_dir / name).unlink()
    (m.state_dir / name).symlink_to(victim)
    res = m.mount()
    assert res.returncode != 0 and not m.is_mounted()
    assert f"{m.state_dir / name}: a symbolic link" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert digest(victim) == before


def test_opens_never_follow_a_symlink(tmp_path: Path, victim: Path) -> None:
    """Past the check (a link made in between): media, label and record writes refuse it."""
    before = digest(victim)
    (tmp_path / "region0.media").symlink_to(victim)
    with pytest.raises(OSError) as e:
        Media(tmp_path / "region0.media", victim.stat().st_size)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OSError) as e:
        Media.create(tmp_path / "region0.media", 1 << 20)
    assert e.value.errno == errno.EEXIST
    (tmp_path / ".platform.json.tmp").symlink_to(victim)
    with pytest.raises(OSError) as e:
        write_atomically(tmp_path / "platform.json", b"{}")
    assert e.value.errno == errno.ELOOP
    assert digest(victim) == before and not (tmp_path / "platform.json").exists()
    (tmp_path / "nmem0.lsa").symlink_to(victim)
    with pytest.raises(OSError) as e:
        LabelArea(tmp_path / "nmem0.lsa", victim.stat().st_size, NFIT_TEST_MAX_XFER)
    assert e.value.errno == errno.ELOOP
    (tmp_path / ".nmem1.lsa.tmp").symlink_to(victim)
    with pytest.raises(OSError) as e:
        LabelArea.create(tmp_path / "nmem1.lsa", NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER)
    assert e.value.errno == errno.ELOOP
    assert digest(victim) == before and not (tmp_path / "nmem1.lsa").exists()


@pytest.mark.parametrize("what", ["dir 0777", "dir 0770", "file 0666", "file 0620", "dir owner", "file owner"])
def test_loose_modes_and_other_owners_are_refused(make_mount: Callable[..., Any], what: str) -> None:
    m = make_mount(SMALL_E820)
    m.umount()
    kind, change = what.split()
    path = m.state_dir if kind == "dir" else m.state_dir / "platform.json"
    if change == "owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")
        os.chown(path, 65534, 65534)
        expected = "owned by"
    else:
        path.chmod(int(change, 8))
        expected = f"writable by group or others (mode {change}"
    res = m.mount()
    assert res.returncode != 0 and not m.is_mounted()
    assert f"vnvdimm: {path}: {expected}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    # Put right as the message says, it mounts again with the same platform.
    if change == "owner":
        os.chown(path, os.getuid(), os.getgid())
    else:
        path.chmod(0o700 if kind == "dir" else 0o600)
    res = m.mount()
    assert res.returncode == 0, res.stderr


def limited_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_first_mount_leaves_nothing_behind(tmp_path: Path) -> None:
    """A region whose media the state dir's file system cannot hold (EFBIG, as ext4 for a
    4096T region; here by a file size limit on the mount): the reason, no traceback, no
    half-made platform, and the next mount of a fixed config just works."""
    (tmp_path / "mnt").mkdir()
    config = tmp_path / "t.toml"
    config.write_text(SMALL_E820.replace('size = "256M"', 'size = "2G"', 1))
    args = [*VNVDIMM, "mount", str(tmp_path / "mnt"), "--config", str(config), "--state-dir", str(tmp_path / "s")]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=limited_file_size(1 << 30))
    assert res.returncode != 0
    assert "cannot create 2G of media: File too large" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["labels", "lock"]
    assert not list((tmp_path / "s" / "labels").iterdir())
    config.write_text(SMALL_E820)
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*VNVDIMM, "umount", str(tmp_path / "mnt")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_an_interrupted_provisioning_is_undone_or_finished(make_mount: Callable[..., Any]) -> None:
    # Undone: what a killed first mount leaves while formatting (no completion mark).
    m = make_mount(SMALL_NFIT, mount=False)
    work = m.state_dir / ".provisioning"
    (work / "labels").mkdir(parents=True, mode=0o700)
    m.state_dir.chmod(0o700)
    (work / "region0.media").write_bytes(b"half")
    (work / "region0.media").chmod(0o600)
    res = m.mount()
    assert res.returncode == 0, res.stderr
    region0 = json.loads((m.state_dir / "platform.json").read_text())["regions"][0]
    assert not work.exists() and (m.state_dir / "region0.media").stat().st_size == region0["size"]
    ns = m.read("sys/bus/nd/devices/namespace0.0/size")
    m.umount()
    # Finished: a provisioning killed while moving its complete result into place.
    record = (m.state_dir / "platform.json").read_bytes()
    work.mkdir(mode=0o700)
    os.rename(m.state_dir / "platform.json", work / "platform.json")
    os.rename(m.state_dir / "region0.media", work / "region0.media")
    (work / "complete").touch(mode=0o600)
    res = m.mount()
    assert res.returncode == 0, res.stderr
    assert not work.exists() and (m.state_dir / "platform.json").read_bytes() == record
    assert m.read("sys/bus/nd/devices/namespace0.0/size") == ns


def test_mount_point_errors_say_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    res = subprocess.run([*VNVDIMM, "mount", str(missing), "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"vnvdimm: {missing}: no such directory: create it first (mkdir -p {missing})" in res.stderr
    assert not (tmp_path / "s").exists()
    (tmp_path / "file").touch()
    res = subprocess.run([*VNVDIMM, "mount", str(tmp_path / "file"), "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not a directory" in res.stderr


def test_a_state_dir_or_mount_point_that_is_a_symlink_is_refused(tmp_path: Path, victim: Path) -> None:
    """`--state-dir LINK` and `mount LINK`: refused, naming the link and its target, and
    nothing is created or mounted through it (the link's target stays as it was)."""
    (tmp_path / "mnt").mkdir()
    real_state = tmp_path / "real-state"
    real_state.mkdir(mode=0o700)
    (tmp_path / "state-link").symlink_to(real_state)
    res = subprocess.run([*VNVDIMM, "mount", str(tmp_path / "mnt"), "--state-dir", str(tmp_path / "state-link")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (f"vnvdimm: {tmp_path / 'state-link'}: the state dir is a symbolic link (to {real_state}); vnvdimm uses "
            "no state dir through one") in res.stderr, res.stderr
    assert list(real_state.iterdir()) == []
    (tmp_path / "mnt-link").symlink_to(tmp_path / "mnt")
    res = subprocess.run([*VNVDIMM, "mount", str(tmp_path / "mnt-link"), "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (f"vnvdimm: {tmp_path / 'mnt-link'}: the mount point is a symbolic link (to {tmp_path / 'mnt'})"
            in res.stderr), res.stderr
    assert not (tmp_path / "s").exists()


def test_mounting_over_a_non_empty_directory_warns(make_mount: Callable[..., Any]) -> None:
    m = make_mount(SMALL_E820, mount=False)
    (m.root / "notes.txt").write_text("hidden while mounted\n")
    res = m.mount()
    assert res.returncode == 0, res.stderr
    assert f"warning: {m.root} is not empty; its files are hidden while mounted" in res.stderr
    m.umount()
    assert (m.root / "notes.txt").read_text() == "hidden while mounted\n"


def test_version() -> None:
    from importlib.metadata import version

    res = subprocess.run([*VNVDIMM, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == f"vnvdimm {version('vnvdimm')}\n"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs for a state dir: a host file system that runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_store_refused_for_lack_of_space_says_enospc(tiny_fs: Path, make_mount: Callable[..., Any]) -> None:
    """The media are sparse: enabling a pfn device writes its info block, which a full host
    file system refuses. The bind store fails with ENOSPC (not a kernel errno, but the truth),
    and the log names it."""
    raw = SMALL_E820.replace('mode = "fsdax", map = "dev", align = "2M"', 'mode = "raw"')
    m = make_mount(raw, state_dir=tiny_fs / "state")
    fd = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as e:
            while True:
                os.write(fd, b"\0" * (1 << 16))
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOSPC
    seed = m.read("sys/bus/nd/devices/region0/pfn_seed").strip()
    m.write("sys/bus/nd/drivers/nd_pmem/unbind", b"namespace0.0")
    m.write(f"sys/bus/nd/devices/{seed}/uuid", b"0f2f2bd5-a19c-4a5f-8d5c-2a67e1f5a6a2")
    m.write(f"sys/bus/nd/devices/{seed}/mode", b"pmem")
    m.write(f"sys/bus/nd/devices/{seed}/namespace", b"namespace0.0")
    with pytest.raises(OSError) as e:
        m.write("sys/bus/nd/drivers/nd_pmem/bind", seed.encode())
    assert e.value.errno == errno.ENOSPC
    assert f"value '{seed}': No space left on device (ENOSPC)" in (m.state_dir / "vnvdimm.log").read_text()
