"""The state dir as an attacker meets it, without a mount: a state dir (or an ancestor met on
the walk) that is a symbolic link is refused; every ancestor is held to ssh's StrictModes
(owner root or the user, not writable by group or others, a sticky dir fine for the user's own
entry); a symbolic link planted in the state dir is refused by every open, read and fsync
path (its target untouched); and once the state dir is open, swapping a directory above it for
a link to a decoy changes nothing: every file still lands in the directory that was checked."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from mount_kit import exchange
from topologies import SMALL_E820, SMALL_NFIT

from vnvdimm import safe_files
from vnvdimm.topology.config import ConfigError, TopologyConfig, load_config
from vnvdimm.topology.legacy_labels import dimm_labels
from vnvdimm.topology.provision import provision
from vnvdimm.topology.statedir import PLATFORM_FILE, PROVISIONING_DIR, StateDir

NOBODY = 65534
def tree_digest(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under `root`: mode, size, content hash (a link: its target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            content = (os.readlink(p) if stat.S_ISLNK(st.st_mode)
                       else hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "")
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, content)
    return out


def config(tmp_path: Path, text: str = SMALL_E820) -> TopologyConfig:
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return load_config(path)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A root-owned 0755 directory to build in (tmp_path's own mode is pytest's affair)."""
    path = tmp_path / "base"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A root-only directory (as /root) that a link points into: must stay as it is."""
    path = tmp_path / "decoy"
    (path / "state" / "labels").mkdir(parents=True)
    path.chmod(0o700)
    (path / "secret").write_bytes(b"root only\n" * 100)
    (path / "state" / "lock").write_bytes(b"1\n")
    return path


def test_a_state_dir_that_is_a_symlink_is_refused(base: Path, decoy: Path) -> None:
    before = tree_digest(decoy)
    (base / "state").symlink_to(decoy / "state")
    state = StateDir(base / "state")
    with pytest.raises(ConfigError, match=r"state dir is a symbolic link \(to .*decoy/state\).*give the directory"):
        state.ensure()
    assert tree_digest(decoy) == before


def test_a_link_of_roots_above_the_state_dir_is_followed(base: Path) -> None:
    """As /var/run -> /run: a link its owner (root, or the user) put in a directory only they
    can write is part of the layout, and the walk goes on from its target."""
    (base / "real").mkdir()
    (base / "alias").symlink_to("real")
    fd, where = safe_files.open_checked_dir(base / "alias" / "state", "state dir", create=True)
    os.close(fd)
    assert where == base / "real" / "state" and (base / "real" / "state").is_dir()


def test_a_link_of_another_users_above_the_state_dir_is_refused(base: Path, decoy: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a link owned by another user needs root to make")
    before = tree_digest(decoy)
    (base / "parent").symlink_to(decoy)
    os.chown(base / "parent", NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(safe_files.UnsafeStateDir, match=r"base/parent: a symbolic link owned by nobody on the way to "
                                                      r"the state dir .*give the real path"):
        safe_files.open_checked_dir(base / "parent" / "state", "state dir", create=True)
    assert tree_digest(decoy) == before


@pytest.mark.parametrize("case", ["others 0777", "group 0770", "owner nobody", "sticky, entry of nobody"])
def test_an_ancestor_others_can_change_is_refused_and_named(base: Path, case: str) -> None:
    if os.geteuid() != 0 and ("nobody" in case):
        pytest.skip("chown to another user needs root")
    parent = base / "shared"
    (parent / "sub").mkdir(parents=True)
    if case == "others 0777":
        parent.chmod(0o777)
        expect = r"shared: writable by others \(mode 0777\).*chmod go-w .*shared"
    elif case == "group 0770":
        parent.chmod(0o770)
        expect = r"shared: writable by group \(mode 0770\).*chmod go-w .*shared"
    elif case == "owner nobody":
        os.chown(parent, NOBODY, NOBODY)
        expect = r"shared: owned by nobody, who could replace .*shared/sub \(state dir .*sub/state is under it\)"
    else:
        parent.chmod(0o1777)
        os.chown(parent / "sub", NOBODY, NOBODY)
        expect = r"shared/sub: owned by nobody in the sticky directory .*shared, so nobody could replace it"
    with pytest.raises(ConfigError, match=expect):
        StateDir(parent / "sub" / "state").ensure()
    assert not (parent / "sub" / "state").exists()  # refused before anything was created


def test_a_sticky_ancestor_is_fine_for_the_users_own_entry(base: Path, tmp_path: Path) -> None:
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    state = StateDir(sticky / "mine" / "state")
    state.ensure()
    assert stat.S_IMODE(os.stat(sticky / "mine" / "state").st_mode) == 0o700
    state.close()


def test_files_land_in_the_checked_dir_after_an_ancestor_is_swapped_for_a_link(base: Path, decoy: Path,
                                                                              tmp_path: Path) -> None:
    """The issue's attack, at its worst moment: after the check, before every write."""
    real = base / "parent"
    (base / "evil").symlink_to(decoy)
    if os.geteuid() == 0:  # an attacker's link (as it would be, in a directory the attacker may write)
        os.chown(base / "evil", NOBODY, NOBODY, follow_symlinks=False)
    state = StateDir(real / "state")
    state.ensure()
    before = tree_digest(decoy)
    exchange(real, base / "evil")  # base/parent is now the link to the decoy
    assert (base / "parent" / "state").resolve() == (decoy / "state").resolve()
    platform, cfg = state.open(config(tmp_path, SMALL_NFIT))
    assert cfg is not None
    provision(platform, state, cfg)
    log = state.open_file(state.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(log, b"logged\n")
    os.close(log)
    lock = state.open_file(state.path / "lock", os.O_RDWR | os.O_CREAT)
    os.write(lock, b"42\n")
    os.close(lock)
    state.close()
    assert tree_digest(decoy) == before
    moved = base / "evil" / "state"  # where the checked directory is now
    assert {PLATFORM_FILE, "region0.media", "region1.media", "vnvdimm.log", "lock", "labels"} <= set(
        os.listdir(moved))
    assert sorted(os.listdir(moved / "labels")) == [f"nmem{d}.lsa" for d in range(4)]
    assert not (moved / PROVISIONING_DIR).exists()


# Every open, read and fsync path of the state dir, past the check (a link made after it).
def _lock(s: StateDir) -> object:
    return s.open_file(s.path / "lock", os.O_RDWR | os.O_CREAT)


def _log(s: StateDir) -> object:
    return s.open_file(s.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def _platform_read(s: StateDir) -> object:
    return s.read_platform()


def _media(s: StateDir) -> object:
    return s.open_media(0, 1 << 20)


def _label_area(s: StateDir) -> object:
    return s.label_area(0, 1 << 17, 256)


def _label_area_new(s: StateDir) -> object:
    return s.label_area(1, 1 << 17, 256)


def _json_labels(s: StateDir) -> object:
    return dimm_labels(s, 0).read()


def _provisioning(s: StateDir) -> object:
    return s.subdir(PROVISIONING_DIR)


def _read_private(s: StateDir) -> object:
    return safe_files.read_private(s.platform_path, s.fd)


def _fsync_dir(s: StateDir) -> object:
    return safe_files.fsync_dir(s.path / "labels")


def _install(s: StateDir) -> object:
    return s.install_provisioned()


def _labels_dir(s: StateDir) -> object:
    return StateDir(s.path).labels_fd


PATHS: dict[str, tuple[str, Callable[[StateDir], object]]] = {
    "lock": ("lock", _lock),
    "log": ("vnvdimm.log", _log),
    "platform read": (PLATFORM_FILE, _platform_read),
    "read_private": (PLATFORM_FILE, _read_private),
    "media": ("region0.media", _media),
    "label area": ("labels/nmem0.lsa", _label_area),
    "new label area's temporary": ("labels/.nmem1.lsa.tmp", _label_area_new),
    "json labels": ("labels/nmem0.json", _json_labels),
    "provisioning": (PROVISIONING_DIR, _provisioning),
    "provisioning's labels (install)": (f"{PROVISIONING_DIR}/labels", _install),
    "fsync of labels/": ("labels", _fsync_dir),
    "labels/ itself": ("labels", _labels_dir),
}


@pytest.mark.parametrize("what", list(PATHS))
def test_a_link_planted_after_the_check_is_refused_by_every_path(base: Path, decoy: Path, what: str) -> None:
    name, operation = PATHS[what]
    state = StateDir(base / "state")
    state.ensure()
    if name.startswith(f"{PROVISIONING_DIR}/"):
        (base / "state" / PROVISIONING_DIR).mkdir(mode=0o700)
    if name == "labels":
        (base / "state" / "labels").rmdir()
        (base / "state" / "labels").symlink_to(decoy / "state" / "labels")
    else:
        target = decoy / "secret"
        if name == "region0.media":
            os.truncate(target, 1 << 20)  # the size the region asks for: only the link stops it
        (base / "state" / name).symlink_to(target)
    before = tree_digest(decoy)
    with pytest.raises((OSError, ConfigError, ValueError)) as e:
        operation(state)
    error = e.value
    if isinstance(error, OSError):
        assert error.errno in (errno.ELOOP, errno.ENOTDIR), error
    else:
        assert "symbolic links" in str(error) or "ELOOP" in str(error) or "Too many levels" in str(error), error
    assert tree_digest(decoy) == before
    state.close()


def test_a_platform_record_write_refuses_a_planted_temporary(base: Path, decoy: Path, tmp_path: Path) -> None:
    state = StateDir(base / "state")
    state.ensure()
    platform, _ = state.open(config(tmp_path))
    (base / "state" / f".{PLATFORM_FILE}.tmp").symlink_to(decoy / "secret")
    before = tree_digest(decoy)
    with pytest.raises(OSError) as e:
        state.write_platform(platform)
    assert e.value.errno == errno.ELOOP
    assert tree_digest(decoy) == before and not (base / "state" / PLATFORM_FILE).exists()
    state.close()


def test_write_atomically_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "platform.json"
    safe_files.write_atomically(path, b"old")
    inode = path.stat().st_ino
    safe_files.write_atomically(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["platform.json"]  # no temp file left
