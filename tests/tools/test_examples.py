"""The ready configs in examples/ mount and give what their comments promise (the README and
the tutorial point at them), through the real ndctl where it matters."""

from __future__ import annotations

import json
import tomllib

import pytest
from mount_kit import have_ndctl
from tooltest import REPO, memmap_progress

from vnvdimm.topology.config import DEFAULT_TOML, load_config, parse_config

EXAMPLES = REPO / "examples"

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="ndctl not installed")]


def mount_example(make_mount, name: str):  # type: ignore[no-untyped-def]
    return make_mount((EXAMPLES / name).read_text())


def namespaces(m) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    listed = m.ndctl("list", "-N")
    return [listed] if isinstance(listed, dict) else list(listed or [])


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == \
        ["default.toml", "large.toml", "nfit-errors.toml", "nfit_test.toml", "slow.toml"]


def test_default_is_the_built_in_platform(make_mount) -> None:  # type: ignore[no-untyped-def]
    assert load_config(EXAMPLES / "default.toml").regions == \
        parse_config(tomllib.loads(DEFAULT_TOML), "built-in").regions
    m = mount_example(make_mount, "default.toml")
    assert {(ns["dev"], ns["mode"]) for ns in namespaces(m)} == {("namespace0.0", "fsdax"), ("namespace1.0", "devdax")}


def test_nfit_errors_injects_and_scrubs_through_ndctl(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = mount_example(make_mount, "nfit-errors.toml")
    res = m.run("ndctl", "inject-error", "namespace0.0", "-B", "4096", "-n", "8")
    assert res.returncode == 0, res.stderr
    for step in ("start-scrub", "wait-scrub"):
        res = m.run("ndctl", step)
        assert res.returncode == 0, res.stderr
    (ns,) = [ns for ns in namespaces(m) if ns["dev"] == "namespace0.0"]
    (listed,) = m.ndctl("list", "-M", "-n", "namespace0.0")
    assert ns["mode"] == "fsdax" and listed["badblock_count"] == 8, listed
    assert listed["badblocks"][0]["offset"] == 4096 and listed["badblocks"][0]["length"] == 8


def test_nfit_test_has_the_modules_two_buses(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = mount_example(make_mount, "nfit_test.toml")
    buses = m.ndctl("list", "-B")
    assert sorted(b["provider"] for b in buses) == ["nfit_test.0", "nfit_test.1"]


def test_large_has_many_namespaces(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = mount_example(make_mount, "large.toml")
    listed = namespaces(m)
    assert len(listed) == 52
    assert sum(ns["mode"] == "raw" for ns in listed) == 48
    regions = m.ndctl("list", "-R")
    assert sorted(r["size"] for r in regions) == [256 << 30, 256 << 30]


def test_slow_keeps_its_memmap_active_long_enough_to_watch(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = mount_example(make_mount, "slow.toml")
    state, done, total = memmap_progress(m, "pfn0.1")
    assert state == "active" and done < total
    assert json.loads(m.read("sys/bus/nd/devices/pfn0.1/memmap/ns_per_page") or "0") == 20000
