"""The FUSE request profile (VNVDIMM_FUSE_PROFILE) the benchmarks read: off by default, and
when on, SIGUSR2 writes the callbacks made since the previous signal, by operation."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from mount_kit import E820_BUS, read, wait_for


def take(pid: int, path: Path) -> dict[str, dict[str, int]]:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    wait_for(path.exists, 30, "the profile file")
    doc = json.loads(path.read_text())
    assert doc["pid"] == pid
    return doc["ops"]  # type: ignore[no-any-return]


def test_profile_counts_each_request_since_the_last_signal(make_mount, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profile.json"
    monkeypatch.setenv("VNVDIMM_FUSE_PROFILE", str(path))
    m = make_mount()
    assert m.pid is not None
    attr = m.sys / E820_BUS / "region0" / "size"
    first = read(attr)  # the walk to it is cached from here on
    # RELEASE is sent after close() returned (the kernel does not wait for it): this read's
    # must be in before the count starts over
    wait_for(lambda: "release" in take(m.pid, path), 30, "the first release")
    for _ in range(10):
        assert read(attr) == first
    counts: dict[str, int] = {}

    def released_all() -> bool:
        for op, o in take(m.pid, path).items():
            counts[op] = counts.get(op, 0) + o["count"]
        return counts.get("release", 0) >= 10

    wait_for(released_all, 30, "ten releases")
    # one open, one read and one release each, and nothing else (the path walk is served by
    # the kernel's caches)
    assert counts == {"open": 10, "read_buf": 10, "release": 10}
    assert take(m.pid, path) == {}  # each signal starts over
    read(attr)
    wait_for(lambda: take(m.pid, path).get("release", {}).get("cpu_ns", 0) > 0, 30, "a release's CPU time")
    assert read(attr)  # the daemon serves on


def test_no_profile_by_default(make_mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VNVDIMM_FUSE_PROFILE", raising=False)
    m = make_mount()
    assert m.pid is not None
    # SIGUSR2 is left at its default action (the process would end) unless profiling: the
    # daemon does not install a handler for it
    with open(f"/proc/{m.pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    assert not caught & (1 << (signal.SIGUSR2 - 1))
