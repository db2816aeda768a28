"""The platform of the kernel's test module nfit_test (tools/testing/nvdimm/test/nfit.c), as
data: its two buses, their DIMMs with the NFIT control-region identity and memory-device flags
the module's tables give them, and their regions.

nfit_test.0 (nfit_test0_setup()): four 32 MiB DIMMs, handles NFIT_DIMM_HANDLE(node, socket,
imc, chan, dimm) = 0x0, 0x1, 0x100, 0x101, physical ids 0-3, control regions of vendor 0xabcd,
device 0, revision 1, manufacturing location 0xa, date 2016 (stored big-endian), serial
~handle; spa0 (32 MiB) interleaves the first 16 MiB of dimm0 and dimm1 (region offsets 1 and
256), spa1 (64 MiB) the 16 MiB at DPA 16 MiB of all four (region offsets 1<<16, 1<<24, 1<<32,
1<<40); memory-device flags: HEALTH_ENABLED on dimm1's spa0 entry, dimm0's and dimm2's spa1
entries and dimm3's control-region entry. The module also describes a hot-plugged fifth DIMM
(handle 0x1000) that it adds after probe; vnvdimm presents the four DIMMs that ndctl's tests
count on (firmware-update.sh lists exactly four), and test_dimm0..4 as the module creates them.

nfit_test.1 (nfit_test1_setup()): two DIMMs, handles 0x10000 and 0x10001, both physical id 0,
control regions with the byte-addressable energy-backed format; a 32 MiB PM range on the first
whose memory-device flags are SAVE_FAILED | RESTORE_FAILED | FLUSH_FAILED | HEALTH_OBSERVED |
NOT_ARMED (so the region is read-only), the second MAP_FAILED (mapped nowhere), and a 4 MiB
virtual-CD range (a region without DIMMs). No flush hints and no platform capabilities there.

Physical addresses follow the module's allocator: a pool from 4 GiB handing out 128 MiB-aligned
chunks for everything of DIMM size or more, in allocation order (spa0, spa1, the hot-plug spa,
the five BLK windows of nfit_test.0, then nfit_test.1's spa0); the virtual-CD range, smaller
than a DIMM, gets the next chunk here.
"""

from __future__ import annotations

from dataclasses import dataclass

SZ_1M = 1 << 20
DIMM_SIZE = 32 * SZ_1M
POOL_BASE = 4 << 30
POOL_ALIGN = 128 * SZ_1M

# ACPI NFIT memory-device-map flags (include/acpi/actbl1.h)
ACPI_NFIT_MEM_SAVE_FAILED = 1 << 0
ACPI_NFIT_MEM_RESTORE_FAILED = 1 << 1
ACPI_NFIT_MEM_FLUSH_FAILED = 1 << 2
ACPI_NFIT_MEM_NOT_ARMED = 1 << 3
ACPI_NFIT_MEM_HEALTH_OBSERVED = 1 << 4
ACPI_NFIT_MEM_HEALTH_ENABLED = 1 << 5
ACPI_NFIT_MEM_MAP_FAILED = 1 << 6

# NFIT interface format codes (drivers/acpi/nfit/nfit.h)
NFIT_FIC_BYTE = 0x101  # byte-addressable, energy backed
NFIT_FIC_BLK = 0x201  # block-addressable, not energy backed
NFIT_FIC_BYTEN = 0x301  # byte-addressable, not energy backed

MODULE = "nfit_test"


def dimm_handle(node: int, socket: int, imc: int, chan: int, dimm: int) -> int:
    """NFIT_DIMM_HANDLE()."""
    return ((node & 0xFFF) << 16) | ((socket & 0xF) << 12) | ((imc & 0xF) << 8) | ((chan & 0xF) << 4) | (dimm & 0xF)


# handle[] of nfit.c, indexed like test_dimmN
HANDLES = (
    dimm_handle(0, 0, 0, 0, 0), dimm_handle(0, 0, 0, 0, 1), dimm_handle(0, 0, 1, 0, 0), dimm_handle(0, 0, 1, 0, 1),
    dimm_handle(0, 1, 0, 0, 0), dimm_handle(1, 0, 0, 0, 0), dimm_handle(1, 0, 0, 0, 1),
)


