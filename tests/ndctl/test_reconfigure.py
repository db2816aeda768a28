"""`ndctl create-namespace -e namespace0.0 -m MODE -f` in every order, with the real Debian
ndctl/daxctl in a private mount namespace.

The 24 permutations of the four modes run one after the other would be 96 reconfigurations
(~0.4 s each with the listings, plus a mount per permutation: ~45 s). Instead one chain runs
a minimal superpermutation of the four modes (33 modes: every permutation appears as 4
consecutive reconfigurations) from the provisioned fsdax namespace, then a tail that adds
the a -> a reconfigurations the superpermutation lacks: 40 reconfigurations, every order of
the four modes and every ordered pair of modes, in ~17 s. After each: the JSON ndctl prints,
`ndctl list -N`, `daxctl list`, the device files, and for fsdax/devdax a memmap_state that
is `active` right after the enable (held at 10 % by the bus-level memmap_pause_at extension)
and `idle` after the hold is lifted and `sync` returns.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
from mount_kit import E820_BUS, have_ndctl, memmap_state, read, write
from topologies import e820

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

MODES = ("fsdax", "devdax", "sector", "raw")
SLOW_E820 = e820("256M fsdax dev", "256M devdax mem", ns_per_page=2000)
REGION = 268435456
MAP_DEV = 262144000  # 256 MiB - roundup(8 KiB + 64 * npfns, 2 MiB)
BTT_4096 = 267091968  # btt.c arena layout, 4 KiB sectors
DAX1 = {"chardev": "dax1.0", "size": 266338304, "target_node": 0, "align": 2097152, "mode": "devdax"}


SUPERPERMUTATION = "123412314231243121342132413214321"  # minimal for n = 4 (length 33)


def chain() -> list[str]:
    """The provisioned mode, the superpermutation over MODES, then the missing self-loops."""
    modes = [MODES[int(c) - 1] for c in SUPERPERMUTATION]
    tail = []
    last = modes[-1]
    for mode in MODES:
        if mode != last:
            tail.append(mode)
        tail.append(mode)  # mode -> mode
        last = mode
    return ["fsdax", *modes, *tail]


SEQUENCE = chain()


def test_the_chain_covers_every_order_and_every_transition() -> None:
    runs = {tuple(SEQUENCE[i:i + 4]) for i in range(1, len(SEQUENCE) - 3)}
    assert set(itertools.permutations(MODES)) <= runs
    assert set(itertools.pairwise(SEQUENCE)) == {(a, b) for a in MODES for b in MODES}
    assert len(SEQUENCE) - 1 == 40


def holder_path(mnt) -> str:  # type: ignore[no-untyped-def]
    holder = read(mnt.sys / E820_BUS / "region0/namespace0.0/holder").decode().strip()
    return f"{E820_BUS}/region0/{holder}" if holder else ""


def expected_create(mode: str, previous: str, uuid: str | None) -> dict[str, object]:
    ns: dict[str, object] = {"dev": "namespace0.0"}
    if mode == "raw":  # an e820 namespace without a personality is legacy "memory": fsdax map=mem
        return {**ns, "mode": "fsdax", "map": "mem", "size": REGION, "sector_size": 512, "blockdev": "pmem0"}
    if mode == "sector":
        return {**ns, "mode": "sector", "size": BTT_4096, "uuid": uuid, "sector_size": 4096, "blockdev": "pmem0s"}
    if mode == "fsdax":
        # ndctl keeps the namespace's own align when the mode stays the same: a legacy (raw)
        # namespace is fsdax without a pfn, so it gets a page; otherwise the seed's 2 MiB
        align = 4096 if previous == "raw" else 2097152
        return {**ns, "mode": "fsdax", "map": "dev", "size": MAP_DEV, "uuid": uuid, "sector_size": 512,
                "align": align, "blockdev": "pmem0"}
    return {**ns, "mode": "devdax", "map": "dev", "size": MAP_DEV, "uuid": uuid,
            "daxregion": {"id": 0, "size": MAP_DEV, "align": 2097152,
                          "devices": [{"chardev": "dax0.0", "size": MAP_DEV, "target_node": 0, "align": 2097152,
                                       "mode": "devdax"}]},
            "align": 2097152}


def expected_list(created: dict[str, object]) -> dict[str, object]:
    if created["mode"] != "devdax":
        return created
    listed = {k: v for k, v in created.items() if k != "daxregion"}
    listed["chardev"] = "dax0.0"
    return {k: listed[k] for k in ("dev", "mode", "map", "size", "uuid", "chardev", "align")}


DEVICE_FILE = {"fsdax": "pmem0", "raw": "pmem0", "sector": "pmem0s", "devdax": "dax0.0"}


def test_create_namespace_in_every_order(make_mount) -> None:  # type: ignore[no-untyped-def]
    mnt = make_mount(SLOW_E820)
    hold = mnt.sys / E820_BUS / "vnvdimm/memmap_pause_at"
    write(hold, b"100\n")  # every pfn/dax device enabled from now on holds at 10 % of its pages
    previous = SEQUENCE[0]
    for mode in SEQUENCE[1:]:
        res = mnt.run("ndctl", "create-namespace", "-e", "namespace0.0", "-m", mode, "-f")
        assert res.returncode == 0, f"{previous} -> {mode}: {res.stderr}"
        created = json.loads(res.stdout)
        holder = holder_path(mnt)
        if mode in ("fsdax", "devdax"):
            state = mnt.sys / holder / "memmap_state"
            assert memmap_state(mnt.root, f"sys/{holder}") == "active", f"{previous} -> {mode}"
            write(hold, b"1000\n")
            assert write(state, b"sync\0") == 5
            assert memmap_state(mnt.root, f"sys/{holder}") == "idle"  # (every record checked)
            write(hold, b"100\n")
        uuid = read(mnt.sys / holder / "uuid").decode().strip() if holder else None
        expected = expected_create(mode, previous, uuid)
        assert created == expected, f"{previous} -> {mode}"
        assert mnt.ndctl("list", "-N", "-n", "namespace0.0") == [expected_list(expected)]
        daxes = mnt.run("daxctl", "list")
        assert daxes.returncode == 0, daxes.stderr
        devices = sorted(json.loads(daxes.stdout), key=lambda d: d["chardev"])
        if mode == "devdax":
            assert devices == [{"chardev": "dax0.0", "size": MAP_DEV, "target_node": 0, "align": 2097152,
                                "mode": "devdax"}, DAX1]
        else:
            assert devices == [DAX1]
        present = {n for n in os.listdir(mnt.dev) if n.startswith(("pmem", "dax"))}
        assert present == {DEVICE_FILE[mode], "dax1.0"}, f"{previous} -> {mode}"
        size = os.stat(mnt.dev / DEVICE_FILE[mode]).st_size
        assert size == {"raw": REGION, "sector": BTT_4096}.get(mode, MAP_DEV)
        # the namespace's own view
        ns_mode = read(mnt.sys / E820_BUS / "region0/namespace0.0/mode").decode().strip()
        assert ns_mode == {"fsdax": "memory", "raw": "memory", "sector": "safe", "devdax": "dax"}[mode]
        previous = mode
