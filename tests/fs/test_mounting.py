"""Mounting: a state dir mounted again shows the same system; a mount that cannot happen
(bad config, busy mount point, state dir in use) fails with a clear message and leaves
nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from mount_kit import SMALL_E820, children, diff, fuse_mounts_under, snapshot, sync_memmaps
from topologies import e820

from vnvdimm.mounts import vnvdimm_processes

pytestmark = pytest.mark.mount


def test_a_second_mount_of_the_state_dir_shows_the_same_system(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    sync_memmaps(first.sys)
    before = snapshot(first.sys)
    dev_before = {n: os.stat(first.dev / n).st_size for n in os.listdir(first.dev) if n.startswith(("pmem", "dax"))}
    first.umount()
    # the same state dir, another mount point, no --config: the recorded platform and media
    second = make_mount(None, state_dir=first.state_dir)
    sync_memmaps(second.sys)
    assert diff(before, snapshot(second.sys)) == {}
    assert {n: os.stat(second.dev / n).st_size for n in os.listdir(second.dev) if n.startswith(("pmem", "dax"))} \
        == dev_before


def test_the_state_dir_serves_one_mount_at_a_time(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    second = make_mount(SMALL_E820, state_dir=first.state_dir, mount=False)
    res = second.mount()
    assert res.returncode != 0
    assert f"{first.state_dir}: state dir in use by vnvdimm pid {first.pid}" in res.stderr
    assert not second.is_mounted()


def test_busy_mount_point(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    other = make_mount(SMALL_E820, mount=False)
    other.root.rmdir()
    other.root = first.root  # mount over the first mount
    res = other.mount()
    assert res.returncode != 0
    assert f"{first.root}: already a mount point (busy); unmount it first" in res.stderr
    assert fuse_mounts_under(first.root) == [str(first.root)]


def test_mount_point_that_is_not_a_directory(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(SMALL_E820, mount=False)
    m.root.rmdir()
    m.root.write_text("")
    res = m.mount()
    assert res.returncode != 0 and f"{m.root}: not a directory" in res.stderr


@pytest.mark.parametrize("text,key", [
    (SMALL_E820.replace('size = "256M"', 'size = "256Q"', 1), "region[0].size"),
    (SMALL_E820.replace('mode = "devdax"', 'mode = "dax"'), "region[1].namespace.mode"),
    (SMALL_E820 + "\n[extra]\n", "extra"),
    ("template = [\n", None),
])
def test_bad_config_fails_naming_the_file_and_the_key(make_mount, text: str, key: str | None) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(text, mount=False)
    res = m.mount()
    assert res.returncode != 0
    assert m.config is not None
    if key is None:
        assert f"{m.config}: not valid TOML" in res.stderr
    else:
        assert f"{m.config}: {key}: " in res.stderr, res.stderr
    assert not m.is_mounted()
    assert not m.state_dir.exists() or not any(m.state_dir.glob("region*.media"))


def test_config_contradicting_the_media_is_refused(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    first.umount()
    other = make_mount(SMALL_E820.replace('"256M"', '"512M"'), state_dir=first.state_dir, mount=False)
    res = other.mount()
    assert res.returncode != 0
    assert f"does not match the platform already in {first.state_dir}" in res.stderr
    assert not other.is_mounted()


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs findmnt (util-linux)")
def test_the_mount_table_shows_the_config_as_the_source(make_mount) -> None:  # type: ignore[no-untyped-def]
    """findmnt/df name the platform: the config file's absolute path, else "vnvdimm"."""
    def source(m) -> str:  # type: ignore[no-untyped-def]
        res = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(m.root)], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    with_config = make_mount()
    assert source(with_config).split() == [str(with_config.config), "fuse.vnvdimm"]
    assert source(make_mount(None)).split() == ["vnvdimm", "fuse.vnvdimm"]


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps (procps)")
def test_ps_names_the_daemon_and_its_workers(make_mount) -> None:  # type: ignore[no-untyped-def]
    """`ps` shows `vnvdimm daemon MNT` and `vnvdimm worker N MNT` (not the mount command all
    of them inherited), and `ps -e` (comm) says which is which."""
    m = make_mount(e820("64M fsdax dev", workers=2))

    def ps(pid: int, field: str) -> str:
        res = subprocess.run(["ps", "-ww", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=30)
        return res.stdout.strip()

    assert ps(m.pid, "args") == f"vnvdimm daemon {m.root}"
    assert ps(m.pid, "comm") == "vnvdimm daemon"
    workers = children(m.pid)
    assert sorted(ps(w, "args") for w in workers) == [f"vnvdimm worker {n} {m.root}" for n in range(len(workers))]
    assert {ps(w, "comm") for w in workers} == {"vnvdimm worker"}
    assert m.pid in vnvdimm_processes(m.root, "daemon") and set(workers) <= set(vnvdimm_processes(m.root))