@dataclass(frozen=True)
class TestDimm:
    """A DIMM of the module: its index in handle[] (test_dimmN), bus, label-area index."""

    __test__ = False  # not a pytest class

    index: int
    bus: int
    label_index: int  # i of sprintf(label[i], "label%d", i): the index within its bus
    phys_id: int
    format: int
    flags: int  # OR of the memory-device flags of every entry naming this DIMM


@dataclass(frozen=True)
class TestRegion:
    __test__ = False

    bus: int
    range_index: int
    start: int
    size: int
    members: tuple[tuple[int, int, int], ...]  # (test dimm index, dpa, region_offset)
    flush_hints: bool
    persistence: str


def serial(handle: int) -> int:
    """dcr->serial_number = ~handle, shown by the kernel big-endian (be32_to_cpu)."""
    return int.from_bytes((~handle & 0xFFFF_FFFF).to_bytes(4, "little"), "big")


DIMMS = (
    # each DIMM of nfit_test.0 has two control regions, a BLK one (code 0x201, one block
    # window) and a PM one (0x301); acpi/nfit keeps the one with windows for the DIMM
    # (__nfit_mem_init()), so nfit/format reads 0x0201
    TestDimm(0, 0, 0, 0, NFIT_FIC_BLK, ACPI_NFIT_MEM_HEALTH_ENABLED),
    TestDimm(1, 0, 1, 1, NFIT_FIC_BLK, ACPI_NFIT_MEM_HEALTH_ENABLED),
    TestDimm(2, 0, 2, 2, NFIT_FIC_BLK, ACPI_NFIT_MEM_HEALTH_ENABLED),
    TestDimm(3, 0, 3, 3, NFIT_FIC_BLK, ACPI_NFIT_MEM_HEALTH_ENABLED),
    TestDimm(5, 1, 0, 0, NFIT_FIC_BYTE,
             ACPI_NFIT_MEM_SAVE_FAILED | ACPI_NFIT_MEM_RESTORE_FAILED | ACPI_NFIT_MEM_FLUSH_FAILED
             | ACPI_NFIT_MEM_HEALTH_OBSERVED | ACPI_NFIT_MEM_NOT_ARMED),
    TestDimm(6, 1, 1, 0, NFIT_FIC_BYTE, ACPI_NFIT_MEM_MAP_FAILED),
)

# acpi_nfit_register_dimms() sets NDD_LABELING when it creates a DIMM whose PM capacity is
# aliased by BLK windows (nfit_test.0's four). nfit_test.1's DIMMs have no windows: they answer
# the label commands, but their labels decide their region's namespaces only once a DIMM probe
# finds a valid label index (nvdimm_probe()); until then the region is label-less, one IO
# namespace over all of it (what libndctl's nfit_test.1 checks expect).
LABELLED_BY_PROBE_ONLY = frozenset({HANDLES[5], HANDLES[6]})

# test_dimmN devices per bus (the module creates one per DCR, the hot-plug one included)
TEST_DIMM_DEVICES = ((0, 1, 2, 3, 4), (5, 6))


def _chunk(n: int) -> int:
    return POOL_BASE + n * POOL_ALIGN


REGIONS = (
    TestRegion(0, 1, _chunk(0), 32 * SZ_1M, ((0, 0, 1), (1, 0, 1 << 8)), True, "memory_controller"),
    TestRegion(0, 2, _chunk(1), 64 * SZ_1M, ((0, 16 * SZ_1M, 1 << 16), (1, 16 * SZ_1M, 1 << 24),
                                             (2, 16 * SZ_1M, 1 << 32), (3, 16 * SZ_1M, 1 << 40)),
               True, "memory_controller"),
    # chunks 2..7: nfit_test.0's hot-plug spa and its five BLK data windows
    TestRegion(1, 1, _chunk(8), 32 * SZ_1M, ((5, 0, 0),), False, ""),
    TestRegion(1, 0, _chunk(9), 4 * SZ_1M, (), False, ""),  # the virtual CD
)

BUSES = ("nfit_test.0", "nfit_test.1")

VENDOR = 0xCDAB  # as shown: be16_to_cpu(0xabcd)
DEVICE = 0x0000
REVISION = 0x0100  # be16_to_cpu(1)
MFG_LOCATION = 0x0A
MFG_DATE = 2016  # stored cpu_to_be16(2016): shown as 0x07e0
