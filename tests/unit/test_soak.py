"""The daemon's memory is bounded by what exists: thousands of create/destroy cycles through
the model's sysfs stores (in process, for speed) leave it where it was after warm-up.

A leak of one small object per cycle (the bus's uuid index kept every uuid ever given: about
85 B a cycle) shows as an allocated block a cycle and as resident memory; the bounds below
are a tenth of a block and 40 bytes a cycle."""

from __future__ import annotations

import gc
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from model_kit import Machine
from topologies import e820, nfit

from vnvdimm.model.base import Attr, Device
from vnvdimm.model.namespace import NamespacePmem
from vnvdimm.model.personality import Personality

CYCLES = int(os.environ.get("VNVDIMM_SOAK_CYCLES", "10000"))
WARM_UP = 1000
MAX_BLOCKS_PER_CYCLE = 0.1
MAX_RSS_PER_CYCLE = 40


def stores(dev: Device) -> dict[str, Callable[[bytes], None]]:
    return {e.name: e.store for e in dev.entries() if isinstance(e, Attr) and e.store is not None}


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_uuids(m: Machine) -> set[int]:
    """The uuids the devices that exist hold, found by walking the bus."""
    return {d.uuid.int for d in m.sys.all_devices()
            if isinstance(d, NamespacePmem | Personality) and d.uuid is not None}


def soak(cycle: Callable[[], None], cycles: int) -> tuple[float, float]:
    """Blocks and resident bytes gained per cycle after warm-up."""
    for _ in range(min(WARM_UP, cycles)):
        cycle()
    gc.collect()
    blocks, rss = sys.getallocatedblocks(), resident()
    for _ in range(cycles):
        cycle()
    gc.collect()
    return (sys.getallocatedblocks() - blocks) / cycles, (resident() - rss) / cycles


def test_reconfiguring_a_namespace_thousands_of_times_keeps_memory_flat(tmp_path: Path) -> None:
    """`ndctl create-namespace -f -e namespace0.0 -m fsdax|devdax` over and over on the default
    platform: a pfn and a dax device given a uuid, enabled, disabled and deleted each cycle."""
    m = Machine(tmp_path / "state", e820("64M raw"))
    m.boot()
    m.write("drivers/nd_pmem/unbind", "namespace0.0")
    region, ns = m.dev("region0"), m.dev("namespace0.0")
    drivers = {name: stores(drv) for name, drv in m.sys.drivers_of("nd").items()}

    def cycle() -> None:
        for kind, driver in (("pfn", "nd_pmem"), ("dax", "dax_pmem")):
            with m.sys.lock:
                dev = getattr(region, f"{kind}_seed")
                attrs = stores(dev)
                attrs["uuid"](str(uuid.uuid4()).encode() + b"\0")
                attrs["mode"](b"pmem\0")
                attrs["align"](b"2097152\0")
                attrs["namespace"](ns.name.encode() + b"\0")
            drivers[driver]["bind"](dev.name.encode() + b"\0")
            drivers[driver]["unbind"](dev.name.encode() + b"\0")
            with m.sys.lock:
                attrs["namespace"](b"\n")  # the personality is deleted

    blocks, rss = soak(cycle, CYCLES)
    assert blocks < MAX_BLOCKS_PER_CYCLE and rss < MAX_RSS_PER_CYCLE, \
        f"{CYCLES} cycles after warm-up: {blocks:.3f} blocks and {rss:.1f} resident bytes gained per cycle"
    bus = m.sys.buses[0]
    assert len(bus.uuids_given) == len(held_uuids(m)) == 0, len(bus.uuids_given)
    m.shutdown()


def test_creating_and_destroying_labelled_namespaces_keeps_memory_flat(tmp_path: Path) -> None:
    """`ndctl create-namespace -r region0 -m fsdax` then `destroy-namespace`: a labelled
    namespace and its pfn device, each given a uuid, made and deleted each cycle."""
    m = Machine(tmp_path / "state", nfit("128M 128M", "0,1: 32M raw"))
    m.state.sync_each_label_write = False
    m.boot()
    region = m.dev("region0")
    nd_pmem = stores(m.sys.drivers_of("nd")["nd_pmem"])
    kept = held_uuids(m)

    def cycle() -> None:
        with m.sys.lock:
            ns = region.ns_seed
            ns_attrs = stores(ns)
            ns_attrs["uuid"](str(uuid.uuid4()).encode() + b"\0")
            ns_attrs["size"](str(32 << 20).encode() + b"\0")
            pfn = region.pfn_seed
            attrs = stores(pfn)
            attrs["uuid"](str(uuid.uuid4()).encode() + b"\0")
            attrs["mode"](b"pmem\0")
            attrs["namespace"](ns.name.encode() + b"\0")
        nd_pmem["bind"](pfn.name.encode() + b"\0")
        nd_pmem["unbind"](pfn.name.encode() + b"\0")
        with m.sys.lock:
            attrs["namespace"](b"\n")
            ns_attrs["size"](b"0\0")  # the namespace is deleted with its labels

    blocks, rss = soak(cycle, CYCLES // 5)
    assert blocks < MAX_BLOCKS_PER_CYCLE and rss < MAX_RSS_PER_CYCLE, \
        f"{CYCLES // 5} cycles after warm-up: {blocks:.3f} blocks and {rss:.1f} resident bytes gained per cycle"
    assert set(held_uuids(m)) == kept and len(m.sys.buses[0].uuids_given) == len(kept)
    m.shutdown()


def test_a_uuid_counts_while_a_device_holds_it(tmp_path: Path) -> None:
    """The index answers "maybe taken" exactly for the uuids of devices that exist: a uuid is
    still refused while another device holds it, and free again once it does not."""
    m = Machine(tmp_path / "state", e820("64M raw", "64M raw"))
    m.boot()
    taken = str(uuid.uuid4())
    m.write("pfn0.0/uuid", taken)
    m.write("pfn1.0/uuid", taken)  # pfn uuids are not checked for uniqueness (nd_pfn uuid_store)
    index = m.sys.buses[0].uuids_given
    assert uuid.UUID(taken).int in index and len(index) == 1
    m.write("pfn0.0/uuid", str(uuid.uuid4()))
    assert uuid.UUID(taken).int in index and len(index) == 2  # pfn1.0 still holds it
    m.write("pfn1.0/uuid", str(uuid.uuid4()))
    assert uuid.UUID(taken).int not in index and len(index) == 2
    m.shutdown()
